"""Candidate chunks for training: `LunaDataset`, train/validation/test splits, index samplers.

Dtype contract (read this before touching a batch)
---------------------------------------------------
Chunks travel as **int16 HU**, never as float:

    LunaDataset[k].chunk      (1, I, R, C) int16 HU, default (1, 32, 48, 48)
    loader batch .chunk       (N, 1, I, R, C) int16 HU (pinned when CUDA is present)
    DevicePrefetcher batch    (N, 1, I, R, C) int16 HU on the CUDA device (else as the loader's)
    to_device_batch(chunk)    (N, 1, I, R, C) float32 HU on the training device

int16 is half the bytes of float32 through the worker pipes, shared memory and pinned host
memory, and it is exactly what the cache stores (CT voxels are int16 and clipped to
[-1000, 1000] HU), so nothing is lost. The conversion to float32 happens once per batch on
the training device (`to_device_batch`), where augmentation (`p2ch.augment`) and the model
run. The book converted every chunk to float32 in the worker.

Batches are read whole: the DataLoader calls `LunaDataset.__getitems__`, which reads every
chunk of a batch straight into one int16 tensor (shared memory in a worker), with no
per-chunk buffer and no collate copy. `DevicePrefetcher` copies batch k+1 to the GPU on a side
stream while batch k computes. `benchmarks/bench_loader.py` measures both paths.

Splits
------
`split_candidates` separates candidates into train / val / (optional) test by **series**,
so a CT (and its nodules) is never in two parts. The book's every-10th-candidate split
(`mode="stride"`) is kept for comparison only: it puts the same CT, usually the same nodule
seen from a neighbouring candidate, into both training and validation, which inflates
validation scores. The book's chapter-14 split by series (`mode="series-stride"`: every 10th
series in sorted order) is what the book's trained models held out, so imported ones use it.
`split_series` splits whole series (the segmentation model's CTs) by the same rules, so a series
is in the same part for both models.

Malignancy (the book's chapter 14)
----------------------------------
`MalignantLunaDataset` is the same dataset over annotated nodules only (built from
`p2ch.candidates.get_malignancy_arrays()`), labelled 1 = malignant: `BalancedSampler(ds.labels,
ratio=1)` then draws benign and malignant nodules 50/50. Split the malignancy rows with
`split_candidates` and the nodule model's settings: the part of a series depends on its uid (or
its subset folder) alone, so every CT is in the same part for both models.

Sampling
--------
Positives are about 1 in 400 candidates. `BalancedSampler` draws `ratio` negatives per
positive (the book's `--balanced` is ratio 1) for an epoch of `epoch_size` samples; positives
and negatives each run through endless seeded permutations, so every positive (negative) is
drawn once before any is drawn twice, also across epoch boundaries. `ShuffleSampler` is the
unbalanced counterpart; `EvalSampler` gives validation every index exactly once. All three
shard for DDP by `rank` / `world_size` and are functions of (seed, epoch) only: call
`set_epoch(epoch)` before each epoch and a resumed run draws the same samples.

Memory
------
The dataset holds per-candidate data as a handful of numpy arrays, never one Python object
per candidate: reading a Python object writes its reference count, so a forked DataLoader
worker that walks a 551k-element list of tuples ends up with a private copy of all of it.
`create_loader`'s workers also freeze their garbage collector as they start (`LunaDataLoader`),
so their collections do not copy the parent's objects either.
`benchmarks/bench_dataset_memory.py` measures both.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import hashlib
import inspect
import itertools
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from p2ch.batchbuffers import BatchBuffers, Leased, buffer_slots, new_shared_int16
from p2ch.candidates import CandidateArrays, csv_line
from p2ch.cli import exit_with_parent
from p2ch.config import SPLIT_MODES
from p2ch.errors import CandidateOutsideCtError, ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import DEFAULT_WIDTH_IRC, check_width_irc
from p2ch.luna import series_index, subset_of

BOOK_EPOCH_SIZE = 200_000
DEFAULT_VAL_STRIDE = 10
# Stream ids keep the permutation streams of different samplers independent for one seed.
_STREAM_POSITIVE, _STREAM_NEGATIVE, _STREAM_SHUFFLE = 0, 1, 2
# Permutations are drawn in blocks of about this many elements (see _permutation_stream).
_BLOCK_ELEMENTS = 1 << 16


class ChunkSource(Protocol):
    """Anything that crops candidate chunks: `p2ch.cache.ChunkCache`, or a fake in tests."""

    def get_ct_raw_candidate(
        self, series_uid: str, center_xyz: Sequence[float], width_irc: Sequence[int] = DEFAULT_WIDTH_IRC
    ) -> tuple[np.ndarray, Sequence[int]]:
        """Return `(chunk, center_irc)`: chunk `width_irc` int16 HU; center_irc 3 ints.

        A source may also take a keyword `out` (a writable C-order int16 array of shape
        `width_irc`) and decode the chunk straight into it, as `ChunkCache` does; batched
        reads (`LunaDataset.__getitems__`) then allocate no per-chunk buffer.
        """
        ...


class LunaSample(NamedTuple):
    """One item of `LunaDataset`.

    chunk: (1, I, R, C) int16 HU. label: () int64, 1 = nodule (MalignantLunaDataset: 1 = malignant).
    series_uid: str.
    center_irc: (3,) int64 voxel (index, row, col) of the candidate centre.
    """

    chunk: torch.Tensor
    label: torch.Tensor
    series_uid: str
    center_irc: torch.Tensor


class LunaBatch(NamedTuple):
    """A collated batch (see `collate_luna`).

    chunk: (N, 1, I, R, C) int16 HU. label: (N,) int64. series_uid: list of N str.
    center_irc: (N, 3) int64.
    """

    chunk: torch.Tensor
    label: torch.Tensor
    series_uid: list[str]
    center_irc: torch.Tensor


def _check_candidates(candidates: Any) -> CandidateArrays:
    if not isinstance(candidates, CandidateArrays):
        raise ConfigError(
            f"candidates: expected p2ch.candidates.CandidateArrays (from get_candidate_arrays()), "
            f"got {type(candidates).__name__}; convert a list with CandidateArrays.from_list()"
        )
    return candidates


def _check_indices(indices: Any, size: int, what: str = "indices") -> np.ndarray:
    array = np.asarray(indices)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(
            f"{what}: expected a 1-D integer array of candidate rows, got shape {array.shape} "
            f"dtype {array.dtype}; for a boolean mask pass np.flatnonzero(mask)"
        )
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= size:
        raise ConfigError(
            f"{what}: values must lie in [0, {size}) (the number of candidates), got "
            f"{low}..{high}; were they made for a different candidate list?"
        )
    return array.astype(np.int64, copy=False)


def _takes_out(method: Callable[..., Any]) -> bool:
    """Whether a chunk source's `get_ct_raw_candidate` accepts the keyword `out` (see `ChunkSource`)."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # a builtin or C method without a signature
        return False
    return any(
        (p.name == "out" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)) or p.kind is p.VAR_KEYWORD
        for p in parameters
    )


