"""Filling the chunk cache CT by CT, in parallel and resumably: the library behind `python -m p2ch.prepcache`.

The book's prepcache walked the candidate list in order through a DataLoader, so every worker
loaded CTs at random and held several; filling the cache took hours and often ran out of
memory. Here candidates are grouped by series and each worker process loads one CT, crops all
of its missing chunks at once (`ChunkCache.fill_series`), writes them and drops the CT, so
memory is one CT (plus a batch of chunks) per worker. Workers send back counts only.

Resumable: a chunk is committed to the cache only after its value file is complete, and
series whose chunks are all cached are skipped without loading the CT, so after Ctrl-C or a
kill the same call carries on where it stopped.

- `make_plan` / `check_room` / `run_prefill`: the whole data set (or some subsets), as
  `python -m p2ch.prepcache` does it, with an estimate of the disk space it needs; with
  `malignant`, also the chunks at the malignancy rows' centres (the book's chapter 14 task).
- `fill_missing`: the chunks of some candidates (e.g. an evaluation's), as other commands need.
- `chunk_coverage` / `warm_chunk_cache`: before a training run's first batch, which of the chunks it
  reads are missing (a key check: one range query per shard and CT, no value read) and their fill,
  CT by CT (in this process when the CTs load faster than worker processes start); a candidate still
  missing afterwards lies outside its CT and is named by its CSV file and line (`check_inside`).
- `make_slice_plan` / `run_slice_prefill` / `fill_slices`: the same for the segmentation model's
  slice cache (`p2ch.slices.SliceCache`, `python -m p2ch.prepcache --segmentation`): one task per
  CT, which writes all its slices, mask slices and finally its meta record; CTs whose meta is
  present (and current) are skipped without loading them.

Both kinds of fill share one worker pool and progress report (`_run_tasks`), parametrised by the
per-CT fill function (`_fill_chunks`, `_fill_slices`).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from p2ch import store
from p2ch.cache import CacheError, CacheFullError, ChunkCache, FillResult
from p2ch.candidates import (
    CandidateArrays,
    get_candidate_arrays,
    get_malignancy_arrays,
    group_rows,
    row_location,
)
from p2ch.cli import brief_reason, exit_with_parent
from p2ch.ct import read_mhd_header
from p2ch.errors import CandidateOutsideCtError, ConfigError, DataNotFoundError, P2chError
from p2ch.geometry import DEFAULT_WIDTH_IRC, check_width_irc
from p2ch.luna import find_mhd, no_data_message, series_index, subset_name, subset_of
from p2ch.progress import Progress
from p2ch.slices import SliceCache, SliceFillResult

log = logging.getLogger(__name__)

# On-disk cost of one chunk beyond its voxels: the value file is rounded up to 4 KiB blocks,
# plus its SQLite row (key, header, index entries), about 300 bytes.
_ROW_BYTES = 300
_BLOCK = 4096
# Below this many bytes of CT to load, a fill of some candidates runs in this process: on a loaded 2-core VM
# 6 CTs of 64 MB took 1.1-1.7 s here and 8.9 s in 2 worker processes, which take seconds to start (a spawned
# worker imports SimpleITK, pandas, diskcache and the command's own module, torch included); a GiB is about
# 8 LUNA16 CTs (BENCHMARKS.md, "cold cache").
IN_PROCESS_CT_BYTES = 2**30


class WorkerDiedError(P2chError):
    """A prefill worker process died (killed for memory, or crashed)."""


class PrefillError(P2chError):
    """Some CTs could not be cached (missing or unreadable files); the others were."""


@dataclasses.dataclass(frozen=True)
class SeriesTask:
    """The chunks of one CT: centers_xyz (N, 3) float64 mm, `missing` of them not cached yet.

    subset: the folder the CT is in (e.g. "subset3"; "" when unknown).
    """

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
    return store.free_bytes(Path(path))


def format_gb(n: int | None) -> str:
    """Bytes as "1,234.56 GB" ("unknown" for None)."""
    return "unknown" if n is None else f"{n / 1e9:,.2f} GB"


def _wanted_subsets(subsets: Sequence[int] | None, folds: dict[str, int | None], data_root: Path) -> set[int] | None:
    """The selected folds, or ConfigError naming those without any CT on disk."""
    if subsets is None:
        return None
    present = sorted({k for k in folds.values() if k is not None})
    absent = sorted(set(subsets) - set(present))
    if absent:
        raise ConfigError(
            f"--subsets: no CTs in {', '.join(subset_name(k) for k in absent)} under {data_root} (found: "
            f"{', '.join(subset_name(k) for k in present) or 'none'}); download and unpack them, or choose others"
        )
    return set(subsets)


def _planned_centers(data_root: Path, malignant: bool) -> dict[str, np.ndarray]:
    """{series_uid: (n, 3) float64 mm centres to cache}, by uid: the candidates', then the malignancy rows'."""
    sources = [get_candidate_arrays(data_root)]
    if malignant:
        sources.append(get_malignancy_arrays(data_root))
    parts: dict[str, list[np.ndarray]] = {}
    for arrays in sources:
        for rows in group_rows(arrays.series_index):
            parts.setdefault(arrays.series_uid(int(rows[0])), []).append(arrays.center_xyz[rows])
    return {uid: np.concatenate(parts[uid]) for uid in sorted(parts)}


def make_plan(
    cache: ChunkCache,
    width_irc: Sequence[int] = DEFAULT_WIDTH_IRC,
    subsets: Sequence[int] | None = None,
    check_cache: bool = True,
    malignant: bool = False,
) -> Plan:
    """Group the candidates of the CTs on disk (optionally only those in subset folders `subsets`) by series.

    With `check_cache`, count what is cached already (reads the cache index; creates nothing).
    With `malignant`, also plan the chunks at the centres of the malignancy rows
    (`get_malignancy_arrays`; annotations_with_malignancy.csv must be in the data root, else
    DataNotFoundError), so that training the malignancy model reads a warm cache.
    Centres equal to the µm count once.
    """
    width = check_width_irc(width_irc)
    index = series_index(cache.data_root)
    folds = {uid: subset_of(path) for uid, path in index.items()}
    wanted = _wanted_subsets(subsets, folds, cache.data_root)
    tasks: list[SeriesTask] = []
    for uid, centers in _planned_centers(cache.data_root, malignant).items():
        if wanted is not None and folds.get(uid) not in wanted:
            continue
        # One entry per distinct key: identical centres (to the µm) are one chunk.
        _, unique_rows = np.unique(np.round(centers * 1000.0), axis=0, return_index=True)
        centers = np.ascontiguousarray(centers[np.sort(unique_rows)])
        missing = int(_missing_or_all(cache, uid, centers, width).sum()) if check_cache else len(centers)
        tasks.append(SeriesTask(uid, index[uid].parent.name if uid in index else "", centers, missing))
    if not tasks:
        raise ConfigError(f"no candidates to cache in the selected subsets under {cache.data_root}")
    chunks = sum(len(t.centers_xyz) for t in tasks)
    cached = chunks - sum(t.missing for t in tasks)
    return Plan(tasks, width, chunks, cached, chunk_disk_bytes(width), free_bytes(cache.cache_dir))


def _missing_or_all(cache: ChunkCache, series_uid: str, centers_xyz: np.ndarray, width: tuple[int, int, int]):
    """`cache.missing`, or all of them when the CT's files cannot even be identified (a bad header, a data
    file outside its folder): its fill then fails in turn and is reported with the others, not alone."""
    try:
        return cache.missing(series_uid, centers_xyz, width)
    except CacheError:
        raise
    except P2chError as exc:
        log.debug("%s: counted as not cached (%s)", series_uid, exc)
        return np.ones(len(centers_xyz), dtype=bool)


def check_room(plan: Plan, cache: ChunkCache, advice: str = "free some space or point the cache at a bigger disk"):
    """Raise CacheFullError when the plan's estimate exceeds the free space on the cache's disk."""
    if not plan.fits:
        raise CacheFullError(
            f"writing {plan.to_write:,} chunks needs about {format_gb(plan.bytes_to_write)} but the disk of "
            f"{cache.cache_dir} has {format_gb(plan.free_bytes)} free; {advice}"
        )


# --- filling, in this process or in worker processes -------------------------------------------

_WORKER_CACHE: Any = None  # the ChunkCache or SliceCache of a worker process


def _init_worker(cache: ChunkCache | SliceCache, log_level: int, parent_pid: int) -> None:
    global _WORKER_CACHE
    # Ctrl-C goes to the whole process group; the main process handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent killed outright (SIGKILL, out of memory) cannot stop its workers: they would wait on the
    # task queue forever, each holding its memory. SIGTERM keeps its default action: it ends them.
    exit_with_parent(parent_pid)
    logging.basicConfig(
        level=log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
    )
    _WORKER_CACHE = cache


def _fill_chunks(cache: ChunkCache, task: SeriesTask, width: tuple[int, int, int]) -> FillResult | str:
    """Fill one CT's chunks: its FillResult, or a line naming the CT when it cannot be read."""
    try:
        return cache.fill_series(task.series_uid, task.centers_xyz, width)
    except CacheError:
        raise  # cache full or unwritable: stop everything
    except P2chError as exc:  # this CT is missing or unreadable: report it, go on with the others
        return f"{task.series_uid}: {exc}"


