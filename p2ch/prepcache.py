"""`python -m p2ch.prepcache`: fill the chunk cache before training, one CT per worker process.

The book's prepcache walked the candidate list in order through a DataLoader, so every worker
loaded CTs at random and held several; filling the cache took hours and often ran out of
memory. Here candidates are grouped by series and each worker process loads one CT, crops all
of its missing chunks at once (`ChunkCache.fill_series`), writes them and drops the CT, so
memory is one CT (plus a batch of chunks) per worker. Workers send back counts only.

Resumable: a chunk is committed to the cache only after its value file is complete, and
series whose chunks are all cached are skipped without loading the CT, so after Ctrl-C or a
kill the same command carries on where it stopped.

    python -m p2ch.prepcache --dry-run             # how much would be written, and is there room?
    python -m p2ch.prepcache --num-workers 8       # fill it
    python -m p2ch.prepcache --subsets 0 1 2       # only CTs in subset0..2
    python -m p2ch.prepcache --prune               # delete entries of changed CTs / old formats
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from p2ch.cache import CacheError, CacheFullError, ChunkCache, FillResult, _free_bytes
from p2ch.candidates import get_candidate_arrays
from p2ch.config import DefaultsHelpFormatter, resolve_cache_dir, resolve_data_root
from p2ch.errors import ConfigError, P2chError
from p2ch.geometry import DEFAULT_WIDTH_IRC
from p2ch.luna import series_index
from p2ch.progress import Progress

log = logging.getLogger(__name__)

PROG = "python -m p2ch.prepcache"
# On-disk cost of one chunk beyond its voxels: the value file is rounded up to 4 KiB blocks,
# plus its SQLite row (key, header, index entries), about 300 bytes.
_ROW_BYTES = 300
_BLOCK = 4096
_SUBSET_RE = re.compile(r"^subset(\d+)$")


class WorkerDiedError(P2chError):
    """A prefill worker process died (killed for memory, or crashed)."""


@dataclasses.dataclass(frozen=True)
class SeriesTask:
    """The chunks of one CT: centers_xyz (N, 3) float64 mm, `missing` of them not cached yet."""

    series_uid: str
    subset: str
    centers_xyz: np.ndarray
    missing: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a prefill would do: counts over the selected series, sizes in bytes."""

    tasks: list[SeriesTask]
    width_irc: tuple[int, int, int]
    chunks: int
    cached: int
    bytes_per_chunk: int
    free_bytes: int | None

    @property
    def cts(self) -> int:
        return len(self.tasks)

    @property
    def to_write(self) -> int:
        return self.chunks - self.cached

    @property
    def cts_to_load(self) -> int:
        return sum(1 for t in self.tasks if t.missing)

    @property
    def bytes_to_write(self) -> int:
        return self.to_write * self.bytes_per_chunk

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.bytes_to_write <= self.free_bytes


