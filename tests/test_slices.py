"""p2ch.slices.SliceCache: slices, masks and meta of each CT on disk, for the segmentation model."""

import concurrent.futures as cf
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from p2ch import ct as ct_module
from p2ch.cache import ChunkCache
from p2ch.ct import Ct
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import xyz2irc
from p2ch.luna import ANNOTATIONS_FILE, find_mhd, series_index
from p2ch.slices import STORE_SUBDIR, SliceCache
from p2ch.store import ByteStore

from conftest import make_uid

SYNTH = {"num_cts": 4, "size": 96, "slices": 48, "candidates_per_ct": 20, "nodules_per_ct": 2, "seed": 3}


def sphere_labels(ct: Ct, centers_xyz: np.ndarray, diameters_mm: np.ndarray) -> np.ndarray:
    """(I, R, C) int32: k + 1 within diameters_mm[k] / 2 mm of centre k (and on its own voxel), 0 elsewhere."""
    labels = np.zeros(ct.hu.shape, dtype=np.int32)
    spacing_irc = np.array(ct.voxel_size_xyz)[::-1]
    grid = np.ogrid[: ct.hu.shape[0], : ct.hu.shape[1], : ct.hu.shape[2]]
    for k, (center_xyz, diameter) in enumerate(zip(centers_xyz, diameters_mm, strict=True)):
        center = xyz2irc(center_xyz, ct.origin_xyz, ct.voxel_size_xyz, ct.direction, rounded=False)
        d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing_irc, strict=True))
        labels[(d2 <= (diameter / 2) ** 2) & (labels == 0)] = k + 1
        labels[tuple(ct.xyz2irc(center_xyz))] = k + 1
    return labels


def make_cache(cache_dir: Path, root: Path, **kwargs) -> SliceCache:
    return SliceCache(cache_dir, root, mask_builder=sphere_labels, mask_version="sphere-1", **kwargs)


def annotations(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / ANNOTATIONS_FILE, dtype={"seriesuid": str})


def uids_with_nodules(root: Path) -> list[str]:
    return sorted(set(annotations(root)["seriesuid"]) & set(series_index(root)))


@pytest.fixture(autouse=True)
def _fresh_state():
    ct_module.clear_caches()
    yield
    ct_module.clear_caches()


@pytest.fixture
def root(synth_set) -> Path:
    return synth_set(**SYNTH)


@pytest.fixture
def own_root(root, tmp_path) -> Path:
    """A copy of the synthetic set that a test may change."""
    copy = tmp_path / "luna"
    shutil.copytree(root, copy, copy_function=shutil.copy2)
    return copy


@pytest.fixture
def filled(root, tmp_path) -> SliceCache:
    cache = make_cache(tmp_path / "cache", root)
    for uid in sorted(series_index(root)):
        cache.fill_series(uid)
    return cache


def value_file(cache: SliceCache, key: str) -> Path:
    record = cache.store.get(key)
    with record.file:
        return Path(record.file.name)


