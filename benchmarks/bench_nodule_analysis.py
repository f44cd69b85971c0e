"""The whole detector (`python -m p2ch.nodule_analysis`): its detection score, each lever's part in it, its time per CT.

1. Quality: generates a synthetic set with malignancy labels (or uses `--data-root`), trains the models on it
   at a fixed budget — the segmentation UNet with the default recipe (hard negatives, Dice + cross-entropy,
   one-cycle lr) and, for comparison, with the book's (nodule crops, Dice, constant lr), the nodule
   classifier, the malignancy classifier fine-tuned from it — with the settings printed, then runs
   `nodule_analysis --run-validation` once per ablation variant: every lever on (the default), then each
   lever off in turn, then the book's segmentation recipe, and last the pipeline as it was before the
   levers (the book's segmentation recipe, whole CT, one candidate per component at its density-weighted
   centre, no limit, one look). Per variant: the detection FROC/CPM with a bootstrap CI over the
   validation CTs, candidate recall (a kept candidate's centre within the nodule's radius, LUNA16's hit
   rule) by nodule size, kept candidates and false positives per CT, seconds per step per CT.
2. Speed: one CT of `--time-size`² × `--time-slices` (default 512 × 512 × 250, a typical chest CT) is
   analysed with the default models and settings (`--amp auto`: bfloat16 on a CPU with bf16 instructions,
   AVX512-BF16 or AMX, float32 on others), with `--no-lung-mask` (the whole CT segmented) and, on the CPU, in
   float32 (`--amp off`); the
   seconds of each step come from its analysis.json (median of `--repeats` runs) and the segmentation's
   slices/s from them.

    .venv/bin/python benchmarks/bench_nodule_analysis.py --work /tmp/bench-e2e     # ~45 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_nodule_analysis.py --work /tmp/bench-e2e --skip-training   # again, same models
    .venv/bin/python benchmarks/bench_nodule_analysis.py --work /tmp/e2e-smoke --smoke   # seconds: the GPU suite's

Prints the figures and one JSON line. GPU: `--device cuda --num-workers 8`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from p2ch import nodule_analysis, prepcache, seg_training, synth, training
from p2ch.candidates import read_annotations
from p2ch.segmetrics import candidate_hits

BOOK_SEG_RECIPE = ["--background-crops", "0", "--bce-weight", "0", "--lr-schedule", "constant", "--lr", "0.001"]
BEFORE_FLAGS = [
    "--no-lung-mask", "--no-split", "--candidate-centre", "density", "--max-candidates", "0", "--no-tta",
    "--surface-candidates", "0",
]  # fmt: skip
SIZE_BINS_MM = (0.0, 5.0, 10.0, 1000.0)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder for the data set, cache, models and outputs (kept)")
    parser.add_argument("--data-root", default=None, help="an existing LUNA16-format set instead of a synthetic one")
    parser.add_argument("--num-cts", type=int, default=24)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--nodules-per-ct", type=float, default=3.0)
    parser.add_argument("--candidates-per-ct", type=int, default=100)
    parser.add_argument("--synth-seed", type=int, default=7)
    parser.add_argument("--val-fraction", type=float, default=0.35)
    parser.add_argument("--seg-epochs", type=int, default=6)
    parser.add_argument("--seg-epoch-size", type=int, default=2048)
    parser.add_argument("--cls-epochs", type=int, default=8)
    parser.add_argument("--mal-epochs", type=int, default=4)
    parser.add_argument("--epoch-size", type=int, default=512)
    parser.add_argument("--cls-batch-size", type=int, default=8, help="the classifiers' --batch-size")
    parser.add_argument("--time-size", type=int, default=None, help="rows = columns of the timed CT (default 512)")
    parser.add_argument("--time-slices", type=int, default=None, help="slices of the timed CT (default 250)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, median kept (default 3; 1 with --smoke)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--skip-training", action="store_true", help="reuse the models under --work/models")
    parser.add_argument("--no-ablation", action="store_true", help="the default variant only (and the timing)")
    parser.add_argument(
        "--smoke", action="store_true",
        help="a 6-CT set, a few batches, no ablation, one timed run of a 96 x 96 x 48 CT unless --time-size/"
        "--time-slices/--repeats say otherwise (the GPU suite times a 512 x 512 x 256 CT so): seconds",
    )  # fmt: skip
    return parser


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} failed (exit {code})")


def _smoke(args: argparse.Namespace) -> None:
    args.num_cts, args.size, args.slices, args.candidates_per_ct = 6, 64, 32, 20
    args.seg_epochs, args.seg_epoch_size, args.cls_epochs, args.mal_epochs, args.epoch_size = 1, 32, 1, 1, 32
    args.time_size, args.time_slices = args.time_size or 96, args.time_slices or 48
    args.repeats, args.bootstrap, args.val_fraction = args.repeats or 1, 10, 0.34
    args.no_ablation = True


def _common(args: argparse.Namespace, work: Path, root: Path) -> list[str]:
    return [
        "--data-root", str(root), "--cache-dir", str(work / "cache"), "--runs-dir", str(work / "runs"),
        "--checkpoint-dir", str(work / "models"), "--num-workers", str(args.num_workers), "--device", args.device,
        "--val-fraction", str(args.val_fraction), "--images-every", "0", "--log-level", "WARNING",
    ]  # fmt: skip


def _timed(main, argv: list[str], what: str) -> float:
    started = time.perf_counter()
    _check(main(argv), what)
    return round(time.perf_counter() - started, 1)


def train_models(args: argparse.Namespace, work: Path, root: Path) -> dict[str, float]:
    """The segmentation model twice (default and book recipe), the nodule and the malignancy classifier."""
    fill = ["--data-root", str(root), "--cache-dir", str(work / "cache"), "--log-level", "WARNING"]
    workers = str(os.cpu_count() or 1)
    _check(prepcache.main([*fill, "--malignant", "--num-workers", workers]), "prepcache")
    _check(prepcache.main([*fill, "--segmentation", "--num-workers", workers]), "prepcache --segmentation")
    common = _common(args, work, root)
    seg = [*common, "--augmented", "--epochs", str(args.seg_epochs), "--epoch-size", str(args.seg_epoch_size)]
    seconds = {"segmentation": _timed(seg_training.main, [*seg, "seg"], "segmentation")}
    if not args.no_ablation:
        seconds["segmentation_book"] = _timed(seg_training.main, [*seg, *BOOK_SEG_RECIPE, "segbook"], "book recipe")
    # The classifiers: the default recipe (Adam, one-cycle lr 0.003, width 16) at batch 8, the README's choice for
    # short runs on a CPU (BENCHMARKS.md: more CPM per sample than batch 32 up to ~10,000 samples; this run has
    # 4,096). Before 2026-12-07 this benchmark trained them with Adam at a constant 1e-3, batch 16.
    recipe = ["--batch-size", str(args.cls_batch_size)]
    nodule = [*common, "--balanced", "--augmented", *recipe, "--epochs", str(args.cls_epochs),
              "--epoch-size", str(args.epoch_size), "nod"]  # fmt: skip
    seconds["nodule"] = _timed(training.main, nodule, "nodule classifier")
    mal = [*common, "--malignant", "--finetune", str(model_path(work, "nod")), "--finetune-depth", "2", "--augmented",
           *recipe, "--epochs", str(args.mal_epochs), "--epoch-size", str(args.epoch_size), "mal"]  # fmt: skip
    seconds["malignancy"] = _timed(training.main, mal, "malignancy classifier")
    return seconds


def model_path(work: Path, comment: str) -> Path:
    found = sorted((work / "models" / "p2ch").glob(f"*-{comment}/best.pt"))
    if not found:
        raise SystemExit(f"no {comment} model under {work / 'models'}; run without --skip-training")
    return found[-1]


def variants(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(name, segmentation model comment, extra nodule_analysis flags) of the ablation."""
    default = [("every lever (the default)", "seg", [])]
    if args.no_ablation:
        return default
    return [
        *default,
        ("one look per candidate (--no-tta)", "seg", ["--no-tta"]),
        ("no candidates from the lungs' surface (--surface-candidates 0)", "seg", ["--surface-candidates", "0"]),
        ("no limit on candidates (--max-candidates 0)", "seg", ["--max-candidates", "0"]),
        ("one candidate per component (--no-split)", "seg", ["--no-split"]),
        ("density-weighted centres", "seg", ["--candidate-centre", "density"]),
        ("whole CT, no lung rule (--no-lung-mask)", "seg", ["--no-lung-mask"]),
        ("float32 (--amp off)", "seg", ["--amp", "off"]),
        ("the book's segmentation recipe", "segbook", []),
        ("before: the book's recipe, none of the levers", "segbook", BEFORE_FLAGS),
    ]


