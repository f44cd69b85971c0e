"""Steady-state training throughput of `p2ch.training.LunaTrainingApp` (balanced + augmented).

For every combination of --batch-sizes × --workers × --amp × --channels-last × --timing it builds
the app, runs one warm-up epoch of --warmup-batches (worker start, cuDNN autotuning, allocator),
then one timed epoch, and prints samples/s and the fraction of the time spent waiting for data.
The data set is a synthetic LUNA16-format set made (and its cache prefilled) in a temporary folder
unless --data-root and --cache-dir point at an existing, prefilled one.

--timing epoch (default): the timed epoch is sized by the sampler (--epoch-size = --batches ×
batch size), so it ends as a real epoch ends; its clock starts when the first batch arrives
(`EpochResult.steady_seconds`), and the loader's start-up before it (restarting the persistent
workers, which first drain what they prefetched for the cut warm-up epoch, and loading the first
batch) is reported apart as "start-up". --timing early-stop: the old measurement, kept to compare:
the timed epoch is cut after --batches batches of a longer epoch and timed from its `iter()`, so the
drain of the warm-up's prefetched batches lands inside the timed epoch and inside its data wait.
"vs wall" checks the figure against an independent clock around the whole timed `train_epoch`
call: the reported samples/s over samples / (that wall time - start-up); 1.000 means they agree.

Examples:
    python benchmarks/bench_training.py --device cpu --batch-sizes 32 --workers 2 --batches 8
    python benchmarks/bench_training.py --device cpu --timing epoch early-stop   # the two timings side by side
    python benchmarks/bench_training.py --device cpu --model-width 16             # p2ch.training's default model
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
    timing: str = "epoch",
    val_fraction: float = 0.1,
    model_width: int = 8,
) -> dict:
    """One setting: build the app, a warm-up epoch cut after `warmup` batches, then the timed epoch."""
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
        # epoch: the timed epoch is exactly `batches` batches; early-stop: the old, longer epoch, cut.
        epoch_size=batch * batches if timing == "epoch" else batch * (warmup + batches),
        max_train_batches=warmup,
        runs_dir=str(tmp / "runs"),
        checkpoint_dir=str(tmp / "models"),
        val_fraction=val_fraction,
        model_width=model_width,
    )
    app = LunaTrainingApp(config)
    try:
        app.train_epoch(1)  # warm-up: worker start, cuDNN autotuning, allocator
        timed_batches = None if timing == "epoch" else batches
        app.config = TrainingConfig(**{**config.__dict__, "max_train_batches": timed_batches})
        return timed_epoch(app, 2, timing) | {
            "batch_size": batch,
            "num_workers": workers,
            "amp": amp,
            "channels_last": channels_last,
            "model_width": model_width,
        }
    finally:
        app.close()


def timed_epoch(app, epoch: int, timing: str = "epoch") -> dict:
    """Run training epoch `epoch` of `app` and report its speed, as --timing says (see the module doc).

    Returns device, timing, samples, seconds (the timed span), startup_seconds (before the first
    batch; 0 for early-stop, which times from iter()), samples_per_sec, data_wait_fraction, and the
    check: wall_seconds (an independent clock around the whole `train_epoch` call, which returns
    after the epoch's last step has finished on the device) and wall_agreement (samples_per_sec
    over samples / (wall_seconds - startup_seconds); 1.0 when the figure is the epoch's own).
    """
    started = time.perf_counter()
    out = app.train_epoch(epoch)
    wall = time.perf_counter() - started
    if timing == "epoch":
        seconds, startup = out.steady_seconds, out.startup_seconds
        rate, wait = out.steady_samples_per_sec, out.steady_data_wait_fraction
    else:
        seconds, startup, rate, wait = out.seconds, 0.0, out.samples_per_sec, out.data_wait_fraction
    wall_rate = out.count / (wall - startup) if wall > startup else float("nan")
    return {
        "device": str(app.device),
        "timing": timing,
        "samples": out.count,
        "seconds": round(seconds, 3),
        "startup_seconds": round(startup, 3),
        "samples_per_sec": round(rate, 1),
        "data_wait_fraction": round(wait, 3),
        "wall_seconds": round(wall, 3),
        "wall_agreement": round(rate / wall_rate, 3),
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
    parser.add_argument(
        "--model-width",
        type=int,
        default=8,
        help="LunaModel's width: 8, the book's model, so that figures compare with the book's code (p2ch.training's "
        "default is 16, about 2.1x the CPU time per sample)",
    )
    parser.add_argument("--synth-cts", type=int, default=4)
    parser.add_argument("--synth-candidates", type=int, default=400, help="candidates per synthetic CT")
    parser.add_argument(
        "--timing",
        nargs="+",
        default=["epoch"],
        choices=("epoch", "early-stop"),
        help="epoch: a sampler-sized epoch timed from its first batch; early-stop: the old cut epoch, to compare",
    )
    args = parser.parse_args(argv)
    if args.batches < 1 or args.warmup < 1 or min(args.batch_sizes) < 1:
        parser.error("--batches, --warmup-batches and --batch-sizes must be ≥ 1")
    logging.basicConfig(level=logging.WARNING)
    # cuDNN autotuning: on, set by the app through p2ch.runtime.configure_backends (TrainingConfig's default).
    with tempfile.TemporaryDirectory(prefix="p2ch-bench-training-") as tmp_name:
        tmp = Path(tmp_name)
        data, cache = prepare(args, tmp)
        print(
            f"{'device':>8} {'batch':>6} {'workers':>7} {'amp':>5} {'ch-last':>7} {'timing':>10} {'samples/s':>10} "
            f"{'data wait':>9} {'start-up':>8} {'vs wall':>7}"
        )
        grid = itertools.product(args.batch_sizes, args.workers, args.amp, args.channels_last, args.timing)
        for batch, workers, amp, cl, timing in grid:
            row = measure(
                data, cache, args.device, batch, workers, amp, cl, args.batches, args.warmup, tmp, timing,
                model_width=args.model_width,
            )  # fmt: skip
            print(
                f"{row['device']:>8} {batch:>6} {workers:>7} {amp:>5} {cl:>7} {timing:>10} "
                f"{row['samples_per_sec']:>10.1f} {100 * row['data_wait_fraction']:>8.0f}% "
                f"{row['startup_seconds']:>7.2f}s {row['wall_agreement']:>7.3f}"
            )
            print(json.dumps({"bench": "training", **row}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