def _fill_in_worker(fill: Callable[[Any, Any], Any], task: Any) -> Any:
    assert _WORKER_CACHE is not None, "worker not initialised"
    return fill(_WORKER_CACHE, task)


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

    def raise_if_failed(self, cts: int) -> None:
        """PrefillError naming the first CT that could not be cached (of the `cts` tried), if any."""
        _raise_if_failed(self.failed, cts)


def _raise_if_failed(failed: list[str], cts: int) -> None:
    """PrefillError in one short line: the count, the first CT and the gist of its reason, that CT's uid
    written <uid> there (each failure, "<series_uid>: <message>", was logged in full as it came in)."""
    if failed:
        series_uid, _, message = failed[0].partition(": ")
        reason = brief_reason(message.replace(series_uid, "<uid>"))
        raise PrefillError(
            f"{len(failed)} of {cts} CTs could not be cached (first: {series_uid}: {reason}); "
            "each CT's full reason and fix are logged above; fix or remove those files and rerun"
        )


def run_prefill(
    cache: ChunkCache, plan: Plan, num_workers: int, summary: Summary, log_level: int = logging.INFO
) -> Summary:
    """Fill every missing chunk of `plan`, `num_workers` processes (0: in this process).

    Updates `summary` as results arrive (so a caller still has the totals after Ctrl-C); its
    `present` counts chunks found cached by the workers, beyond `plan.cached`.
    """
    fill = functools.partial(_fill_chunks, width=plan.width_irc)
    return _run_tasks(cache, plan.tasks, fill, num_workers, summary, log_level, progress=True)


