"""Evaluation outputs: per-image CSV, summary CSV, a rich table on stderr, and summary.png.

Metrics produce numbers; this module only arranges them. Every file is written whole and
renamed into place (restore_cli.io.atomic), so a pipeline never reads half a CSV.

Summary conventions: ``mean``/``std``/``count`` use the finite values of a column only; ``std``
is the population standard deviation (ddof = 0). Infinite values (PSNR of identical images)
are counted in ``<column>_inf`` instead of turning the mean into ``inf``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from restore_cli.io.atomic import atomic_write_bytes

STATUS_OK = "ok"
STATUS_FAILED = "failed"  # unreadable file, ambiguous name, or a metric raised
STATUS_SIZE_MISMATCH = "size_mismatch"
STATUS_MISSING_GT = "missing_gt"  # prediction without ground truth
STATUS_MISSING_PRED = "missing_pred"  # ground truth without prediction
UNMATCHED = frozenset({STATUS_MISSING_GT, STATUS_MISSING_PRED})

METADATA_COLUMNS = ["types", "degradations", "levels", "ood"]
LEVEL_ORDER = ("light", "medium", "heavy")
VALUE_FORMAT = "{:.6f}"

Row = dict[str, object]


# ----------------------------------------------------------------------------- per image


PER_IMAGE_TAIL = ("height", "width", "pred", "gt", "error")


def per_image_columns(metric_columns: Sequence[str], with_metadata: bool) -> list[str]:
    extra = METADATA_COLUMNS if with_metadata else []
    return ["file", "model", "status", *metric_columns, *extra, *PER_IMAGE_TAIL]


def format_value(value: object) -> object:
    """Floats with 6 decimals (enough for 1e-4 dB and 1e-5 SSIM), ``inf``/``-inf``/``nan`` as
    words; everything else unchanged."""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
        return VALUE_FORMAT.format(value)
    return value


def csv_bytes(columns: Sequence[str], rows: Iterable[Row]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: format_value(value) for key, value in row.items()})
    return buffer.getvalue().encode("utf-8")


def write_per_image(
    path: Path, rows: Sequence[Row], metric_columns: Sequence[str], with_metadata: bool
) -> None:
    atomic_write_bytes(path, csv_bytes(per_image_columns(metric_columns, with_metadata), rows))


# ----------------------------------------------------------------------------- summary


def groups_of(row: Row) -> list[tuple[str, str]]:
    """(group, value) pairs a row belongs to: ``all``, each degradation type and level it went
    through, and each type/level step (``noise/heavy``). Mixtures count in every one of their
    types, so per-type rows of mixed sets overlap. A pair whose metadata names no degradation
    (``synthesize --clean``) is in the ``clean`` type; a row without metadata (empty ``ood``)
    only in ``all``."""
    found = [("all", "")]
    types = [t for t in str(row.get("types") or "").split("+") if t]
    levels = [level for level in str(row.get("levels") or "").split("+") if level]
    if not types and str(row.get("ood", "")) != "":
        types = ["clean"]
    found += [("type", t) for t in dict.fromkeys(types)]
    found += [("level", level) for level in dict.fromkeys(levels)]
    if len(types) == len(levels):
        steps = (f"{t}/{level}" for t, level in zip(types, levels, strict=True))
        found += [("type_level", step) for step in dict.fromkeys(steps)]
    return found


def summary_columns(metric_columns: Sequence[str]) -> list[str]:
    columns = ["model", "group", "value", "files", "scored", "unmatched", "failed"]
    for column in metric_columns:
        columns += [f"{column}_mean", f"{column}_std", f"{column}_count"]
        if column.startswith("psnr"):
            columns.append(f"{column}_inf")
    return columns


def statistics(values: Sequence[float]) -> tuple[float | str, float | str, int, int]:
    """(mean, std, count, infinite) over the finite values; mean/std blank when none."""
    finite = [v for v in values if math.isfinite(v)]
    infinite = sum(1 for v in values if math.isinf(v))
    if not finite:
        return "", "", 0, infinite
    mean = math.fsum(finite) / len(finite)
    variance = math.fsum((v - mean) ** 2 for v in finite) / len(finite)
    return mean, math.sqrt(variance), len(finite), infinite


def _group_order(key: tuple[str, str, str], models: list[str]) -> tuple:
    model, group, value = key
    group_rank = ("all", "type", "level", "type_level").index(group)
    level_rank = LEVEL_ORDER.index(value) if value in LEVEL_ORDER else len(LEVEL_ORDER)
    return models.index(model), group_rank, level_rank, value


def summarize(rows: Sequence[Row], metric_columns: Sequence[str]) -> list[Row]:
    """One summary row per (model, group, value), in model order, then all/type/level."""
    members: dict[tuple[str, str, str], list[Row]] = {}
    models: list[str] = []
    for row in rows:
        model = str(row["model"])
        if model not in models:
            models.append(model)
        for group, value in groups_of(row):
            members.setdefault((model, group, value), []).append(row)
    summary = []
    for key in sorted(members, key=lambda k: _group_order(k, models)):
        group_rows = members[key]
        statuses = [r["status"] for r in group_rows]
        entry: Row = {
            "model": key[0],
            "group": key[1],
            "value": key[2],
            "files": len(group_rows),
            "scored": statuses.count(STATUS_OK),
            "unmatched": sum(status in UNMATCHED for status in statuses),
            "failed": sum(status in (STATUS_FAILED, STATUS_SIZE_MISMATCH) for status in statuses),
        }
        for column in metric_columns:
            values = [float(v) for r in group_rows if isinstance(v := r.get(column), float)]
            mean, std, count, infinite = statistics(values)
            entry |= {f"{column}_mean": mean, f"{column}_std": std, f"{column}_count": count}
            if column.startswith("psnr"):
                entry[f"{column}_inf"] = infinite
        summary.append(entry)
    return summary


def write_summary(path: Path, summary: Sequence[Row], metric_columns: Sequence[str]) -> None:
    atomic_write_bytes(path, csv_bytes(summary_columns(metric_columns), summary))


# ----------------------------------------------------------------------------- terminal


def _short(row: Row, column: str) -> str:
    value = row.get(f"{column}_mean")
    if not isinstance(value, float):
        return "–"
    text = f"{value:.2f}" if column.startswith("psnr") else f"{value:.4f}"
    return text + ("*" if row.get(f"{column}_inf") else "")


def print_table(summary: Sequence[Row], metric_columns: Sequence[str], stream: TextIO) -> None:
    """Means per model, overall and per degradation type, as a rich table on ``stream``."""
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "group", "files", "scored", *metric_columns, title="eval summary")
    shown = [row for row in summary if row["group"] in ("all", "type")]
    for row in shown:
        label = "all" if row["group"] == "all" else str(row["value"])
        cells = [_short(row, column) for column in metric_columns]
        table.add_row(str(row["model"]), label, str(row["files"]), str(row["scored"]), *cells)
    console = Console(file=stream, width=max(100, 24 * len(metric_columns)))
    console.print(table)
    if any(row.get(f"{column}_inf") for row in shown for column in metric_columns):
        console.print(
            "* some images are identical to their ground truth (PSNR = inf); "
            "they are left out of that mean (see the _inf columns of summary.csv)"
        )


# ----------------------------------------------------------------------------- plot


def plot_summary(path: Path, summary: Sequence[Row], metric_columns: Sequence[str]) -> None:
    """summary.png: one panel per metric, groups (all + each type) on x, one bar per model.

    Uses the Agg canvas directly (no pyplot), so nothing global about matplotlib changes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(str(row["model"]) for row in summary))
    labels = ["all", *sorted({str(r["value"]) for r in summary if r["group"] == "type"})]
    columns = list(metric_columns)
    panels = max(len(columns), 1)
    width = max(4.0, 0.9 * len(labels) * max(len(models), 1) / 2 + 2)
    figure = Figure(figsize=(width, 3.2 * panels), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, squeeze=False)[:, 0]
    bar = 0.8 / max(len(models), 1)
    for axis, column in zip(axes, columns or ["(no metric)"], strict=True):
        for index, model in enumerate(models):
            heights = []
            for label in labels:
                group = "all" if label == "all" else "type"
                value = next(
                    (
                        r.get(f"{column}_mean")
                        for r in summary
                        if r["model"] == model
                        and r["group"] == group
                        and (group == "all" or r["value"] == label)
                    ),
                    None,
                )
                heights.append(value if isinstance(value, float) else math.nan)
            positions = [i + (index - (len(models) - 1) / 2) * bar for i in range(len(labels))]
            axis.bar(positions, heights, width=bar, label=model)
        axis.set_xticks(range(len(labels)), labels)
        axis.set_title(column)
        axis.grid(axis="y", alpha=0.3)
    if len(models) > 1:
        handles, names = axes[0].get_legend_handles_labels()
        figure.legend(handles, names, loc="outside upper center", ncols=min(len(models), 6))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
