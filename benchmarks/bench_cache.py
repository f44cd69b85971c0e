"""Chunk cache: bytes per chunk, cold and warm read rates, compressed mode, prefill throughput.

Makes a CT-like synthetic LUNA16-layout data set in a temporary folder (or uses `--data-root`),
then measures, on one core unless noted:

- size: bytes on disk per chunk (value files + SQLite, from st_blocks) of `p2ch.cache` and of
  the book's format (diskcache pickling a (float32 chunk, center_irc) tuple), on the same chunks;
- cold reads: `ChunkCache.get_ct_raw_candidate` on an empty cache, series by series (miss → crop
  → encode → write; CT loads counted apart);
- warm reads: the same calls on a full cache in random order, CRC check on and off, and the
  book's format read with stock diskcache for comparison;
- compressed mode (zlib level 1): size, cold and warm rates;
- prefill: `python -m p2ch.prepcache`'s code path (`p2ch.prefill.run_prefill`) with each
  `--workers-list` count: seconds, MB/s of CT read, chunks/s.

    .venv/bin/python benchmarks/bench_cache.py
    .venv/bin/python benchmarks/bench_cache.py --workers-list 1 2 16 --num-cts 16
    .venv/bin/python benchmarks/bench_cache.py --data-root data-unversioned/part2/luna --limit 5000

Prints figures and one JSON line. CT files are read from the page cache (they were just written
or read); on a cold disk prefill MB/s is bounded by the disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from p2ch import ct as ct_module
from p2ch.cache import BOOK_CHUNK_BYTES, ChunkCache
from p2ch.candidates import clear_candidate_cache, get_candidate_arrays
from p2ch.errors import P2chError
from p2ch.geometry import DEFAULT_WIDTH_IRC


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers-list", type=int, nargs="+", default=[1, 2], help="prefill worker counts to time")
    parser.add_argument("--warm-seconds", type=float, default=3.0, help="time spent on each warm-read figure")
    parser.add_argument(
        "--sample", type=int, default=500, help="chunks used for the book-format and compressed-mode comparisons"
    )
    parser.add_argument("--data-root", help="an existing LUNA16-layout data set (default: make a synthetic one)")
    parser.add_argument("--work-dir", help="folder for data and caches (default: a temporary one, removed)")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only candidates of the first N series in order until this many candidates",
    )
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the warm read path")
    g = parser.add_argument_group("synthetic data set (without --data-root)")
    g.add_argument("--num-cts", type=int, default=4)
    g.add_argument("--size", type=int, default=512, help="in-plane voxels (rows = cols); LUNA16: 512")
    g.add_argument("--slices", type=int, default=128, help="LUNA16: 95-764, mean about 250")
    g.add_argument("--candidates-per-ct", type=int, default=600, help="LUNA16: about 620 on average")
    g.add_argument("--seed", type=int, default=0)
    return parser


def make_ct_like(rng: np.random.Generator, slices: int, size: int) -> np.ndarray:
    """(slices, size, size) int16 HU: air outside an elliptic body, soft tissue, two lungs, noise."""
    i = np.linspace(-1, 1, slices, dtype=np.float32)[:, None, None]
    r = np.linspace(-1, 1, size, dtype=np.float32)[None, :, None]
    c = np.linspace(-1, 1, size, dtype=np.float32)[None, None, :]
    hu = np.full((slices, size, size), -1000.0, dtype=np.float32)
    body = (r / 0.75) ** 2 + (c / 0.9) ** 2 < 1
    hu = np.where(body, 40.0, hu)
    for side in (-0.42, 0.42):
        lung = ((r + 0.05) / 0.55) ** 2 + ((c - side) / 0.33) ** 2 + (i / 1.2) ** 2 < 1
        hu = np.where(lung, -850.0, hu)
    hu += rng.normal(0, 20, hu.shape).astype(np.float32)
    return np.clip(hu, -3024, 3071).astype(np.int16)


def make_data(root: Path, args) -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(args.seed)
    rows = []
    for k in range(args.num_cts):
        uid = f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{900000000000 + k}"
        folder = root / f"subset{k % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        spacing = (0.7, 0.7, 2.5)
        origin = (-180.0, -180.0, -300.0 - 10 * k)
        image = sitk.GetImageFromArray(make_ct_like(rng, args.slices, args.size))
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        sitk.WriteImage(image, str(folder / f"{uid}.mhd"))
        irc = rng.integers(0, (args.slices, args.size, args.size), (args.candidates_per_ct, 3))
        for i, r, c in irc:
            rows.append(
                f"{uid},{origin[0] + c * spacing[0]},{origin[1] + r * spacing[1]},"
                f"{origin[2] + i * spacing[2]},{int(rng.random() < 0.01)}"
            )
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n" + "\n".join(rows) + "\n")
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")


def du(path: Path, pattern: str = "*") -> int:
    """Bytes allocated on disk by the files matching `pattern` under `path` (st_blocks)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob(pattern) if p.is_file())


