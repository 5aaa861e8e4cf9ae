"""Validation quality of a model per degradation type, against the input and baselines.

    python benchmarks/quality.py --photos /tmp/photos/val --out /tmp/quality --model NAME [...]

Builds (once) two sets from the fetch-photos *val* photos at fixed seeds, then scores them with
`eval` (PSNR/SSIM on RGB, uint8, no crop) and prints Markdown tables:

* ``single``: every photo, 12 random 256×256 crops, each with ONE degradation drawn from
  noise, blur, jpeg, lowlight, haze, rain, snow (levels light/medium/heavy), seed 100;
* ``gauss25``: every photo, 2 crops with Gaussian noise σ = 25 exactly, seed 101 (for the
  comparison with BM3D, which estimates σ itself; see docs/metrics.md);
* ``clean``: every photo, 4 crops left clean, seed 102: what a model does to a photo that
  needed nothing (the input's own PSNR is infinite, shown as ∞).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from restore_cli.engine import EngineOptions
from restore_cli.evaluate import EvalOptions, evaluate
from restore_cli.synthesize import SynthesizeOptions, make_spec, synthesize

SINGLE_TYPES = ["noise", "blur", "jpeg", "lowlight", "haze", "rain", "snow"]
PSNR, SSIM = "psnr_rgb_crop0_uint8_mean", "ssim_rgb_crop0_uint8_mean"


def build_sets(photos: Path, out: Path) -> dict[str, Path]:
    """The three sets of the module docstring: name -> (spec, pairs per photo, seed)."""
    sets = {
        "single": (make_spec(SINGLE_TYPES, ["light", "medium", "heavy"]), 12, 100),
        "gauss25": (
            make_spec(["gaussian_noise"], ["medium"], fixed=["gaussian_noise.sigma=25"]),
            2,
            101,
        ),
        "clean": (make_spec(SINGLE_TYPES, ["light"], clean=1.0), 4, 102),
    }
    for name, (spec, per_image, seed) in sets.items():
        synthesize(
            SynthesizeOptions(
                inputs=[str(photos)],
                output_dir=out / name,
                spec=spec,
                per_image=per_image,
                crop=256,
                seed=seed,
                quiet=True,
            )
        )
    return {name: out / name for name in sets}


def score(data: Path, models: list[str], out: Path) -> list[dict[str, str]]:
    options = EvalOptions(
        output_dir=out, models=models, data=data, engine=EngineOptions(device="cpu"), quiet=True
    )
    evaluate(options)
    with (out / "summary.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def label(model: str) -> str:
    """The summary's model column: a registry name, or a weights file's stem."""
    path = Path(model)
    return path.stem if path.suffix in (".safetensors", ".pth", ".ckpt") else model


def table(rows: list[dict[str, str]], models: list[str]) -> str:
    models = [label(m) for m in models]
    groups = [
        r["value"] or "all"
        for r in rows
        if r["model"] == models[0] and r["group"] in ("all", "type")
    ]
    lines = [
        "| type | n | " + " | ".join(f"{m} PSNR / SSIM" for m in models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for group in groups:
        cells = []
        count = ""
        for model in models:
            match = [
                r
                for r in rows
                if r["model"] == model
                and (r["value"] or "all") == group
                and r["group"] in ("all", "type")
            ]
            if match:
                count = match[0]["scored"]
                psnr = match[0][PSNR]  # empty when every image equals its ground truth
                psnr = f"{float(psnr):.2f}" if psnr else "∞"
                cells.append(f"{psnr} / {float(match[0][SSIM]):.4f}")
            else:
                cells.append("—")
        lines.append(f"| {group} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--bm3d", action="store_true", help="also run BM3D on the σ=25 set")
    args = parser.parse_args()
    sets = build_sets(args.photos, args.out / "sets")
    models = ["identity", *args.model]
    print(table(score(sets["single"], models, args.out / "eval-single"), models))
    gauss_models = models + (["bm3d"] if args.bm3d else [])
    print()
    print(table(score(sets["gauss25"], gauss_models, args.out / "eval-gauss25"), gauss_models))
    print()
    print(table(score(sets["clean"], models, args.out / "eval-clean"), models))


if __name__ == "__main__":
    main()
