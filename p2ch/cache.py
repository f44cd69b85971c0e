"""On-disk chunk cache: int16 candidate chunks in a `p2ch.store.ByteStore`, keyed so they never go stale.

Cropping a chunk means loading its whole CT (about a second and 150 MB), so training reads
chunks from this cache; `python -m p2ch.prepcache` fills it ahead of time (`p2ch.prefill`), and
a miss is computed and stored on the spot.

This module owns what is stored: the chunk codec, the keys and what makes them stale, cropping
on a miss. `p2ch.store` owns how bytes are kept (diskcache, layout file, per-process opening and
fork safety, busy retries, disk-full and folder errors, orphan files); see its docstring.

What the book's cache got wrong, and what this one does instead:

- Values are int16 HU (the CT's own type), half the bytes of the book's float32.
- No pickle. A value is `bytes`: a fixed 36-byte little-endian header (see `HEADER`: magic,
  format version, flags, shape, center_irc, payload length, CRC-32 of the payload) and the raw
  C-order int16 voxels. `ChunkDisk`, the store's serialiser for this record format, accepts
  nothing else, and hands back any entry it did not write itself (a pickled value, a foreign
  key) as an opaque marker, so nothing read from the cache directory is ever unpickled. The
  header lives in the SQLite row and the voxels in the value file, which is then exactly
  32·48·48·2 bytes = 36 pages of 4 KiB, so on disk a chunk takes half of what the book's
  pickled float32 chunk takes.
- Keys name everything that determines the value: the cache format version, the crop width,
  the series_uid, the identity of the source CT (size and mtime_ns of its .mhd and .raw) and the
  candidate centre rounded to 1 µm (so float noise in the CSV round trip does not miss):
  `p2ch-chunk/v1/32x48x48/<series_uid>/<mhd size>.<mhd mtime>.<raw size>.<raw mtime>/<x>,<y>,<z>`
  with the sizes and mtimes in hex and the centre in integer µm. Replaced or regenerated CT
  files, or a format change, give new keys, so stale values are never served; `ChunkCache.prune()`
  deletes the old ones. Each entry is tagged `v<version>/<series_uid>/<identity>` so a changed
  CT's entries go in a few batched deletes. Identity is by size and mtime, not inode, so a data
  set and its cache copied together with `rsync -a` / `cp -p` stay valid.
- Damaged entries (bad header, wrong length, CRC mismatch, missing value file, foreign value)
  are detected on read, logged once, deleted and recomputed (`stats()["corrupt"]`).

Two writers of the same key both `add` it; the first commit wins and the second writer's file
is removed.

Caching in memory, per process: the identity of each series' CT files is stat-ed once per
`ChunkCache` per process (two stats and a header parse per read would cost about half a warm
read); call `ChunkCache.refresh()` after replacing CT files in a long-running process (new
processes, e.g. DataLoader workers of the next run, see the change anyway). CTs loaded on a miss
are kept in a small LRU keyed by series and file identity (`ct_cache_size`, default 1), never
`p2ch.ct.get_ct`'s, which cannot tell a CT loaded before its files were replaced from one loaded
after.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from diskcache import FanoutCache

from p2ch.config import CACHE_DIR_ENV, resolve_cache_dir, resolve_data_root
from p2ch.ct import Ct, clear_caches, read_mhd_header
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError, P2chError
from p2ch.geometry import DEFAULT_WIDTH_IRC, IrcTuple, check_width_irc
from p2ch.luna import check_series_uid, find_mhd, no_data_message, series_index
from p2ch.store import (
    DEFAULT_SHARDS,
    DEFAULT_TIMEOUT_S,
    FOREIGN_KEY,
    LAYOUT_FILE,
    ByteStore,
    CacheDirError,
    CacheError,
    CacheFullError,
    DamagedRecord,
    Record,
    RecordDisk,
    RecordFormat,
    StoreKind,
)

__all__ = [
    "BOOK_CHUNK_BYTES",
    "CACHE_FORMAT_VERSION",
    "CHUNK_RECORD",
    "CHUNK_STORE",
    "DEFAULT_SHARDS",
    "DEFAULT_TIMEOUT_S",
    "FLAG_ZLIB",
    "HEADER",
    "KEY_PREFIX",
    "LAYOUT_FILE",
    "LAYOUT_FORMAT",
    "MAGIC",
    "CacheDirError",
    "CacheError",
    "CacheFullError",
    "ChunkCache",
    "ChunkDisk",
    "FillResult",
    "PruneResult",
    "decode_chunk",
    "default_cache",
    "encode_chunk",
    "get_ct_raw_candidate",
    "source_identity",
]

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
# The book's chunk: 32*48*48 float32 values. Used to report sizes against it.
BOOK_CHUNK_BYTES = 32 * 48 * 48 * 4

CHUNK_RECORD = RecordFormat(magic=MAGIC, header_size=HEADER.size, noun="encoded chunk", encoder="encode_chunk")
CHUNK_STORE = StoreKind(
    label="chunk cache",
    source="p2ch/cache.py",
    dir_option="--cache-dir",
    dir_env=CACHE_DIR_ENV,
    full_advice="free some space, delete old entries (python -m p2ch.prepcache --prune, or --clear), or "
    f"point --cache-dir / {CACHE_DIR_ENV} at a bigger disk (all of LUNA16 takes about 81 GB)",
)
LAYOUT_FORMAT = CHUNK_STORE.layout_format  # "p2ch chunk cache", in p2ch-cache.json


class ChunkDisk(RecordDisk):
    """The store's serialiser for encoded chunks: `HEADER` in the SQLite row, the voxels in the value file."""

    record = CHUNK_RECORD


