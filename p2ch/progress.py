"""Progress reporting: a tqdm bar on a terminal, periodic log lines otherwise (CI, nohup, files)."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


def _fmt_seconds(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # nan or inf
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Count work done out of `total` (in `unit`s) and show rate and ETA.

    On a terminal this is a tqdm bar on stderr; otherwise (or with `bar=False`) it logs one line
    every `interval` seconds and one at the end, so logs of long jobs stay readable. With
    `enabled=False` (e.g. on DDP ranks other than 0) it only counts.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        enabled: bool = True,
        bar: bool | None = None,
        interval: float = 30.0,
        logger: logging.Logger | None = None,
    ):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.count = 0
        self.enabled = enabled
        self.interval = interval
        self.log = logger or log
        self.start = time.perf_counter()
        self._last_log = self.start
        # The count of the last logged line: close() logs the final line only if update() has
        # not just logged it (the interval can elapse exactly at the last item).
        self._logged_count: int | None = None
        self._bar = None
        if enabled and (sys.stderr.isatty() if bar is None else bar):
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        elapsed = self.elapsed
        return self.count / elapsed if elapsed > 0 else float("nan")

    def line(self) -> str:
        rate = self.rate
        if self.total:
            eta = (self.total - self.count) / rate if rate > 0 else float("nan")
            return (
                f"{self.desc}: {self.count}/{self.total} {self.unit} "
                f"({100.0 * self.count / self.total:.0f}%), {rate:,.1f} {self.unit}/s, "
                f"elapsed {_fmt_seconds(self.elapsed)}, ETA {_fmt_seconds(eta)}"
            )
        return f"{self.desc}: {self.count} {self.unit}, {rate:,.1f} {self.unit}/s"

    def update(self, n: int = 1) -> None:
        """Count `n` more units done; log a line if `interval` seconds have passed since the last."""
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_log >= self.interval:
            self._last_log = now
            self._log_line()

    def _log_line(self) -> None:
        self._logged_count = self.count
        self.log.info("%s", self.line())

    def set_postfix(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        """Close the bar, or log the final line (once: not again if update() just logged it)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.count and self.count != self._logged_count:
            self._log_line()
        self.enabled = False