def test_slabs_are_the_ct_slices_with_the_end_slices_repeated(root, filled):
    uids = sorted(series_index(root))
    assert len(uids) == 4
    for uid in uids:
        hu = Ct(uid, root).hu
        n_i = len(hu)
        for k in (0, 1, 2, n_i // 2, n_i - 2, n_i - 1):
            slab = filled.slab(uid, k, 3)
            assert slab.dtype == np.int16 and slab.shape == (7, *hu.shape[1:]) and slab.flags.writeable
            np.testing.assert_array_equal(slab, hu[np.clip(np.arange(k - 3, k + 4), 0, n_i - 1)])
        np.testing.assert_array_equal(filled.slab(uid, 5, 0), hu[5:6])
        np.testing.assert_array_equal(filled.slab(uid, 0, 60)[:61], np.broadcast_to(hu[0], (61, *hu.shape[1:])))
    assert filled.stats()["filled"] == 0 and filled.stats()["corrupt"] == 0


def test_masks_and_meta_are_where_the_builder_puts_them(root, filled):
    frame = annotations(root)
    for uid in sorted(series_index(root)):
        ct = Ct(uid, root)
        rows = frame.index[frame["seriesuid"] == uid].to_numpy()
        centers = frame.loc[rows, ["coordX", "coordY", "coordZ"]].to_numpy()
        diameters = frame.loc[rows, "diameter_mm"].to_numpy()
        labels = sphere_labels(ct, centers, diameters)
        info = filled.info(uid)
        assert info.shape_irc == ct.hu.shape and info.series_uid == uid
        np.testing.assert_allclose(info.voxel_size_xyz, ct.voxel_size_xyz)
        np.testing.assert_allclose(info.origin_xyz, ct.origin_xyz)
        np.testing.assert_array_equal(info.direction, ct.direction)
        np.testing.assert_array_equal(info.nodule_rows, rows)
        np.testing.assert_array_equal(info.nodule_center_irc, ct.locate(centers)[0] if len(rows) else np.zeros((0, 3)))
        np.testing.assert_allclose(info.nodule_diameter_mm, diameters)
        np.testing.assert_array_equal(info.nodule_voxels, np.bincount(labels.ravel(), minlength=len(rows) + 1)[1:])
        np.testing.assert_array_equal(info.nodule_slices, np.flatnonzero(labels.any(axis=(1, 2))))
        for k in range(len(ct.hu)):
            mask = filled.mask(uid, k)
            assert mask.dtype == np.uint8 and mask.shape == ct.hu.shape[1:]
            np.testing.assert_array_equal(mask, labels[k])
    # Mask records only for slices that hold nodule voxels; one meta and every HU slice per CT.
    keys = list(filled.store.keys())
    per_ct = {uid: filled.info(uid) for uid in series_index(root)}
    assert sum("/hu/" in k for k in keys) == sum(i.shape_irc[0] for i in per_ct.values())
    assert sum("/mask/" in k for k in keys) == sum(len(i.nodule_slices) for i in per_ct.values()) > 0
    assert sum(k.endswith("/meta") for k in keys) == 4


def test_a_ct_without_nodules_is_all_background(tiny_root, tmp_path):
    cache = make_cache(tmp_path / "cache", tiny_root)
    uid_b = make_uid(2)  # tiny_root's CT B has no annotation
    info = cache.info(uid_b)  # filled on first use
    assert cache.stats()["filled"] == 1 and cache.complete(uid_b)
    assert len(info.nodule_rows) == len(info.nodule_slices) == 0 and info.nodule_center_irc.shape == (0, 3)
    assert not cache.mask(uid_b, 7).any()
    image, mask = cache.crop(uid_b, (15, 25, 30), 96)
    hu = Ct(uid_b, tiny_root).hu
    assert image.shape == (7, 96, 96) and not mask.any()
    np.testing.assert_array_equal(image[:, :50, :60], hu[12:19])
    assert (image[:, 50:, :] == -1000).all() and (image[:, :, 60:] == -1000).all()  # CT smaller than the crop


def test_crops_are_clamped_inside_the_ct_and_hold_their_nodule(root, filled):
    for uid in uids_with_nodules(root):
        hu = Ct(uid, root).hu
        info = filled.info(uid)
        for k, (i, r, c) in enumerate(info.nodule_center_irc.tolist()):
            image, mask = filled.crop(uid, (i, r, c), 64, 2)
            r0, c0 = min(max(r - 32, 0), 96 - 64), min(max(c - 32, 0), 96 - 64)
            np.testing.assert_array_equal(
                image, hu[np.clip(np.arange(i - 2, i + 3), 0, len(hu) - 1), r0 : r0 + 64, c0 : c0 + 64]
            )
            np.testing.assert_array_equal(mask, filled.mask(uid, i)[r0 : r0 + 64, c0 : c0 + 64])
            assert mask[r - r0, c - c0] == k + 1
        image, mask = filled.crop(uid, (0, 0, 95), (40, 30), 1)  # a corner: the window moves inside
        np.testing.assert_array_equal(image, hu[[0, 0, 1], :40, 66:])
    with pytest.raises(ConfigError, match="outside"):
        filled.crop(uid, (48, 0, 0))
    with pytest.raises(ConfigError, match="crop_size"):
        filled.crop(uid, (0, 0, 0), 0)


def test_bad_reads_are_config_errors(root, filled):
    uid = sorted(series_index(root))[0]
    with pytest.raises(ConfigError, match="slice_index 48"):
        filled.slab(uid, 48)
    with pytest.raises(ConfigError, match="context_slices"):
        filled.slab(uid, 0, -1)
    with pytest.raises(DataNotFoundError, match="not found"):
        filled.info(make_uid(999))


def test_records_live_in_their_own_folder_beside_the_chunk_cache(root, tmp_path):
    cache_dir = tmp_path / "cache"
    chunks = ChunkCache(cache_dir, root)
    uid = sorted(series_index(root))[0]
    chunks.fill_series(uid, [[*Ct(uid, root).origin_xyz]])
    slices = make_cache(cache_dir, root)
    slices.fill_series(uid)
    assert slices.directory == cache_dir / STORE_SUBDIR and (slices.directory / "p2ch-cache.json").is_file()
    assert len(chunks) == 1 and len(slices) == 48 + len(slices.info(uid).nodule_slices) + 1
    assert chunks.prune().removed == 0 and len(slices) == 48 + len(slices.info(uid).nodule_slices) + 1


def test_a_fill_killed_midway_leaves_the_ct_incomplete_and_is_resumed(root, tmp_path, monkeypatch):
    uid = uids_with_nodules(root)[0]
    cache = make_cache(tmp_path / "cache", root)
    calls = []
    original = ByteStore.add

    def dies_after_ten(self, key, value, tag):
        if len(calls) == 10:
            raise KeyboardInterrupt
        calls.append(key)
        return original(self, key, value, tag)

    monkeypatch.setattr(ByteStore, "add", dies_after_ten)
    with pytest.raises(KeyboardInterrupt):
        cache.fill_series(uid)
    monkeypatch.undo()
    assert len(cache) == 10 and not cache.complete(uid)
    fresh = make_cache(tmp_path / "cache", root)  # another process: nothing remembered
    assert not fresh.complete(uid)
    result = fresh.fill_series(uid)
    assert result.present == 10 and result.written == 48 + len(fresh.info(uid).nodule_slices) + 1 - 10
    assert fresh.complete(uid) and fresh.fill_series(uid).written == 0
    np.testing.assert_array_equal(fresh.slab(uid, 20, 3), Ct(uid, root).hu[17:24])


def test_a_changed_annotation_row_invalidates_only_its_ct(own_root, tmp_path):
    cache = make_cache(tmp_path / "cache", own_root)
    uids = sorted(series_index(own_root))
    for uid in uids:
        cache.fill_series(uid)
    frame = annotations(own_root)
    changed = frame["seriesuid"].iloc[0]
    frame.loc[0, "diameter_mm"] += 1.5
    frame.to_csv(own_root / ANNOTATIONS_FILE, index=False)
    fresh = make_cache(tmp_path / "cache", own_root)
    assert {uid: fresh.complete(uid) for uid in uids} == {uid: uid != changed for uid in uids}
    result = fresh.fill_series(changed)
    info = fresh.info(changed)
    assert result.present == 48 and result.written == len(info.nodule_slices) + 1  # HU slices kept
    assert info.nodule_diameter_mm[0] == pytest.approx(frame.loc[0, "diameter_mm"])
    # Another mask version, or changed CT files, give new keys too.
    other = SliceCache(tmp_path / "cache", own_root, mask_builder=sphere_labels, mask_version="sphere-2")
    assert not any(other.complete(uid) for uid in uids)
    raw = find_mhd(uids[1], own_root).with_suffix(".raw")
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    fresh.refresh()
    assert [fresh.complete(uid) for uid in uids] == [True, False, True, True]


def _slab_in_worker(cache: SliceCache, uid: str, k: int) -> tuple[np.ndarray, dict]:
    return cache.slab(uid, k, 2), cache.stats()


def test_pickled_to_a_spawned_worker(root, filled):
    uid = uids_with_nodules(root)[0]
    copy = pickle.loads(pickle.dumps(filled))
    assert copy.mask_builder is sphere_labels and copy.stats()["hits"] == 0
    np.testing.assert_array_equal(copy.slab(uid, 10), filled.slab(uid, 10))
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        slab, stats = pool.submit(_slab_in_worker, filled, uid, 10).result(timeout=120)
    np.testing.assert_array_equal(slab, Ct(uid, root).hu[8:13])
    assert stats == {"hits": 6, "filled": 0, "corrupt": 0, "written": 0}  # the meta and 5 slices


def test_damaged_records_are_refilled(root, filled):
    uid = uids_with_nodules(root)[0]
    hu = Ct(uid, root).hu
    keys = filled._here().keys(uid)
    path = value_file(filled, keys.hu(20))
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    value_file(filled, keys.hu(30)).write_bytes(b"short")
    k = int(filled.info(uid).nodule_slices[0])
    value_file(filled, keys.mask(k)).write_bytes(b"\0" * 7)
    reader = make_cache(filled.cache_dir, root)
    np.testing.assert_array_equal(reader.slab(uid, 20, 0), hu[20:21])  # a CRC mismatch
    image, _ = reader.crop(uid, (30, 48, 48), 32, 0)  # a truncated value file
    np.testing.assert_array_equal(image[0], hu[30, 32:64, 32:64])
    np.testing.assert_array_equal(reader.mask(uid, k), filled.mask(uid, k))
    assert reader.stats()["corrupt"] == 3 and reader.stats()["filled"] == 3
    assert make_cache(filled.cache_dir, root).slab(uid, 20, 0).tobytes() == hu[20].tobytes()


def test_bad_annotations_are_one_line_errors_naming_series_row_and_value(own_root, tmp_path):
    frame = annotations(own_root)
    uid = frame["seriesuid"].iloc[1]
    frame.loc[1, "coordX"] += 1000.0
    frame.to_csv(own_root / ANNOTATIONS_FILE, index=False)
    cache = make_cache(tmp_path / "cache", own_root)
    with pytest.raises(DataFormatError) as info:
        cache.fill_series(uid)
    message = str(info.value)
    assert "\n" not in message and uid in message and "line 3" in message and "outside" in message
    assert f"{frame.loc[1, 'coordX']:.2f}"[:6] in message
    assert not cache.complete(uid)
    frame.loc[1, "coordX"] -= 1000.0
    frame.loc[1, "diameter_mm"] = -2.0
    frame.to_csv(own_root / ANNOTATIONS_FILE, index=False)
    with pytest.raises(DataFormatError) as info:
        make_cache(tmp_path / "cache", own_root).fill_series(uid)
    message = str(info.value)
    assert "\n" not in message and "line 3" in message and "diameter_mm is -2" in message


def test_settings_are_checked(root, tmp_path):
    with pytest.raises(ConfigError, match="mask_version"):
        SliceCache(tmp_path, root, mask_version=3)
    with pytest.raises(ConfigError, match="mask_builder"):
        SliceCache(tmp_path, root, mask_builder="sphere")
    with pytest.raises(ConfigError, match="'/'"):
        SliceCache(tmp_path, root, mask_builder=sphere_labels, mask_version="a/b")
    assert SliceCache(tmp_path, root, mask_builder=sphere_labels).mask_version == "test_slices.sphere_labels"


def test_wrong_builder_output_is_a_config_error(root, tmp_path):
    cache = SliceCache(tmp_path, root, mask_builder=_too_many_labels, mask_version="bad")
    with pytest.raises(ConfigError, match="labels outside"):
        cache.fill_series(uids_with_nodules(root)[0])


def _too_many_labels(ct, centers_xyz, diameters_mm):
    return np.full(ct.hu.shape, len(diameters_mm) + 1, dtype=np.int32)
