"""Chunk-batch buffers that DataLoader workers reuse once the main process has let go of them.

A worker that reads a batch (`LunaDataset.__getitems__`) into fresh shared memory pays for the
kernel zero-filling every page of it on first touch: on a 2-core VM 170–200 µs per 147 KB chunk,
more than reading and checking the chunk itself (BENCHMARKS.md, issue 15). Writing into memory
already touched costs about a tenth. So each worker keeps a few batch buffers in shared memory
and writes into one the main process has released.

Released means: no tensor in the main process uses the buffer's memory any more. A worker
cannot see that, so the main process says it: when a leased batch arrives there (unpickled from
the worker's queue, including batches torch drains and drops when an epoch stops early), a
`weakref.finalize` on its storage marks the slot free when the storage dies, i.e. when the last
tensor or view on it is gone. Until then the worker does not touch the buffer; with every slot
busy (a consumer that keeps batches) it falls back to a fresh buffer, as without a pool. So
reuse never changes what a consumer sees, only what a batch costs.

Memory: each worker keeps up to `slots` buffers (prefetch factor + 2 by default: the batches in
flight, the one the main process is using, and one more) for as long as the loader lives, also
while another loader of the run is iterated; `runtime.loader_shm_bytes` counts them.
"""

from __future__ import annotations

import math
import uuid
import weakref
from typing import Any

import torch
from torch.utils.data import get_worker_info

_FREE = 0
_BUSY = 1
_REUSED, _ALLOCATED, _FALLBACK = 0, 1, 2  # columns of BatchBuffers.counts

# The pools of this process by token, so that a batch unpickled here finds the pool to release to.
_POOLS: weakref.WeakValueDictionary[str, BatchBuffers] = weakref.WeakValueDictionary()


def buffer_slots(prefetch_factor: int | None = None) -> int:
    """Buffers each worker keeps: its batches in flight (torch's prefetch factor, 2 when None), the
    one the main process is using, and one more for the moment it takes the next."""
    return (2 if prefetch_factor is None else int(prefetch_factor)) + 2


def new_shared_int16(shape: tuple[int, ...], storage: torch.UntypedStorage | None = None) -> torch.Tensor:
    """An uninitialised int16 tensor of `shape` on `storage` (at its start), or on a new shared-memory storage.

    Shared memory is allocated directly, as torch's own collate does: `share_memory_()` on a fresh
    tensor would allocate private memory first and copy it over (about 20 µs a chunk).
    """
    if storage is None:
        storage = torch.UntypedStorage._new_shared(2 * math.prod(shape))
    return torch.empty(0, dtype=torch.int16).set_(storage, 0, shape)


class BatchBuffers:
    """Per-worker pools of reusable shared-memory int16 batch buffers (see the module docstring).

    num_workers: the DataLoader's worker processes. slots: buffers each worker may keep.
    Make it in the main process before the loader starts its workers (they inherit it with the
    dataset). `counts`: (num_workers, 3) int64 in shared memory, per worker: leases of a buffer
    reused, of a buffer newly allocated into a slot, and fresh buffers outside the pool (every
    slot busy or too small); `stats()` sums them.
    """

    def __init__(self, num_workers: int, slots: int):
        if num_workers < 1 or slots < 1:
            raise ValueError(f"BatchBuffers needs num_workers >= 1 and slots >= 1, got {num_workers} and {slots}")
        self.token = uuid.uuid4().hex
        self.num_workers = int(num_workers)
        self.slots = int(slots)
        self.state = torch.zeros((self.num_workers, self.slots), dtype=torch.int8).share_memory_()
        self.counts = torch.zeros((self.num_workers, 3), dtype=torch.int64).share_memory_()
        self._storages: dict[int, torch.UntypedStorage] = {}  # this worker's buffers by slot
        _POOLS[self.token] = self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_storages"] = {}  # a worker's buffers are its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _POOLS.setdefault(self.token, self)

    def stats(self) -> dict[str, int]:
        """{"reused", "allocated", "fallback"}: leases so far, summed over the workers."""
        total = self.counts.sum(dim=0).tolist()
        return {"reused": total[_REUSED], "allocated": total[_ALLOCATED], "fallback": total[_FALLBACK]}

    def lease(self, shape: tuple[int, ...]) -> torch.Tensor | Leased:
        """An int16 buffer of `shape` for the calling worker: `Leased` when it is a pooled slot, which
        becomes the plain tensor again when the main process unpickles it; a fresh shared tensor when
        every slot is busy (or outside a worker)."""
        info = get_worker_info()
        if info is None or not 0 <= info.id < self.num_workers:
            return new_shared_int16(shape) if info is not None else torch.empty(shape, dtype=torch.int16)
        worker = info.id
        nbytes = 2 * math.prod(shape)
        state = self.state.numpy()
        free = [s for s in range(self.slots) if state[worker, s] == _FREE]
        if not free:
            self.counts[worker, _FALLBACK] += 1
            return new_shared_int16(shape)
        fitting = [s for s in free if s in self._storages and self._storages[s].nbytes() >= nbytes]
        slot = fitting[0] if fitting else free[0]
        if fitting:
            self.counts[worker, _REUSED] += 1
        else:  # a new slot, or one whose buffer is too small for this batch
            self._storages[slot] = torch.UntypedStorage._new_shared(nbytes)
            self.counts[worker, _ALLOCATED] += 1
        state[worker, slot] = _BUSY
        return Leased(new_shared_int16(shape, self._storages[slot]), self.token, worker, slot)

    def _release(self, worker: int, slot: int) -> None:
        self.state[worker, slot] = _FREE


class Leased:
    """A pooled batch buffer on its way from a worker to the main process (see `BatchBuffers.lease`).

    Inside the worker, `tensor` is the buffer to write; pickled, it travels as the tensor (shared
    memory, no copy), and unpickling returns the tensor itself, with its slot released when the
    storage dies in the receiving process.
    """

    __slots__ = ("slot", "tensor", "token", "worker")

    def __init__(self, tensor: torch.Tensor, token: str, worker: int, slot: int):
        self.tensor = tensor
        self.token = token
        self.worker = worker
        self.slot = slot

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _received, (self.tensor, self.token, self.worker, self.slot)


def _received(tensor: torch.Tensor, token: str, worker: int, slot: int) -> torch.Tensor:
    """Unpickling a `Leased`: the tensor, whose slot is freed once no tensor here uses its storage."""
    pool = _POOLS.get(token)
    if pool is not None:
        weakref.finalize(tensor.untyped_storage(), pool._release, worker, slot)
    return tensor