def sizes(path: Path, chunks: int) -> dict:
    """Bytes per chunk on disk: value files alone, and everything (SQLite files included)."""
    return {"value_file_bytes_per_chunk": du(path, "*.val") / chunks, "bytes_per_chunk_on_disk": du(path) / chunks}


def candidate_list(data_root: Path, limit: int | None):
    arrays = get_candidate_arrays(data_root)
    order = np.argsort(arrays.series_index, kind="stable")  # series by series, as prepcache does
    if limit:
        order = order[:limit]
    return [(arrays.series_uid(int(k)), tuple(float(v) for v in arrays.center_xyz[k])) for k in order]


def cold(cache: ChunkCache, items) -> dict:
    ct_seconds = 0.0
    start = time.perf_counter()
    previous = None
    for uid, xyz in items:
        if uid != previous:  # time the CT load apart: it is the same for any cache
            t0 = time.perf_counter()
            cache._sources_here().ct(uid)
            ct_seconds += time.perf_counter() - t0
            previous = uid
        cache.get_ct_raw_candidate(uid, xyz)
    total = time.perf_counter() - start
    return {
        "chunks": len(items),
        "seconds": total,
        "ct_load_seconds": ct_seconds,
        "chunks_per_s": len(items) / total,
        "chunks_per_s_excluding_ct_load": len(items) / max(total - ct_seconds, 1e-9),
    }


