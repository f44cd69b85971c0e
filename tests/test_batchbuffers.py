"""Reusable batch buffers (p2ch.batchbuffers): workers reuse what the main process let go of, and nothing else."""

from __future__ import annotations

import gc
import pickle

import pytest
import torch
from test_datasets import SMALL_WIDTH, OutSource, assert_same_batch, make_candidates

from p2ch import runtime
from p2ch.batchbuffers import BatchBuffers, Leased, buffer_slots
from p2ch.datasets import EvalSampler, LunaDataset, ShuffleSampler, create_loader
from p2ch.runtime import check_loader_shared_memory, loader_shm_bytes

BATCH = 8


def _dataset() -> LunaDataset:
    return LunaDataset(make_candidates(4, 50), None, OutSource(), SMALL_WIDTH)  # 200 items, 25 batches


def _reference(ds: LunaDataset, sampler) -> list:
    return list(create_loader(ds, sampler, batch_size=BATCH, num_workers=0))


def _stream(loader, want: list) -> None:
    """One epoch of `loader` equals `want`, each batch dropped before the next arrives (as a training loop does)."""
    count = 0
    for got, expected in zip(loader, want, strict=True):
        assert_same_batch(got, expected)
        count += 1
    assert count == len(want)


def _same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert_same_batch(g, w)


def test_workers_reuse_released_buffers_and_the_batches_are_unchanged():
    ds = _dataset()
    sampler = ShuffleSampler(len(ds), seed=3)
    loader = create_loader(ds, sampler, batch_size=BATCH, num_workers=2)
    pool = loader.dataset.buffers
    assert isinstance(pool, BatchBuffers) and pool.slots == buffer_slots() == 4
    for epoch in range(3):
        sampler.set_epoch(epoch)
        want = _reference(ds, sampler)
        for got, expected in zip(loader, want, strict=True):  # each batch dropped before the next arrives
            assert_same_batch(got, expected)
    stats = pool.stats()
    assert stats["fallback"] == 0, stats
    assert stats["allocated"] <= 2 * pool.slots  # each slot's buffer made once, then reused
    assert stats["reused"] == 75 - stats["allocated"]


def test_a_batch_the_consumer_keeps_is_never_overwritten():
    """Batches (and views of them) kept across later epochs keep their values: their buffers stay busy."""
    ds = _dataset()
    sampler = EvalSampler(len(ds))
    want = _reference(ds, sampler)
    loader = create_loader(ds, sampler, batch_size=BATCH, num_workers=2)
    kept = list(loader)
    view = kept[3].chunk[1:3]  # only a view of batch 3 survives below
    expected_view = want[3].chunk[1:3].clone()
    for _ in range(2):
        _same(list(loader), want)
    _same(kept, want)
    del kept
    gc.collect()
    for _ in range(2):
        _same(list(loader), want)
    assert torch.equal(view, expected_view)
    assert loader.dataset.buffers.stats()["fallback"] > 0  # every slot was busy while `kept` lived


def test_an_epoch_stopped_early_releases_the_batches_torch_drops():
    """Breaking out of an epoch leaves prefetched batches in flight; torch drains them at the next epoch and
    they are released like any other, so the following epochs reuse buffers again."""
    ds = _dataset()
    sampler = EvalSampler(len(ds))
    want = _reference(ds, sampler)
    loader = create_loader(ds, sampler, batch_size=BATCH, num_workers=2)
    pool = loader.dataset.buffers
    for _ in range(3):
        for k, _batch in enumerate(loader):
            if k == 2:
                break
        del _batch
    _stream(loader, want)
    before = pool.stats()
    _stream(loader, want)
    after = pool.stats()
    assert after["fallback"] == before["fallback"] and after["reused"] - before["reused"] == len(want)


def test_fresh_buffers_when_asked_and_without_workers():
    ds = _dataset()
    sampler = EvalSampler(len(ds))
    assert create_loader(ds, sampler, batch_size=BATCH, num_workers=2, reuse_buffers=False).dataset.buffers is None
    assert create_loader(ds, sampler, batch_size=BATCH, num_workers=0).dataset.buffers is None
    first = create_loader(ds, sampler, batch_size=BATCH, num_workers=1)
    second = create_loader(ds, sampler, batch_size=BATCH, num_workers=1)
    assert first.dataset is ds and second.dataset is not ds  # one pool per loader
    assert first.dataset.buffers is not second.dataset.buffers
    fresh = create_loader(ds, sampler, batch_size=BATCH, num_workers=1, reuse_buffers=False)
    assert fresh.dataset is not ds and fresh.dataset.buffers is None  # not the first loader's pool
    assert ds.buffers is first.dataset.buffers
    _same(list(second), _reference(ds, sampler))


