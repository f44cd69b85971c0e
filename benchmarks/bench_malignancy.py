"""Malignancy classifier: fine-tuned from the nodule classifier (--finetune-depth 1, 2) vs trained from scratch.

Generates a synthetic set with `annotations_with_malignancy.csv` in a temporary folder (removed
afterwards; or uses `--data-root`), trains a nodule classifier on it (or takes `--nodule-checkpoint`),
then trains the malignancy classifier once per variant with the same recipe and the same number of
samples seen — from scratch, and fine-tuned at each `--depths` — and scores each run's best.pt with
`python -m p2ch.evaluate --task malignancy` on the validation nodules: AUC with its 95 % bootstrap CI,
sensitivity/specificity at 0.5, and how many benign/malignant nodules validation holds. Prints a
table, then one JSON line.

    .venv/bin/python benchmarks/bench_malignancy.py                      # ~15 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_malignancy.py --num-cts 20 --mal-epochs 4 --depths 1

Every run uses the same seed, split (by series, --val-fraction), balanced 1:1 sampling, augmentation
and optimizer, so the variants differ only in their starting weights and which blocks train.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from p2ch import evaluate, prepcache, synth, training


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None, help="an existing synthetic set (default: generate one)")
    parser.add_argument("--num-cts", type=int, default=40)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--nodules-per-ct", type=float, default=6.0)
    parser.add_argument("--candidates-per-ct", type=int, default=60)
    parser.add_argument("--synth-seed", type=int, default=21)
    parser.add_argument("--val-fraction", type=float, default=0.35)
    parser.add_argument("--nodule-checkpoint", default=None, help="skip training the nodule classifier")
    parser.add_argument("--nodule-epochs", type=int, default=8)
    parser.add_argument("--mal-epochs", type=int, default=8)
    parser.add_argument("--epoch-size", type=int, default=512, help="training samples per epoch (all runs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2], help="fine-tuning depths to compare")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto (training and evaluation)")
    parser.add_argument("--work", default=None, help="keep runs here (default: a temporary folder, removed)")
    return parser


def _common(args: argparse.Namespace, root: Path, work: Path, epochs: int) -> list[str]:
    return [
        "--data-root", str(root), "--cache-dir", str(work / "cache"), "--runs-dir", str(work / "runs"),
        "--checkpoint-dir", str(work / "models"), "--num-workers", str(args.num_workers),
        "--batch-size", str(args.batch_size), "--optimizer", "adam", "--lr", str(args.lr), "--augmented",
        "--epochs", str(epochs), "--epoch-size", str(args.epoch_size), "--val-fraction", str(args.val_fraction),
        "--images-every", "0", "--device", args.device, "--log-level", "WARNING",
    ]  # fmt: skip


def _train(argv: list[str], work: Path, comment: str) -> tuple[Path, float]:
    started = time.perf_counter()
    if training.main([*argv, comment]) != 0:
        raise SystemExit(f"training {comment} failed")
    (run,) = [p for p in (work / "models" / "p2ch").iterdir() if p.name.endswith(f"-{comment}")]
    return run / "best.pt", time.perf_counter() - started


def _evaluate(checkpoint: Path, work: Path, name: str, device: str) -> dict:
    out = work / "eval" / name
    argv = ["--task", "malignancy", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress"]
    if evaluate.main([*argv, "--log-level", "WARNING", "--num-workers", "0", "--device", device]) != 0:
        raise SystemExit(f"evaluating {name} failed")
    return json.loads((out / "metrics.json").read_text())


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    root = Path(args.data_root) if args.data_root else work / "luna"
    if not args.data_root:
        synth.generate(
            root, num_cts=args.num_cts, size=args.size, slices=args.slices, nodules_per_ct=args.nodules_per_ct,
            candidates_per_ct=args.candidates_per_ct, seed=args.synth_seed, workers=os.cpu_count() or 1,
        )  # fmt: skip
    fill = ["--data-root", str(root), "--cache-dir", str(work / "cache"), "--malignant", "--log-level", "WARNING"]
    if prepcache.main([*fill, "--num-workers", str(os.cpu_count() or 1)]) != 0:
        raise SystemExit("prefilling the cache failed")
    nodule = Path(args.nodule_checkpoint) if args.nodule_checkpoint else None
    if nodule is None:
        argv = [*_common(args, root, work, args.nodule_epochs), "--balanced"]
        nodule, seconds = _train(argv, work, "nodule")
        print(f"nodule classifier: {nodule} ({seconds:.0f} s)", flush=True)
    variants = [("scratch", [])] + [(f"finetune-depth-{d}", ["--finetune", str(nodule), "--finetune-depth", str(d)])
                                    for d in args.depths]  # fmt: skip
    results = []
    for name, extra in variants:
        argv = [*_common(args, root, work, args.mal_epochs), "--malignant", *extra]
        best, seconds = _train(argv, work, name)
        metrics = _evaluate(best, work, name, args.device)
        mal = metrics["malignancy"]
        results.append(
            {
                "variant": name,
                "auc": mal["auc"],
                "auc_ci": mal["auc_ci"],
                "sensitivity": mal["sensitivity"],
                "specificity": mal["specificity"],
                "val_malignant": mal["malignant"],
                "val_benign": mal["benign"],
                "best_epoch": metrics["checkpoint"]["epoch"],
                "samples_seen": args.mal_epochs * args.epoch_size,
                "train_seconds": round(seconds, 1),
            }
        )
        print(_row(results[-1]), flush=True)
    return results


def _row(r: dict) -> str:
    low, high = r["auc_ci"]
    return (
        f"{r['variant']:<20} AUC {r['auc']:.3f} [{low:.3f}, {high:.3f}]  sens {r['sensitivity']:.2f} "
        f"spec {r['specificity']:.2f}  best epoch {r['best_epoch']}  val {r['val_malignant']} malignant / "
        f"{r['val_benign']} benign  {r['samples_seen']} samples in {r['train_seconds']:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="p2ch-bench-mal-"))
    try:
        results = run(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "malignancy",
                "date": datetime.date.today().isoformat(),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                "settings": {k: v for k, v in vars(args).items() if k != "work"},
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