def _run_tasks(cache, tasks, fill, num_workers, summary, log_level, progress: bool, unit: str = "chunk"):
    """Run `fill(cache, task)` for every task with work (`task.missing` units), here or in worker processes.

    fill: a picklable module-level function (or a partial of one) returning the CT's result or an
    error line. `summary.add(task, result)` takes each result as it arrives; `summary.seconds`
    gets the time taken, even after Ctrl-C. Returns `summary`.
    """
    # Largest first, so the last CTs to finish are small ones and no worker idles at the end.
    tasks = sorted((t for t in tasks if t.missing), key=lambda t: (-t.missing, t.series_uid))
    start = time.perf_counter()
    bar = Progress(sum(t.missing for t in tasks), "prefill", unit=unit, interval=15.0, logger=log, enabled=progress)
    try:
        if not tasks:
            pass
        elif num_workers == 0:
            for task in tasks:
                summary.add(task, fill(cache, task))
                bar.update(task.missing)
                bar.set_postfix(cts=summary.cts)
        else:
            workers = min(num_workers, len(tasks))
            _run_pool(cache, tasks, fill, workers, summary, bar, log_level)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary


def _run_pool(cache, tasks, fill, num_workers, summary, progress, log_level) -> None:
    # spawn: workers start clean (no inherited SQLite handles or threads) on every platform.
    context = multiprocessing.get_context("spawn")
    executor = cf.ProcessPoolExecutor(
        max_workers=num_workers, mp_context=context, initializer=_init_worker, initargs=(cache, log_level, os.getpid())
    )
    try:
        futures = {executor.submit(_fill_in_worker, fill, task): task for task in tasks}
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


