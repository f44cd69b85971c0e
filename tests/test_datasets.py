import gc
import importlib.util
import math
import warnings

import numpy as np
import pytest
import torch

from p2ch import ct as ct_module
from p2ch import datasets as datasets_module
from p2ch.candidates import CandidateArrays, get_candidate_arrays
from p2ch.datasets import (
    BOOK_EPOCH_SIZE,
    BalancedSampler,
    EvalSampler,
    LunaBatch,
    LunaDataLoader,
    LunaDataset,
    ShuffleSampler,
    collate_luna,
    create_loader,
    series_fraction,
    shard_bounds,
    split_candidates,
    split_series,
    to_device_batch,
)
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import IrcTuple

SMALL_WIDTH = (4, 6, 8)


def make_uid(n: int) -> str:
    # Same form as conftest.make_uid (not imported: isort ranks `conftest` differently by how
    # ruff is invoked).
    return f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{100000000000 + n}"


@pytest.fixture(autouse=True)
def _fresh_index():
    ct_module.clear_caches()
    yield
    ct_module.clear_caches()


class FakeSource:
    """A chunk source whose chunk identifies the candidate it was asked for.

    chunk: every voxel is round(x mm) of the centre, except [0, 0, 0], which is the series'
    number (the uid's last component mod 1000). center_irc: (round z, round y, round x).
    Module-level, so spawned workers can unpickle it.
    """

    def __init__(self, read_only: bool = False, dtype=np.int16, shape=None):
        self.read_only = read_only
        self.dtype = dtype
        self.shape = shape

    def get_ct_raw_candidate(self, series_uid, center_xyz, width_irc=(32, 48, 48)):
        x, y, z = center_xyz
        chunk = np.full(self.shape or tuple(width_irc), round(x), dtype=self.dtype)
        chunk.flat[0] = int(series_uid.rsplit(".", 1)[1]) % 1000
        if self.read_only:
            chunk.flags.writeable = False
        return chunk, IrcTuple(round(z), round(y), round(x))


class OutSource(FakeSource):
    """FakeSource that decodes into the caller's `out`, as ChunkCache does; records every `out` it was given.

    ignore_out: take `out` but return a chunk of its own (which the dataset must check and copy).
    """

    def __init__(self, ignore_out: bool = False, **settings):
        super().__init__(**settings)
        self.ignore_out = ignore_out
        self.outs: list[np.ndarray | None] = []

    def get_ct_raw_candidate(self, series_uid, center_xyz, width_irc=(32, 48, 48), *, out=None):
        chunk, center_irc = super().get_ct_raw_candidate(series_uid, center_xyz, width_irc)
        self.outs.append(out)
        if out is None or self.ignore_out:
            return chunk, center_irc
        out[...] = chunk
        return out, center_irc


