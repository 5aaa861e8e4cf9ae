"""DehazeFormer (Song et al., TIP 2023), as used by UniRestorer's dehazing experts.

Upstream: IDKiro/DehazeFormer (``models/dehazeformer.py``), MIT; UniRestorer
(mrluin/UniRestorer @ 88b933cd, ``basicsr/models/archs/dehazeformer_arch.py``, no licence) uses an
unchanged copy. This is our own code written from the architecture description and the parity
fixture; module and parameter names follow upstream so checkpoints load with ``strict=True``.
Licence of this file: restore-cli's.

Numerics that matter for parity:

* RLN ("revised LayerNorm") normalises over all of C, H and W of each sample (eps 1e-5,
  biased variance) and also returns ``meta1(std)`` and ``meta2(mean)`` (1×1 convs on the
  statistics); the block multiplies its attention output by the first and adds the second.
* Window attention in 8×8 windows with a relative-position bias produced by an MLP from
  log-spaced offsets (``relative_positions``, a persistent buffer). Odd blocks shift the windows
  by half a window by *reflect padding* (not a cyclic roll), then crop.
* Each network stage uses attention only in its last ``attn_ratio·depth`` blocks; the others are
  convolution-only ("Conv": two reflect-padded 3×3 convs; "DWConv": V, depthwise 5×5, proj).
* The input is reflect-padded to a multiple of 4; the output head predicts K (1 channel) and B
  (3 channels) and returns ``K·x − B + x`` cropped to the input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LICENCE = "MIT (IDKiro/DehazeFormer); this re-implementation: restore-cli's licence"
SOURCE = "https://github.com/IDKiro/DehazeFormer"

CONV_TYPES = ("Conv", "DWConv", None)
# The network pads to a multiple of 4 (two 2× patch merges).
SIZE_MULTIPLE = 4
RLN_EPS = 1e-5

# dehazeformer_l(): the size UniRestorer's experts use.
DEHAZEFORMER_L: dict[str, Any] = {
    "embed_dims": [48, 96, 192, 96, 48],
    "mlp_ratios": [2.0, 4.0, 4.0, 2.0, 2.0],
    "depths": [16, 16, 16, 12, 12],
    "num_heads": [2, 4, 6, 1, 1],
    "attn_ratio": [1 / 4, 1 / 2, 3 / 4, 0, 0],
    "conv_type": ["Conv", "Conv", "Conv", "Conv", "Conv"],
}


class RLN(nn.Module):
    """Per-sample normalisation over (C, H, W) that also returns rescale/rebias maps."""

    def __init__(self, dim: int, eps: float = RLN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.meta1 = nn.Conv2d(1, dim, 1)
        self.meta2 = nn.Conv2d(1, dim, 1)
        nn.init.trunc_normal_(self.meta1.weight, std=0.02)
        nn.init.constant_(self.meta1.bias, 1.0)
        nn.init.trunc_normal_(self.meta2.weight, std=0.02)
        nn.init.constant_(self.meta2.bias, 0.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = torch.sqrt((x - mean).pow(2).mean(dim=(1, 2, 3), keepdim=True) + self.eps)
        normalized = (x - mean) / std * self.weight + self.bias
        return normalized, self.meta1(std), self.meta2(mean)


class Mlp(nn.Module):
    """1×1 conv → ReLU → 1×1 conv (keys ``mlp.0``/``mlp.2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.ReLU(True), nn.Conv2d(hidden, dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def relative_position_log(window_size: int) -> torch.Tensor:
    """[N, N, 2] (N = window²) signed log(1+|Δ|) of the (row, col) offsets between positions."""
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])
    delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return torch.sign(delta) * torch.log(1.0 + delta.abs())