# --- the chunk codec ---------------------------------------------------------------------------


def encode_chunk(chunk: np.ndarray, center_irc: Sequence[int], compress_level: int = 0) -> bytes:
    """Encode one chunk as a cache value.

    chunk: (I, R, C) int16 HU. center_irc: 3 ints, the candidate's voxel. compress_level: 0 for
    raw voxels, 1-9 for zlib (smaller on disk, far slower to read; see BENCHMARKS.md).
    Returns `HEADER` + payload as bytes.
    """
    chunk = np.asarray(chunk)
    # Chunks come from Ct crops of a checked width (check_width_irc): an internal invariant, not input.
    assert chunk.dtype == np.int16 and chunk.ndim == 3, f"expected a 3-D int16 chunk, got {chunk.dtype} {chunk.shape}"
    assert max(chunk.shape) <= 0xFFFF, f"chunk shape {chunk.shape} too large for the header"
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


def _parse_header(header: bytes, width: tuple[int, ...] | None):
    if len(header) != HEADER.size:
        raise DamagedRecord(f"header is {len(header)} bytes, expected {HEADER.size}")
    magic, version, flags, i, r, c, _, ci, cr, cc, length, crc = HEADER.unpack(header)
    if magic != MAGIC:
        raise DamagedRecord(f"bad magic {magic!r}")
    if version != CACHE_FORMAT_VERSION:
        raise DamagedRecord(f"format version {version}, expected {CACHE_FORMAT_VERSION}")
    if flags & ~FLAG_ZLIB:
        raise DamagedRecord(f"unknown flags {flags:#x}")
    shape = (i, r, c)
    if width is not None and shape != width:
        raise DamagedRecord(f"shape {shape}, expected {width}")
    if not flags and length != 2 * i * r * c:
        raise DamagedRecord(f"payload length {length} does not match shape {shape}")
    return flags, shape, IrcTuple(ci, cr, cc), length, crc


