"""Routing decisions of mixture-of-experts models as table rows, shared by `restore` and `route`.

A routed model (``ModelSpec.routed``) returns a :class:`Route` for a batch of whole images: which
degradations it sees, how strongly, at which granularity it trusts that estimate, and which
experts restore the image with what weights. ``restore`` adds these columns (``route_*``) to its
run CSV; ``route`` writes only them.
"""

from __future__ import annotations

import contextlib
import csv
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from restore_cli.errors import ModelError, RestoreCliError, one_line, with_file
from restore_cli.io.atomic import atomic_path
from restore_cli.io.discover import Source, expand_inputs
from restore_cli.io.image import MAX_PIXELS_DEFAULT, DecodedImage, read_image
from restore_cli.io.shard import Shard
from restore_cli.models.registry import LoadedModel, apply_mode

GRANULARITIES = ("all", "type", "degree")


def granularity_index(name: str) -> int:
    """Position of a ``--granularity`` name (0 = all, 1 = type, 2 = degree), or a clear error."""
    if name not in GRANULARITIES:
        raise ModelError(f"--granularity {name!r}: expected one of {', '.join(GRANULARITIES)}")
    return GRANULARITIES.index(name)


@dataclass
class Route:
    """Routing of a batch of images (one row per image), the input of every tile's forward."""

    expert_weights: torch.Tensor  # [B,E], top-k experts, rows sum to 1
    leaf: torch.Tensor  # [B] chosen fine cluster
    granularity: torch.Tensor  # [B] 0 all, 1 type, 2 degree
    leaf_probs: torch.Tensor  # [B,L]
    granularity_probs: torch.Tensor  # [B,3]
    type_probs: torch.Tensor  # [B,T] independent (sigmoid) probabilities of each family
    degree: torch.Tensor  # [B,T] estimated degree in [0,1] of each family
    families: tuple[str, ...]  # names of the type columns
    experts: tuple[str, ...]  # names of the expert columns

    def rows(self) -> list[dict[str, Any]]:
        """One CSV-ready dict per image (see ``ROUTE_COLUMNS``)."""
        families, experts = self.families, self.experts
        rows = []
        for b in range(self.expert_weights.shape[0]):
            type_probs = self.type_probs[b].tolist()
            ranked = sorted(range(len(families)), key=lambda t: -type_probs[t])
            present = [t for t in ranked if type_probs[t] >= 0.5] or ranked[:1]
            weights = self.expert_weights[b]
            chosen = [int(e) for e in torch.nonzero(weights).flatten().tolist()]
            chosen.sort(key=lambda e: -float(weights[e]))
            rows.append(
                {
                    "types": "+".join(families[t] for t in present),
                    "type_probs": json.dumps(
                        {families[t]: round(type_probs[t], 4) for t in ranked},
                        separators=(",", ":"),
                    ),
                    "degree": "+".join(f"{float(self.degree[b, t]):.3f}" for t in present),
                    "granularity": GRANULARITIES[int(self.granularity[b])],
                    "leaf": int(self.leaf[b]),
                    "experts": "+".join(experts[e] for e in chosen),
                    "expert_weights": "+".join(f"{float(weights[e]):.4f}" for e in chosen),
                    "confidence": round(
                        float(self.leaf_probs[b].max() * self.granularity_probs[b].max()), 4
                    ),
                }
            )
        return rows


ROUTE_COLUMNS = (
    "types",
    "type_probs",
    "degree",
    "granularity",
    "leaf",
    "experts",
    "expert_weights",
    "confidence",
)


# ----------------------------------------------------------------------------- `route`

ROUTE_FILE_COLUMNS = ("input", "height", "width", "status", "error", *ROUTE_COLUMNS)


@dataclass
class RouteOptions:
    inputs: list[str]
    csv_path: Path | None = Path("routes.csv")  # None = CSV on stdout
    mode: str = "auto"
    tasks: list[str] = field(default_factory=list)
    granularity: str | None = None
    device: str = "auto"
    recursive: bool = False
    quiet: bool = False
    max_pixels: int = MAX_PIXELS_DEFAULT
    readers: int = 2
    shard: Shard | None = None  # only this shard's images (job arrays); None = all


def run_route(
    options: RouteOptions, model: LoadedModel, stdin: TextIO | None, stdout: TextIO, stderr: TextIO
) -> int:
    """Estimate degradations and experts for every image; one CSV row per input, in order.

    Rows are written (and flushed) as soon as each image is routed, so the CSV streams into a
    pipeline; into a file it goes through a temporary name renamed at the end, so a killed run
    never leaves a half table under the final name. Exit code 1 when any input failed.
    """
    from restore_cli.engine import resolve_device
    from restore_cli.restore import prefetch

    if not model.spec.routed:
        raise ModelError(f"model {model.name} does not route; `route` needs a mixture of experts")
    apply_mode(model, options.mode, options.tasks, options.granularity)
    device = resolve_device(options.device)
    model.module.to(device).eval()
    sources = expand_inputs(options.inputs, recursive=options.recursive, stdin=stdin)
    if options.shard is not None:
        sources = [source for source in sources if options.shard.owns(source.relative)]
    failed = 0
    readers = ThreadPoolExecutor(options.readers, thread_name_prefix="read")
    with contextlib.ExitStack() as stack:
        if options.csv_path is None:
            handle = stdout
        else:
            options.csv_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = stack.enter_context(atomic_path(options.csv_path))
            handle = stack.enter_context(temporary.open("w", newline="", encoding="utf-8"))
        writer = csv.DictWriter(handle, fieldnames=ROUTE_FILE_COLUMNS, restval="")
        writer.writeheader()
        stack.callback(readers.shutdown, wait=True, cancel_futures=True)

        def read(source: Source) -> DecodedImage:
            return read_image(source.path, max_pixels=options.max_pixels)

        for source, reading in prefetch(
            readers, read, sources, 2 * options.readers, wanted=lambda s: not s.error
        ):
            row: dict[str, Any] = {"input": str(source.path)}
            try:
                if source.error:
                    raise RestoreCliError(f"{source.path}: {source.error}")
                assert reading is not None
                rgb = reading.result().rgb
                row |= {"height": rgb.shape[0], "width": rgb.shape[1]}
                image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
                with torch.inference_mode():
                    route = model.route(image.to(device))
                row |= {"status": "ok", **route.rows()[0]}
            except Exception as error:  # one bad file never stops the batch
                failed += 1
                message = with_file(source.path, one_line(error))
                row |= {"status": "failed", "error": message}
                if not options.quiet:
                    print(f"error: {message}", file=stderr)
            writer.writerow(row)
            handle.flush()
    if not options.quiet:
        where = f" -> {options.csv_path}" if options.csv_path is not None else ""
        print(f"routed {len(sources) - failed}, failed {failed}{where}", file=stderr)
    return 1 if failed else 0
