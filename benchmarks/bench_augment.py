"""Augmentation throughput (samples/s): batched `p2ch.augment` against a per-sample CPU loop.

Times `augment_batch` on (N, 1, 32, 48, 48) float32 HU batches, for the book's `--augmented`
config and for flips only, on the chosen device (CUDA is synchronised around every timed
call). For comparison it times the book's way in the same run: one chunk at a time on the
CPU, one `affine_grid` + `grid_sample` (and noise) per sample with a batch of 1, as each
DataLoader worker does it, with torch on one thread as in a worker. A machine with W such
workers gets at most about W times that rate; the speed-up printed is per worker.

    .venv/bin/python benchmarks/bench_augment.py --device cpu --batch-sizes 256 1024 --repeats 3
    .venv/bin/python benchmarks/bench_augment.py --device cuda --batch-sizes 256 1024 4096 --repeats 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from p2ch.augment import AugmentConfig, augment_batch
from p2ch.errors import ConfigError, P2chError

SHAPE_IRC = (32, 48, 48)
CONFIGS = {"book": AugmentConfig.book(), "flip": AugmentConfig(flip=True)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: cpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch size (after one warm-up)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="batch dtype for the batched runs",
    )
    parser.add_argument(
        "--baseline-samples", type=int, default=256, help="samples timed for the per-sample CPU loop (0 skips it)"
    )
    parser.add_argument(
        "--baseline-threads",
        type=int,
        default=1,
        help="torch threads for the per-sample loop (1, as in a DataLoader worker)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_batch(n: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(n, 1, 32, 48, 48) HU-like values: lung (-850) with a soft +100 HU ball and some texture."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in SHAPE_IRC]
    i, r, c = torch.meshgrid(*axes, indexing="ij")
    ball = (6.5 - torch.sqrt(i**2 + r**2 + c**2)).clamp(0, 1) * 950 - 850
    one = ball.expand(1, 1, *SHAPE_IRC)
    batch = one + 30 * torch.randn((n, 1, *SHAPE_IRC), generator=g)
    return batch.to(device=device, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batched(config: AugmentConfig, batch: torch.Tensor, repeats: int, seed: int) -> list[float]:
    generator = torch.Generator(device=batch.device).manual_seed(seed)
    timings = []
    for k in range(repeats + 1):
        sync(batch.device)
        start = time.perf_counter()
        out = augment_batch(batch, config, generator=generator)
        sync(batch.device)
        if k:  # the first call is the warm-up
            timings.append(time.perf_counter() - start)
        del out
    return timings


def book_style_matrix(config: AugmentConfig, rng: random.Random) -> torch.Tensor:
    """One (1, 3, 4) random matrix for one sample, built with Python floats as a worker would."""
    transform = torch.eye(4)
    for axis in range(3):
        if config.flip and rng.random() > 0.5:
            transform[axis, axis] *= -1
        if config.offset:
            transform[axis, 3] = config.offset * (rng.random() * 2 - 1)
        if config.scale:
            transform[axis, axis] *= 1.0 + config.scale * (rng.random() * 2 - 1)
    if config.rotate:
        angle = rng.random() * 2 * math.pi
        cos, sin = math.cos(angle), math.sin(angle)
        rotation = torch.tensor([[cos, -sin, 0, 0], [sin, cos, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        transform = rotation @ transform
    return transform[:3].unsqueeze(0)


def time_per_sample(config: AugmentConfig, chunks: torch.Tensor, seed: int, threads: int) -> float:
    """Seconds for augmenting `chunks` one at a time on the CPU (batch of 1 each, float32)."""
    rng = random.Random(seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        for k in range(chunks.shape[0]):
            chunk = chunks[k : k + 1]
            theta = book_style_matrix(config, rng)
            grid = F.affine_grid(theta, list(chunk.shape), align_corners=False)
            out = F.grid_sample(chunk, grid, padding_mode="border", align_corners=False)
            if config.noise:
                out = out + torch.randn_like(out) * config.noise
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"--device {args.device}: expected cpu, cuda or cuda:K")
        if args.repeats < 1 or min(args.batch_sizes) < 1:
            raise ConfigError("--repeats and --batch-sizes must be at least 1")
    except (P2chError, RuntimeError) as exc:
        print(f"bench_augment: {exc}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    print(
        f"device {device} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"chunk {SHAPE_IRC} {args.dtype}",
        flush=True,
    )

    results = []
    for batch_size in args.batch_sizes:
        batch = make_batch(batch_size, device, dtype, args.seed)
        for name, config in CONFIGS.items():
            timings = time_batched(config, batch, args.repeats, args.seed)
            rate = batch_size * len(timings) / sum(timings)
            results.append(
                {
                    "config": name,
                    "batch_size": batch_size,
                    "repeats": args.repeats,
                    "call_s": [round(t, 4) for t in timings],
                    "samples_per_s": round(rate, 1),
                    "best_samples_per_s": round(batch_size / min(timings), 1),
                }
            )
            print(
                f"  batched {name:>4}  batch {batch_size:>5}: {rate:>10.1f} samples/s "
                f"(median call {sorted(timings)[len(timings) // 2] * 1000:.1f} ms)",
                flush=True,
            )
        del batch

    baseline = {}
    if args.baseline_samples > 0:
        chunks = make_batch(args.baseline_samples, torch.device("cpu"), torch.float32, args.seed)
        for name, config in CONFIGS.items():
            warm_up = chunks[: min(8, len(chunks))]
            time_per_sample(config, warm_up, args.seed, args.baseline_threads)
            seconds = time_per_sample(config, chunks, args.seed, args.baseline_threads)
            baseline[name] = {
                "samples": len(chunks),
                "seconds": round(seconds, 3),
                "samples_per_s": round(len(chunks) / seconds, 1),
            }
            print(
                f"  per-sample {name:>4} (CPU, {args.baseline_threads} thread): "
                f"{len(chunks) / seconds:>10.1f} samples/s",
                flush=True,
            )

    print(f"\n{'config':>6} {'batch':>6} {'samples/s':>11} {'per-sample/s':>13} {'speed-up':>9}")
    for r in results:
        base = baseline.get(r["config"], {}).get("samples_per_s")
        r["speedup_vs_per_sample"] = round(r["samples_per_s"] / base, 2) if base else None
        print(
            f"{r['config']:>6} {r['batch_size']:>6} {r['samples_per_s']:>11.1f} "
            f"{base if base else '-':>13} {r['speedup_vs_per_sample'] or '-':>9}"
        )
    record = {
        "bench": "augment",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "shape_irc": list(SHAPE_IRC),
        "configs": {name: config.to_dict() for name, config in CONFIGS.items()},
        "results": results,
        "per_sample_cpu": {"threads": args.baseline_threads, **baseline},
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
