"""NAFNet and NAFNetLocal (megvii-research/NAFNet, official key names), architectures
``nafnet`` and ``nafnet-local``.

The network itself is spandrel's MIT-licensed copy of the official class, whose parameter names
match the released checkpoints exactly; this module adds what our registry needs: config
detection from a state dict, a config-checked builder and the :class:`ModelSpec`.

``nafnet-local`` is the test-time local statistics variant (TLSC, "NAFNetLocal") that the
GoPro/REDS deblurring releases were evaluated with: every global average pool of the simplified
channel attention becomes a box mean whose size is 1.5x the feature size seen at the training crop
(``train_size``). It adds no parameters, so its checkpoints have exactly NAFNet's keys and cannot be
told apart by detection: it is chosen by name (weights.yaml ``arch: nafnet-local``). spandrel has
no TLSC, so we build spandrel's NAFNet and swap its pooling modules for :class:`LocalMeanPool2d`
after construction, rather than keeping a second copy of the whole network. The kernel sizes are
computed from the architecture (feature size at ``train_size`` after the network's own padding)
instead of the official dummy forward pass: same numbers, no 256x256 forward at build time, and it
works on the meta device. MIT licence (upstream code and weights).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from restore_cli.errors import ModelError
from restore_cli.models.registry import (
    Architecture,
    ModelSpec,
    StateDict,
    register_architecture,
    sequence_length,
)

LICENCE = "MIT (megvii-research/NAFNet; implementation from spandrel, MIT)"
SOURCE = "https://github.com/megvii-research/NAFNet"

CONFIG_KEYS = ("img_channel", "width", "middle_blk_num", "enc_blk_nums", "dec_blk_nums")
# NAFNetLocal's extra options: the training crop (N, C, H, W) that fixes the pooling kernels, and
# the official "fast_imp" approximation (not implemented; no release uses it).
LOCAL_CONFIG_KEYS = (*CONFIG_KEYS, "train_size", "fast_imp")
OFFICIAL_TRAIN_SIZE = (1, 3, 256, 256)
# TLSC pools over 1.5x the feature size seen in training (the official base_size = int(1.5 * H)).
TLSC_BASE_FACTOR = 1.5
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
    num_levels = sequence_length(state_dict, "downs")
    num_up_levels = sequence_length(state_dict, "ups")
    return {
        "img_channel": img_channel,
        "width": width,
        "middle_blk_num": sequence_length(state_dict, "middle_blks"),
        "enc_blk_nums": [sequence_length(state_dict, f"encoders.{i}") for i in range(num_levels)],
        "dec_blk_nums": [
            sequence_length(state_dict, f"decoders.{i}") for i in range(num_up_levels)
        ],
    }


def build_nafnet(config: Mapping[str, Any]) -> nn.Module:
    """Build spandrel's NAFNet from a checked config (unknown keys are a user error)."""
    kwargs = _checked_config(config)
    return with_fused_layer_norms(spandrel_nafnet()(**kwargs))


def spandrel_nafnet() -> type[nn.Module]:
    """spandrel's NAFNet class, imported on first use: importing any part of spandrel loads
    every architecture it ships (torchvision included), about 2 s of start-up that a run of
    another model should not pay."""
    from spandrel.architectures.NAFNet import NAFNet

    return NAFNet


