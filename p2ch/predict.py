"""`python -m p2ch.predict`: score candidate locations of CTs with a trained checkpoint, no cache needed.

    python -m p2ch.predict --series 1.3.6.1.4.1.14519.5.2.1.6279.6001.1051... --out scores.csv
    python -m p2ch.predict --candidates detector.csv --out scores.csv     # every CT the CSV names
    python -m p2ch.predict > scores.csv                                   # all candidates under the root

Each CT is loaded once (the next one is read in a background thread while the model scores
the current one), its candidates are cropped in memory and scored in batches, and the CT is
dropped: memory is two CTs plus one batch, and nothing is written to the chunk cache.

Candidates come from a CSV with the columns seriesuid, coordX, coordY, coordZ (mm); other
columns (LUNA16's `class`, a detector's `probability`) are ignored, so a detector's output can
be fed in as it is. The default is the data root's candidates.csv (or candidates_V2.csv).
The output has LUNA16's submission columns seriesuid, coordX, coordY, coordZ, probability, one
row per input row in input order, on stdout unless --out names a file.

Rows skipped (each counted in a warning on stderr, and absent from the output):
- rows of series that have no .mhd under the data root, when scoring every CT the CSV names
  (many users download only some subsets; with --series an absent CT is an error);
- rows whose centre lies outside its CT volume (`--outside error` makes this an error).

This module also holds what `p2ch.evaluate` shares: finding and loading a checkpoint
(`resolve_checkpoint`, `load_model`) and batched inference (`Scorer`, `predict_locations`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from p2ch.config import (
    AMP_MODES,
    DEFAULT_BATCH_SIZE,
    DefaultsHelpFormatter,
    add_inference_arguments,
    add_model_arguments,
)
from p2ch.errors import CandidateOutsideCtError, ConfigError, DataFormatError, DataNotFoundError, P2chError
from p2ch.fileio import write_text_atomic

log = logging.getLogger("p2ch.predict")

PROG = "python -m p2ch.predict"
LOCATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ")
SUBMISSION_COLUMNS = (*LOCATION_COLUMNS, "probability")
OUTSIDE_MODES = ("skip", "error")


# ---------------------------------------------------------------------------------------------
# checkpoints


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a loaded checkpoint says about itself (for reports and metrics.json).

    path: absolute path; sha1: of the file; config: the training run's `TrainingConfig`.
    """

    path: Path
    sha1: str
    arch: str
    epoch: int | None
    samples_seen: int | None
    run_time: str | None
    selected_by: str | None
    best_metric: float | None
    config: Any  # p2ch.training.TrainingConfig (imported lazily)
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        best = self.best_metric
        return {
            "path": str(self.path),
            "sha1": self.sha1,
            "arch": self.arch,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "run_time": self.run_time,
            "selected_by": self.selected_by,
            "best_metric": best if best is not None and math.isfinite(best) else None,
            "versions": dict(self.versions),
        }


def resolve_checkpoint(checkpoint: str | os.PathLike[str] | None, models_dir: str | os.PathLike[str] | None) -> Path:
    """The checkpoint file to use.

    checkpoint: a .pt file, or a folder (then the newest best.pt under it); None: the newest
    best.pt under `models_dir` (argument, else $P2CH_MODELS_DIR, else data-unversioned/models).
    Raises DataNotFoundError naming the path and how to get a checkpoint.
    """
    from p2ch.checkpoint import find_latest
    from p2ch.config import resolve_models_dir

    if checkpoint is not None and str(checkpoint) != "":
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            return find_latest(path).absolute()
        if not path.is_file():
            raise DataNotFoundError(
                f"--checkpoint {path}: no such file or folder; pass a best.pt or last.pt written by "
                "python -m p2ch.training (or its run folder), or leave --checkpoint out to use the newest "
                "best.pt under --models-dir"
            )
        return path.absolute()
    return find_latest(resolve_models_dir(models_dir)).absolute()


