"""DataLoader throughput (samples/s) from a warm chunk cache, for several worker counts.

Makes a synthetic LUNA16-layout data set with `p2ch.synth.generate` in a temporary folder (or
uses `--data-root`), fills a `ChunkCache` with `p2ch.prefill.fill_missing` (series by series,
so each CT is loaded once), then times full passes over all candidates in a shuffled
order, as training reads them, through `p2ch.datasets.create_loader` with 0, 2 and 8 workers.
The first pass of each worker count (worker start-up included) is reported apart from the
timed passes. Batches are int16 chunks (see p2ch.datasets); nothing is copied to a GPU.

    .venv/bin/python benchmarks/bench_dataloader.py --workers 0 2 8 --batch-size 256
    .venv/bin/python benchmarks/bench_dataloader.py --data-root data-unversioned/part2/luna \
        --cache-dir /fast/cache --limit 20000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from p2ch.candidates import get_candidate_arrays
from p2ch.datasets import DEFAULT_WIDTH_IRC, LunaDataset, ShuffleSampler, create_loader
from p2ch.errors import P2chError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8], help="worker counts to time")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--passes", type=int, default=3, help="timed passes per worker count (after one warm-up pass)")
    parser.add_argument(
        "--context",
        default=None,
        choices=("fork", "forkserver", "spawn"),
        help="worker start method (default: the platform's)",
    )
    add_data_arguments(parser)
    return parser


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data set flags of the loader benchmarks (this one and bench_loader.py)."""
    parser.add_argument("--width-irc", type=int, nargs=3, default=DEFAULT_WIDTH_IRC, metavar=("I", "R", "C"))
    parser.add_argument("--data-root", help="an existing LUNA16-layout data set (default: make a synthetic one)")
    parser.add_argument("--cache-dir", help="chunk cache folder (default: a temporary one)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N candidates")
    g = parser.add_argument_group("synthetic data set (without --data-root)")
    g.add_argument("--num-cts", type=int, default=8)
    g.add_argument("--size", type=int, default=256, help="in-plane voxels (rows = cols)")
    g.add_argument("--slices", type=int, default=128)
    g.add_argument("--candidates-per-ct", type=int, default=250)
    g.add_argument("--seed", type=int, default=0)


def make_data(args: argparse.Namespace, tmp: str) -> Path:
    """--data-root, else a synthetic set made in `tmp` from the synthetic-data flags."""
    if args.data_root:
        return Path(args.data_root)
    from p2ch.synth import generate

    data_root = Path(tmp) / "luna"
    start = time.perf_counter()
    generate(
        data_root,
        num_cts=args.num_cts,
        size=args.size,
        slices=args.slices,
        candidates_per_ct=args.candidates_per_ct,
        seed=args.seed,
        workers=min(4, os.cpu_count() or 1),
    )
    print(f"synthetic data set: {args.num_cts} CTs in {time.perf_counter() - start:.1f} s", flush=True)
    return data_root


def prefill(cache, candidates, width_irc) -> tuple[float, int]:
    """Cache every candidate's chunk with `p2ch.prefill.fill_missing` (one CT load per CT, in this
    process). Returns (seconds, chunks written).
    """
    from p2ch.prefill import fill_missing

    start = time.perf_counter()
    written = fill_missing(cache, candidates, np.arange(len(candidates)), width_irc, progress=False)
    return time.perf_counter() - start, written


def record_header(bench: str, args: argparse.Namespace) -> dict:
    """The first keys of a loader benchmark's JSON line: what ran, when, where, on what data."""
    return {
        "bench": bench,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "data_root": str(args.data_root) if args.data_root else "synthetic",
    }