@dataclasses.dataclass(frozen=True)
class Coverage:
    """How many of the chunks some candidates need are cached: the answer of a key check (no value read).

    chunks: candidate rows asked about; missing: those whose chunk is not cached (`missing_rows`,
    (m,) int64 rows of the candidates); tasks: one `SeriesTask` per CT with a missing chunk (its
    missing centres); ct_bytes: (n,) int64 bytes of each task's CT in memory (int16 voxels, from
    its header; 0 when unreadable); seconds: what the check took.
    """

    chunks: int
    missing: int
    tasks: list[SeriesTask]
    missing_rows: np.ndarray
    ct_bytes: np.ndarray
    seconds: float

    @property
    def cts(self) -> int:
        return len(self.tasks)

    def cold_cost(self) -> str:
        """What reading the missing chunks costs without a prefill, against with one (for a log line)."""
        missing = np.array([t.missing for t in self.tasks], dtype=np.int64)
        return (
            f"DataLoader workers would crop each after loading its whole CT: up to {self.missing:,} CT loads "
            f"({format_gb(int((missing * self.ct_bytes).sum()))} read) where a prefill loads each CT once "
            f"({self.cts:,} loads, {format_gb(int(self.ct_bytes.sum()))})"
        )


def _ct_bytes(series_uid: str, data_root: Path) -> int:
    try:
        return 2 * int(np.prod(shape_irc_from_header(series_uid, data_root)))
    except P2chError:
        return 0


def chunk_coverage(
    cache: ChunkCache, candidates: CandidateArrays, indices: np.ndarray, width_irc: Sequence[int]
) -> Coverage:
    """Which chunks of candidates[indices] are not cached: a key check, CT by CT (reads only the index).

    indices: (n,) int rows of `candidates` (or an (N,) bool mask); repeated rows count once.
    width_irc: 3 ints. A CT whose files cannot be identified counts as wholly missing (its fill
    then reports it). LUNA16's 550,560 chunks took 2-3 s on a loaded 2-core VM (BENCHMARKS.md).
    """
    start = time.perf_counter()
    width = check_width_irc(width_irc)
    indices = np.asarray(indices).reshape(-1)
    indices = np.flatnonzero(indices) if indices.dtype == bool else np.unique(indices.astype(np.int64, copy=False))
    tasks, missing_rows = [], []
    for group in group_rows(candidates.series_index[indices]):
        rows = indices[group]
        uid = candidates.series_uid(int(rows[0]))
        centers = np.ascontiguousarray(candidates.center_xyz[rows])
        missing = _missing_or_all(cache, uid, centers, width)
        if missing.any():
            tasks.append(SeriesTask(uid, "", np.ascontiguousarray(centers[missing]), int(missing.sum())))
            missing_rows.append(rows[missing])
    rows_left = np.sort(np.concatenate(missing_rows)) if missing_rows else np.zeros(0, dtype=np.int64)
    ct_bytes = np.array([_ct_bytes(t.series_uid, cache.data_root) for t in tasks], dtype=np.int64)
    return Coverage(len(indices), len(rows_left), tasks, rows_left, ct_bytes, time.perf_counter() - start)


def _fill_workers(coverage: Coverage, num_workers: int) -> int:
    """The processes that fill `coverage`: `num_workers`, or 0 (this process) for a single CT or for CTs that
    load faster than worker processes start (`IN_PROCESS_CT_BYTES`)."""
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers {num_workers!r}: expected 0 or more")
    if coverage.cts < 2 or int(coverage.ct_bytes.sum()) < IN_PROCESS_CT_BYTES:
        return 0
    return num_workers


