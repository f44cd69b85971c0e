"""p2ch.segdatasets: the segmentation model's validation slices, training crops, collate and loader."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_slices import SYNTH, sphere_labels

from p2ch import ct as ct_module
from p2ch.candidates import read_candidates
from p2ch.ct import Ct
from p2ch.datasets import EvalSampler, ShuffleSampler
from p2ch.errors import ConfigError, DataFormatError
from p2ch.geometry import xyz2irc
from p2ch.luna import series_index
from p2ch.segdatasets import (
    Luna2dSegmentationDataset,
    SegBatch,
    SegSample,
    TrainingLuna2dSegmentationDataset,
    candidate_negatives_irc,
    collate_seg,
    create_seg_loader,
)
from p2ch.slices import SliceCache


@pytest.fixture(autouse=True)
def _fresh_state():
    ct_module.clear_caches()
    yield
    ct_module.clear_caches()


@pytest.fixture
def root(synth_set) -> Path:
    return synth_set(**SYNTH)


@pytest.fixture
def slices(root, tmp_path) -> SliceCache:
    cache = SliceCache(tmp_path / "cache", root, mask_builder=sphere_labels, mask_version="sphere-1")
    for uid in series_index(root):
        cache.fill_series(uid)
    return cache


def test_validation_items_are_whole_slices_of_every_ct(root, slices):
    uids = sorted(series_index(root))
    dataset = Luna2dSegmentationDataset(slices, uids[::-1] + uids[:1])  # order and duplicates do not matter
    assert len(dataset) == 4 * 48 and list(dataset.series_uids) == uids
    assert dataset.slice_index.dtype == np.int32 and dataset.series_index.dtype == np.int32
    assert int(dataset.has_nodule.sum()) == sum(len(slices.info(uid).nodule_slices) for uid in uids)
    assert dataset.series_bounds() == [(0, 48), (48, 96), (96, 144), (144, 192)]
    assert dataset.slice_shape() == (96, 96)
    hu = {uid: Ct(uid, root).hu for uid in uids}
    for k in (0, 47, 48 + 20, len(dataset) - 1):
        sample = dataset[k]
        assert isinstance(sample, SegSample)
        uid, index = sample.series_uid, sample.slice_index
        assert (uid, index) == (dataset.series_uid(k), int(dataset.slice_index[k]))
        assert sample.image.dtype == torch.int16 and sample.image.shape == (7, 96, 96)
        assert sample.mask.dtype == torch.bool and sample.mask.shape == (1, 96, 96)
        np.testing.assert_array_equal(sample.image.numpy(), hu[uid][np.clip(np.arange(index - 3, index + 4), 0, 47)])
        np.testing.assert_array_equal(sample.mask[0].numpy(), slices.mask(uid, index) > 0)
        assert bool(sample.mask.any()) == bool(dataset.has_nodule[k])


def test_validation_without_full_ct_takes_nodule_slices_and_a_fixed_sample(root, slices):
    uids = sorted(series_index(root))
    positive = Luna2dSegmentationDataset(slices, uids, context_slices=1, full_ct=False)
    assert positive.has_nodule.all() and len(positive) == sum(len(slices.info(u).nodule_slices) for u in uids)
    assert positive[0].image.shape == (3, 96, 96)
    sample = Luna2dSegmentationDataset(slices, uids, full_ct=False, negative_fraction=0.25)
    again = Luna2dSegmentationDataset(slices, uids, full_ct=False, negative_fraction=0.25)
    np.testing.assert_array_equal(sample.slice_index, again.slice_index)
    negatives = int((~sample.has_nodule).sum())
    assert len(sample) == len(positive) + negatives and 0.1 * (4 * 48 - len(positive)) < negatives < 0.4 * 192
    everything = Luna2dSegmentationDataset(slices, uids, full_ct=False, negative_fraction=1.0)
    assert len(everything) == 4 * 48
    assert len(Luna2dSegmentationDataset(slices, uids, negative_fraction=0.5)) == 4 * 48  # full_ct: all slices
    with pytest.raises(ConfigError, match="negative_fraction"):
        Luna2dSegmentationDataset(slices, uids, full_ct=False, negative_fraction=1.5)
    with pytest.raises(ConfigError, match="series_uids"):
        Luna2dSegmentationDataset(slices, [])
    with pytest.raises(ConfigError, match="SliceCache"):
        Luna2dSegmentationDataset(object(), uids)


def test_training_items_are_crops_around_each_nodule(root, slices):
    uids = sorted(series_index(root))
    dataset = TrainingLuna2dSegmentationDataset(slices, uids, crop_size=64)
    infos = [slices.info(uid) for uid in uids]
    assert len(dataset) == sum(len(i.nodule_rows) for i in infos) > 0
    assert any(len(i.nodule_rows) == 0 for i in infos)  # a CT without nodules adds no item
    for k in range(len(dataset)):
        sample = dataset[k]
        uid = sample.series_uid
        i, r, c = dataset.center_irc[k].tolist()
        assert sample.image.dtype == torch.int16 and sample.image.shape == (7, 64, 64)
        assert sample.mask.dtype == torch.bool and sample.mask.shape == (1, 64, 64)
        assert sample.slice_index == i
        r0, c0 = min(max(r - 32, 0), 32), min(max(c - 32, 0), 32)
        assert sample.mask[0, r - r0, c - c0]  # the nodule's own voxel
        np.testing.assert_array_equal(sample.image.numpy(), slices.crop(uid, (i, r, c), 64)[0])
    assert TrainingLuna2dSegmentationDataset(slices, uids)[0].image.shape == (7, 96, 96)  # the book's size
    without = [uid for uid, info in zip(uids, infos, strict=True) if len(info.nodule_rows) == 0]
    with pytest.raises(ConfigError, match="no annotated nodule"):
        TrainingLuna2dSegmentationDataset(slices, without)
    with pytest.raises(ConfigError, match="crop_size"):
        TrainingLuna2dSegmentationDataset(slices, uids, crop_size=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loaders_yield_seg_batches(root, slices, num_workers):
    uids = sorted(series_index(root))
    training = TrainingLuna2dSegmentationDataset(slices, uids)
    sampler = ShuffleSampler(len(training), epoch_size=10, seed=1)
    loader = create_seg_loader(training, sampler, batch_size=4, num_workers=num_workers)
    batches = list(loader)
    assert [len(b.series_uid) for b in batches] == [4, 4, 2]
    for batch in batches:
        assert isinstance(batch, SegBatch)
        assert batch.image.dtype == torch.int16 and batch.image.shape[1:] == (7, 96, 96)
        assert batch.mask.dtype == torch.bool and batch.mask.shape[1:] == (1, 96, 96)
        assert batch.slice_index.dtype == torch.int64 and all(batch.mask[:, 0].flatten(1).any(1))
    order = sampler.indices().tolist()
    assert [int(i) for b in batches for i in b.slice_index] == [int(training.center_irc[k, 0]) for k in order]
    validation = Luna2dSegmentationDataset(slices, uids[:2])
    seen = [
        (uid, int(i))
        for b in create_seg_loader(validation, EvalSampler(len(validation)), batch_size=16, num_workers=num_workers)
        for uid, i in zip(b.series_uid, b.slice_index, strict=True)
    ]
    assert seen == [(validation.series_uid(k), int(validation.slice_index[k])) for k in range(len(validation))]


def test_collate_refuses_slices_of_different_sizes():
    small = SegSample(torch.zeros(7, 8, 8, dtype=torch.int16), torch.zeros(1, 8, 8, dtype=torch.bool), "1.2", 3)
    large = SegSample(torch.zeros(7, 9, 8, dtype=torch.int16), torch.zeros(1, 9, 8, dtype=torch.bool), "1.3", 4)
    batch = collate_seg([small, small])
    assert batch.image.shape == (2, 7, 8, 8) and batch.slice_index.tolist() == [3, 3]
    with pytest.raises(DataFormatError, match="batch_size 1"):
        collate_seg([small, large])


def test_series_bounds_and_slice_shape_of_mixed_cts(tiny_root, tmp_path):
    slices = SliceCache(tmp_path / "cache", tiny_root, mask_builder=sphere_labels, mask_version="sphere-1")
    uids = sorted(series_index(tiny_root))  # CT A: 40 x 64 x 64 with 2 nodules; CT B: 30 x 50 x 60, none
    dataset = Luna2dSegmentationDataset(slices, uids, full_ct=False)
    nodule_slices = len(slices.info(uids[0]).nodule_slices)
    assert dataset.series_bounds() == [(0, nodule_slices), (nodule_slices, nodule_slices)]
    with pytest.raises(DataFormatError, match=r"2 sizes .*\(50, 60\).*\(64, 64\)"):
        dataset.slice_shape()
    assert Luna2dSegmentationDataset(slices, uids[1:]).slice_shape() == (50, 60)


def test_series_shard_sampler_never_splits_a_ct_and_visits_every_item_once():
    from p2ch.segdatasets import SeriesShardSampler

    bounds = [(0, 30), (30, 40), (40, 100), (100, 101), (101, 160)]
    for world in (1, 2, 3, 4, 7):
        shards = [list(SeriesShardSampler(bounds, rank=r, world_size=world)) for r in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(160))
        for shard in shards:
            for start, stop in bounds:
                inside = [i for i in shard if start <= i < stop]
                assert inside in ([], list(range(start, stop)))  # a CT is wholly in one shard or absent
    assert [len(list(SeriesShardSampler(bounds, rank=r, world_size=2))) for r in range(2)] == [100, 60]


def test_background_positions_are_fixed_central_and_labelled(root, slices):
    uids = sorted(series_index(root))
    nodules = TrainingLuna2dSegmentationDataset(slices, uids, crop_size=64)
    dataset = TrainingLuna2dSegmentationDataset(slices, uids, crop_size=64, background_per_ct=5)
    assert len(dataset) == len(nodules) + 5 * len(uids)
    assert dataset.is_nodule.sum() == len(nodules) and dataset.is_nodule[: len(nodules)].all()
    np.testing.assert_array_equal(dataset.center_irc[: len(nodules)], nodules.center_irc)
    again = TrainingLuna2dSegmentationDataset(slices, uids, crop_size=64, background_per_ct=5)
    np.testing.assert_array_equal(again.center_irc, dataset.center_irc)  # the same positions every run
    for k in np.flatnonzero(~dataset.is_nodule):
        shape = slices.info(dataset.series_uid(int(k))).shape_irc
        i, r, c = dataset.center_irc[k].tolist()
        assert 0 <= i < shape[0] and shape[1] // 4 <= r < 3 * shape[1] // 4 and shape[2] // 4 <= c < 3 * shape[2] // 4
        assert dataset.diameter_mm[k] == 0 and dataset[int(k)].image.shape == (7, 64, 64)
    with pytest.raises(ConfigError, match="background_per_ct"):
        TrainingLuna2dSegmentationDataset(slices, uids, background_per_ct=-1)


def test_background_positions_are_candidates_csv_negatives_first(root, slices):
    """Hard negatives: class-0 rows of candidates.csv (where detectors fire), topped up with central positions."""
    uids = sorted(series_index(root))
    negatives = candidate_negatives_irc(root, slices, uids)
    frame = read_candidates(root / "candidates.csv")
    for uid in uids:
        rows = frame[(frame.seriesuid == uid) & (frame["class"] == 0)]
        info = slices.info(uid)
        expected = xyz2irc(rows[["coordX", "coordY", "coordZ"]].to_numpy(), info.origin_xyz, info.voxel_size_xyz,
                           info.direction)  # fmt: skip
        np.testing.assert_array_equal(negatives[uid], np.asarray(expected).reshape(-1, 3))
    few = min(len(v) for v in negatives.values())
    many = few + 3
    dataset = TrainingLuna2dSegmentationDataset(
        slices, uids, crop_size=64, background_per_ct=many, hard_negatives=negatives
    )
    for n, uid in enumerate(dataset.series_uids):
        mine = dataset.center_irc[~dataset.is_nodule & (dataset.series_index == n)]
        assert len(mine) == many
        hard = {tuple(p) for p in negatives[uid].tolist()}
        from_csv = [tuple(p) in hard for p in mine.tolist()]
        assert sum(from_csv) >= min(len(hard), many)  # the CT's negatives come first, up to the count
    assert candidate_negatives_irc(root / "nowhere", slices, uids) == {}
