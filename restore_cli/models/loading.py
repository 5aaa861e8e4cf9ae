"""Safe weight loading, architecture detection and the spandrel bridge.

Weight files are untrusted input: ``.safetensors`` hold only tensors, and pickled checkpoints
(``.pth`` & co.) are read with ``torch.load(weights_only=True)`` only, so a file that would run
code (or needs custom classes) is refused instead of executed. The state dict is then matched
against our own architectures first (strict load) and otherwise handed to spandrel, whose
descriptor is translated into our :class:`ModelSpec`; the engine never sees the difference.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from restore_cli.errors import ModelError, WeightsError
from restore_cli.models.baselines import BASELINES, baseline_rows, is_baseline, load_baseline
from restore_cli.models.registry import (
    Architecture,
    LoadedModel,
    ModelSpec,
    architecture_names,
    detect_architecture,
    get_architecture,
)
from restore_cli.weights import (
    WeightsEntry,
    entry_status,
    load_weights_registry,
    resolve_weights,
)

StateDict = dict[str, torch.Tensor]

SAFETENSORS_SUFFIXES = frozenset({".safetensors"})
PICKLE_SUFFIXES = frozenset({".pth", ".pt", ".ckpt", ".bin"})
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES
# weights.yaml ``arch`` value for community checkpoints whose architecture spandrel detects.
SPANDREL_ARCH = "spandrel"

# Keys under which training frameworks nest the state dict, most preferred first:
# BasicSR (EMA weights before raw ones), Lightning / generic trainers.
_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model_state_dict", "model")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A LightningModule usually keeps the network as ``self.net``.
_LIGHTNING_NET_PREFIX = "net."
_SUMMARY_ITEMS = 3


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path, *, wrapping: str | None = None) -> StateDict:
    """Read a weight file safely and return its (unwrapped) tensors by name."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    try:
        return unwrap_checkpoint(checkpoint, wrapping)
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from None