def _decode_payload(flags: int, shape, payload, crc: int, verify: bool) -> np.ndarray:
    if verify and zlib.crc32(payload) != crc:
        raise DamagedRecord("CRC-32 mismatch")
    if flags & FLAG_ZLIB:
        try:
            raw = zlib.decompress(payload)
        except zlib.error as exc:
            raise DamagedRecord(f"zlib: {exc}") from None
        if len(raw) != 2 * shape[0] * shape[1] * shape[2]:
            raise DamagedRecord(f"decompressed {len(raw)} bytes for shape {shape}")
        return np.frombuffer(raw, dtype=np.int16).reshape(shape).copy()
    return np.frombuffer(payload, dtype=np.int16).reshape(shape)


def decode_chunk(value: bytes, width_irc: Sequence[int] | None = None, verify: bool = True):
    """Decode `encode_chunk` output: `(chunk, center_irc)`, chunk (I, R, C) int16 HU (read-only view
    of `value` when uncompressed), center_irc an IrcTuple. Raises DataFormatError for a damaged value.
    """
    width = None if width_irc is None else tuple(int(v) for v in width_irc)
    try:
        if type(value) is not bytes:
            raise DamagedRecord(f"value is {type(value).__name__}, not bytes")
        flags, shape, center_irc, length, crc = _parse_header(value[: HEADER.size], width)
        payload = memoryview(value)[HEADER.size :]
        if len(payload) != length:
            raise DamagedRecord(f"payload is {len(payload)} bytes, header says {length}")
        return _decode_payload(flags, shape, payload, crc, verify), center_irc
    except DamagedRecord as exc:
        raise DataFormatError(f"damaged chunk cache value: {exc}") from None


def _read_chunk(
    record: Record, width: tuple[int, ...], verify: bool, out: np.ndarray | None = None
) -> tuple[np.ndarray, IrcTuple]:
    """Decode a stored record: chunk (I, R, C) int16 HU and center_irc.

    out: None for a fresh chunk (writable, owns its memory), or a checked `width` int16 C-order
    writable array to decode into (returned as the chunk). On DamagedRecord, `out` holds garbage.
    """
    with record.file as file:
        flags, shape, center_irc, length, crc = _parse_header(record.header, width)
        size = record.size()
        if size != length:
            raise DamagedRecord(f"value file is {size} bytes, header says {length}")
        if flags:
            payload = file.read()
            if len(payload) != length:
                raise DamagedRecord(f"read {len(payload)} of {length} bytes")
            chunk = _decode_payload(flags, shape, payload, crc, verify)
            if out is None:
                return chunk, center_irc
            np.copyto(out, chunk)
            return out, center_irc
        # Read straight into the destination (a fresh array, or the caller's batch slot): no extra copy.
        chunk = np.empty(shape, dtype=np.int16) if out is None else out
        view = memoryview(chunk).cast("B")
        record.read_exact(view)
        if verify and zlib.crc32(view) != crc:
            raise DamagedRecord("CRC-32 mismatch")
        return chunk, center_irc


def _check_out(out: Any, width: tuple[int, ...]) -> None:
    """ConfigError unless `out` is None or can take a chunk of `width`: an int16, C-order, writable ndarray."""
    if out is not None and (
        not isinstance(out, np.ndarray)
        or out.dtype != np.int16
        or out.shape != width
        or not (out.flags.c_contiguous and out.flags.writeable)
    ):
        got = (
            f"{out.dtype} array of shape {out.shape}"
            + ("" if out.flags.c_contiguous else ", not C-contiguous")
            + ("" if out.flags.writeable else ", read-only")
            if isinstance(out, np.ndarray)
            else type(out).__name__
        )
        raise ConfigError(
            f"out: expected a writable C-contiguous int16 array of shape {width} (the chunk width), got {got}"
        )


# --- keys ---------------------------------------------------------------------------------------


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


