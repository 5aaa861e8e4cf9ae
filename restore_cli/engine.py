"""Running a model on one image: device, precision, tile size, batching, and the fallbacks.

This is the only module that touches CUDA state. Two fallbacks live here and nowhere else:
a CUDA out-of-memory error halves the tile and retries the image, and a half-precision output
with NaN/Inf is redone in fp32 (with a warning), so callers always get finite pixels or an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from restore_cli.errors import ConfigError, RestoreCliError
from restore_cli.models.registry import LoadedModel
from restore_cli.tiling import forward_size, run_tiled

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# On CPU the tile bounds the working set (a whole 12 MP photo through a width-32 NAFNet needs
# several GiB of activations) and keeps it cache-friendly; the overlap overhead at 512/32 is ~14 %.
CPU_AUTO_TILE = 512
MIN_TILE = 64
# Fraction of free GPU memory that `--tile auto` plans to use.
GPU_MEMORY_BUDGET = 0.6
# Side of the probe tile used to measure a model's memory per megapixel.
PROBE_SIDE = 256


@dataclass
class EngineOptions:
    device: str = "auto"
    precision: str = "auto"
    tile: int | None = None  # None = auto, 0 = whole image, N = tile side in pixels
    tile_overlap: int = 32
    batch_size: int = 0  # tiles per forward; 0 = auto
    # torch.compile the network. Every forward then has one shape (batch_size, C, tile, tile):
    # tiles are not balanced, smaller images are padded up to the tile (reflect) and short
    # batches are filled, so a folder compiles once instead of once per image size. The other
    # tile layout changes outputs as any tile size change does: nothing for a local network,
    # about a level for one with global channel attention (NAFNet's, UniRestorer's experts').
    compile: bool = False
    channels_last: bool | None = None  # None = what the model's spec prefers


@dataclass
class RestoreInfo:
    """What the engine actually did for one image (for the run CSV)."""

    tile: int
    precision: str
    device: str
    notes: list[str] = field(default_factory=list)
    route: dict[str, Any] | None = None  # a routed model's choices for this image (CSV columns)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"--device {name}: only {count} CUDA device(s) present")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_precision(name: str, device: torch.device, model: LoadedModel) -> str:
    """``auto`` is bf16 (else fp16) on CUDA where the model declares it safe, fp32 on CPU."""
    if name not in PRECISIONS:
        raise ConfigError(f"--precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    spec = model.spec
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        if spec.supports_bf16 and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if spec.supports_half else "fp32"
    if name == "fp16" and not spec.supports_half:
        raise ConfigError(f"--precision fp16: model {model.name} is not safe in fp16")
    if name == "bf16" and not spec.supports_bf16:
        raise ConfigError(f"--precision bf16: model {model.name} is not safe in bf16")
    return name


def round_down(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def tile_for_memory(
    free_mib: float, mib_per_mp: float, batch_size: int, multiple: int, overlap: int
) -> int:
    """Largest square tile whose batch fits ``GPU_MEMORY_BUDGET`` of the free memory."""
    budget_mp = GPU_MEMORY_BUDGET * free_mib / max(mib_per_mp, 1e-6) / max(batch_size, 1)
    side = int(math.sqrt(max(budget_mp, 0.0) * 1e6))
    return round_down(max(side, 2 * overlap + MIN_TILE, MIN_TILE), multiple)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class Engine:
    """Runs one :class:`LoadedModel` on images with the chosen device, precision and tiling."""

    def __init__(self, model: LoadedModel, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self.device = resolve_device(self.options.device)
        self.model = model
        self.precision = resolve_precision(self.options.precision, self.device, model)
        if self.options.tile is not None and self.options.tile < 0:
            raise ConfigError(f"--tile {self.options.tile}: expected auto, 0 or a positive size")
        if self.options.tile_overlap < 0:
            raise ConfigError(f"--tile-overlap {self.options.tile_overlap}: must be >= 0")
        self.batch_size = self.options.batch_size or (4 if self.device.type == "cuda" else 1)
        self.channels_last = (
            model.spec.channels_last
            if self.options.channels_last is None
            else self.options.channels_last
        )
        # Both ways explicitly: an earlier engine may have converted this module already.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        model.module.to(self.device, memory_format=layout).eval()
        self.network: Any = model.module
        if self.options.compile:
            check_compiler(self.device)
            self.network = torch.compile(model.module, dynamic=False)
        self._mib_per_mp: dict[str, float] = {}
        self._route: Any = None  # the routing of the image being restored (routed models)

    # -- public -------------------------------------------------------------------------------
    def restore(self, rgb: np.ndarray) -> tuple[np.ndarray, RestoreInfo]:
        """Restore an HxWx3 float32 image in [0,1]; returns the output HxWx3 float32 in [0,1]."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
        if self.device.type == "cuda":
            image = image.pin_memory().to(self.device, non_blocking=True)
        output, info = self.restore_tensor(image)
        return output[0].permute(1, 2, 0).cpu().numpy(), info

    def restore_tensor(self, image: torch.Tensor) -> tuple[torch.Tensor, RestoreInfo]:
        """Restore [1,3,H,W] in [0,1] (on any device); returns [1,3,H*s,W*s] float32 in [0,1]."""
        image = image.to(self.device, torch.float32)
        tile = self.choose_tile(*image.shape[-2:])
        info = RestoreInfo(tile=tile, precision=self.precision, device=str(self.device))
        self._route = None
        if self.model.spec.routed:  # once per image, on the whole image, in fp32
            with torch.inference_mode():
                self._route = self.model.route(image)
            info.route = self._route.rows()[0]
        output, info.tile = self._run_with_oom_fallback(image, tile, self.precision, info)
        if self.precision != "fp32" and not torch.isfinite(output).all():
            message = f"{self.precision} output had NaN/Inf; redone in fp32"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            info.notes.append(message)
            info.precision = "fp32"
            output, info.tile = self._run_with_oom_fallback(image, info.tile, "fp32", info)
        if not torch.isfinite(output).all():
            raise RestoreCliError("the model produced NaN/Inf pixels even in fp32")
        return output.clamp(0, 1), info

    def choose_tile(self, height: int, width: int) -> int:
        """Tile side for an image: the user's choice, or auto (see module constants)."""
        multiple = self.model.spec.size_multiple
        if self.options.tile is not None:
            return 0 if self.options.tile == 0 else round_down(self.options.tile, multiple)
        # Compiled: always the same tile (a smaller image is padded up to it), one shape.
        whole_if_fits = not self.options.compile
        if self.device.type != "cuda":
            tile = round_down(CPU_AUTO_TILE, multiple)
            return 0 if whole_if_fits and max(height, width) <= tile else tile
        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        tile = tile_for_memory(
            free_bytes / 2**20,
            self.memory_mib_per_mp(self.precision),
            self.batch_size,
            multiple,
            self.options.tile_overlap,
        )
        return 0 if whole_if_fits and max(height, width) <= tile else tile

    def memory_mib_per_mp(self, precision: str) -> float:
        """Peak CUDA memory per input megapixel: from the spec, else measured once per precision."""
        if self.model.spec.memory_mib_per_mp is not None:
            scale = 0.5 if precision in _DTYPES else 1.0
            return self.model.spec.memory_mib_per_mp * scale
        if precision not in self._mib_per_mp:
            side = round_down(PROBE_SIDE, self.model.spec.size_multiple)
            probe = torch.rand(1, 3, side, side, device=self.device)
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self._forward(probe, precision, compiled=False)  # no compile for a probe shape
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - base
            self._mib_per_mp[precision] = peak / 2**20 / (side * side / 1e6)
        return self._mib_per_mp[precision]

    def forward_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of each network input :meth:`restore` makes for an image of this size."""
        return forward_size(height, width, **self._tiling(self.choose_tile(height, width)))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """One network call on a batch of tiles, as :meth:`restore` makes it (precision,
        layout, compiled network, the last restored image's route): what
        ``benchmarks/performance.py`` times as the pure forward."""
        return self._forward(batch.to(self.device), self.precision)

    # -- internals ----------------------------------------------------------------------------
    def _forward(self, batch: torch.Tensor, precision: str, compiled: bool = True) -> torch.Tensor:
        autocast = (
            torch.autocast(self.device.type, dtype=_DTYPES[precision])
            if precision in _DTYPES
            else contextlib.nullcontext()
        )
        spec = self.model.spec
        if spec.input_channels == 1:
            batch = luma(batch)
        count = batch.shape[0]
        network = self.network if compiled else self.model.module
        if network is not self.model.module and count < self.batch_size:
            # A short last batch, filled with copies so the compiled shape stays the same.
            filler = batch[-1:].expand(self.batch_size - count, -1, -1, -1)
            batch = torch.cat([batch, filler])
        # Explicit either way: an image from HxWxC numpy is already channels_last in memory.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        batch = batch.contiguous(memory_format=layout)
        extra = {} if self._route is None else {"route": self._route}
        with torch.inference_mode(), autocast:
            output = network(batch, **self.model.conditions, **extra)[:count].float()
        if spec.output_channels == 1:
            output = output.expand(-1, 3, -1, -1)
        return output

    def _run_with_oom_fallback(
        self, image: torch.Tensor, tile: int, precision: str, info: RestoreInfo
    ) -> tuple[torch.Tensor, int]:
        spec = self.model.spec
        while True:
            try:
                output = run_tiled(
                    lambda batch: self._forward(batch, precision),
                    image,
                    scale=spec.scale,
                    batch_size=self.batch_size,
                    **self._tiling(tile),
                )
                return output, tile
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                smaller = self._smaller_tile(tile, *image.shape[-2:])
                if smaller is None:
                    raise RestoreCliError(
                        f"out of memory even with a {tile}px tile; try --device cpu"
                    ) from error
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                info.notes.append(f"out of memory at tile {tile or 'whole'}; retried at {smaller}")
                tile = smaller

    def _tiling(self, tile: int) -> dict[str, Any]:
        """The geometry arguments of run_tiled (and forward_size) for this tile side."""
        spec = self.model.spec
        return {
            "tile": tile,
            "overlap": self.options.tile_overlap,
            "size_multiple": spec.size_multiple,
            # compiled: every tile exactly ``tile`` (see EngineOptions.compile)
            "min_size": max(spec.min_size, tile) if self.options.compile else spec.min_size,
            "square": spec.square,
            "balance": not self.options.compile,
        }

    def _smaller_tile(self, tile: int, height: int, width: int) -> int | None:
        current = tile or max(height, width)
        smaller = round_down(current // 2, self.model.spec.size_multiple)
        return smaller if MIN_TILE <= smaller < current else None


def check_compiler(device: torch.device) -> None:
    """``--compile`` needs a code generator: a C++ compiler on CPU, Triton on CUDA.

    Checked up front, so a machine without one gets one clear error instead of a failed image
    per file.
    """
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("--compile on CUDA needs Triton (pip install triton)")
    elif not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        raise ConfigError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH")


def luma(batch: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of RGB, for single-channel (grayscale) models."""
    weights = batch.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (batch * weights).sum(dim=1, keepdim=True)