def test_spawned_workers_reuse_buffers_too():
    ds = _dataset()
    sampler = EvalSampler(len(ds))
    loader = create_loader(ds, sampler, batch_size=BATCH, num_workers=1, multiprocessing_context="spawn")
    want = _reference(ds, sampler)
    for _ in range(2):
        _stream(loader, want)
    stats = loader.dataset.buffers.stats()
    assert stats["fallback"] == 0 and stats["reused"] >= 2 * len(want) - buffer_slots()


def test_a_lease_travels_as_its_tensor_and_is_released_when_its_storage_dies(monkeypatch):
    """The protocol without a DataLoader: pickled and unpickled in this process, as the worker queue does."""
    pool = BatchBuffers(num_workers=1, slots=2)
    monkeypatch.setattr("p2ch.batchbuffers.get_worker_info", lambda: type("Info", (), {"id": 0})())
    leased = pool.lease((3, 1, 2, 2, 2))
    assert isinstance(leased, Leased) and pool.state[0].tolist() == [1, 0]
    leased.tensor.fill_(7)
    received = pickle.loads(pickle.dumps(leased))
    assert isinstance(received, torch.Tensor) and received.shape == (3, 1, 2, 2, 2) and int(received.sum()) == 168
    del leased
    part = received[1]
    del received
    gc.collect()
    assert pool.state[0].tolist() == [1, 0]  # a view still uses the buffer
    del part
    gc.collect()
    assert pool.state[0].tolist() == [0, 0]
    smaller = pool.lease((2, 1, 2, 2, 2))  # fits the first slot's buffer: reused
    assert pool.stats() == {"reused": 1, "allocated": 1, "fallback": 0}
    pool.lease((3, 1, 2, 2, 2))
    assert isinstance(pool.lease((3, 1, 2, 2, 2)), torch.Tensor)  # both slots busy: a fresh buffer
    assert pool.stats()["fallback"] == 1
    del smaller


def test_bad_pool_sizes_are_refused():
    with pytest.raises(ValueError, match="num_workers >= 1 and slots >= 1"):
        BatchBuffers(num_workers=0, slots=4)


def test_the_shared_memory_estimate_counts_the_pools_of_all_loaders(monkeypatch):
    batch = 256 * 147_488
    assert loader_shm_bytes(batch, 16) == batch * 16 * 2
    assert loader_shm_bytes(batch, 16, reuse=True) == batch * 16 * 4
    assert loader_shm_bytes(batch, 0, reuse=True) == 0
    seen = []
    monkeypatch.setattr(runtime, "check_shared_memory", lambda needed, what, path: seen.append((needed, what)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    check_loader_shared_memory([100, 300], batch_size=10, num_workers=2, reuse=True)
    # pools live as long as their loaders: the two loaders' figures add up
    assert seen == [((100 + 300) * 10 * 2 * 4, "--batch-size 10, --num-workers 2, 4 reused batch buffers per worker "
                     "and loader")]  # fmt: skip
    assert "--batch-buffers fresh" in runtime.SHM_ADVICE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_through_the_device_prefetcher_release_their_buffers():
    """On CUDA the pin-memory thread copies each batch out of its buffer, which is then released at once."""
    from p2ch.datasets import DevicePrefetcher

    ds = _dataset()
    sampler = EvalSampler(len(ds))
    want = _reference(ds, sampler)
    loader = create_loader(ds, sampler, batch_size=BATCH, num_workers=2, pin_memory=True)
    for _ in range(2):
        for got, expected in zip(DevicePrefetcher(loader, "cuda"), want, strict=True):
            assert torch.equal(got.chunk.cpu(), expected.chunk) and torch.equal(got.label.cpu(), expected.label)
    stats = loader.dataset.buffers.stats()
    assert stats["fallback"] == 0 and stats["reused"] > 0, stats
