"""NAFNet (megvii-research/NAFNet, official key names) registered as architecture ``nafnet``.

The network itself is spandrel's MIT-licensed copy of the official class, whose parameter names
match the released checkpoints exactly; this module only adds what our registry needs: config
detection from a state dict, a config-checked builder and the :class:`ModelSpec`.

Only plain ``NAFNet`` lives here. The GoPro/REDS releases use ``NAFNetLocal`` (test-time local
statistics in the channel attention); their weights load into this class but give lower quality,
so they are not registered under ``nafnet``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spandrel.architectures.NAFNet import NAFNet
from torch import nn

from restore_cli.errors import ModelError
from restore_cli.models.registry import Architecture, ModelSpec, StateDict, register_architecture

LICENCE = "MIT (megvii-research/NAFNet; implementation from spandrel, MIT)"
SOURCE = "https://github.com/megvii-research/NAFNet"

CONFIG_KEYS = ("img_channel", "width", "middle_blk_num", "enc_blk_nums", "dec_blk_nums")
# Every key of a NAFNet state dict starts with one of these module names.
_TOP_LEVEL_MODULES = frozenset(
    {"intro", "ending", "encoders", "decoders", "middle_blks", "ups", "downs"}
)
# The simplified channel attention's 1x1 conv: present in every NAFBlock, absent from the
# paper's "Baseline" network (which shares the other module names).
_NAFBLOCK_MARKER = ".sca.1.weight"


def detect_nafnet(state_dict: StateDict) -> dict[str, Any] | None:
    """Infer the constructor config of a NAFNet state dict, or None if it is not one."""
    if not _has_nafnet_layout(state_dict):
        return None
    intro = state_dict["intro.weight"]
    width, img_channel = int(intro.shape[0]), int(intro.shape[1])
    num_levels = _sequence_length(state_dict, "downs")
    num_up_levels = _sequence_length(state_dict, "ups")
    return {
        "img_channel": img_channel,
        "width": width,
        "middle_blk_num": _sequence_length(state_dict, "middle_blks"),
        "enc_blk_nums": [_sequence_length(state_dict, f"encoders.{i}") for i in range(num_levels)],
        "dec_blk_nums": [
            _sequence_length(state_dict, f"decoders.{i}") for i in range(num_up_levels)
        ],
    }


def build_nafnet(config: Mapping[str, Any]) -> nn.Module:
    """Build spandrel's NAFNet from a checked config (unknown keys are a user error)."""
    kwargs = _checked_config(config)
    return NAFNet(**kwargs)


def nafnet_spec(config: Mapping[str, Any]) -> ModelSpec:
    """NAFNet zero-pads to 2**levels inside forward; asking the engine to reflect-pad to that
    multiple first makes the internal padding a no-op (and avoids its dark borders)."""
    kwargs = _checked_config(config)
    channels = int(kwargs.get("img_channel", 3))
    return ModelSpec(
        arch="nafnet",
        scale=1,
        size_multiple=2 ** len(kwargs.get("enc_blk_nums", [])),
        supports_half=True,
        supports_bf16=True,
        input_channels=channels,
        output_channels=channels,
    )


def _has_nafnet_layout(state_dict: StateDict) -> bool:
    if "intro.weight" not in state_dict or "ending.weight" not in state_dict:
        return False
    if getattr(state_dict["intro.weight"], "ndim", 0) != 4:
        return False
    if any(key.split(".", 1)[0] not in _TOP_LEVEL_MODULES for key in state_dict):
        return False
    return any(key.endswith(_NAFBLOCK_MARKER) for key in state_dict)


def _sequence_length(state_dict: StateDict, prefix: str) -> int:
    """Number of entries of an ``nn.Sequential``/``ModuleList`` named ``prefix`` (max index + 1)."""
    start = prefix + "."
    indices = [
        int(head)
        for key in state_dict
        if key.startswith(start) and (head := key[len(start) :].split(".", 1)[0]).isdigit()
    ]
    return max(indices) + 1 if indices else 0


def _checked_config(config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ModelError(
            f"nafnet config has unknown keys {unknown} (allowed: {', '.join(CONFIG_KEYS)}); "
            "NAFNetLocal options such as train_size are not supported by this architecture"
        )
    kwargs = dict(config)
    for key in ("enc_blk_nums", "dec_blk_nums"):
        if key in kwargs:
            kwargs[key] = [int(n) for n in kwargs[key]]
    return kwargs


NAFNET = register_architecture(
    Architecture(
        name="nafnet",
        build=build_nafnet,
        detect=detect_nafnet,
        spec=nafnet_spec,
        licence=LICENCE,
        source=SOURCE,
    )
)
