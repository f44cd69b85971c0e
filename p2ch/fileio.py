"""Atomic file writes: readers see the old file or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from p2ch.cli import signals_deferred


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary handle on a temporary file beside `path`, renamed onto `path` when the block succeeds.

    The data and the rename are fsynced; the file gets the permissions any new file would get
    (mkstemp's are 0600). On an exception the temporary file is removed and `path` is untouched.
    Ctrl-C and SIGTERM wait until the file is written (`cli.signals_deferred`).
    """
    with signals_deferred(), _atomic_writer(path) as handle:
        yield handle


@contextlib.contextmanager
def _atomic_writer(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def remove_stale_temporaries(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Remove what `atomic_writer` left of `names` in `folder` when its process was killed mid-write
    (SIGKILL, power loss: `.<name>.<random>.tmp`); returns the paths removed. Call it only where no other
    process writes those names (e.g. a resumed run's own checkpoint folder)."""
    removed = []
    for name in names:
        for stale in Path(folder).glob(f".{glob.escape(name)}.*.tmp"):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8, newlines as given) to `path` atomically."""
    with atomic_writer(path) as handle:
        handle.write(text.encode("utf-8"))
