"""PromptIR (Potlapalli et al., NeurIPS 2023), registered as architecture ``promptir``.

Our own implementation, written from the paper and the behaviour described in
``shared/parity/README.md``, with the official (va1shn9v/PromptIR) module and parameter names so
the released all-in-one checkpoint loads with ``strict=True`` after its Lightning ``net.`` prefix
is stripped. No packaged implementation exists. The official code and weights are under the
Academic Public License (non-commercial use only): this file contains no code from them, but
**the official checkpoint may only be used non-commercially**.

PromptIR is Restormer (same transformer blocks, see ``restormer.py``) with a prompt block at each
of the three decoder levels: the features' spatial mean picks, through a linear layer and a
softmax, a mixture of 5 learned prompt tensors; the mixture is resized bilinearly to the feature
size, passed through a 3×3 conv, concatenated to the features, mixed by one transformer block
("noise level" block, always with ``heads[2]`` heads) and reduced by a 1×1 conv.

Quirks reproduced on purpose, because the released checkpoint depends on them:

* The prompt and noise-level channel counts are fixed numbers in the release that only fit
  ``dim=48``; we write them as the sums they are at ``dim=48`` and refuse any other ``dim``.
* After the latent prompt the features are reduced to ``4·dim`` channels, so ``up4_3`` upsamples
  from ``4·dim`` (not ``8·dim`` as in Restormer) and the level-3 skip reduction takes ``2·dim +
  4·dim`` channels. ``decoder=False`` therefore cannot run at all and is refused.
* ``chnl_reduce1/2/3`` and ``reduce_noise_channel_1/2/3`` are built but never used in forward;
  they are in the checkpoint, so strict loading needs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from restore_cli.models.registry import Architecture, ModelSpec, StateDict, register_architecture
from restore_cli.models.restormer import (
    DEFAULT_FFN_EXPANSION,
    DEFAULT_HEADS,
    SIZE_MULTIPLE,
    Downsample,
    PatchEmbedding,
    TransformerBlock,
    Upsample,
    checked_config,
    detect_backbone_config,
    transformer_stage,
)

LICENCE = (
    "Academic Public License, non-commercial use only (va1shn9v/PromptIR code and weights); "
    "this re-implementation: restore-cli's licence"
)
SOURCE = "https://github.com/va1shn9v/PromptIR"

# What the released all-in-one checkpoint was trained on (denoising at sigma 15/25/50, deraining
# on Rain100L, dehazing on SOTS); the network itself is blind and takes no task input.
ALL_IN_ONE_TASKS = ("denoise", "derain", "dehaze")

# The only width the release's hard-coded prompt/noise-level channel counts fit.
SUPPORTED_DIM = 48
NUM_PROMPTS = 5
# (prompt channels, prompt side) for the prompts at decoder levels 1, 2, 3.
PROMPT_SHAPES = ((64, 64), (128, 32), (320, 16))

CONFIG_DEFAULTS: dict[str, Any] = {
    "inp_channels": 3,
    "out_channels": 3,
    "dim": SUPPORTED_DIM,
    "num_blocks": [4, 6, 6, 8],
    "num_refinement_blocks": 4,
    "heads": list(DEFAULT_HEADS),
    "ffn_expansion_factor": DEFAULT_FFN_EXPANSION,
    "bias": False,
    "LayerNorm_type": "WithBias",
    "decoder": True,
}
CONFIG_KEYS = tuple(CONFIG_DEFAULTS)

# Modules only PromptIR has; a dict must contain these to be claimed (Restormer has none of them).
_PROMPTIR_MARKERS = ("chnl_reduce1.weight", "reduce_noise_channel_1.weight")
_TOP_LEVEL_MODULES = frozenset(
    {
        "patch_embed",
        "prompt1",
        "prompt2",
        "prompt3",
        "chnl_reduce1",
        "chnl_reduce2",
        "chnl_reduce3",
        "reduce_noise_channel_1",
        "encoder_level1",
        "down1_2",
        "reduce_noise_channel_2",
        "encoder_level2",
        "down2_3",
        "reduce_noise_channel_3",
        "encoder_level3",
        "down3_4",
        "latent",
        "up4_3",
        "reduce_chan_level3",
        "noise_level3",
        "reduce_noise_level3",
        "decoder_level3",
        "up3_2",
        "reduce_chan_level2",
        "noise_level2",
        "reduce_noise_level2",
        "decoder_level2",
        "up2_1",
        "noise_level1",
        "reduce_noise_level1",
        "decoder_level1",
        "refinement",
        "output",
    }
)


class PromptGenBlock(nn.Module):
    """Input-conditioned prompt: softmax-weighted sum of learned prompts, resized, 3×3 conv."""

    def __init__(
        self, prompt_channels: int, prompt_size: int, feature_channels: int, num_prompts: int
    ) -> None:
        super().__init__()
        self.prompt_param = nn.Parameter(
            torch.rand(1, num_prompts, prompt_channels, prompt_size, prompt_size)
        )
        self.linear_layer = nn.Linear(feature_channels, num_prompts)
        self.conv3x3 = nn.Conv2d(
            prompt_channels, prompt_channels, kernel_size=3, padding=1, bias=False
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        height, width = features.shape[-2:]
        prompt_weights = self.linear_layer(features.mean(dim=(-2, -1))).softmax(dim=1)
        weighted = prompt_weights[:, :, None, None, None] * self.prompt_param[0]
        prompt = F.interpolate(
            weighted.sum(dim=1), size=(height, width), mode="bilinear", align_corners=False
        )
        return self.conv3x3(prompt)


class PromptIR(nn.Module):
    """Restormer U-Net with prompt blocks in the decoder; the official signature and key names.

    Attributes are created in the official order, so ``state_dict()`` lists the keys exactly as
    the released checkpoint does.
    """

    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = SUPPORTED_DIM,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = DEFAULT_HEADS,
        ffn_expansion_factor: float = DEFAULT_FFN_EXPANSION,
        bias: bool = False,
        LayerNorm_type: str = "WithBias",  # the official option name
        decoder: bool = True,
    ) -> None:
        super().__init__()
        if dim != SUPPORTED_DIM:
            raise ValueError(
                f"dim={dim}: PromptIR's prompt channel counts are fixed for dim={SUPPORTED_DIM}"
            )
        if not decoder:
            raise ValueError(
                "decoder=False: the official network cannot run without its decoder prompts"
            )
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError("num_blocks and heads need one entry per level (4)")

        def stage(count: int, channels: int, num_heads: int) -> nn.Sequential:
            return transformer_stage(
                count, channels, num_heads, ffn_expansion_factor, bias, LayerNorm_type
            )

        def noise_level_block(channels: int) -> TransformerBlock:
            return TransformerBlock(channels, heads[2], ffn_expansion_factor, bias, LayerNorm_type)

        level1, level2, level3, level4 = (dim, dim * 2, dim * 4, dim * 8)
        (prompt1, size1), (prompt2, size2), (prompt3, size3) = PROMPT_SHAPES

        self.patch_embed = PatchEmbedding(inp_channels, level1)
        self.decoder = decoder
        # Each prompt reads the features it is concatenated to: level 2, 3 and 4 outputs.
        self.prompt1 = PromptGenBlock(prompt1, size1, level2, NUM_PROMPTS)
        self.prompt2 = PromptGenBlock(prompt2, size2, level3, NUM_PROMPTS)
        self.prompt3 = PromptGenBlock(prompt3, size3, level4, NUM_PROMPTS)

        # Unused in forward; present in the release.
        self.chnl_reduce1 = nn.Conv2d(prompt1, prompt1, kernel_size=1, bias=bias)
        self.chnl_reduce2 = nn.Conv2d(prompt2, prompt2, kernel_size=1, bias=bias)
        self.chnl_reduce3 = nn.Conv2d(prompt3, 256, kernel_size=1, bias=bias)

        self.reduce_noise_channel_1 = nn.Conv2d(level1 + 64, level1, kernel_size=1, bias=bias)
        self.encoder_level1 = stage(num_blocks[0], level1, heads[0])
        self.down1_2 = Downsample(level1)
        self.reduce_noise_channel_2 = nn.Conv2d(level2 + 128, level2, kernel_size=1, bias=bias)
        self.encoder_level2 = stage(num_blocks[1], level2, heads[1])
        self.down2_3 = Downsample(level2)
        self.reduce_noise_channel_3 = nn.Conv2d(level3 + 256, level3, kernel_size=1, bias=bias)
        self.encoder_level3 = stage(num_blocks[2], level3, heads[2])
        self.down3_4 = Downsample(level3)
        self.latent = stage(num_blocks[3], level4, heads[3])

        # Decoder level 3: the latent prompt, then back to level-3 width before upsampling.
        self.up4_3 = Upsample(level3)
        self.reduce_chan_level3 = nn.Conv2d(level2 + level3, level3, kernel_size=1, bias=bias)
        self.noise_level3 = noise_level_block(level4 + prompt3)
        self.reduce_noise_level3 = nn.Conv2d(level4 + prompt3, level3, kernel_size=1, bias=bias)
        self.decoder_level3 = stage(num_blocks[2], level3, heads[2])

        self.up3_2 = Upsample(level3)
        self.reduce_chan_level2 = nn.Conv2d(level3, level2, kernel_size=1, bias=bias)
        self.noise_level2 = noise_level_block(level3 + prompt2)
        self.reduce_noise_level2 = nn.Conv2d(level3 + prompt2, level3, kernel_size=1, bias=bias)
        self.decoder_level2 = stage(num_blocks[1], level2, heads[1])

        self.up2_1 = Upsample(level2)
        self.noise_level1 = noise_level_block(level2 + prompt1)
        self.reduce_noise_level1 = nn.Conv2d(level2 + prompt1, level2, kernel_size=1, bias=bias)
        self.decoder_level1 = stage(num_blocks[0], level2, heads[0])
        self.refinement = stage(num_refinement_blocks, level2, heads[0])
        self.output = nn.Conv2d(level2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skip1 = self.encoder_level1(self.patch_embed(image))
        skip2 = self.encoder_level2(self.down1_2(skip1))
        skip3 = self.encoder_level3(self.down2_3(skip2))
        x = self.latent(self.down3_4(skip3))

        x = self._prompted(x, self.prompt3, self.noise_level3, self.reduce_noise_level3)
        x = self.reduce_chan_level3(torch.cat([self.up4_3(x), skip3], dim=1))
        x = self.decoder_level3(x)

        x = self._prompted(x, self.prompt2, self.noise_level2, self.reduce_noise_level2)
        x = self.reduce_chan_level2(torch.cat([self.up3_2(x), skip2], dim=1))
        x = self.decoder_level2(x)

        x = self._prompted(x, self.prompt1, self.noise_level1, self.reduce_noise_level1)
        x = self.decoder_level1(torch.cat([self.up2_1(x), skip1], dim=1))
        x = self.refinement(x)
        return self.output(x) + image

    @staticmethod
    def _prompted(
        features: torch.Tensor, prompt: nn.Module, block: nn.Module, reduce: nn.Module
    ) -> torch.Tensor:
        """Concatenate the prompt, mix with one transformer block, reduce the channels."""
        return reduce(block(torch.cat([features, prompt(features)], dim=1)))


# ----------------------------------------------------------------------------- registry glue


def detect_promptir(state_dict: StateDict) -> dict[str, Any] | None:
    """The constructor config of a PromptIR state dict, or None if it is not one.

    Claims only dicts with PromptIR's own modules (``chnl_reduce1``, ``reduce_noise_channel_1``)
    and nothing foreign, so Restormer and NAFNet dicts are never taken.
    """
    if any(marker not in state_dict for marker in _PROMPTIR_MARKERS):
        return None
    if any(key.split(".", 1)[0] not in _TOP_LEVEL_MODULES for key in state_dict):
        return None
    config = detect_backbone_config(state_dict)
    if config is None:
        return None
    return {**config, "decoder": "prompt1.prompt_param" in state_dict}


def build_promptir(config: Mapping[str, Any]) -> nn.Module:
    """PromptIR from a checked config (unknown keys are a user error)."""
    return PromptIR(**checked_config(config, CONFIG_DEFAULTS, "promptir"))


def promptir_spec(config: Mapping[str, Any]) -> ModelSpec:
    """Multiples of 8 (reflect-padded by the engine); fp32/bf16 only, for Restormer's reason
    (q/k norms over all pixels can overflow fp16 on large inputs).

    ``tasks`` lists what the all-in-one release restores; the network is blind (it infers the
    degradation itself) and takes no task input.
    """
    kwargs = checked_config(config, CONFIG_DEFAULTS, "promptir")
    return ModelSpec(
        arch="promptir",
        scale=1,
        size_multiple=SIZE_MULTIPLE,
        supports_half=False,
        supports_bf16=True,
        input_channels=int(kwargs["inp_channels"]),
        output_channels=int(kwargs["out_channels"]),
        tasks=ALL_IN_ONE_TASKS,
    )


PROMPTIR = register_architecture(
    Architecture(
        name="promptir",
        build=build_promptir,
        detect=detect_promptir,
        spec=promptir_spec,
        licence=LICENCE,
        source=SOURCE,
    )
)
