"""Data path cost: per-sample µs in the main process and loader samples/s per worker, per-item vs batched reads.

Three paths through the same `LunaDataset` and warm `ChunkCache`, in one run:

- per-item (the old path): the DataLoader calls `__getitem__` per sample (a fresh chunk array
  each), then `collate_luna` stacks them into the batch (`PerItemDataset` hides `__getitems__`);
- batched (the new path): the DataLoader calls `LunaDataset.__getitems__`, which reads every
  chunk straight into one fresh int16 batch tensor; `collate_luna` passes it through
  (`create_loader(reuse_buffers=False)`);
- reused (the default now): the same, into a batch buffer the worker reuses once the main process
  has released it (`p2ch.batchbuffers`), so its pages are not faulted in again for every batch.

Part 1 times each piece per sample with no workers, in the main process, over shuffled batches:
cache read + CRC (`get_ct_raw_candidate`, into a fresh array or into the batch with `out=`), the
rest of `__getitem__` / `__getitems__`, and the collate. It does so twice: with private memory
(as with num_workers=0) and with shared-memory batches, as inside a worker (torch's
`get_worker_info()` is made to answer, so `default_collate` and `__getitems__` both allocate
shared memory as they do there; the reused path releases each batch's buffer as the main process
would, and runs in shared memory only: without workers there is no pool). Part 2 times full
shuffled passes through `create_loader` with 0, 1 and 2 workers and reports samples/s and
samples/s per worker. Data: a synthetic
LUNA16-layout set (`p2ch.synth.generate`) in a temporary folder, cached first, unless
`--data-root` is given. Nothing is copied to a GPU; pinning follows CUDA's presence.

    .venv/bin/python benchmarks/bench_loader.py --batch-size 256 32
    .venv/bin/python benchmarks/bench_loader.py --data-root data-unversioned/part2/luna --limit 20000
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from bench_dataloader import add_data_arguments, make_data, record_header, timed_passes
from torch.utils.data import Dataset
from torch.utils.data._utils import worker as torch_worker

from p2ch.batchbuffers import BatchBuffers, Leased, buffer_slots
from p2ch.candidates import get_candidate_arrays
from p2ch.datasets import LunaDataset, LunaSample, ShuffleSampler, collate_luna
from p2ch.errors import P2chError

PATHS = ("per-item", "batched", "reused")


class PerItemDataset(Dataset):
    """The old path: a LunaDataset without `__getitems__`, so the DataLoader reads item by item."""

    def __init__(self, dataset: LunaDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> LunaSample:
        return self.dataset[k]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256, 32], help="batch sizes to time")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts of part 2")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per setting (after one warm-up pass)")
    parser.add_argument("--skip-loader", action="store_true", help="part 1 only")
    add_data_arguments(parser)
    return parser


@contextlib.contextmanager
def as_in_a_worker(enabled: bool) -> Iterator[None]:
    """Make torch's `get_worker_info()` answer, so batches are built in shared memory as in a worker."""
    if not enabled:
        yield
        return
    saved = torch_worker._worker_info
    torch_worker._worker_info = types.SimpleNamespace(id=0)  # worker 0 (of a pool with one worker)
    try:
        yield
    finally:
        torch_worker._worker_info = saved


