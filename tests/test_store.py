"""p2ch.store on its own: a record format that is not a chunk, no CTs anywhere."""

import concurrent.futures as cf
import errno
import json
import multiprocessing
import os
import pickle
import sqlite3
import struct
import threading
import time
from pathlib import Path

import diskcache
import pytest

from p2ch import store as store_module
from p2ch.store import (
    FOREIGN_KEY,
    LAYOUT_FILE,
    ByteStore,
    CacheDirError,
    CacheFullError,
    DamagedRecord,
    Record,
    RecordDisk,
    RecordFormat,
    StoreKind,
)

# A record unlike a chunk: 8-byte header = magic + payload length (uint32).
TEST_RECORD = RecordFormat(magic=b"TST1", header_size=8, noun="test record", encoder="make_record")
KIND = StoreKind(
    label="test store",
    source="tests/test_store.py",
    dir_option="--store-dir",
    dir_env="P2CH_TEST_STORE_DIR",
    full_advice="free some space, or point --store-dir at a bigger disk",
)


class RecordTestDisk(RecordDisk):
    record = TEST_RECORD


def make_record(payload: bytes) -> tuple[bytes, bytes]:
    """(header, header + payload) of one test record."""
    header = TEST_RECORD.magic + struct.pack("<I", len(payload))
    return header, header + payload


def new_store(path: Path, **kwargs) -> ByteStore:
    return ByteStore(path, RecordTestDisk, KIND, **kwargs)


def value_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.val"))


def row_of(folder: Path, key: str) -> tuple[bytes, Path]:
    """(SQLite value column, value file) of the entry `key`, read with sqlite3 directly."""
    for db in sorted(folder.glob("[0-9][0-9][0-9]/cache.db")):
        with sqlite3.connect(db) as con:
            rows = con.execute("SELECT value, filename FROM Cache WHERE key = ?", (key,)).fetchall()
        if rows:
            return bytes(rows[0][0]), db.parent / rows[0][1]
    raise AssertionError(f"{key} not stored")


def set_row_value(folder: Path, key: str, value: bytes) -> None:
    """Overwrite the SQLite value column (the header) of `key`, as a damaged disk might."""
    for db in sorted(folder.glob("[0-9][0-9][0-9]/cache.db")):
        with sqlite3.connect(db) as con:
            con.execute("UPDATE Cache SET value = ? WHERE key = ?", (value, key))


def read_payload(record: Record) -> bytes:
    with record.file:
        buffer = bytearray(record.size())
        record.read_exact(memoryview(buffer))
    return bytes(buffer)


def test_round_trip_keeps_header_in_the_row_and_payload_in_the_file(tmp_path):
    folder = tmp_path / "store"
    store = new_store(folder, shards=2)
    assert not store.exists() and len(store) == 0 and store.volume() == 0 and list(store.keys()) == []
    assert not folder.exists()  # asking created nothing
    payload = bytes(range(256)) * 40
    header, value = make_record(payload)
    assert store.add("a/1", value, tag="t1") is True
    assert store.add("a/1", make_record(b"other")[1], tag="t1") is False  # present: first one stays
    assert store.add("a/2", make_record(b"xyz")[1], tag="t2") is True
    row, file = row_of(folder, "a/1")
    assert row == header and file.read_bytes() == payload and file.suffix == ".val"
    assert len(file.parent.name) == 2  # one level of 256 folders
    record = store.get("a/1")
    assert type(record) is Record and record.header == header and read_payload(record) == payload
    assert store.diskcache.get("a/1", retry=True) == value  # whole value without read=True
    assert store.get("missing") is None and store.contains("a/2") and not store.contains("missing")
    assert sorted(store.keys()) == ["a/1", "a/2"] and len(store) == 2 and store.volume() > len(payload)
    layout = json.loads((folder / LAYOUT_FILE).read_text())
    assert layout["format"] == "p2ch test store" and layout["shards"] == 2
    store.set("a/2", make_record(b"new")[1], tag="t2")
    assert read_payload(store.get("a/2")) == b"new" and len(value_files(folder)) == 2
    store.evict(["t1"])
    assert list(store.keys()) == ["a/2"]
    store.delete(["a/2", "never-there"])
    assert len(store) == 0 and value_files(folder) == []
    store.add("b", make_record(b"1")[1], tag="t")
    assert store.clear() == 1 and len(store) == 0


