"""On-disk chunk cache: int16 candidate chunks in a diskcache `FanoutCache`, keyed so they never go stale.

Cropping a chunk means loading its whole CT (about a second and 150 MB), so training reads
chunks from this cache; `python -m p2ch.prepcache` fills it ahead of time, and a miss is
computed and stored on the spot.

What the book's cache got wrong, and what this one does instead:

- Values are int16 HU (the CT's own type), half the bytes of the book's float32.
- No pickle. A value is `bytes`: a fixed 36-byte little-endian header (see `HEADER`: magic,
  format version, flags, shape, center_irc, payload length, CRC-32 of the payload) and the raw
  C-order int16 voxels. `ChunkDisk`, the diskcache serialiser used here, accepts nothing else:
  it refuses to store non-bytes, and on reading it hands back any entry it did not write
  itself (a pickled value, a foreign key) as an opaque marker, so nothing read from the cache
  directory is ever unpickled. The header lives in the SQLite row and the voxels in the value
  file, which is then exactly 32·48·48·2 bytes = 36 pages of 4 KiB, so on disk a chunk takes
  half of what the book's pickled float32 chunk takes.
- Keys name everything that determines the value: the cache format version, the crop width,
  the series_uid, the identity of the source CT (size and mtime_ns of its .mhd and .raw) and the
  candidate centre rounded to 1 µm (so float noise in the CSV round trip does not miss):
  `p2ch-chunk/v1/32x48x48/<series_uid>/<mhd size>.<mhd mtime>.<raw size>.<raw mtime>/<x>,<y>,<z>`
  with the centre in integer µm. Replaced or regenerated CT files, or a format change, give
  new keys, so stale values are never served; `ChunkCache.prune()` deletes the old ones. Each
  entry is tagged `v<version>/<series_uid>/<identity>` so a changed CT's entries go in a few
  batched deletes. Identity is by size and mtime, not inode, so a data set and its cache
  copied together with `rsync -a` / `cp -p` stay valid.
- Damaged entries (bad header, wrong length, CRC mismatch, missing value file, foreign value)
  are detected on read, logged once, deleted and recomputed (`stats()["corrupt"]`).
- Every diskcache call passes `retry=True`: without it diskcache drops writes and turns reads
  into misses whenever SQLite is busy.

Concurrency: diskcache writes a value's file completely before it commits the SQLite row that
names it, and a reader only finds files through committed rows, so a reader never sees a
half-written value, whether the writer is alive, crashed or was SIGKILLed (a killed writer can
leave an orphan file that no row names; it is never read). Two writers of the same key both
`add` it; the first commit wins and the second writer's file is removed.

Layout: the folder holds diskcache's shards `000/`, `001/`, … and `p2ch-cache.json`, which
records the shard count. The first process to create the cache writes it atomically and every
other process reads it, because a key's shard depends on that count. Value files sit in 256
folders per shard (diskcache's default would make about one folder per chunk at LUNA16's size).

Processes: a `ChunkCache` holds only paths and settings. It opens its `FanoutCache` lazily in
each process and reopens it when it finds itself in a new process (it remembers the pid), so
it can be pickled to spawned DataLoader workers or inherited by forked ones. diskcache 5 also
checks the pid and reconnects after a fork, but by closing the inherited SQLite connection in
the child; we never touch inherited handles at all (they are parked in `_INHERITED`, never
used or closed), following SQLite's rule not to use a connection across fork().

Caching in memory, per process: the identity of each series' CT files is stat-ed once per
`ChunkCache` per process (two stats and a header parse per read would cost about half a warm
read); call
`ChunkCache.refresh()` after replacing CT files in a long-running process (new processes, e.g.
DataLoader workers of the next run, see the change anyway). CTs loaded on a miss are kept in a
small LRU keyed by series and file identity (`ct_cache_size`, default 1), never `p2ch.ct.get_ct`'s,
which cannot tell a CT loaded before its files were replaced from one loaded after.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from diskcache import UNKNOWN, Disk, FanoutCache
from diskcache.core import MODE_BINARY

from p2ch.config import CACHE_DIR_ENV, resolve_cache_dir, resolve_data_root
from p2ch.ct import Ct, clear_caches, read_mhd_header
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError, P2chError
from p2ch.geometry import DEFAULT_WIDTH_IRC, IrcTuple
from p2ch.luna import check_series_uid, find_mhd, no_data_message, series_index

log = logging.getLogger(__name__)

# Bump when the key scheme or value layout changes: old entries are then never read (their keys
# differ) and `prune()` deletes them.
CACHE_FORMAT_VERSION = 1
KEY_PREFIX = "p2ch-chunk"
MAGIC = b"P2CK"
# magic, format version, flags, shape (I, R, C), reserved, center_irc (I, R, C), payload bytes,
# CRC-32 of the payload as stored. Little-endian, no padding: 36 bytes.
HEADER = struct.Struct("<4sHHHHHHiiiII")
FLAG_ZLIB = 1
DEFAULT_SHARDS = 8
DEFAULT_TIMEOUT_S = 5.0
# The book's chunk: 32*48*48 float32 values. Used to report sizes against it.
BOOK_CHUNK_BYTES = 32 * 48 * 48 * 4
_MAX_SIZE_LIMIT = 2**62
LAYOUT_FILE = "p2ch-cache.json"
LAYOUT_FORMAT = "p2ch chunk cache"

# FanoutCache objects inherited through fork(): kept referenced (so the child never closes the
# parent's SQLite connections by garbage-collecting them) and never used.
_INHERITED: list[FanoutCache] = []


class CacheError(P2chError):
    """The chunk cache cannot be used (base class)."""


class CacheDirError(CacheError):
    """The cache directory cannot be created, opened or written."""


class CacheFullError(CacheError):
    """The disk holding the cache is full (or would be)."""


class _Rejected:
    """What `ChunkDisk` returns for an entry it did not write: never deserialised."""

    __slots__ = ("mode",)

    def __init__(self, mode: int):
        self.mode = mode

    def __repr__(self) -> str:
        return f"<entry not written by p2ch.cache, diskcache mode {self.mode}>"


class _ForeignKey:
    """What `ChunkDisk.get` returns for a pickled key: never unpickled."""

    def __repr__(self) -> str:
        return "<pickled key, not read>"


FOREIGN_KEY = _ForeignKey()


class _Stored:
    """A chunk entry as `ChunkDisk.fetch(read=True)` returns it: header bytes and an open value file."""

    __slots__ = ("file", "header")

    def __init__(self, header: bytes, file: io.RawIOBase):
        self.header = header
        self.file = file


class ChunkDisk(Disk):
    """diskcache serialiser for encoded chunks: stores only `bytes`, never unpickles.

    A value (`encode_chunk` output) is split: its 36-byte header goes into the SQLite row's
    value column, the payload into the value file. Keys must be `str`.
    """

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"p2ch.cache keys are str, got {type(key).__name__}")
        return key, True

    def get(self, key, raw):
        # A key stored pickled was not written by us: do not unpickle it.
        return key if raw else FOREIGN_KEY

    def store(self, value, read, key=UNKNOWN):
        if read or type(value) is not bytes:
            raise TypeError(f"p2ch.cache stores only encoded chunk bytes (encode_chunk), got {type(value).__name__}")
        if len(value) < HEADER.size or value[:4] != MAGIC:
            raise ValueError("not an encoded chunk: no p2ch chunk header")
        filename, full_path = self.filename(key, value)
        payload = memoryview(value)[HEADER.size :]
        self._write(full_path, (payload,), "xb")
        return len(payload), MODE_BINARY, filename, sqlite3.Binary(value[: HEADER.size])

    def filename(self, key=UNKNOWN, value=UNKNOWN):
        # diskcache's default spreads files over 65,536 two-level folders per shard: for LUNA16's
        # 551k chunks that is about one new folder (4 KiB, and a slow mkdir) per chunk. One level
        # of 256 folders keeps a few hundred files per folder instead.
        hex_name = os.urandom(16).hex()
        filename = os.path.join(hex_name[:2], hex_name[2:] + ".val")
        return filename, os.path.join(self._directory, filename)

    def _write(self, full_path, iterator, mode, encoding=None):
        try:
            return super()._write(full_path, iterator, mode, encoding)
        except BaseException:
            # Do not leave a partial value file behind (e.g. disk full). The name is fresh and
            # random, so it is ours.
            with contextlib.suppress(OSError):
                os.remove(full_path)
            raise

    def fetch(self, mode, filename, value, read):
        if mode != MODE_BINARY or filename is None or value is None:
            return _Rejected(mode)
        full_path = os.path.join(self._directory, filename)
        if read:
            return _Stored(bytes(value), open(full_path, "rb", buffering=0))
        with open(full_path, "rb") as reader:
            return bytes(value) + reader.read()


class _Corrupt(Exception):
    """A stored value failed validation (internal; recovered by recomputing)."""


def encode_chunk(chunk: np.ndarray, center_irc: Sequence[int], compress_level: int = 0) -> bytes:
    """Encode one chunk as a cache value.

    chunk: (I, R, C) int16 HU. center_irc: 3 ints, the candidate's voxel. compress_level: 0 for
    raw voxels, 1-9 for zlib (smaller on disk, far slower to read; see BENCHMARKS.md).
    Returns `HEADER` + payload as bytes.
    """
    chunk = np.asarray(chunk)
    if chunk.dtype != np.int16 or chunk.ndim != 3:
        raise DataFormatError(f"encode_chunk: expected a 3-D int16 chunk, got {chunk.dtype} {chunk.shape}")
    if max(chunk.shape) > 0xFFFF:
        raise DataFormatError(f"encode_chunk: chunk shape {chunk.shape} too large (each side ≤ 65535)")
    chunk = np.ascontiguousarray(chunk)
    flags = 0
    payload: Any = memoryview(chunk).cast("B")
    if compress_level:
        payload = zlib.compress(payload, compress_level)
        flags |= FLAG_ZLIB
    center = [int(v) for v in center_irc]
    header = HEADER.pack(
        MAGIC, CACHE_FORMAT_VERSION, flags, *chunk.shape, 0, *center, len(payload), zlib.crc32(payload)
    )
    return b"".join((header, payload))


def _parse_header(header: bytes, width: tuple[int, int, int] | None):
    if len(header) != HEADER.size:
        raise _Corrupt(f"header is {len(header)} bytes, expected {HEADER.size}")
    magic, version, flags, i, r, c, _, ci, cr, cc, length, crc = HEADER.unpack(header)
    if magic != MAGIC:
        raise _Corrupt(f"bad magic {magic!r}")
    if version != CACHE_FORMAT_VERSION:
        raise _Corrupt(f"format version {version}, expected {CACHE_FORMAT_VERSION}")
    if flags & ~FLAG_ZLIB:
        raise _Corrupt(f"unknown flags {flags:#x}")
    shape = (i, r, c)
    if width is not None and shape != width:
        raise _Corrupt(f"shape {shape}, expected {width}")
    if not flags and length != 2 * i * r * c:
        raise _Corrupt(f"payload length {length} does not match shape {shape}")
    return flags, shape, IrcTuple(ci, cr, cc), length, crc


def _decode_payload(flags: int, shape, payload, crc: int, verify: bool) -> np.ndarray:
    if verify and zlib.crc32(payload) != crc:
        raise _Corrupt("CRC-32 mismatch")
    if flags & FLAG_ZLIB:
        try:
            raw = zlib.decompress(payload)
        except zlib.error as exc:
            raise _Corrupt(f"zlib: {exc}") from None
        if len(raw) != 2 * shape[0] * shape[1] * shape[2]:
            raise _Corrupt(f"decompressed {len(raw)} bytes for shape {shape}")
        return np.frombuffer(raw, dtype=np.int16).reshape(shape).copy()
    return np.frombuffer(payload, dtype=np.int16).reshape(shape)


def decode_chunk(value: bytes, width_irc: Sequence[int] | None = None, verify: bool = True):
    """Decode `encode_chunk` output: `(chunk, center_irc)`, chunk (I, R, C) int16 HU (read-only view
    of `value` when uncompressed), center_irc an IrcTuple. Raises DataFormatError for a damaged value.
    """
    width = None if width_irc is None else tuple(int(v) for v in width_irc)
    try:
        if type(value) is not bytes:
            raise _Corrupt(f"value is {type(value).__name__}, not bytes")
        flags, shape, center_irc, length, crc = _parse_header(value[: HEADER.size], width)  # type: ignore[arg-type]
        payload = memoryview(value)[HEADER.size :]
        if len(payload) != length:
            raise _Corrupt(f"payload is {len(payload)} bytes, header says {length}")
        return _decode_payload(flags, shape, payload, crc, verify), center_irc
    except _Corrupt as exc:
        raise DataFormatError(f"damaged chunk cache value: {exc}") from None


@dataclasses.dataclass(frozen=True)
class FillResult:
    """What `ChunkCache.fill_series` did for one CT.

    written: chunks stored now; present: already cached (or stored meanwhile by another
    writer); outside: candidates whose centre lies outside the CT (skipped); ct_bytes: bytes of
    the CT's voxel file read (0 when nothing had to be computed).
    """

    series_uid: str
    written: int
    present: int
    outside: int
    ct_bytes: int


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """What `ChunkCache.prune` found (and deleted, unless a dry run)."""

    kept: int
    old_format: int
    changed_ct: int
    missing_ct: int
    foreign: int
    orphan_files: int = 0  # value files no entry refers to (a writer killed between file and row)
    lost_files: int = 0  # entries whose value file is gone (deleted from the index)

    @property
    def removed(self) -> int:
        return self.old_format + self.changed_ct + self.missing_ct


def _check_width(width_irc: Sequence[int]) -> tuple[int, int, int]:
    try:
        width = tuple(int(v) for v in width_irc)
        exact = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in width_irc)
    except (TypeError, ValueError):
        width, exact = (), False
    if len(width) != 3 or not exact or min(width) < 1 or max(width) > 0xFFFF:
        raise ConfigError(
            f"width_irc {width_irc!r}: expected 3 positive integers (index, row, col), e.g. {DEFAULT_WIDTH_IRC}"
        )
    return width  # type: ignore[return-value]


def _center_key(center_xyz) -> str:
    # Integer micrometres: one canonical spelling for every float that rounds to the same µm.
    try:
        x, y, z = center_xyz
        return f"{round(float(x) * 1000.0)},{round(float(y) * 1000.0)},{round(float(z) * 1000.0)}"
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"center_xyz {center_xyz!r}: expected 3 finite numbers (x, y, z in mm)") from None


def source_identity(series_uid: str, data_root: str | os.PathLike[str]) -> str:
    """Identity of a series' CT files: size and mtime_ns of its .mhd and voxel file, as a key part.

    Raises DataNotFoundError (naming the data root) for an unknown series.
    """
    mhd = find_mhd(series_uid, data_root)
    st = os.stat(mhd)
    parts = [f"{st.st_size:x}", f"{st.st_mtime_ns:x}"]
    data_file = read_mhd_header(mhd)["ElementDataFile"]
    if data_file.upper() != "LOCAL" and " " not in data_file and "%" not in data_file:
        raw_st = os.stat(mhd.parent / data_file)
        parts += [f"{raw_st.st_size:x}", f"{raw_st.st_mtime_ns:x}"]
    return ".".join(parts)


def _raw_bytes(ct: Ct) -> int:
    try:
        data_file = read_mhd_header(ct.mhd_path)["ElementDataFile"]
        return os.stat(ct.mhd_path.parent / data_file).st_size
    except (OSError, P2chError):
        return int(ct.hu.nbytes)


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


class ChunkCache:
    """Cropped candidate chunks on disk, computed from the CTs on a miss.

    cache_dir: folder of the FanoutCache (default `resolve_cache_dir()`: $P2CH_CACHE_DIR, else
    `data-unversioned/cache`). data_root: LUNA16 root (default `resolve_data_root()`). Both are
    made absolute here, so a pickled cache works in a process with another working directory.
    shards: FanoutCache shards for a new cache (an existing cache keeps its own count).
    timeout_s: SQLite busy timeout. compress_level: 0 (raw int16, default) or a zlib level for
    new entries (reads handle both). verify: check each value's CRC-32 on read (about 20 µs).
    ct_cache_size: CTs kept in memory per process for misses.

    Picklable; opens the FanoutCache lazily per process (see the module docstring).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        data_root: str | os.PathLike[str] | None = None,
        *,
        shards: int = DEFAULT_SHARDS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        compress_level: int = 0,
        verify: bool = True,
        ct_cache_size: int = 1,
    ):
        if not isinstance(shards, int) or shards < 1:
            raise ConfigError(f"shards {shards!r}: expected a positive integer (diskcache's default is 8)")
        if not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
            raise ConfigError(f"compress_level {compress_level!r}: expected 0 (off) or a zlib level 1-9")
        if not isinstance(ct_cache_size, int) or ct_cache_size < 0:
            raise ConfigError(f"ct_cache_size {ct_cache_size!r}: expected an integer ≥ 0")
        self.cache_dir = resolve_cache_dir(cache_dir).absolute()
        self.data_root = resolve_data_root(data_root).absolute()
        self.shards = shards
        self.timeout_s = float(timeout_s)
        self.compress_level = compress_level
        self.verify = bool(verify)
        self.ct_cache_size = ct_cache_size
        self._init_process_state()

    # --- per-process state -------------------------------------------------------------------

    def _init_process_state(self) -> None:
        self._cache: FanoutCache | None = None
        self._pid: int | None = None
        self._prefixes: dict[tuple[str, tuple[int, ...]], tuple[str, str]] = {}
        self._identities: dict[str, str] = {}
        self._cts: collections.OrderedDict[tuple[str, str], Ct] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._corrupt_logged = False
        self.reset_stats()

    def __getstate__(self) -> dict[str, Any]:
        keep = ("cache_dir", "data_root", "shards", "timeout_s", "compress_level", "verify", "ct_cache_size")
        return {name: getattr(self, name) for name in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def __repr__(self) -> str:
        return f"ChunkCache({str(self.cache_dir)!r}, data_root={str(self.data_root)!r})"

    @property
    def layout_path(self) -> Path:
        """The file recording this cache's layout (shard count), written once when the cache is made."""
        return self.cache_dir / LAYOUT_FILE

    def _read_layout(self) -> int | None:
        """Shard count from the layout file; None when there is no cache yet."""
        path = self.layout_path
        for attempt in range(40):
            try:
                layout = json.loads(path.read_text(encoding="utf-8"))
                shards = layout["shards"]
                if layout.get("format") == LAYOUT_FORMAT and isinstance(shards, int) and shards > 0:
                    return shards
                problem = f"unexpected content {layout!r}"
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise self._dir_error(exc) from None
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                problem = str(exc)
                # Maybe being written right now by another process (the non-atomic fallback).
                with contextlib.suppress(OSError):
                    if attempt < 39 and time.time() - path.stat().st_mtime < 2.0:
                        time.sleep(0.05)
                        continue
            break
        raise CacheDirError(
            f"{path}: not a p2ch chunk cache layout file ({problem}); delete the folder "
            f"{self.cache_dir} (it is only a cache) or choose another --cache-dir"
        )

    def _layout_shards(self) -> int:
        """The shard count of this cache, creating the cache's layout file if there is none.

        Every process must use the same count (a key's shard depends on it), so the first process
        to create the cache records it, atomically, and the others read it.
        """
        shards = self._read_layout()
        if shards is not None:
            if shards != self.shards:
                log.debug("%s has %d shards (asked for %d); using %d", self.cache_dir, shards, self.shards, shards)
            return shards
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(
                {
                    "format": LAYOUT_FORMAT,
                    "shards": self.shards,
                    "note": "p2ch chunk cache (safe to delete); see p2ch/cache.py",
                }
            )
            tmp = self.cache_dir / f".{LAYOUT_FILE}.{os.getpid()}.{os.urandom(4).hex()}"
            tmp.write_text(text, encoding="utf-8")
            try:
                os.link(tmp, self.layout_path)  # atomic; fails if another process was first
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links
                with contextlib.suppress(FileExistsError), open(self.layout_path, "x", encoding="utf-8") as f:
                    f.write(text)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise self._dir_error(exc) from None
        shards = self._read_layout()
        if shards is None:
            raise CacheDirError(f"{self.layout_path} vanished while the cache was being created; retry")
        return shards

    def _open(self) -> FanoutCache:
        pid = os.getpid()
        if self._cache is not None:
            _INHERITED.append(self._cache)  # opened by the parent before a fork: leave it alone
            self._init_process_state()
        shards = self._layout_shards()
        # diskcache's constructor runs some statements (CREATE INDEX IF NOT EXISTS for the tag index)
        # with a zero busy timeout and no retry, so opening while another process opens or writes
        # the same shard can fail with "database is locked". Every statement is idempotent: retry.
        deadline = time.monotonic() + max(60.0, self.timeout_s)
        delay = 0.001
        while True:
            try:
                cache = FanoutCache(
                    str(self.cache_dir),
                    shards=shards,
                    timeout=self.timeout_s,
                    disk=ChunkDisk,
                    eviction_policy="none",
                    size_limit=_MAX_SIZE_LIMIT,
                    cull_limit=0,
                    statistics=False,
                    tag_index=True,
                )
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise self._dir_error(exc) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            except (OSError, sqlite3.Error) as exc:
                raise self._dir_error(exc) from None
        self._cache, self._pid = cache, pid
        return cache

    def _dir_error(self, exc: BaseException) -> CacheError:
        if _is_disk_full(exc):
            return self._full_error(exc)
        return CacheDirError(
            f"chunk cache directory {self.cache_dir} cannot be created or written ({exc}); fix its "
            f"permissions, or point --cache-dir / {CACHE_DIR_ENV} at a writable folder"
        )

    def _full_error(self, exc: BaseException) -> CacheFullError:
        free = _free_bytes(self.cache_dir)
        free_text = "unknown" if free is None else f"{free / 1e9:.2f} GB"
        return CacheFullError(
            f"the disk holding the chunk cache {self.cache_dir} is full ({exc}; {free_text} free); "
            "free some space, delete old entries (python -m p2ch.prepcache --prune, or --clear), or "
            f"point --cache-dir / {CACHE_DIR_ENV} at a bigger disk (all of LUNA16 takes about 81 GB)"
        )

    @property
    def diskcache(self) -> FanoutCache:
        """This process's FanoutCache (opened on first use, reopened after a fork)."""
        cache = self._cache
        if cache is None or self._pid != os.getpid():
            cache = self._open()
        return cache

    def exists(self) -> bool:
        """True when the cache directory already holds a cache (checking creates nothing)."""
        return self.layout_path.is_file()

    def close(self) -> None:
        """Close this process's SQLite connections (reopened on next use)."""
        if self._cache is not None and self._pid == os.getpid():
            self._cache.close()
        self._cache = None
        self._pid = None

    def refresh(self) -> None:
        """Forget what this process remembers about CT files (identities, loaded CTs, series index).

        Call after replacing or adding CT files while this process keeps running.
        """
        with self._lock:
            self._prefixes.clear()
            self._identities.clear()
            self._cts.clear()
        clear_caches()

    # --- statistics ----------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Zero this process's counters."""
        self._hits = self._misses = self._corrupt = self._written = 0

    def stats(self) -> dict[str, float]:
        """Counters of this process since creation or `reset_stats()`.

        hits, misses (a corrupt entry counts as a miss too), corrupt (damaged entries found and
        replaced), written (entries stored), hit_rate = hits / (hits + misses), 0.0 before any
        lookup.
        """
        lookups = self._hits + self._misses
        return {
            "hits": self._hits,
            "misses": self._misses,
            "corrupt": self._corrupt,
            "written": self._written,
            "hit_rate": self._hits / lookups if lookups else 0.0,
        }

    # --- keys ----------------------------------------------------------------------------------

    def _prefix(self, series_uid: str, width: tuple[int, ...]) -> tuple[str, str]:
        found = self._prefixes.get((series_uid, width))
        if found is None:
            check_series_uid(series_uid)
            width = _check_width(width)
            identity = self._identities.get(series_uid)
            if identity is None:
                identity = self._identities[series_uid] = source_identity(series_uid, self.data_root)
            found = (
                f"{KEY_PREFIX}/v{CACHE_FORMAT_VERSION}/{width[0]}x{width[1]}x{width[2]}/{series_uid}/{identity}/",
                f"v{CACHE_FORMAT_VERSION}/{series_uid}/{identity}",
            )
            self._prefixes[(series_uid, width)] = found
        return found

    def key(self, series_uid: str, center_xyz: Sequence[float], width_irc: Sequence[int] = DEFAULT_WIDTH_IRC) -> str:
        """The cache key of one chunk (see the module docstring for its parts)."""
        width = width_irc if type(width_irc) is tuple else tuple(width_irc)
        return self._prefix(series_uid, width)[0] + _center_key(center_xyz)

    # --- reading -------------------------------------------------------------------------------

    def _read(self, stored: Any, width: tuple[int, ...]) -> tuple[np.ndarray, IrcTuple]:
        if type(stored) is not _Stored:
            raise _Corrupt(repr(stored))
        with stored.file as file:
            flags, shape, center_irc, length, crc = _parse_header(stored.header, width)
            size = os.fstat(file.fileno()).st_size
            if size != length:
                raise _Corrupt(f"value file is {size} bytes, header says {length}")
            if flags:
                payload = file.read()
                if len(payload) != length:
                    raise _Corrupt(f"read {len(payload)} of {length} bytes")
                return _decode_payload(flags, shape, payload, crc, self.verify), center_irc
            # Read straight into a fresh array: writable, owns its memory, no extra copy.
            chunk = np.empty(shape, dtype=np.int16)
            view = memoryview(chunk).cast("B")
            got = 0
            while got < length:
                n = file.readinto(view[got:])
                if not n:
                    raise _Corrupt(f"read {got} of {length} bytes")
                got += n
            if self.verify and zlib.crc32(view) != crc:
                raise _Corrupt("CRC-32 mismatch")
            return chunk, center_irc

    def _lookup(self, cache: FanoutCache, key: str, width: tuple[int, ...]):
        stored = cache.get(key, None, read=True, retry=True)
        if stored is None:
            return None
        try:
            return self._read(stored, width)
        except (_Corrupt, OSError) as exc:
            self._drop_corrupt(cache, key, exc)
            return None

    def _note_corrupt(self, key: str, exc: BaseException | str) -> None:
        self._corrupt += 1
        if not self._corrupt_logged:
            self._corrupt_logged = True
            log.warning(
                "damaged entry in chunk cache %s (%s: %s); replacing it with a fresh crop "
                "(further damaged entries are logged at debug level)",
                self.cache_dir,
                key,
                exc,
            )
        else:
            log.debug("damaged entry %s (%s); recomputing", key, exc)

    def _drop_corrupt(self, cache: FanoutCache, key: str, exc: BaseException) -> None:
        self._note_corrupt(key, exc)
        try:
            cache.delete(key, retry=True)
        except (OSError, sqlite3.Error) as err:
            raise self._write_error(err) from None

    def get_cached(
        self, series_uid: str, center_xyz: Sequence[float], width_irc: Sequence[int] = DEFAULT_WIDTH_IRC
    ) -> tuple[np.ndarray, IrcTuple] | None:
        """The cached `(chunk, center_irc)` or None; never computes or stores anything."""
        cache = self._cache if self._pid == os.getpid() else self.diskcache
        width = width_irc if type(width_irc) is tuple else tuple(width_irc)
        key = self._prefix(series_uid, width)[0] + _center_key(center_xyz)
        return self._lookup(cache, key, width)

    def get_ct_raw_candidate(
        self, series_uid: str, center_xyz: Sequence[float], width_irc: Sequence[int] = DEFAULT_WIDTH_IRC
    ) -> tuple[np.ndarray, IrcTuple]:
        """The chunk around `center_xyz` of CT `series_uid`, from the cache or computed and stored.

        center_xyz: 3 floats, mm (x, y, z). width_irc: 3 ints (index, row, col).
        Returns `(chunk, center_irc)`: chunk `width_irc` int16 HU (writable), center_irc an
        IrcTuple. Same values as `Ct.get_raw_candidate`. Raises DataNotFoundError for an
        unknown series, CandidateOutsideCtError for a centre outside the CT, CacheFullError /
        CacheDirError when the cache cannot be written.
        """
        cache = self._cache if self._pid == os.getpid() else self.diskcache
        width = width_irc if type(width_irc) is tuple else tuple(width_irc)
        key = self._prefix(series_uid, width)[0] + _center_key(center_xyz)
        found = self._lookup(cache, key, width)
        if found is not None:
            self._hits += 1
            return found
        self._misses += 1
        return self._compute_and_store(cache, series_uid, center_xyz, width)

    # --- computing and writing -----------------------------------------------------------------

    def _load_ct(self, series_uid: str) -> tuple[Ct, str]:
        """Load a CT and the identity of the files it was read from (re-stat-ed around the read)."""
        for _ in range(3):
            before = source_identity(series_uid, self.data_root)
            ct = Ct(series_uid, self.data_root)
            after = source_identity(series_uid, self.data_root)
            if before == after:
                if self._identities.get(series_uid) != after:
                    self._identities[series_uid] = after
                    for k in [k for k in self._prefixes if k[0] == series_uid]:
                        del self._prefixes[k]
                return ct, after
        raise DataFormatError(
            f"CT {series_uid} under {self.data_root} keeps changing while being read; "
            "wait until it is completely written, then retry"
        )

    def _cached_ct(self, series_uid: str) -> tuple[Ct, str]:
        identity = self._identities.get(series_uid)
        if identity is not None:
            ct = self._cts.get((series_uid, identity))
            if ct is not None:
                self._cts.move_to_end((series_uid, identity))
                return ct, identity
        ct, identity = self._load_ct(series_uid)
        if self.ct_cache_size:
            self._cts[(series_uid, identity)] = ct
            while len(self._cts) > self.ct_cache_size:
                self._cts.popitem(last=False)
        return ct, identity

    def _compute_and_store(self, cache: FanoutCache, series_uid: str, center_xyz, width):
        width = _check_width(width)  # (a prefix found for an equal width, e.g. 32.0, skipped this)
        with self._lock:
            ct, _ = self._cached_ct(series_uid)
        chunk, center_irc = ct.get_raw_candidate(center_xyz, width)
        prefix, tag = self._prefix(series_uid, width)  # the identity may have been refreshed
        key = prefix + _center_key(center_xyz)
        self._store(cache, key, encode_chunk(chunk, center_irc, self.compress_level), tag, width)
        return chunk, center_irc

    def _store(self, cache: FanoutCache, key: str, value: bytes, tag: str, width) -> bool:
        """Add `value` under `key` unless present; repair a row whose value is unreadable."""
        try:
            if cache.add(key, value, tag=tag, retry=True):
                self._written += 1
                return True
            # Present: stored meanwhile by another writer (fine), or a row whose value is unreadable.
            stored = cache.get(key, None, read=True, retry=True)
            problem: BaseException | str = "its value file is missing"
            if stored is not None:
                try:
                    self._read(stored, width)
                    return False
                except (_Corrupt, OSError) as exc:
                    problem = exc
            self._note_corrupt(key, problem)
            cache.set(key, value, tag=tag, retry=True)
            self._written += 1
            return True
        except (OSError, sqlite3.Error) as exc:
            raise self._write_error(exc) from None

    def _write_error(self, exc: BaseException) -> CacheError:
        if _is_disk_full(exc):
            return self._full_error(exc)
        return self._dir_error(exc)

    def missing(self, series_uid: str, centers_xyz, width_irc: Sequence[int] = DEFAULT_WIDTH_IRC) -> np.ndarray:
        """Which of these chunks are not cached yet: (N,) bool, for centers_xyz (N, 3) float mm.

        Reads nothing but the index; creates nothing when the cache does not exist yet.
        """
        centers = np.asarray(centers_xyz, dtype=np.float64).reshape(-1, 3)
        if not self.exists():
            return np.ones(len(centers), dtype=bool)
        cache = self.diskcache
        prefix = self._prefix(series_uid, tuple(width_irc))[0]
        return np.array([not _contains(cache, prefix + _center_key(c)) for c in centers.tolist()], dtype=bool)

    def fill_series(
        self,
        series_uid: str,
        centers_xyz,
        width_irc: Sequence[int] = DEFAULT_WIDTH_IRC,
        batch_size: int = 256,
    ) -> FillResult:
        """Cache every chunk of one CT: load it once (only if something is missing) and crop in batches.

        centers_xyz: (N, 3) float mm. Memory: the CT plus `batch_size` chunks; the CT is not kept.
        Candidates outside the CT are skipped and counted (the dataset will report them).
        """
        width = _check_width(width_irc)
        centers = np.asarray(centers_xyz, dtype=np.float64).reshape(-1, 3)
        cache = self.diskcache
        prefix = self._prefix(series_uid, width)[0]
        keys = [prefix + _center_key(c) for c in centers.tolist()]
        first_row: dict[str, int] = {}
        for row, key in enumerate(keys):
            first_row.setdefault(key, row)  # duplicate centres (same µm) are one chunk
        first = sorted(first_row.values())
        todo = np.array([row for row in first if not _contains(cache, keys[row])], dtype=np.int64)
        present = len(first) - len(todo)
        if len(todo) == 0:
            return FillResult(series_uid, 0, present, 0, 0)
        ct, _ = self._load_ct(series_uid)
        prefix, tag = self._prefix(series_uid, width)  # identity as of the load
        keys = [prefix + _center_key(c) for c in centers.tolist()]
        centers_irc = np.atleast_2d(np.asarray(ct.xyz2irc(centers[todo])))
        inside = np.all((centers_irc >= 0) & (centers_irc < np.asarray(ct.hu.shape)), axis=1)
        outside = int((~inside).sum())
        if outside:
            log.warning(
                "%s: %d candidate centre(s) outside the CT volume %s; skipped", series_uid, outside, tuple(ct.hu.shape)
            )
        todo = todo[inside]
        written = 0
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            chunks, batch_irc = ct.get_raw_candidates(centers[rows], width)
            for row, chunk, center_irc in zip(rows.tolist(), chunks, batch_irc.tolist(), strict=True):
                if self._store(cache, keys[row], encode_chunk(chunk, center_irc, self.compress_level), tag, width):
                    written += 1
                else:
                    present += 1
        return FillResult(series_uid, written, present, outside, _raw_bytes(ct))

    # --- maintenance ---------------------------------------------------------------------------

    def __len__(self) -> int:
        if not self.exists():
            return 0
        return len(self.diskcache)

    def volume(self) -> int:
        """Bytes on disk: SQLite files plus value files (0 when there is no cache yet)."""
        return int(self.diskcache.volume()) if self.exists() else 0

    def clear(self) -> int:
        """Delete every entry; returns how many. Only diskcache's own files are removed."""
        if not self.exists():
            return 0
        try:
            removed = int(self.diskcache.clear(retry=True))
        except (OSError, sqlite3.Error) as exc:
            raise self._write_error(exc) from None
        self.refresh()
        return removed

    def prune(self, dry_run: bool = False) -> PruneResult:
        """Delete entries that can never be read again: another format version, or a CT whose files
        changed or are no longer under the data root. Entries of other widths stay.

        Raises DataNotFoundError when the data root holds no CT at all (rather than deleting everything).
        """
        if not self.exists():
            return PruneResult(0, 0, 0, 0, 0)
        on_disk = series_index(self.data_root)
        if not on_disk:
            raise DataNotFoundError(no_data_message(self.data_root) + "; refusing to prune against it")
        cache = self.diskcache
        current: dict[str, str | None] = {}
        stale_keys: list[str] = []
        stale_tags: dict[str, int] = {}
        kept = old_format = changed = missing = foreign = 0
        version = f"v{CACHE_FORMAT_VERSION}"
        for key in cache:
            if key is FOREIGN_KEY or type(key) is not str:
                foreign += 1
                continue
            parts = key.split("/")
            if len(parts) != 6 or parts[0] != KEY_PREFIX or parts[1] != version:
                stale_keys.append(key)
                old_format += 1
                continue
            uid, identity = parts[3], parts[4]
            if uid not in current:
                current[uid] = source_identity(uid, self.data_root) if uid in on_disk else None
            if current[uid] == identity:
                kept += 1
                continue
            if current[uid] is None:
                missing += 1
            else:
                changed += 1
            tag = f"{version}/{uid}/{identity}"
            stale_tags[tag] = stale_tags.get(tag, 0) + 1
        if not dry_run:
            try:
                for tag in stale_tags:
                    cache.evict(tag, retry=True)
                for key in stale_keys:
                    cache.delete(key, retry=True)
            except (OSError, sqlite3.Error) as exc:
                raise self._write_error(exc) from None
        orphans, lost = self._check_files(fix=not dry_run)
        return PruneResult(kept, old_format, changed, missing, foreign, orphans, lost)

    def _check_files(self, fix: bool) -> tuple[int, int]:
        """(orphan value files, entries without their file), deleting both when `fix`.

        A process killed after writing a value file but before its index row leaves an orphan that
        nothing reads and nothing frees; diskcache's consistency check finds (and with `fix`
        removes) such files and rows whose file is gone, under a writer lock per shard.
        """
        import warnings

        from diskcache.core import UnknownFileWarning

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")  # check() records its findings as warnings; count them all
                found = self.diskcache.check(fix=fix, retry=True)
        except (OSError, sqlite3.Error) as exc:
            raise self._write_error(exc) from None
        orphans = sum(1 for w in found if issubclass(w.category, UnknownFileWarning))
        lost = sum(1 for w in found if str(w.message).startswith("file not found"))
        if orphans or lost:
            log.info(
                "cache %s: %s %d orphan value files and %d entries without their file",
                self.cache_dir,
                "removed" if fix else "found",
                orphans,
                lost,
            )
        return orphans, lost


def _contains(cache: FanoutCache, key: str) -> bool:
    """`key in cache`, retried while SQLite is busy (diskcache's `__contains__` has no retry)."""
    for attempt in range(100):
        try:
            return key in cache
        except sqlite3.OperationalError:
            if attempt == 99:
                raise
            time.sleep(0.01)
    raise AssertionError("unreachable")


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


_DEFAULT_CACHES: dict[tuple[str, str], ChunkCache] = {}


def default_cache(
    cache_dir: str | os.PathLike[str] | None = None, data_root: str | os.PathLike[str] | None = None
) -> ChunkCache:
    """The process's shared ChunkCache for these paths (resolved now: argument > env > default)."""
    key = (os.path.abspath(resolve_cache_dir(cache_dir)), os.path.abspath(resolve_data_root(data_root)))
    cache = _DEFAULT_CACHES.get(key)
    if cache is None:
        cache = _DEFAULT_CACHES[key] = ChunkCache(*key)
    return cache


def get_ct_raw_candidate(
    series_uid: str,
    center_xyz: Sequence[float],
    width_irc: Sequence[int] = DEFAULT_WIDTH_IRC,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, IrcTuple]:
    """The book's `getCtRawCandidate`: `(chunk, center_irc)` through the default `ChunkCache`.

    center_xyz: 3 floats, mm. Returns chunk `width_irc` int16 HU and center_irc an IrcTuple.
    """
    return default_cache(cache_dir, data_root).get_ct_raw_candidate(series_uid, center_xyz, width_irc)