def recall_by_size(out: Path, uids: list[str], root: Path) -> dict[str, float]:
    """Candidate recall (LUNA16's hit rule) of the kept candidates in submission.csv, overall, ≥ 5 mm and by size."""
    submission = pd.read_csv(out / "submission.csv")
    annotations = read_annotations(root / "annotations.csv")
    annotations = annotations[annotations["seriesuid"].isin(uids)]
    found, diameters, fps = [], [], 0
    for uid in uids:
        mine = annotations[annotations["seriesuid"] == uid]
        kept = submission[submission["seriesuid"] == uid][["coordX", "coordY", "coordZ"]].to_numpy()
        hits = candidate_hits(kept, mine[["coordX", "coordY", "coordZ"]].to_numpy(), mine["diameter_mm"].to_numpy())
        found.append(hits.found)
        diameters.append(mine["diameter_mm"].to_numpy())
        fps += hits.fp_components
    found, diameters = np.concatenate(found), np.concatenate(diameters)
    result = {"recall": float(found.mean()), "recall_5mm": float(found[diameters >= 5].mean())}
    for low, high in itertools.pairwise(SIZE_BINS_MM):
        inside = (diameters >= low) & (diameters < high)
        result[f"recall_{low:g}-{high:g}mm"] = float(found[inside].mean()) if inside.any() else None  # JSON: null
        result[f"nodules_{low:g}-{high:g}mm"] = int(inside.sum())
    result["candidates_per_ct"] = len(submission) / len(uids)
    result["fp_per_ct"] = fps / len(uids)
    return result