def test_keys_with_prefix_finds_every_key_under_it_in_every_shard_and_no_other(tmp_path):
    store = new_store(tmp_path / "store", shards=4)
    assert store.keys_with_prefix("ct/1/") == set() and not store.exists()  # asking created nothing
    keys = [f"ct/1/{k}" for k in range(40)] + ["ct/1", "ct/10/0", "ct/1.5/0", "ct/0/9", "ct/2/0", "ct/1/"]
    for key in keys:
        store.add(key, make_record(b"x")[1], tag="t")
    shards = {store.diskcache._hash(key) % 4 for key in keys[:40]}
    assert len(shards) == 4  # the prefix's keys are spread over every shard
    assert store.keys_with_prefix("ct/1/") == {*keys[:40], "ct/1/"}
    assert store.keys_with_prefix("ct/1") == {*keys[:41], "ct/10/0", "ct/1.5/0", "ct/1/"}
    assert store.keys_with_prefix("ct/3/") == set()
    stock = diskcache.FanoutCache(str(store.directory), shards=4)
    stock.set(("ct/1/x",), b"x", retry=True)  # a foreign key, stored pickled: never returned (nor unpickled)
    stock.close()
    assert store.keys_with_prefix("ct/1/") == {*keys[:40], "ct/1/"}
    for bad in ("", "ct/µ"):
        with pytest.raises(ValueError, match="prefix"):
            store.keys_with_prefix(bad)


def test_refuses_anything_but_record_bytes_and_str_keys(tmp_path):
    store = new_store(tmp_path / "store")
    with pytest.raises(TypeError, match=r"only test record bytes \(make_record\), got dict"):
        store.add("k", {"a": 1}, tag="t")
    with pytest.raises(TypeError, match="got bytearray"):
        store.add("k", bytearray(make_record(b"x")[1]), tag="t")
    with pytest.raises(ValueError, match="not a test record"):
        store.add("k", b"P2CK" + b"\0" * 100, tag="t")  # another format's magic
    with pytest.raises(ValueError, match="not a test record"):
        store.add("k", b"TST", tag="t")  # shorter than the header
    with pytest.raises(TypeError, match="keys are str"):
        store.add(("k", 1), make_record(b"x")[1], tag="t")
    assert len(store) == 0 and value_files(store.directory) == []