def assert_same_batch(got: LunaBatch, want: LunaBatch) -> None:
    """Bit for bit: dtypes, shapes and values of every field."""
    assert isinstance(got, LunaBatch)
    for name in ("chunk", "label", "center_irc"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name
    assert got.series_uid == want.series_uid and all(type(u) is str for u in got.series_uid)


def make_candidates(num_series: int, per_series: int, *, first_series: int = 0, positive_every: int = 7):
    """num_series × per_series candidates; candidate r has x = r + 1 mm (so chunks are distinct).

    Rows run series by series (per_series consecutive rows each); every positive_every-th row
    is a nodule.
    """
    uids = [make_uid(first_series + s) for s in range(num_series)]
    n = num_series * per_series
    rows = np.arange(n)
    center_xyz = np.stack([rows + 1.0, (rows * 3) % 500 + 0.4, -(rows % 97) - 0.2], axis=1)
    return CandidateArrays(
        series_uids=np.array(sorted(uids), dtype=str),
        series_index=np.searchsorted(sorted(uids), np.repeat(uids, per_series)).astype(np.int32),
        center_xyz=center_xyz.astype(np.float64),
        is_nodule=rows % positive_every == 0,
        has_annotation=rows % positive_every == 0,
        is_mal=rows % (2 * positive_every) == 0,
        diameter_mm=np.where(rows % positive_every == 0, 6.0, 0.0).astype(np.float32),
    )


def expected_item(candidates: CandidateArrays, row: int, width=SMALL_WIDTH):
    x, y, z = candidates.center_xyz[row]
    uid = candidates.series_uid(row)
    chunk = np.full(width, round(x), dtype=np.int16)
    chunk.flat[0] = int(uid.rsplit(".", 1)[1]) % 1000
    return chunk, int(candidates.is_nodule[row]), uid, [round(z), round(y), round(x)]


# --- dataset ------------------------------------------------------------------------------------


def test_items_are_the_source_chunks_of_indices():
    candidates = make_candidates(5, 8)
    indices = np.array([39, 0, 7, 7, 22, 13], dtype=np.int64)
    ds = LunaDataset(candidates, indices, FakeSource(), SMALL_WIDTH)
    assert len(ds) == 6
    assert ds.labels.dtype == bool and ds.labels.shape == (6,)
    np.testing.assert_array_equal(ds.labels, candidates.is_nodule[indices])
    np.testing.assert_array_equal(ds.indices, indices)
    for k, row in enumerate(indices):
        chunk, label, uid, center_irc = ds[k]
        want_chunk, want_label, want_uid, want_irc = expected_item(candidates, int(row))
        assert chunk.dtype == torch.int16 and chunk.shape == (1, *SMALL_WIDTH)
        np.testing.assert_array_equal(chunk[0].numpy(), want_chunk)
        assert label.dtype == torch.int64 and label.shape == () and int(label) == want_label
        assert isinstance(uid, str) and uid == want_uid
        assert center_irc.dtype == torch.int64 and center_irc.tolist() == want_irc


def test_default_width_and_all_indices():
    candidates = make_candidates(2, 3)
    ds = LunaDataset(candidates, None, FakeSource())
    assert len(ds) == 6
    chunk = ds[4].chunk
    assert chunk.shape == (1, 32, 48, 48) and chunk.dtype == torch.int16
    assert int(chunk[0, 0, 0, 1]) == 5  # x of row 4 is 5 mm


def test_dataset_holds_no_per_candidate_python_objects():
    candidates = make_candidates(10, 100)
    ds = LunaDataset(candidates, np.arange(0, 1000, 2), FakeSource(), SMALL_WIDTH)
    per_candidate = []
    for name, value in vars(ds).items():
        if hasattr(value, "__len__") and not isinstance(value, str) and len(value) >= len(ds):
            per_candidate.append(name)
            assert isinstance(value, np.ndarray) and value.dtype.kind != "O", name
    assert "labels" in per_candidate and len(per_candidate) >= 3


def test_read_only_chunks_are_copied_and_writable():
    ds = LunaDataset(make_candidates(2, 2), [1], FakeSource(read_only=True), SMALL_WIDTH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when wrapping a read-only array
        chunk = ds[0].chunk
    chunk += 1
    assert int(chunk[0, 1, 0, 0]) == 3


@pytest.mark.parametrize("source", [FakeSource(dtype=np.float32), FakeSource(shape=(4, 6, 7))])
def test_wrong_chunk_from_source_is_a_clear_error(source):
    ds = LunaDataset(make_candidates(2, 2), [0], source, SMALL_WIDTH)
    with pytest.raises(DataFormatError, match=r"expected int16 HU of shape \(4, 6, 8\)"):
        ds[0]


def test_dataset_bad_arguments():
    candidates = make_candidates(2, 3)
    with pytest.raises(ConfigError, match=r"\[0, 6\)"):
        LunaDataset(candidates, [0, 6], FakeSource())
    with pytest.raises(ConfigError, match=r"np\.flatnonzero"):
        LunaDataset(candidates, np.ones(6, dtype=bool), FakeSource())
    with pytest.raises(ConfigError, match="width_irc"):
        LunaDataset(candidates, [0], FakeSource(), (32, 48))
    with pytest.raises(ConfigError, match="get_ct_raw_candidate"):
        LunaDataset(candidates, [0], object())
    with pytest.raises(ConfigError, match="CandidateArrays"):
        LunaDataset(candidates.to_list(), [0], FakeSource())
    assert len(LunaDataset(candidates, [], FakeSource())) == 0


# --- batched reads (__getitems__) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [FakeSource(), FakeSource(read_only=True), OutSource(), OutSource(ignore_out=True)],
    ids=["plain", "read-only", "out", "out-ignored"],
)
def test_getitems_gives_the_per_item_batch_bit_for_bit(source):
    candidates = make_candidates(5, 8)
    ds = LunaDataset(candidates, np.array([39, 0, 7, 7, 22, 13, 5], dtype=np.int64), source, SMALL_WIDTH)
    ks = [6, 0, 3, 3, 1, -1]
    got = ds.__getitems__(ks)
    assert_same_batch(got, collate_luna([ds[k] for k in ks]))
    assert got.chunk.shape == (6, 1, *SMALL_WIDTH) and got.chunk.is_contiguous()
    got.chunk.add_(1)  # writable, whatever the source handed out
    assert_same_batch(ds.__getitems__(np.array(ks)), collate_luna([ds[k] for k in ks]))


def test_getitems_reads_each_chunk_into_its_slot_of_the_batch():
    source = OutSource()
    ds = LunaDataset(make_candidates(2, 5), None, source, SMALL_WIDTH)
    batch = ds.__getitems__([4, 2, 9])
    assert len(source.outs) == 3
    base = batch.chunk.numpy()
    for j, out in enumerate(source.outs):  # no per-chunk buffer: the source wrote into the batch itself
        assert out is not None and out.shape == SMALL_WIDTH and np.shares_memory(out, base[j, 0])
    assert batch.chunk.untyped_storage().nbytes() == 3 * 2 * math.prod(SMALL_WIDTH)


def test_getitems_allocates_the_batch_in_shared_memory_only_in_a_worker(monkeypatch):
    ds = LunaDataset(make_candidates(2, 5), None, OutSource(), SMALL_WIDTH)
    assert not ds.__getitems__([0, 1]).chunk.is_shared()
    monkeypatch.setattr(datasets_module, "get_worker_info", lambda: object())
    in_worker = ds.__getitems__([0, 1])
    assert in_worker.chunk.is_shared()
    assert_same_batch(in_worker, collate_luna([ds[0], ds[1]]))


@pytest.mark.parametrize(
    "source",
    [FakeSource(dtype=np.float32), FakeSource(shape=(4, 6, 7)), OutSource(ignore_out=True, shape=(4, 6, 7))],
    ids=["float32", "shape", "out-ignored-shape"],
)
def test_getitems_wrong_chunk_from_source_is_the_same_clear_error(source):
    ds = LunaDataset(make_candidates(2, 2), [0, 1], source, SMALL_WIDTH)
    with pytest.raises(DataFormatError, match=r"expected int16 HU of shape \(4, 6, 8\)"):
        ds.__getitems__([0, 1])


class ShiftedDataset(LunaDataset):
    """A subclass with its own items: chunks shifted by 1 HU."""

    def __getitem__(self, k):
        sample = super().__getitem__(k)
        return sample._replace(chunk=sample.chunk + 1)


def test_getitems_of_a_subclass_with_its_own_items_uses_them():
    ds = ShiftedDataset(make_candidates(2, 3), None, OutSource(), SMALL_WIDTH)
    got = ds.__getitems__([2, 0])
    assert_same_batch(got, collate_luna([ds[2], ds[0]]))
    assert int(got.chunk[0, 0, 0, 0, 1]) == 4  # x of row 2 is 3 mm, plus 1


def test_collate_luna_passes_a_batch_through():
    ds = LunaDataset(make_candidates(2, 3), None, FakeSource(), SMALL_WIDTH)
    batch = ds.__getitems__([0, 1])
    assert collate_luna(batch) is batch


def test_loader_reads_whole_batches(monkeypatch):
    calls = []
    getitems = LunaDataset.__getitems__
    monkeypatch.setattr(LunaDataset, "__getitems__", lambda self, ks: calls.append(list(ks)) or getitems(self, ks))
    ds = LunaDataset(make_candidates(3, 5), None, OutSource(), SMALL_WIDTH)
    got = list(create_loader(ds, EvalSampler(len(ds)), batch_size=4))
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14]]
    for batch, ks in zip(got, calls, strict=True):
        assert_same_batch(batch, collate_luna([ds[k] for k in ks]))