def batches_of(dataset: LunaDataset, batch_size: int, epoch: int) -> list[list[int]]:
    order = ShuffleSampler(len(dataset), seed=0).global_indices(epoch).tolist()
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def time_pieces(dataset: LunaDataset, batch_size: int, passes: int, shared: bool) -> dict[str, dict[str, float]]:
    """Per-sample µs of read / rest / collate for each path (median over passes; reused: shared only).

    The measurements run batch by batch, interleaved, so all paths see the same machine load.
    Torch runs on one thread here, as in a DataLoader worker.
    """
    cache, width = dataset.source, dataset.width_irc
    uids = [dataset.series_uid(k) for k in range(len(dataset))]
    centers = [tuple(c) for c in dataset._center_xyz.tolist()]
    keys = ("old_read", "old_item", "old_collate", "new_read", "new_item", "new_collate")
    keys += ("reuse_read", "reuse_item", "reuse_collate") if shared else ()
    if shared:
        pooled = copy.copy(dataset)
        pooled.buffers = BatchBuffers(1, buffer_slots())
        kept = _fresh_batch(batch_size, width, shared).fill_(0)  # a buffer already touched, as a reused one is
    runs: dict[str, list[float]] = {key: [] for key in keys}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with as_in_a_worker(shared):
            for epoch in range(passes + 1):
                batches = batches_of(dataset, batch_size, epoch)
                n = sum(len(b) for b in batches)
                spent = dict.fromkeys(keys, 0.0)
                for ks in batches:
                    # per-item: reads alone (each chunk kept until its batch is done, as the loader keeps them),
                    t0 = time.perf_counter()
                    chunks = [cache.get_ct_raw_candidate(uids[k], centers[k], width) for k in ks]
                    del chunks
                    # then __getitem__ per sample and collate_luna per batch;
                    t1 = time.perf_counter()
                    samples = [dataset[k] for k in ks]
                    t2 = time.perf_counter()
                    batch = collate_luna(samples)
                    t3 = time.perf_counter()
                    del samples, batch
                    times = [t1 - t0, t2 - t1, t3 - t2, *_time_batched(dataset, ks, uids, centers, shared=shared)]
                    if shared:
                        times += _time_batched(pooled, ks, uids, centers, shared=True, buffer=kept)
                    for key, seconds in zip(keys, times, strict=True):
                        spent[key] += seconds
                if epoch:  # the first pass warms the page cache and the cache's handles
                    for key in keys:
                        runs[key].append(spent[key] / n)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for path, prefix in zip(PATHS, ("old", "new", "reuse"), strict=False):
        if f"{prefix}_read" not in runs:
            continue
        read, item, collate = (
            statistics.median(runs[f"{prefix}_{part}"]) * 1e6 for part in ("read", "item", "collate")
        )
        out[path] = {
            "read_crc_us": round(read, 1),
            "rest_us": round(item - read, 1),
            "collate_us": round(collate, 1),
            "total_us": round(item + collate, 1),
        }
    return out


def _time_batched(
    ds: LunaDataset, ks: list[int], uids, centers, *, shared: bool, buffer: torch.Tensor | None = None
) -> list[float]:
    """Seconds of a batched path for one batch: the reads alone, into `buffer` (a touched one, as a
    reused buffer is) or into a fresh batch tensor allocated as `__getitems__` does; then
    `ds.__getitems__` (from its pool when it has one); then collate_luna (a pass-through). A lease is
    released afterwards, as the main process does when it lets go."""
    cache, width = ds.source, ds.width_irc
    t0 = time.perf_counter()
    chunk = _fresh_batch(len(ks), width, shared) if buffer is None else buffer
    slots = chunk.numpy()[: len(ks), 0]
    for j, k in enumerate(ks):
        cache.get_ct_raw_candidate(uids[k], centers[k], width, out=slots[j])
    del chunk, slots
    t1 = time.perf_counter()
    got = ds.__getitems__(ks)
    t2 = time.perf_counter()
    batch = collate_luna(got)
    t3 = time.perf_counter()
    if isinstance(got.chunk, Leased):
        ds.buffers._release(got.chunk.worker, got.chunk.slot)
    del got, batch
    return [t1 - t0, t2 - t1, t3 - t2]


def _fresh_batch(n: int, width: tuple[int, ...], shared: bool) -> torch.Tensor:
    chunk = torch.empty((n, 1, *width), dtype=torch.int16)
    if shared:
        storage = torch.UntypedStorage._new_shared(chunk.nbytes)
        chunk = torch.empty(0, dtype=torch.int16).set_(storage, 0, chunk.shape)
    return chunk


