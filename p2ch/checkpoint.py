"""Checkpoints: plain dicts of tensors and plain values, written atomically, loaded weights-only.

A checkpoint is what `torch.load(path, weights_only=True)` can read without executing code:
model and optimizer state dicts, GradScaler state, RNG states as tensors, counters, the run's
config as a dict of str/int/float/bool/list, and library versions. It is written to a temporary
file in the same folder, flushed to disk, then renamed over the target, so a crash (or SIGKILL)
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError
from p2ch.fileio import atomic_writer

CHECKPOINT_FORMAT = "p2ch-checkpoint-v1"
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


def versions() -> dict[str, str]:
    import numpy

    from p2ch import __version__

    return {
        "p2ch": str(__version__),
        "torch": str(torch.__version__),
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
    }


def sha1_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Write `state` (plus format tag and versions) to `path` atomically; return its SHA1."""
    payload = {"format": CHECKPOINT_FORMAT, "versions": versions(), **state}
    with atomic_writer(path) as handle:
        torch.save(payload, handle)
    return sha1_of(path)


def load_checkpoint(path: str | os.PathLike[str], *, arch: str | None = None) -> dict[str, Any]:
    """Load a p2ch checkpoint with `weights_only=True` (no code runs) onto the CPU.

    With `arch`, refuse a checkpoint of another model architecture with a clear message.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        first_line = (str(exc).strip().splitlines() or [""])[0]  # torch's messages run to a page
        raise DataFormatError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first_line})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise DataFormatError(f"{path}: not a p2ch checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    if arch is not None and state.get("arch") != arch:
        raise ConfigError(
            f"{path}: checkpoint is for model architecture {state.get('arch')!r}, this model is {arch!r}; "
            "start a new run instead of --resume/--init-weights with it"
        )
    return state


def find_latest(checkpoint_dir: str | os.PathLike[str], name: str = BEST_NAME) -> Path:
    """The most recently written `name` (best.pt or last.pt) anywhere under `checkpoint_dir`."""
    root = Path(checkpoint_dir)
    found = sorted(root.rglob(name), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise DataNotFoundError(
            f"no {name} under {root}; train first (python -m p2ch.training) or pass --checkpoint PATH"
        )
    return found[-1]