def _fill_tasks(cache: ChunkCache, tasks: list[SeriesTask], width, num_workers: int, progress: bool) -> Summary:
    fill = functools.partial(_fill_chunks, width=width)
    level = logging.getLogger().getEffectiveLevel()
    summary = _run_tasks(cache, tasks, fill, num_workers, Summary(), level, progress)
    summary.raise_if_failed(len(tasks))
    return summary


def fill_missing(
    cache: ChunkCache,
    candidates: CandidateArrays,
    indices: np.ndarray,
    width_irc: Sequence[int],
    *,
    num_workers: int = 0,
    progress: bool = True,
) -> int:
    """Cache the chunks of candidates[indices] that the cache lacks, one CT load per CT; returns how many it wrote.

    indices: (n,) int rows of `candidates` (or an (N,) bool mask). width_irc: 3 ints (index, row,
    col). num_workers: worker processes, each holding one CT (0: in this process). progress: show
    a bar / log progress lines. Candidates whose centre lies outside their CT are skipped (and
    logged). Raises CacheFullError / CacheDirError when the cache cannot be written, PrefillError
    (after caching the others) when some CTs cannot be read.
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers {num_workers!r}: expected 0 or more")
    coverage = chunk_coverage(cache, candidates, indices, width_irc)
    if not coverage.missing:
        return 0
    log.info("caching %d chunk(s) of %d CT(s) not in %s yet", coverage.missing, coverage.cts, cache.cache_dir)
    workers = _fill_workers(coverage, num_workers)
    return _fill_tasks(cache, coverage.tasks, check_width_irc(width_irc), workers, progress).written


def warm_chunk_cache(
    cache: ChunkCache,
    candidates: CandidateArrays,
    indices: np.ndarray,
    width_irc: Sequence[int],
    *,
    fill: bool = True,
    num_workers: int = 0,
    progress: bool = True,
    prepcache_command: str = "python -m p2ch.prepcache",
) -> Coverage:
    """Before the first batch of a run that reads candidates[indices]: check the cache, and fill what it lacks.

    The check (`chunk_coverage`) reads only keys. With `fill`, the missing chunks are cropped CT by CT
    in `num_workers` processes (0: here), with a progress bar and ETA, resumably (`fill_missing`'s
    way, far faster than DataLoader workers loading a whole CT per missing chunk); a candidate still
    missing afterwards lies outside its CT and raises CandidateOutsideCtError naming its CSV file and
    line. Without `fill`, one warning line says what is missing, what that costs and
    `prepcache_command`. Returns the coverage found before filling.
    """
    width = check_width_irc(width_irc)
    coverage = chunk_coverage(cache, candidates, indices, width)
    checked = f"key check of {coverage.chunks:,} chunks in {coverage.seconds:.2f} s"
    if not coverage.missing:
        log.info("chunk cache %s: every chunk this run reads is cached (%s)", cache.cache_dir, checked)
        return coverage
    share = f"{coverage.missing:,} of {coverage.chunks:,} chunks this run reads ({coverage.cts:,} CTs)"
    if not fill:
        log.warning(
            "chunk cache %s: %s are not cached; %s; fill it first with: %s", cache.cache_dir, share,
            coverage.cold_cost(), prepcache_command,
        )  # fmt: skip
        return coverage
    needed, free = coverage.missing * chunk_disk_bytes(width), free_bytes(cache.cache_dir)
    if free is not None and needed > free:
        raise CacheFullError(
            f"chunk cache {cache.cache_dir}: the {share} that are not cached need about {format_gb(needed)}, but its "
            f"disk has {format_gb(free)} free; free some space or point --cache-dir at a bigger disk"
        )
    workers = _fill_workers(coverage, num_workers)
    log.info(
        "chunk cache %s: %s are not cached (%s); filling them CT by CT with %s before the first batch "
        "(--no-prefill skips this)", cache.cache_dir, share, checked, _who_fills(workers),
    )  # fmt: skip
    _fill_tasks(cache, coverage.tasks, width, workers, progress)
    check_inside(cache, candidates, coverage.missing_rows, width)
    return coverage


def check_inside(cache: ChunkCache, candidates: CandidateArrays, rows: np.ndarray, width_irc: Sequence[int]) -> None:
    """After a fill of candidates[rows]: CandidateOutsideCtError, naming the CSV file and line, for the first
    row still not cached (a fill skips centres outside their CT; reading one again says why)."""
    left = chunk_coverage(cache, candidates, rows, width_irc).missing_rows
    for row in left.tolist():
        try:
            cache.get_ct_raw_candidate(candidates.series_uid(row), candidates.center_xyz[row], width_irc)
        except CandidateOutsideCtError as exc:
            where = row_location(candidates, row)
            others = f" ({len(left):,} rows of this run lie outside their CT)" if len(left) > 1 else ""
            raise CandidateOutsideCtError(f"{where + ': ' if where else ''}{exc}{others}") from None


# --- the slice cache (segmentation) -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SliceTask:
    """One CT of the slice cache: shape_irc from its header; `missing` its slices when it is not complete, else 0."""

    series_uid: str
    subset: str
    shape_irc: tuple[int, int, int]
    missing: int


@dataclasses.dataclass(frozen=True)
class SlicePlan:
    """What a slice prefill would do: the selected CTs, which are complete, and the bytes to write."""

    tasks: list[SliceTask]
    free_bytes: int | None

    @property
    def cts(self) -> int:
        return len(self.tasks)

    @property
    def cts_to_fill(self) -> int:
        return sum(1 for t in self.tasks if t.missing)

    @property
    def complete(self) -> int:
        return self.cts - self.cts_to_fill

    @property
    def slices(self) -> int:
        return sum(t.shape_irc[0] for t in self.tasks)

    @property
    def bytes_to_write(self) -> int:
        return sum(slice_disk_bytes(t.shape_irc) for t in self.tasks if t.missing)

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.bytes_to_write <= self.free_bytes


def slice_disk_bytes(shape_irc: Sequence[int]) -> int:
    """Estimated bytes on disk of one CT in the slice cache: its int16 slices in 4 KiB blocks plus their
    SQLite rows (the few compressed mask slices and the meta record are small beside them).
    """
    n_i, n_r, n_c = (int(v) for v in shape_irc)
    return n_i * (-(-2 * n_r * n_c // _BLOCK) * _BLOCK + _ROW_BYTES)


def shape_irc_from_header(series_uid: str, data_root: Path) -> tuple[int, int, int]:
    """A CT's (I, R, C) from its MetaIO header (DimSize is x, y, z): no voxels read."""
    dims = [int(v) for v in read_mhd_header(find_mhd(series_uid, data_root))["DimSize"].split()]
    return dims[2], dims[1], dims[0]