def test_to_device_batch_makes_float32_on_device():
    batch = torch.tensor([[-1000, 0, 1000]], dtype=torch.int16).reshape(1, 1, 1, 1, 3)
    out = to_device_batch(batch, "cpu")
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.flatten().tolist() == [-1000.0, 0.0, 1000.0]
    with pytest.raises(DataFormatError, match="int16"):
        to_device_batch(batch.float(), "cpu")


def test_loader_batches_and_collate():
    candidates = make_candidates(3, 5)
    ds = LunaDataset(candidates, np.arange(15), FakeSource(), SMALL_WIDTH)
    loader = create_loader(ds, EvalSampler(len(ds)), batch_size=4)
    assert loader.pin_memory == torch.cuda.is_available()
    assert loader.num_workers == 0 and not loader.persistent_workers
    batches = list(loader)
    assert [len(b.series_uid) for b in batches] == [4, 4, 4, 3]
    first = batches[0]
    assert isinstance(first, LunaBatch)
    assert first.chunk.shape == (4, 1, *SMALL_WIDTH) and first.chunk.dtype == torch.int16
    assert first.label.shape == (4,) and first.label.dtype == torch.int64
    assert first.center_irc.shape == (4, 3) and first.center_irc.dtype == torch.int64
    assert first.series_uid == [candidates.series_uid(r) for r in range(4)]
    assert torch.cat([b.label for b in batches]).tolist() == candidates.is_nodule.astype(int).tolist()
    assert torch.cat([b.chunk[:, 0, 0, 0, 1] for b in batches]).tolist() == list(range(1, 16))