def validate(args: argparse.Namespace, work: Path, root: Path, name: str, seg: str, extra: list[str]) -> dict:
    out = work / "ablation" / name.split(" (")[0].replace(" ", "-").replace(":", "").replace(",", "")[:40]
    argv = ["--run-validation", "--segmentation-path", str(model_path(work, seg)),
            "--classification-path", str(model_path(work, "nod")), "--malignancy-path", str(model_path(work, "mal")),
            "--data-root", str(root), "--out", str(out), "--runs-dir", str(work / "runs"), "--device", args.device,
            "--no-progress", "--log-level", "WARNING", "--no-pictures", "--mask-format", "none",
            "--bootstrap", str(args.bootstrap), *extra]  # fmt: skip
    seconds = _timed(nodule_analysis.main, argv, f"nodule_analysis --run-validation ({name})")
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    uids = [p.parent.name for p in sorted((out / "validation").glob("*/analysis.json"))]
    steps = [json.loads((out / "validation" / uid / "analysis.json").read_text())["seconds"] for uid in uids]
    per_step = {step: round(statistics.mean(s.get(step, 0.0) for s in steps), 3) for step in nodule_analysis.STEPS}
    tables = [pd.read_csv(out / "validation" / uid / "components.csv") for uid in uids]
    surface = sum(int((t["kept"] & (t["found_by"] == "lung surface")).sum()) for t in tables) / max(len(uids), 1)
    return {
        "name": name, "flags": extra, "segmentation": seg, "scans": metrics["scans"], "froc": metrics["froc"],
        "operating_point": metrics["operating_point"], "suggested_threshold": metrics["suggested_threshold"],
        "precision": metrics["precision"], "confusion": metrics["confusion"],
        "candidates": {**recall_by_size(out / "validation", uids, root), "surface_per_ct": surface},
        "seconds_per_ct": per_step, "seconds": seconds,
    }  # fmt: skip


