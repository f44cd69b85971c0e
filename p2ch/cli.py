"""The boundary of every command: logging set-up, and expected failures as one line (bugs keep their traceback).

Standard library only, so every command (p2ch.synth too, which runs without torch) and prepcache's
worker processes use it. Also here: SIGTERM handled like Ctrl-C (`run_cli`), and worker processes
that exit when their parent dies (`exit_with_parent`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from p2ch.errors import P2chError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PARENT_POLL_SECONDS = 1.0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that every clean-up path of Ctrl-C runs."""


def worker_message(exc: BaseException) -> str:
    """The message of `exc`, or of the original exception when torch re-raised one from a DataLoader worker.

    torch re-raises a worker's exception as the same type with the message "Caught X in DataLoader
    worker process N.\\nOriginal Traceback (most recent call last): … module.X: <message>"; the
    original message is what follows the last `module.X: ` of that traceback.
    """
    text = str(exc)
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ not in ("__main__", "builtins"):  # as `traceback` prints the type
        name = f"{kind.__module__}.{name}"
    at = text.rfind(f"\n{name}: ")
    return text[at + len(name) + 3 :] if at >= 0 else text


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (some library messages embedded in ours span several; an error
    raised in a DataLoader worker keeps only its own message, not torch's wrapping and traceback)."""
    return " ".join(worker_message(exc).split())


_LEADING_PATH = re.compile(r"^([^\s:]*[/\\])([^\s:/\\]+): ")  # "/data/x.mhd: " before a message
_PATH_OR_LENGTH_NOTE = re.compile(r" \((?:[^()]*[/\\][^()]*|[\d,]+ characters)\)")  # " (/abs/path)", " (84 characters)"
_LONG_QUOTE = re.compile(r"'([^']{41,})'")


def brief_reason(message: str, limit: int = 200) -> str:
    """The gist of an error message for a summary line (its full text goes to the log).

    Keeps only the file name of a leading path ("/data/luna/annotations.csv: line 2: …" → "annotations.csv:
    line 2: …"), drops the advice after the first "; " and notes in parentheses that hold a path or a length
    ("(84 characters)"), cuts quoted values to 40 characters and the whole to `limit`, each cut marked "…".
    Numbers and names in the message stay.
    """
    text = " ".join(message.split())
    if (match := _LEADING_PATH.match(text)) is not None:
        text = text[len(match[1]) :]
    text = text.split("; ", 1)[0]
    while (shorter := _PATH_OR_LENGTH_NOTE.sub("", text)) != text:
        text = shorter
    text = _LONG_QUOTE.sub(lambda m: f"'{m[1][:39]}…'", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Signals:
    """Whether SIGTERM arrived while `_sigterm_as_interrupt` was active."""

    terminated = False


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[_Signals]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (only there can Python handle signals).

    A child forked inside the block (a DataLoader worker) inherits the handler; there it restores the
    default and re-sends the signal, so the child dies of SIGTERM as it would have without us.
    """
    state = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if not state.terminated:  # a second SIGTERM must not break the clean-up the first one started
            state.terminated = True
            raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM wait, and are delivered as the block ends.

    For writing a file: a library cut off mid-write (torch.save's zip writer) raises its own error
    on the way out ("unexpected pos …"), which would replace the interruption with a traceback.
    Only the main thread handles signals; elsewhere, and for a signal whose handler was not set
    from Python, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        pending.append(signum)

    held = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None]
    previous = {sig: signal.signal(sig, hold) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):  # each once, in the order they came
            signal.raise_signal(sig)


def _terminated_text(text: str) -> str:
    """The Ctrl-C note reworded for SIGTERM ("interrupted; rerun …" → "terminated (SIGTERM); rerun …")."""
    if text.startswith("interrupted"):
        return "terminated (SIGTERM)" + text[len("interrupted") :]
    return f"terminated (SIGTERM): {text}"


def run_cli(prog: str, body: Callable[[], int], interrupted: Callable[[], str] | str = "interrupted") -> int:
    """Run a command's body: its exit code, 2 with one line for a P2chError, 130 on Ctrl-C, 143 on SIGTERM.

    interrupted: what to print after `prog: ` on Ctrl-C or SIGTERM (a callable is asked then, so it
    can say where to resume). SIGTERM is handled as Ctrl-C is (the same clean-up and note); any error
    that follows it (a worker killed by the same signal, a library cut off mid-call) counts as the
    termination, its traceback logged at DEBUG. Other exceptions propagate with their traceback:
    they are bugs.
    """

    def note() -> str:
        return interrupted() if callable(interrupted) else interrupted

    with _sigterm_as_interrupt() as signals:
        try:
            return body()
        except P2chError as exc:
            if signals.terminated:
                print(f"{prog}: {_terminated_text(note())}", file=sys.stderr)
                return EXIT_TERMINATED
            print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_ERROR
        except Exception:
            if not signals.terminated:
                raise
            logging.getLogger(__name__).debug("after SIGTERM", exc_info=True)
            print(f"{prog}: {_terminated_text(note())}", file=sys.stderr)
            return EXIT_TERMINATED
        except KeyboardInterrupt as exc:
            if isinstance(exc, Terminated) or signals.terminated:
                print(f"{prog}: {_terminated_text(note())}", file=sys.stderr)
                return EXIT_TERMINATED
            print(f"{prog}: {note()}", file=sys.stderr)
            return EXIT_INTERRUPTED


def exit_with_parent(parent_pid: int) -> None:
    """Make this worker process exit when its parent (`parent_pid`) dies, even by SIGKILL.

    On Linux the kernel sends SIGTERM at the parent's death (prctl PR_SET_PDEATHSIG; the worker must
    keep SIGTERM's default action); elsewhere a daemon thread polls the parent's pid every second.
    Without this a killed command leaves its workers blocked on their task queue forever.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent_pid:  # the parent died before the signal was armed
                os._exit(EXIT_TERMINATED)
            return
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="p2ch-parent-watch", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_SECONDS)
    os._exit(EXIT_TERMINATED)


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