def _new_chunk_batch(shape: tuple[int, ...], buffers: BatchBuffers | None = None) -> tuple[torch.Tensor, Any]:
    """An uninitialised int16 tensor of `shape` to write, and what the batch carries for it.

    In the main process: private memory (both the same tensor). Inside a DataLoader worker: shared
    memory, from `buffers` when the loader has a pool (the batch then carries the lease, which turns
    back into the tensor in the main process), else allocated directly, as torch's own collate does
    (`share_memory_()` on a fresh tensor would allocate private memory first and copy it over).
    """
    if get_worker_info() is None:
        tensor = torch.empty(shape, dtype=torch.int16)
        return tensor, tensor
    if buffers is not None:
        leased = buffers.lease(shape)
        return (leased.tensor, leased) if isinstance(leased, Leased) else (leased, leased)
    tensor = new_shared_int16(shape)
    return tensor, tensor


class LunaDataset(Dataset):
    """Map-style dataset of candidate chunks: item k is candidate `indices[k]`.

    candidates: the columnar candidate list. indices: (M,) int64 rows of `candidates`, e.g.
    `split.train` (None: all rows). source: a chunk source (`ChunkCache`), called as
    `source.get_ct_raw_candidate(series_uid, center_xyz, width_irc)`. width_irc: chunk size
    (index, row, col) in voxels.

    Items are `LunaSample(chunk, label, series_uid, center_irc)`: chunk (1, I, R, C) int16 HU,
    label () int64 (1 = nodule), series_uid str, center_irc (3,) int64. See the module
    docstring for why chunks stay int16. `__getitems__` reads a whole batch at once into one
    tensor (what the DataLoader uses).

    Attributes: `indices` (M,) int64 candidate rows; `labels` (M,) bool, item k is a nodule
    (for samplers); `width_irc`. Everything per candidate is a numpy array, so forked
    workers share it instead of copying it (see the module docstring).
    """

    def __init__(
        self,
        candidates: CandidateArrays,
        indices: np.ndarray | Sequence[int] | None,
        source: ChunkSource,
        width_irc: Sequence[int] = DEFAULT_WIDTH_IRC,
    ):
        candidates = _check_candidates(candidates)
        if not callable(getattr(source, "get_ct_raw_candidate", None)):
            raise ConfigError(
                f"source: expected a chunk source with a get_ct_raw_candidate(series_uid, "
                f"center_xyz, width_irc) method (e.g. p2ch.cache.ChunkCache), got {type(source).__name__}"
            )
        if indices is None:
            indices = np.arange(len(candidates), dtype=np.int64)
        self.indices = _check_indices(indices, len(candidates))
        self.width_irc = check_width_irc(width_irc)
        self.source = source
        self._series_uids = np.asarray(candidates.series_uids, dtype=str)
        self._series_index = np.ascontiguousarray(candidates.series_index[self.indices])
        self._center_xyz = np.ascontiguousarray(candidates.center_xyz[self.indices], dtype=np.float64)
        self.labels = np.ascontiguousarray(candidates.is_nodule[self.indices], dtype=bool)
        self._source_file = candidates.source_file
        self._source_takes_out = _takes_out(source.get_ct_raw_candidate)
        self.buffers: BatchBuffers | None = None  # a loader's reusable batch buffers (create_loader sets it)

    def __len__(self) -> int:
        return len(self.indices)

    def series_uid(self, k: int) -> str:
        """The series_uid of item k."""
        return str(self._series_uids[self._series_index[k]])

    def _checked_chunk(self, chunk: Any, series_uid: str, center_xyz: tuple[float, ...]) -> np.ndarray:
        """The source's chunk as an ndarray; DataFormatError unless it is int16 of shape `width_irc`."""
        chunk = np.asarray(chunk)
        if chunk.dtype != np.int16 or chunk.shape != self.width_irc:
            raise DataFormatError(
                f"chunk source {type(self.source).__name__} returned a {chunk.dtype} chunk of shape "
                f"{chunk.shape} for series {series_uid} at {center_xyz} mm; expected int16 HU of "
                f"shape {self.width_irc} (a stale or foreign cache? clear it and re-run prepcache)"
            )
        return chunk

    def _located(self, exc: CandidateOutsideCtError, series_uid: str, center_xyz: tuple[float, ...]) -> Exception:
        """`exc` prefixed with the CSV file and line of the candidate (the same one line in a DataLoader
        worker as in the main process); `exc` itself when the rows were not read from a file."""
        if self._source_file is None:
            return exc
        return CandidateOutsideCtError(f"{csv_line(self._source_file, series_uid, center_xyz)}: {exc}")

    def __getitem__(self, k: int) -> LunaSample:
        series_uid = self.series_uid(k)
        center_xyz = tuple(self._center_xyz[k].tolist())
        try:
            chunk, center_irc = self.source.get_ct_raw_candidate(series_uid, center_xyz, self.width_irc)
        except CandidateOutsideCtError as exc:
            raise self._located(exc, series_uid, center_xyz) from None
        chunk = self._checked_chunk(chunk, series_uid, center_xyz)
        if not (chunk.flags.writeable and chunk.flags.c_contiguous and chunk.flags.owndata):
            # Read-only buffers (e.g. straight from a cache file) and views into the source's own
            # arrays are copied, so callers may modify the tensor in place.
            chunk = np.array(chunk, dtype=np.int16, order="C", copy=True)
        return LunaSample(
            chunk=torch.from_numpy(chunk).unsqueeze(0),
            label=torch.tensor(int(self.labels[k]), dtype=torch.int64),
            series_uid=series_uid,
            center_irc=torch.tensor([int(v) for v in center_irc], dtype=torch.int64),
        )

    def __getitems__(self, ks: Sequence[int]) -> LunaBatch:
        """Items `ks` as one `LunaBatch`, equal bit for bit to `collate_luna([self[k] for k in ks])`.

        torch's DataLoader calls this (instead of `__getitem__` per item) when it batches, and
        hands the result to its collate_fn (`collate_luna` passes a LunaBatch through). Every
        chunk is read straight into its slot of one (N, 1, I, R, C) int16 tensor, allocated in
        shared memory inside a worker so that sending it to the main process copies nothing:
        no per-chunk buffer, no collate copy. With `buffers` (a `BatchBuffers`, set by
        `create_loader`) a worker reuses a batch buffer the main process has released, instead of
        page-faulting a fresh one; inside the worker the batch's chunk is then the lease, which the
        main process receives as the tensor.
        Sources without an `out` keyword are read as in `__getitem__` and copied into the slot.
        A subclass that overrides `__getitem__` gets its own items, collated.
        """
        if type(self).__getitem__ is not LunaDataset.__getitem__:
            return collate_luna([self[k] for k in ks])
        rows = np.asarray(ks, dtype=np.int64).reshape(-1)
        n = len(rows)
        chunk, carried = _new_chunk_batch((n, 1, *self.width_irc), self.buffers)
        slots = chunk.numpy()[:, 0]  # (N, I, R, C) int16 views into the batch
        centers = np.empty((n, 3), dtype=np.int64)
        uids = [str(u) for u in self._series_uids[self._series_index[rows]]]
        centers_xyz = self._center_xyz[rows].tolist()
        read = self.source.get_ct_raw_candidate
        for j in range(n):
            series_uid, center_xyz, slot = uids[j], tuple(centers_xyz[j]), slots[j]
            try:
                if self._source_takes_out:
                    got, center_irc = read(series_uid, center_xyz, self.width_irc, out=slot)
                else:
                    got, center_irc = read(series_uid, center_xyz, self.width_irc)
            except CandidateOutsideCtError as exc:
                raise self._located(exc, series_uid, center_xyz) from None
            if got is not slot:
                slot[...] = self._checked_chunk(got, series_uid, center_xyz)
            centers[j] = [int(v) for v in center_irc]
        return LunaBatch(
            chunk=carried,
            label=torch.from_numpy(self.labels[rows].astype(np.int64)),
            series_uid=uids,
            center_irc=torch.from_numpy(centers),
        )

    def __repr__(self) -> str:
        return (
            f"LunaDataset({len(self)} candidates, {int(self.labels.sum())} positive, "
            f"width_irc={self.width_irc}, source={type(self.source).__name__})"
        )