def chunk_disk_bytes(width_irc: Sequence[int]) -> int:
    """Estimated bytes on disk per uncompressed chunk: voxels in 4 KiB blocks plus its SQLite row."""
    payload = 2 * int(np.prod([int(v) for v in width_irc]))
    return -(-payload // _BLOCK) * _BLOCK + _ROW_BYTES


def free_bytes(path: Path) -> int | None:
    """Free bytes on the disk that holds (or will hold) `path`; None when unknown."""
    return _free_bytes(Path(path))


def make_plan(
    cache: ChunkCache,
    width_irc: Sequence[int] = DEFAULT_WIDTH_IRC,
    subsets: Sequence[int] | None = None,
    check_cache: bool = True,
) -> Plan:
    """Group the candidates of the CTs on disk (optionally only `subsets`) by series.

    With `check_cache`, count what is cached already (reads the cache index; creates nothing).
    Candidates with the same centre to the µm count once.
    """
    width = tuple(int(v) for v in width_irc)
    index = series_index(cache.data_root)
    candidates = get_candidate_arrays(cache.data_root)
    subset_of = {uid: path.parent.name for uid, path in index.items()}
    wanted: set[str] | None = None
    if subsets is not None:
        present = sorted({name for name in subset_of.values()})
        wanted = {f"subset{k}" for k in subsets}
        absent = sorted(wanted - set(present))
        if absent:
            raise ConfigError(
                f"--subsets: no CTs in {', '.join(absent)} under {cache.data_root} (found: "
                f"{', '.join(present) or 'none'}); download and unpack them, or choose others"
            )
    order = np.argsort(candidates.series_index, kind="stable")
    bounds = np.flatnonzero(np.diff(candidates.series_index[order])) + 1
    tasks: list[SeriesTask] = []
    for rows in np.split(order, bounds):
        if len(rows) == 0:
            continue
        uid = candidates.series_uid(int(rows[0]))
        subset = subset_of.get(uid, "")
        if wanted is not None and subset not in wanted:
            continue
        centers = candidates.center_xyz[rows]
        # One entry per distinct key: identical centres (to the µm) are one chunk.
        _, unique_rows = np.unique(np.round(centers * 1000.0), axis=0, return_index=True)
        centers = np.ascontiguousarray(centers[np.sort(unique_rows)])
        missing = int(cache.missing(uid, centers, width).sum()) if check_cache else len(centers)
        tasks.append(SeriesTask(uid, subset, centers, missing))
    if not tasks:
        raise ConfigError(f"no candidates to cache in the selected subsets under {cache.data_root}")
    chunks = sum(len(t.centers_xyz) for t in tasks)
    cached = chunks - sum(t.missing for t in tasks)
    return Plan(tasks, width, chunks, cached, chunk_disk_bytes(width), free_bytes(cache.cache_dir))


# --- worker processes ------------------------------------------------------------------------

_WORKER_CACHE: ChunkCache | None = None


def _init_worker(cache: ChunkCache, log_level: int) -> None:
    global _WORKER_CACHE
    # Ctrl-C goes to the whole process group; the main process handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
    )
    _WORKER_CACHE = cache


def _fill(cache: ChunkCache, task: SeriesTask, width: tuple[int, int, int]) -> FillResult | str:
    try:
        return cache.fill_series(task.series_uid, task.centers_xyz, width)
    except CacheError:
        raise  # cache full or unwritable: stop everything
    except P2chError as exc:  # this CT is missing or unreadable: report it, go on with the others
        return f"{task.series_uid}: {exc}"


def _fill_in_worker(task: SeriesTask, width: tuple[int, int, int]) -> FillResult | str:
    assert _WORKER_CACHE is not None, "worker not initialised"
    return _fill(_WORKER_CACHE, task, width)


@dataclasses.dataclass
class Summary:
    """Totals of a prefill run."""

    cts: int = 0
    written: int = 0
    present: int = 0
    outside: int = 0
    ct_bytes: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def add(self, task: SeriesTask, result: FillResult | str) -> None:
        if isinstance(result, str):
            self.failed.append(result)
            log.error("%s", result)
            return
        self.cts += 1
        self.written += result.written
        # Only what another writer stored since the plan was made (the plan counted the rest).
        self.present += max(0, result.present - (len(task.centers_xyz) - task.missing))
        self.outside += result.outside
        self.ct_bytes += result.ct_bytes


def run_prefill(
    cache: ChunkCache, plan: Plan, num_workers: int, summary: Summary, log_level: int = logging.INFO
) -> Summary:
    """Fill every missing chunk of `plan`, `num_workers` processes (0: in this process).

    Updates `summary` as results arrive (so a caller still has the totals after Ctrl-C); its
    `present` counts chunks found cached by the workers, beyond `plan.cached`.
    """
    # Largest first, so the last CTs to finish are small ones and no worker idles at the end.
    tasks = sorted((t for t in plan.tasks if t.missing), key=lambda t: (-t.missing, t.series_uid))
    start = time.perf_counter()
    progress = Progress(sum(t.missing for t in tasks), "prefill", unit="chunk", interval=15.0, logger=log)
    try:
        if not tasks:
            pass
        elif num_workers == 0:
            for task in tasks:
                summary.add(task, _fill(cache, task, plan.width_irc))
                progress.update(task.missing)
                progress.set_postfix(cts=summary.cts)
        else:
            workers = min(num_workers, len(tasks))
            _run_pool(cache, tasks, plan.width_irc, workers, summary, progress, log_level)
    finally:
        progress.close()
        summary.seconds = time.perf_counter() - start
    return summary


