"""A byte store on disk: records of header + payload bytes in a diskcache `FanoutCache`, never pickled.

The store knows nothing about what it holds. Its user (`p2ch.cache` for candidate chunks; next,
segmentation's CT slices and masks) encodes and decodes the values and tells the store two things:

- `RecordFormat` (on a `RecordDisk` subclass): the fixed header size and the magic bytes every
  header starts with. A record is `bytes` = header + payload. The header goes into the SQLite
  row (diskcache's value column), the payload into the value file, so the file holds exactly the
  payload (a 32x48x48 int16 chunk is 36 pages of 4 KiB). The store checks only the header's size
  and magic; everything after the magic (version, shape, lengths, CRC) is the user's. Reading
  hands back a `Record`: the header bytes and the value file open unbuffered, so the user reads
  the payload straight into its own array.
- `StoreKind`: what the store is called in messages and in its layout file, and how a user
  points it at another folder.

No pickle, either way: `RecordDisk` refuses to store anything but `bytes` that start with the
magic, and keys must be `str`. An entry it did not write itself (a pickled value or key, left
by stock diskcache in the same folder) comes back as an opaque marker, never unpickled: reading
it raises `DamagedRecord`, iterating the keys yields `FOREIGN_KEY` for it.

Layout: the folder holds diskcache's shards `000/`, `001/`, … and `p2ch-cache.json`, which
records the shard count. The first process to create the store writes it atomically and every
other process reads it, because a key's shard depends on that count. Value files sit in 256
folders per shard (diskcache's default would make about one folder per record at LUNA16's size).

Concurrency: diskcache writes a value's file completely before it commits the SQLite row that
names it, and a reader only finds files through committed rows, so a reader never sees a
half-written value, whether the writer is alive, crashed or was SIGKILLed (a killed writer can
leave an orphan file that no row names; it is never read, and `check_files` removes it). Every
diskcache call passes `retry=True`: without it diskcache drops writes and turns reads into
misses whenever SQLite is busy.

Processes: a `ByteStore` holds only paths and settings. It opens its `FanoutCache` lazily in
each process and reopens it when it finds itself in a new process (it remembers the pid), so it
can be pickled to spawned DataLoader workers or inherited by forked ones. diskcache 5 also checks
the pid and reconnects after a fork, but by closing the inherited SQLite connection in the
child; we never touch inherited handles at all (they are parked in `_INHERITED`, never used or
closed), following SQLite's rule not to use a connection across fork().

Errors: an unusable folder raises `CacheDirError`, a full disk `CacheFullError` (both
`CacheError`, a `P2chError`), each naming the folder and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import sqlite3
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from diskcache import UNKNOWN, Disk, FanoutCache
from diskcache.core import MODE_BINARY, UnknownFileWarning

from p2ch.errors import P2chError

log = logging.getLogger(__name__)

DEFAULT_SHARDS = 8
DEFAULT_TIMEOUT_S = 5.0
LAYOUT_FILE = "p2ch-cache.json"
_MAX_SIZE_LIMIT = 2**62

# FanoutCache objects inherited through fork(): kept referenced (so the child never closes the
# parent's SQLite connections by garbage-collecting them) and never used.
_INHERITED: list[FanoutCache] = []


class CacheError(P2chError):
    """An on-disk store (the chunk cache, …) cannot be used (base class)."""


class CacheDirError(CacheError):
    """The store's directory cannot be created, opened or written."""


class CacheFullError(CacheError):
    """The disk holding the store is full (or would be)."""


class DamagedRecord(Exception):
    """A stored record failed validation (internal: its user deletes and recomputes it)."""


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """What every record of a store starts with: `magic`, within a header of `header_size` bytes.

    noun: what a record is called in errors, e.g. "encoded chunk"; encoder: the function that
    makes one, e.g. "encode_chunk".
    """

    magic: bytes
    header_size: int
    noun: str
    encoder: str


@dataclasses.dataclass(frozen=True)
class StoreKind:
    """How a store is named in messages and its layout file, and how a user moves it elsewhere.

    label: e.g. "chunk cache". source: the module that owns the records (named in the layout
    file). dir_option / dir_env: the CLI flag and environment variable that choose the folder.
    full_advice: what to do when its disk is full (a whole clause).
    """

    label: str
    source: str
    dir_option: str
    dir_env: str
    full_advice: str

    @property
    def layout_format(self) -> str:
        """The layout file's "format" value, e.g. "p2ch chunk cache"."""
        return f"p2ch {self.label}"


class _Rejected:
    """What `RecordDisk.fetch` returns for an entry it did not write: never deserialised."""

    __slots__ = ("mode",)

    def __init__(self, mode: int):
        self.mode = mode

    def __repr__(self) -> str:
        return f"<entry not written by p2ch.store, diskcache mode {self.mode}>"


