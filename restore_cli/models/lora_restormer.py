"""UniRestorer's Restormer variants: self-padding Restormer and LoRA-Restormer.

Upstream: mrluin/UniRestorer @ 88b933cd (``basicsr/models/archs/restormer_arch.py`` and
``restormer_lora_arch.py``) — **no licence** (all rights reserved); the LoRA layers follow
microsoft/LoRA's ``loralib`` 0.1.2 ``ConvLoRA`` (MIT); Restormer itself is swz30/Restormer
(Academic Public License, non-commercial). Nothing here is copied: the blocks are our own
Restormer (``restormer.py``) and the LoRA wrapper is written from the behaviour described in
``shared/parity/README.md``. Only the parameter names follow upstream, so the released
checkpoints load with ``strict=True``. Licence of this file: restore-cli's; the UniRestorer
weights that need it carry no licence at all.

Two differences from the stock Restormer, both reproduced:

* UniRestorer's Restormers reflect-pad the input right/bottom to a multiple of 8 themselves,
  add the *padded* input as the residual and crop back (the stock network needs multiples of 8).
* In LoRA-Restormer every convolution (except the dual-pixel ``skip_conv``) is a loralib
  ``ConvLoRA``: the base conv lives at ``<name>.conv`` and the low-rank factors at
  ``<name>.lora_A`` ``(r·k, in·k)`` and ``<name>.lora_B`` ``(out/groups·k, r·k)``. The effective
  weight is ``conv.weight + (lora_B @ lora_A).view(conv.weight.shape) · alpha/r`` (a plain
  row-major reshape, also for depthwise convs). The rank and alpha of a conv are those of its
  U-Net level (see ``LEVEL_OF_MODULE``).

Merge on ``eval()`` (loralib's ``merge_weights=True``): switching to eval mode adds the delta
into ``conv.weight`` in place and marks the layer merged; switching back to train mode subtracts
it again. Checkpoints hold *unmerged* weights, so **load first, then call eval()**: loading into
an already merged (eval-mode) module leaves the flag set and the delta is never applied, exactly
as upstream. While unmerged (train mode) the forward adds the delta on the fly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from restore_cli.models.restormer import DEFAULT_FFN_EXPANSION, DEFAULT_HEADS, Restormer

LICENCE = (
    "no licence (mrluin/UniRestorer: all rights reserved); LoRA layout: microsoft/LoRA (MIT); "
    "Restormer: Academic Public License, non-commercial; this re-implementation: restore-cli's"
)
SOURCE = "https://github.com/mrluin/UniRestorer"

SIZE_MULTIPLE = 8

# U-Net level (index into r / lora_alpha) of every top-level module that holds convolutions.
LEVEL_OF_MODULE: dict[str, int] = {
    "patch_embed": 0,
    "encoder_level1": 0,
    "down1_2": 0,
    "encoder_level2": 1,
    "down2_3": 1,
    "encoder_level3": 2,
    "down3_4": 2,
    "latent": 3,
    "up4_3": 3,
    "reduce_chan_level3": 2,
    "decoder_level3": 2,
    "up3_2": 2,
    "reduce_chan_level2": 1,
    "decoder_level2": 1,
    "up2_1": 1,
    "decoder_level1": 0,
    "refinement": 0,
    "output": 0,
}


def reflect_pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad right/bottom so H and W become multiples of ``multiple``."""
    pad_h, pad_w = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")


class PaddedRestormer(Restormer):
    """Restormer that pads itself to a multiple of 8 and crops (UniRestorer's variant).

    The residual is the padded input, as upstream; keys are plain Restormer keys. Upstream's
    variant never uses the dual-pixel ``skip_conv`` (no release enables it), so it is refused.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.dual_pixel_task:
            raise ValueError("UniRestorer's Restormer variants do not support dual_pixel_task")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        return super().forward(reflect_pad_to_multiple(image, SIZE_MULTIPLE))[:, :, :height, :width]


class ConvLoRA(nn.Module):
    """A Conv2d plus a low-rank delta, merged into the weight in eval mode (loralib 0.1.2).

    Wraps an existing conv (kept as ``self.conv``) so the base weights and their init stay those
    of the network being adapted.
    """

    def __init__(self, conv: nn.Conv2d, r: int, lora_alpha: float) -> None:
        super().__init__()
        kernel = conv.kernel_size[0]
        if conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError("loralib ConvLoRA needs a square kernel")
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.merged = False
        if self.r > 0:
            # Registered before ``conv`` so the state-dict order is lora_A, lora_B, conv.weight.
            self.lora_A = nn.Parameter(
                conv.weight.new_zeros(self.r * kernel, conv.in_channels * kernel)
            )
            self.lora_B = nn.Parameter(
                conv.weight.new_zeros(conv.out_channels // conv.groups * kernel, self.r * kernel)
            )
            self.scaling = lora_alpha / self.r
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            conv.weight.requires_grad = False
        self.conv = conv

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"

    def delta(self) -> torch.Tensor:
        """The weight update ``(B @ A).view(weight.shape) · alpha/r``."""
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def train(self, mode: bool = True) -> ConvLoRA:
        """Unmerge when entering train mode, merge when entering eval mode (in place)."""
        super().train(mode)
        if self.r > 0 and self.merged == mode:
            with torch.no_grad():
                if mode:
                    self.conv.weight.sub_(self.delta())
                else:
                    self.conv.weight.add_(self.delta())
            self.merged = not mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r > 0 and not self.merged:
            return self.conv._conv_forward(x, self.conv.weight + self.delta(), self.conv.bias)
        return self.conv(x)


class LoRARestormer(PaddedRestormer):
    """Restormer with every conv (but ``skip_conv``) a :class:`ConvLoRA` of its level's rank."""

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
        r: Sequence[int] = (8, 8, 8, 8),
        lora_alpha: Sequence[float] = (8, 8, 8, 8),
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
    ) -> None:
        if len(r) != 4 or len(lora_alpha) != 4:
            raise ValueError("r and lora_alpha need one entry per level (4)")
        if lora_dropout != 0.0:
            raise ValueError("lora_dropout is a training option; only 0 is supported")
        if not merge_weights:
            raise ValueError("merge_weights=False is not supported (every release merges)")
        super().__init__(
            inp_channels=inp_channels,
            out_channels=out_channels,
            dim=dim,
            num_blocks=num_blocks,
            num_refinement_blocks=num_refinement_blocks,
            heads=heads,
            ffn_expansion_factor=ffn_expansion_factor,
            bias=bias,
            LayerNorm_type=LayerNorm_type,
            dual_pixel_task=dual_pixel_task,
        )
        self.r = [int(n) for n in r]
        self.lora_alpha = list(lora_alpha)
        for top_name, level in LEVEL_OF_MODULE.items():
            _wrap_convs(self, top_name, self.r[level], self.lora_alpha[level])


def _wrap_convs(root: nn.Module, path: str, r: int, lora_alpha: float) -> None:
    """Replace every Conv2d at or below ``root.<path>`` by a ConvLoRA (keeps module order)."""
    target = root.get_submodule(path)
    if isinstance(target, nn.Conv2d):
        parent_path, _, name = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, name, ConvLoRA(target, r, lora_alpha))
        return
    convs = [name for name, module in target.named_modules() if isinstance(module, nn.Conv2d)]
    for name in convs:
        _wrap_convs(target, name, r, lora_alpha)


def lora_modules(module: nn.Module) -> list[ConvLoRA]:
    """Every ConvLoRA inside ``module`` (for merge checks)."""
    return [m for m in module.modules() if isinstance(m, ConvLoRA)]
