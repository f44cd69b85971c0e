"""DevicePrefetcher: pass-through on the CPU, one-ahead side-stream copies on CUDA, and its wiring."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from p2ch import datasets, inference, training
from p2ch.cache import ChunkCache
from p2ch.candidates import CandidateArrays, get_candidate_arrays
from p2ch.datasets import DevicePrefetcher, EvalSampler, LunaBatch, LunaDataset, create_loader, to_device_batch
from p2ch.geometry import IrcTuple

from conftest import make_model

WIDTH = (4, 6, 8)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class NumberedSource:
    """A chunk source whose chunk is the candidate's x in mm (rounded) plus the voxel's flat position."""

    def get_ct_raw_candidate(self, series_uid, center_xyz, width_irc=WIDTH, *, out=None):
        chunk = (np.arange(np.prod(width_irc)).reshape(width_irc) + round(center_xyz[0])).astype(np.int16)
        if out is not None:
            out[...] = chunk
            chunk = out
        return chunk, IrcTuple(1, 2, round(center_xyz[0]))


def make_dataset(n: int = 22) -> LunaDataset:
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100000000001"
    rows = np.arange(n)
    candidates = CandidateArrays(
        series_uids=np.array([uid]),
        series_index=np.zeros(n, dtype=np.int32),
        center_xyz=np.stack([rows * 10.0, rows * 0.0, rows * 0.0], axis=1),
        is_nodule=rows % 3 == 0,
        has_annotation=rows % 3 == 0,
        is_mal=rows % 6 == 0,
        diameter_mm=np.zeros(n, dtype=np.float32),
    )
    return LunaDataset(candidates, None, NumberedSource(), WIDTH)


def assert_same(got: LunaBatch, want: LunaBatch) -> None:
    for name in ("chunk", "label", "center_irc"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), name
    assert got.series_uid == want.series_uid


# --- CPU ----------------------------------------------------------------------------------------


def test_cpu_is_a_pass_through_in_order():
    ds = make_dataset()
    loader = create_loader(ds, EvalSampler(len(ds)), batch_size=5, pin_memory=False)
    prefetcher = DevicePrefetcher(loader, "cpu")
    assert len(prefetcher) == len(loader) == 5
    got, want = list(prefetcher), list(loader)
    assert len(got) == len(want) == 5
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
        assert g.chunk.dtype == torch.int16 and g.chunk.device.type == "cpu"
    batches = [object(), object()]  # the loader's own objects, untouched
    assert list(DevicePrefetcher(batches, torch.device("cpu"))) == batches


def test_one_ahead_starts_the_next_batch_before_handing_out_this_one():
    events: list[str] = []

    def start(k):
        events.append(f"start {k}")
        return k

    def finish(k):
        events.append(f"hand {k}")
        return k * 10

    got = []
    for out in datasets._one_ahead(iter(range(4)), start, finish):
        events.append(f"use {out // 10}")
        got.append(out)
    assert got == [0, 10, 20, 30]
    assert events == [
        "start 0", "start 1", "hand 0", "use 0",
        "start 2", "hand 1", "use 1",
        "start 3", "hand 2", "use 2",
        "hand 3", "use 3",
    ]  # fmt: skip
    assert list(datasets._one_ahead(iter([]), start, finish)) == []
    events.clear()
    for _ in datasets._one_ahead(iter(range(9)), start, finish):
        break  # a consumer that stops early (--max-train-batches): one batch started ahead, no more
    assert events == ["start 0", "start 1", "hand 0"]


# --- wiring -------------------------------------------------------------------------------------


class SpyPrefetcher(DevicePrefetcher):
    """Records every prefetcher made and how many batches went through each."""

    made: ClassVar[list[SpyPrefetcher]] = []

    def __init__(self, loader, device):
        super().__init__(loader, device)
        self.batches = 0
        SpyPrefetcher.made.append(self)

    def __iter__(self):
        for batch in super().__iter__():
            self.batches += 1
            yield batch


@pytest.fixture
def spy(monkeypatch):
    SpyPrefetcher.made = []
    monkeypatch.setattr(training, "DevicePrefetcher", SpyPrefetcher)
    monkeypatch.setattr(inference, "DevicePrefetcher", SpyPrefetcher)
    return SpyPrefetcher.made


def test_training_and_validation_batches_go_through_the_prefetcher(synth_set, tmp_path, spy):
    root = synth_set(num_cts=4, size=96, slices=48, candidates_per_ct=40, nodules_per_ct=2, seed=11)
    argv = [
        "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
        "--checkpoint-dir", str(tmp_path / "models"), "--batch-size", "4", "--num-workers", "0",
        "--val-fraction", "0.5", "--log-level", "WARNING", "--epochs", "1", "--images-every", "0",
        "--max-train-batches", "2", "--max-val-batches", "3", "--device", "cpu",
    ]  # fmt: skip
    assert training.main(argv) == 0
    assert [p.batches for p in spy] == [2, 3]  # train, then validation
    assert all(p.device == torch.device("cpu") for p in spy)


def test_scoring_through_the_cache_goes_through_the_prefetcher(tiny_root, tmp_path, spy):
    candidates = get_candidate_arrays(tiny_root)
    scorer = inference.Scorer(make_model(), torch.device("cpu"), None, channels_last=False)
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    indices = np.arange(len(candidates))
    probs = inference.score_from_cache(
        scorer, candidates, indices, cache, width_irc=(32, 48, 48), batch_size=3, num_workers=0, progress=False
    )
    assert [p.batches for p in spy] == [-(-len(indices) // 3)]
    ds = LunaDataset(candidates, indices, cache, (32, 48, 48))
    want = torch.cat([scorer(ds.__getitems__(list(range(s, min(s + 3, len(ds))))).chunk) for s in range(0, len(ds), 3)])
    np.testing.assert_array_equal(probs, want.numpy().astype(np.float64))


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_cuda_results_match_and_copies_run_on_a_side_stream(monkeypatch):
    device = torch.device("cuda")
    ds = make_dataset(40)
    loader = create_loader(ds, EvalSampler(len(ds)), batch_size=6, pin_memory=True)
    want = [(to_device_batch(b.chunk, device), b.label.to(device)) for b in loader]

    streams = []
    original_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if self.device.type == "cpu" and isinstance(target, (torch.device, str)) and "cuda" in str(target):
            streams.append(torch.cuda.current_stream(device))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    got = []
    for batch in DevicePrefetcher(loader, device):
        assert batch.chunk.device.type == "cuda" and batch.chunk.dtype == torch.int16
        assert batch.label.device.type == "cuda"
        x = to_device_batch(batch.chunk, device)  # float32 on the compute stream, as the steps do
        torch.cuda._sleep(1_000_000)  # a slow "step", so the next copy overlaps work on the compute stream
        got.append((x * 1, batch.label.clone()))
    monkeypatch.undo()
    torch.cuda.synchronize()
    assert len(got) == len(want) == len(loader)
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        assert gx.dtype == torch.float32 and torch.equal(gx, wx) and torch.equal(gy, wy)
    default = torch.cuda.default_stream(device)
    assert len(streams) == 2 * len(loader)  # chunk and label of every batch
    assert all(s != default for s in streams)
