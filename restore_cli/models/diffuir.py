"""DiffUIR (Zheng et al., CVPR 2024), registered as architecture ``diffuir``.

Our own implementation of the released residual-diffusion restorer, written from the behaviour of
iSEE-Laboratory/DiffUIR @ c71437ce86ad1b098aa9be4678dc82e8b99649df (``src/model.py``; MIT licence,
"Copyright (c) 2024 iSEE", code and checkpoints). No upstream code is copied; module and parameter
names follow the release so its checkpoints load with ``strict=True``.

What is here:

* :class:`Unet` / :class:`UnetRes`: the denoising network with the official key names
  (``unet0.*``) at any size; the released ones are T = dim 32, mults (1,1,1,1) (0.89 M
  parameters), S = 32, (1,2,2,4), B = 64, (1,2,2,4), L = 64, (1,2,4,8) (:data:`RELEASED_CONFIGS`).
  ``UnetRes.forward(x, [time_res, time_noise])`` returns a one-element list like upstream.
* :func:`residual_schedule` and :func:`ddim_sample`: the release's deterministic few-step sampler
  (``ResidualDiffusion.ddim_sample`` with eta 0, objective ``pred_res``; 3 steps by default).
* :class:`DiffUIR`: ``forward(x, *, steps=None, seed=None)``, [B,3,H,W] in [0,1] → [0,1].

Conventions of the release that matter when feeding it images:

* Value range: the test dataset yields RGB in [0,1] (``ToTensor``); the sampler maps it to
  [-1,1] (``2x - 1``), and the result back with ``(x + 1) / 2``. The last sampler state is the
  clamped clean estimate, so the output already lies in [0,1]; ``save_image`` clamps again.
* Padding: every network call reflect-pads its input (bottom/right) to a multiple of
  ``2**len(dim_mults)`` = 16 and crops the output back. The sampler itself runs at the image size.
  :class:`DiffUIR` follows that exactly; it only replicate-pads images whose side is so small that
  reflect padding is impossible (≤ 8 px), where upstream would fail.
* Low-light input: ``test.py`` (and training) apply ``cv2.equalizeHist`` to each channel of the
  uint8 LOL low-light inputs before ``ToTensor`` (LSRW inputs are not equalised);
  ``visual.py`` uses the raw image unless those lines are enabled. :class:`DiffUIR` does **not**
  equalise: a low-light pipeline must do it before calling the model.
* No resizing at test time (the dataset's power-of-2 resize is commented out upstream).
* Randomness: one Gaussian draw, ``0.1 * N(0, 1)`` added to the shifted input at the start
  (``sum_scale`` 0.01). We draw it from a local CPU ``torch.Generator`` (seed
  :data:`DEFAULT_SEED` unless given) so a seed gives the same image on every device and the
  global RNG is never touched. Every image of a batch gets the same draw, so batching and tiling
  do not change a result.

Numerics that matter for parity with the official outputs:

* Convolutions in ResNet blocks use weight standardisation (per output channel, biased
  variance), then GroupNorm(8), an optional time scale/shift and SiLU.
* The channel LayerNorm and the weight standardisation use eps 1e-5 for float32 **and 1e-3 for
  every other dtype** (fp16, bf16, fp64). Conv weights have variances around 1e-3, so a
  half-precision run is a different function, not a rounding of the fp32 one; the spec therefore
  keeps the engine in fp32.
* The sinusoidal time embedding has ``dim`` features; the network gets
  ``alphas_cumsum[t] * 1000`` (the "res" time; the "noise" time is passed but unused).
* The mid-level full attention uses ``scaled_dot_product_attention`` (same maths as upstream's
  explicit softmax, without the N×N matrix in memory).
* Checkpoints (``model-<n>.pt`` from ``Trainer.save``) keep the EMA network under
  ``ckpt["ema"]`` as ``ema_model.model.unet0.*``; inference uses that copy
  (:func:`unwrap_diffuir_checkpoint`, or weights.yaml ``wrapping: "ema:ema_model.model."``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, NamedTuple

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
    "MIT (iSEE-Laboratory/DiffUIR code and weights); this re-implementation: restore-cli's licence"
)
SOURCE = "https://github.com/iSEE-Laboratory/DiffUIR"
UPSTREAM_COMMIT = "c71437ce86ad1b098aa9be4678dc82e8b99649df"

# README "Model zoo": name -> (dim, dim_mults); parameter counts 0.89 M, 3.27 M, 12.41 M, 36.26 M.
RELEASED_CONFIGS: dict[str, tuple[int, tuple[int, ...]]] = {
    "DiffUIR-T": (32, (1, 1, 1, 1)),
    "DiffUIR-S": (32, (1, 2, 2, 4)),
    "DiffUIR-B": (64, (1, 2, 2, 4)),
    "DiffUIR-L": (64, (1, 2, 4, 8)),
}

# Diffusion settings of the release (test.py / train.py).
TIMESTEPS = 1000
DEFAULT_STEPS = 3  # test.py; test_udc.py (under-display camera release) uses 4
DELTA_END = 1.8e-3
SUM_SCALE = 0.01  # variance of the initial noise
BETA_START, BETA_END = 1e-4, 0.02
DELTA_START = 1e-6
TRAINING_STAGES = ("diffusion",)  # one objective; a stage name keeps the train loop generic
DEFAULT_SEED = 0  # arbitrary: upstream's draw depends on its global RNG history

# Fixed by the architecture: attention widths and the 2x resampling per level.
ATTENTION_HEADS = 4
ATTENTION_DIM_HEAD = 32
# Upstream's eps rule for its own norms: float32 gets 1e-5, any other dtype 1e-3.
EPS_FLOAT32, EPS_OTHER = 1e-5, 1e-3

CONFIG_DEFAULTS: dict[str, Any] = {
    "dim": 64,
    "dim_mults": [1, 2, 4, 8],  # upstream default and what test.py builds (= DiffUIR-L)
    "channels": 3,
    "resnet_block_groups": 8,
    "condition": True,
    "objective": "pred_res",
    "test_res_or_noise": "res",
    "num_unet": 1,
    "sampling_timesteps": DEFAULT_STEPS,
}
CONFIG_KEYS = tuple(CONFIG_DEFAULTS)
_KEY_PREFIX = "unet0."
_EMA_NETWORK_PREFIX = "ema_model.model."
_TRAINING_NETWORK_PREFIX = "model."


def norm_eps(dtype: torch.dtype) -> float:
    """Upstream's dtype-dependent eps (kept so fp64 runs are the same function as upstream's)."""
    return EPS_FLOAT32 if dtype == torch.float32 else EPS_OTHER


# ----------------------------------------------------------------------------- building blocks


class ChannelLayerNorm(nn.Module):
    """Normalise over the channels of each pixel (biased variance), scale by ``g``; no bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + norm_eps(x.dtype)) * self.g


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv whose kernel is standardised per output channel at every call (works with GroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        var, mean = torch.var_mean(weight, dim=(1, 2, 3), unbiased=False, keepdim=True)
        weight = (weight - mean) * torch.rsqrt(var + norm_eps(x.dtype))
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Block(nn.Module):
    """Standardised 3×3 conv → GroupNorm → optional time scale/shift → SiLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.proj = WeightStandardizedConv2d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, out_channels)

    def forward(
        self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two blocks; the time embedding scales and shifts the first one's normalised output."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channels * 2))
        self.block1 = Block(in_channels, out_channels, groups)
        self.block2 = Block(out_channels, out_channels, groups)
        self.res_conv: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mlp(time_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, (scale, shift)))
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    """Linear-cost attention: softmax of q over features, of k over pixels, context = k·vᵀ."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = ATTENTION_HEADS * ATTENTION_DIM_HEAD
        self.scale = ATTENTION_DIM_HEAD**-0.5
        self.to_qkv = nn.Conv2d(channels, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, channels, 1), ChannelLayerNorm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.to_qkv(x).reshape(b, 3, ATTENTION_HEADS, ATTENTION_DIM_HEAD, h * w)
        q, k, v = qkv.unbind(dim=1)  # each [b, heads, d, n]
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (h * w)
        context = k @ v.transpose(-1, -2)  # [b, heads, d, e]
        out = context.transpose(-1, -2) @ q  # [b, heads, e, n]
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    """Full softmax attention over the pixels of the (8× down-sampled) middle level."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = ATTENTION_HEADS * ATTENTION_DIM_HEAD
        self.scale = ATTENTION_DIM_HEAD**-0.5
        self.to_qkv = nn.Conv2d(channels, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.to_qkv(x).reshape(b, 3, ATTENTION_HEADS, ATTENTION_DIM_HEAD, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each [b, heads, n, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class PreNorm(nn.Module):
    """Channel LayerNorm, then ``fn`` (registered first: that is the release's key order)."""

    def __init__(self, channels: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class SinusoidalTimeEmbedding(nn.Module):
    """``[sin(t·f), cos(t·f)]`` with ``dim/2`` geometric frequencies from 1 down to 1/10000."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=time.device, dtype=torch.float32) * -step)
        angles = time[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


# ----------------------------------------------------------------------------- the network


class Unet(nn.Module):
    """The conditional U-Net: ``cat(x_t, x_input)`` (6 channels) and a time → 3-channel output.

    Level ``i`` of the encoder works at ``dims[i]`` channels (``dims = [dim, dim·m0, dim·m1, …]``),
    has two ResNet blocks, a pre-normed linear attention and a 2× down-sampling conv (a plain 3×3
    conv at the last level); the decoder mirrors it with skip concatenations; full attention in
    the middle. ``downs`` and ``ups`` are created before the middle blocks, as upstream does, so
    state-dict keys come out in the release's order.
    """

    def __init__(
        self,
        dim: int,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        channels: int = 3,
        resnet_block_groups: int = 8,
        condition: bool = True,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.depth = len(dim_mults)
        self.size_multiple = 2**self.depth  # upstream pads to 2**depth (one more than it needs)
        in_channels = channels * (2 if condition else 1)
        self.init_conv = nn.Conv2d(in_channels, dim, 7, padding=3)

        dims = [dim, *(dim * int(m) for m in dim_mults)]
        levels = list(pairwise(dims))
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(dim),
            nn.Linear(dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )

        def resnet(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, time_dim, resnet_block_groups)

        def attention(ch: int) -> Residual:
            return Residual(PreNorm(ch, LinearAttention(ch)))

        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        for level, (cin, cout) in enumerate(levels):
            last = level == len(levels) - 1
            down = nn.Conv2d(cin, cout, 3, padding=1) if last else nn.Conv2d(cin, cout, 4, 2, 1)
            self.downs.append(
                nn.ModuleList([resnet(cin, cin), resnet(cin, cin), attention(cin), down])
            )

        mid = dims[-1]
        self.mid_block1 = resnet(mid, mid)
        self.mid_attn = Residual(PreNorm(mid, Attention(mid)))
        self.mid_block2 = resnet(mid, mid)

        for level, (cin, cout) in enumerate(reversed(levels)):
            last = level == len(levels) - 1
            up: nn.Module = (
                nn.Conv2d(cout, cin, 3, padding=1)
                if last
                else nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cout, cin, 3, padding=1)
                )
            )
            self.ups.append(
                nn.ModuleList(
                    [resnet(cout + cin, cout), resnet(cout + cin, cout), attention(cout), up]
                )
            )

        self.final_res_block = resnet(dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, channels, 1)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.size_multiple, (-width) % self.size_multiple
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        x = self.init_conv(x)
        first = x  # no in-place ops follow, so no copy is needed
        t = self.time_mlp(time)

        skips: list[torch.Tensor] = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = attn(block2(x, t))
            skips.append(x)
            x = down(x)

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)

        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), t)
            x = attn(block2(torch.cat((x, skips.pop()), dim=1), t))
            x = up(x)

        x = self.final_res_block(torch.cat((x, first), dim=1), t)
        return self.final_conv(x)[..., :height, :width].contiguous()


class _UnetResBase(nn.Module):
    """Holds the network as ``unet0`` (the release's key prefix) and checks the options.

    Only the released restoration setting is implemented: ``condition=True``, ``objective
    'pred_res'``, ``test_res_or_noise 'res'``, one U-Net. Other upstream variants (noise
    prediction, two U-Nets, unconditional generation) have no released weights.
    """

    def __init__(
        self,
        dim: int,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        channels: int = 3,
        resnet_block_groups: int = 8,
        num_unet: int = 1,
        condition: bool = True,
        objective: str = "pred_res",
        test_res_or_noise: str = "res",
    ) -> None:
        super().__init__()
        fixed = {
            "condition": (condition, True),
            "objective": (objective, "pred_res"),
            "test_res_or_noise": (test_res_or_noise, "res"),
            "num_unet": (num_unet, 1),
        }
        for name, (value, released) in fixed.items():
            if value != released:
                raise ValueError(f"DiffUIR: only {name}={released!r} is implemented, got {value!r}")
        for mult in dim_mults:
            if (dim * int(mult)) % resnet_block_groups:
                raise ValueError(
                    f"DiffUIR: level width {dim * int(mult)} not divisible by "
                    f"resnet_block_groups={resnet_block_groups}"
                )
        self.channels = channels
        self.unet0 = Unet(dim, dim_mults, channels, resnet_block_groups, condition=True)

    def network(self, x: torch.Tensor, time: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Upstream ``UnetRes.forward``: ``pred_res`` uses the first ("res") time only."""
        return [self.unet0(x, time[0])]


class UnetRes(_UnetResBase):
    """The official network wrapper: ``forward(cat(x_t, x_in), [t_res, t_noise]) -> [pred_res]``."""

    def forward(self, x: torch.Tensor, time: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.network(x, time)


# ----------------------------------------------------------------------------- the sampler


@dataclass(frozen=True)
class ResidualSchedule:
    """Per-timestep coefficients of x_t = x_0 + ᾱ_t·res + β̄_t·noise − δ̄_t·x_in (float32, CPU).

    ``alphas_cumsum`` (ᾱ) weighs the residual, ``betas_cumsum`` (β̄) the noise
    (``betas2_cumsum`` = β̄²), ``delta_cumsum`` (δ̄) the shared-distribution term.
    """

    alphas_cumsum: torch.Tensor
    betas2_cumsum: torch.Tensor
    betas_cumsum: torch.Tensor
    delta_cumsum: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumsum.shape[0])


def residual_schedule(timesteps: int = TIMESTEPS, delta_end: float = DELTA_END) -> ResidualSchedule:
    """The release's schedule, computed in float32 with the same operations (bit-identical)."""
    betas = torch.linspace(BETA_START, BETA_END, timesteps, dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumsum = 1 - alphas_cumprod**0.5
    betas2_cumsum = 1 - alphas_cumprod
    delta = torch.linspace(DELTA_START, delta_end, timesteps, dtype=torch.float32)
    return ResidualSchedule(
        alphas_cumsum=alphas_cumsum,
        betas2_cumsum=betas2_cumsum,
        betas_cumsum=torch.sqrt(betas2_cumsum),
        delta_cumsum=delta.cumsum(dim=0).clip(0, 1),
    )


def sampling_times(steps: int, timesteps: int = TIMESTEPS) -> list[int]:
    """Timesteps visited, e.g. ``[999, 665, 332, -1]`` for 3 steps; −1 means "return x_0".

    Upstream truncates a float32 ``linspace(-1, T-1, steps+1)`` to int; done the same way here
    so every step count visits the same timesteps as the release.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DiffUIR: steps must be in 1..{timesteps}, got {steps}")
    grid = torch.linspace(-1, timesteps - 1, steps=steps + 1, dtype=torch.float32)
    return list(reversed(grid.int().tolist()))


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The sampler's only random draw, N(0,1) from a local CPU generator (device-independent)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


ResidualNetwork = Callable[[torch.Tensor, list[torch.Tensor]], Sequence[torch.Tensor]]


class SampleResult(NamedTuple):
    image: torch.Tensor  # restored image, (x_0 + 1) / 2, in [0, 1]
    states: list[torch.Tensor]  # [-1,1] states: initial, then after each step (if kept)


def ddim_sample(
    network: ResidualNetwork,
    lq: torch.Tensor,
    init_noise: torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    schedule: ResidualSchedule | None = None,
    sum_scale: float = SUM_SCALE,
    keep_states: bool = False,
) -> SampleResult:
    """Deterministic (eta 0) residual DDIM sampling as the release runs it.

    ``network`` follows :class:`UnetRes`'s calling convention; ``lq`` is the degraded image in
    [0,1] and ``init_noise`` an N(0,1) tensor of its shape. Starting from
    ``(1 − δ̄_T)·x_in + sqrt(sum_scale)·noise`` (x_in = 2·lq − 1), every step predicts the residual,
    clamps it and the clean estimate ``x_in − res`` to [-1,1], and moves to the next timestep by
    removing ``(ᾱ_t − ᾱ_next)·res`` and adding back ``(δ̄_t − δ̄_next)·x_in``; the last step
    returns the clean estimate. Coefficients are float32 as upstream.
    """
    schedule = schedule or residual_schedule()
    times = sampling_times(steps, schedule.num_timesteps)
    alphas, betas, deltas = schedule.alphas_cumsum, schedule.betas_cumsum, schedule.delta_cumsum
    x_in = lq * 2 - 1
    noise = init_noise.to(device=x_in.device, dtype=x_in.dtype)
    img = float(1 - deltas[-1]) * x_in + math.sqrt(sum_scale) * noise
    states = [img] if keep_states else []
    batch = x_in.shape[0]

    def time_input(values: torch.Tensor, t: int) -> torch.Tensor:
        value = float(values[t] * schedule.num_timesteps)
        return torch.full((batch,), value, device=x_in.device, dtype=x_in.dtype)

    for t, t_next in pairwise(times):
        times_in = [time_input(alphas, t), time_input(betas, t)]
        pred_res = network(torch.cat((img, x_in), dim=1), times_in)[0].clamp(-1, 1)
        x_start = (x_in - pred_res).clamp(-1, 1)
        if t_next < 0:
            img = x_start
        else:
            alpha = float(alphas[t] - alphas[t_next])
            delta = float(deltas[t] - deltas[t_next])
            img = img - alpha * pred_res + delta * x_in
        if keep_states:
            states.append(img)
    return SampleResult((img + 1) * 0.5, states)


# ----------------------------------------------------------------------------- the restorer


class DiffUIR(_UnetResBase):
    """The released restorer: ``forward(x, *, steps, seed)``, [B,3,H,W] in [0,1] → [0,1].

    Same parameters (and state-dict keys) as :class:`UnetRes`; the schedule is a plain float32
    attribute, not a buffer, so it neither enters the state dict nor gets cast by ``.half()``.
    """

    def __init__(self, *, sampling_timesteps: int = DEFAULT_STEPS, **unet_kwargs: Any) -> None:
        super().__init__(**unet_kwargs)
        self.schedule = residual_schedule()
        sampling_times(sampling_timesteps, self.schedule.num_timesteps)  # validates
        self.sampling_timesteps = sampling_timesteps

    def forward(
        self,
        x: torch.Tensor,
        *,
        steps: int | None = None,
        seed: int | None = None,
        stage: str | None = None,
        batch: Mapping[str, Any] | None = None,
    ) -> Any:
        if stage is not None:  # training goes through forward so DistributedDataParallel sees it
            return self.training_losses(x, batch or {}, stage)
        steps = self.sampling_timesteps if steps is None else steps
        seed = DEFAULT_SEED if seed is None else seed
        height, width = x.shape[-2:]
        x = _pad_if_too_small(x, self.unet0.size_multiple)
        # One draw shared by every image of the batch: a result depends on (image, seed, steps)
        # only, not on which other images or tiles were batched with it.
        noise = initial_noise((1, *x.shape[1:]), seed).expand(x.shape)
        result = ddim_sample(self.network, x, noise, steps=steps, schedule=self.schedule)
        return result.image[..., :height, :width]

    # -- training (``restore-cli train``; see configs/diffuir-t.yaml) --------------------------
    default_stage = "diffusion"  # the train loop asks the model for its losses, not an L1 on x

    def set_stage(self, stage: str) -> None:
        if stage not in TRAINING_STAGES:
            raise ModelError(
                f"unknown DiffUIR stage {stage!r} (valid: {', '.join(TRAINING_STAGES)})"
            )

    def loss_names(self, stage: str) -> list[str]:
        return ["loss_l1_res"]

    def training_losses(
        self, lq: torch.Tensor, batch: Mapping[str, Any], stage: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The release's ``p_losses`` (objective ``pred_res``, L1): one random timestep per
        image, x_t = x_0 + ᾱ_t·res + β̄_t·noise − δ̄_t·x_in in [-1,1], and the network predicts
        res = x_in − x_0 from (x_t, x_in). Draws come from the global RNG, which the train loop
        checkpoints, so resumed runs stay exact."""
        self.set_stage(stage)
        x_in = lq * 2 - 1
        x_start = batch["gt"].to(lq.device, lq.dtype) * 2 - 1
        residual = x_in - x_start
        t = torch.randint(0, self.schedule.num_timesteps, (lq.shape[0],))
        noise = torch.randn(x_start.shape).to(lq.device, lq.dtype)

        def coefficient(values: torch.Tensor) -> torch.Tensor:
            return values[t].to(lq.device, lq.dtype).view(-1, 1, 1, 1)

        alpha = coefficient(self.schedule.alphas_cumsum)
        beta = coefficient(self.schedule.betas_cumsum)
        delta = coefficient(self.schedule.delta_cumsum)
        x_t = x_start + alpha * residual + beta * noise - delta * x_in
        times = [alpha.flatten() * self.schedule.num_timesteps]
        times.append(beta.flatten() * self.schedule.num_timesteps)
        pred_res = self.network(torch.cat((x_t, x_in), dim=1), times)[0]
        loss = F.l1_loss(pred_res, residual)
        return loss, {"loss_l1_res": loss}


def _pad_if_too_small(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad sides too short for the network's reflect padding up to ``multiple``.

    Reflect padding needs the pad to be shorter than the side (sides ≥ 9 for 16); upstream
    simply fails below that. Larger images are left alone so they follow upstream exactly.
    """
    height, width = x.shape[-2:]
    pad_h = multiple - height if (-height) % multiple >= height else 0
    pad_w = multiple - width if (-width) % multiple >= width else 0
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


# ----------------------------------------------------------------------------- checkpoints


def unwrap_diffuir_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ``unet0.*`` state dict of a release ``model-<n>.pt``, from its EMA copy.

    Accepts the whole ``Trainer.save`` dict (EMA network ``ckpt["ema"]["ema_model.model.unet0.*"]``,
    preferred as upstream's test does; else the training copy ``ckpt["model"]["model.unet0.*"]``),
    the ``ema`` or ``model`` dict alone, or an already unwrapped state dict. The EMA dict's other
    entries (``initted``, ``step``, schedule buffers, an ``online_model.*`` copy depending on the
    ema_pytorch version) are dropped by selecting the prefix.
    """
    candidates: list[Any] = [checkpoint.get("ema"), checkpoint.get("model"), checkpoint]
    for inner in candidates:
        if not isinstance(inner, Mapping):
            continue
        for prefix in (_EMA_NETWORK_PREFIX, _TRAINING_NETWORK_PREFIX, ""):
            selected = {
                key[len(prefix) :]: value
                for key, value in inner.items()
                if isinstance(key, str)
                and key.startswith(prefix + _KEY_PREFIX)
                and isinstance(value, torch.Tensor)
            }
            if selected:
                return selected
    raise ValueError("not a DiffUIR checkpoint: no 'unet0.' weights (EMA or training copy)")


# ----------------------------------------------------------------------------- registry glue


def detect_diffuir(state_dict: StateDict) -> dict[str, Any] | None:
    """The config of a DiffUIR (``unet0.*``) state dict, or None if it is not one.

    ``dim`` is the init conv's width, each level's multiplier the width of its down-sampling conv
    over ``dim``; the GroupNorm group count is not stored and is taken as the release's 8.
    """
    required = ("init_conv.weight", "final_conv.weight", "mid_attn.fn.fn.to_qkv.weight")
    if any(_KEY_PREFIX + key not in state_dict for key in required):
        return None
    if any(not key.startswith(_KEY_PREFIX) for key in state_dict):
        return None
    init = state_dict[_KEY_PREFIX + "init_conv.weight"]
    final = state_dict[_KEY_PREFIX + "final_conv.weight"]
    if getattr(init, "ndim", 0) != 4 or getattr(final, "ndim", 0) != 4:
        return None
    dim, channels = int(init.shape[0]), int(final.shape[0])
    if int(init.shape[1]) != 2 * channels:
        return None
    levels = sequence_length(state_dict, _KEY_PREFIX + "downs")
    widths = [state_dict.get(f"{_KEY_PREFIX}downs.{level}.3.weight") for level in range(levels)]
    if levels == 0 or any(w is None or w.shape[0] % dim for w in widths):
        return None
    return {
        **CONFIG_DEFAULTS,
        "dim": dim,
        "dim_mults": [int(w.shape[0]) // dim for w in widths if w is not None],
        "channels": channels,
    }


def build_diffuir(config: Mapping[str, Any]) -> nn.Module:
    """:class:`DiffUIR` from a checked config (unknown keys are a user error)."""
    return DiffUIR(**_checked_config(config))


def diffuir_spec(config: Mapping[str, Any]) -> ModelSpec:
    """Multiples of ``2**levels`` (16): the engine's reflect padding then makes the network's
    own padding a no-op.

    fp32 only: upstream's norms switch eps from 1e-5 to 1e-3 outside float32, which changes the
    function (see the module docstring). Tasks come from the weights.yaml entry (the universal
    and the under-display-camera releases share this architecture).
    """
    kwargs = _checked_config(config)
    return ModelSpec(
        arch="diffuir",
        scale=1,
        size_multiple=2 ** len(kwargs["dim_mults"]),
        supports_half=False,
        supports_bf16=False,
        input_channels=int(kwargs["channels"]),
        output_channels=int(kwargs["channels"]),
        sampled=True,
    )


def _checked_config(config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ModelError(
            f"diffuir config has unknown keys {unknown} (allowed: {', '.join(CONFIG_KEYS)})"
        )
    kwargs = {**CONFIG_DEFAULTS, **config}
    kwargs["dim_mults"] = [int(m) for m in kwargs["dim_mults"]]
    return kwargs


DIFFUIR = register_architecture(
    Architecture(
        name="diffuir",
        build=build_diffuir,
        detect=detect_diffuir,
        spec=diffuir_spec,
        licence=LICENCE,
        source=SOURCE,
    )
)
