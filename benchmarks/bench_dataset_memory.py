"""DataLoader worker memory over one epoch: columnar `LunaDataset` vs the book's list of tuples.

The book's dataset holds LUNA16's 551k candidates as a list of namedtuples. Every access
writes the reference counts of the tuple and its fields (and the garbage collector writes its
own headers), so each forked worker copies, page by page, the parts of the list it touches;
over an epoch that is all of it, in every worker. `p2ch.datasets.LunaDataset` keeps the same
data in a few numpy arrays, whose pages nobody writes.

This builds a synthetic candidate list of LUNA16's size in memory (no CT files: a chunk source
that returns a tiny constant chunk, so the epoch measures the dataset and not the crop), runs
one epoch through a DataLoader with N forked workers for each dataset, and samples every
worker's /proc/<pid>/smaps_rollup. Private_Dirty is the memory copy-on-access grows (pages a
worker wrote that were shared with its parent); USS = Private_Clean + Private_Dirty.

    .venv/bin/python benchmarks/bench_dataset_memory.py                  # 550k candidates, 8 workers
    .venv/bin/python benchmarks/bench_dataset_memory.py --workers 2 --candidates 100000
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from p2ch.candidates import CandidateArrays
from p2ch.datasets import LunaDataset, LunaSample, ShuffleSampler, create_loader

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."


class ConstantSource:
    """A chunk source with no CT behind it: a fresh zero chunk and the origin voxel."""

    def get_ct_raw_candidate(self, series_uid, center_xyz, width_irc=(32, 48, 48)):
        return np.zeros(tuple(width_irc), dtype=np.int16), (0, 0, 0)


class BookStyleDataset(Dataset):
    """The book's layout: one namedtuple per candidate in a Python list (same items out)."""

    def __init__(self, candidate_list, source, width_irc):
        self.candidate_list = candidate_list
        self.source = source
        self.width_irc = tuple(width_irc)

    def __len__(self) -> int:
        return len(self.candidate_list)

    def __getitem__(self, k: int) -> LunaSample:
        candidate = self.candidate_list[k]
        chunk, center_irc = self.source.get_ct_raw_candidate(candidate.series_uid, candidate.center_xyz, self.width_irc)
        return LunaSample(
            torch.from_numpy(chunk).unsqueeze(0),
            torch.tensor(int(candidate.is_nodule), dtype=torch.int64),
            candidate.series_uid,
            torch.tensor(center_irc, dtype=torch.int64),
        )


def synthetic_candidates(count: int, series: int, positives: int, seed: int = 0) -> CandidateArrays:
    """LUNA16-sized candidate arrays: `count` rows over `series` CTs, `positives` nodules first."""
    rng = np.random.default_rng(seed)
    # Unique 30-digit suffixes, like LUNA16's uids.
    jitter = rng.integers(0, 7919, series).tolist()
    uids = np.array(sorted(f"{UID_PREFIX}{10**29 + n * 7919 + j}" for n, j in enumerate(jitter)))
    is_nodule = np.zeros(count, dtype=bool)
    is_nodule[:positives] = True
    return CandidateArrays(
        series_uids=uids,
        series_index=rng.integers(0, series, count).astype(np.int32),
        center_xyz=rng.uniform(-300.0, 300.0, (count, 3)),
        is_nodule=is_nodule,
        has_annotation=is_nodule.copy(),
        is_mal=np.zeros(count, dtype=bool),
        diameter_mm=np.where(is_nodule, rng.uniform(3.0, 30.0, count), 0.0).astype(np.float32),
    )


def read_memory_kb(pid: int) -> dict[str, int] | None:
    """Rss, Pss, Private_Clean, Private_Dirty (kB) of a process, or None once it is gone."""
    fields = ("Rss", "Pss", "Private_Clean", "Private_Dirty")
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # the process has exited
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            values[key] = int(rest.split()[0])
    if len(values) != len(fields):
        return None
    values["USS"] = values["Private_Clean"] + values["Private_Dirty"]
    return values