class _Sources:
    """What one process knows about the CT files behind the keys: identities, key prefixes, loaded CTs."""

    def __init__(self, data_root: Path, ct_cache_size: int):
        self.data_root = data_root
        self.ct_cache_size = ct_cache_size
        self.prefixes: dict[tuple[str, tuple[int, ...]], tuple[str, str]] = {}
        self.identities: dict[str, str] = {}
        self.cts: collections.OrderedDict[tuple[str, str], Ct] = collections.OrderedDict()
        self.lock = threading.Lock()

    def prefix(self, series_uid: str, width: tuple[int, ...]) -> tuple[str, str]:
        """(key prefix, tag) of one series' chunks of one width, as of the identity last seen."""
        found = self.prefixes.get((series_uid, width))
        if found is None:
            check_series_uid(series_uid)
            width = check_width_irc(width)
            identity = self.identities.get(series_uid)
            if identity is None:
                identity = self.identities[series_uid] = source_identity(series_uid, self.data_root)
            found = (
                f"{KEY_PREFIX}/v{CACHE_FORMAT_VERSION}/{width[0]}x{width[1]}x{width[2]}/{series_uid}/{identity}/",
                f"v{CACHE_FORMAT_VERSION}/{series_uid}/{identity}",
            )
            self.prefixes[(series_uid, width)] = found
        return found

    def load(self, series_uid: str) -> tuple[Ct, str]:
        """Load a CT and the identity of the files it was read from (re-stat-ed around the read)."""
        for _ in range(3):
            before = source_identity(series_uid, self.data_root)
            ct = Ct(series_uid, self.data_root)
            after = source_identity(series_uid, self.data_root)
            if before == after:
                if self.identities.get(series_uid) != after:
                    self.identities[series_uid] = after
                    for k in [k for k in self.prefixes if k[0] == series_uid]:
                        del self.prefixes[k]
                return ct, after
        raise DataFormatError(
            f"CT {series_uid} under {self.data_root} keeps changing while being read; "
            "wait until it is completely written, then retry"
        )

    def ct(self, series_uid: str) -> tuple[Ct, str]:
        """A CT from the small in-memory LRU (by series and file identity), loading it if needed."""
        with self.lock:
            identity = self.identities.get(series_uid)
            if identity is not None:
                ct = self.cts.get((series_uid, identity))
                if ct is not None:
                    self.cts.move_to_end((series_uid, identity))
                    return ct, identity
            ct, identity = self.load(series_uid)
            if self.ct_cache_size:
                self.cts[(series_uid, identity)] = ct
                while len(self.cts) > self.ct_cache_size:
                    self.cts.popitem(last=False)
            return ct, identity

    def forget(self) -> None:
        with self.lock:
            self.prefixes.clear()
            self.identities.clear()
            self.cts.clear()


# --- results ------------------------------------------------------------------------------------


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


@dataclasses.dataclass
class _Census:
    """Every key of a cache sorted by whether it can still be read (for `prune`)."""

    kept: int = 0
    old_format: int = 0
    changed_ct: int = 0
    missing_ct: int = 0
    foreign: int = 0
    stale_tags: set[str] = dataclasses.field(default_factory=set)
    stale_keys: list[str] = dataclasses.field(default_factory=list)


def _take_census(keys: Iterable[Any], data_root: Path, on_disk: dict[str, Path]) -> _Census:
    census = _Census()
    current: dict[str, str | None] = {}
    version = f"v{CACHE_FORMAT_VERSION}"
    for key in keys:
        if key is FOREIGN_KEY or type(key) is not str:
            census.foreign += 1
            continue
        parts = key.split("/")
        if len(parts) != 6 or parts[0] != KEY_PREFIX or parts[1] != version:
            census.stale_keys.append(key)
            census.old_format += 1
            continue
        uid, identity = parts[3], parts[4]
        if uid not in current:
            current[uid] = source_identity(uid, data_root) if uid in on_disk else None
        if current[uid] == identity:
            census.kept += 1
            continue
        if current[uid] is None:
            census.missing_ct += 1
        else:
            census.changed_ct += 1
        census.stale_tags.add(f"{version}/{uid}/{identity}")
    return census


