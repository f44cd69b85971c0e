"""The end-to-end analysis (`python -m p2ch.nodule_analysis`): its detection score and its time per CT.

1. Quality: generates a synthetic set with malignancy labels (or uses `--data-root`), trains the three
   models on it — the segmentation UNet, the nodule classifier, the malignancy classifier fine-tuned from
   it — with the settings printed, then runs `nodule_analysis --run-validation`: the whole detector's
   FROC/CPM with a bootstrap CI over the validation CTs and the book's confusion matrix.
2. Speed: one CT of `--time-size`² × `--time-slices` (default 512 × 512 × 250, a typical chest CT) is
   analysed with the same models; the seconds of each step (segmentation, grouping, classification,
   malignancy) come from its analysis.json (median of `--repeats` runs).

    .venv/bin/python benchmarks/bench_nodule_analysis.py --work /tmp/bench-e2e     # ~20 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_nodule_analysis.py --work /tmp/bench-e2e --skip-training   # step 2 again

Prints the figures and one JSON line. GPU: `--device cuda --num-workers 8`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from p2ch import nodule_analysis, prepcache, seg_training, synth, training


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder for the data set, cache, models and outputs (kept)")
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
    parser.add_argument("--time-size", type=int, default=512)
    parser.add_argument("--time-slices", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--skip-training", action="store_true", help="reuse the models under --work/models")
    return parser


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} failed (exit {code})")


def _common(args: argparse.Namespace, work: Path, root: Path) -> list[str]:
    return [
        "--data-root", str(root), "--cache-dir", str(work / "cache"), "--runs-dir", str(work / "runs"),
        "--checkpoint-dir", str(work / "models"), "--num-workers", str(args.num_workers), "--device", args.device,
        "--val-fraction", str(args.val_fraction), "--images-every", "0", "--log-level", "WARNING",
    ]  # fmt: skip


def train_models(args: argparse.Namespace, work: Path, root: Path) -> dict[str, float]:
    """The three models, one after the other; returns the seconds each took."""
    seconds = {}
    fill = ["--data-root", str(root), "--cache-dir", str(work / "cache"), "--log-level", "WARNING"]
    _check(prepcache.main([*fill, "--malignant", "--num-workers", str(os.cpu_count() or 1)]), "prepcache")
    _check(prepcache.main([*fill, "--segmentation", "--num-workers", str(os.cpu_count() or 1)]), "prepcache --seg")
    common = _common(args, work, root)
    runs = {
        "segmentation": (seg_training.main, [*common, "--augmented", "--epochs", str(args.seg_epochs),
                                             "--epoch-size", str(args.seg_epoch_size), "seg"]),
        "nodule": (training.main, [*common, "--balanced", "--augmented", "--optimizer", "adam", "--lr", "1e-3",
                                   "--batch-size", "16", "--epochs", str(args.cls_epochs), "--epoch-size",
                                   str(args.epoch_size), "nod"]),
    }  # fmt: skip
    for name, (main, argv) in runs.items():
        started = time.perf_counter()
        _check(main(argv), name)
        seconds[name] = round(time.perf_counter() - started, 1)
    (nodule,) = (work / "models" / "p2ch").glob("*-nod/best.pt")
    mal = [*common, "--malignant", "--finetune", str(nodule), "--finetune-depth", "2", "--augmented",
           "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "16", "--epochs", str(args.mal_epochs),
           "--epoch-size", str(args.epoch_size), "mal"]  # fmt: skip
    started = time.perf_counter()
    _check(training.main(mal), "malignancy")
    seconds["malignancy"] = round(time.perf_counter() - started, 1)
    return seconds


def validate(args: argparse.Namespace, work: Path, root: Path) -> dict:
    out = work / "analysis-validation"
    argv = ["--run-validation", "--models-dir", str(work / "models"), "--data-root", str(root), "--out", str(out),
            "--runs-dir", str(work / "runs"), "--device", args.device, "--no-progress", "--log-level", "WARNING",
            "--no-pictures"]  # fmt: skip
    started = time.perf_counter()
    _check(nodule_analysis.main(argv), "nodule_analysis --run-validation")
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return metrics


def time_one_ct(args: argparse.Namespace, work: Path) -> dict:
    big = work / "big"
    if not (big / "annotations.csv").is_file():
        synth.generate(big, num_cts=1, size=args.time_size, slices=args.time_slices, nodules_per_ct=3,
                       candidates_per_ct=50, seed=3, workers=1)  # fmt: skip
    (mhd,) = big.glob("subset*/*.mhd")
    runs = []
    for k in range(args.repeats):
        out = work / f"analysis-time-{k}"
        argv = [str(mhd), "--models-dir", str(work / "models"), "--out", str(out), "--device", args.device,
                "--no-progress", "--log-level", "WARNING", "--no-pictures"]  # fmt: skip
        started = time.perf_counter()
        _check(nodule_analysis.main(argv), "nodule_analysis (timing)")
        total = time.perf_counter() - started
        summary = json.loads((out / mhd.stem / "analysis.json").read_text())
        runs.append({**summary["seconds"], "total_command": total, **summary["counts"]})
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    median["shape_irc"] = summary["ct"]["shape_irc"]
    return median


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    work = Path(args.work)
    root = work / "luna"
    if not (root / "annotations.csv").is_file():
        synth.generate(root, num_cts=args.num_cts, size=args.size, slices=args.slices,
                       nodules_per_ct=args.nodules_per_ct, candidates_per_ct=args.candidates_per_ct,
                       seed=args.synth_seed, workers=os.cpu_count() or 1)  # fmt: skip
    training_seconds = {} if args.skip_training else train_models(args, work, root)
    metrics = validate(args, work, root)
    froc = metrics["froc"]
    print(f"training seconds: {training_seconds}")
    print(
        f"validation: {metrics['scans']} CTs, {froc['num_nodules']} nodules; detection CPM {froc['cpm']:.3f} "
        f"[{froc['cpm_ci'][0]:.3f}, {froc['cpm_ci'][1]:.3f}]; nodules hit by a component: {froc['num_detected']}"
    )
    print(nodule_analysis.format_confusion(metrics["confusion"]))
    timing = time_one_ct(args, work)
    print("one CT", timing["shape_irc"], {k: round(v, 2) for k, v in timing.items() if k != "shape_irc"})
    record = {
        "benchmark": "nodule_analysis",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "settings": vars(args),
        "training_seconds": training_seconds,
        "validation": {
            "scans": metrics["scans"],
            "froc": froc,
            "confusion": metrics["confusion"],
            "seconds": metrics["seconds"],
        },
        "one_ct": timing,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