def read_checkpoint(path: Path) -> Any:
    """The raw object stored in a weight file (a dict of tensors, possibly nested)."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file is empty: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickled_weights(path)
    supported = ", ".join(sorted(WEIGHT_SUFFIXES))
    raise WeightsError(f"{path}: unsupported weights file type {suffix!r} (supported: {supported})")


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise WeightsError(f"cannot read {path} as safetensors ({_one_line(error)})") from None


def _read_pickled_weights(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers; never unpickles code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol-version chatter from the safe unpickler
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" in message:
            raise WeightsError(
                f"{path} contains pickled Python objects ({_refused_pickle_detail(message)}); "
                "refusing to load it. Convert it to safetensors (load it with weights_only=False "
                "only if you trust its source, then save the state dict with "
                "safetensors.torch.save_file)"
            ) from None
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({_one_line(error)})"
        ) from None
    except Exception as error:  # corrupt files surface as many error types (KeyError, EOFError...)
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({_describe(error)})"
        ) from None


def _refused_pickle_detail(message: str) -> str:
    refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))
    if refused:
        return ", ".join(refused)
    opcode = re.search(r"Unsupported operand (\d+)", message)
    if opcode:
        return f"pickle opcode {opcode.group(1)} is not allowed by the safe loader"
    return "not allowed by the safe loader"


# ----------------------------------------------------------------------------- unwrapping


def unwrap_checkpoint(checkpoint: Any, wrapping: str | None = None) -> StateDict:
    """Find the network's state dict inside a training checkpoint.

    ``wrapping`` names it explicitly as ``KEY``, ``KEY:PREFIX`` or ``:PREFIX`` (take
    ``checkpoint[KEY]``, keep the keys starting with PREFIX and strip it), e.g. ``params_ema`` or
    ``state_dict:net.``. Without it, the usual layouts are recognised: BasicSR ``params_ema`` /
    ``params``, Lightning ``state_dict`` (``net.`` prefix), ``model_state_dict``/``model``.
    A leading ``module.`` (DataParallel) is always removed; non-tensor entries are dropped.
    """
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(
            f"the checkpoint is a {type(checkpoint).__name__}, not a dict of tensors"
        )
    if wrapping is not None:
        tensors = _unwrap_explicit(checkpoint, wrapping)
    else:
        tensors = _unwrap_automatic(checkpoint)
    for prefix in _WRAPPER_PREFIXES:
        tensors = _strip_shared_prefix(tensors, prefix)
    if not tensors:
        raise WeightsError("the checkpoint contains no tensors")
    return tensors


def _unwrap_explicit(checkpoint: Mapping[str, Any], wrapping: str) -> StateDict:
    key, _, prefix = wrapping.partition(":")
    inner: Any = checkpoint
    if key:
        inner = checkpoint.get(key)
        if not isinstance(inner, Mapping):
            found = ", ".join(sorted(str(k) for k in checkpoint)[:8])
            raise WeightsError(
                f"the checkpoint has no {key!r} dict (wrapping {wrapping!r}; "
                f"top-level keys: {found})"
            )
    tensors = _only_tensors(inner)
    if prefix:
        tensors = _select_prefix(tensors, prefix)
        if not tensors:
            raise WeightsError(f"no tensor names start with {prefix!r} (wrapping {wrapping!r})")
    return tensors


def _unwrap_automatic(checkpoint: Mapping[str, Any]) -> StateDict:
    ema = checkpoint.get("ema")
    if isinstance(ema, Mapping) and any(
        isinstance(k, str) and k.startswith(_EMA_PYTORCH_PREFIX) for k in ema
    ):  # ema_pytorch trainers (DiffUIR): the EMA network, not the training copy in "model"
        return _select_prefix(_only_tensors(ema), _EMA_PYTORCH_PREFIX)
    inner: Mapping[str, Any] = checkpoint
    wrapper_key = None
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}; state dicts never nest deeper
        key = next((k for k in _WRAPPER_KEYS if isinstance(inner.get(k), Mapping)), None)
        if key is None:
            break
        wrapper_key, inner = key, inner[key]
    tensors = _only_tensors(inner)
    if wrapper_key == "state_dict" and any(k.startswith(_LIGHTNING_NET_PREFIX) for k in tensors):
        tensors = _select_prefix(tensors, _LIGHTNING_NET_PREFIX)
    return tensors


# ema_pytorch's EMA wrapper keeps the averaged network under this prefix of checkpoint['ema'].
_EMA_PYTORCH_PREFIX = "ema_model.model."


def _only_tensors(mapping: Mapping[Any, Any]) -> StateDict:
    return {k: v for k, v in mapping.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _select_prefix(tensors: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _strip_shared_prefix(tensors: StateDict, prefix: str) -> StateDict:
    while tensors and all(k.startswith(prefix) for k in tensors):
        tensors = _select_prefix(tensors, prefix)
    return tensors


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ModelRequest:
    """What a ``--model`` value (with its ``--weights``) names, found without loading anything,
    so ``eval`` can check every model's name before the first one runs."""

    name: str  # what outputs call it: a file's stem (also ARCH --weights FILE), else the name
    load_on_cpu: Callable[[], LoadedModel]

    def load(self, device: str | torch.device = "cpu") -> LoadedModel:
        return _ready(self.load_on_cpu(), device)