def warm(read, items, seconds: float, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for k in order[:2000]:
            read(*items[k])
        n += min(2000, len(order))
        order = np.roll(order, 2000)
    elapsed = time.perf_counter() - start
    return {"chunks": n, "seconds": elapsed, "chunks_per_s": n / elapsed, "us_per_chunk": 1e6 * elapsed / n}


def book_format(work: Path, cache: ChunkCache, items) -> dict:
    """The book's cache: diskcache memoising (float32 chunk, center_irc) with its default pickling."""
    import diskcache

    book = diskcache.FanoutCache(str(work / "book-cache"), shards=64, timeout=1, size_limit=3e11)
    keys = []
    for uid, xyz in items:
        chunk, center_irc = cache.get_ct_raw_candidate(uid, xyz)
        key = (uid, xyz)
        book.set(key, (chunk.astype(np.float32), tuple(center_irc)), retry=True)
        keys.append(key)
    book.close()  # checkpoints and removes the SQLite write-ahead logs

    def read(uid, xyz):
        return book.get((uid, xyz), retry=True)

    return {**sizes(work / "book-cache", len(items)), "warm": warm(read, items, 1.5)}


def prefill(data_root: Path, work: Path, workers: int, limit: int | None) -> dict:
    from p2ch import prefill as prefill_lib

    cache_dir = work / f"prefill-{workers}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = ChunkCache(cache_dir, data_root)
    plan = prefill_lib.make_plan(cache)
    if limit:  # whole CTs until `limit` chunks
        tasks, total = [], 0
        for task in plan.tasks:
            if total >= limit:
                break
            tasks.append(task)
            total += len(task.centers_xyz)
        plan = dataclasses.replace(plan, tasks=tasks)
    summary = prefill_lib.Summary()
    prefill_lib.run_prefill(cache, plan, workers, summary, log_level=40)
    seconds = summary.seconds
    result = {
        "workers": workers,
        "cts": summary.cts,
        "chunks": summary.written,
        "seconds": seconds,
        "ct_mb_per_s": summary.ct_bytes / 1e6 / seconds,
        "chunks_per_s": summary.written / seconds,
        "bytes_on_disk": du(cache_dir),
    }
    shutil.rmtree(cache_dir, ignore_errors=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.data_root:
            data_root = Path(args.data_root)
        else:
            data_root = work / "luna"
            t0 = time.perf_counter()
            make_data(data_root, args)
            print(
                f"synthetic data: {args.num_cts} CTs of {args.slices}x{args.size}x{args.size} int16, "
                f"{args.candidates_per_ct} candidates each ({time.perf_counter() - t0:.1f} s to make)"
            )
        ct_module.clear_caches()
        clear_candidate_cache()
        items = candidate_list(data_root, args.limit)
        results: dict = {
            "benchmark": "bench_cache",
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
            "python": platform.python_version(),
            "chunks": len(items),
            "data_root": str(args.data_root) if args.data_root else "synthetic",
            "width_irc": list(DEFAULT_WIDTH_IRC),
        }

        cache = ChunkCache(work / "cache", data_root)
        results["cold"] = cold(cache, items)
        cache.close()  # checkpoints and removes the SQLite write-ahead logs
        results["size"] = {**sizes(work / "cache", len(items)), "float32_chunk_bytes": BOOK_CHUNK_BYTES}
        results["size"]["fraction_of_float32"] = results["size"]["bytes_per_chunk_on_disk"] / BOOK_CHUNK_BYTES
        reader = ChunkCache(work / "cache", data_root)
        results["warm"] = warm(reader.get_ct_raw_candidate, items, args.warm_seconds)
        assert reader.stats()["misses"] == 0, reader.stats()
        no_crc = ChunkCache(work / "cache", data_root, verify=False)
        results["warm_no_crc"] = warm(no_crc.get_ct_raw_candidate, items, args.warm_seconds)
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            warm(reader.get_ct_raw_candidate, items, 1.0)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)

        sample = items[: args.sample]
        book = book_format(work, reader, sample)
        results["book_format"] = book
        results["size"]["book_bytes_per_chunk_on_disk"] = book["bytes_per_chunk_on_disk"]
        results["size"]["book_value_file_bytes_per_chunk"] = book["value_file_bytes_per_chunk"]
        results["size"]["fraction_of_book_on_disk"] = (
            results["size"]["bytes_per_chunk_on_disk"] / book["bytes_per_chunk_on_disk"]
        )

        packed = ChunkCache(work / "cache-zlib", data_root, compress_level=1)
        packed_cold = cold(packed, sample)
        packed.close()
        packed_size = sizes(work / "cache-zlib", len(sample))
        packed_reader = ChunkCache(work / "cache-zlib", data_root)
        results["zlib1"] = {
            **packed_size,
            "cold": packed_cold,
            "warm": warm(packed_reader.get_ct_raw_candidate, sample, args.warm_seconds),
        }

        results["prefill"] = [prefill(data_root, work, w, args.limit) for w in args.workers_list]
    except P2chError as exc:
        print(f"bench_cache: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    s, c, w, z = results["size"], results["cold"], results["warm"], results["zlib1"]
    print(f"chunks: {len(items)} of {'x'.join(map(str, DEFAULT_WIDTH_IRC))}  ({results['machine']})")
    print(
        f"size on disk per chunk: {s['bytes_per_chunk_on_disk']:,.0f} B with SQLite "
        f"({s['value_file_bytes_per_chunk']:,.0f} B value file) = {s['fraction_of_float32']:.1%} of a "
        f"float32 chunk's {BOOK_CHUNK_BYTES:,} B; book format {s['book_bytes_per_chunk_on_disk']:,.0f} B "
        f"({s['book_value_file_bytes_per_chunk']:,.0f} B value file); ours is "
        f"{s['fraction_of_book_on_disk']:.1%} of it"
    )
    print(
        f"cold reads (miss, crop, write): {c['chunks_per_s']:,.0f} chunks/s with CT loads, "
        f"{c['chunks_per_s_excluding_ct_load']:,.0f} chunks/s excluding them ({c['ct_load_seconds']:.1f} s "
        "of CT loading)"
    )
    print(
        f"warm reads, 1 core: {w['chunks_per_s']:,.0f} chunks/s ({w['us_per_chunk']:.1f} µs each); "
        f"without CRC check {results['warm_no_crc']['chunks_per_s']:,.0f} chunks/s; book format "
        f"{results['book_format']['warm']['chunks_per_s']:,.0f} chunks/s"
    )
    print(
        f"zlib level 1: {z['value_file_bytes_per_chunk']:,.0f} B value file per chunk "
        f"({z['value_file_bytes_per_chunk'] / s['value_file_bytes_per_chunk']:.1%} of raw int16), warm "
        f"{z['warm']['chunks_per_s']:,.0f} chunks/s, cold excluding CT loads "
        f"{z['cold']['chunks_per_s_excluding_ct_load']:,.0f} chunks/s"
    )
    for p in results["prefill"]:
        print(
            f"prefill, {p['workers']} worker(s): {p['cts']} CTs, {p['chunks']} chunks in "
            f"{p['seconds']:.1f} s: {p['ct_mb_per_s']:,.1f} MB/s of CT read, "
            f"{p['chunks_per_s']:,.0f} chunks/s"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