class Monitor:
    """Poll the workers' memory every `interval` seconds; keep each one's first and peak reading."""

    def __init__(self, pids: Sequence[int], interval: float):
        self.pids = list(pids)
        self.interval = interval
        self.first: dict[int, dict[str, int]] = {}
        self.peak: dict[int, dict[str, int]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        for pid in self.pids:
            reading = read_memory_kb(pid)
            if reading is None:
                continue
            self.first.setdefault(pid, reading)
            peak = self.peak.setdefault(pid, dict(reading))
            for key, value in reading.items():
                peak[key] = max(peak[key], value)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._poll()
        self._stop.set()
        self._thread.join()


def worker_pids(iterator) -> list[int]:
    # torch keeps the worker processes of a multi-process iterator in `_workers`.
    workers = getattr(iterator, "_workers", None)
    if not workers:
        raise RuntimeError("cannot find the DataLoader's worker processes (torch internals changed?)")
    return [w.pid for w in workers]


def run_epoch(dataset, *, workers: int, batch_size: int, context: str, interval: float, freeze_gc: bool) -> dict:
    gc.collect()  # (create_loader's workers freeze their own collector when asked; the parent never)
    loader = create_loader(
        dataset,
        ShuffleSampler(len(dataset), seed=0),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=False,
        multiprocessing_context=context,
        freeze_gc=freeze_gc,
    )
    start = time.perf_counter()
    iterator = iter(loader)
    samples = 0
    with Monitor(worker_pids(iterator), interval) as monitor:
        for batch in iterator:
            samples += len(batch.series_uid)
    seconds = time.perf_counter() - start
    del iterator

    def mb(table, key):
        return [round(table[pid][key] / 1024, 1) for pid in monitor.pids if pid in table]

    peak_dirty, first_dirty = mb(monitor.peak, "Private_Dirty"), mb(monitor.first, "Private_Dirty")
    return {
        "samples": samples,
        "seconds": round(seconds, 2),
        "samples_per_s": round(samples / seconds),
        "polls": monitor.samples,
        "first_private_dirty_mb": first_dirty,
        "peak_private_dirty_mb": peak_dirty,
        "peak_uss_mb": mb(monitor.peak, "USS"),
        "peak_rss_mb": mb(monitor.peak, "Rss"),
        "peak_pss_mb": mb(monitor.peak, "Pss"),
        "max_peak_private_dirty_mb": max(peak_dirty, default=0.0),
        "sum_peak_private_dirty_mb": round(sum(peak_dirty), 1),
        "max_growth_private_dirty_mb": round(
            max((p - f for p, f in zip(peak_dirty, first_dirty, strict=False)), default=0.0), 1
        ),
    }


def own_memory_mb() -> float:
    reading = read_memory_kb(os.getpid())
    return reading["Private_Dirty"] / 1024 if reading else float("nan")


CONFIGS = {
    # name: (dataset layout, workers freeze their collector as they start)
    "luna": ("arrays", True),  # p2ch: create_loader's default
    "luna_gc_unfrozen": ("arrays", False),
    "book": ("list", False),  # the book: list of namedtuples, plain DataLoader
    "book_gc_frozen": ("list", True),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=550_000, help="candidates in the epoch")
    parser.add_argument("--series", type=int, default=888, help="CTs the candidates belong to")
    parser.add_argument("--positives", type=int, default=1351, help="nodule candidates")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument(
        "--width-irc",
        type=int,
        nargs=3,
        default=(2, 4, 4),
        metavar=("I", "R", "C"),
        help="chunk size; tiny, so the epoch measures the dataset, not the copy",
    )
    parser.add_argument(
        "--context",
        default="fork",
        choices=("fork", "forkserver", "spawn"),
        help="worker start method (copy-on-access needs fork to show)",
    )
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between memory polls")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=tuple(CONFIGS),
        default=tuple(CONFIGS),
        help="what to measure, each in a fresh interpreter",
    )
    parser.add_argument("--only", choices=tuple(CONFIGS), help=argparse.SUPPRESS)  # one run, in-process
    return parser


def measure(name: str, args: argparse.Namespace) -> dict:
    """One epoch of configuration `name`, in this process: its figures as a dict."""
    layout, freeze_gc = CONFIGS[name]
    candidates = synthetic_candidates(args.candidates, args.series, args.positives)
    before = own_memory_mb()
    if layout == "arrays":
        dataset = LunaDataset(candidates, None, ConstantSource(), args.width_irc)
    else:
        dataset = BookStyleDataset(candidates.to_list(), ConstantSource(), args.width_irc)
    result = run_epoch(
        dataset,
        workers=args.workers,
        batch_size=args.batch_size,
        context=args.context,
        interval=args.interval,
        freeze_gc=freeze_gc,
    )
    fields = ("series_uids", "series_index", "center_xyz", "is_nodule", "has_annotation", "is_mal", "diameter_mm")
    return {
        "layout": layout,
        "freeze_gc": freeze_gc,
        "arrays_mb": round(sum(getattr(candidates, f).nbytes for f in fields) / 2**20, 1),
        "dataset_private_dirty_mb_in_main": round(own_memory_mb() - before, 1),
        **result,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # More workers than cores is what this measures; torch's advice about it is noise here.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    if not Path("/proc/self/smaps_rollup").is_file():
        print("bench_dataset_memory: needs Linux /proc/<pid>/smaps_rollup (kernel ≥ 4.14)", file=sys.stderr)
        return 2
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return 0
    print(
        f"{args.candidates} candidates, {args.series} series; one epoch per configuration with "
        f"{args.workers} {args.context} workers, batch {args.batch_size}, chunk {tuple(args.width_irc)}",
        flush=True,
    )
    results = {}
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    for name in args.configs:
        # A fresh interpreter per configuration: the collector's state (what earlier collections
        # untracked or froze) would otherwise carry over from one run to the next.
        child = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *passed, "--only", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            print(f"bench_dataset_memory: {name} failed:\n{child.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  {name}: {results[name]['seconds']} s", flush=True)

    print(
        f"\n{'config':<17} {'samples/s':>9} {'dataset MB':>10} "
        f"{'worker Private_Dirty MB: start -> peak':>40} {'sum of peaks':>12} {'max USS':>8}"
    )
    for name, r in results.items():
        first, peak = r["first_private_dirty_mb"], r["peak_private_dirty_mb"]
        span = (
            f"{min(first, default=0):.0f}-{max(first, default=0):.0f} -> "
            f"{min(peak, default=0):.0f}-{max(peak, default=0):.0f}"
        )
        print(
            f"{name:<17} {r['samples_per_s']:>9} {r['dataset_private_dirty_mb_in_main']:>10.0f} "
            f"{span:>40} {r['sum_peak_private_dirty_mb']:>12.0f} {max(r['peak_uss_mb'], default=0):>8.0f}"
        )
    record = {
        "bench": "dataset_memory",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "candidates": args.candidates,
        "series": args.series,
        "workers": args.workers,
        "context": args.context,
        "batch_size": args.batch_size,
        "width_irc": list(args.width_irc),
        **results,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