class _Trap:
    """Unpickling this creates `path`: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_foreign_pickled_entries_are_never_unpickled(tmp_path):
    store = new_store(tmp_path / "store", shards=3)
    store.add("ours", make_record(b"fine")[1], tag="t")
    marker_value, marker_key = tmp_path / "value-unpickled", tmp_path / "key-unpickled"
    stock = diskcache.FanoutCache(str(store.directory), shards=3)
    stock.set("theirs", _Trap(marker_value), retry=True)  # small: pickled into the row
    stock.set("big", [_Trap(marker_value)] * 20000, retry=True)  # large: pickled into a file
    stock.set(_Trap(marker_key), b"x" * 10, retry=True)
    stock.close()
    for key in ("theirs", "big"):
        with pytest.raises(DamagedRecord, match=r"not written by p2ch\.store"):
            store.get(key)
        assert type(store.diskcache.get(key, retry=True)).__name__ == "_Rejected"
    keys = list(store.keys())
    assert keys.count(FOREIGN_KEY) == 1 and sorted(k for k in keys if k is not FOREIGN_KEY) == ["big", "ours", "theirs"]
    assert read_payload(store.get("ours")) == b"fine"
    assert not marker_value.exists() and not marker_key.exists()


def test_damaged_records_are_detected(tmp_path):
    folder = tmp_path / "store"
    store = new_store(folder)
    for key in ("short-header", "bad-magic", "truncated", "file-gone"):
        store.add(key, make_record(b"p" * 5000)[1], tag="t")
    for key, header in (("short-header", b"TST1"), ("bad-magic", b"XXXX\0\0\0\0")):
        set_row_value(folder, key, header)
        with pytest.raises(DamagedRecord, match="header is"):
            store.get(key)
    _, file = row_of(folder, "truncated")
    file.write_bytes(b"p" * 1000)
    record = store.get("truncated")
    with record.file, pytest.raises(DamagedRecord, match="read 1000 of 5000 bytes"):
        record.read_exact(memoryview(bytearray(5000)))
    _, file = row_of(folder, "file-gone")
    file.unlink()
    assert store.get("file-gone") is None  # a row without its file reads as a miss


def test_check_finds_and_removes_orphan_files_and_rows_without_files(tmp_path):
    folder = tmp_path / "store"
    store = new_store(folder, shards=2)
    assert store.check_files(fix=True) == (0, 0) and not folder.exists()
    for k in range(3):
        store.add(f"k{k}", make_record(bytes([k]) * 3000)[1], tag="t")
    files = value_files(folder)
    orphan = files[0].parent.parent / "ab" / "orphan.val"  # a writer killed between file and row
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"o" * 3000)
    _, gone = row_of(folder, "k1")
    gone.unlink()
    assert store.check_files(fix=False) == (1, 1)
    assert orphan.exists() and len(store) == 3
    assert store.check_files(fix=True) == (1, 1)
    assert not orphan.exists() and sorted(store.keys()) == ["k0", "k2"]
    assert store.check_files(fix=True) == (0, 0)


def _read_in_child(store, key):
    return read_payload(store.get(key)), os.getpid()


_FORKED: dict = {}


def _read_forked(key):
    store = _FORKED["store"]
    handle = store.diskcache
    return read_payload(store.get(key)), handle is not _FORKED["parent_handle"], len(store_module._INHERITED)


def test_pickles_to_a_spawned_process_without_its_handle(tmp_path):
    store = new_store(tmp_path / "store", shards=3, timeout_s=2.0)
    store.add("k", make_record(b"spawned")[1], tag="t")
    state = store.__getstate__()
    assert set(state) == {"directory", "disk", "kind", "shards", "timeout_s"}  # no SQLite handle
    clone = pickle.loads(pickle.dumps(store))
    assert clone._cache is None and clone.disk is RecordTestDisk and clone.kind == KIND and clone.shards == 3
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        payload, pid = pool.submit(_read_in_child, store, "k").result(timeout=60)
    assert payload == b"spawned" and pid != os.getpid()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_a_forked_child_opens_its_own_handle_and_leaves_the_parents_alone(tmp_path):
    store = new_store(tmp_path / "store")
    store.add("k", make_record(b"forked")[1], tag="t")
    parent_handle = store.diskcache
    _FORKED.update(store=store, parent_handle=parent_handle)
    try:
        with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            payload, reopened, inherited = pool.submit(_read_forked, "k").result(timeout=60)
    finally:
        _FORKED.clear()
    assert payload == b"forked" and reopened and inherited == len(store_module._INHERITED) + 1
    # The parent's connection still works: the child neither used nor closed it.
    assert store.diskcache is parent_handle
    store.add("k2", make_record(b"after")[1], tag="t")
    assert read_payload(store.get("k2")) == b"after"


def test_writes_wait_for_a_busy_database_instead_of_dropping(tmp_path):
    store = new_store(tmp_path / "store", shards=1, timeout_s=0.05)
    store.add("first", make_record(b"1")[1], tag="t")
    lock = sqlite3.connect(tmp_path / "store" / "000" / "cache.db", isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(0.5, lambda: lock.execute("COMMIT"))
    released.start()
    start = time.monotonic()
    try:
        assert store.add("second", make_record(b"2")[1], tag="t") is True
        assert store.contains("second")
    finally:
        released.join()
        lock.close()
    assert time.monotonic() - start >= 0.4
    assert read_payload(store.get("second")) == b"2"


def test_shard_count_is_fixed_by_the_first_process(tmp_path):
    first = new_store(tmp_path / "store", shards=3)
    first.add("k", make_record(b"x")[1], tag="t")
    other = new_store(tmp_path / "store", shards=8)
    assert read_payload(other.get("k")) == b"x"
    assert len(list((tmp_path / "store").glob("[0-9][0-9][0-9]"))) == 3


def test_folder_errors_name_the_store_and_the_fix(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / LAYOUT_FILE).write_text(json.dumps({"format": "p2ch chunk cache", "shards": 8}))
    with pytest.raises(CacheDirError, match=r"not a p2ch test store layout file.*another --store-dir"):
        new_store(foreign).add("k", make_record(b"x")[1], tag="t")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(
        CacheDirError, match=r"test store directory .*a-file/store cannot be created.*P2CH_TEST_STORE_DIR"
    ):
        new_store(blocker / "store").add("k", make_record(b"x")[1], tag="t")


def test_full_disk_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    store = new_store(tmp_path / "store")
    store.add("k0", make_record(b"x" * 100)[1], tag="t")

    def full(self, full_path, iterator, mode, encoding=None):
        os.makedirs(os.path.dirname(full_path), exist_ok=True)
        with open(full_path, mode) as f:
            f.write(b"half a record")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskcache.Disk, "_write", full)
    with pytest.raises(CacheFullError, match=r"disk holding the test store .* is full.*--store-dir at a bigger disk"):
        store.add("k1", make_record(b"y" * 100)[1], tag="t")
    assert len(value_files(store.directory)) == 1 and list(store.keys()) == ["k0"]
