"""Batched scoring of candidates with a trained `LunaModel`, from the chunk cache or straight from the CTs.

- `Scorer` / `make_scorer`: the model in eval mode on a device (AMP, channels_last); int16 chunk
  batches in, P(nodule) out.
- `score_from_cache`: candidates read through the chunk cache by DataLoader workers (evaluation).
- `predict_locations`: candidate locations (a CSV's rows) scored CT by CT, each CT loaded once and
  cropped in memory, nothing cached (prediction, and evaluation with --no-cache).
- `score_ct`: locations in one CT already in memory (no data root, no cache), nan outside it;
  `score_ct_then`: the same, then a second model on the rows scored above a threshold (the stages the two
  models share, as a malignancy classifier fine-tuned from the nodule classifier does, computed once).
- `read_locations`: such locations from a CSV (seriesuid, coordX, coordY, coordZ; other columns ignored).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from p2ch.cache import ChunkCache
from p2ch.candidates import CandidateArrays, group_rows, read_luna_csv
from p2ch.config import AMP_MODES, DEFAULT_BATCH_SIZE
from p2ch.ct import Ct
from p2ch.datasets import DevicePrefetcher, EvalSampler, LunaDataset, create_loader, to_device_batch
from p2ch.errors import CandidateOutsideCtError, ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import DEFAULT_WIDTH_IRC, check_width_irc
from p2ch.luna import LOCATION_COLUMNS, find_mhd, series_index
from p2ch.progress import Progress
from p2ch.runtime import autocast, resolve_amp, resolve_device

log = logging.getLogger(__name__)

OUTSIDE_MODES = ("skip", "error")  # what predict_locations does with a centre outside its CT
# The 8 mirror images of an (N, 1, I, R, C) batch: the dims flipped, from none to all three axes.
FLIPS = tuple(dims for count in range(4) for dims in itertools.combinations((2, 3, 4), count))


class Scorer:
    """A `LunaModel` in eval mode on `device`: int16 chunk batches in, nodule probabilities out.

    amp_dtype: torch.bfloat16 / torch.float16 for autocast, or None (float32).
    channels_last: run in channels_last_3d memory format (faster on CPUs and GPUs).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = True,
    ):
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        model = model.to(self.device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        self.model = model

    @torch.inference_mode()
    def __call__(self, chunks: torch.Tensor, *, flips: bool = False) -> torch.Tensor:
        """chunks: (N, 1, I, R, C) int16 HU (CPU or device). Returns (N,) float32 P(nodule) on the device.

        flips: the mean over the chunk and its 7 mirror images (each subset of the three axes flipped,
        `FLIPS`), a test-time augmentation for models trained with flips (`--augmented`): a lesion is
        the same lesion mirrored, and averaging eight looks steadies a model's vote on it.
        Results stay on the device, so a loop can collect them and copy once at the end.
        """
        return self.score(chunks, flips=flips)[0]

    @torch.inference_mode()
    def score(
        self, chunks: torch.Tensor, *, flips: bool = False, stages: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`__call__`'s (N,) P(class 1), and with stages k > 0 what the first k of the model's stages
        (`model.STAGES`) made of each look: a list with one (N, …) tensor per look, in `FLIPS` order
        (one look without flips), for `score_features` of a model that shares those stages."""
        x = to_device_batch(chunks, self.device)
        probabilities, features = [], []
        for dims in FLIPS if flips else ((),):
            look = torch.flip(x, dims) if dims else x
            if self.channels_last:
                look = look.contiguous(memory_format=torch.channels_last_3d)
            with autocast(self.device, self.amp_dtype):
                if stages:
                    features.append(self.model.features(look, stages))
                    _, prob = self.model.from_features(features[-1], stages)
                else:
                    _, prob = self.model(look)
            probabilities.append(prob[:, 1].float())
        return torch.stack(probabilities).mean(dim=0), features

    @torch.inference_mode()
    def score_features(self, features: list[torch.Tensor], stages: int) -> torch.Tensor:
        """(N,) float32 P(class 1) on the device from `score`'s per-look features after the first `stages`
        stages of a model whose first `stages` stages equal this one's (`model.shared_stages`): this
        model's remaining stages and head on each look, then the mean, as `__call__` would give."""
        probabilities = []
        for look in features:
            with autocast(self.device, self.amp_dtype):
                _, prob = self.model.from_features(look, stages)
            probabilities.append(prob[:, 1].float())
        return torch.stack(probabilities).mean(dim=0)


def make_scorer(
    model: torch.nn.Module,
    device: str = "auto",
    amp: str = "auto",
    channels_last: str = "on",
    *,
    cpu_bf16: bool = False,
) -> Scorer:
    """A Scorer from the command-line spellings (--device auto|cpu|cuda|cuda:N, --amp, --channels-last).
    cpu_bf16: --amp auto means bf16 on a CPU with native bf16 too (`runtime.resolve_amp`)."""
    if amp not in AMP_MODES:
        raise ConfigError(f"--amp {amp!r}: expected one of {', '.join(AMP_MODES)}")
    if channels_last not in ("on", "off"):
        raise ConfigError(f"--channels-last {channels_last!r}: expected on or off")
    torch_device = resolve_device(device)
    return Scorer(model, torch_device, resolve_amp(amp, torch_device, cpu_bf16=cpu_bf16), channels_last == "on")


# ---------------------------------------------------------------------------------------------
# through the chunk cache


def score_from_cache(
    scorer: Scorer,
    candidates: CandidateArrays,
    indices: np.ndarray,
    cache: ChunkCache,
    *,
    width_irc: Sequence[int],
    batch_size: int,
    num_workers: int,
    progress: bool = True,
) -> np.ndarray:
    """P(nodule) of candidates[indices] read through the chunk cache.

    indices: (n,) int64 candidate rows. Returns (n,) float64, in `indices` order. Chunks missing
    from the cache are cropped by the workers (one CT load each); fill the cache first for speed.
    """
    if len(indices) == 0:
        return np.zeros(0, dtype=np.float64)
    dataset = LunaDataset(candidates, indices, cache, width_irc)
    loader = create_loader(
        dataset,
        EvalSampler(len(dataset)),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=scorer.device.type == "cuda",
        persistent_workers=False,
    )
    parts = []
    with Progress(len(dataset), "scoring", "candidates", enabled=progress) as bar:
        for batch in DevicePrefetcher(loader, scorer.device):
            parts.append(scorer(batch.chunk))
            bar.update(len(batch.label))
    return torch.cat(parts).cpu().numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# straight from the CTs


@dataclasses.dataclass(frozen=True)
class PredictStats:
    """Counts of one `predict_locations` call.

    rows: input rows; scored: rows with a probability; outside: rows skipped because their centre
    is outside the CT; not_on_disk: rows skipped because their series has no .mhd under the root
    (in `not_on_disk_series` series); cts: CTs loaded; seconds: wall time.
    """

    rows: int
    scored: int
    outside: int
    not_on_disk: int
    not_on_disk_series: int
    cts: int
    seconds: float

    @property
    def candidates_per_sec(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else math.nan


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The CTs to load, each with its rows (positions in the input), and what is skipped."""

    todo: list[tuple[str, np.ndarray]]
    not_on_disk: int
    not_on_disk_series: int


def _plan(uids: np.ndarray, data_root: str | os.PathLike[str], skip_missing_series: bool) -> _Plan:
    """Group rows by series (in order of first appearance) and set aside series without a .mhd."""
    codes, series = pd.factorize(uids)
    on_disk = series_index(data_root)
    todo: list[tuple[str, np.ndarray]] = []
    absent: list[str] = []
    not_on_disk = 0
    for rows in group_rows(codes):
        uid = str(series[codes[rows[0]]])
        if uid in on_disk:
            todo.append((uid, rows))
        elif skip_missing_series:
            not_on_disk += len(rows)
            absent.append(uid)
        else:
            find_mhd(uid, data_root)  # raises DataNotFoundError saying where it looked
    if absent:
        log.warning(
            "%d candidate row(s) of %d series skipped: no .mhd under %s/subset*/ (first %s)",
            not_on_disk,
            len(absent),
            data_root,
            absent[0],
        )
    return _Plan(todo, not_on_disk, len(absent))


def _prefetched_cts(
    pool: concurrent.futures.Executor, uids: Sequence[str], data_root: str | os.PathLike[str]
) -> Iterator[Ct]:
    """The CTs of `uids` in order; the next one is read in `pool` while the caller works on this one.

    Memory stays at two CTs as long as the caller drops each CT before asking for the next.
    """
    # SimpleITK's read releases the GIL, so reading the next CT overlaps with scoring this one.
    pending = pool.submit(Ct, uids[0], data_root) if uids else None
    for position in range(len(uids)):
        ct = pending.result()
        pending = pool.submit(Ct, uids[position + 1], data_root) if position + 1 < len(uids) else None
        yield ct
        del ct


@dataclasses.dataclass(frozen=True)
class OutsideReport:
    """How a centre outside its CT is named in the error of `predict_locations(outside="error")`.

    where: input row (0-based position) → where it came from, e.g. "scores.csv: line 7" (None: "row k
    of the locations"). fix: what the user can do about it.
    """

    where: Callable[[int], str] | None = None
    fix: str = "check the CSV coordinates, or pass --outside skip"

    def error(self, ct: Ct, rows: np.ndarray, centers_xyz: np.ndarray, centers_irc: np.ndarray, inside: np.ndarray):
        k = int(np.flatnonzero(~inside)[0])
        row = int(rows[k])
        where = self.where(row) if self.where is not None else f"row {row} of the locations"
        return CandidateOutsideCtError(
            f"{where}: candidate centre {tuple(round(float(v), 2) for v in centers_xyz[row])} mm lies outside CT "
            f"{ct.series_uid} (voxel {tuple(int(v) for v in centers_irc[k])}, volume "
            f"{tuple(int(v) for v in ct.hu.shape)} index/row/col; {int((~inside).sum())} of the {len(rows)} "
            f"centres in this CT are outside); {self.fix}"
        )


def _inside_rows(ct: Ct, rows: np.ndarray, centers_xyz: np.ndarray, outside: str, report: OutsideReport) -> np.ndarray:
    """The rows whose centre lies inside `ct`; with outside="error", CandidateOutsideCtError for any other.

    rows: (k,) positions; centers_xyz: (N, 3) float64 mm of every input row.
    """
    centers_irc, inside = ct.locate(centers_xyz[rows])
    if outside == "error" and not inside.all():
        raise report.error(ct, rows, centers_xyz, centers_irc, inside)
    return rows[inside]


def _check_predict_settings(outside: str, batch_size: int) -> None:
    if outside not in OUTSIDE_MODES:
        raise ConfigError(f"--outside {outside!r}: expected one of {', '.join(OUTSIDE_MODES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r}: expected a positive integer")


def predict_locations(
    scorer: Scorer,
    data_root: str | os.PathLike[str],
    locations: pd.DataFrame,
    *,
    width_irc: Sequence[int] = DEFAULT_WIDTH_IRC,
    batch_size: int = DEFAULT_BATCH_SIZE,
    outside: str = "skip",
    skip_missing_series: bool = True,
    progress: bool = True,
    report: OutsideReport | None = None,
) -> tuple[np.ndarray, PredictStats]:
    """Score candidate locations straight from the CTs (one load per CT, no cache).

    locations: DataFrame with seriesuid (str) and coordX, coordY, coordZ (float, mm), one row per
        candidate; other columns are ignored.
    Returns `(probability, stats)`: probability (N,) float64 P(nodule) per row, in row order, nan
    for skipped rows (see `PredictStats`). outside: "skip" rows whose centre lies outside the CT
    (counted) or "error" (CandidateOutsideCtError, worded by `report`: the row's CSV line, the fix).
    skip_missing_series: False makes a series without a .mhd under `data_root` an error instead.
    """
    _check_predict_settings(outside, batch_size)
    width = check_width_irc(width_irc)
    started = time.perf_counter()
    uids = locations["seriesuid"].astype(str).to_numpy()
    centers_xyz = locations[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64).reshape(-1, 3)
    plan = _plan(uids, data_root, skip_missing_series)
    scored: list[tuple[np.ndarray, torch.Tensor]] = []
    outside_count = 0
    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2ch-ct") as pool,
        Progress(sum(len(rows) for _, rows in plan.todo), "scoring", "candidates", enabled=progress) as bar,
    ):
        cts = _prefetched_cts(pool, [uid for uid, _ in plan.todo], data_root)
        for ct, (_, rows) in zip(cts, plan.todo, strict=True):
            kept = _inside_rows(ct, rows, centers_xyz, outside, report or OutsideReport())
            outside_count += len(rows) - len(kept)
            bar.update(len(rows) - len(kept))
            for start in range(0, len(kept), batch_size):
                batch_rows = kept[start : start + batch_size]
                chunks, _ = ct.get_raw_candidates(centers_xyz[batch_rows], width)
                scored.append((batch_rows, scorer(torch.from_numpy(chunks).unsqueeze(1))))
                bar.update(len(batch_rows))
            del ct
    if outside_count:
        log.warning("%d candidate row(s) skipped: centre outside the CT volume", outside_count)
    probability = np.full(len(uids), np.nan, dtype=np.float64)
    if scored:
        rows = np.concatenate([r for r, _ in scored])
        probability[rows] = torch.cat([p for _, p in scored]).cpu().numpy().astype(np.float64)
    stats = PredictStats(
        rows=len(uids),
        scored=int(np.isfinite(probability).sum()),
        outside=outside_count,
        not_on_disk=plan.not_on_disk,
        not_on_disk_series=plan.not_on_disk_series,
        cts=len(plan.todo),
        seconds=time.perf_counter() - started,
    )
    return probability, stats


def score_ct(
    scorer: Scorer,
    ct: Ct,
    centers_xyz: np.ndarray,
    *,
    width_irc: Sequence[int],
    batch_size: int = 64,
    flips: bool = False,
) -> np.ndarray:
    """P(class 1) of locations in one CT in memory: `scorer`'s model on a chunk around each centre.

    scorer: a `Scorer` of a nodule or a malignancy classifier. ct: a `p2ch.ct.Ct`. centers_xyz:
    (N, 3) float mm. width_irc: the chunk the model was trained on (its config's `width_irc`).
    Chunks are cropped with `Ct.get_raw_candidates`, `batch_size` at a time, so the numbers equal
    `predict_locations`'s for the same locations of the CT on disk. flips: each the mean of its 8 mirror
    images (`Scorer.__call__`).
    Returns (N,) float64 in row order, nan for a centre whose voxel lies outside the CT (and for a
    non-finite centre): `get_raw_candidates` would raise CandidateOutsideCtError for it.
    """
    return score_ct_then(scorer, None, ct, centers_xyz, width_irc=width_irc, batch_size=batch_size, flips=flips)[0]


@dataclasses.dataclass
class FollowUp:
    """What the second model of `score_ct_then` gave.

    rows: (M,) int64, ascending: the rows the first model scored above `above`. probability: (M,) float64,
    the second model's P(class 1) of them. seconds: the time spent in the second model.
    """

    rows: np.ndarray
    probability: np.ndarray
    seconds: float = 0.0


def score_ct_then(
    first: Scorer,
    second: Scorer | None,
    ct: Ct,
    centers_xyz: np.ndarray,
    *,
    width_irc: Sequence[int],
    batch_size: int = 64,
    flips: bool = False,
    above: float = math.inf,
    stages: int = 0,
) -> tuple[np.ndarray, FollowUp]:
    """`score_ct` with `first`, then `second` on the rows that `first` scored above `above` (the nodule
    classifier, then the malignancy classifier on the likely nodules), batch by batch. The first `stages`
    stages of both models must compute alike (`model.shared_stages`: a malignancy classifier fine-tuned from
    this nodule classifier with frozen early blocks): their output for a chunk is computed once, by `first`,
    and `second` runs only its later stages on it (0: `second` runs whole, on the same chunks). Memory: one
    batch's features at a time.
    Returns (first's probabilities as `score_ct` gives them, FollowUp: second's for the rows above).
    """
    width = check_width_irc(width_irc)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size {batch_size!r}: expected a positive integer")
    centers, rows = _centres_inside(ct, centers_xyz)
    probability = np.full(len(centers), np.nan, dtype=np.float64)
    stages = stages if second is not None else 0
    parts, follow_rows, follow_probability, seconds = [], [], [], 0.0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        chunks = torch.from_numpy(ct.get_raw_candidates(centers[batch], width)[0]).unsqueeze(1)
        prob, features = first.score(chunks, flips=flips, stages=stages)
        if second is None:  # no rows to choose: the results stay on the device and are copied once, below
            parts.append(prob)
            continue
        probability[batch] = prob.cpu().numpy().astype(np.float64)
        chosen = np.flatnonzero(probability[batch] > above)
        if len(chosen) == 0:
            continue
        started = time.perf_counter()
        if stages:
            index = torch.from_numpy(chosen).to(prob.device)
            later = second.score_features([look.index_select(0, index) for look in features], stages)
        else:
            later = second(chunks[torch.from_numpy(chosen)], flips=flips)
        follow_probability.append(later.cpu().numpy().astype(np.float64))
        follow_rows.append(batch[chosen])
        seconds += time.perf_counter() - started
    if parts:
        probability[rows] = torch.cat(parts).cpu().numpy().astype(np.float64)
    follow = FollowUp(
        rows=np.concatenate(follow_rows) if follow_rows else np.zeros(0, dtype=np.int64),
        probability=np.concatenate(follow_probability) if follow_probability else np.zeros(0),
        seconds=seconds,
    )
    return probability, follow


def _centres_inside(ct: Ct, centers_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) float64 centres (mm) checked, and the rows whose voxel lies inside the CT (finite ones only)."""
    centers = np.asarray(centers_xyz, dtype=np.float64)
    if centers.size == 0:
        centers = centers.reshape(0, 3)
    if centers.ndim != 2 or centers.shape[1] != 3:
        raise DataFormatError(f"centers_xyz has shape {centers.shape}; expected (N, 3) mm (x, y, z)")
    finite = np.isfinite(centers).all(axis=1)
    _, inside = ct.locate(np.where(finite[:, None], centers, 0.0))
    return centers, np.flatnonzero(inside & finite)


def read_locations(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Candidate locations from a CSV: seriesuid, coordX, coordY, coordZ (mm); other columns ignored.

    Returns a DataFrame with exactly those columns, in file order (duplicates kept). Raises
    DataNotFoundError for a missing file, DataFormatError for missing columns, bad values or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"--candidates {path}: no such file; expected a CSV with the columns {','.join(LOCATION_COLUMNS)}"
        )
    frame = read_luna_csv(path, LOCATION_COLUMNS)
    if frame.empty:
        raise DataFormatError(f"{path}: no candidate rows after the header {','.join(LOCATION_COLUMNS)}")
    return frame