def _run_pool(cache, tasks, width, num_workers, summary, progress, log_level) -> None:
    # spawn: workers start clean (no inherited SQLite handles or threads) on every platform.
    context = multiprocessing.get_context("spawn")
    executor = cf.ProcessPoolExecutor(
        max_workers=num_workers, mp_context=context, initializer=_init_worker, initargs=(cache, log_level)
    )
    try:
        futures = {executor.submit(_fill_in_worker, task, width): task for task in tasks}
        for future in cf.as_completed(futures):
            task = futures[future]
            try:
                result = future.result()
            except cf.process.BrokenProcessPool:
                raise WorkerDiedError(
                    "a prefill worker process died (out of memory? each holds one CT, ~0.2-1 GB); "
                    "rerun with fewer --num-workers, it resumes where it stopped"
                ) from None
            summary.add(task, result)
            progress.update(task.missing)
            progress.set_postfix(cts=summary.cts)
    except BaseException:
        # Stop workers now rather than after their current CT. A worker stopped mid-write leaves at
        # most an orphan value file that no cache row names; it is never read. (`_processes` is
        # private, but Python < 3.14 has no public way to stop a pool's workers.)
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)
        raise
    executor.shutdown(wait=True)


# --- command line ----------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    default_workers = min(os.cpu_count() or 1, 8)
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=DefaultsHelpFormatter,
        description="Fill the chunk cache (int16 candidate chunks) for training: each worker process "
        "loads one CT at a time and writes all of its chunks. Resumable: rerun to continue.",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=default_workers,
        help="worker processes, each holding one CT in memory (0: no worker processes); "
        "default: CPU count, at most 8 (%(default)s here)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="LUNA16 root with subset*/ and the CSVs (default: $P2CH_DATA_ROOT, else data-unversioned/part2/luna)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="chunk cache folder (default: $P2CH_CACHE_DIR, else data-unversioned/cache)"
    )
    parser.add_argument(
        "--subsets",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="only CTs in these subset folders, e.g. --subsets 0 1 2 (default: all)",
    )
    parser.add_argument(
        "--width-irc",
        type=int,
        nargs=3,
        default=list(DEFAULT_WIDTH_IRC),
        metavar=("I", "R", "C"),
        help="chunk size in voxels (index, row, col) (default: 32 48 48)",
    )
    parser.add_argument(
        "--compress-level",
        type=int,
        default=0,
        help="zlib level for new entries (0: off; 1-9 save disk but make reads about 10x slower; default: 0)",
    )
    parser.add_argument("--clear", action="store_true", help="delete every cached chunk first")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="only report how many chunks and GB would be written, what is cached "
        "already, and the free space; write nothing",
    )
    parser.add_argument("--force", action="store_true", help="start even when the estimate exceeds the free disk space")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="delete entries of changed or removed CTs and of old cache formats, and value files "
        "left by killed writers, then exit (run it while no prefill or training uses the cache)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default: INFO)",
    )
    return parser


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:,.2f} GB"


def _report_plan(plan: Plan, cache: ChunkCache, out) -> None:
    print(f"cache: {cache.cache_dir}   data: {cache.data_root}", file=out)
    print(
        f"CTs: {plan.cts} ({plan.cts_to_load} to load)   chunks: {plan.chunks:,} of "
        f"{'x'.join(map(str, plan.width_irc))} voxels",
        file=out,
    )
    print(
        f"already cached: {plan.cached:,}   to write: {plan.to_write:,} = "
        f"{_gb(plan.bytes_to_write)} (about {plan.bytes_per_chunk:,} bytes each as int16)",
        file=out,
    )
    print(
        f"(for scale: all 551,065 LUNA16 candidates take about {_gb(551_065 * plan.bytes_per_chunk)} at this size)",
        file=out,
    )
    print(
        f"free on the cache disk: {_gb(plan.free_bytes)}"
        + ("" if plan.fits else "   NOT ENOUGH: free space, use --subsets, or pass --force"),
        file=out,
    )


