"""Missing regions for inpainting: free-form brush strokes and boxes, filled with black.

The masks follow the LaMa / DeepFill recipe (random thick polylines with round joints, plus a
few rectangles) because a model trained on them generalises to the shapes people actually erase.
Holes are filled with black (0) only: one fill keeps the task unambiguous for the restorer and
the mask recoverable from the pair; white or noise fills would add little.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import cv2
import numpy as np
import torch

from restore_cli.degradations.base import Degradation, Param, rand, register

_REFERENCE_SIDE = 512
_BOX_PROBABILITY = 0.15


def _uniforms(generator: torch.Generator) -> Iterator[float]:
    """An endless stream of uniforms from ``generator``, drawn on the CPU in blocks of 256."""
    while True:
        yield from rand((256,), generator, torch.empty(0)).tolist()


def _free_form_mask(height: int, width: int, coverage: float, u: Iterator[float]) -> np.ndarray:
    """Strokes and boxes drawn until ``coverage`` of the pixels are masked.

    Coverage is checked after every stroke segment and every box, and neither is bigger than
    ~2% of a square image (strokes are 8–36 px wide and segments 10–60 px long per 512 px;
    box sides 5–15% of the short side), so the result lands within a couple of percent of the
    target.
    """
    short = min(height, width)
    scale = short / _REFERENCE_SIDE
    mask = np.zeros((height, width), np.uint8)
    target = coverage * height * width
    covered = 0
    while covered < target:
        if next(u) < _BOX_PROBABILITY:
            box_w, box_h = (round((0.05 + 0.1 * next(u)) * short) for _ in range(2))
            x0, y0 = round(next(u) * (width - box_w)), round(next(u) * (height - box_h))
            cv2.rectangle(mask, (x0, y0), (x0 + box_w, y0 + box_h), 1, thickness=-1)
            covered = np.count_nonzero(mask)
            continue
        x, y = next(u) * (width - 1), next(u) * (height - 1)
        heading = 2 * math.pi * next(u)
        thickness = max(1, round((8 + 28 * next(u)) * scale))
        for _ in range(4 + int(9 * next(u))):
            heading += 0.8 * math.pi * (next(u) - 0.5)  # turn by up to ±72°
            length = (10 + 50 * next(u)) * scale
            end_x = min(max(x + length * math.cos(heading), 0), width - 1)
            end_y = min(max(y + length * math.sin(heading), 0), height - 1)
            start, end = (round(x), round(y)), (round(end_x), round(end_y))
            cv2.line(mask, start, end, 1, thickness)
            cv2.circle(mask, end, thickness // 2, 1, thickness=-1)  # round joint
            x, y = end_x, end_y
            covered = np.count_nonzero(mask)
            if covered >= target:
                break
    return mask


def inpaint_mask(
    shape: tuple[int, ...], params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Binary hole masks ``[B,1,H,W]`` float32 on the CPU (1 = missing), one per image.

    ``params["coverage"]`` is the fraction of pixels to remove; each mask hits it within ~0.02.
    """
    batch, height, width = shape[0], shape[-2], shape[-1]
    u = _uniforms(generator)
    masks = [_free_form_mask(height, width, float(params["coverage"]), u) for _ in range(batch)]
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))


def apply_inpaint_mask(
    image: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """``I·(1 − M)``: the masked pixels become black; :func:`inpaint_mask` gives ``M`` itself."""
    mask = inpaint_mask(tuple(image.shape), params, generator).to(image.device, image.dtype)
    return image * (1 - mask)


INPAINT_MASK = register(
    Degradation(
        name="inpaint_mask",
        family="inpaint",
        task="inpaint",
        params=(Param("coverage", (0.05, 0.3), ood=(0.3, 0.5)),),
        apply=apply_inpaint_mask,
        summary="Free-form strokes and boxes (LaMa-style masks) filled with black",
        source="free-form masks as in LaMa (Suvorov et al. 2022); DA-CLIP's inpainting task",
    )
)
