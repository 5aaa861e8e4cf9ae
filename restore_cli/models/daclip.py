"""DA-CLIP (Luo et al., ICLR 2024): a CLIP ViT plus a degradation-aware control tower.

Upstream: Algolzw/daclip-uir @ c2cc1414 (``universal-image-restoration/open_clip``: DaCLIP,
CLIP, VisionTransformer, ControlTransformer), MIT; its open_clip part keeps open_clip's own
licence (MIT-style). UniRestorer (mrluin/UniRestorer @ 88b933cd, no licence) ships an identical
copy that it uses as its degradation encoder. This file is our own code written from the
behaviour described in ``shared/parity/README.md``; only the module and parameter names follow
upstream, so the released checkpoints (``daclip_ViT-B-32.pt`` and the ``daclip_model.*`` part of
UniRestorer's ``model.pth``) load with ``strict=True``. Licence of this file: restore-cli's.

What the image path does (``encode_image(x, control=True)``):

* ``visual_control`` is a second ViT of the same shape. After each of its L residual blocks a
  zero-initialised Linear (``zero_modules[i]``) maps the tokens to a control signal.
* The main tower ``clip.visual`` then runs; after its block j it adds the control signal of
  control block L-1-j (the recorded list is consumed from the end).
* Both towers pool the class token, apply ``ln_post`` and project with ``proj``. The main tower
  gives the image features, the control tower the degradation features.

State-dict quirks reproduced on purpose (a strict load of the real file needs them):

* DaCLIP registers ``clip.visual`` a second time as ``visual``, so every ``clip.visual.X`` key
  also appears as ``visual.X`` (same tensors).
* The control tower's blocks live under ``visual_control.transformer.transformer.resblocks.N``
  (a wrapper around a plain transformer) next to ``visual_control.transformer.zero_modules.N``.
* ``logit_scale`` exists twice (``clip.logit_scale`` and DaCLIP's own copy); ``forward`` uses
  DaCLIP's. The text tower's causal mask is not in the state dict (we build it per call).
* DA-CLIP wraps a plain ``CLIP`` (text modules directly on ``clip``: ``clip.transformer``,
  ``clip.token_embedding`` ...) even though its config says ``custom_text``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LICENCE = (
    "MIT (Algolzw/daclip-uir; its open_clip part under open_clip's MIT-style licence); "
    "this re-implementation: restore-cli's licence"
)
SOURCE = "https://github.com/Algolzw/daclip-uir"
UPSTREAM_COMMIT = "c2cc14146faac85680b4cb39ece4ef9e2a7c7c24"

# open_clip's ``daclip_ViT-B-32`` config (the one UniRestorer uses).
DACLIP_VIT_B_32: dict[str, Any] = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 512,
        "heads": 8,
        "layers": 12,
    },
    "custom_text": True,
}
# CLIP's initial temperature, log(1 / 0.07).
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class VisionConfig:
    """The open_clip ``vision_cfg`` options a plain ViT uses (others are refused)."""

    image_size: int = 224
    layers: int = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16


@dataclass(frozen=True)
class TextConfig:
    """The open_clip ``text_cfg`` options of the plain CLIP text transformer."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12


# open_clip options that we accept only at their default (they change the architecture).
_VISION_DEFAULTS: dict[str, Any] = {
    "ls_init_value": None,
    "patch_dropout": 0.0,
    "input_patchnorm": False,
    "global_average_pool": False,
    "attentional_pool": False,
    "output_tokens": False,
    "timm_model_name": None,
}
_TEXT_DEFAULTS: dict[str, Any] = {
    "ls_init_value": None,
    "hf_model_name": None,
    "embed_cls": False,
    "output_tokens": False,
}


def _parse(section: Mapping[str, Any], cls: type, fixed: Mapping[str, Any], name: str) -> Any:
    """A config dataclass from an open_clip section; unsupported options fail loudly."""
    known = {f.name for f in fields(cls)}
    for key, value in section.items():
        if key in known:
            continue
        if key in fixed and value == fixed[key]:
            continue
        raise ValueError(f"DA-CLIP {name}: unsupported option {key}={value!r}")
    return cls(**{k: v for k, v in section.items() if k in known})


# ----------------------------------------------------------------------------- blocks


class QuickGELU(nn.Module):
    """OpenAI's sigmoid approximation of GELU (only for ``quick_gelu`` configs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block on [L, N, D] tokens (open_clip layout and key names)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        # torch's MultiheadAttention has exactly the upstream parameter names
        # (in_proj_weight/in_proj_bias/out_proj) and numerics.
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", act_layer())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.ln_1(x)
        mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        x = x + self.attn(normed, normed, normed, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual blocks; optionally adds control signals after each block."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``control`` is consumed from its end: block j gets the signal of control block L-1-j."""
        pending = list(control) if control is not None else None
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
            if pending is not None:
                x = x + pending.pop()
        return x


