"""Restormer (Zamir et al., CVPR 2022), registered as architecture ``restormer``.

Our own implementation, written from the paper and the behaviour described in
``shared/parity/README.md``; module and parameter names follow the official release
(swz30/Restormer) so its checkpoints load with ``strict=True``. We write it ourselves because the
only packaged copy (spandrel-extra-arches) is non-commercial. The official code and weights are
under the Academic Public License (non-commercial use only): this file contains no code from them,
but **the official checkpoints may only be used non-commercially**.

Numerics that matter for parity with the official outputs:

* LayerNorm over the channels of every pixel, eps 1e-5, biased variance. ``WithBias``
  (deblurring, deraining, defocus) subtracts the mean and adds a bias; ``BiasFree`` (all denoising
  releases) divides by the standard deviation without centring and has no bias parameter.
* MDTA attention is channel-by-channel ("transposed"): per head, q and k are L2-normalised over
  the pixels, their C×C product is scaled by a learned per-head ``temperature``, softmaxed, and
  applied to v. Cost is linear in the number of pixels.
* GDFN feed-forward: 1×1 conv to 2×hidden, depthwise 3×3, then GELU(first half) × second half.
* Down/up-sampling: 3×3 conv halving (doubling) the channels, then pixel-unshuffle (shuffle).
* The network needs H, W divisible by 8; the official scripts reflect-pad right/bottom outside the
  network, which is what the engine does for ``size_multiple=8``.

PromptIR (``promptir.py``) is built from the same blocks, so they are public here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

LICENCE = (
    "Academic Public License, non-commercial use only (swz30/Restormer code and weights); "
    "this re-implementation: restore-cli's licence"
)
SOURCE = "https://github.com/swz30/Restormer"

LAYERNORM_EPS = 1e-5
LAYERNORM_TYPES = ("WithBias", "BiasFree")
# The released models use 2.66; detection tries it first because the hidden width int(dim*2.66)
# does not determine the factor uniquely.
DEFAULT_FFN_EXPANSION = 2.66
DEFAULT_HEADS = (1, 2, 4, 8)
# Three 2x down-samplings: the network needs multiples of 8.
SIZE_MULTIPLE = 8

CONFIG_DEFAULTS: dict[str, Any] = {
    "inp_channels": 3,
    "out_channels": 3,
    "dim": 48,
    "num_blocks": [4, 6, 6, 8],
    "num_refinement_blocks": 4,
    "heads": list(DEFAULT_HEADS),
    "ffn_expansion_factor": DEFAULT_FFN_EXPANSION,
    "bias": False,
    "LayerNorm_type": "WithBias",
    "dual_pixel_task": False,
}
CONFIG_KEYS = tuple(CONFIG_DEFAULTS)

# Top-level module names of a Restormer state dict (PromptIR adds its own on top of most of these).
_TOP_LEVEL_MODULES = frozenset(
    {
        "patch_embed",
        "encoder_level1",
        "down1_2",
        "encoder_level2",
        "down2_3",
        "encoder_level3",
        "down3_4",
        "latent",
        "up4_3",
        "reduce_chan_level3",
        "decoder_level3",
        "up3_2",
        "reduce_chan_level2",
        "decoder_level2",
        "up2_1",
        "decoder_level1",
        "refinement",
        "skip_conv",
        "output",
    }
)


# ----------------------------------------------------------------------------- building blocks


class LayerNormParameters(nn.Module):
    """Holds the affine parameters; exists only so the keys read ``<norm>.body.weight/.bias``."""

    def __init__(self, channels: int, with_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias: nn.Parameter | None
        if with_bias:
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("bias", None)


class ChannelLayerNorm(nn.Module):
    """LayerNorm across channels at each pixel of a [B, C, H, W] tensor (eps 1e-5, biased var).

    ``BiasFree`` scales by the inverse standard deviation without subtracting the mean, exactly as
    the denoising releases were trained.
    """

    def __init__(self, channels: int, layernorm_type: str) -> None:
        super().__init__()
        if layernorm_type not in LAYERNORM_TYPES:
            raise ValueError(f"LayerNorm_type must be one of {LAYERNORM_TYPES}: {layernorm_type!r}")
        self.body = LayerNormParameters(channels, with_bias=layernorm_type == "WithBias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        scale = self.body.weight.view(1, -1, 1, 1)
        if self.body.bias is None:
            return x / torch.sqrt(variance + LAYERNORM_EPS) * scale
        shift = self.body.bias.view(1, -1, 1, 1)
        return (x - mean) / torch.sqrt(variance + LAYERNORM_EPS) * scale + shift


class TransposedSelfAttention(nn.Module):
    """MDTA: multi-head attention between channels (C×C per head), not between pixels."""

    def __init__(self, channels: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(
            channels * 3, channels * 3, kernel_size=3, padding=1, groups=channels * 3, bias=bias
        )
        self.project_out = nn.Conv2d(channels, channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        per_head = (batch, self.num_heads, channels // self.num_heads, height * width)
        query, key, value = (
            part.reshape(per_head) for part in self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        )
        query = F.normalize(query, dim=-1)
        key = F.normalize(key, dim=-1)
        weights = (query @ key.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        mixed = (weights @ value).reshape(batch, channels, height, width)
        return self.project_out(mixed)


class GatedFeedForward(nn.Module):
    """GDFN: depthwise-conv feed-forward whose GELU half gates the other half."""

    def __init__(self, channels: int, expansion: float, bias: bool) -> None:
        super().__init__()
        hidden = int(channels * expansion)
        self.project_in = nn.Conv2d(channels, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(
            hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias
        )
        self.project_out = nn.Conv2d(hidden, channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, content = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * content)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + MDTA(norm1(x)), then + GDFN(norm2(x))."""

    def __init__(
        self, channels: int, num_heads: int, ffn_expansion: float, bias: bool, layernorm_type: str
    ) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels, layernorm_type)
        self.attn = TransposedSelfAttention(channels, num_heads, bias)
        self.norm2 = ChannelLayerNorm(channels, layernorm_type)
        self.ffn = GatedFeedForward(channels, ffn_expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def transformer_stage(
    count: int,
    channels: int,
    num_heads: int,
    ffn_expansion: float,
    bias: bool,
    layernorm_type: str,
) -> nn.Sequential:
    """``count`` transformer blocks in a row (keys ``<stage>.<i>.…``)."""
    return nn.Sequential(
        *(
            TransformerBlock(channels, num_heads, ffn_expansion, bias, layernorm_type)
            for _ in range(count)
        )
    )


class PatchEmbedding(nn.Module):
    """3×3 conv from image to features ("overlapped patch embedding"); never has a bias."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halve H and W, double C: 3×3 conv to C/2, then pixel-unshuffle by 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False),
            nn.PixelUnshuffle(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double H and W, halve C: 3×3 conv to 2C, then pixel-shuffle by 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False),
            nn.PixelShuffle(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ----------------------------------------------------------------------------- the network


class Restormer(nn.Module):
    """Four-level transformer U-Net; the official constructor signature and key names.

    Level ``i`` works at ``dim·2^i`` channels and ``H/2^i``; the decoder's first level stays at
    ``2·dim`` (no channel reduction after the last skip concatenation), as do the refinement blocks.
    """

    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = DEFAULT_HEADS,
        ffn_expansion_factor: float = DEFAULT_FFN_EXPANSION,
        bias: bool = False,
        LayerNorm_type: str = "WithBias",  # the official option name
        dual_pixel_task: bool = False,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError("num_blocks and heads need one entry per level (4)")

        def stage(count: int, channels: int, num_heads: int) -> nn.Sequential:
            return transformer_stage(
                count, channels, num_heads, ffn_expansion_factor, bias, LayerNorm_type
            )

        level1, level2, level3, level4 = (dim, dim * 2, dim * 4, dim * 8)
        self.patch_embed = PatchEmbedding(inp_channels, level1)
        self.encoder_level1 = stage(num_blocks[0], level1, heads[0])
        self.down1_2 = Downsample(level1)
        self.encoder_level2 = stage(num_blocks[1], level2, heads[1])
        self.down2_3 = Downsample(level2)
        self.encoder_level3 = stage(num_blocks[2], level3, heads[2])
        self.down3_4 = Downsample(level3)
        self.latent = stage(num_blocks[3], level4, heads[3])

        self.up4_3 = Upsample(level4)
        self.reduce_chan_level3 = nn.Conv2d(level4, level3, kernel_size=1, bias=bias)
        self.decoder_level3 = stage(num_blocks[2], level3, heads[2])
        self.up3_2 = Upsample(level3)
        self.reduce_chan_level2 = nn.Conv2d(level3, level2, kernel_size=1, bias=bias)
        self.decoder_level2 = stage(num_blocks[1], level2, heads[1])
        self.up2_1 = Upsample(level2)
        self.decoder_level1 = stage(num_blocks[0], level2, heads[0])
        self.refinement = stage(num_refinement_blocks, level2, heads[0])

        # Dual-pixel defocus deblurring: 6 input channels (two views), no input residual.
        self.dual_pixel_task = dual_pixel_task
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(level1, level2, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(level2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        embedded = self.patch_embed(image)
        skip1 = self.encoder_level1(embedded)
        skip2 = self.encoder_level2(self.down1_2(skip1))
        skip3 = self.encoder_level3(self.down2_3(skip2))
        x = self.latent(self.down3_4(skip3))

        x = self.reduce_chan_level3(torch.cat([self.up4_3(x), skip3], dim=1))
        x = self.decoder_level3(x)
        x = self.reduce_chan_level2(torch.cat([self.up3_2(x), skip2], dim=1))
        x = self.decoder_level2(x)
        x = self.decoder_level1(torch.cat([self.up2_1(x), skip1], dim=1))
        x = self.refinement(x)

        if self.dual_pixel_task:
            return self.output(x + self.skip_conv(embedded))
        return self.output(x) + image


# ----------------------------------------------------------------------------- registry glue


def detect_restormer(state_dict: StateDict) -> dict[str, Any] | None:
    """The constructor config of a Restormer state dict, or None if it is not one.

    Every key must belong to a Restormer module, so PromptIR (extra ``prompt*``/``noise_level*``
    modules) and NAFNet (``intro``/``ending``…) dicts are never claimed.
    """
    if any(key.split(".", 1)[0] not in _TOP_LEVEL_MODULES for key in state_dict):
        return None
    config = detect_backbone_config(state_dict)
    if config is None:
        return None
    return {**config, "dual_pixel_task": "skip_conv.weight" in state_dict}


def build_restormer(config: Mapping[str, Any]) -> nn.Module:
    """Restormer from a checked config (unknown keys are a user error)."""
    return Restormer(**checked_config(config, CONFIG_DEFAULTS, "restormer"))


def restormer_spec(config: Mapping[str, Any]) -> ModelSpec:
    """Multiples of 8, reflect-padded by the engine like the official scripts.

    fp16 is refused: the attention L2-normalises q and k over all pixels of a feature map, and on
    multi-megapixel inputs that norm can pass fp16's 65504 limit (the releases were never run in
    fp16 upstream); bf16 keeps fp32's range and is allowed. Per-release tasks come from the
    weights.yaml entry.
    """
    kwargs = checked_config(config, CONFIG_DEFAULTS, "restormer")
    return ModelSpec(
        arch="restormer",
        scale=1,
        size_multiple=SIZE_MULTIPLE,
        supports_half=False,
        supports_bf16=True,
        input_channels=int(kwargs["inp_channels"]),
        output_channels=int(kwargs["out_channels"]),
    )


# Shared with promptir.py (same block layout, same detection problems).


def detect_backbone_config(state_dict: StateDict) -> dict[str, Any] | None:
    """The constructor options Restormer and PromptIR share, read from key names and shapes.

    ``bias`` shows in the attention's qkv conv (the patch embedding never has one), the LayerNorm
    type in whether the norms have a bias, the heads in each stage's ``temperature`` length.
    """
    required = ("patch_embed.proj.weight", "output.weight", "encoder_level1.0.attn.temperature")
    if any(key not in state_dict for key in required):
        return None
    embed = state_dict["patch_embed.proj.weight"]
    if getattr(embed, "ndim", 0) != 4:
        return None
    dim = int(embed.shape[0])
    stages = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")
    heads = [
        int(state_dict[f"{name}.0.attn.temperature"].shape[0])
        if f"{name}.0.attn.temperature" in state_dict
        else DEFAULT_HEADS[level]
        for level, name in enumerate(stages)
    ]
    stage_channels = {name: dim * 2**level for level, name in enumerate(stages)}
    expansion = detect_ffn_expansion(state_dict, stage_channels)
    if expansion is None:
        return None
    return {
        "inp_channels": int(embed.shape[1]),
        "out_channels": int(state_dict["output.weight"].shape[0]),
        "dim": dim,
        "num_blocks": [sequence_length(state_dict, name) for name in stages],
        "num_refinement_blocks": sequence_length(state_dict, "refinement"),
        "heads": heads,
        "ffn_expansion_factor": expansion,
        "bias": "encoder_level1.0.attn.qkv.bias" in state_dict,
        "LayerNorm_type": layernorm_type_of(state_dict, "encoder_level1.0.norm1"),
    }


def layernorm_type_of(state_dict: StateDict, norm_prefix: str) -> str:
    return "WithBias" if f"{norm_prefix}.body.bias" in state_dict else "BiasFree"


def detect_ffn_expansion(state_dict: StateDict, stage_channels: Mapping[str, int]) -> float | None:
    """The FFN expansion factor consistent with every stage's hidden width, or None.

    The checkpoint only stores ``int(channels * factor)``; 2.66 (every release) is tried first,
    then the smallest factor that reproduces the first stage's width.
    """
    hidden = {
        channels: int(state_dict[f"{name}.0.ffn.project_out.weight"].shape[1])
        for name, channels in stage_channels.items()
        if f"{name}.0.ffn.project_out.weight" in state_dict
    }
    if not hidden:
        return DEFAULT_FFN_EXPANSION
    first_channels, first_hidden = next(iter(hidden.items()))
    candidates = (
        DEFAULT_FFN_EXPANSION,
        first_hidden / first_channels,
        (first_hidden + 0.5) / first_channels,
    )
    for factor in candidates:
        if all(int(channels * factor) == width for channels, width in hidden.items()):
            return factor
    return None


def checked_config(
    config: Mapping[str, Any], defaults: Mapping[str, Any], arch: str
) -> dict[str, Any]:
    """Defaults filled in, unknown keys refused, lists made plain ints."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ModelError(
            f"{arch} config has unknown keys {unknown} (allowed: {', '.join(defaults)})"
        )
    kwargs = {**defaults, **config}
    for key in ("num_blocks", "heads"):
        kwargs[key] = [int(n) for n in kwargs[key]]
    return kwargs


RESTORMER = register_architecture(
    Architecture(
        name="restormer",
        build=build_restormer,
        detect=detect_restormer,
        spec=restormer_spec,
        licence=LICENCE,
        source=SOURCE,
    )
)