class _ForeignKey:
    """What `RecordDisk.get` returns for a pickled key: never unpickled."""

    def __repr__(self) -> str:
        return "<pickled key, not read>"


FOREIGN_KEY = _ForeignKey()


class Record:
    """One stored record as read: its header bytes and its value file (the payload), open unbuffered.

    Use `with record.file:` (or `close()`); `size()` is the payload's length in bytes.
    """

    __slots__ = ("file", "header")

    def __init__(self, header: bytes, file: io.RawIOBase):
        self.header = header
        self.file = file

    def size(self) -> int:
        return os.fstat(self.file.fileno()).st_size

    def read_exact(self, view: memoryview) -> None:
        """Fill `view` (a writable byte view) from the value file, or raise DamagedRecord."""
        got, length = 0, len(view)
        while got < length:
            n = self.file.readinto(view[got:])
            if not n:
                raise DamagedRecord(f"read {got} of {length} bytes")
            got += n

    def close(self) -> None:
        self.file.close()


class RecordDisk(Disk):
    """diskcache serialiser for one `RecordFormat`: stores only header + payload `bytes`, never unpickles.

    Subclass it with `record = RecordFormat(...)` for each kind of record. Keys must be `str`.
    """

    record: ClassVar[RecordFormat]

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"p2ch.store keys are str, got {type(key).__name__}")
        return key, True

    def get(self, key, raw):
        # A key stored pickled was not written by us: do not unpickle it.
        return key if raw else FOREIGN_KEY

    def store(self, value, read, key=UNKNOWN):
        fmt = self.record
        if read or type(value) is not bytes:
            raise TypeError(f"p2ch.store stores only {fmt.noun} bytes ({fmt.encoder}), got {type(value).__name__}")
        if len(value) < fmt.header_size or not value.startswith(fmt.magic):
            article = "an" if fmt.noun[:1] in "aeiou" else "a"
            raise ValueError(f"not {article} {fmt.noun}: no {fmt.magic!r} header")
        filename, full_path = self.filename(key, value)
        payload = memoryview(value)[fmt.header_size :]
        self._write(full_path, (payload,), "xb")
        return len(payload), MODE_BINARY, filename, sqlite3.Binary(value[: fmt.header_size])

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
            return Record(bytes(value), open(full_path, "rb", buffering=0))
        with open(full_path, "rb") as reader:
            return bytes(value) + reader.read()


def is_disk_full(exc: BaseException) -> bool:
    """True for an error that means "no space left" (ENOSPC, EDQUOT, SQLITE_FULL)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


def free_bytes(path: Path) -> int | None:
    """Free bytes on the disk that holds (or will hold) `path`; None when unknown."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _retry_locked(call, deadline_s: float, on_error):
    """`call()`, retried while SQLite says "locked" (up to `deadline_s`); other errors → `on_error(exc)`."""
    deadline = time.monotonic() + deadline_s
    delay = 0.001
    while True:
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise on_error(exc) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        except (OSError, sqlite3.Error) as exc:
            raise on_error(exc) from None


class _Layout:
    """The layout file `p2ch-cache.json` of one store folder: its shard count, written once, atomically."""

    def __init__(self, directory: Path, kind: StoreKind, errors: ByteStore):
        self.directory = directory
        self.kind = kind
        self.path = directory / LAYOUT_FILE
        self._errors = errors

    def read(self) -> int | None:
        """Shard count from the layout file; None when there is no store yet."""
        for attempt in range(40):
            try:
                layout = json.loads(self.path.read_text(encoding="utf-8"))
                shards = layout["shards"]
                if layout.get("format") == self.kind.layout_format and isinstance(shards, int) and shards > 0:
                    return shards
                problem = f"unexpected content {layout!r}"
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise self._errors.dir_error(exc) from None
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                problem = str(exc)
                # Maybe being written right now by another process (the non-atomic fallback).
                with contextlib.suppress(OSError):
                    if attempt < 39 and time.time() - self.path.stat().st_mtime < 2.0:
                        time.sleep(0.05)
                        continue
            break
        raise CacheDirError(
            f"{self.path}: not a {self.kind.layout_format} layout file ({problem}); delete the folder "
            f"{self.directory} (it is only a cache) or choose another {self.kind.dir_option}"
        )

    def shards(self, wanted: int) -> int:
        """The store's shard count, creating the layout file with `wanted` if there is none.

        Every process must use the same count (a key's shard depends on it), so the first process
        to create the store records it, atomically, and the others read it.
        """
        shards = self.read()
        if shards is not None:
            if shards != wanted:
                log.debug("%s has %d shards (asked for %d); using %d", self.directory, shards, wanted, shards)
            return shards
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._create(wanted)
        except OSError as exc:
            raise self._errors.dir_error(exc) from None
        shards = self.read()
        if shards is None:
            raise CacheDirError(f"{self.path} vanished while the cache was being created; retry")
        return shards

    def _create(self, shards: int) -> None:
        kind = self.kind
        text = json.dumps(
            {
                "format": kind.layout_format,
                "shards": shards,
                "note": f"{kind.layout_format} (safe to delete); see {kind.source}",
            }
        )
        tmp = self.directory / f".{LAYOUT_FILE}.{os.getpid()}.{os.urandom(4).hex()}"
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, self.path)  # atomic; fails if another process was first
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            with contextlib.suppress(FileExistsError), open(self.path, "x", encoding="utf-8") as f:
                f.write(text)
        finally:
            tmp.unlink(missing_ok=True)


