"""UniRestorer validation: quality per mode and granularity, routing accuracy, confusion matrix.

    python benchmarks/unirestorer.py --photos /tmp/photos/val --out /tmp/unirestorer-bench \
        --model unirestorer --baseline nafnet-allinone-s \
        --baseline control=runs/nafnet-allinone-s-control/final.safetensors

Builds (once) sets from the fetch-photos *val* photos at fixed seeds: every single type
(noise, blur, jpeg, lowlight, haze, rain, snow) at each level (light, medium, heavy), and three
medium-level mixtures (haze+noise, haze+noise+rain, lowlight+haze+noise+rain, as in the paper's
mixed table), ``--per-image`` 256 px crops per photo each, and a ``clean`` set of undegraded
crops (what a model does to a photo that needed nothing; its input PSNR is infinite, and its
instruction column is auto mode: there is no task to name). Then scores, per set, the degraded
input, each baseline (a model name or weights path; ``LABEL=`` names its column), and
UniRestorer in auto mode, instruction mode (the set's own tasks) and at each fixed granularity
(PSNR/SSIM on RGB, uint8, no crop border: docs/metrics.md). Routing: type accuracy (argmax of
the type probabilities vs the single applied family), mean absolute degree error (degree head
vs light/medium/heavy = 1/3, 2/3, 1), expert routing accuracy (the chosen degree leaf's most
common training degradation is the applied one), and a confusion-matrix PNG. Granularity: per
set, how many crops auto mode gives to all / type / degree, and at which forced granularity
each crop came out best.
Writes ``OUT/results.json``, ``OUT/confusion.png`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from restore_cli.engine import Engine, EngineOptions
from restore_cli.io.image import read_image
from restore_cli.metrics import Convention, psnr, ssim
from restore_cli.models.degradation_encoder import DEGREE_OF_LEVEL
from restore_cli.models.loading import load_model
from restore_cli.models.registry import apply_mode
from restore_cli.routing import GRANULARITIES
from restore_cli.synthesize import SynthesizeOptions, make_spec, synthesize

TYPES = ["noise", "blur", "jpeg", "lowlight", "haze", "rain", "snow"]
LEVELS = ["light", "medium", "heavy"]
MIXTURES = [["haze", "noise"], ["haze", "noise", "rain"], ["lowlight", "haze", "noise", "rain"]]
TASK = {
    "noise": "denoise",
    "blur": "deblur",
    "jpeg": "dejpeg",
    "lowlight": "lowlight",
    "haze": "dehaze",
    "rain": "derain",
    "snow": "desnow",
}
ROUTED_VARIANTS = ("auto", "instruction", "all", "type", "degree")
CONVENTION = Convention("rgb", 0)
CLEAN = "clean"


def build_sets(photos: Path, out: Path, per_image: int) -> dict[str, tuple[Path, list[str], str]]:
    """name → (folder, families, level); skipped when already complete (synthesize resumes)."""
    sets: dict[str, tuple[Path, list[str], str]] = {}
    seed = 300
    for family in TYPES:
        for level in LEVELS:
            sets[f"{family}-{level}"] = (out / f"{family}-{level}", [family], level)
    for mixture in MIXTURES:
        sets["+".join(mixture)] = (out / "+".join(mixture), mixture, "medium")
    sets[CLEAN] = (out / CLEAN, [], "light")
    for folder, families, level in sets.values():
        seed += 1
        mixed = (len(families), len(families)) if len(families) > 1 else None
        spec = (
            make_spec(families, [level], mixed=mixed)
            if families
            else make_spec(TYPES, [level], clean=1.0)
        )
        synthesize(
            SynthesizeOptions(
                inputs=[str(photos)],
                output_dir=folder,
                spec=spec,
                per_image=per_image,
                crop=256,
                seed=seed,
                quiet=True,
            )
        )
    return sets


def load_pairs(folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with (folder / "metadata.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    tensor = lambda path: torch.from_numpy(read_image(path).rgb).permute(2, 0, 1)[None]  # noqa: E731
    return [(tensor(folder / row["lq"]), tensor(folder / row["gt"])) for row in rows]


def scores(pred: torch.Tensor, gt: torch.Tensor) -> tuple[float, float]:
    return float(psnr(pred, gt, CONVENTION)[0]), float(ssim(pred, gt, CONVENTION)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="unirestorer")
    parser.add_argument(
        "--baseline",
        action="append",
        help="Dense model to compare with, NAME or LABEL=NAME-OR-PATH (repeatable; "
        "default nafnet-allinone-s).",
    )
    parser.add_argument("--no-baselines", action="store_true", help="Score no dense model.")
    parser.add_argument(
        "--modes",
        default=",".join(ROUTED_VARIANTS),
        help="UniRestorer columns to score, comma-separated (auto is always scored: routing "
        "accuracy is measured on it). Quicker runs for router experiments: auto,instruction.",
    )
    parser.add_argument("--per-image", type=int, default=2)
    # One thread: on a 2-core machine with anything else running, two OpenMP threads spin-wait
    # for each other and run ~10x slower (see configs/nafnet-allinone-s.yaml).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--every", type=int, default=1, help="Score every N-th pair of each set (quicker runs)."
    )
    args = parser.parse_args()
    modes = [m for m in ROUTED_VARIANTS if m == "auto" or m in args.modes.split(",")]
    unknown = set(args.modes.split(",")) - set(ROUTED_VARIANTS)
    if unknown:
        valid = ", ".join(ROUTED_VARIANTS)
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))} (valid: {valid})")
    torch.set_num_threads(args.threads)
    sets = build_sets(args.photos, args.out / "sets", args.per_image)

    routed = load_model(args.model)
    baselines = {
        label: Engine(load_model(source), EngineOptions(device="cpu"))
        for label, source in map(
            baseline_column, [] if args.no_baselines else args.baseline or ["nafnet-allinone-s"]
        )
    }
    variants = ["input", *baselines, *modes]
    results: dict[str, dict[str, list[float]]] = {}
    confusion = np.zeros((len(TYPES), len(TYPES)), dtype=int)
    degree_errors: list[float] = []
    leaf_hits: list[bool] = []
    granularity_counts: dict[str, dict[str, dict[str, int]]] = {}
    for name, (folder, families, level) in sets.items():
        pairs = load_pairs(folder)[:: args.every]
        table = {f"{v}_{m}": [] for v in variants for m in ("psnr", "ssim")}
        chosen = dict.fromkeys(GRANULARITIES, 0)
        engines = {}
        for variant in modes:
            instructed = variant == "instruction" and bool(families)
            mode = "instruction" if instructed else "auto"
            tasks = [TASK[f] for f in families] if instructed else []
            granularity = variant if variant in ("all", "type", "degree") else None
            apply_mode(routed, mode, tasks, granularity)
            engines[variant] = (
                Engine(routed, EngineOptions(device="cpu")),
                dict(routed.conditions),
            )
        for lq, gt in pairs:
            for variant in variants:
                if variant == "input":
                    pred = lq
                elif variant in baselines:
                    pred = baselines[variant].restore_tensor(lq)[0]
                else:
                    engine, conditions = engines[variant]
                    routed.conditions = dict(conditions)
                    pred, info = engine.restore_tensor(lq)
                    if variant == "auto":
                        chosen[info.route["granularity"]] += 1
                    if variant == "auto" and len(families) == 1:
                        probs = json.loads(info.route["type_probs"])
                        predicted = max(probs, key=probs.get)
                        confusion[TYPES.index(families[0]), TYPES.index(predicted)] += 1
                        with torch.no_grad():
                            route = routed.module.route(lq)
                        estimate = float(route.degree[0, TYPES.index(families[0])])
                        degree_errors.append(abs(estimate - DEGREE_OF_LEVEL[level]))
                        leaf_members = routed.module.leaf_families[route.leaf[0]]
                        leaf_hits.append(int(leaf_members.argmax()) == TYPES.index(families[0]))
                value_psnr, value_ssim = scores(pred, gt)
                table[f"{variant}_psnr"].append(value_psnr)
                table[f"{variant}_ssim"].append(value_ssim)
        results[name] = table
        granularity_counts[name] = {"chosen": chosen, "best": best_granularity(table)}
        means = {k: float(np.mean(v)) for k, v in table.items()}
        print(name, " ".join(f"{v} {means[v + '_psnr']:.2f}" for v in variants), flush=True)

    accuracy = float(np.trace(confusion) / confusion.sum())
    summary = {
        "sets": {name: {k: float(np.mean(v)) for k, v in t.items()} for name, t in results.items()},
        "type_accuracy": accuracy,
        "degree_mae": float(np.mean(degree_errors)),
        "leaf_accuracy": float(np.mean(leaf_hits)),
        "confusion": confusion.tolist(),
        "confusion_labels": TYPES,
        "granularity": granularity_counts,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    write_confusion_png(confusion, args.out / "confusion.png", accuracy)
    print_tables(summary, variants)


def best_granularity(table: dict[str, list[float]]) -> dict[str, int]:
    """Per crop, which forced granularity restored it best (PSNR); empty unless all three ran."""
    if not all(f"{g}_psnr" in table for g in GRANULARITIES):
        return {}
    scores_by_crop = np.array([table[f"{g}_psnr"] for g in GRANULARITIES])
    winners = np.bincount(scores_by_crop.argmax(0), minlength=len(GRANULARITIES))
    return {g: int(n) for g, n in zip(GRANULARITIES, winners, strict=True)}


def baseline_column(text: str) -> tuple[str, str]:
    """``LABEL=SOURCE`` → (LABEL, SOURCE); a plain model name labels itself."""
    label, _, source = text.rpartition("=")
    return (label or source), source


def write_confusion_png(confusion: np.ndarray, path: Path, accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    rates = confusion / confusion.sum(1, keepdims=True).clip(min=1)
    axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(TYPES)):
        for j in range(len(TYPES)):
            if confusion[i, j]:
                colour = "white" if rates[i, j] > 0.5 else "black"
                axes.text(j, i, str(confusion[i, j]), ha="center", va="center", color=colour)
    axes.set_xticks(range(len(TYPES)), TYPES, rotation=45, ha="right")
    axes.set_yticks(range(len(TYPES)), TYPES)
    axes.set_xlabel("estimated type (argmax)")
    axes.set_ylabel("applied type")
    axes.set_title(f"UniRestorer type routing, single-type val sets: {accuracy:.1%}")
    figure.tight_layout()
    figure.savefig(path)


def print_tables(summary: dict, variants: list[str]) -> None:
    print_set_table(summary["sets"], variants)
    print(f"\ntype routing accuracy {summary['type_accuracy']:.1%}, ", end="")
    print(f"degree MAE {summary['degree_mae']:.3f}, ", end="")
    print(f"expert (leaf) routing accuracy {summary['leaf_accuracy']:.1%}")
    print("\ngranularity per crop, all/type/degree: chosen in auto mode; best when forced (PSNR)")
    for name, counts in summary["granularity"].items():
        line = "/".join(str(counts["chosen"][g]) for g in GRANULARITIES)
        if counts["best"]:
            line += "; best " + "/".join(str(counts["best"][g]) for g in GRANULARITIES)
        print(f"  {name}: {line}")


def print_set_table(rows: dict[str, dict[str, float]], columns: list[str]) -> None:
    """Markdown: one row per set (PSNR / SSIM of each column), then the means of the single-type
    sets and of the mixtures (also used by benchmarks/shipped_models.py)."""
    print("\n| set | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, means in rows.items():
        cells = [f"{means[c + '_psnr']:.2f} / {means[c + '_ssim']:.3f}" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for label, names in (
        ("mean, single types", [n for n in rows if "+" not in n and n != CLEAN]),
        ("mean, mixtures", [n for n in rows if "+" in n]),
    ):
        cells = [
            f"{np.mean([rows[n][c + '_psnr'] for n in names]):.2f} / "
            f"{np.mean([rows[n][c + '_ssim'] for n in names]):.3f}"
            for c in columns
        ]
        print(f"| **{label}** | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