class WindowAttention(nn.Module):
    """Multi-head attention inside one window with an MLP-generated relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        # Persistent: the released checkpoints contain it.
        self.register_buffer("relative_positions", relative_position_log(window_size))
        self.meta = nn.Sequential(nn.Linear(2, 256), nn.ReLU(True), nn.Linear(256, num_heads))

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        windows, tokens, _ = qkv.shape
        head_dim = self.dim // self.num_heads
        qkv = qkv.reshape(windows, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        scores = (query * self.scale) @ key.transpose(-2, -1)
        bias = self.meta(self.relative_positions).permute(2, 0, 1)
        weights = (scores + bias.unsqueeze(0)).softmax(dim=-1)
        return (weights @ value).transpose(1, 2).reshape(windows, tokens, self.dim)


class Attention(nn.Module):
    """Token mixer of one block: window attention and/or a convolution branch."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        use_attn: bool,
        conv_type: str | None,
    ) -> None:
        super().__init__()
        if conv_type not in CONV_TYPES:
            raise ValueError(f"conv_type must be one of {CONV_TYPES}, not {conv_type!r}")
        if not use_attn and conv_type is None:
            raise ValueError("a block without attention needs a conv_type")
        self.dim = dim
        self.window_size = window_size
        self.shift_size = shift_size
        self.use_attn = use_attn
        self.conv_type = conv_type
        if conv_type == "Conv":
            self.conv: nn.Module = nn.Sequential(
                nn.Conv2d(dim, dim, 3, padding=1, padding_mode="reflect"),
                nn.ReLU(True),
                nn.Conv2d(dim, dim, 3, padding=1, padding_mode="reflect"),
            )
        elif conv_type == "DWConv":
            self.conv = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, padding_mode="reflect")
        if conv_type == "DWConv" or use_attn:
            self.V = nn.Conv2d(dim, dim, 1)
            self.proj = nn.Conv2d(dim, dim, 1)
        if use_attn:
            self.QK = nn.Conv2d(dim, dim * 2, 1)
            self.attn = WindowAttention(dim, window_size, num_heads)

    def _pad_for_windows(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pad to whole windows; shifted blocks put ``shift_size`` rows/cols in front."""
        size = self.window_size
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % size, (-width) % size
        if self.shift_size > 0:
            shift = self.shift_size
            border = (
                shift,
                (size - shift + pad_w) % size,
                shift,
                (size - shift + pad_h) % size,
            )
            return F.pad(x, border, mode="reflect")
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")

    def _window_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = qkv.shape
        padded = self._pad_for_windows(qkv).permute(0, 2, 3, 1)
        padded_h, padded_w = padded.shape[1:3]
        size = self.window_size
        rows, cols = padded_h // size, padded_w // size
        windows = (
            padded.reshape(batch, rows, size, cols, size, channels)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(-1, size * size, channels)
        )
        mixed = self.attn(windows)
        merged = (
            mixed.reshape(batch, rows, cols, size, size, -1)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(batch, padded_h, padded_w, -1)
        )
        start = self.shift_size
        return merged[:, start : start + height, start : start + width, :].permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_attn:
            if self.conv_type == "Conv":
                return self.conv(x)
            return self.proj(self.conv(self.V(x)))
        value = self.V(x)
        attn_out = self._window_attention(torch.cat([self.QK(x), value], dim=1))
        if self.conv_type is None:
            return self.proj(attn_out)
        return self.proj(self.conv(value) + attn_out)


class TransformerBlock(nn.Module):
    """x + mixer(x) (RLN-modulated when attention is used), then x + Mlp(x)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        shift_size: int,
        use_attn: bool,
        conv_type: str | None,
    ) -> None:
        super().__init__()
        self.use_attn = use_attn
        self.norm1: nn.Module = RLN(dim) if use_attn else nn.Identity()
        self.attn = Attention(dim, num_heads, window_size, shift_size, use_attn, conv_type)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_attn:
            normed, rescale, rebias = self.norm1(x)
            x = x + (self.attn(normed) * rescale + rebias)
        else:
            x = x + self.attn(x)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks, attention in the last ``attn_ratio·depth``, odd ones shifted."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        attn_ratio: float,
        conv_type: str | None,
    ) -> None:
        super().__init__()
        attn_depth = attn_ratio * depth
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                num_heads,
                mlp_ratio,
                window_size,
                shift_size=0 if index % 2 == 0 else window_size // 2,
                use_attn=index >= depth - attn_depth,
                conv_type=conv_type,
            )
            for index in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PatchEmbed(nn.Module):
    """Strided conv (reflect padding) that embeds or merges patches (key ``proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, kernel_size: int | None):
        super().__init__()
        kernel = patch_size if kernel_size is None else kernel_size
        self.proj = nn.Conv2d(
            in_chans,
            embed_dim,
            kernel,
            stride=patch_size,
            padding=(kernel - patch_size + 1) // 2,
            padding_mode="reflect",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PatchUnEmbed(nn.Module):
    """Conv to ``out_chans·patch²`` channels, then pixel-shuffle (key ``proj.0``)."""

    def __init__(self, patch_size: int, out_chans: int, embed_dim: int, kernel_size: int | None):
        super().__init__()
        kernel = 1 if kernel_size is None else kernel_size
        self.proj = nn.Sequential(
            nn.Conv2d(
                embed_dim,
                out_chans * patch_size**2,
                kernel,
                padding=kernel // 2,
                padding_mode="reflect",
            ),
            nn.PixelShuffle(patch_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class SKFusion(nn.Module):
    """Selective-kernel fusion of two feature maps: softmax weights from their pooled sum."""

    def __init__(self, dim: int, height: int = 2, reduction: int = 8) -> None:
        super().__init__()
        self.height = height
        hidden = max(int(dim / reduction), 4)
        self.mlp = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, dim * height, 1, bias=False),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        batch, channels, height, width = features[0].shape
        stacked = torch.cat(list(features), dim=1).view(batch, self.height, channels, height, width)
        pooled = F.adaptive_avg_pool2d(stacked.sum(dim=1), 1)
        weights = self.mlp(pooled).view(batch, self.height, channels, 1, 1).softmax(dim=1)
        return (stacked * weights).sum(dim=1)


class DehazeFormer(nn.Module):
    """Five-stage U-shaped DehazeFormer with the upstream constructor and key names."""

    def __init__(
        self,
        in_chans: int = 3,
        out_chans: int = 4,
        window_size: int = 8,
        embed_dims: Sequence[int] = (24, 48, 96, 48, 24),
        mlp_ratios: Sequence[float] = (2.0, 4.0, 4.0, 2.0, 2.0),
        depths: Sequence[int] = (16, 16, 16, 8, 8),
        num_heads: Sequence[int] = (2, 4, 6, 1, 1),
        attn_ratio: Sequence[float] = (1 / 4, 1 / 2, 3 / 4, 0, 0),
        conv_type: Sequence[str | None] = ("DWConv",) * 5,
    ) -> None:
        super().__init__()
        for name, values in (
            ("embed_dims", embed_dims),
            ("mlp_ratios", mlp_ratios),
            ("depths", depths),
            ("num_heads", num_heads),
            ("attn_ratio", attn_ratio),
            ("conv_type", conv_type),
        ):
            if len(values) != 5:
                raise ValueError(f"{name} needs one entry per stage (5), got {len(values)}")
        if embed_dims[1] != embed_dims[3] or embed_dims[0] != embed_dims[4]:
            raise ValueError("DehazeFormer needs embed_dims[1] == [3] and [0] == [4] (skips)")
        if out_chans != 4:
            raise ValueError(
                "the output head predicts K (1 channel) and B (3 channels): out_chans=4"
            )
        self.patch_size = SIZE_MULTIPLE
        self.window_size = window_size

        def stage(i: int) -> BasicLayer:
            return BasicLayer(
                embed_dims[i],
                depths[i],
                num_heads[i],
                mlp_ratios[i],
                window_size,
                attn_ratio[i],
                conv_type[i],
            )

        self.patch_embed = PatchEmbed(1, in_chans, embed_dims[0], kernel_size=3)
        self.layer1 = stage(0)
        self.patch_merge1 = PatchEmbed(2, embed_dims[0], embed_dims[1], kernel_size=None)
        self.skip1 = nn.Conv2d(embed_dims[0], embed_dims[0], 1)
        self.layer2 = stage(1)
        self.patch_merge2 = PatchEmbed(2, embed_dims[1], embed_dims[2], kernel_size=None)
        self.skip2 = nn.Conv2d(embed_dims[1], embed_dims[1], 1)
        self.layer3 = stage(2)
        self.patch_split1 = PatchUnEmbed(2, embed_dims[3], embed_dims[2], kernel_size=None)
        self.fusion1 = SKFusion(embed_dims[3])
        self.layer4 = stage(3)
        self.patch_split2 = PatchUnEmbed(2, embed_dims[4], embed_dims[3], kernel_size=None)
        self.fusion2 = SKFusion(embed_dims[4])
        self.layer5 = stage(4)
        self.patch_unembed = PatchUnEmbed(1, out_chans, embed_dims[4], kernel_size=3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.patch_embed(x))
        skip1 = x
        x = self.layer2(self.patch_merge1(x))
        skip2 = x
        x = self.patch_split1(self.layer3(self.patch_merge2(x)))
        x = self.fusion1([x, self.skip2(skip2)]) + x
        x = self.patch_split2(self.layer4(x))
        x = self.fusion2([x, self.skip1(skip1)]) + x
        return self.patch_unembed(self.layer5(x))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        pad_h, pad_w = (-height) % self.patch_size, (-width) % self.patch_size
        x = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
        gain, offset = torch.split(self.forward_features(x), (1, 3), dim=1)
        return (gain * x - offset + x)[:, :, :height, :width]


def dehazeformer_l() -> DehazeFormer:
    """The DehazeFormer-L size (UniRestorer's dehazing experts)."""
    return DehazeFormer(**DEHAZEFORMER_L)