def _report_summary(summary: Summary, plan: Plan, cache: ChunkCache, out) -> None:
    seconds = max(summary.seconds, 1e-9)
    print(
        f"prefill done: {summary.cts} CTs, {summary.written:,} chunks written, "
        f"{plan.cached + summary.present:,} already present, {summary.outside:,} outside their CT; "
        f"cache {cache.cache_dir}: {len(cache):,} entries, {_gb(cache.volume())} on disk; "
        f"{summary.seconds:.1f} s, {summary.ct_bytes / 1e6 / seconds:,.1f} MB/s of CT read, "
        f"{summary.written / seconds:,.1f} chunks/s",
        file=out,
    )


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    _configure_logging(args.log_level)
    summary = Summary()
    plan: Plan | None = None
    try:
        if args.num_workers < 0:
            raise ConfigError(f"--num-workers {args.num_workers}: expected 0 or more")
        cache = ChunkCache(
            resolve_cache_dir(args.cache_dir), resolve_data_root(args.data_root), compress_level=args.compress_level
        )
        width = tuple(args.width_irc)
        if min(width) < 1:
            raise ConfigError(f"--width-irc {' '.join(map(str, width))}: expected 3 positive integers")
        if args.prune:
            result = cache.prune(dry_run=args.dry_run)
            verb = "would delete" if args.dry_run else "deleted"
            print(
                f"prune {cache.cache_dir}: {verb} {result.removed:,} entries ({result.old_format:,} old "
                f"format, {result.changed_ct:,} of changed CTs, {result.missing_ct:,} of CTs no longer "
                f"under {cache.data_root}); kept {result.kept:,}"
                + (f"; {result.foreign:,} foreign entries left alone" if result.foreign else "")
                + (
                    f"; {verb} {result.orphan_files:,} orphan value files and {result.lost_files:,} entries "
                    "without their file"
                    if result.orphan_files or result.lost_files
                    else ""
                )
            )
            return 0
        if args.clear:
            if args.dry_run:
                print(f"would clear {len(cache):,} entries from {cache.cache_dir}")
            else:
                print(f"cleared {cache.clear():,} entries from {cache.cache_dir}", file=sys.stderr)
        plan = make_plan(cache, width, args.subsets, check_cache=not (args.clear and args.dry_run))
        if args.dry_run:
            _report_plan(plan, cache, sys.stdout)
            return 0
        _report_plan(plan, cache, sys.stderr)
        if not plan.fits and not args.force:
            raise CacheFullError(
                f"writing {plan.to_write:,} chunks needs about {_gb(plan.bytes_to_write)} but the disk of "
                f"{cache.cache_dir} has {_gb(plan.free_bytes)} free; free some space, cache fewer CTs "
                "(--subsets 0 1 …), point --cache-dir at a bigger disk, or pass --force"
            )
        run_prefill(cache, plan, args.num_workers, summary, getattr(logging, args.log_level))
        _report_summary(summary, plan, cache, sys.stdout)
        if summary.failed:
            raise P2chError(
                f"{len(summary.failed)} of {plan.cts_to_load} CTs could not be cached (first: "
                f"{summary.failed[0]}); fix or remove those files and rerun"
            )
        return 0
    except P2chError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = ""
        if plan is not None:
            with contextlib.suppress(P2chError):
                where = (
                    f" after {summary.cts} of {plan.cts_to_load} CTs; the cache holds {len(cache):,} "
                    f"entries, {plan.chunks:,} planned"
                )
        print(
            f"{PROG}: interrupted{where}; rerun the same command to resume (cached chunks are skipped)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