def test_spawned_workers_give_the_same_batches():
    candidates = make_candidates(4, 3)
    ds = LunaDataset(candidates, np.arange(11, -1, -1), FakeSource(), SMALL_WIDTH)
    loader = create_loader(
        ds, EvalSampler(len(ds)), batch_size=5, num_workers=2, multiprocessing_context="spawn", persistent_workers=False
    )
    got = list(loader)
    want = [collate_luna([ds[k] for k in range(s, min(s + 5, 12))]) for s in (0, 5, 10)]
    assert len(got) == 3
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.chunk, w.chunk) and torch.equal(g.label, w.label)
        assert torch.equal(g.center_irc, w.center_irc) and g.series_uid == w.series_uid


def test_create_loader_defaults_and_bad_arguments():
    ds = LunaDataset(make_candidates(2, 2), None, FakeSource(), SMALL_WIDTH)
    loader = create_loader(ds, EvalSampler(4), batch_size=2, num_workers=2, pin_memory=False)
    assert loader.persistent_workers and loader.prefetch_factor == 2
    with pytest.raises(ConfigError, match="batch_size"):
        create_loader(ds, EvalSampler(4), batch_size=0)
    with pytest.raises(ConfigError, match="num_workers"):
        create_loader(ds, EvalSampler(4), batch_size=2, num_workers=-1)
    with pytest.raises(ConfigError, match="num_workers > 0"):
        create_loader(ds, EvalSampler(4), batch_size=2, prefetch_factor=4)
    with pytest.raises(ConfigError, match="multiprocessing_context"):
        create_loader(ds, EvalSampler(4), batch_size=2, num_workers=1, multiprocessing_context="threads")