def resolve_model(
    name_or_path: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None
) -> ModelRequest:
    """Which model a path or weights.yaml name means (the errors :func:`load_model` gives).

    A path is detected (our architectures first, then spandrel); a name is built from its
    weights.yaml config and loaded from its verified file, or from ``weights`` when given (the
    user's own file: not verified against the entry's sha256).
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        if weights is not None:
            raise ModelError(
                f"{path} is already a weights file; --weights only goes with a model name"
            )
        return ModelRequest(path.stem, partial(_load_from_file, path))
    if is_baseline(text):
        if weights is not None:
            raise ModelError(f"model {text!r} is a built-in baseline; it takes no --weights")
        return ModelRequest(text, partial(load_baseline, text))
    entries = load_weights_registry()
    if text in entries:
        return ModelRequest(text, partial(_load_entry, entries[text], weights))
    if weights is not None and text in architecture_names():
        weights_path = Path(weights).expanduser()
        return ModelRequest(weights_path.stem, partial(_load_architecture_file, text, weights_path))
    if _looks_like_path(text):
        raise WeightsError(f"weights file not found: {path}")
    known = ", ".join(sorted([*entries, *BASELINES]))
    raise ModelError(
        f"unknown model {text!r} (known models: {known}; or give the path of a "
        ".safetensors/.pth weights file)"
    )


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """A ready-to-run model (eval mode, no autograd, on ``device``) from a weights file path or
    a weights.yaml name; see :func:`resolve_model`."""
    return resolve_model(name_or_path, weights=weights).load(device)


def list_models() -> list[dict[str, Any]]:
    """One row per weights.yaml entry, then the built-in baselines, for ``restore-cli models``."""
    registered = [
        {
            "name": entry.name,
            "arch": entry.arch,
            "status": entry_status(entry),
            "licence": entry.licence,
            "source": entry.source,
            "description": entry.description,
            "default": entry.default,
        }
        for entry in load_weights_registry().values()
    ]
    return registered + baseline_rows()


def declared_architecture(path: Path) -> tuple[str, dict[str, Any]] | None:
    """``(arch, config)`` stored in a safetensors header by `restore-cli train`, if any.

    It names variants that keys cannot tell apart (``nafnet-local`` has ``nafnet``'s keys).
    """
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if "arch" not in metadata or "config" not in metadata:
            return None
        return metadata["arch"], json.loads(metadata["config"])
    except (OSError, ValueError, RuntimeError):
        return None  # read_state_dict reports unreadable files


def _load_from_file(path: Path) -> LoadedModel:
    state_dict = read_state_dict(path)
    declared = declared_architecture(path)
    if declared is not None:
        arch = get_architecture(declared[0])
        return _load_as(arch, _fill_from_shapes(arch, declared[1], state_dict), state_dict, path)
    detected = detect_architecture(state_dict)
    if detected is None:
        return _load_with_spandrel(state_dict, path, name=path.stem)
    return _load_as(*detected, state_dict, path)


def _fill_from_shapes(
    arch: Architecture, declared: Mapping[str, Any], state_dict: StateDict
) -> dict[str, Any]:
    """A header's config, with the keys it lacks read from the tensor shapes: a file written
    before a config key existed (an older UniRestorer has no ``encoder_block_cues``) must not
    get the key's new default when its tensors say otherwise."""
    return {**(arch.detect(state_dict) or {}), **declared}


def _load_as(
    arch: Architecture, config: Mapping[str, Any], state_dict: StateDict, path: Path
) -> LoadedModel:
    module = _build(arch.name, arch.build, config, origin=str(path))
    strict_load(module, state_dict, path, arch.name)
    return LoadedModel(
        name=path.stem, module=module, spec=arch.spec(dict(config)), source=str(path)
    )


def _load_architecture_file(arch_name: str, path: Path) -> LoadedModel:
    """``--model ARCH --weights FILE``: the file's config under the named architecture.

    The config comes from the file (our header, else key/shape detection); the architecture
    comes from the user, so a NAFNet-GoPro file runs as ``nafnet-local`` when asked to.
    """
    arch = get_architecture(arch_name)
    state_dict = read_state_dict(path)
    declared = declared_architecture(path)
    if declared is not None:
        config = _fill_from_shapes(arch, declared[1], state_dict)
    else:
        config = arch.detect(state_dict)
    if config is None:
        detected = detect_architecture(state_dict)
        config = detected[1] if detected is not None else None
    if config is None:
        raise ModelError(f"{path}: cannot infer a {arch_name} config from its keys")
    return _load_as(arch, config, state_dict, path)


def _load_entry(entry: WeightsEntry, weights: str | os.PathLike[str] | None) -> LoadedModel:
    users_file = weights is not None
    path = Path(weights).expanduser() if weights is not None else resolve_weights(entry)
    # The entry's wrapping describes the official file; a user's file is unwrapped by detection.
    state_dict = read_state_dict(path, wrapping=None if users_file else entry.wrapping)
    if entry.arch == SPANDREL_ARCH:
        loaded = _load_with_spandrel(state_dict, path, name=entry.name)
    else:
        arch = get_architecture(entry.arch)
        module = _build(arch.name, arch.build, entry.config, origin=f"model {entry.name!r}")
        strict_load(module, state_dict, path, f"{arch.name} {entry.config}")
        loaded = LoadedModel(name=entry.name, module=module, spec=arch.spec(entry.config))
    if entry.tasks:
        loaded.spec = replace(loaded.spec, tasks=entry.tasks)
    loaded.name = entry.name
    loaded.source = str(path) if users_file else entry.source
    loaded.licence = "" if users_file else entry.licence
    return loaded


def _build(
    arch_name: str,
    build: Callable[[dict[str, Any]], nn.Module],
    config: Mapping[str, Any],
    *,
    origin: str,
) -> nn.Module:
    try:
        return build(dict(config))
    except (TypeError, ValueError) as error:
        raise ModelError(
            f"{origin}: bad {arch_name} config {dict(config)} ({_one_line(error)})"
        ) from None


def strict_load(module: nn.Module, state_dict: StateDict, path: Path, target: str) -> None:
    """load_state_dict(strict=True), failing with a one-line summary a user can act on."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [
        f"{k} file {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    problems = [
        _summarise(items, label)
        for items, label in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (wrong_shape, "with wrong shape"),
        )
        if items
    ]
    if problems:
        raise WeightsError(f"{path} does not fit {target}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def _summarise(items: list[str], label: str) -> str:
    shown = ", ".join(items[:_SUMMARY_ITEMS]) + (", …" if len(items) > _SUMMARY_ITEMS else "")
    return f"{len(items)} {label} ({shown})"


def _ready(loaded: LoadedModel, device: str | torch.device) -> LoadedModel:
    """Inference only: eval mode (dropout off, norms frozen), no autograd, on the device."""
    loaded.module.eval()
    loaded.module.requires_grad_(False)
    loaded.module.to(device)
    return loaded


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or os.sep in text
        or text.startswith("~")
        or Path(text).suffix.lower() in WEIGHT_SUFFIXES
    )


# ----------------------------------------------------------------------------- spandrel


def _load_with_spandrel(state_dict: StateDict, path: Path, *, name: str) -> LoadedModel:
    """Community architectures through spandrel; only plain image-to-image models qualify."""
    import spandrel

    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError:
        raise ModelError(
            f"{path}: unrecognised architecture (not a built-in one, and spandrel "
            f"{spandrel.__version__} does not know it either)"
        ) from None
    except Exception as error:  # spandrel's per-architecture loaders raise assorted types
        raise WeightsError(
            f"{path}: spandrel recognised the file but could not load it ({_describe(error)})"
        ) from None
    if isinstance(descriptor, spandrel.MaskedImageModelDescriptor):
        raise ModelError(
            f"{path}: {descriptor.architecture.name} is an inpainting model that needs a mask; "
            "restore-cli does not support masked models"
        )
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ModelError(f"{path}: {type(descriptor).__name__} models are not supported")
    return LoadedModel(
        name=name, module=descriptor.model, spec=spec_from_spandrel(descriptor), source=str(path)
    )


def spec_from_spandrel(descriptor: Any) -> ModelSpec:
    """Translate a spandrel ``ImageModelDescriptor`` into our ModelSpec."""
    size = descriptor.size_requirements
    return ModelSpec(
        arch=f"{SPANDREL_ARCH}:{descriptor.architecture.id}",
        scale=int(descriptor.scale),
        size_multiple=int(size.multiple_of),
        supports_half=bool(descriptor.supports_half),
        supports_bf16=bool(descriptor.supports_bfloat16),
        input_channels=int(descriptor.input_channels),
        output_channels=int(descriptor.output_channels),
        min_size=int(size.minimum),
        square=bool(size.square),
    )


def _describe(error: BaseException) -> str:
    """``Type: message`` on one line (just ``Type`` when the message is empty)."""
    message = _one_line(error)
    name = type(error).__name__
    return name if message == name else f"{name}: {message}"


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
