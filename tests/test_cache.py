import concurrent.futures as cf
import errno
import json
import multiprocessing
import os
import pickle
import sqlite3
import struct
import zlib
from pathlib import Path

import diskcache
import numpy as np
import pytest

from p2ch import cache as cache_module
from p2ch import ct as ct_module
from p2ch.cache import (
    BOOK_CHUNK_BYTES,
    HEADER,
    CacheDirError,
    CacheFullError,
    ChunkCache,
    decode_chunk,
    encode_chunk,
    get_ct_raw_candidate,
)
from p2ch.candidates import clear_candidate_cache, get_candidate_arrays
from p2ch.ct import Ct
from p2ch.errors import CandidateOutsideCtError, ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import IrcTuple
from p2ch.luna import find_mhd

from conftest import make_uid, write_ct

UID_A, UID_B = make_uid(1), make_uid(2)
CHUNK_BYTES = 32 * 48 * 48 * 2


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    ct_module.clear_caches()
    clear_candidate_cache()
    monkeypatch.setattr(cache_module, "_DEFAULT_CACHES", {})
    yield
    ct_module.clear_caches()
    clear_candidate_cache()


def candidates_of(root):
    arrays = get_candidate_arrays(root)
    return [(arrays.series_uid(k), tuple(arrays.center_xyz[k])) for k in range(len(arrays))]


def direct(root, uid, center_xyz, width=(32, 48, 48)):
    return Ct(uid, root).get_raw_candidate(center_xyz, width)


def snapshot(cache: ChunkCache) -> dict:
    """{key: stored value bytes} of the whole cache."""
    dc = cache.diskcache
    return {key: dc.get(key, retry=True) for key in dc}


def shard_row(cache: ChunkCache, key: str):
    """(shard db path, value file path) of the entry `key`."""
    for db in sorted(cache.cache_dir.glob("[0-9][0-9][0-9]/cache.db")):
        with sqlite3.connect(db) as con:
            rows = con.execute("SELECT filename FROM Cache WHERE key = ?", (key,)).fetchall()
        if rows:
            return db, db.parent / rows[0][0]
    raise AssertionError(f"{key} not stored")


def value_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.val"))


def test_miss_then_hit_and_values_equal_direct_crop(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    items = candidates_of(tiny_root)
    for uid, xyz in items:
        chunk, center_irc = cache.get_ct_raw_candidate(uid, xyz)
        expected, expected_irc = direct(tiny_root, uid, xyz)
        assert chunk.dtype == np.int16 and chunk.shape == (32, 48, 48)
        np.testing.assert_array_equal(chunk, expected)
        assert center_irc == expected_irc and isinstance(center_irc, IrcTuple)
    assert cache.stats() == {"hits": 0, "misses": 7, "corrupt": 0, "written": 7, "hit_rate": 0.0}
    for uid, xyz in items:
        chunk, center_irc = cache.get_ct_raw_candidate(uid, xyz)
        expected, expected_irc = direct(tiny_root, uid, xyz)
        np.testing.assert_array_equal(chunk, expected)
        assert center_irc == expected_irc
        assert chunk.flags.writeable and chunk.flags.c_contiguous and chunk.flags.owndata
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["written"], stats["hit_rate"]) == (7, 7, 7, 0.5)
    cache.reset_stats()
    assert cache.stats()["hits"] == 0
    # Persisted: a new instance hits; float noise below 1 µm hits the same entry.
    other = ChunkCache(tmp_path / "cache", tiny_root)
    uid, (x, y, z) = items[0]
    other.get_ct_raw_candidate(uid, (x + 1e-7, y - 1e-7, z), [32, 48, 48])
    other.get_ct_raw_candidate(uid, np.array([x, y, z]), np.array([32, 48, 48]))
    assert other.stats()["hits"] == 2 and other.stats()["misses"] == 0
    assert len(other) == 7