class ByteStore:
    """Records (header + payload bytes) under `str` keys in the folder `directory`, one FanoutCache.

    disk: the `RecordDisk` subclass naming the record format. kind: names and advice for
    messages. shards: FanoutCache shards for a new store (an existing one keeps its own count).
    timeout_s: SQLite busy timeout. Picklable; opens lazily per process (see the module docstring).
    Writes raise CacheDirError / CacheFullError; reads raise DamagedRecord for a record that
    fails the store's checks.
    """

    def __init__(
        self,
        directory: Path,
        disk: type[RecordDisk],
        kind: StoreKind,
        *,
        shards: int = DEFAULT_SHARDS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        self.directory = Path(directory)
        self.disk = disk
        self.kind = kind
        self.shards = shards
        self.timeout_s = float(timeout_s)
        self._cache: FanoutCache | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("directory", "disk", "kind", "shards", "timeout_s")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache, self._pid = None, None

    def __repr__(self) -> str:
        return f"ByteStore({str(self.directory)!r}, {self.disk.__name__})"

    # --- per process ---------------------------------------------------------------------------

    @property
    def layout_path(self) -> Path:
        """The file recording the store's layout (shard count), written once when the store is made."""
        return self.directory / LAYOUT_FILE

    def exists(self) -> bool:
        """True when the folder already holds a store (checking creates nothing)."""
        return self.layout_path.is_file()

    @property
    def diskcache(self) -> FanoutCache:
        """This process's FanoutCache (opened on first use, reopened after a fork)."""
        cache = self._cache
        if cache is None or self._pid != os.getpid():
            cache = self._open()
        return cache

    def _open(self) -> FanoutCache:
        if self._cache is not None:
            _INHERITED.append(self._cache)  # opened by the parent before a fork: leave it alone
            self._cache, self._pid = None, None
        shards = _Layout(self.directory, self.kind, self).shards(self.shards)

        # diskcache's constructor runs some statements (CREATE INDEX IF NOT EXISTS for the tag
        # index) with a zero busy timeout and no retry, so opening while another process opens or
        # writes the same shard can fail with "database is locked". Every statement is idempotent.
        def make() -> FanoutCache:
            return FanoutCache(
                str(self.directory),
                shards=shards,
                timeout=self.timeout_s,
                disk=self.disk,
                eviction_policy="none",
                size_limit=_MAX_SIZE_LIMIT,
                cull_limit=0,
                statistics=False,
                tag_index=True,
            )

        cache = _retry_locked(make, max(60.0, self.timeout_s), self.dir_error)
        self._cache, self._pid = cache, os.getpid()
        return cache

    def close(self) -> None:
        """Close this process's SQLite connections (reopened on next use)."""
        if self._cache is not None and self._pid == os.getpid():
            self._cache.close()
        self._cache = None
        self._pid = None

    # --- errors --------------------------------------------------------------------------------

    def dir_error(self, exc: BaseException) -> CacheError:
        """The CacheError for an OSError / sqlite3.Error met opening or writing the store."""
        if is_disk_full(exc):
            return self.full_error(exc)
        return CacheDirError(
            f"{self.kind.label} directory {self.directory} cannot be created or written ({exc}); fix its "
            f"permissions, or point {self.kind.dir_option} / {self.kind.dir_env} at a writable folder"
        )

    def full_error(self, exc: BaseException) -> CacheFullError:
        free = free_bytes(self.directory)
        free_text = "unknown" if free is None else f"{free / 1e9:.2f} GB"
        return CacheFullError(
            f"the disk holding the {self.kind.label} {self.directory} is full ({exc}; {free_text} free); "
            f"{self.kind.full_advice}"
        )

    # --- records -------------------------------------------------------------------------------

    def get(self, key: str) -> Record | None:
        """The record under `key` (close its file after use), or None. Writes nothing."""
        cache = self._cache if self._pid == os.getpid() else self.diskcache
        found = cache.get(key, None, read=True, retry=True)
        if found is None:
            return None
        if type(found) is not Record:
            raise DamagedRecord(repr(found))
        fmt = self.disk.record
        if len(found.header) != fmt.header_size or not found.header.startswith(fmt.magic):
            found.close()
            raise DamagedRecord(f"header is {len(found.header)} bytes starting {found.header[:4]!r}")
        return found

    def contains(self, key: str) -> bool:
        """`key in store`, retried while SQLite is busy (diskcache's `__contains__` has no retry)."""
        cache = self.diskcache
        for attempt in range(100):
            try:
                return key in cache
            except sqlite3.OperationalError:
                if attempt == 99:
                    raise
                time.sleep(0.01)
        raise AssertionError("unreachable")

    def keys_with_prefix(self, prefix: str) -> set[str]:
        """Every key that starts with `prefix` (non-empty, ASCII); an empty set when there is no store.

        One indexed range query per shard (key >= prefix and < the next prefix), so asking about a
        CT's hundreds of chunks costs a few queries, not one per chunk (`contains`). Reads only the
        index; values are not touched.
        """
        if not prefix or not prefix.isascii():
            raise ValueError(f"prefix {prefix!r}: expected a non-empty ASCII string")
        if not self.exists():
            return set()
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # keys are ASCII, compared bytewise by SQLite
        query = "SELECT key FROM Cache WHERE key >= ? AND key < ? AND raw = 1"
        found: set[str] = set()
        # diskcache has no public per-shard query; `_shards` and `_sql` are stable through diskcache 5.
        for shard in self.diskcache._shards:
            rows = _retry_locked(
                lambda shard=shard: shard._sql(query, (prefix, end)).fetchall(),
                max(60.0, self.timeout_s),
                self.dir_error,
            )
            found.update(row[0] for row in rows)
        return found

    def add(self, key: str, value: bytes, tag: str) -> bool:
        """Store `value` (header + payload) under `key` unless the key is present; True if stored."""
        try:
            return bool(self.diskcache.add(key, value, tag=tag, retry=True))
        except (OSError, sqlite3.Error) as exc:
            raise self.dir_error(exc) from None

    def set(self, key: str, value: bytes, tag: str) -> None:
        """Store `value` under `key`, replacing what is there."""
        try:
            self.diskcache.set(key, value, tag=tag, retry=True)
        except (OSError, sqlite3.Error) as exc:
            raise self.dir_error(exc) from None

    def delete(self, keys: Iterable[str]) -> None:
        """Delete these keys (absent ones are fine)."""
        cache = self.diskcache
        try:
            for key in keys:
                cache.delete(key, retry=True)
        except (OSError, sqlite3.Error) as exc:
            raise self.dir_error(exc) from None

    def evict(self, tags: Iterable[str]) -> None:
        """Delete every record stored with one of these tags (a batched delete per tag)."""
        cache = self.diskcache
        try:
            for tag in tags:
                cache.evict(tag, retry=True)
        except (OSError, sqlite3.Error) as exc:
            raise self.dir_error(exc) from None

    # --- maintenance ---------------------------------------------------------------------------

    def keys(self) -> Iterator[str | _ForeignKey]:
        """Every key (`FOREIGN_KEY` for one this store did not write); nothing when there is no store."""
        if self.exists():
            yield from self.diskcache

    def __len__(self) -> int:
        return len(self.diskcache) if self.exists() else 0

    def volume(self) -> int:
        """Bytes on disk: SQLite files plus value files (0 when there is no store yet)."""
        return int(self.diskcache.volume()) if self.exists() else 0

    def clear(self) -> int:
        """Delete every record; returns how many. Only diskcache's own files are removed."""
        if not self.exists():
            return 0
        try:
            return int(self.diskcache.clear(retry=True))
        except (OSError, sqlite3.Error) as exc:
            raise self.dir_error(exc) from None

    def check_files(self, fix: bool) -> tuple[int, int]:
        """(orphan value files, entries without their file), deleting both when `fix`.

        A process killed after writing a value file but before its index row leaves an orphan that
        nothing reads and nothing frees; diskcache's consistency check finds (and with `fix`
        removes) such files and rows whose file is gone, under a writer lock per shard.
        """
        if not self.exists():
            return 0, 0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")  # check() records its findings as warnings; count them all
                found = self.diskcache.check(fix=fix, retry=True)
        except (OSError, sqlite3.Error) as exc:
            raise self.dir_error(exc) from None
        orphans = sum(1 for w in found if issubclass(w.category, UnknownFileWarning))
        lost = sum(1 for w in found if str(w.message).startswith("file not found"))
        if orphans or lost:
            log.info(
                "%s %s: %s %d orphan value files and %d entries without their file",
                self.kind.label,
                self.directory,
                "removed" if fix else "found",
                orphans,
                lost,
            )
        return orphans, lost