def time_one_ct(args: argparse.Namespace, work: Path) -> dict:
    big = work / "big"
    if not (big / "annotations.csv").is_file():
        synth.generate(big, num_cts=1, size=args.time_size, slices=args.time_slices, nodules_per_ct=3,
                       candidates_per_ct=50, seed=3, workers=1)  # fmt: skip
    (mhd,) = big.glob("subset*/*.mhd")
    models = ["--segmentation-path", str(model_path(work, "seg")), "--classification-path",
              str(model_path(work, "nod")), "--malignancy-path", str(model_path(work, "mal"))]  # fmt: skip
    timings = {}
    looks = [("lungs", []), ("whole CT", ["--no-lung-mask"])]
    if args.device == "cpu":  # --amp auto: bf16 on a CPU with bf16 instructions (float32 elsewhere, and here)
        looks.append(("lungs, float32 (--amp off)", ["--amp", "off"]))
    for label, extra in looks:
        runs = []
        for k in range(args.repeats):
            out = work / f"analysis-time-{label.replace(' ', '-')}-{k}"
            argv = [str(mhd), *models, "--out", str(out), "--device", args.device, "--no-progress",
                    "--log-level", "WARNING", "--no-pictures", *extra]  # fmt: skip
            started = time.perf_counter()
            _check(nodule_analysis.main(argv), "nodule_analysis (timing)")
            total = time.perf_counter() - started
            summary = json.loads((out / mhd.stem / "analysis.json").read_text())
            runs.append({**summary["seconds"], "total_command": total, **summary["counts"]})
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        median["segmentation_slices_per_s"] = args.time_slices / median["segmentation"]
        median["shape_irc"] = summary["ct"]["shape_irc"]
        median["precision"] = summary["precision"]
        timings[label] = median
    return timings


def print_ablation(results: list[dict]) -> None:
    print(
        "variant | CPM [95% CI] | recall (≥ 5 mm) | < 5 / 5-10 / ≥ 10 mm | candidates/CT (from the surface) | FP/CT | "
        "at --nodule-threshold: found, FP per nodule | s/CT"
    )
    for r in results:
        f, c, point = r["froc"], r["candidates"], r["operating_point"]
        found = "–" if point["sensitivity"] is None else f"{point['sensitivity']:.0%}, {point['fps_per_nodule']:.2f}"
        recalls = [c[k] for k in c if k.startswith("recall_") and "mm" in k and k != "recall_5mm"]
        bins = " / ".join("–" if value is None else f"{value:.2f}" for value in recalls)
        print(
            f"{r['name']} | {f['cpm']:.3f} [{f['cpm_ci'][0]:.3f}, {f['cpm_ci'][1]:.3f}] | {c['recall']:.3f} "
            f"({c['recall_5mm']:.3f}) | {bins} | {c['candidates_per_ct']:.1f} ({c['surface_per_ct']:.1f}) | "
            f"{c['fp_per_ct']:.1f} | {found} | {sum(r['seconds_per_ct'].values()):.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.smoke:
        _smoke(args)
    args.time_size, args.time_slices, args.repeats = args.time_size or 512, args.time_slices or 250, args.repeats or 3
    work = Path(args.work)
    root = Path(args.data_root) if args.data_root else work / "luna"
    if not (root / "annotations.csv").is_file():
        synth.generate(root, num_cts=args.num_cts, size=args.size, slices=args.slices,
                       nodules_per_ct=args.nodules_per_ct, candidates_per_ct=args.candidates_per_ct,
                       seed=args.synth_seed, workers=os.cpu_count() or 1)  # fmt: skip
    training_seconds = {} if args.skip_training else train_models(args, work, root)
    print(f"training seconds: {training_seconds}")
    results = [validate(args, work, root, *variant) for variant in variants(args)]
    print_ablation(results)
    print(f"{results[0]['name']}, in {results[0]['precision']}:")
    print(nodule_analysis.format_confusion(results[0]["confusion"]))
    print(nodule_analysis.suggestion_text(results[0]["suggested_threshold"]))
    timing = time_one_ct(args, work)
    for label, median in timing.items():
        print(
            f"one CT {median['shape_irc']} ({label}, {median['precision']}):",
            {k: round(v, 2) for k, v in median.items() if k not in ("shape_irc", "precision")},
        )
    record = {
        "bench": "nodule_analysis",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "settings": vars(args),
        "training_seconds": training_seconds,
        "ablation": results,
        "one_ct": timing,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
