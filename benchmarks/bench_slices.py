"""Slice cache (segmentation): prefill time, then warm reads/s of validation slabs and training crops.

Makes a synthetic LUNA16-layout set with `p2ch.synth` in a temporary folder (or uses `--data-root`),
then measures, in this process unless noted:

- prefill: `p2ch.prefill.fill_slices` (the code path of `python -m p2ch.prepcache --segmentation`)
  with `--num-workers` processes: seconds, CTs/s, MB/s of CT read, bytes on disk per CT; and,
  apart, the time `p2ch.masks` takes to build one CT's labels (part of each CT's fill);
- warm validation slabs: `SliceCache.slab(uid, k, context)` at random (CT, slice), reads/s and
  MB/s, with the CRC check on and off, and `Luna2dSegmentationDataset[k]` (adds the mask and
  the tensors);
- warm training crops: `SliceCache.crop(uid, nodule centre, 96, context)` (reads only the
  crop's rows of each slice) and, for comparison, the same crop cut from a whole-slice `slab`,
  and `TrainingLuna2dSegmentationDataset[k]`.

    .venv/bin/python benchmarks/bench_slices.py
    .venv/bin/python benchmarks/bench_slices.py --size 512 --slices 256 --num-cts 4 --num-workers 2

"Warm": the value files were just written or read, so they come from the page cache; from a cold
disk, reads are bounded by the disk. Prints figures and one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from p2ch import ct as ct_module
from p2ch import synth
from p2ch.ct import Ct
from p2ch.luna import series_index
from p2ch.prefill import fill_slices
from p2ch.segdatasets import Luna2dSegmentationDataset, TrainingLuna2dSegmentationDataset
from p2ch.slices import SliceCache, default_mask_builder


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-cts", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="in-plane voxels (rows = cols); LUNA16: 512")
    parser.add_argument("--slices", type=int, default=128, help="LUNA16: 95-764, about 250 on average")
    parser.add_argument("--nodules-per-ct", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0, help="prefill worker processes (0: this process)")
    parser.add_argument("--context-slices", type=int, default=3, help="slices on each side (the book's 3: 7 in all)")
    parser.add_argument("--crop-size", type=int, default=96)
    parser.add_argument("--warm-seconds", type=float, default=3.0, help="time spent on each read figure")
    parser.add_argument("--data-root", help="an existing LUNA16-layout data set (default: make a synthetic one)")
    parser.add_argument("--work-dir", help="folder for data and cache (default: a temporary one, removed)")
    return parser


def rate(call: Callable[[int], object], count: int, seconds: float) -> dict:
    """Calls of `call(n)` for n = 0, 1, … (cycling over `count` items) for about `seconds`: calls/s."""
    for n in range(min(count, 20)):  # warm-up: page cache, SQLite pages, per-process state
        call(n)
    done, start = 0, time.perf_counter()
    while True:
        for _ in range(16):
            call(done % count)
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return {"reads": done, "seconds": elapsed, "reads_per_s": done / elapsed}


def du(path: Path, pattern: str = "*") -> int:
    """Bytes allocated on disk by the files matching `pattern` under `path` (st_blocks)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob(pattern) if p.is_file())


def prefill(cache: SliceCache, uids: Sequence[str], num_workers: int) -> dict:
    start = time.perf_counter()
    filled = fill_slices(cache, uids, num_workers=num_workers, progress=False)
    seconds = time.perf_counter() - start
    ct_bytes = sum(find_raw_bytes(cache.data_root, uid) for uid in uids)
    ct = Ct(uids[0], cache.data_root)
    info = cache.info(uids[0])
    t0 = time.perf_counter()
    default_mask_builder(ct, info.nodule_center_xyz, info.nodule_diameter_mm)
    mask_seconds = time.perf_counter() - t0
    return {
        "cts": filled,
        "seconds": seconds,
        "cts_per_s": filled / seconds,
        "ct_mb_per_s": ct_bytes / 1e6 / seconds,
        "records": len(cache),
        "disk_bytes_per_ct": du(cache.directory) / len(uids),
        "value_file_bytes_per_ct": du(cache.directory, "*.val") / len(uids),
        "raw_bytes_per_ct": ct_bytes / len(uids),
        "mask_build_seconds_first_ct": mask_seconds,
        "nodules_first_ct": len(info.nodule_rows),
    }


def find_raw_bytes(data_root: Path, uid: str) -> int:
    return series_index(data_root)[uid].with_suffix(".raw").stat().st_size