def test_other_widths_are_separate_entries(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    small, _ = cache.get_ct_raw_candidate(uid, xyz, (4, 6, 8))
    big, _ = cache.get_ct_raw_candidate(uid, xyz)
    np.testing.assert_array_equal(small, direct(tiny_root, uid, xyz, (4, 6, 8))[0])
    assert small.shape == (4, 6, 8) and big.shape == (32, 48, 48)
    assert cache.stats()["misses"] == 2 and len(cache) == 2
    assert cache.get_ct_raw_candidate(uid, xyz, (4, 6, 8))[0].shape == (4, 6, 8)


def test_module_level_function_uses_env_cache_dir(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("P2CH_CACHE_DIR", str(tmp_path / "envcache"))
    uid, xyz = candidates_of(tiny_root)[3]
    chunk, _ = get_ct_raw_candidate(uid, xyz, data_root=tiny_root)
    np.testing.assert_array_equal(chunk, direct(tiny_root, uid, xyz)[0])
    again, _ = get_ct_raw_candidate(uid, xyz, data_root=tiny_root)
    np.testing.assert_array_equal(again, chunk)
    stats = cache_module.default_cache(None, tiny_root).stats()
    assert (stats["hits"], stats["misses"]) == (1, 1)
    assert (tmp_path / "envcache" / "p2ch-cache.json").is_file()
    # An explicit cache_dir wins over the environment.
    get_ct_raw_candidate(uid, xyz, cache_dir=tmp_path / "explicit", data_root=tiny_root)
    assert len(ChunkCache(tmp_path / "explicit", tiny_root)) == 1


def test_stored_value_is_int16_bytes_with_header(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    chunk, center_irc = cache.get_ct_raw_candidate(uid, xyz)
    key = cache.key(uid, xyz)
    assert key.startswith(f"p2ch-chunk/v{cache_module.CACHE_FORMAT_VERSION}/32x48x48/{uid}/")
    value = cache.diskcache.get(key)
    assert type(value) is bytes and len(value) == HEADER.size + CHUNK_BYTES
    decoded, decoded_irc = decode_chunk(value, (32, 48, 48))
    np.testing.assert_array_equal(decoded, chunk)
    assert decoded_irc == center_irc
    np.testing.assert_array_equal(np.frombuffer(value[HEADER.size :], dtype="<i2").reshape(32, 48, 48), chunk)
    # The value file holds exactly the voxels: half of the book's float32 chunk.
    (file,) = value_files(cache.cache_dir)
    assert file.stat().st_size == CHUNK_BYTES
    assert file.stat().st_size / BOOK_CHUNK_BYTES <= 0.5
    with pytest.raises(DataFormatError, match="damaged"):
        decode_chunk(value[:-2])
    with pytest.raises(DataFormatError, match="damaged"):
        decode_chunk(value, (32, 48, 40))


def test_invalidated_when_ct_file_is_rewritten(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    old, _ = cache.get_ct_raw_candidate(uid, xyz)
    old_key = cache.key(uid, xyz)
    mhd = find_mhd(uid, tiny_root)
    hu = Ct(uid, tiny_root).hu.copy() + 7  # same size on disk, different voxels
    write_ct(tiny_root, uid, hu, subset=0)
    stat = mhd.with_suffix(".raw").stat()
    os.utime(mhd.with_suffix(".raw"), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    # The same process remembers the old identity until refresh(); a new cache (or process) does not.
    fresh = ChunkCache(tmp_path / "cache", tiny_root)
    ct_module.clear_caches()
    new, _ = fresh.get_ct_raw_candidate(uid, xyz)
    assert fresh.stats()["misses"] == 1
    np.testing.assert_array_equal(new, direct(tiny_root, uid, xyz)[0])
    assert not np.array_equal(new, old)
    assert fresh.key(uid, xyz) != old_key
    cache.refresh()
    again, _ = cache.get_ct_raw_candidate(uid, xyz)
    np.testing.assert_array_equal(again, new)
    assert cache.stats()["hits"] == 1
    assert len(cache) == 2  # the old entry stays until prune
    result = cache.prune()
    assert (result.changed_ct, result.kept, result.removed) == (1, 1, 1)
    assert len(cache) == 1 and old_key not in cache.diskcache


def test_ct_loaded_before_a_rewrite_is_not_reused(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    items = candidates_of(tiny_root)
    uid, xyz = items[0]
    cache.get_ct_raw_candidate(uid, xyz)  # loads CT A into the cache's in-memory LRU
    hu = Ct(uid, tiny_root).hu.copy() - 5
    write_ct(tiny_root, uid, hu, subset=0)
    raw = find_mhd(uid, tiny_root).with_suffix(".raw")
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    cache.refresh()
    other_xyz = next(x for u, x in items[1:] if u == uid)
    chunk, _ = cache.get_ct_raw_candidate(uid, other_xyz)
    np.testing.assert_array_equal(chunk, direct(tiny_root, uid, other_xyz)[0])


def test_format_version_bump_misses_and_prunes(tiny_root, tmp_path, monkeypatch):
    items = candidates_of(tiny_root)
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    for uid, xyz in items:
        cache.get_ct_raw_candidate(uid, xyz)
    monkeypatch.setattr(cache_module, "CACHE_FORMAT_VERSION", cache_module.CACHE_FORMAT_VERSION + 1)
    bumped = ChunkCache(tmp_path / "cache", tiny_root)
    for uid, xyz in items:
        chunk, _ = bumped.get_ct_raw_candidate(uid, xyz)
        np.testing.assert_array_equal(chunk, direct(tiny_root, uid, xyz)[0])
    assert bumped.stats()["misses"] == 7 and bumped.stats()["corrupt"] == 0
    assert len(bumped) == 14
    result = bumped.prune()
    assert (result.old_format, result.kept, result.changed_ct, result.missing_ct) == (7, 7, 0, 0)
    assert len(bumped) == 7
    prefix = f"p2ch-chunk/v{cache_module.CACHE_FORMAT_VERSION}/"
    assert all(key.startswith(prefix) for key in bumped.diskcache)


def test_prune_removes_only_stale_entries(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    items = candidates_of(tiny_root)
    for uid, xyz in items:
        cache.get_ct_raw_candidate(uid, xyz)
    uid_b_items = [(u, x) for u, x in items if u == UID_B]
    cache.get_ct_raw_candidate(UID_B, uid_b_items[0][1], (4, 6, 8))  # another width: kept
    assert cache.prune() == cache_module.PruneResult(8, 0, 0, 0, 0)
    before = snapshot(cache)
    # Remove CT B from the data root: its 3 entries are stale; CT A's 5 stay untouched.
    for path in (tiny_root / "subset1").iterdir():
        path.unlink()
    cache.refresh()
    dry = cache.prune(dry_run=True)
    assert (dry.missing_ct, dry.kept) == (3, 5) and len(cache) == 8
    result = cache.prune()
    assert (result.missing_ct, result.kept, result.changed_ct, result.old_format) == (3, 5, 0, 0)
    after = snapshot(cache)
    assert after == {k: v for k, v in before.items() if f"/{UID_B}/" not in k}
    assert len(value_files(cache.cache_dir)) == 5


def test_prune_refuses_an_empty_data_root(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    cache.get_ct_raw_candidate(uid, xyz)
    with pytest.raises(DataNotFoundError, match="refusing to prune"):
        ChunkCache(tmp_path / "cache", tmp_path / "nothing").prune()
    assert len(cache) == 1


def _damage(cache, key, how):
    db, file = shard_row(cache, key)
    if how == "truncate":
        file.write_bytes(file.read_bytes()[:1000])
    elif how == "overwrite":
        data = bytearray(file.read_bytes())
        data[5000:5010] = b"\x01" * 10
        file.write_bytes(bytes(data))
    elif how == "delete-file":
        file.unlink()
    elif how == "header":
        with sqlite3.connect(db) as con:
            con.execute("UPDATE Cache SET value = ? WHERE key = ?", (b"garbage", key))
    elif how == "shape":
        with sqlite3.connect(db) as con:
            (header,) = con.execute("SELECT value FROM Cache WHERE key = ?", (key,)).fetchone()
            fields = list(HEADER.unpack(header))
            fields[3] = 16
            con.execute("UPDATE Cache SET value = ? WHERE key = ?", (HEADER.pack(*fields), key))


@pytest.mark.parametrize("how", ["truncate", "overwrite", "delete-file", "header", "shape"])
def test_damaged_value_is_recomputed_and_counted(tiny_root, tmp_path, how):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    expected, expected_irc = cache.get_ct_raw_candidate(uid, xyz)
    key = cache.key(uid, xyz)
    _damage(cache, key, how)
    reader = ChunkCache(tmp_path / "cache", tiny_root)
    chunk, center_irc = reader.get_ct_raw_candidate(uid, xyz)
    np.testing.assert_array_equal(chunk, expected)
    assert center_irc == expected_irc
    stats = reader.stats()
    assert (stats["corrupt"], stats["misses"], stats["hits"], stats["written"]) == (1, 1, 0, 1)
    chunk, _ = reader.get_ct_raw_candidate(uid, xyz)  # repaired: a clean hit now
    np.testing.assert_array_equal(chunk, expected)
    assert reader.stats()["hits"] == 1 and reader.stats()["corrupt"] == 1
    decode_chunk(cache.diskcache.get(key), (32, 48, 48))


def test_crc_check_can_be_turned_off(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root, verify=False)
    uid, xyz = candidates_of(tiny_root)[0]
    cache.get_ct_raw_candidate(uid, xyz)
    _damage(cache, cache.key(uid, xyz), "overwrite")
    chunk, _ = cache.get_ct_raw_candidate(uid, xyz)
    assert cache.stats()["corrupt"] == 0 and chunk.reshape(-1)[2500] == 0x0101  # served as stored


class _Trap:
    """Unpickling this creates `path`: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_values_and_keys_are_never_unpickled(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    expected, _ = direct(tiny_root, uid, xyz)
    cache.get_ct_raw_candidate(*candidates_of(tiny_root)[1])  # creates the cache
    key = cache.key(uid, xyz)
    marker_value, marker_key = tmp_path / "value-unpickled", tmp_path / "key-unpickled"
    # Someone writes pickles into our cache folder with stock diskcache (same shard layout).
    stock = diskcache.FanoutCache(str(cache.cache_dir), shards=cache_module.DEFAULT_SHARDS)
    stock.set(key, _Trap(marker_value), retry=True)
    stock.set(_Trap(marker_key), b"x" * 10, retry=True)
    stock.set("small-pickle", {"a": _Trap(marker_value)}, retry=True)
    stock.close()
    chunk, _ = cache.get_ct_raw_candidate(uid, xyz)
    np.testing.assert_array_equal(chunk, expected)
    assert cache.stats()["corrupt"] == 1
    result = cache.prune()
    assert result.foreign == 1 and result.old_format == 1  # "small-pickle" is not our key: deleted
    assert not marker_value.exists() and not marker_key.exists()
    # Our serialiser refuses to store anything but encoded chunk bytes.
    with pytest.raises(TypeError, match="only encoded chunk bytes"):
        cache.diskcache.set("k", {"a": 1}, retry=True)
    with pytest.raises(TypeError, match="keys are str"):
        cache.diskcache.set(("a", 1), b"x", retry=True)
    with pytest.raises(ValueError, match="not an encoded chunk"):
        cache.diskcache.set("k", b"x" * 100, retry=True)


def test_compressed_entries(tiny_root, tmp_path):
    packed = ChunkCache(tmp_path / "cache", tiny_root, compress_level=1)
    items = candidates_of(tiny_root)
    for uid, xyz in items[:4]:
        chunk, center_irc = packed.get_ct_raw_candidate(uid, xyz)
        np.testing.assert_array_equal(chunk, direct(tiny_root, uid, xyz)[0])
    plain = ChunkCache(tmp_path / "cache", tiny_root)
    for uid, xyz in items:
        chunk, center_irc = plain.get_ct_raw_candidate(uid, xyz)
        expected, expected_irc = direct(tiny_root, uid, xyz)
        np.testing.assert_array_equal(chunk, expected)
        assert center_irc == expected_irc and chunk.flags.writeable
    assert plain.stats()["hits"] == 4 and plain.stats()["corrupt"] == 0
    sizes = sorted(p.stat().st_size for p in value_files(plain.cache_dir))
    assert sizes[0] < CHUNK_BYTES / 10 and sizes[-1] == CHUNK_BYTES  # tiny_root's CTs are flat


def test_encode_rejects_other_dtypes():
    with pytest.raises(AssertionError, match="int16"):  # chunks come from our own crops: an invariant
        encode_chunk(np.zeros((2, 2, 2), np.float32), (0, 0, 0))
    value = encode_chunk(np.arange(8, dtype=np.int16).reshape(2, 2, 2), (1, -2, 3))
    chunk, irc = decode_chunk(value)
    assert chunk.tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]] and irc == (1, -2, 3)


def test_get_cached_and_missing_never_write(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    assert cache.missing(uid, [xyz]).tolist() == [True]
    assert not (tmp_path / "cache").exists() and len(cache) == 0 and cache.volume() == 0
    assert cache.get_cached(uid, xyz) is None
    assert len(cache) == 0
    cache.get_ct_raw_candidate(uid, xyz)
    chunk, _ = cache.get_cached(uid, xyz)
    np.testing.assert_array_equal(chunk, direct(tiny_root, uid, xyz)[0])
    assert cache.missing(uid, [xyz, (0.0, 0.0, 0.0)]).tolist() == [False, True]


def test_fill_series_counts(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    centers = [x for u, x in candidates_of(tiny_root) if u == UID_A]
    outside = (1000.0, 1000.0, 1000.0)
    result = cache.fill_series(UID_A, [*centers, centers[0], outside])
    assert (result.written, result.present, result.outside) == (5, 0, 1)
    assert result.ct_bytes == 40 * 64 * 64 * 2
    for xyz in centers:
        np.testing.assert_array_equal(cache.get_cached(UID_A, xyz)[0], direct(tiny_root, UID_A, xyz)[0])
    again = cache.fill_series(UID_A, centers)
    assert (again.written, again.present, again.ct_bytes) == (0, 5, 0)  # nothing loaded


def test_bad_input_errors(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    with pytest.raises(DataNotFoundError, match=r"series 1\.2\.3 not found.*luna/subset\*"):
        cache.get_ct_raw_candidate("1.2.3", xyz)
    with pytest.raises(DataFormatError, match="invalid series_uid"):
        cache.get_ct_raw_candidate("../../etc/passwd", xyz)
    with pytest.raises(ConfigError, match="center_xyz"):
        cache.get_ct_raw_candidate(uid, (float("nan"), 0.0, 0.0))
    with pytest.raises(ConfigError, match="center_xyz"):
        cache.get_ct_raw_candidate(uid, (1.0, 2.0))
    with pytest.raises(ConfigError, match="width_irc"):
        cache.get_ct_raw_candidate(uid, xyz, (32, 48))
    with pytest.raises(ConfigError, match="width_irc"):
        cache.get_ct_raw_candidate(uid, xyz, (32.5, 48, 48))
    with pytest.raises(CandidateOutsideCtError):
        cache.get_ct_raw_candidate(uid, (1000.0, 1000.0, 1000.0))
    with pytest.raises(ConfigError, match="compress_level"):
        ChunkCache(tmp_path / "c", tiny_root, compress_level=12)
    assert cache.stats()["written"] == 0


def test_unwritable_cache_dir(tiny_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = ChunkCache(blocker / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    with pytest.raises(CacheDirError, match=r"a-file/cache cannot be created or written.*P2CH_CACHE_DIR"):
        cache.get_ct_raw_candidate(uid, xyz)


def test_shard_count_is_fixed_when_the_cache_is_made(tiny_root, tmp_path):
    items = candidates_of(tiny_root)
    first = ChunkCache(tmp_path / "cache", tiny_root, shards=3)
    for item in items:
        first.get_ct_raw_candidate(*item)
    assert len(list((tmp_path / "cache").glob("[0-9][0-9][0-9]"))) == 3
    other = ChunkCache(tmp_path / "cache", tiny_root, shards=8)
    for item in items:
        other.get_ct_raw_candidate(*item)
    assert other.stats()["hits"] == 7 and len(list((tmp_path / "cache").glob("[0-9][0-9][0-9]"))) == 3
    with pytest.raises(ConfigError, match="shards"):
        ChunkCache(tmp_path / "c", tiny_root, shards=0)


def test_foreign_layout_file_is_a_clear_error(tiny_root, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "p2ch-cache.json").write_text("{not json")
    os.utime(folder / "p2ch-cache.json", (1e9, 1e9))
    with pytest.raises(CacheDirError, match=r"p2ch-cache\.json: not a p2ch chunk cache layout file"):
        ChunkCache(folder, tiny_root).get_ct_raw_candidate(*candidates_of(tiny_root)[0])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_cache_dir(tiny_root, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(CacheDirError, match="ro/cache cannot be created"):
            ChunkCache(folder / "cache", tiny_root).get_ct_raw_candidate(*candidates_of(tiny_root)[0])
    finally:
        folder.chmod(0o700)


def test_full_disk_is_a_clear_error_and_leaves_no_partial_file(tiny_root, tmp_path, monkeypatch):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    items = candidates_of(tiny_root)
    cache.get_ct_raw_candidate(*items[0])
    original = diskcache.Disk._write

    def full(self, full_path, iterator, mode, encoding=None):
        os.makedirs(os.path.dirname(full_path), exist_ok=True)
        with open(full_path, mode) as f:
            f.write(b"half a chunk")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskcache.Disk, "_write", full)
    with pytest.raises(CacheFullError, match=r"cache .*/cache is full.*--cache-dir"):
        cache.get_ct_raw_candidate(*items[1])
    with pytest.raises(CacheFullError):
        cache.fill_series(items[1][0], [items[1][1]])
    monkeypatch.setattr(diskcache.Disk, "_write", original)
    assert len(value_files(cache.cache_dir)) == 1 and len(cache) == 1
    assert cache.get_ct_raw_candidate(*items[1])[0].shape == (32, 48, 48)


def _read_in_child(cache, uid, xyz):
    chunk, center_irc = cache.get_ct_raw_candidate(uid, xyz)
    return chunk.tobytes(), tuple(center_irc), cache.stats(), os.getpid()


_INHERITED = {}


def _read_inherited(uid, xyz):
    cache = _INHERITED["cache"]
    parent_handle = _INHERITED["handle"]
    chunk, _ = cache.get_ct_raw_candidate(uid, xyz)
    return chunk.tobytes(), cache.stats(), cache.diskcache is not parent_handle


def test_pickles_and_works_in_a_spawned_process(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    items = candidates_of(tiny_root)
    cache.get_ct_raw_candidate(*items[0])  # opened and used in the parent
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.stats()["misses"] == 0 and clone.cache_dir == cache.cache_dir
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        hit = pool.submit(_read_in_child, cache, *items[0]).result(timeout=60)
        miss = pool.submit(_read_in_child, cache, *items[1]).result(timeout=60)
    assert hit[0] == direct(tiny_root, *items[0])[0].tobytes() and hit[2]["hits"] == 1
    expected, expected_irc = direct(tiny_root, *items[1])
    assert miss[0] == expected.tobytes() and miss[1] == tuple(expected_irc)
    assert hit[3] != os.getpid()
    assert cache.get_cached(*items[1]) is not None  # written by the child
    assert cache.stats()["hits"] == 0


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_reopens_after_fork(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    items = candidates_of(tiny_root)
    cache.get_ct_raw_candidate(*items[0])
    _INHERITED.update(cache=cache, handle=cache.diskcache)
    try:
        with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            data, stats, reopened = pool.submit(_read_inherited, *items[0]).result(timeout=60)
    finally:
        _INHERITED.clear()
    assert reopened and data == direct(tiny_root, *items[0])[0].tobytes()
    assert (stats["hits"], stats["misses"]) == (1, 0)  # the child's own counters
    assert cache.stats()["misses"] == 1 and cache.get_ct_raw_candidate(*items[0])[0].shape == (32, 48, 48)


def test_clear(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    for item in candidates_of(tiny_root)[:3]:
        cache.get_ct_raw_candidate(*item)
    assert cache.clear() == 3
    assert len(cache) == 0 and value_files(cache.cache_dir) == []
    assert ChunkCache(tmp_path / "missing", tiny_root).clear() == 0


def test_cache_dir_that_cannot_be_created(tiny_root, tmp_path):
    """Runs as root too (where permission bits are ignored): the parent is a regular file."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(CacheDirError, match="not-a-folder/cache cannot be created"):
        ChunkCache(blocker / "cache", tiny_root).get_ct_raw_candidate(*candidates_of(tiny_root)[0])


def test_prune_removes_orphan_value_files_and_rows_without_files(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    items = candidates_of(tiny_root)
    for uid, xyz in items:
        cache.get_ct_raw_candidate(uid, xyz)
    files = value_files(cache.cache_dir)
    assert len(files) == len(items)
    # A writer killed between writing its value file and inserting the row leaves an orphan.
    orphan = files[0].parent / "ff" / "orphan-0001.val"
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(files[0].read_bytes())
    gone = files[1]
    gone.unlink()
    dry = cache.prune(dry_run=True)
    assert (dry.orphan_files, dry.lost_files, dry.kept) == (1, 1, len(items))
    assert orphan.exists() and len(cache) == len(items)
    result = cache.prune()
    assert (result.orphan_files, result.lost_files) == (1, 1)
    assert not orphan.exists() and len(cache) == len(items) - 1
    assert len(value_files(cache.cache_dir)) == len(items) - 1
    assert cache.prune() == cache_module.PruneResult(len(items) - 1, 0, 0, 0, 0)
    for uid, xyz in items:  # every chunk still reads right; the lost one is recomputed
        np.testing.assert_array_equal(cache.get_ct_raw_candidate(uid, xyz)[0], direct(tiny_root, uid, xyz)[0])


# --- the on-disk format is the one the previous p2ch.cache wrote --------------------------------

# encode_chunk((arange(24) * 37 - 400) as (2, 3, 4) int16, center_irc (1, -2, 3)), as written by
# p2ch.cache before the byte store was split out of it: 36-byte header, then the voxels.
GOLDEN_HEADER = bytes.fromhex("5032434b01000000020003000400000001000000feffffff030000003000000034ce68d6")
GOLDEN_PAYLOAD = bytes.fromhex(
    "70fe95febafedffe04ff29ff4eff73ff98ffbdffe2ff07002c00510076009b00c000e5000a012f01540179019e01c301"
)


def golden_chunk() -> np.ndarray:
    return (np.arange(24, dtype=np.int16).reshape(2, 3, 4) * 37 - 400).astype(np.int16)


def test_value_bytes_are_unchanged():
    value = encode_chunk(golden_chunk(), (1, -2, 3))
    assert value == GOLDEN_HEADER + GOLDEN_PAYLOAD
    chunk, center_irc = decode_chunk(GOLDEN_HEADER + GOLDEN_PAYLOAD, (2, 3, 4))
    np.testing.assert_array_equal(chunk, golden_chunk())
    assert center_irc == (1, -2, 3)


def legacy_key(root, uid, center_um, width=(32, 48, 48)) -> str:
    """The key the previous code made: sizes and mtimes of the .mhd and .raw in hex, centre in µm."""
    mhd = find_mhd(uid, root)
    st, raw = mhd.stat(), mhd.with_suffix(".raw").stat()
    identity = f"{st.st_size:x}.{st.st_mtime_ns:x}.{raw.st_size:x}.{raw.st_mtime_ns:x}"
    return (
        f"p2ch-chunk/v1/{width[0]}x{width[1]}x{width[2]}/{uid}/{identity}/{center_um[0]},{center_um[1]},{center_um[2]}"
    )


def test_keys_tags_and_stored_rows_are_unchanged(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    key = cache.key(UID_A, (-100.25, 33.3333333, 1234.0005))
    assert key == legacy_key(tiny_root, UID_A, (-100250, 33333, 1234000))
    assert cache.key(UID_A, (0.0004, -0.0005, -1e-9), (4, 6, 8)) == legacy_key(tiny_root, UID_A, (0, 0, 0), (4, 6, 8))
    uid, xyz = candidates_of(tiny_root)[0]
    chunk, center_irc = cache.get_ct_raw_candidate(uid, xyz)
    db, file = shard_row(cache, cache.key(uid, xyz))
    with sqlite3.connect(db) as con:
        header, tag, mode = con.execute(
            "SELECT value, tag, mode FROM Cache WHERE key = ?", (cache.key(uid, xyz),)
        ).fetchone()
    assert header == HEADER.pack(b"P2CK", 1, 0, 32, 48, 48, 0, *center_irc, CHUNK_BYTES, zlib.crc32(chunk.tobytes()))
    assert tag == "v1/" + "/".join(cache.key(uid, xyz).split("/")[3:5]) and mode == diskcache.core.MODE_BINARY
    assert file.read_bytes() == chunk.astype("<i2").tobytes()
    layout = json.loads((tmp_path / "cache" / "p2ch-cache.json").read_text())
    assert layout == {
        "format": "p2ch chunk cache",
        "shards": 8,
        "note": "p2ch chunk cache (safe to delete); see p2ch/cache.py",
    }


class LegacyDisk(diskcache.Disk):
    """How the previous p2ch.cache stored a value: header in the SQLite row, voxels in a value file."""

    def put(self, key):
        return key, True

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        filename, full_path = self.filename(key, value)
        self._write(full_path, (value[HEADER.size :],), "xb")
        return len(value) - HEADER.size, diskcache.core.MODE_BINARY, filename, sqlite3.Binary(value[: HEADER.size])


def test_reads_a_cache_written_by_the_previous_code(tiny_root, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "p2ch-cache.json").write_text(
        '{"format": "p2ch chunk cache", "shards": 4, "note": "p2ch chunk cache (safe to delete); see p2ch/cache.py"}'
    )
    items = candidates_of(tiny_root)
    old = diskcache.FanoutCache(str(folder), shards=4, disk=LegacyDisk, eviction_policy="none", tag_index=True)
    for uid, xyz in items:
        chunk, center_irc = direct(tiny_root, uid, xyz)
        header = struct.pack("<4sHHHHHHiiiII", b"P2CK", 1, 0, 32, 48, 48, 0, *center_irc, CHUNK_BYTES, 0)
        header = header[:-4] + struct.pack("<I", zlib.crc32(chunk.tobytes()))
        key = legacy_key(tiny_root, uid, [round(v * 1000) for v in xyz])
        identity = key.split("/")[4]
        old.set(key, header + chunk.tobytes(), tag=f"v1/{uid}/{identity}", retry=True)
    old.close()
    cache = ChunkCache(folder, tiny_root)
    for uid, xyz in items:
        chunk, center_irc = cache.get_ct_raw_candidate(uid, xyz)
        expected, expected_irc = direct(tiny_root, uid, xyz)
        np.testing.assert_array_equal(chunk, expected)
        assert center_irc == expected_irc
    assert cache.stats()["hits"] == len(items) and cache.stats()["misses"] == 0 and cache.stats()["corrupt"] == 0
    assert cache.prune() == cache_module.PruneResult(len(items), 0, 0, 0, 0)
    # The old tags still group a CT's entries: a changed CT's old entries go by tag.
    raw = find_mhd(UID_B, tiny_root).with_suffix(".raw")
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    cache.refresh()
    result = cache.prune()
    assert (result.changed_ct, result.kept) == (2, len(items) - 2) and len(cache) == len(items) - 2


# --- reading into a caller's buffer (out=) ----------------------------------------------------


@pytest.mark.parametrize("compress_level", [0, 1])
def test_out_receives_the_chunk_on_miss_and_hit(tiny_root, tmp_path, compress_level):
    cache = ChunkCache(tmp_path / "cache", tiny_root, compress_level=compress_level)
    batch = np.full((2, 32, 48, 48), 7, dtype=np.int16)  # slots of a batch, as LunaDataset passes them
    for uid, xyz in candidates_of(tiny_root)[:3]:
        expected, expected_irc = direct(tiny_root, uid, xyz)
        for slot in (0, 1):  # miss into slot 0, hit into slot 1
            chunk, center_irc = cache.get_ct_raw_candidate(uid, xyz, out=batch[slot])
            assert np.shares_memory(chunk, batch[slot])
            np.testing.assert_array_equal(batch[slot], expected)
            assert center_irc == expected_irc
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 3


def test_out_returns_the_given_array(tiny_root, tmp_path):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    out = np.empty((32, 48, 48), dtype=np.int16)
    assert cache.get_ct_raw_candidate(uid, xyz, out=out)[0] is out  # miss
    assert cache.get_ct_raw_candidate(uid, xyz, out=out)[0] is out  # hit
    np.testing.assert_array_equal(out, direct(tiny_root, uid, xyz)[0])


@pytest.mark.parametrize("how", ["truncate", "overwrite", "header"])
def test_damaged_value_read_into_out_is_recomputed(tiny_root, tmp_path, how):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    expected, _ = cache.get_ct_raw_candidate(uid, xyz)
    _damage(cache, cache.key(uid, xyz), how)
    reader = ChunkCache(tmp_path / "cache", tiny_root)
    out = np.zeros((32, 48, 48), dtype=np.int16)
    chunk, _ = reader.get_ct_raw_candidate(uid, xyz, out=out)
    assert chunk is out and reader.stats()["corrupt"] == 1
    np.testing.assert_array_equal(out, expected)


def read_only_zeros() -> np.ndarray:
    out = np.zeros((32, 48, 48), dtype=np.int16)
    out.flags.writeable = False
    return out


@pytest.mark.parametrize(
    "out, problem",
    [
        (np.zeros((32, 48, 48), dtype=np.float32), "float32 array"),
        (np.zeros((32, 48, 47), dtype=np.int16), r"shape \(32, 48, 47\)"),
        (np.zeros((32, 48, 96), dtype=np.int16)[:, :, ::2], "not C-contiguous"),
        (read_only_zeros(), "read-only"),
        ([0] * 10, "got list"),
    ],
    ids=["dtype", "shape", "strided", "read-only", "list"],
)
def test_bad_out_is_a_clear_error(tiny_root, tmp_path, out, problem):
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    uid, xyz = candidates_of(tiny_root)[0]
    with pytest.raises(
        ConfigError, match=rf"out: expected a writable C-contiguous int16 array of shape \(32, 48, 48\).*{problem}"
    ):
        cache.get_ct_raw_candidate(uid, xyz, out=out)
    assert not cache.exists() or len(cache) == 0  # checked before anything is read or written