class MalignantLunaDataset(LunaDataset):
    """The book's MalignantLunaDataset: chunks of annotated nodules, label 1 = malignant.

    Same constructor and items as `LunaDataset`; every row `indices` picks must be an annotated
    nodule (`has_annotation`), as in `get_malignancy_arrays()`, else ConfigError. `labels`:
    (M,) bool, the rows' `is_mal`, so `BalancedSampler(ds.labels, ratio=1)` balances benign and
    malignant nodules 50/50 and `LunaSample.label` is 1 for a malignant one.
    """

    def __init__(
        self,
        candidates: CandidateArrays,
        indices: np.ndarray | Sequence[int] | None,
        source: ChunkSource,
        width_irc: Sequence[int] = DEFAULT_WIDTH_IRC,
    ):
        super().__init__(candidates, indices, source, width_irc)
        not_annotated = ~candidates.has_annotation[self.indices]
        if not_annotated.any():
            row = int(self.indices[np.flatnonzero(not_annotated)[0]])
            raise ConfigError(
                f"MalignantLunaDataset: {int(not_annotated.sum())} of {len(self)} rows are not annotated nodules "
                f"(first: row {row}, series {candidates.series_uid(row)}); build it from "
                "p2ch.candidates.get_malignancy_arrays(), not from the candidate list"
            )
        self.labels = np.ascontiguousarray(candidates.is_mal[self.indices], dtype=bool)

    def __repr__(self) -> str:
        malignant = int(self.labels.sum())
        return (
            f"MalignantLunaDataset({len(self)} nodules: {len(self) - malignant} benign, {malignant} malignant, "
            f"width_irc={self.width_irc}, source={type(self.source).__name__})"
        )


def collate_luna(samples: Sequence[LunaSample] | LunaBatch) -> LunaBatch:
    """Stack `LunaSample`s into a `LunaBatch`; series_uid stays a list of str.

    A `LunaBatch` (what `LunaDataset.__getitems__` gives the DataLoader) is returned as it is.
    Tensors go through torch's `default_collate`, which, inside a DataLoader worker, builds
    the batch directly in shared memory (no extra copy through the pipe).
    """
    if isinstance(samples, LunaBatch):
        return samples
    chunks, labels, uids, centers = zip(*samples, strict=True)
    return LunaBatch(
        chunk=default_collate(list(chunks)),
        label=default_collate(list(labels)),
        series_uid=[str(u) for u in uids],
        center_irc=default_collate(list(centers)),
    )


def to_device_batch(chunk_batch: torch.Tensor, device: torch.device | str, non_blocking: bool = True) -> torch.Tensor:
    """Move an int16 chunk batch to `device` and make it float32 there.

    chunk_batch: (N, 1, I, R, C) int16 HU (a loader batch's `.chunk`). Returns
    (N, 1, I, R, C) float32 HU on `device`. The copy moves int16 (half the bytes); with a
    pinned batch and `non_blocking` it overlaps with work already queued on the GPU.
    """
    if not isinstance(chunk_batch, torch.Tensor) or chunk_batch.dtype != torch.int16:
        got = chunk_batch.dtype if isinstance(chunk_batch, torch.Tensor) else type(chunk_batch).__name__
        raise DataFormatError(
            f"to_device_batch: expected an int16 chunk batch (N, 1, I, R, C) from LunaDataset, got {got}; "
            "chunks travel as int16 and become float32 only here"
        )
    return chunk_batch.to(device, non_blocking=non_blocking).to(torch.float32)


def _one_ahead(batches: Iterator[Any], start: Callable[[Any], Any], finish: Callable[[Any], Any]) -> Iterator[Any]:
    """Yield `finish(start(batch))` for each batch, calling `start` on the next batch before handing out this one.

    So the work `start` queues for batch k+1 (a device copy) runs while the consumer computes
    on batch k. When the consumer stops early, one batch has been started for nothing.
    """
    pending = None
    for batch in batches:
        started = start(batch)
        if pending is not None:
            yield finish(pending)
        pending = started
    if pending is not None:
        yield finish(pending)