def timed_passes(dataset, *, workers: int, batch_size: int, passes: int, **settings) -> tuple[int, list[float]]:
    """Samples per pass and the seconds of `passes` + 1 shuffled passes over a `create_loader` of
    `dataset` (the first warms up); `settings` go to `create_loader`."""
    sampler = ShuffleSampler(len(dataset), seed=0)
    loader = create_loader(
        dataset,
        sampler,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        **settings,
    )
    timings = []
    samples = 0
    for epoch in range(passes + 1):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        samples = 0
        for batch in loader:
            samples += batch.chunk.shape[0]
        timings.append(time.perf_counter() - start)
    del loader  # stops persistent workers
    return samples, timings


def time_loader(dataset, *, workers: int, batch_size: int, passes: int, context) -> dict:
    samples, timings = timed_passes(
        dataset, workers=workers, batch_size=batch_size, passes=passes, multiprocessing_context=context
    )
    timed = timings[1:]
    return {
        "workers": workers,
        "samples_per_pass": samples,
        "first_pass_s": round(timings[0], 3),
        "pass_s": [round(t, 3) for t in timed],
        "samples_per_s": round(samples * len(timed) / sum(timed)) if timed else None,
        "best_samples_per_s": round(samples / min(timed)) if timed else None,
        # int16 chunk bytes delivered per second
        "mb_per_s": round(samples * len(timed) / sum(timed) * 2 * int(np.prod(dataset.width_irc)) / 2**20, 1)
        if timed
        else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # More workers than cores is what this measures; torch's advice about it is noise here.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    try:
        from p2ch.cache import ChunkCache
    except ImportError as exc:
        print(f"bench_dataloader: needs p2ch.cache.ChunkCache ({exc})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="p2ch-bench-") as tmp:
        try:
            data_root = make_data(args, tmp)
            cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
            candidates = get_candidate_arrays(data_root)
            if args.limit:
                candidates = candidates.take(np.arange(min(args.limit, len(candidates))))
            cache = ChunkCache(cache_dir, data_root)
            width = tuple(args.width_irc)
            fill_s, chunks = prefill(cache, candidates, width)
            fill_stats = dict(cache.stats())
            print(
                f"prefill: {chunks} chunks written in {fill_s:.1f} s ({chunks / max(fill_s, 1e-9):.0f}/s); "
                f"cache {fill_stats}",
                flush=True,
            )
            dataset = LunaDataset(candidates, None, cache, width)
            results = []
            for workers in args.workers:
                before = dict(cache.stats())
                result = time_loader(
                    dataset, workers=workers, batch_size=args.batch_size, passes=args.passes, context=args.context
                )
                if workers == 0:
                    # Only the in-process cache's counters are visible here; workers keep their own.
                    after = cache.stats()
                    hits = after["hits"] - before["hits"]
                    misses = after["misses"] - before["misses"]
                    result["cache_hit_rate"] = round(hits / max(1, hits + misses), 4)
                results.append(result)
                print(
                    f"  workers {workers}: {result['samples_per_s']} samples/s "
                    f"(first pass {result['first_pass_s']} s, passes {result['pass_s']})",
                    flush=True,
                )
        except P2chError as exc:
            print(f"bench_dataloader: {exc}", file=sys.stderr)
            return 2

    print(f"\n{len(dataset)} candidates, chunk {width} int16, batch {args.batch_size}, shuffled order")
    print(f"{'workers':>7} {'samples/s':>10} {'MB/s':>8} {'first pass s':>13}")
    for r in results:
        print(f"{r['workers']:>7} {r['samples_per_s']:>10} {r['mb_per_s']:>8} {r['first_pass_s']:>13}")
    record = {
        **record_header("dataloader", args),
        "synthetic": None
        if args.data_root
        else {
            "num_cts": args.num_cts,
            "size": args.size,
            "slices": args.slices,
            "candidates_per_ct": args.candidates_per_ct,
            "seed": args.seed,
        },
        "candidates": len(dataset),
        "batch_size": args.batch_size,
        "width_irc": list(width),
        "context": args.context or torch.multiprocessing.get_start_method(),
        "prefill_s": round(fill_s, 2),
        "prefill_stats": fill_stats,
        "results": results,
    }
    print(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
