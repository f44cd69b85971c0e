"""The machinery every training app shares: one epoch loop and the best-checkpoint policy.

`run_epoch` runs a loader through a step function (a training step or an evaluation step, the
app's own) and does what is the same for every model: timing (with a device sync at the first
batch and at the end, so GPU work is counted where it belongs), data wait, progress, an optional
cut after N batches, and gathering the per-sample outputs of every DDP rank. `BestCheckpoint`
decides whether a validation result beats the best so far, and keeps that decision stable when a
metric is undefined in some epochs.

The apps (`p2ch.training.LunaTrainingApp`, and the segmentation app after it) stay recipes:
build data and model, define `step`, call `run_epoch`, log with `p2ch.tblog`, save with
`p2ch.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from p2ch.errors import P2chError
from p2ch.progress import Progress
from p2ch.runtime import DistInfo, gather_cat, shared_memory_errors, synchronize

log = logging.getLogger(__name__)

# Batches between checks that the training loss is finite: each check waits for the device, so not
# every batch; broken weights stay broken, so a few more batches change nothing.
FINITE_CHECK_EVERY = 10

StepFn = Callable[[Any], Mapping[str, torch.Tensor]]


class NonFiniteLossError(P2chError):
    """The training loss became nan or infinite: the weights are broken from that step on."""


@dataclasses.dataclass
class EpochResult:
    """Per-sample outputs of one pass over a loader, gathered over ranks (rank order).

    outputs: name → (N, ...) tensor on the device, as the step returned them, plus
    "positions" (N,) int64 (positions in the dataset) when `run_epoch` was given them.
    seconds: wall time of the pass (device work included); data_wait_seconds: time spent
    waiting for the loader (the wait for the first batch included). complete: every batch was run
    (False when `max_batches` cut it). startup_seconds: the part of `seconds` (and of the data wait)
    before the first batch arrived: starting the loader's workers, or draining what they prefetched
    for a pass that was cut, and loading the first batch.
    """

    outputs: dict[str, torch.Tensor]
    count: int
    seconds: float
    data_wait_seconds: float
    complete: bool
    startup_seconds: float = 0.0

    @property
    def samples_per_sec(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else math.nan

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_seconds / self.seconds if self.seconds > 0 else math.nan

    @property
    def steady_seconds(self) -> float:
        """Wall time from the first batch's arrival to the end (the loader's start-up left out)."""
        return self.seconds - self.startup_seconds

    @property
    def steady_samples_per_sec(self) -> float:
        """Samples per second from the first batch on: the rate a long epoch approaches."""
        return self.count / self.steady_seconds if self.steady_seconds > 0 else math.nan

    @property
    def steady_data_wait_fraction(self) -> float:
        """The fraction of `steady_seconds` spent waiting for batches after the first."""
        steady = self.steady_seconds
        return (self.data_wait_seconds - self.startup_seconds) / steady if steady > 0 else math.nan


def _batch_size(outputs: Mapping[str, torch.Tensor]) -> int:
    sizes = {int(t.shape[0]) for t in outputs.values()}
    assert len(sizes) == 1, f"step outputs of different lengths: {sizes}"
    return sizes.pop()


def run_epoch(
    loader: Iterable[Any],
    step: StepFn,
    *,
    device: torch.device,
    dist: DistInfo,
    desc: str,
    total_samples: int,
    batches: int,
    positions: np.ndarray | None = None,
    show_progress: bool = True,
    finite: str | None = None,
) -> EpochResult:
    """Run `step` on the first `batches` batches of `loader` and collect its per-sample outputs.

    step: batch → {name: (B, ...) tensor}, detached, on the device (kept there until the end,
    so the loop never waits for the device per batch). total_samples: this rank's samples in the
    full pass (for the progress line). positions: this rank's dataset positions in loader order
    (the sampler's indices); the first `count` of them are returned as outputs["positions"].
    finite: the name of an output that must stay finite (the training loss), checked every
    `FINITE_CHECK_EVERY` batches and at the end; NonFiniteLossError when it is not.
    A worker killed by a bus error (shared memory full) raises `p2ch.runtime.SharedMemoryError`.
    On CUDA the device is synchronized at the first batch (`startup_seconds`: the time until then)
    and at the end, so the epoch's time holds exactly its own work.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    seen = done = 0
    wait = startup = 0.0
    broken: torch.Tensor | None = None  # on the device: whether `finite` has held a nan or inf yet
    start = time.perf_counter()
    with (
        Progress(total_samples, desc, "samples", enabled=show_progress and dist.is_main) as progress,
        shared_memory_errors(),
    ):
        fetch_start = time.perf_counter()
        for batch in loader:
            if done == 0:
                synchronize(device)
                startup = time.perf_counter() - start
            wait += time.perf_counter() - fetch_start
            outputs = step(batch)
            for name, tensor in outputs.items():
                parts.setdefault(name, []).append(tensor)
            size = _batch_size(outputs)
            seen += size
            done += 1
            progress.update(size)
            if finite is not None:
                broken = _track_finite(broken, outputs[finite], finite, desc, done)
            if done >= batches:
                break
            fetch_start = time.perf_counter()
    if broken is not None:
        _raise_if_broken(broken, True, finite or "", desc, done)
    synchronize(device)
    seconds = time.perf_counter() - start
    gathered = _gather(parts, positions, seen, device, dist)
    count = int(next(iter(gathered.values())).shape[0]) if gathered else 0
    complete = done >= _loader_length(loader, batches)
    return EpochResult(gathered, count, seconds, wait, complete=complete, startup_seconds=startup)


def _track_finite(broken: torch.Tensor | None, values: torch.Tensor, name: str, desc: str, done: int) -> torch.Tensor:
    """Whether `values` (or any earlier batch's) held a nan or inf, as a device flag; raises every few batches."""
    bad = ~torch.isfinite(values).all()
    broken = bad if broken is None else broken | bad
    _raise_if_broken(broken, done % FINITE_CHECK_EVERY == 0, name, desc, done)
    return broken


def _gather(
    parts: dict[str, list[torch.Tensor]], positions: np.ndarray | None, seen: int, device: torch.device, dist: DistInfo
) -> dict[str, torch.Tensor]:
    """Each output's batches concatenated (plus the dataset positions seen), gathered over ranks."""
    gathered = {name: torch.cat(tensors) for name, tensors in parts.items()}
    if positions is not None:
        gathered["positions"] = torch.as_tensor(np.asarray(positions[:seen], dtype=np.int64), device=device)
    return {name: gather_cat(tensor, dist) for name, tensor in gathered.items()}


def _raise_if_broken(broken: torch.Tensor, now: bool, name: str, desc: str, done: int) -> None:
    if now and bool(broken):
        raise NonFiniteLossError(f"{desc}: the loss ({name}) became nan or infinite by batch {done}")


def _loader_length(loader: Any, fallback: int) -> int:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length: count what was asked for
        return fallback


@dataclasses.dataclass(frozen=True)
class Metric:
    """One rung of the best-checkpoint ladder: a name (as in checkpoints) and its summary key."""

    name: str
    key: str


class BestCheckpoint:
    """Which validation result is the best so far (for best.pt).

    metrics: the ladder, most wanted first (e.g. CPM, then F1); loss_key: the summary key of the
    tie-break, lower is better (the validation loss; false-positive components per CT for the
    segmentation model), named `loss_name` when it decides alone. A result is ranked by the first
    rung at which it or the best so far is defined: defined beats undefined (nan), then the higher
    value wins, then the lower loss.
    When no rung is defined for either, the lower loss wins. This is a total order over
    results, so a metric that is undefined in some epochs (F1 while the model predicts no
    positive, CPM without nodules) can never make a worse epoch replace a better one.
    """

    def __init__(self, metrics: Sequence[Metric], loss_key: str = "loss/all", loss_name: str = "loss"):
        assert metrics, "at least one metric"
        self.metrics = tuple(metrics)
        self.loss_key = loss_key
        self.loss_name = loss_name
        self.key: tuple[float, ...] | None = None
        self.epoch = 0
        self.name = self.metrics[0].name
        self.value = -math.inf
        self.loss = math.inf

    def rank(self, summary: Mapping[str, float]) -> tuple[tuple[float, ...], str, float]:
        """(sort key, name of the deciding metric, its value) of one validation summary."""
        key: list[float] = []
        name, value = self.loss_name, -float(summary.get(self.loss_key, math.nan))
        for metric in self.metrics:
            found = float(summary.get(metric.key, math.nan))
            if math.isnan(found) or name != self.loss_name:
                key += [0.0, 0.0]
            else:
                key += [1.0, found]
                name, value = metric.name, found
        loss = float(summary.get(self.loss_key, math.nan))
        key.append(-loss if not math.isnan(loss) else -math.inf)
        return tuple(key), name, value

    def update(self, summary: Mapping[str, float], epoch: int) -> bool:
        """Whether `summary` (of `epoch`) is the best so far; if so it becomes the best."""
        key, name, value = self.rank(summary)
        if self.key is not None and not key > self.key:
            return False
        if name != self.metrics[0].name:
            log.warning("validation %s is undefined at epoch %d; ranked by %s", self.metrics[0].name, epoch, name)
        self.key, self.epoch, self.name, self.value = key, epoch, name, value
        self.loss = float(summary.get(self.loss_key, math.nan))
        return True

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint (the first four keys are the ones checkpoints always had)."""
        return {
            "best_metric": self.value,
            "best_epoch": self.epoch,
            "best_loss": self.loss,
            "selected_by": self.name,
            "best_key": list(self.key) if self.key is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from a checkpoint; one written before `best_key` existed, or by another ladder
        (a key of another length), is ranked from its metric name and value (its other rungs
        unknown, so undefined)."""
        self.epoch = int(state.get("best_epoch", 0))
        self.name = str(state.get("selected_by", self.metrics[0].name))
        self.value = float(state.get("best_metric", -math.inf))
        self.loss = float(state.get("best_loss", math.inf))
        stored = state.get("best_key")
        if stored is not None and len(stored) == 2 * len(self.metrics) + 1:
            self.key = tuple(float(v) for v in stored)
        elif self.epoch > 0:
            summary = {m.key: self.value for m in self.metrics if m.name == self.name}
            self.key = self.rank({**summary, self.loss_key: self.loss})[0]