class LayerNorm2d(nn.Module):
    """NAFNet's per-pixel LayerNorm over channels (keys ``weight``/``bias``, eps 1e-6).

    The same formula as the official one (biased variance, eps inside the root), through the
    fused kernel over the last axis of an NHWC view, which is free for channels_last input.
    spandrel's copy computes it in six elementwise ops (a hand-written autograd function).
    ``Engine.restore`` of one random 3840x2160 image with 2 torch threads under cProfile, at
    the commits before and after this class: `unirestorer` 19.5 → 15.0 s, `nafnet-allinone-s`
    11.8 and 13.4 → 10.6 and 10.6 s.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[1],)
        normed = F.layer_norm(x.permute(0, 2, 3, 1), shape, self.weight, self.bias, self.eps)
        return normed.permute(0, 3, 1, 2)


def with_fused_layer_norms(module: nn.Module) -> nn.Module:
    """Swap spandrel's LayerNorm2d modules for :class:`LayerNorm2d`, keeping their parameters
    (so names, values and a loaded checkpoint stay exactly as they were)."""
    swaps = [
        (name, child)
        for name, child in module.named_modules()
        if type(child).__name__ == "LayerNorm2d" and not isinstance(child, LayerNorm2d)
    ]
    for name, old in swaps:
        parent_name, _, attribute = name.rpartition(".")
        fused = LayerNorm2d(old.weight.shape[0], float(old.eps))
        fused.weight, fused.bias = old.weight, old.bias
        setattr(module.get_submodule(parent_name), attribute, fused)
    return module


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


def _checked_config(config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ModelError(
            f"nafnet config has unknown keys {unknown} (allowed: {', '.join(CONFIG_KEYS)}); "
            "NAFNetLocal options such as train_size belong to architecture nafnet-local"
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


# ----------------------------------------------------------------------------- NAFNetLocal (TLSC)


class LocalMeanPool2d(nn.Module):
    """TLSC's replacement for the channel attention's global average pool.

    A global mean while the kernel covers the whole feature map in both directions (so inputs up
    to the training crop's 1.5x behave exactly like plain NAFNet); otherwise the mean of every
    ``kernel_size`` box that fits inside the map, from an integral image, replicate-padded back
    to the map's size. The integral image is accumulated in float32 for half/bf16 inputs: a
    running sum over a large map overflows fp16 and keeps no precision in bf16.
    """

    def __init__(self, kernel_size: Sequence[int]) -> None:
        super().__init__()
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        kernel_h, kernel_w = self.kernel_size
        if kernel_h >= height and kernel_w >= width:
            return F.adaptive_avg_pool2d(x, 1)
        kernel_h, kernel_w = min(kernel_h, height), min(kernel_w, width)
        values = x if x.dtype in (torch.float32, torch.float64) else x.float()
        integral = F.pad(values.cumsum(dim=-1).cumsum(dim=-2), (1, 0, 1, 0))
        lower_rows = integral[..., kernel_h:, kernel_w:] - integral[..., kernel_h:, :-kernel_w]
        upper_rows = integral[..., :-kernel_h, kernel_w:] - integral[..., :-kernel_h, :-kernel_w]
        means = ((lower_rows - upper_rows) / (kernel_h * kernel_w)).to(x.dtype)
        pad_h, pad_w = height - means.shape[-2], width - means.shape[-1]
        border = (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2)
        return F.pad(means, border, mode="replicate")


def tlsc_kernel_sizes(
    config: Mapping[str, Any], train_size: Sequence[int] = OFFICIAL_TRAIN_SIZE
) -> dict[str, tuple[int, int]]:
    """Pool kernel (h, w) of every NAFBlock, keyed by the pool's module path.

    Equals what the official dummy forward at ``train_size`` fixes: the block's feature size at
    the training crop (after NAFNet's zero-padding to 2**levels) times int(1.5 * H) // H.
    """
    kwargs = _checked_config({k: v for k, v in config.items() if k in CONFIG_KEYS})
    enc_blk_nums = kwargs.get("enc_blk_nums", [])
    dec_blk_nums = kwargs.get("dec_blk_nums", [])
    levels = len(enc_blk_nums)
    multiple = 2**levels
    train_h, train_w = int(train_size[-2]), int(train_size[-1])
    padded_h, padded_w = -(-train_h // multiple) * multiple, -(-train_w // multiple) * multiple
    base_h, base_w = int(train_h * TLSC_BASE_FACTOR), int(train_w * TLSC_BASE_FACTOR)

    def kernel_at(level: int) -> tuple[int, int]:
        feature_h, feature_w = padded_h >> level, padded_w >> level
        return feature_h * base_h // train_h, feature_w * base_w // train_w

    def blocks() -> Iterator[tuple[str, int]]:
        for index, count in enumerate(enc_blk_nums):
            yield from ((f"encoders.{index}.{b}", index) for b in range(count))
        middle = int(kwargs.get("middle_blk_num", 1))
        yield from ((f"middle_blks.{b}", levels) for b in range(middle))
        for index, count in enumerate(dec_blk_nums):
            yield from ((f"decoders.{index}.{b}", levels - 1 - index) for b in range(count))

    return {f"{block}.sca.0": kernel_at(level) for block, level in blocks()}


def build_nafnet_local(config: Mapping[str, Any]) -> nn.Module:
    """spandrel's NAFNet with every channel-attention pool replaced by its TLSC local mean."""
    kwargs, train_size = _checked_local_config(config)
    module = with_fused_layer_norms(spandrel_nafnet()(**kwargs))
    for path, kernel in tlsc_kernel_sizes(kwargs, train_size).items():
        block_path, _, _ = path.rpartition(".sca.")
        attention = module.get_submodule(block_path).sca
        if not isinstance(attention[0], nn.AdaptiveAvgPool2d):
            raise TypeError(f"{path} is {type(attention[0]).__name__}, expected a global pool")
        attention[0] = LocalMeanPool2d(kernel)
    return module


def detect_nafnet_local(state_dict: StateDict) -> dict[str, Any] | None:
    """Never: NAFNetLocal checkpoints have exactly NAFNet's keys; they are chosen by name."""
    return None


def nafnet_local_spec(config: Mapping[str, Any]) -> ModelSpec:
    """As NAFNet; half/bf16 stay safe because the local means accumulate in float32."""
    kwargs, _ = _checked_local_config(config)
    return ModelSpec(
        arch="nafnet-local",
        scale=1,
        size_multiple=2 ** len(kwargs.get("enc_blk_nums", [])),
        supports_half=True,
        supports_bf16=True,
        input_channels=int(kwargs.get("img_channel", 3)),
        output_channels=int(kwargs.get("img_channel", 3)),
    )


def _checked_local_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[int, ...]]:
    """NAFNet kwargs plus the training crop; the fast approximation is refused."""
    unknown = sorted(set(config) - set(LOCAL_CONFIG_KEYS))
    if unknown:
        raise ModelError(
            f"nafnet-local config has unknown keys {unknown} "
            f"(allowed: {', '.join(LOCAL_CONFIG_KEYS)})"
        )
    if config.get("fast_imp", False):
        raise ModelError(
            "nafnet-local: fast_imp=True (the official non-equivalent fast approximation) is not "
            "implemented; the released GoPro/REDS configs use fast_imp=False"
        )
    raw_size = config.get("train_size", OFFICIAL_TRAIN_SIZE)
    if (
        not isinstance(raw_size, Sequence)
        or len(raw_size) not in (2, 4)
        or not all(isinstance(n, int) and n > 0 for n in raw_size)
    ):
        raise ModelError(
            f"nafnet-local: train_size must be [N, C, H, W] (or [H, W]) positive ints, "
            f"not {raw_size!r}"
        )
    kwargs = _checked_config({k: v for k, v in config.items() if k in CONFIG_KEYS})
    return kwargs, tuple(raw_size)


NAFNET_LOCAL = register_architecture(
    Architecture(
        name="nafnet-local",
        build=build_nafnet_local,
        detect=detect_nafnet_local,
        spec=nafnet_local_spec,
        licence=LICENCE,
        source=SOURCE,
    )
)
