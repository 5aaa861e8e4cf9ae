"""JPEG compression artefacts from a real encode/decode round trip (libjpeg through Pillow).

A real codec, not a differentiable imitation: blocking, ringing and chroma bleeding come out
exactly as in photos saved by cameras and apps. Pillow is used rather than
``torchvision.io.encode_jpeg`` because it sets the 4:2:0 chroma subsampling explicitly instead
of relying on the library default (both give identical bytes today; torchvision is ~1 ms faster
per 512² image, far from mattering).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from restore_cli.degradations.base import Degradation, Param, register

SUBSAMPLING_420 = 2  # Pillow's code for 4:2:0, the libjpeg and camera default


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Encode an ``[H,W,3]`` uint8 array as baseline JPEG at ``quality`` (4:2:0) and decode it."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality, subsampling=SUBSAMPLING_420)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return np.asarray(decoded.convert("RGB"))


def jpeg_compress(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Quantise to 8 bits (round to nearest), JPEG-encode at ``quality``, decode, back to [0,1].

    Each image of the batch is coded on its own, as a file would be; deterministic, no random
    draws.
    """
    quality = int(params["quality"])
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to("cpu", torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    decoded = np.stack([jpeg_round_trip(np.ascontiguousarray(rgb), quality) for rgb in pixels])
    out = torch.from_numpy(decoded).permute(0, 3, 1, 2).to(torch.float32) / 255
    return out.to(image.device, image.dtype)


register(
    Degradation(
        name="jpeg",
        family="jpeg",
        task="dejpeg",
        params=(Param("quality", in_dist=(90, 20), ood=(20, 5), integer=True),),
        apply=jpeg_compress,
        summary="real baseline JPEG encode/decode (libjpeg, 4:2:0 chroma) at the given quality",
        source="LIVE1/Classic5 CAR benchmarks q∈{10,20,30,40}; Diff-Restorer trains q=10",
    )
)
