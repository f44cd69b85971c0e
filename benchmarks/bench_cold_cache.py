"""A run on a cold chunk cache, with and without the fill before the first batch (issue 25).

Three figures, each as a ratio within one run of this script:

1. The key check at LUNA16's scale: `p2ch.prefill.chunk_coverage` over 888 series of 620 candidates
   (550,560 chunks) in a cache that holds them all, against the lookup per key (`ByteStore.contains`)
   it replaced. The rows are written straight into the shards' SQLite index (no value files: a key
   check reads nothing else), and the series' file identities are preset, so no CT files are needed.
2. The loader from a cold cache: one shuffled epoch of `--epoch-size` training samples of a
   `synth --size 512` set through `create_loader` (`--workers` processes), read cold (every miss
   loads its whole CT in a worker), against `warm_chunk_cache` (CT by CT in the prefill pool) and
   then the same epoch warm. Samples/s of the cold epoch, of the fill plus the warm epoch, and of the
   warm epoch alone. And one fill (every 8th candidate) in this process against `--workers` worker
   processes, which take seconds to start (why small fills run in this process).
3. The first epoch of `python -m p2ch.training` on that set from a cold cache, with `--no-prefill`
   and with the default fill: wall time, and the data-wait share of the training and validation
   passes (TensorBoard's perf/data_wait_fraction).

    .venv/bin/python benchmarks/bench_cold_cache.py                       # all three
    .venv/bin/python benchmarks/bench_cold_cache.py --parts keys          # the key check only
    .venv/bin/python benchmarks/bench_cold_cache.py --num-cts 6 --epoch-size 256 --workers 2
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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from p2ch import prefill
from p2ch.cache import ChunkCache
from p2ch.candidates import CandidateArrays, get_candidate_arrays
from p2ch.datasets import LunaDataset, ShuffleSampler, create_loader, split_candidates
from p2ch.prefill import chunk_coverage, warm_chunk_cache

WIDTH_IRC = (32, 48, 48)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parts = ("keys", "loader", "fill", "training")
    parser.add_argument("--parts", nargs="+", choices=parts, default=list(parts), help="what to measure")
    g = parser.add_argument_group("key check")
    g.add_argument("--series", type=int, default=888, help="series of the key check (LUNA16: 888)")
    g.add_argument("--per-series", type=int, default=620, help="chunks per series (LUNA16: 551,065 / 888)")
    g.add_argument("--lookups", type=int, default=50_000, help="keys timed one lookup at a time")
    g = parser.add_argument_group("loader and training (a synthetic set of real-size CTs)")
    g.add_argument("--num-cts", type=int, default=6)
    g.add_argument("--size", type=int, default=512, help="rows and columns per slice (LUNA16: 512)")
    g.add_argument("--slices", type=int, default=128)
    g.add_argument("--candidates-per-ct", type=int, default=600)
    g.add_argument("--epoch-size", type=int, default=256, help="training samples of the epoch")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers, and prefill processes")
    g.add_argument("--max-val-batches", type=int, default=8, help="validation batches of the training run")
    g.add_argument("--work", default=None, help="folder for the data set, caches and runs (default: a temporary one)")
    return parser


# --- 1. the key check at LUNA16's scale ----------------------------------------------------------


def _fake_candidates(series: int, per_series: int, seed: int = 0) -> CandidateArrays:
    rng = np.random.default_rng(seed)
    n = series * per_series
    return CandidateArrays(
        series_uids=np.array([f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{100000 + s}" for s in range(series)]),
        series_index=np.repeat(np.arange(series, dtype=np.int32), per_series),
        center_xyz=rng.uniform(-200, 200, size=(n, 3)).round(3),
        is_nodule=np.zeros(n, dtype=bool),
        has_annotation=np.zeros(n, dtype=bool),
        is_mal=np.zeros(n, dtype=bool),
        diameter_mm=np.zeros(n, dtype=np.float32),
    )


def _index_rows(cache: ChunkCache, keys: list[str]) -> None:
    """The index rows of `keys` written straight into the shards (what a key check reads; no value files)."""
    fanout = cache.diskcache  # opens (and creates) the store
    per_shard: dict[int, list[tuple[str, str]]] = {}
    for key in keys:
        per_shard.setdefault(fanout._hash(key) % len(fanout._shards), []).append((key, "bench"))
    for index, rows in per_shard.items():
        connection = fanout._shards[index]._con
        with connection:
            connection.executemany(
                "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, "
                "filename, value) VALUES (?, 1, 0, NULL, 0, 0, ?, 0, 4, NULL, NULL)",
                rows,
            )


def bench_keys(args: argparse.Namespace, work: Path) -> dict:
    candidates = _fake_candidates(args.series, args.per_series)
    cache = ChunkCache(work / "key-cache", work / "no-data")
    sources = cache._sources_here()
    for uid in candidates.series_uids.tolist():  # no CT files: a fixed identity per series
        sources.identities[uid] = "1000.1.2000.2"
    keys = [cache.key(candidates.series_uid(k), candidates.center_xyz[k], WIDTH_IRC) for k in range(len(candidates))]
    start = time.perf_counter()
    _index_rows(cache, keys)
    print(f"key check: {len(keys):,} index rows written in {time.perf_counter() - start:.1f} s", flush=True)
    rows = np.arange(len(candidates))
    checks = []
    for _ in range(3):
        start = time.perf_counter()
        coverage = chunk_coverage(cache, candidates, rows, WIDTH_IRC)
        checks.append(time.perf_counter() - start)
        assert coverage.missing == 0, coverage.missing
    sample = np.random.default_rng(1).choice(len(keys), size=min(args.lookups, len(keys)), replace=False)
    start = time.perf_counter()
    found = sum(cache.store.contains(keys[k]) for k in sample.tolist())
    per_key = (time.perf_counter() - start) / len(sample)
    assert found == len(sample)
    best = min(checks)
    result = {
        "chunks": len(keys),
        "series": args.series,
        "check_s": [round(t, 2) for t in checks],
        "check_us_per_chunk": round(best / len(keys) * 1e6, 2),
        "lookup_us_per_chunk": round(per_key * 1e6, 2),
        "lookup_s_extrapolated": round(per_key * len(keys), 1),
        "ratio": round(per_key * len(keys) / best, 1),
    }
    print(
        f"key check of {len(keys):,} chunks: {best:.2f} s ({result['check_us_per_chunk']} µs/chunk); one lookup per "
        f"key: {result['lookup_us_per_chunk']} µs/chunk, {result['lookup_s_extrapolated']} s for all "
        f"({result['ratio']}x)",
        flush=True,
    )
    return result


# --- 2. the loader from a cold cache ---------------------------------------------------------------


def make_set(args: argparse.Namespace, work: Path) -> Path:
    root = work / "luna"
    if (root / "candidates.csv").is_file():
        return root
    from p2ch.synth import generate

    start = time.perf_counter()
    generate(
        root, num_cts=args.num_cts, size=args.size, slices=args.slices, candidates_per_ct=args.candidates_per_ct,
        seed=0, workers=min(2, os.cpu_count() or 1),
    )  # fmt: skip
    print(f"synthetic set: {args.num_cts} CTs of {args.slices}x{args.size}x{args.size} in "
          f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    return root


def _epoch(dataset: LunaDataset, sampler: ShuffleSampler, args: argparse.Namespace) -> tuple[int, float]:
    loader = create_loader(dataset, sampler, batch_size=args.batch_size, num_workers=args.workers)
    start = time.perf_counter()
    samples = sum(batch.chunk.shape[0] for batch in loader)
    seconds = time.perf_counter() - start
    del loader
    return samples, seconds


def bench_loader(args: argparse.Namespace, work: Path, root: Path) -> dict:
    candidates = get_candidate_arrays(root)
    split = split_candidates(candidates, "series", val_fraction=0.2)
    results: dict = {"training_candidates": len(split.train), "epoch_size": args.epoch_size}
    for mode in ("cold", "prefill"):
        cache = ChunkCache(work / f"loader-cache-{mode}", root)
        cache.clear()
        dataset = LunaDataset(candidates, split.train, cache, WIDTH_IRC)
        sampler = ShuffleSampler(len(dataset), seed=0, epoch_size=args.epoch_size)
        fill_s = 0.0
        if mode == "prefill":
            start = time.perf_counter()
            warm_chunk_cache(
                cache, candidates, dataset.indices[sampler.indices(0)], WIDTH_IRC, num_workers=args.workers
            )
            fill_s = time.perf_counter() - start
        samples, epoch_s = _epoch(dataset, sampler, args)
        results[mode] = {
            "fill_s": round(fill_s, 1),
            "epoch_s": round(epoch_s, 1),
            "samples_per_s": round(samples / (fill_s + epoch_s), 1),
            "warm_epoch_samples_per_s": round(samples / epoch_s, 1) if mode == "prefill" else None,
        }
        print(f"loader, {mode}: {results[mode]}", flush=True)
    results["ratio"] = round(results["prefill"]["samples_per_s"] / results["cold"]["samples_per_s"], 2)
    return results


def bench_fill(args: argparse.Namespace, work: Path, root: Path) -> dict:
    """The same fill (every 8th candidate, all CTs) in this process and in `--workers` processes."""
    candidates = get_candidate_arrays(root)
    rows = np.arange(0, len(candidates), 8)
    results: dict = {"chunks": len(rows), "cts": len(np.unique(candidates.series_index[rows]))}
    for label, workers in (("this_process", 0), ("workers", args.workers)) * 2:
        cache = ChunkCache(work / "fill-cache", root)
        cache.clear()
        coverage = chunk_coverage(cache, candidates, rows, WIDTH_IRC)
        start = time.perf_counter()
        prefill._fill_tasks(cache, coverage.tasks, WIDTH_IRC, workers, progress=False)  # as warm_chunk_cache fills
        results.setdefault(label, []).append(round(time.perf_counter() - start, 2))
    print(f"fill of {results['chunks']} chunks of {results['cts']} CTs, s: {results}", flush=True)
    return results


# --- 3. the first training epoch -------------------------------------------------------------------


def _scalars(run_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}


def bench_training(args: argparse.Namespace, work: Path, root: Path) -> dict:
    from p2ch import training

    results = {}
    for mode, flags in (("no_prefill", ["--no-prefill"]), ("prefill", [])):
        runs = work / f"runs-{mode}"
        argv = [
            "--data-root", str(root), "--cache-dir", str(work / f"training-cache-{mode}"), "--runs-dir", str(runs),
            "--checkpoint-dir", str(work / f"models-{mode}"), "--epochs", "1", "--epoch-size", str(args.epoch_size),
            "--batch-size", str(args.batch_size), "--num-workers", str(args.workers), "--balanced",
            "--max-val-batches", str(args.max_val_batches), "--val-fraction", "0.2", "--model-width", "8",
            "--lr-schedule", "constant", "--log-level", "WARNING", *flags,
        ]  # fmt: skip
        ChunkCache(work / f"training-cache-{mode}", root).clear()
        for folder in (runs, work / f"models-{mode}"):  # one run each, so the events read are this run's
            shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        assert training.main(argv) == 0
        wall = time.perf_counter() - start
        dirs = {("trn" if "-trn_cls-" in d.name else "val"): d for d in (runs / "p2ch").iterdir()}
        trn, val = _scalars(dirs["trn"]), _scalars(dirs["val"])
        results[mode] = {
            "wall_s": round(wall, 1),
            "train_data_wait": round(trn["perf/data_wait_fraction"], 3),
            "train_samples_per_s": round(trn["perf/samples_per_sec"], 1),
            "val_data_wait": round(val["perf/data_wait_fraction"], 3),
            "val_samples_per_s": round(val["perf/samples_per_sec"], 1),
        }
        print(f"training, {mode}: {results[mode]}", flush=True)
    results["wall_ratio"] = round(results["no_prefill"]["wall_s"] / results["prefill"]["wall_s"], 2)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    record: dict = {
        "bench": "cold_cache",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "settings": vars(args),
    }
    with tempfile.TemporaryDirectory(prefix="p2ch-bench-cold-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "keys" in args.parts:
            record["keys"] = bench_keys(args, work)
        if {"loader", "fill", "training"} & set(args.parts):
            root = make_set(args, work)
            if "loader" in args.parts:
                record["loader"] = bench_loader(args, work, root)
            if "fill" in args.parts:
                record["fill"] = bench_fill(args, work, root)
            if "training" in args.parts:
                record["training"] = bench_training(args, work, root)
    print(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