class DevicePrefetcher:
    """A loader's `LunaBatch`es with chunk and label already on `device`, the next copy overlapping this batch's work.

    loader: an iterable of `LunaBatch` (from `create_loader`; pinned on CUDA). device: where the
    model runs. `len()` is the loader's.

    On CUDA, as soon as batch k is handed out, batch k+1's chunk ((N, 1, I, R, C) int16 HU) and
    label ((N,) int64) are copied to the device on a side stream (non-blocking from pinned
    memory), so the copy overlaps batch k's kernels instead of queuing behind them on the compute
    stream. When batch k+1 is handed out, the consumer's current stream waits on the copy's event,
    and both tensors are `record_stream`-ed on it, so their memory is not reused before the
    consumer's kernels are done with it. The chunk stays int16: `to_device_batch` makes it float32
    on the compute stream (no copy, one conversion kernel), so results are unchanged.
    series_uid and center_irc stay as the loader made them.

    On any other device the loader's batches pass through unchanged (the step's
    `to_device_batch` moves them), so CPU runs are exactly as without it.
    """

    def __init__(self, loader: Any, device: torch.device | str):
        self.loader = loader
        self.device = torch.device(device)
        self._stream: torch.cuda.Stream | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda":
            return iter(self.loader)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return _one_ahead(iter(self.loader), self._start_copy, self._hand_over)

    def _start_copy(self, batch: LunaBatch) -> tuple[LunaBatch, torch.cuda.Event]:
        """Queue batch's chunk and label copies on the side stream; returns the device batch and the copy's event."""
        stream = self._stream
        assert stream is not None  # set by __iter__
        with torch.cuda.stream(stream):
            chunk = batch.chunk.to(self.device, non_blocking=True)
            label = batch.label.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        return batch._replace(chunk=chunk, label=label), copied

    def _hand_over(self, started: tuple[LunaBatch, torch.cuda.Event]) -> LunaBatch:
        """Make the consumer's stream wait for the copy, and keep the memory until its kernels have run."""
        batch, copied = started
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(copied)
        batch.chunk.record_stream(consumer)
        batch.label.record_stream(consumer)
        return batch