class ControlTransformer(nn.Module):
    """The control tower's transformer: the blocks plus one zero-initialised Linear per block.

    Returns the final tokens and, per block, ``zero_modules[i]`` of that block's output.
    """

    def __init__(self, transformer: Transformer) -> None:
        super().__init__()
        self.transformer = transformer
        self.layers = transformer.layers
        self.width = transformer.width
        self.zero_modules = nn.ModuleList(
            nn.Linear(self.width, self.width) for _ in range(self.layers)
        )
        for linear in self.zero_modules:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hiddens = []
        for block, zero_module in zip(self.transformer.resblocks, self.zero_modules, strict=True):
            x = block(x, attn_mask=attn_mask)
            hiddens.append(zero_module(x))
        return x, hiddens


class VisionTransformer(nn.Module):
    """CLIP's ViT: patch conv, class token, learned positions, pre/post LayerNorm, projection.

    The pooled feature is ``ln_post(class token) @ proj``. ``transformer`` is either a plain
    :class:`Transformer` or (control tower) a :class:`ControlTransformer`.
    """

    def __init__(
        self, config: VisionConfig, output_dim: int, act_layer: type[nn.Module] = nn.GELU
    ) -> None:
        super().__init__()
        if config.width % config.head_width:
            raise ValueError(f"width {config.width} is not a multiple of {config.head_width}")
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        grid = config.image_size // config.patch_size
        width = config.width
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer: nn.Module = Transformer(
            width, config.layers, width // config.head_width, config.mlp_ratio, act_layer
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def _tokens(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] → [L, B, width] (class token first), positions added, ln_pre applied."""
        patches = self.conv1(image).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.positional_embedding.to(patches.dtype)
        return self.ln_pre(tokens).permute(1, 0, 2)

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln_post(tokens[0]) @ self.proj

    def forward(
        self, image: torch.Tensor, control: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Pooled features of the main tower (with the control signals added, if given)."""
        if isinstance(self.transformer, ControlTransformer):
            raise TypeError("this is a control tower: use forward_control()")
        tokens = self.transformer(self._tokens(image), control=control)
        return self._pool(tokens)

    def forward_control(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pooled features and per-block control signals of the control tower."""
        if not isinstance(self.transformer, ControlTransformer):
            raise TypeError("forward_control() needs a ControlTransformer")
        tokens, hiddens = self.transformer(self._tokens(image))
        return self._pool(tokens), hiddens


class CLIP(nn.Module):
    """open_clip's plain CLIP: a ViT and a causal text transformer on the module itself.

    Attribute order follows upstream so the state-dict order matches too.
    """

    def __init__(
        self,
        embed_dim: int,
        vision: VisionConfig,
        text: TextConfig,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.visual = VisionTransformer(vision, embed_dim, act_layer)
        self.transformer = Transformer(text.width, text.layers, text.heads, 4.0, act_layer)
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.ln_final = nn.LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))
        self._init_text(text)

    def _init_text(self, text: TextConfig) -> None:
        """open_clip's text init (only matters for untrained use)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=text.width**-0.5)

    def causal_mask(self, like: torch.Tensor) -> torch.Tensor:
        """Additive causal mask. Built per call instead of kept as a (non-persistent) buffer so
        a model constructed on the meta device and loaded with ``assign=True`` is complete."""
        size = self.context_length
        full = torch.full((size, size), float("-inf"), dtype=like.dtype, device=like.device)
        return full.triu(1)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids [B, context_length] → features taken at the highest token id (EOT)."""
        dtype = self.transformer.resblocks[0].mlp.c_fc.weight.dtype
        x = self.token_embedding(text).to(dtype) + self.positional_embedding.to(dtype)
        x = self.transformer(x.permute(1, 0, 2), attn_mask=self.causal_mask(x)).permute(1, 0, 2)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        features = pooled @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features


def parse_daclip_config(
    model_config: Mapping[str, Any],
) -> tuple[int, VisionConfig, TextConfig, bool]:
    """(embed_dim, vision, text, quick_gelu) from an open_clip model config dict."""
    unknown = set(model_config) - {
        "embed_dim",
        "vision_cfg",
        "text_cfg",
        "custom_text",
        "quick_gelu",
    }
    if unknown:
        raise ValueError(f"DA-CLIP config: unsupported keys {sorted(unknown)}")
    vision = _parse(model_config.get("vision_cfg", {}), VisionConfig, _VISION_DEFAULTS, "vision")
    text = _parse(model_config.get("text_cfg", {}), TextConfig, _TEXT_DEFAULTS, "text")
    return int(model_config["embed_dim"]), vision, text, bool(model_config.get("quick_gelu"))


# ----------------------------------------------------------------------------- preprocessing

# OpenAI CLIP's input normalisation (open_clip OPENAI_DATASET_MEAN / _STD) and the release's size.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224


def clip_preprocess(
    images_rgb01: torch.Tensor, size: int = CLIP_IMAGE_SIZE, *, quantize: bool = True
) -> torch.Tensor:
    """OpenAI-CLIP preprocessing in torch: [B,3,H,W] (or [3,H,W]) RGB in [0,1] → [B,3,size,size].

    Mirrors open_clip's eval transform on a PIL image: resize the shorter side to ``size``
    (bicubic, antialiased like PIL; longer side ``int(size·long/short)``), center-crop
    ``size``×``size`` (offsets rounded like torchvision), ToTensor, Normalize(OpenAI mean/std).
    ``quantize`` rounds to uint8 levels before and after the resize, as the PIL path does
    (upstream reads the LQ file as an 8-bit PIL image).
    """
    x = images_rgb01.unsqueeze(0) if images_rgb01.ndim == 3 else images_rgb01
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W] RGB images, got {tuple(images_rgb01.shape)}")
    x = x.float().clamp(0.0, 1.0) * 255.0
    if quantize:
        x = x.round()
    height, width = x.shape[-2:]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    # PIL resamples horizontally, stores uint8, then vertically: two passes, each quantised.
    for size_hw in ((height, new_w), (new_h, new_w)):
        if tuple(x.shape[-2:]) == size_hw:
            continue
        x = F.interpolate(x, size=size_hw, mode="bicubic", align_corners=False, antialias=True)
        x = x.round().clamp(0.0, 255.0) if quantize else x.clamp(0.0, 255.0)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    x = x[:, :, top : top + size, left : left + size] / 255.0
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- DA-CLIP


class DaCLIP(nn.Module):
    """DA-CLIP from an open_clip model config dict (``DACLIP_VIT_B_32`` = the released one)."""

    def __init__(self, model_config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        embed_dim, vision, text, quick_gelu = parse_daclip_config(model_config or DACLIP_VIT_B_32)
        act_layer: type[nn.Module] = QuickGELU if quick_gelu else nn.GELU
        self.embed_dim = embed_dim
        self.clip = CLIP(embed_dim, vision, text, act_layer)
        # The same module under a second name: upstream's state dict has both key sets.
        self.visual = self.clip.visual
        self.visual_control = VisionTransformer(vision, embed_dim, act_layer)
        self.visual_control.transformer = ControlTransformer(self.visual_control.transformer)
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))

    @property
    def image_size(self) -> int:
        """Side of the square CLIP input (224 for the release)."""
        return self.clip.visual.image_size

    def encode_image(
        self, image: torch.Tensor, control: bool = False, normalize: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``control=True``: (image_features, degradation_features); else plain CLIP features.

        ``image`` is CLIP-normalised [B, 3, S, S] (see :func:`clip_preprocess`).
        """
        if not control:
            return self.clip.encode_image(image, normalize)
        degra_features, hiddens = self.visual_control.forward_control(image)
        image_features = self.clip.visual(image, control=hiddens)
        if normalize:
            image_features = F.normalize(image_features, dim=-1)
            degra_features = F.normalize(degra_features, dim=-1)
        return image_features, degra_features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(text, normalize)

    def forward(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Training-style call: ``text`` = cat(caption tokens, degradation tokens) on the last dim.

        All four feature sets are L2-normalised; ``logit_scale`` is returned exponentiated.
        """
        image_features = degra_features = text_features = text_degra = None
        if image is not None:
            image_features, degra_features = self.encode_image(image, control=True, normalize=True)
        if text is not None:
            caption, degradation = text.chunk(2, dim=-1)
            text_features = self.encode_text(caption, normalize=True)
            text_degra = self.encode_text(degradation, normalize=True)
        return {
            "image_features": image_features,
            "text_features": text_features,
            "image_degra_features": degra_features,
            "text_degra_features": text_degra,
            "logit_scale": self.logit_scale.exp(),
        }


def unwrap_daclip_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of an open_clip training checkpoint, as upstream's loader reads it.

    Takes ``checkpoint["state_dict"]`` when present (else the dict itself) and drops a leading
    ``module.`` from every key when the first key has one (DataParallel training).
    """
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("not a DA-CLIP checkpoint: no state dict found")
    if next(iter(state_dict)).startswith("module"):
        return {key.removeprefix("module."): value for key, value in state_dict.items()}
    return dict(state_dict)
