"""Steady-state training throughput of `p2ch.training.LunaTrainingApp` (balanced + augmented).

For every combination of --batch-sizes × --workers × --amp × --channels-last it builds the app,
runs one warm-up epoch of --warmup-batches, then one timed epoch of --batches, and prints
samples/s and the fraction of the time spent waiting for data. The data set is a synthetic
LUNA16-format set made (and its cache prefilled) in a temporary folder unless --data-root and
--cache-dir point at an existing, prefilled one.

Examples:
    python benchmarks/bench_training.py --device cpu --batch-sizes 32 --workers 2 --batches 8
    python benchmarks/bench_training.py --device cuda --batch-sizes 32 256 1024 --workers 4 8 16 \
        --amp off bf16 --channels-last off on        # the issue's GPU grid
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    if args.data_root:
        return Path(args.data_root), Path(args.cache_dir or tmp / "cache")
    from p2ch.prepcache import main as prepcache_main
    from p2ch.synth import generate

    data = tmp / "luna"
    started = time.perf_counter()
    generate(
        data,
        num_cts=args.synth_cts,
        size=256,
        slices=128,
        candidates_per_ct=args.synth_candidates,
        nodules_per_ct=3,
        seed=0,
    )
    cache = tmp / "cache"
    rc = prepcache_main(["--data-root", str(data), "--cache-dir", str(cache), "--num-workers", str(max(args.workers))])
    if rc != 0:
        raise SystemExit(f"prefill failed ({rc})")
    print(f"# synthetic set and cache ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return data, cache


def measure(
    data: Path,
    cache: Path,
    device: str,
    batch: int,
    workers: int,
    amp: str,
    channels_last: str,
    batches: int,
    warmup: int,
    tmp: Path,
) -> dict:
    from p2ch.training import LunaTrainingApp, TrainingConfig

    config = TrainingConfig(
        comment="bench",
        data_root=str(data),
        cache_dir=str(cache),
        balanced=True,
        augmented=True,
        batch_size=batch,
        num_workers=workers,
        epochs=2,
        amp=amp,
        channels_last=channels_last,
        device=device,
        epoch_size=batch * (warmup + batches),
        max_train_batches=warmup,
        runs_dir=str(tmp / "runs"),
        checkpoint_dir=str(tmp / "models"),
        val_fraction=0.1,
    )
    app = LunaTrainingApp(config)
    try:
        app.train_epoch(1)  # warm-up: worker start, cuDNN autotuning, allocator
        app.config = TrainingConfig(**{**config.__dict__, "max_train_batches": batches})
        out = app.train_epoch(2)
    finally:
        app.close()
    return {
        "device": str(app.device),
        "batch_size": batch,
        "num_workers": workers,
        "amp": amp,
        "channels_last": channels_last,
        "samples": out.count,
        "seconds": round(out.seconds, 3),
        "samples_per_sec": round(out.count / out.seconds, 1),
        "data_wait_fraction": round(out.data_wait_seconds / out.seconds, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--amp", nargs="+", default=["auto"], choices=("auto", "off", "bf16", "fp16"))
    parser.add_argument("--channels-last", nargs="+", default=["on"], choices=("on", "off"))
    parser.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    parser.add_argument("--warmup-batches", dest="warmup", type=int, default=2)
    parser.add_argument("--data-root", default=None, help="existing data set (default: make a synthetic one)")
    parser.add_argument("--cache-dir", default=None, help="its prefilled cache")
    parser.add_argument("--synth-cts", type=int, default=4)
    parser.add_argument("--synth-candidates", type=int, default=400, help="candidates per synthetic CT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="p2ch-bench-training-") as tmp_name:
        tmp = Path(tmp_name)
        data, cache = prepare(args, tmp)
        print(f"{'device':>8} {'batch':>6} {'workers':>7} {'amp':>5} {'ch-last':>7} {'samples/s':>10} {'data wait':>9}")
        for batch, workers, amp, cl in itertools.product(args.batch_sizes, args.workers, args.amp, args.channels_last):
            row = measure(data, cache, args.device, batch, workers, amp, cl, args.batches, args.warmup, tmp)
            print(
                f"{row['device']:>8} {batch:>6} {workers:>7} {amp:>5} {cl:>7} {row['samples_per_sec']:>10.1f} "
                f"{100 * row['data_wait_fraction']:>8.0f}%"
            )
            print(json.dumps({"bench": "training", **row}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