def _slice_task(cache: SliceCache, series_uid: str, subset: str, check_cache: bool) -> SliceTask:
    try:
        shape = shape_irc_from_header(series_uid, cache.data_root)
        complete = check_cache and cache.complete(series_uid)
    except CacheError:
        raise
    except P2chError as exc:  # a CT that cannot be identified: its fill fails and is reported with the others
        log.debug("%s: counted as not cached (%s)", series_uid, exc)
        return SliceTask(series_uid, subset, (1, 0, 0), 1)
    return SliceTask(series_uid, subset, shape, 0 if complete else shape[0])


def make_slice_plan(cache: SliceCache, subsets: Sequence[int] | None = None, check_cache: bool = True) -> SlicePlan:
    """Every CT on disk (optionally only those in subset folders `subsets`), with or without annotations.

    With `check_cache`, CTs whose meta record is present and current count as complete (reads
    the store's index and annotations.csv; creates nothing). Raises DataNotFoundError when the
    data root holds no CT.
    """
    index = series_index(cache.data_root)
    if not index:
        raise DataNotFoundError(no_data_message(cache.data_root))
    folds = {uid: subset_of(path) for uid, path in index.items()}
    wanted = _wanted_subsets(subsets, folds, cache.data_root)
    tasks = [
        _slice_task(cache, uid, path.parent.name, check_cache)
        for uid, path in sorted(index.items())
        if wanted is None or folds[uid] in wanted
    ]
    return SlicePlan(tasks, free_bytes(cache.cache_dir))