def load_model(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, CheckpointInfo]:
    """A `LunaModel` (CPU, eval mode) with the checkpoint's weights, and what the checkpoint says.

    Refuses (ConfigError) a checkpoint of another architecture, and (DataFormatError) files that
    are not p2ch training checkpoints or whose weights or config do not load.
    """
    from p2ch.checkpoint import load_checkpoint, sha1_of
    from p2ch.config import TrainingConfig
    from p2ch.model import LunaModel, arch_signature

    path = Path(path).absolute()
    try:
        state = load_checkpoint(path)
    except DataFormatError as exc:
        if "not a readable checkpoint" not in str(exc):
            raise
        # torch's own message here is long and suggests weights_only=False, which would run code from the file.
        raise DataFormatError(
            f"{path}: not a checkpoint that torch.load(weights_only=True) can read; expected a best.pt or last.pt "
            "written by python -m p2ch.training"
        ) from None
    model = LunaModel()
    expected = arch_signature(model)
    found = state.get("arch")
    versions = {str(k): str(v) for k, v in (state.get("versions") or {}).items()}
    if found != expected:
        raise ConfigError(
            f"{path}: checkpoint is for model architecture {found!r}, but this p2ch's LunaModel is {expected!r}; "
            f"score it with the p2ch version that trained it (p2ch {versions.get('p2ch', '?')}), or train anew"
        )
    missing = [key for key in ("model", "config") if not isinstance(state.get(key), dict)]
    if missing:
        raise DataFormatError(
            f"{path}: checkpoint has no {' or '.join(missing)} entry; expected a checkpoint written by "
            "python -m p2ch.training (best.pt or last.pt)"
        )
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:300]
        raise DataFormatError(f"{path}: the model weights do not load into LunaModel ({reason})") from None
    try:
        config = TrainingConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"{path}: the training config stored in the checkpoint is unusable ({exc})") from None
    model.eval()

    def optional(key: str, kind: type) -> Any:
        value = state.get(key)
        return kind(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None

    info = CheckpointInfo(
        path=path,
        sha1=sha1_of(path),
        arch=str(found),
        epoch=optional("epoch", int),
        samples_seen=optional("samples_seen", int),
        run_time=optional("run_time", str),
        selected_by=optional("selected_by", str),
        best_metric=optional("best_metric", float),
        config=config,
        versions=versions,
    )
    return model, info


# ---------------------------------------------------------------------------------------------
# inference


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
    def __call__(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks: (N, 1, I, R, C) int16 HU (CPU or device). Returns (N,) float32 P(nodule) on the device.

        Results stay on the device, so a loop can collect them and copy once at the end.
        """
        from p2ch.datasets import to_device_batch

        x = to_device_batch(chunks, self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.amp_dtype is None:
            _, prob = self.model(x)
        else:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                _, prob = self.model(x)
        return prob[:, 1].float()


def make_scorer(model: torch.nn.Module, device: str = "auto", amp: str = "auto", channels_last: str = "on") -> Scorer:
    """A Scorer from the command-line spellings (--device auto|cpu|cuda|cuda:N, --amp, --channels-last)."""
    from p2ch.runtime import resolve_amp, resolve_device

    if amp not in AMP_MODES:
        raise ConfigError(f"--amp {amp!r}: expected one of {', '.join(AMP_MODES)}")
    if channels_last not in ("on", "off"):
        raise ConfigError(f"--channels-last {channels_last!r}: expected on or off")
    torch_device = resolve_device(device)
    return Scorer(model, torch_device, resolve_amp(amp, torch_device), channels_last == "on")


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


def predict_locations(
    scorer: Scorer,
    data_root: str | os.PathLike[str],
    locations: pd.DataFrame,
    *,
    width_irc: Sequence[int] = (32, 48, 48),
    batch_size: int = DEFAULT_BATCH_SIZE,
    outside: str = "skip",
    skip_missing_series: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, PredictStats]:
    """Score candidate locations straight from the CTs (one load per CT, no cache).

    locations: DataFrame with seriesuid (str) and coordX, coordY, coordZ (float, mm), one row per
        candidate; other columns are ignored.
    Returns `(probability, stats)`: probability (N,) float64 P(nodule) per row, in row order, nan
    for skipped rows (see `PredictStats`). outside: "skip" rows whose centre lies outside the CT
    (counted) or "error" (CandidateOutsideCtError). skip_missing_series: False makes a series
    without a .mhd under `data_root` an error (DataNotFoundError) instead of skipped rows.
    """
    from p2ch.ct import Ct
    from p2ch.luna import series_index
    from p2ch.progress import Progress

    if outside not in OUTSIDE_MODES:
        raise ConfigError(f"--outside {outside!r}: expected one of {', '.join(OUTSIDE_MODES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r}: expected a positive integer")
    width = tuple(int(v) for v in width_irc)
    started = time.perf_counter()
    uids = locations["seriesuid"].astype(str).to_numpy()
    centers = locations[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64).reshape(-1, 3)
    probability = np.full(len(uids), np.nan, dtype=np.float64)
    codes, series = pd.factorize(uids)
    order = np.argsort(codes, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1) if len(order) else []
    on_disk = series_index(data_root)
    todo: list[tuple[str, np.ndarray]] = []
    not_on_disk = not_on_disk_series = 0
    for rows in groups:
        uid = str(series[codes[rows[0]]])
        if uid in on_disk:
            todo.append((uid, rows))
        elif skip_missing_series:
            not_on_disk += len(rows)
            not_on_disk_series += 1
        else:
            from p2ch.luna import find_mhd

            find_mhd(uid, data_root)  # raises DataNotFoundError saying where it looked
    if not_on_disk:
        log.warning(
            "%d candidate row(s) of %d series skipped: no .mhd under %s/subset*/ (first %s)",
            not_on_disk,
            not_on_disk_series,
            data_root,
            next(str(series[codes[r[0]]]) for r in groups if str(series[codes[r[0]]]) not in on_disk),
        )
    total = sum(len(rows) for _, rows in todo)
    outside_count = 0
    results: list[tuple[np.ndarray, torch.Tensor]] = []
    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2ch-ct") as pool,
        Progress(total, "scoring", "candidates", enabled=progress) as bar,
    ):
        # Read the next CT while the model scores this one (SimpleITK's read releases the GIL).
        pending = pool.submit(Ct, todo[0][0], data_root) if todo else None
        for position, (uid, rows) in enumerate(todo):
            ct = pending.result()
            pending = pool.submit(Ct, todo[position + 1][0], data_root) if position + 1 < len(todo) else None
            centers_irc = np.atleast_2d(np.asarray(ct.xyz2irc(centers[rows])))
            inside = np.all((centers_irc >= 0) & (centers_irc < np.asarray(ct.hu.shape)), axis=1)
            if not inside.all():
                k = int(np.flatnonzero(~inside)[0])
                if outside == "error":
                    raise CandidateOutsideCtError(
                        f"candidate centre {tuple(round(float(v), 2) for v in centers[rows[k]])} mm (row "
                        f"{int(rows[k])}) lies outside CT {uid} (voxel {tuple(int(v) for v in centers_irc[k])}, "
                        f"volume {tuple(int(v) for v in ct.hu.shape)} index/row/col; {int((~inside).sum())} of "
                        f"{len(rows)} centres are outside); check the CSV coordinates, or pass --outside skip"
                    )
                outside_count += int((~inside).sum())
                bar.update(int((~inside).sum()))
            kept = rows[inside]
            for start in range(0, len(kept), batch_size):
                batch_rows = kept[start : start + batch_size]
                chunks, _ = ct.get_raw_candidates(centers[batch_rows], width)
                results.append((batch_rows, scorer(torch.from_numpy(chunks).unsqueeze(1))))
                bar.update(len(batch_rows))
            del ct
    if outside_count:
        log.warning("%d candidate row(s) skipped: centre outside the CT volume", outside_count)
    if results:
        rows = np.concatenate([r for r, _ in results])
        probability[rows] = torch.cat([p for _, p in results]).cpu().numpy().astype(np.float64)
    stats = PredictStats(
        rows=len(uids),
        scored=int(np.isfinite(probability).sum()),
        outside=outside_count,
        not_on_disk=not_on_disk,
        not_on_disk_series=not_on_disk_series,
        cts=len(todo),
        seconds=time.perf_counter() - started,
    )
    return probability, stats


def read_locations(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Candidate locations from a CSV: seriesuid, coordX, coordY, coordZ (mm); other columns ignored.

    Returns a DataFrame with exactly those columns, in file order (duplicates kept). Raises
    DataNotFoundError for a missing file, DataFormatError for missing columns, bad values or no rows.
    """
    from p2ch.candidates import read_luna_csv

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"--candidates {path}: no such file; expected a CSV with the columns {','.join(LOCATION_COLUMNS)}"
        )
    frame = read_luna_csv(path, LOCATION_COLUMNS)
    if frame.empty:
        raise DataFormatError(f"{path}: no candidate rows after the header {','.join(LOCATION_COLUMNS)}")
    return frame


def write_csv(frame: pd.DataFrame, out: str | os.PathLike[str]) -> None:
    """Write `frame` as CSV to `out` ("-": stdout) atomically (temporary file, then rename)."""
    if str(out) == "-":
        frame.to_csv(sys.stdout, index=False)
        sys.stdout.flush()
        return
    write_text_atomic(Path(out), frame.to_csv(index=False))


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (some library messages embedded in ours span several)."""
    return " ".join(str(exc).split())


# ---------------------------------------------------------------------------------------------
# command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score candidate locations of CTs with a trained LunaModel checkpoint and write "
        "seriesuid,coordX,coordY,coordZ,probability as CSV. Loads each CT once; needs no chunk cache.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Examples: python -m p2ch.predict --series 1.3.6.1.4.1.14519.5.2.1.6279.6001.1051... "
        "--out one_ct.csv; python -m p2ch.predict --candidates detector.csv --out scores.csv "
        "(a CSV without a class column is fine)",
    )
    add_model_arguments(parser)

    g = parser.add_argument_group("input")
    g.add_argument(
        "--data-root",
        default=None,
        help="LUNA16-layout root with subset*/<uid>.mhd (default: the checkpoint's training data "
        "root, else $P2CH_DATA_ROOT or data-unversioned/part2/luna)",
    )
    g.add_argument(
        "--series",
        nargs="+",
        default=None,
        metavar="UID",
        help="score only these CTs (default: every CT under the root that the candidates CSV names)",
    )
    g.add_argument(
        "--candidates",
        default=None,
        metavar="CSV",
        help="candidate locations, columns seriesuid,coordX,coordY,coordZ (mm), others ignored "
        "(default: candidates.csv or candidates_V2.csv in the data root)",
    )
    g.add_argument(
        "--outside",
        choices=OUTSIDE_MODES,
        default="skip",
        help="candidates whose centre lies outside their CT: skip them (counted in a warning) or stop",
    )

    g = parser.add_argument_group("output")
    g.add_argument("--out", default="-", metavar="CSV", help="output CSV file; - writes to stdout")

    add_inference_arguments(parser.add_argument_group("speed"))
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (logs and the progress bar go to stderr)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from p2ch.config import resolve_data_root
    from p2ch.luna import check_series_uid, find_candidates_file, find_mhd
    from p2ch.runtime import configure_logging

    args = get_args_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size {args.batch_size}: expected a positive integer")
        checkpoint = resolve_checkpoint(args.checkpoint, args.models_dir)
        model, info = load_model(checkpoint)
        data_root = resolve_data_root(args.data_root or info.config.data_root)
        candidates_path = Path(args.candidates) if args.candidates else find_candidates_file(data_root)
        locations = read_locations(candidates_path)
        if args.series:
            wanted = list(dict.fromkeys(check_series_uid(uid.strip()) for uid in args.series))
            for uid in wanted:
                find_mhd(uid, data_root)
            present = set(locations["seriesuid"])
            absent = [uid for uid in wanted if uid not in present]
            if absent:
                more = f"; {len(absent)} of the requested series have none" if len(absent) > 1 else ""
                raise DataNotFoundError(
                    f"series {absent[0]}: no candidates in {candidates_path} ({locations['seriesuid'].nunique()} "
                    f"series listed there{more}); pass --candidates with this CT's candidate locations"
                )
            locations = locations[locations["seriesuid"].isin(wanted)].reset_index(drop=True)
        scorer = make_scorer(model, args.device, args.amp, args.channels_last)
        log.info(
            "scoring %d candidate(s) of %d series from %s with %s (epoch %s, sha1 %s) on %s, AMP %s",
            len(locations),
            locations["seriesuid"].nunique(),
            candidates_path,
            checkpoint,
            info.epoch,
            info.sha1[:12],
            scorer.device,
            scorer.amp_dtype or "off",
        )
        probability, stats = predict_locations(
            scorer,
            data_root,
            locations,
            width_irc=info.config.width_irc,
            batch_size=args.batch_size,
            outside=args.outside,
            skip_missing_series=not args.series,
        )
        if stats.scored == 0:
            raise DataNotFoundError(
                f"none of the {stats.rows} candidate rows of {candidates_path} could be scored ({stats.not_on_disk} "
                f"of series without a .mhd under {data_root}/subset*/, {stats.outside} outside their CT); "
                "check --data-root and --candidates"
            )
        result = locations[list(LOCATION_COLUMNS)].assign(probability=probability)
        result = result[np.isfinite(probability)].reset_index(drop=True)
        write_csv(result, args.out)
        log.info(
            "scored %d candidate(s) of %d CT(s) in %.1f s (%.0f candidates/s); skipped %d outside their CT, "
            "%d of series not on disk%s",
            stats.scored,
            stats.cts,
            stats.seconds,
            stats.candidates_per_sec,
            stats.outside,
            stats.not_on_disk,
            "" if args.out == "-" else f"; wrote {args.out}",
        )
        return 0
    except P2chError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