def time_loader(dataset, *, workers: int, batch_size: int, passes: int, reuse: bool) -> dict:
    samples, timings = timed_passes(dataset, workers=workers, batch_size=batch_size, passes=passes, reuse_buffers=reuse)
    rate = samples / statistics.median(timings[1:])
    return {
        "workers": workers,
        "samples_per_s": round(rate),
        "samples_per_s_per_worker": round(rate / max(workers, 1)),
        "pass_s": [round(t, 3) for t in timings[1:]],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    from p2ch.cache import ChunkCache
    from p2ch.prefill import fill_missing

    pieces: dict[str, dict] = {}
    loader_results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="p2ch-bench-") as tmp:
        try:
            data_root = make_data(args, tmp)
            candidates = get_candidate_arrays(data_root)
            if args.limit:
                candidates = candidates.take(np.arange(min(args.limit, len(candidates))))
            cache = ChunkCache(Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache", data_root)
            width = tuple(args.width_irc)
            start = time.perf_counter()
            fill_missing(cache, candidates, np.arange(len(candidates)), width, progress=False)
            print(f"cache filled in {time.perf_counter() - start:.1f} s", flush=True)
            dataset = LunaDataset(candidates, None, cache, width)
            for batch_size in args.batch_size:
                for shared in (False, True):
                    mode = "shared" if shared else "private"
                    pieces[f"{batch_size}/{mode}"] = time_pieces(dataset, batch_size, args.passes, shared)
                    print(f"part 1, batch {batch_size}, {mode} memory: {pieces[f'{batch_size}/{mode}']}", flush=True)
                if args.skip_loader:
                    continue
                for workers in args.workers:
                    for path in PATHS:
                        if path == "reused" and not workers:
                            continue  # without workers there is no pool: the same as batched
                        ds = PerItemDataset(dataset) if path == "per-item" else dataset
                        result = time_loader(
                            ds, workers=workers, batch_size=batch_size, passes=args.passes, reuse=path == "reused"
                        )
                        loader_results.append({"path": path, "batch_size": batch_size, **result})
                        print(f"part 2: {loader_results[-1]}", flush=True)
            hits = cache.stats()["hits"]
        except P2chError as exc:
            print(f"bench_loader: {exc}", file=sys.stderr)
            return 2

    print(f"\n{len(dataset)} candidates, chunk {width} int16, shuffled order, {os.cpu_count()} CPUs")
    print("part 1: µs per sample, main process (median of passes)")
    print(
        f"{'batch':>5} {'memory':>8} {'path':>9} {'read+CRC':>9} {'rest':>7} {'collate':>8} {'total':>7} {'ratio':>6}"
    )
    ratios: dict[str, float] = {}
    for key, by_path in pieces.items():
        batch_size, mode = key.split("/")
        old_total = by_path["per-item"]["total_us"]
        for path, r in by_path.items():
            ratio = old_total / r["total_us"] if r["total_us"] else float("nan")
            if path != "per-item":
                ratios[f"per_sample_{path}_{key}"] = round(ratio, 2)
            print(
                f"{batch_size:>5} {mode:>8} {path:>9} {r['read_crc_us']:>9} {r['rest_us']:>7} "
                f"{r['collate_us']:>8} {r['total_us']:>7} {ratio:>6.2f}"
            )
    if loader_results:
        print("part 2: loader samples/s (median pass)")
        print(f"{'batch':>5} {'workers':>7} {'path':>9} {'samples/s':>10} {'per worker':>11} {'ratio':>6}")
        old = {(r["batch_size"], r["workers"]): r["samples_per_s"] for r in loader_results if r["path"] == "per-item"}
        for r in loader_results:
            ratio = r["samples_per_s"] / old[(r["batch_size"], r["workers"])]
            if r["path"] != "per-item":
                ratios[f"loader_{r['path']}_{r['batch_size']}/{r['workers']}w"] = round(ratio, 2)
            print(
                f"{r['batch_size']:>5} {r['workers']:>7} {r['path']:>9} {r['samples_per_s']:>10} "
                f"{r['samples_per_s_per_worker']:>11} {ratio:>6.2f}"
            )
    record = {
        **record_header("loader", args),
        "candidates": len(dataset),
        "width_irc": list(width),
        "passes": args.passes,
        "cache_hits_main_process": hits,
        "per_sample_us": pieces,
        "loader": loader_results,
        "ratios": ratios,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