class _Counters:
    """One process's cache counters (see `as_dict`), and the once-only warning about damaged entries."""

    def __init__(self):
        self.hits = self.misses = self.corrupt = self.written = 0
        self._corrupt_logged = False

    def as_dict(self) -> dict[str, float]:
        """hits, misses, corrupt, written, and hit_rate = hits / (hits + misses) (0.0 before any lookup)."""
        lookups = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "corrupt": self.corrupt,
            "written": self.written,
            "hit_rate": self.hits / lookups if lookups else 0.0,
        }

    def note_corrupt(self, cache_dir: Path, key: str, exc: BaseException | str) -> None:
        self.corrupt += 1
        if not self._corrupt_logged:
            self._corrupt_logged = True
            log.warning(
                "damaged entry in chunk cache %s (%s: %s); replacing it with a fresh crop "
                "(further damaged entries are logged at debug level)",
                cache_dir,
                key,
                exc,
            )
        else:
            log.debug("damaged entry %s (%s); recomputing", key, exc)


def _check_settings(shards: int, compress_level: int, ct_cache_size: int) -> None:
    if not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"shards {shards!r}: expected a positive integer (diskcache's default is 8)")
    if not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
        raise ConfigError(f"compress_level {compress_level!r}: expected 0 (off) or a zlib level 1-9")
    if not isinstance(ct_cache_size, int) or ct_cache_size < 0:
        raise ConfigError(f"ct_cache_size {ct_cache_size!r}: expected an integer ≥ 0")


def _first_rows(keys: list[str]) -> list[int]:
    """Rows of the first occurrence of each key, ascending: duplicate centres (same µm) are one chunk."""
    first_row: dict[str, int] = {}
    for row, key in enumerate(keys):
        first_row.setdefault(key, row)
    return sorted(first_row.values())


def _prune(store: ByteStore, data_root: Path, dry_run: bool) -> PruneResult:
    """`ChunkCache.prune` of the chunk store `store` against the CTs under `data_root`."""
    if not store.exists():
        return PruneResult(0, 0, 0, 0, 0)
    on_disk = series_index(data_root)
    if not on_disk:
        raise DataNotFoundError(no_data_message(data_root) + "; refusing to prune against it")
    census = _take_census(store.keys(), data_root, on_disk)
    if not dry_run:
        store.evict(sorted(census.stale_tags))
        store.delete(census.stale_keys)
    orphans, lost = store.check_files(fix=not dry_run)
    return PruneResult(
        census.kept, census.old_format, census.changed_ct, census.missing_ct, census.foreign, orphans, lost
    )


# --- the cache ----------------------------------------------------------------------------------