# --- splits -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Candidate rows of each part of a split.

    train, val, test: (n,) int64 rows of the candidate list, ascending (test may be empty).
    train_series, val_series, test_series: (s,) str, sorted series_uids of each part (disjoint
    in modes "series", "subset" and "series-stride"; "stride" mode shares series between train and val).
    """

    mode: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_series: np.ndarray
    val_series: np.ndarray
    test_series: np.ndarray

    def counts(self, candidates: CandidateArrays) -> dict[str, dict[str, int]]:
        """{part: {"candidates", "positives", "series"}} for logging."""
        return {
            name: {
                "candidates": len(rows),
                "positives": int(candidates.is_nodule[rows].sum()),
                "series": len(series),
            }
            for name, rows, series in (
                ("train", self.train, self.train_series),
                ("val", self.val, self.val_series),
                ("test", self.test, self.test_series),
            )
        }


_TRAIN, _VAL, _TEST = 0, 1, 2


def series_fraction(series_uid: str) -> float:
    """A series' fixed place in [0, 1): the first 53 bits of SHA-256(series_uid) / 2**53.

    The series split compares this to the fractions, so a series' part depends on its uid
    alone. (Python's `hash()` is salted per process, so it cannot be used.) Changing this
    rule moves series between parts of every saved run; tests pin its values.
    """
    digest = hashlib.sha256(series_uid.encode("utf-8")).digest()
    # 53 bits: exactly representable as float64, so the result is always < 1.
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} (--{name.replace('_', '-')}) is {value!r}; expected a fraction in [0, 1)")
    return float(value)


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} is {value!r}; expected an integer ≥ {minimum}{hint}")
    return int(value)


def _check_subsets(name: str, subsets: Sequence[int]) -> frozenset[int]:
    try:
        values = list(subsets)
    except TypeError:
        values = [subsets]
    for v in values:
        _check_int(f"{name} entry", v, 0, " (LUNA16 folds are subset0 … subset9)")
    return frozenset(int(v) for v in values)


def _series_subsets(uids: np.ndarray, data_root) -> np.ndarray:
    paths = series_index(data_root)
    subsets = np.full(len(uids), -1, dtype=np.int64)
    missing = []
    for n, uid in enumerate(uids.tolist()):
        path = paths.get(uid)
        if path is None:
            missing.append(uid)
            continue
        subset = subset_of(path)
        if subset is None:
            raise DataFormatError(
                f"series {uid} is in {path.parent}, whose name is not subset<k>; the subset split "
                "needs LUNA16's subset0 … subset9 folders (or use --split series)"
            )
        subsets[n] = subset
    if missing:
        raise DataNotFoundError(
            f"subset split: {len(missing)} of {len(uids)} series have no .mhd under the data root's "
            f"subset*/ folders, so their subset is unknown (first: {missing[0]}); pass the right "
            "--data-root, keep only candidates of series on disk, or use --split series"
        )
    return subsets


def split_candidates(
    candidates: CandidateArrays,
    mode: str = "series",
    *,
    val_fraction: float = 0.1,
    val_stride: int | None = None,
    val_subsets: Sequence[int] = (9,),
    test_fraction: float = 0.0,
    test_subsets: Sequence[int] = (),
    data_root=None,
) -> Split:
    """Split candidates into train / val / test parts, deterministically.

    mode:
      "series" (default): every CT entirely in one part. A series goes to test when
        `series_fraction(uid) < test_fraction`, else to val when it is below
        `test_fraction + val_fraction`, else to train. The part depends on the uid alone, so
        adding or removing CTs (e.g. downloading another subset) never moves the others.
        `val_stride` N, if given, means val_fraction = 1/N ("every Nth series" by hash; an
        every-Nth-in-sorted-order rule would shift series whenever one is added).
      "subset": LUNA16's folds. Series whose .mhd lies in `subset{k}` for k in `val_subsets`
        are validation, for k in `test_subsets` test (found via `series_index(data_root)`).
      "stride": the book's split, every `val_stride`-th candidate (default 10) in candidate
        order to val. LEAKY: a CT, often the same nodule, lands in both parts. For comparison
        with the book only; it has no test part.
      "series-stride": the book's chapter-14 split by series: of the series sorted by uid, every
        `val_stride`-th (default 10) from the first to val, the rest to train; no test part. With all
        of LUNA16 on disk these are the series the book's trained models never saw, so models imported
        with `python -m p2ch.import_book_models` carry it; unlike "series", adding CTs moves series.

    The optional test part is for a final score the training app never sees; test takes
    precedence over val. Raises ConfigError for bad arguments and for an empty train or val
    part (the message says how many series there are and what to change).
    """
    candidates = _check_candidates(candidates)
    if mode not in SPLIT_MODES:
        raise ConfigError(f"split mode {mode!r} is unknown; expected one of {', '.join(SPLIT_MODES)}")
    if len(candidates) == 0:
        raise ConfigError("split_candidates: the candidate list is empty; nothing to split")
    val_fraction, val_stride, val_set, test_fraction, test_set = _check_split_settings(
        val_fraction, val_stride, val_subsets, test_fraction, test_subsets
    )
    if mode == "stride":
        part = _stride_mode_parts(len(candidates), val_stride, test_fraction, test_set)
    else:
        part = _series_split_parts(
            candidates, mode, val_fraction, val_stride, val_set, test_fraction, test_set, data_root
        )
    return _split_from_parts(candidates, mode, part)


def _check_split_settings(
    val_fraction: float,
    val_stride: int | None,
    val_subsets: Sequence[int],
    test_fraction: float,
    test_subsets: Sequence[int],
) -> tuple[float, int | None, frozenset[int], float, frozenset[int]]:
    """Checked (val_fraction, val_stride, val_subsets, test_fraction, test_subsets) of a split, or ConfigError."""
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_stride is not None:
        val_stride = _check_int(
            "val_stride (--val-stride)", val_stride, 2, " (every Nth candidate or series goes to validation)"
        )
    val_set = _check_subsets("val_subsets", val_subsets)
    test_set = _check_subsets("test_subsets", test_subsets)
    return val_fraction, val_stride, val_set, test_fraction, test_set


@dataclasses.dataclass(frozen=True, eq=False)
class SeriesSplit:
    """Series of each part of a split by series: train, val, test (s,) str, sorted, disjoint (test may be empty)."""

    mode: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_series(
    series_uids: Sequence[str] | np.ndarray,
    mode: str = "series",
    *,
    val_fraction: float = 0.1,
    val_stride: int | None = None,
    val_subsets: Sequence[int] = (9,),
    test_fraction: float = 0.0,
    test_subsets: Sequence[int] = (),
    data_root=None,
) -> SeriesSplit:
    """Split series (CTs) into train / val / test exactly as `split_candidates` splits their candidates.

    For the segmentation model, which works on whole CTs: with the same settings a series lands
    in the same part here as its candidates do in `split_candidates` ("series": by
    `series_fraction`, "subset": by LUNA16 fold; see there), so no CT validates one model after
    training the other ("series-stride" counts positions among the uids it is given, so it agrees when
    every series has candidates, as in LUNA16). Duplicate uids count once. The book's "stride" split is
    per candidate and has no meaning here: ConfigError, as for fewer than 2 series or an empty train or val part.
    """
    if mode not in SPLIT_MODES:
        raise ConfigError(f"split mode {mode!r} is unknown; expected one of {', '.join(SPLIT_MODES)}")
    if mode == "stride":
        raise ConfigError(
            "split mode 'stride' puts every Nth candidate in validation and does not apply to whole CTs; "
            "use --split series or --split subset (they give the same series split as the classifier's)"
        )
    settings = _check_split_settings(val_fraction, val_stride, val_subsets, test_fraction, test_subsets)
    uids = np.unique(np.asarray(series_uids, dtype=str).reshape(-1))
    if len(uids) < 2:
        raise ConfigError(
            f"{mode} split: {len(uids)} series; a split by series needs at least 2 (one to train on, one to "
            "validate); add CTs"
        )
    part = _parts_of_series(uids, mode, *settings, data_root)
    return SeriesSplit(mode=mode, train=uids[part == _TRAIN], val=uids[part == _VAL], test=uids[part == _TEST])


def _stride_mode_parts(
    num_candidates: int, val_stride: int | None, test_fraction: float, test_set: frozenset[int]
) -> np.ndarray:
    """(M,) int8 part of each candidate for the book's stride split; ConfigError for a test part or M < 2."""
    if test_fraction or test_set:
        raise ConfigError(
            "the stride split has no test part (test_fraction / test_subsets given); "
            "use --split series with --test-fraction, or --split subset with --test-subsets"
        )
    stride = DEFAULT_VAL_STRIDE if val_stride is None else val_stride
    part = np.full(num_candidates, _TRAIN, dtype=np.int8)
    part[::stride] = _VAL
    if num_candidates < 2:
        raise ConfigError(f"stride split of {num_candidates} candidate leaves none for training; use more candidates")
    return part


def _series_split_parts(
    candidates: CandidateArrays,
    mode: str,
    val_fraction: float,
    val_stride: int | None,
    val_set: frozenset[int],
    test_fraction: float,
    test_set: frozenset[int],
    data_root,
) -> np.ndarray:
    """(M,) int8 part of each candidate for the "series" and "subset" modes: its series' part."""
    present = np.unique(candidates.series_index)
    uids = np.asarray(candidates.series_uids, dtype=str)[present]
    if len(uids) < 2:
        raise ConfigError(
            f"{mode} split: the candidates come from only {len(uids)} series; a split by series "
            "needs at least 2 (one to train on, one to validate); add CTs, or use --split stride (leaky)"
        )
    series_part = _parts_of_series(uids, mode, val_fraction, val_stride, val_set, test_fraction, test_set, data_root)
    lookup = np.full(len(candidates.series_uids), -1, dtype=np.int8)
    lookup[present] = series_part
    return lookup[candidates.series_index]


def _parts_of_series(
    uids: np.ndarray,
    mode: str,
    val_fraction: float,
    val_stride: int | None,
    val_set: frozenset[int],
    test_fraction: float,
    test_set: frozenset[int],
    data_root,
) -> np.ndarray:
    """(S,) int8 part of each of the distinct series `uids` in the "series" or "subset" mode.

    Arguments are already checked; this rejects those that belong to the other mode.
    """
    if mode == "series":
        if test_set:
            raise ConfigError(
                f"test_subsets {sorted(test_set)} apply to --split subset; the series split takes --test-fraction"
            )
        if val_stride is not None:
            val_fraction = 1.0 / val_stride
        return _series_mode_parts(uids, val_fraction, test_fraction)
    if mode == "series-stride":
        return _series_stride_parts(uids, val_stride, test_fraction, test_set)
    if test_fraction:
        raise ConfigError(
            f"test_fraction {test_fraction:g} applies to --split series; the subset split takes --test-subsets"
        )
    if val_stride is not None:
        raise ConfigError("val_stride applies to --split series or stride; the subset split takes --val-subsets")
    return _subset_mode_parts(uids, val_set, test_set, data_root)


def _series_stride_parts(
    uids: np.ndarray, val_stride: int | None, test_fraction: float, test_set: frozenset[int]
) -> np.ndarray:
    """(S,) int8 part of each of the distinct `uids` in the book's chapter-14 split: in sorted uid order, every
    `val_stride`-th series (default 10) from the first to validation; ConfigError for a test part."""
    if test_fraction or test_set:
        raise ConfigError(
            "the series-stride split (the book's) has no test part (test_fraction / test_subsets given); "
            "use --split series with --test-fraction, or --split subset with --test-subsets"
        )
    part = np.full(len(uids), _TRAIN, dtype=np.int8)
    in_order = np.argsort(np.asarray(uids, dtype=str), kind="stable")
    part[in_order[:: DEFAULT_VAL_STRIDE if val_stride is None else val_stride]] = _VAL
    return part


def _split_from_parts(candidates: CandidateArrays, mode: str, part: np.ndarray) -> Split:
    """The `Split` whose rows are those of `part` ((M,) int8: _TRAIN, _VAL or _TEST per candidate)."""
    all_uids = np.asarray(candidates.series_uids, dtype=str)
    rows = {p: np.flatnonzero(part == p).astype(np.int64) for p in (_TRAIN, _VAL, _TEST)}
    series = {p: np.unique(all_uids[candidates.series_index[r]]) for p, r in rows.items()}
    return Split(
        mode=mode,
        train=rows[_TRAIN],
        val=rows[_VAL],
        test=rows[_TEST],
        train_series=series[_TRAIN],
        val_series=series[_VAL],
        test_series=series[_TEST],
    )


def _series_mode_parts(uids: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """(S,) int8 part of each series by `series_fraction`; ConfigError when train or val is empty."""
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction {val_fraction:g} + test_fraction {test_fraction:g} leave nothing "
            "for training; keep their sum below 1"
        )
    where = np.array([series_fraction(str(u)) for u in uids], dtype=np.float64)
    part = np.full(len(uids), _TRAIN, dtype=np.int8)
    part[where < test_fraction + val_fraction] = _VAL
    part[where < test_fraction] = _TEST
    settings = f"val_fraction {val_fraction:g}, test_fraction {test_fraction:g}"
    if not (part == _VAL).any():
        # The smallest val_fraction that would take the lowest-placed non-test series.
        above = where[where >= test_fraction]
        need = math.ceil((float(above.min()) - test_fraction) * 1000 + 1e-6) / 1000
        raise ConfigError(
            f"series split put none of the {len(uids)} series in validation ({settings}); with so "
            f"few series raise --val-fraction to at least {need:g}, or use --split subset (LUNA16 folds)"
        )
    if not (part == _TRAIN).any():
        raise ConfigError(
            f"series split put none of the {len(uids)} series in training ({settings}); "
            "lower --val-fraction / --test-fraction"
        )
    return part


def _subset_mode_parts(uids: np.ndarray, val_set: frozenset[int], test_set: frozenset[int], data_root) -> np.ndarray:
    """(S,) int8 part of each series by its subset folder; ConfigError when train or val is empty."""
    subsets = _series_subsets(uids, data_root)
    part = np.full(len(uids), _TRAIN, dtype=np.int8)
    part[np.isin(subsets, sorted(val_set))] = _VAL
    part[np.isin(subsets, sorted(test_set))] = _TEST
    found = sorted({int(s) for s in subsets})
    if not (part == _VAL).any():
        raise ConfigError(
            f"subset split: none of the {len(uids)} series is in val_subsets {sorted(val_set)} "
            f"(test_subsets {sorted(test_set)} take precedence); the series are in subsets {found}; "
            "pick --val-subsets among those"
        )
    if not (part == _TRAIN).any():
        raise ConfigError(
            f"subset split: all {len(uids)} series are in the validation/test subsets "
            f"{sorted(val_set | test_set)} (the series are in subsets {found}); "
            "leave at least one subset for training"
        )
    return part


# --- samplers ---------------------------------------------------------------------------------


def _check_shard(rank: Any, world_size: Any) -> tuple[int, int]:
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ConfigError(f"rank {rank} is out of range for world_size {world_size}; expected 0 … {world_size - 1}")
    return rank, world_size


def _permutation_stream(population: int, start: int, count: int, seed: int, stream: int) -> np.ndarray:
    """Elements [start, start + count) of an endless run of seeded permutations of range(population).

    Pass p of the run is one permutation; every value appears once per pass, so nothing
    repeats before everything has been drawn. Passes are made in blocks of B rows (B * population
    ≈ 65k elements, at least 1 row) from a generator seeded by (seed, stream, block): a pass
    depends only on its number, which keeps the run consistent across epoch boundaries, and
    small populations (a handful of positives) do not cost one generator per pass.
    Returns (count,) int64 values in [0, population).
    """
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    rows = max(1, _BLOCK_ELEMENTS // population)
    first_pass, last_pass = start // population, (start + count - 1) // population
    parts = []
    for block in range(first_pass // rows, last_pass // rows + 1):
        rng = np.random.default_rng([seed, stream, block])
        table = np.broadcast_to(np.arange(population, dtype=np.int64), (rows, population))
        parts.append(rng.permuted(table, axis=1).ravel())
    run = np.concatenate(parts)
    offset = start - (first_pass // rows) * rows * population
    return run[offset : offset + count]


def _check_labels(labels: Any) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
        raise ConfigError(
            f"labels: expected a (M,) bool array (dataset.labels), got shape {array.shape} dtype {array.dtype}"
        )
    if array.dtype != bool:
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ConfigError("labels: integer labels must be 0 or 1 (1 = nodule)")
        array = array.astype(bool)
    return array


class _EpochSampler(Sampler[int]):
    """Shared parts: epoch bookkeeping and the contiguous DDP shard of a global sequence."""

    def __init__(self, epoch_size: int, seed: int, rank: int, world_size: int):
        super().__init__()
        self.seed = _check_int("seed", seed, 0)
        self.rank, self.world_size = _check_shard(rank, world_size)
        self.epoch_size = epoch_size
        # Every rank draws the same number of samples (DDP needs equal step counts): the epoch
        # is rounded up to a multiple of world_size, with more draws from the endless run (no
        # padding duplicates).
        self.num_samples = math.ceil(epoch_size / self.world_size)
        self.total_size = self.num_samples * self.world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples to draw (same on every rank; call before iterating)."""
        self.epoch = _check_int("epoch", epoch, 0)

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        """(total_size,) int64 dataset indices of the whole epoch, all ranks together."""
        raise NotImplementedError

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """(num_samples,) int64 dataset indices of this rank's shard (a contiguous slice)."""
        start = self.rank * self.num_samples
        return self.global_indices(epoch)[start : start + self.num_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


class BalancedSampler(_EpochSampler):
    """Draw `ratio` negatives per positive, for epochs of a fixed size.

    labels: (M,) bool, True = nodule (`LunaDataset.labels`). ratio: negatives per positive
    (1 = the book's `--balanced`). epoch_size: samples per epoch over all ranks; default
    min(200,000, M): the book's 200,000 on LUNA16, and one candidate's worth per sample on
    small (e.g. synthetic) sets, so an epoch there does not take 200,000 steps. Rounded up to a
    multiple of world_size.

    The epoch's sequence puts a positive at every position p with p % (ratio + 1) == 0 and a
    negative elsewhere, so every stretch of (ratio + 1) samples holds exactly one positive.
    Positives come from an endless run of seeded permutations of all positives, negatives
    likewise; epoch e continues the runs where epoch e - 1 stopped, so every negative is seen
    once before any is seen again even when an epoch holds fewer negatives than exist.
    Rank r takes the contiguous slice [r * len, (r + 1) * len) of the sequence (a strided
    shard would give some ranks only positives). The sequence depends only on (labels, ratio,
    epoch_size, seed, epoch): give every rank the same seed and call `set_epoch`.
    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        ratio: int = 1,
        epoch_size: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        labels = _check_labels(labels)
        self.ratio = _check_int("ratio (--balance-ratio)", ratio, 1, " (negatives per positive)")
        self.positives = np.flatnonzero(labels).astype(np.int64)
        self.negatives = np.flatnonzero(~labels).astype(np.int64)
        if len(self.positives) == 0 or len(self.negatives) == 0:
            kind = "positive (nodule)" if len(self.positives) == 0 else "negative (non-nodule)"
            raise ConfigError(
                f"balanced sampling needs at least one {kind} candidate, but the {len(labels)} "
                f"candidates have {len(self.positives)} positives and {len(self.negatives)} negatives; "
                "use more series for training (another split) or train without --balanced"
            )
        if epoch_size is None:
            epoch_size = min(BOOK_EPOCH_SIZE, len(labels))
        super().__init__(_check_int("epoch_size (--epoch-size)", epoch_size, 1), seed, rank, world_size)

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        period = self.ratio + 1
        positive_slot = np.arange(self.total_size) % period == 0
        n_pos = int(positive_slot.sum())
        n_neg = self.total_size - n_pos
        out = np.empty(self.total_size, dtype=np.int64)
        out[positive_slot] = self.positives[
            _permutation_stream(len(self.positives), epoch * n_pos, n_pos, self.seed, _STREAM_POSITIVE)
        ]
        out[~positive_slot] = self.negatives[
            _permutation_stream(len(self.negatives), epoch * n_neg, n_neg, self.seed, _STREAM_NEGATIVE)
        ]
        return out


class ShuffleSampler(_EpochSampler):
    """Unbalanced training: every index in a fresh seeded order, sharded for DDP.

    length: dataset size M. epoch_size: samples per epoch over all ranks (default M, rounded up
    to a multiple of world_size). Draws from an endless run of seeded permutations of
    range(M), each epoch continuing where the last stopped, so with the default size (and one
    rank) every epoch is one permutation. Rank r takes a contiguous slice, as in BalancedSampler.
    """

    def __init__(
        self,
        length: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_size: int | None = None,
    ):
        self.length = _check_int("length (dataset size)", length, 1)
        size = self.length if epoch_size is None else _check_int("epoch_size (--epoch-size)", epoch_size, 1)
        super().__init__(size, seed, rank, world_size)

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        return _permutation_stream(self.length, epoch * self.total_size, self.total_size, self.seed, _STREAM_SHUFFLE)


def shard_bounds(length: int, world_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] per rank: contiguous shards of range(length), sizes differing by at most 1."""
    length = _check_int("length", length, 0)
    world_size = _check_int("world_size", world_size, 1)
    edges = [length * r // world_size for r in range(world_size + 1)]
    return list(itertools.pairwise(edges))


class EvalSampler(Sampler[int]):
    """Validation / test order: rank r gets the contiguous, in-order shard `shard_bounds(...)[r]`.

    Every index is visited exactly once over all ranks, never twice: unlike torch's
    DistributedSampler nothing is padded, so no candidate is counted twice in the metrics.
    Shards therefore differ in length by up to one sample (and ranks may differ by one batch).
    How the training app gathers them:

    - run the evaluation forward pass on the unwrapped model (`ddp_model.module`) under
      `torch.no_grad()`, and do no collective per batch (ranks may have different batch counts);
    - collect this rank's outputs in order; pad them to `max(sizes)` rows
      (`sizes = [stop - start for start, stop in shard_bounds(length, world_size)]`),
      `all_gather` once, and concatenate `gathered[r][:sizes[r]]` for r = 0 … world_size-1;
      because shards are contiguous and in order, row k of the result is dataset item k.
    """

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.length = _check_int("length (dataset size)", length, 0)
        self.rank, self.world_size = _check_shard(rank, world_size)
        self.start, self.stop = shard_bounds(self.length, self.world_size)[self.rank]

    def set_epoch(self, epoch: int) -> None:
        """No-op (the order never changes); present so loops can call it on every sampler."""
        _check_int("epoch", epoch, 0)

    def shard_sizes(self) -> list[int]:
        """Number of samples of every rank's shard, in rank order."""
        return [stop - start for start, stop in shard_bounds(self.length, self.world_size)]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


# --- loader -----------------------------------------------------------------------------------


def _init_loader_worker(freeze_gc: bool, worker_init_fn: Callable[[int], None] | None, worker_id: int) -> None:
    """Worker start-up of a `LunaDataLoader`: exit with the parent, `gc.freeze()` (freeze_gc), then the caller's init.

    torch's own watchdog ends an idle worker about 5 s after its parent died, but not one busy in
    `__getitem__` (a CT load, a blocked read): the parent-death signal ends that one too, at once.
    """
    exit_with_parent(os.getppid())
    sys.excepthook = functools.partial(_quiet_broken_handoff, sys.excepthook)
    if freeze_gc:
        gc.freeze()
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def _quiet_broken_handoff(previous: Callable[..., None], kind: type[BaseException], value: BaseException, tb) -> None:
    """A worker's `sys.excepthook` that drops one known traceback: a batch hand-off the parent broke off.

    torch hands a batch's shared memory to the parent through multiprocessing's resource sharer, a
    thread in the worker that reports its errors with `sys.excepthook`. When the parent stops mid-hand-off
    (Ctrl-C, SIGTERM, an error), that connection breaks and the traceback would follow the command's
    one-line message; it is noise.
    """
    in_sharer = any(frame.f_code.co_filename.endswith("resource_sharer.py") for frame, _ in traceback.walk_tb(tb))
    if in_sharer and issubclass(kind, (EOFError, OSError)):
        return
    previous(kind, value, tb)


class LunaDataLoader(DataLoader):
    """A DataLoader whose worker processes freeze their garbage collector as they start.

    A forked worker inherits every Python object of the parent (torch's modules alone are tens
    of MB of them). Its first full garbage collection walks them all and writes their GC
    headers, copying those pages into the worker: about 45 MB per worker, measured. Objects
    moved to the permanent generation by `gc.freeze()` are skipped by collections, so the pages
    stay shared. Each worker freezes what it inherited, first thing in its `worker_init_fn`
    (any `worker_init_fn` given runs after that); the main process's collector is never frozen.
    The cost, in workers only: garbage *cycles* among objects alive at the freeze are not
    collected (objects freed by reference counting are, as always). `freeze_gc=False` turns
    this off.
    """

    # Why freeze in the worker, not in the parent around the fork: both keep a worker's private
    # memory flat (benchmarks/bench_dataset_memory.py, 200k candidates, 2 fork workers: Private_Dirty
    # 8-9 -> 15 MB per worker over the epoch with this, the same as with the old process-wide
    # freeze, vs 8-9 -> 59 MB unfrozen). But a freeze in the parent must be undone right after
    # the fork (else everything alive then is exempt from collection for the rest of the run),
    # and `gc.unfreeze()` cannot undo only our part: it also thaws whatever the caller froze on
    # purpose. In the worker the freeze is O(1) (a list splice that touches no object) and needs
    # no undoing. Before it runs, the worker only allocates a handful of objects (torch's seeding
    # and bookkeeping), and the `gc.collect()` in `__iter__` just before the fork zeroes the
    # collector's counters, so that window is far too short to reach a full collection.
    # The price of an unfrozen parent: its own next full collection writes the GC headers of
    # its objects and so copies their pages once, into the parent (not once per worker).

    def __init__(
        self,
        *args: Any,
        freeze_gc: bool = True,
        worker_init_fn: Callable[[int], None] | None = None,
        **kwargs: Any,
    ):
        worker_init_fn = functools.partial(_init_loader_worker, freeze_gc, worker_init_fn)
        super().__init__(*args, worker_init_fn=worker_init_fn, **kwargs)
        self.freeze_gc = freeze_gc

    def __iter__(self):
        starts_workers = self.num_workers > 0 and (
            not self.persistent_workers or getattr(self, "_iterator", None) is None
        )
        if self.freeze_gc and starts_workers:
            # Collect garbage before the fork so workers do not freeze (and keep) it, and so the
            # collector's counters start at zero in the workers (see the comment above).
            gc.collect()
        return super().__iter__()


def _worker_settings(
    num_workers: int,
    persistent_workers: bool | None,
    prefetch_factor: int | None,
    multiprocessing_context: str | Any | None,
) -> tuple[bool, int | None, str | Any | None]:
    """Checked `(persistent_workers, prefetch_factor, multiprocessing_context)` for `create_loader`.

    With no workers the three mean nothing (False, None, None); prefetch_factor or
    persistent_workers given anyway is a ConfigError, as is an unknown start method.
    """
    if num_workers == 0:
        if prefetch_factor is not None or persistent_workers:
            raise ConfigError(
                "prefetch_factor / persistent_workers need worker processes; set num_workers > 0 or leave them unset"
            )
        return False, None, None
    if persistent_workers is None:
        persistent_workers = True
    if prefetch_factor is not None:
        prefetch_factor = _check_int("prefetch_factor", prefetch_factor, 1)
    if isinstance(multiprocessing_context, str):
        known = torch.multiprocessing.get_all_start_methods()
        if multiprocessing_context not in known:
            raise ConfigError(
                f"multiprocessing_context {multiprocessing_context!r} is not available here; "
                f"expected one of {', '.join(known)}"
            )
    return bool(persistent_workers), prefetch_factor, multiprocessing_context


def create_loader(
    dataset: Dataset,
    sampler: Sampler[int],
    *,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    multiprocessing_context: str | Any | None = None,
    drop_last: bool = False,
    collate_fn: Callable[[Sequence[Any]], Any] = collate_luna,
    freeze_gc: bool = True,
    reuse_buffers: bool = True,
) -> LunaDataLoader:
    """A DataLoader for `LunaDataset` with this project's defaults.

    pin_memory: default True only when CUDA is available (pinned int16 batches, see
    `to_device_batch`). persistent_workers: default True when num_workers > 0 (workers, and
    their open cache handles, survive between epochs; the sampler runs in the main process, so
    `set_epoch` still takes effect). prefetch_factor: batches each worker keeps ready (torch's
    default 2 when None; only with num_workers > 0). multiprocessing_context: None (the
    platform default: fork on Linux), "fork", "spawn" or "forkserver"; the dataset and chunk
    source are picklable, so all work. Workers need no seeding: all randomness lives in the
    sampler (main process) and in batched augmentation on the device. freeze_gc: each worker
    calls `gc.freeze()` as it starts, so its collections do not copy the objects it inherited
    from the parent (see `LunaDataLoader`; with it, a worker's private memory stays flat over a
    LUNA16 epoch); the main process's collector is left as it is. reuse_buffers: with workers and
    a `LunaDataset`, each worker reuses prefetch factor + 2 shared batch buffers the main process
    has released (`p2ch.batchbuffers`); False: a fresh buffer per batch. A dataset that already
    serves another loader's pool is shallow-copied, so no two loaders share one.
    Batches are `LunaBatch` (chunk (N, 1, I, R, C) int16 HU, label (N,) int64, series_uid
    list of str, center_irc (N, 3) int64).
    """
    batch_size = _check_int("batch_size (--batch-size)", batch_size, 1)
    num_workers = _check_int("num_workers (--num-workers)", num_workers, 0)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    persistent_workers, prefetch_factor, multiprocessing_context = _worker_settings(
        num_workers, persistent_workers, prefetch_factor, multiprocessing_context
    )
    pooled = reuse_buffers and num_workers > 0 and isinstance(dataset, LunaDataset) and collate_fn is collate_luna
    if isinstance(dataset, LunaDataset) and (pooled or dataset.buffers is not None):
        if dataset.buffers is not None:  # it serves another loader's pool: this loader gets its own copy
            dataset = copy.copy(dataset)
        dataset.buffers = BatchBuffers(num_workers, buffer_slots(prefetch_factor)) if pooled else None
    return LunaDataLoader(
        dataset,
        freeze_gc=freeze_gc,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=bool(pin_memory),
        drop_last=drop_last,
        persistent_workers=persistent_workers,
        prefetch_factor=prefetch_factor,
        multiprocessing_context=multiprocessing_context,
    )