def reads(cache: SliceCache, uids: Sequence[str], args) -> dict:
    rng = np.random.default_rng(args.seed)
    c, size = args.context_slices, args.crop_size
    infos = {uid: cache.info(uid) for uid in uids}
    slab_items = [(uid, int(rng.integers(infos[uid].shape_irc[0]))) for uid in rng.choice(uids, 2000)]
    nodules = [(uid, tuple(irc)) for uid in uids for irc in infos[uid].nodule_center_irc.tolist()]
    if not nodules:
        raise SystemExit("no annotated nodule in the data set: nothing to crop")
    slab_mb = (2 * c + 1) * infos[uids[0]].shape_irc[1] * infos[uids[0]].shape_irc[2] * 2 / 1e6
    unverified = SliceCache(cache.cache_dir, cache.data_root, verify=False)

    def crop_via_slab(n: int) -> None:
        uid, (i, r, col) = nodules[n % len(nodules)]
        slab = cache.slab(uid, i, c)
        half = size // 2
        slab[:, max(r - half, 0) : r - half + size, max(col - half, 0) : col - half + size].copy()
        cache.mask(uid, i)

    validation = Luna2dSegmentationDataset(cache, uids, c)
    order = rng.permutation(len(validation))
    training = TrainingLuna2dSegmentationDataset(cache, uids, c, size)
    figures = {
        "slab": rate(lambda n: cache.slab(*slab_items[n], c), len(slab_items), args.warm_seconds),
        "slab_no_crc": rate(lambda n: unverified.slab(*slab_items[n], c), len(slab_items), args.warm_seconds),
        "validation_item": rate(lambda n: validation[int(order[n])], len(order), args.warm_seconds),
        "crop": rate(lambda n: cache.crop(*nodules[n], size, c), len(nodules), args.warm_seconds),
        "crop_via_slab": rate(crop_via_slab, len(nodules), args.warm_seconds),
        "training_item": rate(lambda n: training[n], len(training), args.warm_seconds),
    }
    for name in ("slab", "slab_no_crc"):
        figures[name]["mb_per_s"] = figures[name]["reads_per_s"] * slab_mb
    figures["nodules"] = len(nodules)
    assert cache.stats()["filled"] == 0 and cache.stats()["corrupt"] == 0
    return figures


def report(results: dict) -> None:
    p, r, s = results["prefill"], results["reads"], results["settings"]
    shape = f"{s['context'] * 2 + 1}x{s['size']}x{s['size']}"
    crop = f"{s['context'] * 2 + 1}x{s['crop_size']}x{s['crop_size']}"
    print(f"data: {s['num_cts']} CTs of {s['slices']}x{s['size']}x{s['size']}, {r['nodules']} nodules")
    print(
        f"prefill ({s['num_workers']} workers): {p['seconds']:.1f} s, {p['cts_per_s']:.2f} CTs/s, "
        f"{p['ct_mb_per_s']:.0f} MB/s of CT; on disk per CT {p['value_file_bytes_per_ct'] / 1e6:.1f} MB of value "
        f"files, {p['disk_bytes_per_ct'] / 1e6:.1f} MB with SQLite ({p['raw_bytes_per_ct'] / 1e6:.1f} MB of .raw); "
        "p2ch.masks on the first CT "
        f"({p['nodules_first_ct']} nodules): {p['mask_build_seconds_first_ct']:.2f} s"
    )
    for name, what in (
        ("slab", f"validation slab {shape}, CRC on"),
        ("slab_no_crc", f"validation slab {shape}, CRC off"),
        ("validation_item", "Luna2dSegmentationDataset item"),
        ("crop", f"training crop {crop} + mask (crop rows only)"),
        ("crop_via_slab", f"training crop {crop} + mask cut from whole slices"),
        ("training_item", "TrainingLuna2dSegmentationDataset item"),
    ):
        extra = f", {r[name]['mb_per_s']:,.0f} MB/s" if "mb_per_s" in r[name] else ""
        print(f"  {what}: {r[name]['reads_per_s']:,.0f}/s{extra}")


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_slices_"))
    try:
        root = Path(args.data_root) if args.data_root else work / "luna"
        if not args.data_root:
            synth.generate(
                root,
                num_cts=args.num_cts,
                size=args.size,
                slices=args.slices,
                nodules_per_ct=args.nodules_per_ct,
                seed=args.seed,
                force=True,
            )
        ct_module.clear_caches()
        uids = sorted(series_index(root))
        cache_dir = work / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache = SliceCache(cache_dir, root)
        results = {
            "benchmark": "bench_slices",
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "settings": {
                "num_cts": len(uids),
                "size": args.size,
                "slices": args.slices,
                "context": args.context_slices,
                "crop_size": args.crop_size,
                "num_workers": args.num_workers,
            },
            "prefill": prefill(cache, uids, args.num_workers),
            "reads": reads(cache, uids, args),
        }
        report(results)
        print(json.dumps(results))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
