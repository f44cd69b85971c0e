"""Synthetic data generator: seconds and bytes for a set, per worker count, plus planning alone.

Writes the set into a temporary folder (removed afterwards) once per `--workers-list` entry and
checks that every run wrote the same bytes; then times `plan_dataset` (CSV content without voxels).

    .venv/bin/python benchmarks/bench_synth.py
    .venv/bin/python benchmarks/bench_synth.py --workers-list 1 2 4 --num-cts 20 --size 512 --slices 256

Prints figures and one JSON line. Times include process start-up (spawn) and writing to the page
cache; on a slow disk writing may dominate.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from p2ch import synth


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers-list", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--num-cts", type=int, default=synth.DEFAULT_NUM_CTS)
    parser.add_argument("--size", type=int, default=synth.DEFAULT_SIZE)
    parser.add_argument("--slices", type=int, default=synth.DEFAULT_SLICES)
    parser.add_argument("--candidates-per-ct", type=int, default=synth.DEFAULT_CANDIDATES_PER_CT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", help="where to write (default: a temporary folder)")
    return parser


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def du(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    settings = dict(
        num_cts=args.num_cts,
        size=args.size,
        slices=args.slices,
        candidates_per_ct=args.candidates_per_ct,
        seed=args.seed,
    )
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-synth-"))
    results = {
        "bench": "synth",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "settings": settings,
        "runs": [],
    }
    digests = set()
    try:
        for workers in args.workers_list:
            out = work / f"luna-w{workers}"
            summary = synth.generate(out, workers=workers, force=True, **settings)
            run = {
                "workers": summary.workers,
                "seconds": round(summary.seconds, 3),
                "bytes": summary.bytes_written,
                "bytes_on_disk": du(out),
                "mb_per_s": round(summary.bytes_written / 1e6 / summary.seconds, 1),
            }
            digests.add(digest(out))
            shutil.rmtree(out)
            results["runs"].append(run)
            shape = f"{args.slices}×{args.size}×{args.size}"
            print(
                f"{args.num_cts} CTs of {shape}, {summary.workers} worker(s): "
                f"{run['seconds']:.2f} s, {run['bytes'] / 1e6:,.1f} MB ({run['mb_per_s']:,.0f} MB/s), "
                f"{summary.num_candidates:,} candidates, {summary.num_positive} positive",
                flush=True,
            )
        start = time.perf_counter()
        synth.plan_dataset(**settings)
        results["plan_seconds"] = round(time.perf_counter() - start, 3)
        results["identical_across_workers"] = len(digests) == 1
        print(
            f"planning alone (CSV content, no voxels): {results['plan_seconds']:.2f} s; "
            f"files identical across worker counts: {len(digests) == 1}"
        )
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))
    return 0 if len(digests) <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
