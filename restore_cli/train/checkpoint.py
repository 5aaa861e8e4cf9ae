"""Checkpoints: shippable safetensors weights plus a separate, safely loadable training state.

RUN_DIR/checkpoints/ holds, per saved step N (7 digits):

* ``step_N.safetensors``: the network's plain state dict (our architecture's official key
  names) with metadata ``arch`` and ``config`` (JSON), so the file loads anywhere a weights file
  does (``restore-cli restore --model step_N.safetensors``) and can be shipped as is;
* ``step_N_ema.safetensors``: the same for the EMA weights, when EMA is on;
* ``step_N.state.pt``: everything else needed to continue bit for bit (optimizer, scheduler,
  grad scaler, step, epoch, RNG states, resolved config), only tensors and plain containers, so
  it is read with ``torch.load(weights_only=True)`` and can never run code.

Each file is written atomically and the state file last: a checkpoint is complete exactly when
its state file exists, so a run killed mid-save resumes from the previous checkpoint. Pruning
deletes the state file first for the same reason. Temp files of a save that was killed (SIGKILL
leaves them) are removed before the next save.
"""

from __future__ import annotations

import io
import json
import random
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from restore_cli.errors import ConfigError, WeightsError
from restore_cli.io.atomic import atomic_write_bytes, remove_stale_temp_files

CHECKPOINTS_DIR = "checkpoints"
STATE_SUFFIX = ".state.pt"
EMA_SUFFIX = "_ema.safetensors"
WEIGHTS_SUFFIX = ".safetensors"
METADATA_FORMAT = "restore-cli-train"
_STATE_NAME = re.compile(r"^step_(\d+)\.state\.pt$")


@dataclass(frozen=True)
class Checkpoint:
    """The three files of the checkpoint saved after ``step`` completed iterations."""

    step: int
    weights: Path
    ema: Path
    state: Path

    @classmethod
    def at(cls, run_dir: Path, step: int) -> Checkpoint:
        folder = Path(run_dir) / CHECKPOINTS_DIR
        stem = f"step_{step:07d}"
        return cls(
            step,
            folder / f"{stem}{WEIGHTS_SUFFIX}",
            folder / f"{stem}{EMA_SUFFIX}",
            folder / f"{stem}{STATE_SUFFIX}",
        )

    def is_complete(self) -> bool:
        return self.state.is_file() and self.weights.is_file()


def weights_metadata(
    arch: str, model_config: Mapping[str, Any], step: int, *, ema: bool, train_config: Any
) -> dict[str, str]:
    """safetensors metadata (strings only): enough to rebuild the network and trace the run."""
    return {
        "format": METADATA_FORMAT,
        "arch": arch,
        "config": json.dumps(dict(model_config), sort_keys=True),
        "step": str(step),
        "ema": "true" if ema else "false",
        "train_config": json.dumps(train_config, sort_keys=True),
    }


def weights_bytes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes of a state dict; a tensor registered under two names (DA-CLIP's
    ``visual`` is ``clip.visual``) is stored twice, because safetensors refuses shared memory
    and a strict load of the architecture expects both names."""
    from safetensors.torch import save

    tensors, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return canonical_header(save(tensors, metadata=dict(metadata)))


def canonical_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors writes the
    metadata in hash-map order, which varies between processes, so two identical runs gave
    files with different sha256 (weights.yaml pins them). Offsets index the data block, so only
    the header (re-padded with spaces to 8 bytes, as the format asks) changes."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    weights: Mapping[str, torch.Tensor],
    ema_weights: Mapping[str, torch.Tensor] | None,
    state: Mapping[str, Any],
    metadata: Mapping[str, str],
) -> Checkpoint:
    """Write the weights, the EMA weights and finally the training state (the commit point)."""
    checkpoint = Checkpoint.at(run_dir, step)
    checkpoint.state.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files([checkpoint.state.parent])
    atomic_write_bytes(checkpoint.weights, weights_bytes(weights, metadata))
    if ema_weights is not None:
        ema_metadata = {**metadata, "ema": "true"}
        atomic_write_bytes(checkpoint.ema, weights_bytes(ema_weights, ema_metadata))
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write_bytes(checkpoint.state, buffer.getvalue())
    return checkpoint


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STATE_NAME.match(p.name)))
    found = [Checkpoint.at(run_dir, step) for step in steps]
    return [checkpoint for checkpoint in found if checkpoint.is_complete()]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (state file first)."""
    for checkpoint in list_checkpoints(run_dir)[:-keep]:
        for path in (checkpoint.state, checkpoint.ema, checkpoint.weights):
            path.unlink(missing_ok=True)


def resolve_resume(run_dir: Path, resume: str | None) -> Checkpoint | None:
    """The checkpoint ``--resume`` names: ``auto`` (latest in RUN_DIR, or None for a fresh
    start), a run folder (its latest), a ``.state.pt`` file, or a ``step_N.safetensors``."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path.parent)
        if not found:
            raise ConfigError(f"--resume {resume}: no complete checkpoint in that folder")
        return found[-1]
    name = path.name
    if name.endswith(STATE_SUFFIX):
        stem = name[: -len(STATE_SUFFIX)]
    elif name.endswith(EMA_SUFFIX):
        stem = name[: -len(EMA_SUFFIX)]
    elif name.endswith(WEIGHTS_SUFFIX):
        stem = name[: -len(WEIGHTS_SUFFIX)]
    else:
        raise ConfigError(f"--resume {resume}: expected auto, a run folder or a checkpoint file")
    match = re.fullmatch(r"step_(\d+)", stem)
    if match is None:
        raise ConfigError(f"--resume {resume}: not a checkpoint file name (step_NNNNNNN...)")
    checkpoint = Checkpoint.at(path.parent.parent, int(match.group(1)))
    if not checkpoint.is_complete():
        raise ConfigError(
            f"--resume {resume}: checkpoint is incomplete (needs {checkpoint.weights.name} "
            f"and {checkpoint.state.name})"
        )
    return checkpoint


def load_training_state(path: Path) -> dict[str, Any]:
    """The training state, read with the safe unpickler (tensors and plain containers only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files raise assorted types
        raise WeightsError(f"cannot read training state {path} ({type(error).__name__})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise WeightsError(f"{path} is not a restore-cli training state")
    return state


# ----------------------------------------------------------------------------- RNG states


def capture_rng_states() -> dict[str, Any]:
    """Python, numpy and torch (CPU + every CUDA device) generator states, as plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = list(states["cuda"])[: torch.cuda.device_count()]
        for index, state in enumerate(cuda_states):
            torch.cuda.set_rng_state(state, index)