def _fill_slices(cache: SliceCache, task: SliceTask) -> SliceFillResult | str:
    """Fill one CT of the slice cache: its SliceFillResult, or a line naming the CT when it cannot be done."""
    try:
        return cache.fill_series(task.series_uid)
    except CacheError:
        raise  # cache full or unwritable: stop everything
    except P2chError as exc:  # missing or unreadable CT, bad annotation: report it, go on with the others
        return f"{task.series_uid}: {exc}"


@dataclasses.dataclass
class SliceSummary:
    """Totals of a slice prefill: CTs filled, records written and found present, CT bytes read."""

    cts: int = 0
    written: int = 0
    present: int = 0
    ct_bytes: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def add(self, task: SliceTask, result: SliceFillResult | str) -> None:
        if isinstance(result, str):
            self.failed.append(result)
            log.error("%s", result)
            return
        self.cts += 1
        self.written += result.written
        self.present += result.present
        self.ct_bytes += result.ct_bytes

    def raise_if_failed(self, cts: int) -> None:
        """PrefillError naming the first CT that could not be filled (of the `cts` tried), if any."""
        _raise_if_failed(self.failed, cts)


def run_slice_prefill(
    cache: SliceCache, plan: SlicePlan, num_workers: int, summary: SliceSummary, log_level: int = logging.INFO
) -> SliceSummary:
    """Fill every incomplete CT of `plan`, `num_workers` processes (0: in this process); updates `summary`."""
    return _run_tasks(cache, plan.tasks, _fill_slices, num_workers, summary, log_level, progress=True, unit="slice")


def fill_slices(
    cache: SliceCache,
    series_uids: Sequence[str] | np.ndarray,
    *,
    num_workers: int = 0,
    progress: bool = True,
    fill: bool = True,
    prepcache_command: str = "python -m p2ch.prepcache --segmentation",
) -> int:
    """Fill the slice cache for these CTs, one CT load per CT not complete yet; returns how many CTs it filled.

    num_workers: worker processes, each holding one CT and its labels (0: in this process).
    progress: show a bar / log progress lines. fill False (--no-prefill): fill nothing, only log one
    warning with the CTs missing and `prepcache_command` (a `SliceCache` writes a CT when it is first
    read). Raises CacheFullError / CacheDirError when the cache cannot be written, PrefillError
    (after filling the others) when some CTs cannot be read or have an annotation outside the CT.
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers {num_workers!r}: expected 0 or more")
    uids = sorted({str(uid) for uid in np.asarray(series_uids, dtype=str).reshape(-1)})
    tasks = [task for task in (_slice_task(cache, uid, "", True) for uid in uids) if task.missing]
    if not tasks:
        log.info("slice cache %s: every one of the %d CT(s) this run reads is cached", cache.directory, len(uids))
        return 0
    if not fill:
        log.warning(
            "slice cache %s: %d of %d CT(s) this run reads are not cached; the datasets will write each one in the "
            "main process when they first read it, one at a time; fill them first with: %s",
            cache.directory, len(tasks), len(uids), prepcache_command,
        )  # fmt: skip
        return 0
    log.info(
        "slice cache %s: %d of %d CT(s) this run reads are not cached; filling them CT by CT with %s before the "
        "first batch (--no-prefill skips this)", cache.directory, len(tasks), len(uids), _who_fills(num_workers),
    )  # fmt: skip
    level = logging.getLogger().getEffectiveLevel()
    summary = _run_tasks(cache, tasks, _fill_slices, num_workers, SliceSummary(), level, progress, unit="slice")
    summary.raise_if_failed(len(tasks))
    return summary.cts


def _who_fills(num_workers: int) -> str:
    """Who fills: "N worker process(es)" or "this process"."""
    if not num_workers:
        return "this process"
    return f"{num_workers} worker process" + ("es" if num_workers > 1 else "")
