"""`python -m p2ch.prepcache`: fill the chunk cache before training, one CT per worker process.

A thin command over `p2ch.prefill` (planning, the worker pool, resuming; see its docstring)
and `ChunkCache.prune` / `clear`: flags in, one report out. Resumable: after Ctrl-C or a kill
the same command carries on where it stopped.

    python -m p2ch.prepcache --dry-run             # how much would be written, and is there room?
    python -m p2ch.prepcache --num-workers 8       # fill it
    python -m p2ch.prepcache --subsets 0 1 2       # only CTs in subset0..2
    python -m p2ch.prepcache --prune               # delete entries of changed CTs / old formats
    python -m p2ch.prepcache --segmentation        # the slice cache of the segmentation model instead
    python -m p2ch.prepcache --malignant           # also the malignancy rows' chunks (the book's chapter 14)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from p2ch.cache import CacheFullError, ChunkCache
from p2ch.cli import configure_logging, run_cli
from p2ch.config import DefaultsHelpFormatter, check_output_dir, resolve_cache_dir, resolve_data_root
from p2ch.errors import ConfigError, P2chError
from p2ch.geometry import DEFAULT_WIDTH_IRC
from p2ch.prefill import (
    Plan,
    SlicePlan,
    SliceSummary,
    Summary,
    check_room,
    format_gb,
    make_plan,
    make_slice_plan,
    run_prefill,
    run_slice_prefill,
    slice_disk_bytes,
)
from p2ch.slices import SliceCache

PROG = "python -m p2ch.prepcache"
# What to do when the estimate exceeds the free space (the flags of this command).
ROOM_ADVICE = "free some space, cache fewer CTs (--subsets 0 1 …), point --cache-dir at a bigger disk, or pass --force"
# For scale in the --segmentation report: LUNA16's 888 CTs, about 250 slices of 512 x 512 each on average.
LUNA16_SLICE_SHAPE = (888 * 250, 512, 512)


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
    parser.add_argument(
        "--malignant",
        action="store_true",
        help="also cache the chunks at the nodule centres of annotations_with_malignancy.csv (the book's "
        "chapter 14 file; it must be in the data root), which training the malignancy model reads",
    )
    _add_maintenance_arguments(parser)
    return parser


def _add_maintenance_arguments(parser: argparse.ArgumentParser) -> None:
    """--clear, --dry-run, --force, --prune, --log-level."""
    parser.add_argument(
        "--segmentation",
        action="store_true",
        help="fill the segmentation model's slice cache (<cache-dir>/segmentation/: every CT's int16 slices, "
        "nodule masks and meta) instead of the chunk cache; --clear and --dry-run then apply to it",
    )
    parser.add_argument("--clear", action="store_true", help="delete every cached chunk (or slice) first")
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


def _report_plan(plan: Plan, cache: ChunkCache, out) -> None:
    print(f"cache: {cache.cache_dir}   data: {cache.data_root}", file=out)
    print(
        f"CTs: {plan.cts} ({plan.cts_to_load} to load)   chunks: {plan.chunks:,} of "
        f"{'x'.join(map(str, plan.width_irc))} voxels",
        file=out,
    )
    print(
        f"already cached: {plan.cached:,}   to write: {plan.to_write:,} = "
        f"{format_gb(plan.bytes_to_write)} (about {plan.bytes_per_chunk:,} bytes each as int16)",
        file=out,
    )
    print(
        f"(for scale: all 551,065 LUNA16 candidates take about {format_gb(551_065 * plan.bytes_per_chunk)} "
        "at this size)",
        file=out,
    )
    print(
        f"free on the cache disk: {format_gb(plan.free_bytes)}"
        + ("" if plan.fits else "   NOT ENOUGH: free space, use --subsets, or pass --force"),
        file=out,
    )


def _report_summary(summary: Summary, plan: Plan, cache: ChunkCache, out) -> None:
    seconds = max(summary.seconds, 1e-9)
    print(
        f"prefill done: {summary.cts} CTs, {summary.written:,} chunks written, "
        f"{plan.cached + summary.present:,} already present, {summary.outside:,} outside their CT; "
        f"cache {cache.cache_dir}: {len(cache):,} entries, {format_gb(cache.volume())} on disk; "
        f"{summary.seconds:.1f} s, {summary.ct_bytes / 1e6 / seconds:,.1f} MB/s of CT read, "
        f"{summary.written / seconds:,.1f} chunks/s",
        file=out,
    )


def _prune(cache: ChunkCache, dry_run: bool) -> int:
    result = cache.prune(dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    print(
        f"prune {cache.cache_dir}: {verb} {result.removed:,} entries ({result.old_format:,} old "
        f"format, {result.changed_ct:,} of changed CTs, {result.missing_ct:,} of CTs no longer "
        f"under {cache.data_root}); kept {result.kept:,}"
        + (f"; {result.foreign:,} foreign entries left alone" if result.foreign else "")
        + (
            f"; {verb} {result.orphan_files:,} orphan value files and {result.lost_files:,} entries without their file"
            if result.orphan_files or result.lost_files
            else ""
        )
    )
    return 0


@dataclasses.dataclass
class _Run:
    """How far this run got (for the Ctrl-C message)."""

    summary: Summary = dataclasses.field(default_factory=Summary)
    cache: ChunkCache | None = None
    plan: Plan | None = None
    slice_summary: SliceSummary = dataclasses.field(default_factory=SliceSummary)
    slice_plan: SlicePlan | None = None

    def interrupted(self) -> str:
        where = ""
        if self.slice_plan is not None:
            where = f" after {self.slice_summary.cts} of {self.slice_plan.cts_to_fill} CTs"
            return f"interrupted{where}; rerun the same command to resume (complete CTs are skipped)"
        if self.plan is not None and self.cache is not None:
            with contextlib.suppress(P2chError):
                where = (
                    f" after {self.summary.cts} of {self.plan.cts_to_load} CTs; the cache holds "
                    f"{len(self.cache):,} entries, {self.plan.chunks:,} planned"
                )
        return f"interrupted{where}; rerun the same command to resume (cached chunks are skipped)"


def _prepcache(args: argparse.Namespace, run: _Run) -> int:
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers {args.num_workers}: expected 0 or more")
    if not args.dry_run:  # before the first CT is read
        check_output_dir(resolve_cache_dir(args.cache_dir), "--cache-dir")
    if args.segmentation:
        return _prepcache_slices(args, run)
    cache = run.cache = ChunkCache(
        resolve_cache_dir(args.cache_dir), resolve_data_root(args.data_root), compress_level=args.compress_level
    )
    width = tuple(args.width_irc)
    if min(width) < 1:
        raise ConfigError(f"--width-irc {' '.join(map(str, width))}: expected 3 positive integers")
    if args.prune:
        return _prune(cache, args.dry_run)
    if args.clear:
        if args.dry_run:
            print(f"would clear {len(cache):,} entries from {cache.cache_dir}")
        else:
            print(f"cleared {cache.clear():,} entries from {cache.cache_dir}", file=sys.stderr)
    plan = run.plan = make_plan(
        cache, width, args.subsets, check_cache=not (args.clear and args.dry_run), malignant=args.malignant
    )
    if args.dry_run:
        _report_plan(plan, cache, sys.stdout)
        return 0
    _report_plan(plan, cache, sys.stderr)
    if not args.force:
        check_room(plan, cache, ROOM_ADVICE)
    run_prefill(cache, plan, args.num_workers, run.summary, getattr(logging, args.log_level))
    _report_summary(run.summary, plan, cache, sys.stdout)
    run.summary.raise_if_failed(plan.cts_to_load)
    return 0


# --- the segmentation model's slice cache ----------------------------------------------------


def _report_slice_plan(plan: SlicePlan, cache: SliceCache, out) -> None:
    print(f"slice cache: {cache.directory}   data: {cache.data_root}", file=out)
    print(f"CTs: {plan.cts} ({plan.complete} complete, {plan.cts_to_fill} to fill)   slices: {plan.slices:,}", file=out)
    print(
        f"to write: about {format_gb(plan.bytes_to_write)} (int16 slices; the nodule masks and meta records are small)",
        file=out,
    )
    print(
        f"(for scale: all of LUNA16, 888 CTs of about 250 slices of 512x512, takes about "
        f"{format_gb(slice_disk_bytes(LUNA16_SLICE_SHAPE))})",
        file=out,
    )
    print(
        f"free on the cache disk: {format_gb(plan.free_bytes)}"
        + ("" if plan.fits else "   NOT ENOUGH: free space, use --subsets, or pass --force"),
        file=out,
    )


def _report_slice_summary(summary: SliceSummary, cache: SliceCache, out) -> None:
    seconds = max(summary.seconds, 1e-9)
    print(
        f"slice prefill done: {summary.cts} CTs filled, {summary.written:,} records written, "
        f"{summary.present:,} already present; slice cache {cache.directory}: {len(cache):,} records, "
        f"{format_gb(cache.volume())} on disk; {summary.seconds:.1f} s, "
        f"{summary.ct_bytes / 1e6 / seconds:,.1f} MB/s of CT read, {summary.cts / seconds:,.2f} CTs/s",
        file=out,
    )


def _prepcache_slices(args: argparse.Namespace, run: _Run) -> int:
    if args.prune:
        raise ConfigError("--prune applies to the chunk cache; to renew the slice cache use --segmentation --clear")
    if tuple(args.width_irc) != DEFAULT_WIDTH_IRC or args.compress_level or args.malignant:
        raise ConfigError(
            "--width-irc, --compress-level and --malignant apply to the chunk cache, not to --segmentation"
        )
    cache = SliceCache(resolve_cache_dir(args.cache_dir), resolve_data_root(args.data_root))
    if args.clear:
        if args.dry_run:
            print(f"would clear {len(cache):,} records from {cache.directory}")
        else:
            print(f"cleared {cache.clear():,} records from {cache.directory}", file=sys.stderr)
    plan = run.slice_plan = make_slice_plan(cache, args.subsets, check_cache=not (args.clear and args.dry_run))
    if args.dry_run:
        _report_slice_plan(plan, cache, sys.stdout)
        return 0
    _report_slice_plan(plan, cache, sys.stderr)
    if not args.force and not plan.fits:
        raise CacheFullError(
            f"filling {plan.cts_to_fill} CTs needs about {format_gb(plan.bytes_to_write)} but the disk of "
            f"{cache.cache_dir} has {format_gb(plan.free_bytes)} free; {ROOM_ADVICE}"
        )
    run_slice_prefill(cache, plan, args.num_workers, run.slice_summary, getattr(logging, args.log_level))
    _report_slice_summary(run.slice_summary, cache, sys.stdout)
    run.slice_summary.raise_if_failed(plan.cts_to_fill)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(args.log_level)
    run = _Run()
    return run_cli(PROG, lambda: _prepcache(args, run), interrupted=run.interrupted)


if __name__ == "__main__":
    sys.exit(main())
