"""The boundary of every command: logging set-up, and expected failures as one line (bugs keep their traceback).

Standard library only, so every command (p2ch.synth too, which runs without torch) uses it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from p2ch.errors import P2chError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (some library messages embedded in ours span several)."""
    return " ".join(str(exc).split())


def run_cli(prog: str, body: Callable[[], int], interrupted: Callable[[], str] | str = "interrupted") -> int:
    """Run a command's body: its exit code, 2 with one line for a P2chError, 130 on Ctrl-C.

    interrupted: what to print after `prog: ` on Ctrl-C (a callable is asked then, so it can say
    where to resume). Other exceptions propagate with their traceback: they are bugs.
    """
    try:
        return body()
    except P2chError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted() if callable(interrupted) else interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED


def configure_logging(level: str) -> None:
    """Log to stderr: rank 0 at `level`, other torchrun ranks at WARNING with their rank in each line."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if rank == 0
        else f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s",
        stream=sys.stderr,
    )