class WorkerGcProbe(torch.utils.data.Dataset):
    """Item k is (k, the worker's gc.get_freeze_count(), the id its worker_init_fn recorded)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, k: int):
        return k, gc.get_freeze_count(), _INIT_SEEN.get("worker_id")


_INIT_SEEN: dict[str, int] = {}


def record_worker_init(worker_id: int) -> None:
    _INIT_SEEN["worker_id"] = worker_id


@pytest.mark.parametrize("persistent", [True, False])
def test_loader_leaves_the_main_process_collector_unfrozen(persistent):
    # The freeze belongs to the workers: the main process's objects must stay collectable.
    before = gc.get_freeze_count()
    loader = create_loader(
        WorkerGcProbe(), EvalSampler(4), batch_size=2, num_workers=2, persistent_workers=persistent, collate_fn=list
    )
    for _ in range(2):  # two epochs: persistent workers start once, the others twice
        assert len(list(loader)) == 2
        assert gc.get_freeze_count() == before


@pytest.mark.parametrize("freeze_gc", [True, False])
def test_loader_workers_freeze_their_collector_before_reading(freeze_gc):
    loader = create_loader(
        WorkerGcProbe(), EvalSampler(4), batch_size=2, num_workers=1, freeze_gc=freeze_gc, collate_fn=list
    )
    before = gc.get_freeze_count()
    items = [item for batch in loader for item in batch]
    assert [k for k, _, _ in items] == [0, 1, 2, 3]
    if freeze_gc:
        # Everything inherited from the main process is frozen: thousands of objects.
        assert all(frozen > 1000 for _, frozen, _ in items)
    else:
        # Only what the main process had frozen (frozen objects may be freed since, none added).
        assert all(frozen <= before for _, frozen, _ in items)


def test_loader_runs_a_given_worker_init_fn_after_the_freeze():
    _INIT_SEEN.clear()
    loader = LunaDataLoader(
        WorkerGcProbe(), batch_size=2, num_workers=2, worker_init_fn=record_worker_init, collate_fn=list
    )
    items = [item for batch in loader for item in batch]
    assert sorted(worker_id for _, _, worker_id in items) == [0, 0, 1, 1]
    assert all(frozen > 1000 for _, frozen, _ in items)
    assert "worker_id" not in _INIT_SEEN  # it ran in the workers, not here


@pytest.mark.skipif(importlib.util.find_spec("p2ch.cache") is None, reason="p2ch.cache not written yet")
def test_with_the_real_chunk_cache(tiny_root, tmp_path):
    from p2ch.cache import ChunkCache
    from p2ch.ct import Ct

    candidates = get_candidate_arrays(tiny_root)
    ds = LunaDataset(candidates, np.arange(len(candidates)), ChunkCache(tmp_path / "cache", tiny_root))
    for k in range(len(ds)):
        chunk, label, uid, center_irc = ds[k]
        want_chunk, want_irc = Ct(uid, tiny_root).get_raw_candidate(candidates.center_xyz[k])
        assert chunk.dtype == torch.int16 and chunk.shape == (1, 32, 48, 48)
        np.testing.assert_array_equal(chunk[0].numpy(), want_chunk)
        assert center_irc.tolist() == list(want_irc)
        assert int(label) == int(candidates.is_nodule[k])
    ks = list(range(len(ds)))[::-1]
    assert_same_batch(ds.__getitems__(ks), collate_luna([ds[k] for k in ks]))  # read into the batch (out=)


# --- splits -------------------------------------------------------------------------------------


def part_of_series(candidates: CandidateArrays, split) -> dict[str, str]:
    parts: dict[str, set[str]] = {}
    for name in ("train", "val", "test"):
        for row in getattr(split, name):
            parts.setdefault(candidates.series_uid(int(row)), set()).add(name)
    assert all(len(p) == 1 for p in parts.values()), "a series is in two parts"
    return {uid: p.pop() for uid, p in parts.items()}


def assert_partition(candidates: CandidateArrays, split) -> None:
    rows = np.concatenate([split.train, split.val, split.test])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(candidates)))
    for name in ("train", "val", "test"):
        part = getattr(split, name)
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
        uids = {candidates.series_uid(int(r)) for r in part}
        assert sorted(uids) == list(getattr(split, f"{name}_series"))


def test_series_split_keeps_every_series_in_one_part():
    candidates = make_candidates(200, 3)
    split = split_candidates(candidates, val_fraction=0.2, test_fraction=0.1)
    assert split.mode == "series"
    assert_partition(candidates, split)
    parts = part_of_series(candidates, split)
    assert len(parts) == 200
    for uid, part in parts.items():
        where = series_fraction(uid)
        assert part == ("test" if where < 0.1 else "val" if where < 0.3 else "train")
    counts = {p: list(parts.values()).count(p) for p in ("train", "val", "test")}
    assert 20 <= counts["val"] <= 60 and 5 <= counts["test"] <= 35 and counts["train"] >= 100
    assert split.counts(candidates)["val"] == {
        "candidates": len(split.val),
        "positives": int(candidates.is_nodule[split.val].sum()),
        "series": counts["val"],
    }


def test_series_fraction_is_pinned():
    # Changing the rule would move series between parts of saved runs: these values must hold.
    assert series_fraction(make_uid(1)) == pytest.approx(0.977844946063106, abs=1e-15)
    assert series_fraction(make_uid(2)) == pytest.approx(0.3333607621399226, abs=1e-15)
    assert series_fraction("1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860") == pytest.approx(
        0.6918682505065986, abs=1e-15
    )


def test_series_split_is_stable_when_series_come_and_go():
    full = make_candidates(200, 3)
    before = part_of_series(full, split_candidates(full, val_fraction=0.2, test_fraction=0.1))
    # Drop the first 60 series, add 80 new ones: a fresh CandidateArrays with its own series table.
    kept = make_candidates(140, 3, first_series=60)
    more = make_candidates(80, 2, first_series=1000)
    merged = CandidateArrays.from_list(kept.to_list() + more.to_list())
    after = part_of_series(merged, split_candidates(merged, val_fraction=0.2, test_fraction=0.1))
    common = set(before) & set(after)
    assert len(common) == 140
    assert all(before[uid] == after[uid] for uid in common)


def test_series_split_is_deterministic_and_order_free():
    candidates = make_candidates(100, 4)
    one = split_candidates(candidates, val_fraction=0.25)
    two = split_candidates(candidates, val_fraction=0.25)
    for name in ("train", "val", "test", "train_series", "val_series"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    shuffled = candidates.take(np.random.default_rng(3).permutation(len(candidates)))
    assert part_of_series(shuffled, split_candidates(shuffled, val_fraction=0.25)) == part_of_series(candidates, one)


def test_val_stride_in_series_mode_is_a_fraction():
    candidates = make_candidates(120, 2)
    by_stride = split_candidates(candidates, val_stride=4)
    by_fraction = split_candidates(candidates, val_fraction=0.25)
    np.testing.assert_array_equal(by_stride.val, by_fraction.val)


def write_subsets(root, uids_by_subset: dict[int, list[str]]):
    for subset, uids in uids_by_subset.items():
        folder = root / f"subset{subset}"
        folder.mkdir(parents=True, exist_ok=True)
        for uid in uids:
            (folder / f"{uid}.mhd").write_text("")  # the subset split only looks at names


def test_subset_split_uses_luna_folds(tmp_path):
    candidates = make_candidates(30, 3)
    uids = [make_uid(s) for s in range(30)]
    write_subsets(tmp_path, {k: uids[k::10] for k in range(10)})
    with pytest.raises(ConfigError, match=r"none of the 30 series is in val_subsets \[9\].*take precedence"):
        # test takes precedence: subset 9 would go to test, leaving validation empty
        split_candidates(candidates, "subset", val_subsets=(9,), test_subsets=(8, 9), data_root=tmp_path)
    split = split_candidates(candidates, "subset", val_subsets=[7, 9], test_subsets=[8], data_root=tmp_path)
    assert split.mode == "subset"
    assert_partition(candidates, split)
    parts = part_of_series(candidates, split)
    for s, uid in enumerate(uids):
        assert parts[uid] == ("val" if s % 10 in (7, 9) else "test" if s % 10 == 8 else "train")
    assert len(split.val_series) == 6 and len(split.test_series) == 3 and len(split.train_series) == 21


def test_subset_split_errors(tmp_path):
    candidates = make_candidates(12, 2)
    uids = [make_uid(s) for s in range(12)]
    write_subsets(tmp_path, {0: uids[:6], 1: uids[6:11]})  # the last series has no .mhd
    with pytest.raises(DataNotFoundError, match=r"1 of 12 series .*" + uids[11].replace(".", r"\.")):
        split_candidates(candidates, "subset", val_subsets=(1,), data_root=tmp_path)
    ct_module.clear_caches()
    write_subsets(tmp_path, {1: uids[11:]})
    with pytest.raises(ConfigError, match=r"none of the 12 series is in val_subsets \[9\].*\[0, 1\]"):
        split_candidates(candidates, "subset", data_root=tmp_path)
    with pytest.raises(ConfigError, match="leave at least one subset for training"):
        split_candidates(candidates, "subset", val_subsets=(0,), test_subsets=(1,), data_root=tmp_path)
    with pytest.raises(ConfigError, match="--test-subsets"):
        split_candidates(candidates, "subset", val_subsets=(0,), test_fraction=0.1, data_root=tmp_path)
    split = split_candidates(candidates, "subset", val_subsets=(1,), data_root=tmp_path)
    assert len(split.val_series) == 6 and len(split.train_series) == 6


def test_stride_split_is_the_books_and_leaks():
    candidates = make_candidates(10, 6)  # 6 consecutive candidates per series
    split = split_candidates(candidates, "stride")
    np.testing.assert_array_equal(split.val, np.arange(0, 60, 10))
    np.testing.assert_array_equal(split.train, np.setdiff1d(np.arange(60), np.arange(0, 60, 10)))
    leaked = set(split.train_series) & set(split.val_series)
    assert candidates.series_uid(0) in leaked and len(leaked) == 6
    assert len(split_candidates(candidates, "stride", val_stride=3).val) == 20
    with pytest.raises(ConfigError, match="no test part"):
        split_candidates(candidates, "stride", test_fraction=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 1.0}, r"val_fraction .*\[0, 1\)"),
        ({"val_fraction": -0.1}, r"val_fraction .*\[0, 1\)"),
        ({"test_fraction": 1.5}, r"test_fraction .*\[0, 1\)"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, "leave nothing for training"),
        ({"mode": "random"}, "unknown; expected one of series, subset, stride"),
        ({"val_stride": 1}, "val_stride"),
        ({"test_subsets": (8,)}, "--test-fraction"),
        ({"val_subsets": (-1,)}, "val_subsets"),
    ],
)
def test_split_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        split_candidates(make_candidates(20, 2), **kwargs)


def test_split_empty_parts_say_what_to_change():
    two = make_candidates(2, 5)
    low = min(series_fraction(make_uid(0)), series_fraction(make_uid(1)))
    assert low > 0.01
    with pytest.raises(ConfigError, match=r"none of the 2 series in validation") as excinfo:
        split_candidates(two, val_fraction=0.01)
    need = float(str(excinfo.value).split("--val-fraction to at least ")[1].split(",")[0])
    assert low < need <= low + 0.0011
    split = split_candidates(two, val_fraction=need)  # the advice works
    assert len(split.val_series) == 1 and len(split.train_series) == 1
    with pytest.raises(ConfigError, match="only 1 series"):
        split_candidates(make_candidates(1, 5))
    with pytest.raises(ConfigError, match="none of the 2 series in training"):
        split_candidates(two, val_fraction=0.99)


@pytest.mark.parametrize(
    "mode, settings",
    [
        ("series", {"val_fraction": 0.2, "test_fraction": 0.1}),
        ("series", {"val_stride": 4}),
        ("subset", {"val_subsets": (7, 9), "test_subsets": (8,)}),
    ],
)
def test_split_series_puts_each_series_where_split_candidates_puts_its_candidates(tmp_path, mode, settings):
    candidates = make_candidates(60, 3)
    uids = [make_uid(s) for s in range(60)]
    write_subsets(tmp_path, {k: uids[k::10] for k in range(10)})
    by_candidates = part_of_series(candidates, split_candidates(candidates, mode, data_root=tmp_path, **settings))
    split = split_series(uids[::-1] + uids[:5], mode, data_root=tmp_path, **settings)  # order, duplicates: no matter
    assert split.mode == mode
    by_series = {str(uid): name for name in ("train", "val", "test") for uid in getattr(split, name)}
    assert by_series == by_candidates and len(by_series) == 60
    for name in ("train", "val", "test"):
        part = getattr(split, name)
        assert part.dtype.kind == "U" and list(part) == sorted(part)
    assert len(split.val) > 0 and len(split.train) > 0 and (len(split.test) > 0) == ("val_stride" not in settings)


def test_split_series_refuses_the_stride_split_and_bad_settings(tmp_path):
    uids = [make_uid(s) for s in range(20)]
    with pytest.raises(ConfigError, match=r"'stride'.*does not apply") as excinfo:
        split_series(uids, "stride")
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ConfigError, match="unknown"):
        split_series(uids, "random")
    with pytest.raises(ConfigError, match="at least 2"):
        split_series(uids[:1] * 3)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_series(uids, val_fraction=1.5)
    with pytest.raises(ConfigError, match="--test-fraction"):
        split_series(uids, test_subsets=(8,))
    with pytest.raises(ConfigError, match="--val-subsets"):
        split_series(uids, "subset", val_stride=3, data_root=tmp_path)


# --- samplers -----------------------------------------------------------------------------------


def blocks(sequence: np.ndarray, size: int):
    return [sequence[s : s + size] for s in range(0, len(sequence) - size + 1, size)]


def test_balanced_sampler_ratio_and_cycles():
    labels = np.zeros(120, dtype=bool)
    labels[[3, 17, 40, 41, 99]] = True
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    sampler = BalancedSampler(labels, ratio=3, epoch_size=400, seed=5)
    seq = sampler.global_indices()
    assert len(sampler) == 400 and seq.dtype == np.int64
    assert labels[seq].sum() == 100  # exactly 1 positive per 4 samples
    assert all(labels[seq[s::4]].all() == (s == 0) for s in range(4))
    # Two epochs in a row: positives and negatives each run through full permutations.
    sampler.set_epoch(1)
    both = np.concatenate([seq, sampler.global_indices()])
    pos_run, neg_run = both[labels[both]], both[~labels[both]]
    pos_blocks, neg_blocks = blocks(pos_run, 5), blocks(neg_run, 115)
    assert len(pos_blocks) == 40 and len(neg_blocks) == 5
    for block in pos_blocks:
        np.testing.assert_array_equal(np.sort(block), positives)
    for block in neg_blocks:
        np.testing.assert_array_equal(np.sort(block), negatives)
    assert len({tuple(b) for b in pos_blocks}) > 10  # a fresh order each pass
    # The epoch-1 negatives continue the run: no negative repeats until all 115 are drawn.
    assert len(set(neg_run[:115].tolist())) == 115


def test_balanced_sampler_reproducible_per_epoch_and_seed():
    labels = np.arange(500) % 11 == 0
    a = BalancedSampler(labels, epoch_size=300, seed=1)
    b = BalancedSampler(labels, epoch_size=300, seed=1)
    assert list(a) == list(b)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    assert not np.array_equal(a.global_indices(4), a.global_indices(3))
    other_seed = BalancedSampler(labels, epoch_size=300, seed=2)
    assert not np.array_equal(a.global_indices(0), other_seed.global_indices(0))
    np.testing.assert_array_equal(list(a), a.global_indices(4))


def test_balanced_sampler_ddp_shards():
    labels = np.arange(1000) % 9 == 0
    full = BalancedSampler(labels, epoch_size=1001, seed=7, world_size=4)
    shards = []
    for rank in range(4):
        sampler = BalancedSampler(labels, epoch_size=1001, seed=7, rank=rank, world_size=4)
        sampler.set_epoch(2)
        shards.append(np.array(list(sampler)))
    assert {len(s) for s in shards} == {251}  # 1001 rounded up to a multiple of 4
    np.testing.assert_array_equal(np.concatenate(shards), full.global_indices(2))
    # Every rank still gets a balanced shard (contiguous, not strided).
    assert all(abs(labels[s].sum() - len(s) / 2) <= 1 for s in shards)
    # Same sequence as a single rank would draw for an epoch of the rounded size.
    np.testing.assert_array_equal(
        BalancedSampler(labels, epoch_size=1004, seed=7).global_indices(2), full.global_indices(2)
    )


def test_balanced_sampler_default_epoch_size():
    assert len(BalancedSampler(np.arange(1000) % 5 == 0)) == 1000
    big = np.zeros(250_000, dtype=bool)
    big[:10] = True
    assert len(BalancedSampler(big)) == BOOK_EPOCH_SIZE


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (np.zeros(10, dtype=bool), {}, "0 positives and 10 negatives"),
        (np.ones(10, dtype=bool), {}, "10 positives and 0 negatives"),
        (np.arange(10) % 2 == 0, {"ratio": 0}, "ratio"),
        (np.arange(10) % 2 == 0, {"epoch_size": 0}, "epoch_size"),
        (np.arange(10) % 2 == 0, {"rank": 2, "world_size": 2}, r"rank 2 .* world_size 2"),
        (np.arange(10) % 2 == 0, {"seed": -1}, "seed"),
        (np.zeros((2, 5), dtype=bool), {}, r"\(M,\) bool"),
        (np.arange(10), {}, "0 or 1"),
    ],
)
def test_balanced_sampler_bad_arguments(labels, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BalancedSampler(labels, **kwargs)


def test_shuffle_sampler():
    sampler = ShuffleSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50))
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(50)) and second != first
    assert list(ShuffleSampler(50, seed=3)) == first
    shards = [list(ShuffleSampler(50, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [17, 17, 17]
    whole = [i for shard in shards for i in shard]
    assert whole == ShuffleSampler(50, seed=3, world_size=3).global_indices(0).tolist()
    assert sorted(whole[:50]) == list(range(50))  # the 51st draw starts the next permutation
    short = ShuffleSampler(50, seed=3, epoch_size=20)
    runs = np.concatenate([short.global_indices(e) for e in range(5)])
    assert sorted(runs[:50]) == list(range(50)) and len(set(runs[50:100].tolist())) == 50
    # Large enough that each pass is its own block of the permutation stream.
    big = ShuffleSampler(40_000, seed=1)
    epoch0, epoch1 = big.global_indices(0), big.global_indices(1)
    assert np.array_equal(np.sort(epoch1), np.arange(40_000)) and not np.array_equal(epoch0, epoch1)
    with pytest.raises(ConfigError, match="length"):
        ShuffleSampler(0)


def test_eval_sampler_covers_every_index_once():
    for length, world in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        shards = [list(EvalSampler(length, rank=r, world_size=world)) for r in range(world)]
        # In order, no duplicates, nothing missing.
        assert [i for shard in shards for i in shard] == list(range(length))
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == EvalSampler(length, world_size=world).shard_sizes()
        assert shard_bounds(length, world)[-1][1] == length
    with pytest.raises(ConfigError, match="rank"):
        EvalSampler(5, rank=-1)


def test_balanced_loader_end_to_end():
    candidates = make_candidates(6, 10, positive_every=10)  # 6 positives, 54 negatives
    ds = LunaDataset(candidates, np.arange(60), FakeSource(), SMALL_WIDTH)
    sampler = BalancedSampler(ds.labels, ratio=2, epoch_size=30, seed=0)
    labels = torch.cat([b.label for b in create_loader(ds, sampler, batch_size=6)])
    assert labels.tolist() == [1, 0, 0] * 10


def test_series_stride_split_is_every_tenth_sorted_series():
    """The book's chapter-14 split (its trained models held these series out): sorted uids, every 10th validates."""
    uids = [f"1.2.3.{n}" for n in range(25)]
    ordered = sorted(uids)
    split = split_series(list(reversed(uids)), "series-stride")
    assert list(split.val) == ordered[::10] and list(split.train) == [u for u in ordered if u not in ordered[::10]]
    assert list(split_series(uids, "series-stride", val_stride=4).val) == ordered[::4]
    with pytest.raises(ConfigError, match="no test part"):
        split_series(uids, "series-stride", test_fraction=0.1)
    n = 3 * len(uids)  # three candidates per series, series listed in reverse
    candidates = CandidateArrays(
        series_uids=np.array(list(reversed(uids))), series_index=np.repeat(np.arange(len(uids)), 3).astype(np.int32),
        center_xyz=np.zeros((n, 3)), is_nodule=np.arange(n) % 3 == 0, has_annotation=np.zeros(n, bool),
        is_mal=np.zeros(n, bool), diameter_mm=np.zeros(n, np.float32),
    )  # fmt: skip
    by_candidates = split_candidates(candidates, "series-stride")
    assert list(by_candidates.val_series) == ordered[::10] and len(by_candidates.val) == 3 * len(ordered[::10])