class ChunkCache:
    """Cropped candidate chunks on disk, computed from the CTs on a miss.

    cache_dir: folder of the store (default `resolve_cache_dir()`: $P2CH_CACHE_DIR, else
    `data-unversioned/cache`). data_root: LUNA16 root (default `resolve_data_root()`). Both are
    made absolute here, so a pickled cache works in a process with another working directory.
    shards: FanoutCache shards for a new cache (an existing cache keeps its own count).
    timeout_s: SQLite busy timeout. compress_level: 0 (raw int16, default) or a zlib level for
    new entries (reads handle both). verify: check each value's CRC-32 on read (about 20 µs).
    ct_cache_size: CTs kept in memory per process for misses.

    Picklable: holds paths and settings, and per process what it learnt about the CT files and
    its counters (both start afresh in a new process).
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
        _check_settings(shards, compress_level, ct_cache_size)
        self.cache_dir = resolve_cache_dir(cache_dir).absolute()
        self.data_root = resolve_data_root(data_root).absolute()
        self.compress_level = compress_level
        self.verify = bool(verify)
        self.ct_cache_size = ct_cache_size
        self.store = ByteStore(self.cache_dir, ChunkDisk, CHUNK_STORE, shards=shards, timeout_s=timeout_s)
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._sources = _Sources(self.data_root, self.ct_cache_size)
        self.reset_stats()

    def __getstate__(self) -> dict[str, Any]:
        keep = ("cache_dir", "data_root", "compress_level", "verify", "ct_cache_size", "store")
        return {name: getattr(self, name) for name in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def __repr__(self) -> str:
        return f"ChunkCache({str(self.cache_dir)!r}, data_root={str(self.data_root)!r})"

    @property
    def diskcache(self) -> FanoutCache:
        """This process's FanoutCache (opened on first use, reopened after a fork)."""
        return self.store.diskcache

    def exists(self) -> bool:
        """True when the cache directory already holds a cache (checking creates nothing)."""
        return self.store.exists()

    def close(self) -> None:
        """Close this process's SQLite connections (reopened on next use)."""
        self.store.close()

    def refresh(self) -> None:
        """Forget what this process remembers about CT files (identities, loaded CTs, series index).

        Call after replacing or adding CT files while this process keeps running.
        """
        self._sources.forget()
        clear_caches()

    def reset_stats(self) -> None:
        """Zero this process's counters."""
        self._counts = _Counters()

    def stats(self) -> dict[str, float]:
        """Counters of this process since creation or `reset_stats()`: hits, misses (a damaged entry
        counts as one too), corrupt (damaged entries found and replaced), written, hit_rate.
        """
        return self._counts.as_dict()

    def _sources_here(self) -> _Sources:
        """This process's `_Sources` (after a fork, a fresh one and fresh counters)."""
        if self._pid != os.getpid():
            self._init_process_state()
        return self._sources

    def key(self, series_uid: str, center_xyz: Sequence[float], width_irc: Sequence[int] = DEFAULT_WIDTH_IRC) -> str:
        """The cache key of one chunk (see the module docstring for its parts)."""
        width = width_irc if type(width_irc) is tuple else tuple(width_irc)
        return self._sources_here().prefix(series_uid, width)[0] + _center_key(center_xyz)

    # --- reading -------------------------------------------------------------------------------

    def _lookup(
        self, key: str, width: tuple[int, ...], out: np.ndarray | None = None
    ) -> tuple[np.ndarray, IrcTuple] | None:
        try:
            record = self.store.get(key)
            return None if record is None else _read_chunk(record, width, self.verify, out)
        except (DamagedRecord, OSError) as exc:
            self._counts.note_corrupt(self.cache_dir, key, exc)
            self.store.delete([key])
            return None

    def get_cached(
        self, series_uid: str, center_xyz: Sequence[float], width_irc: Sequence[int] = DEFAULT_WIDTH_IRC
    ) -> tuple[np.ndarray, IrcTuple] | None:
        """The cached `(chunk, center_irc)` or None; never computes or stores anything."""
        width = width_irc if type(width_irc) is tuple else tuple(width_irc)
        return self._lookup(self._sources_here().prefix(series_uid, width)[0] + _center_key(center_xyz), width)

    def get_ct_raw_candidate(
        self,
        series_uid: str,
        center_xyz: Sequence[float],
        width_irc: Sequence[int] = DEFAULT_WIDTH_IRC,
        *,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, IrcTuple]:
        """The chunk around `center_xyz` of CT `series_uid`, from the cache or computed and stored.

        center_xyz: 3 floats, mm (x, y, z). width_irc: 3 ints (index, row, col). out: None, or a
        writable C-order int16 array of shape `width_irc` (a batch slot) to read the chunk into.
        Returns `(chunk, center_irc)`: chunk `width_irc` int16 HU (writable; `out` when given),
        center_irc an IrcTuple. Same values as `Ct.get_raw_candidate`. Raises DataNotFoundError
        for an unknown series, CandidateOutsideCtError for a centre outside the CT, CacheFullError
        / CacheDirError when the cache cannot be written, ConfigError for a bad `out`.
        """
        sources = self._sources_here()
        width = width_irc if type(width_irc) is tuple else tuple(width_irc)
        key = sources.prefix(series_uid, width)[0] + _center_key(center_xyz)
        _check_out(out, width)
        found = self._lookup(key, width, out)
        if found is not None:
            self._counts.hits += 1
            return found
        self._counts.misses += 1
        width = check_width_irc(width)  # (a prefix found for an equal width, e.g. 32.0, skipped this)
        ct, _ = sources.ct(series_uid)
        chunk, center_irc = ct.get_raw_candidate(center_xyz, width)
        prefix, tag = sources.prefix(series_uid, width)  # the identity may have been refreshed by the load
        self._store(prefix + _center_key(center_xyz), encode_chunk(chunk, center_irc, self.compress_level), tag, width)
        if out is None:
            return chunk, center_irc
        np.copyto(out, chunk)
        return out, center_irc

    # --- writing -------------------------------------------------------------------------------

    def _store(self, key: str, value: bytes, tag: str, width: tuple[int, ...]) -> bool:
        """Add `value` under `key` unless present; repair a row whose value is unreadable."""
        if self.store.add(key, value, tag):
            self._counts.written += 1
            return True
        # Present: stored meanwhile by another writer (fine), or a row whose value is unreadable.
        problem: BaseException | str = "its value file is missing"
        try:
            record = self.store.get(key)
            if record is not None:
                _read_chunk(record, width, self.verify)
                return False
        except (DamagedRecord, OSError) as exc:
            problem = exc
        self._counts.note_corrupt(self.cache_dir, key, problem)
        self.store.set(key, value, tag)
        self._counts.written += 1
        return True

    def missing(self, series_uid: str, centers_xyz, width_irc: Sequence[int] = DEFAULT_WIDTH_IRC) -> np.ndarray:
        """Which of these chunks are not cached yet: (N,) bool, for centers_xyz (N, 3) float mm.

        Reads nothing but the index (the CT's keys, one range query per shard); creates nothing.
        """
        centers = np.asarray(centers_xyz, dtype=np.float64).reshape(-1, 3)
        if not self.exists():
            return np.ones(len(centers), dtype=bool)
        prefix = self._sources_here().prefix(series_uid, tuple(width_irc))[0]
        present = self.store.keys_with_prefix(prefix)
        return np.array([prefix + _center_key(c) not in present for c in centers.tolist()], dtype=bool)

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
        width = check_width_irc(width_irc)
        centers = np.asarray(centers_xyz, dtype=np.float64).reshape(-1, 3)
        sources = self._sources_here()
        prefix = sources.prefix(series_uid, width)[0]
        keys = [prefix + _center_key(c) for c in centers.tolist()]
        first = _first_rows(keys)
        todo = np.array([row for row in first if not self.store.contains(keys[row])], dtype=np.int64)
        present = len(first) - len(todo)
        if len(todo) == 0:
            return FillResult(series_uid, 0, present, 0, 0)
        ct, _ = sources.load(series_uid)
        prefix, tag = sources.prefix(series_uid, width)  # identity as of the load
        keys = [prefix + _center_key(c) for c in centers.tolist()]
        _, inside = ct.locate(centers[todo])
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
                if self._store(keys[row], encode_chunk(chunk, center_irc, self.compress_level), tag, width):
                    written += 1
                else:
                    present += 1
        return FillResult(series_uid, written, present, outside, _raw_bytes(ct))

    # --- maintenance ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.store)

    def volume(self) -> int:
        """Bytes on disk: SQLite files plus value files (0 when there is no cache yet)."""
        return self.store.volume()

    def clear(self) -> int:
        """Delete every entry; returns how many. Only diskcache's own files are removed."""
        if not self.exists():
            return 0
        removed = self.store.clear()
        self.refresh()
        return removed

    def prune(self, dry_run: bool = False) -> PruneResult:
        """Delete entries that can never be read again: another format version, or a CT whose files
        changed or are no longer under the data root; and value files no entry names (killed
        writers). Entries of other widths stay.

        Raises DataNotFoundError when the data root holds no CT at all (rather than deleting everything).
        """
        return _prune(self.store, self.data_root, dry_run)


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
