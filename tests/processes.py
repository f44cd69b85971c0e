"""Helpers for the fault tests: a process's children and whether processes are still alive (Linux /proc)."""

from __future__ import annotations

import time
from pathlib import Path

PROC = Path("/proc")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None when the pid is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rfind(")") + 2 :].split()


def children(pid: int) -> set[int]:
    """Pids of the live child processes of `pid`."""
    found = set()
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[1] == str(pid) and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (a zombie waiting for its reaper counts as gone)."""
    return {pid for pid in pids if (fields := _stat(pid)) is not None and fields[0] != "Z"}


def wait_until_gone(pids: set[int], timeout: float) -> set[int]:
    """Poll until none of `pids` runs or `timeout` seconds pass; returns those still running."""
    deadline = time.monotonic() + timeout
    left = alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = alive(left)
    return left


def wait_for_children(pid: int, count: int, timeout: float) -> set[int]:
    """Poll until `pid` has at least `count` children (or `timeout` passes); returns them."""
    deadline = time.monotonic() + timeout
    found = children(pid)
    while len(found) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        found = children(pid)
    return found
