"""`python -m p2ch.evaluate`: score a checkpoint the LUNA16 way (FROC / CPM) and write a submission.

    python -m p2ch.evaluate                                  # newest best.pt, its validation split
    python -m p2ch.evaluate --split test --pictures 16       # the held-out test part, with pictures
    python -m p2ch.evaluate --checkpoint run/best.pt --series 1.3.6.1.4.1.14519.5.2.1.6279.6001.1051...

What is scored: `--split val|test|all` recomputes the split from the settings stored in the
checkpoint (split mode, fractions, subsets; the series split hashes uids and needs no seed), so
`val` is exactly the validation part the run was selected on and `test` the part it never saw;
`--series` scores the given CTs, and metrics.json counts how many of them the run trained on.
Every candidate of the chosen CTs is scored, in batches under `torch.inference_mode` (bf16
autocast on GPUs by default), through the chunk cache: chunks that are not cached yet are
cropped first, one CT load per CT, and stored for the next run (`--no-cache` crops from the
CTs in memory instead and writes nothing).

Written into `--out` (default `data-unversioned/eval/<run>-<checkpoint>-<split>/`):

    submission.csv   LUNA16 submission: seriesuid,coordX,coordY,coordZ,probability, one row per candidate
    metrics.json     CPM with its bootstrap CI, sensitivities at 1/8 … 8 FPs per scan with CIs, AUC,
                     average precision, precision / recall / F1 at --threshold, counts, the
                     checkpoint (path, sha1, epoch) and the settings; JSON null where undefined
    froc.png         the FROC curve on a log axis from 1/8 to 8 FPs per scan, its seven points and CI band
    froc_curve.csv   the curve's points: fps_per_scan, sensitivity, threshold
    report.txt       the short summary that is also printed
    pictures/        with --pictures N: sheets of the N most confident false positives and of up
                     to N missed nodules (see p2ch.vis), and their index.csv

`--task malignancy` scores a malignancy classifier (python -m p2ch.training --malignant) on the
annotated nodules of annotations_with_malignancy.csv instead (same split rules, same cache) and writes

    nodules.csv      one row per nodule: seriesuid, coordX/Y/Z, diameter_mm, mal_bool (the label),
                     p_malignant, predicted_malignant (p_malignant > --threshold), correct
    metrics.json     AUC with a stratified bootstrap CI (benign and malignant nodules resampled
                     separately), sensitivity and specificity at --threshold, counts, checkpoint, settings
    roc.png          the ROC curve with the operating point at --threshold; roc_curve.csv its points
    report.txt       the short summary that is also printed

Each task refuses the other task's model (and a segmentation model) in one line; without --checkpoint
the newest best.pt of the task's kind under --models-dir is used.

FROC and CPM follow LUNA16's protocol (`p2ch.metrics.froc`): false positives are averaged over
every evaluated CT, including CTs without nodules. When the evaluated CTs hold no annotated
nodule, CPM is undefined: null in metrics.json, said so in the plot and the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
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

from p2ch.cache import ChunkCache
from p2ch.candidates import (
    CandidateArrays,
    csv_line,
    get_task_arrays,
    group_rows,
    read_reference,
    submission_frame,
)
from p2ch.checkpoint import CheckpointInfo, load_model, resolve_checkpoint, versions
from p2ch.cli import configure_logging, run_cli
from p2ch.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EVAL_DIR,
    TASKS,
    DefaultsHelpFormatter,
    TrainingConfig,
    add_inference_arguments,
    add_model_arguments,
    check_finite_settings,
    check_output_dir,
    inference_batch_size,
    resolve_cache_dir,
    resolve_data_root,
)
from p2ch.datasets import Split, split_candidates
from p2ch.errors import ConfigError, DataNotFoundError, P2chError
from p2ch.fileio import write_text_atomic
from p2ch.geometry import check_width_irc
from p2ch.inference import OutsideReport, Scorer, make_scorer, predict_locations, score_from_cache
from p2ch.luna import ANNOTATION_COLUMNS, MALIGNANCY_FILE, check_series_uid, find_candidates_file, series_index
from p2ch.metrics import (
    AucResult,
    FrocResult,
    RocCurve,
    auc_with_ci,
    classification_summary,
    confusion_counts,
    froc,
    roc_curve,
    sensitivity_specificity,
)
from p2ch.plots import fp_label, froc_figure, roc_figure, save_figure_png
from p2ch.prefill import fill_missing
from p2ch.runtime import check_loader_shared_memory, configure_backends, shared_memory_errors
from p2ch.vis import write_pictures

log = logging.getLogger("p2ch.evaluate")

PROG = "python -m p2ch.evaluate"
METRICS_FORMAT = "p2ch-eval-v1"
SPLITS = ("val", "test", "all")
SUBMISSION_FILE = "submission.csv"
METRICS_FILE = "metrics.json"
FROC_PLOT_FILE = "froc.png"
NODULES_FILE = "nodules.csv"  # --task malignancy: one row per nodule
ROC_PLOT_FILE = "roc.png"
ROC_CURVE_FILE = "roc_curve.csv"
FROC_CURVE_FILE = "froc_curve.csv"
REPORT_FILE = "report.txt"
PICTURES_DIR = "pictures"
SPLIT_SETTINGS = ("split", "val_fraction", "val_stride", "val_subsets", "test_fraction", "test_subsets")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Every setting of an evaluation; logged once and saved in metrics.json."""

    checkpoint: str | None = None
    models_dir: str | None = None
    task: str = "nodule"
    split: str = "val"
    series: tuple[str, ...] = ()
    data_root: str | None = None
    cache_dir: str | None = None
    no_cache: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int | None = None
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "on"
    cudnn_benchmark: str = "on"
    threshold: float = 0.5
    bootstrap: int = 1000
    seed: int = 0
    confidence: float = 0.95
    out: str | None = None
    pictures: int = 0
    progress: bool = True
    log_level: str = "INFO"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check_finite_settings(self)
        need(self.task in TASKS, f"--task {self.task!r}: expected one of {', '.join(TASKS)}")
        need(self.split in SPLITS, f"--split {self.split!r}: expected one of {', '.join(SPLITS)}")
        need(self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}")
        need(self.num_workers is None or self.num_workers >= 0, f"--num-workers must be ≥ 0, got {self.num_workers}")
        need(0.0 <= self.threshold <= 1.0, f"--threshold must be a probability in [0, 1], got {self.threshold}")
        need(self.bootstrap >= 0, f"--bootstrap must be ≥ 0 (0: no confidence interval), got {self.bootstrap}")
        need(0.0 < self.confidence < 1.0, f"--confidence must be in (0, 1), e.g. 0.95, got {self.confidence}")
        need(self.pictures >= 0, f"--pictures must be ≥ 0, got {self.pictures}")
        need(self.seed >= 0, f"--seed must be ≥ 0, got {self.seed}")
        need(
            not (self.task == "malignancy" and self.pictures),
            "--pictures draws the nodule task's false positives and missed nodules; drop it with --task malignancy",
        )


# ---------------------------------------------------------------------------------------------
# what to score


@dataclasses.dataclass(frozen=True)
class Selection:
    """The candidates to score.

    name: "val", "test", "all" or "series". indices: (n,) int64 candidate rows, grouped by
    series (stable within a series). series_uids: (s,) str, sorted, the evaluated scans.
    series_in_training: how many of them were in the checkpoint's training part (None: unknown).
    """

    name: str
    indices: np.ndarray
    series_uids: np.ndarray
    series_in_training: int | None
    split_mode: str | None


def _split_of(candidates: CandidateArrays, train_config: TrainingConfig, data_root: Path) -> Split:
    return split_candidates(candidates, train_config.split, **train_config.split_settings(), data_root=data_root)


def _rows_of_series(
    candidates: CandidateArrays, series: Sequence[str], data_root: Path
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, sorted uids) of the CTs named by --series; DataNotFoundError for one without candidates."""
    all_uids = np.asarray(candidates.series_uids, dtype=str)
    wanted = list(dict.fromkeys(check_series_uid(str(uid).strip()) for uid in series))
    known = set(all_uids.tolist())
    absent = [uid for uid in wanted if uid not in known]
    if absent:
        where = "has no .mhd under" if absent[0] not in series_index(data_root) else "has no candidates in"
        raise DataNotFoundError(
            f"--series {absent[0]} {where} the data root {data_root} ({len(known)} series with candidates "
            f"there{f'; {len(absent)} of the {len(wanted)} requested are unknown' if len(absent) > 1 else ''}); "
            "check the uid and --data-root"
        )
    rows = np.flatnonzero(np.isin(all_uids[candidates.series_index], wanted))
    return rows, np.array(sorted(wanted), dtype=str)


def _rows_of_split(
    candidates: CandidateArrays, split_obj: Split, split: str, train_config: TrainingConfig, data_root: Path
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, sorted uids) of one part of the checkpoint's split ("all": every candidate)."""
    if split == "all":
        all_uids = np.asarray(candidates.series_uids, dtype=str)
        rows, uids = np.arange(len(candidates), dtype=np.int64), np.unique(all_uids[candidates.series_index])
    else:
        rows, uids = getattr(split_obj, split), getattr(split_obj, f"{split}_series")
    if len(rows) == 0:
        raise ConfigError(
            f"--split {split}: the checkpoint's split ({train_config.split}, test_fraction "
            f"{train_config.test_fraction:g}, test_subsets {list(train_config.test_subsets)}) has no {split} "
            f"part on {data_root}; train with --test-fraction or --test-subsets to hold out a test part, or "
            "evaluate --split val, --split all or --series UID"
        )
    return rows, uids


def select_candidates(
    candidates: CandidateArrays,
    train_config: TrainingConfig,
    data_root: Path,
    split: str = "val",
    series: Sequence[str] = (),
) -> Selection:
    """The candidate rows of `split` (recomputed with the checkpoint's split settings) or of `series`.

    Raises ConfigError for an empty split, DataNotFoundError for a series without candidates.
    """
    split_obj = None
    try:
        split_obj = _split_of(candidates, train_config, data_root)
    except P2chError:  # explicit --series still works when the stored split does not apply here
        if not series:
            raise
    if series:
        name, (rows, uids) = "series", _rows_of_series(candidates, series, data_root)
    else:
        assert split_obj is not None
        name, (rows, uids) = split, _rows_of_split(candidates, split_obj, split, train_config, data_root)
    rows = np.asarray(rows, dtype=np.int64)
    # Grouped by series, so a cold cache loads each CT once and pictures come CT by CT.
    rows = rows[np.argsort(candidates.series_index[rows], kind="stable")]
    in_training = None if split_obj is None else int(np.isin(uids, split_obj.train_series).sum())
    mode = None if split_obj is None else split_obj.mode
    return Selection(name, rows, np.asarray(uids, dtype=str), in_training, mode)


# ---------------------------------------------------------------------------------------------
# scoring


@dataclasses.dataclass(frozen=True)
class EvalInputs:
    """What one evaluation scores, with what, and against what; all resolved before the first chunk is read.

    checkpoint: absolute path of the .pt file. width_irc: the chunk size the model was trained on.
    annotations / excluded: the reference rows of the evaluated scans (excluded None without
    annotations_excluded.csv). out_dir: where the files go (checked, not created yet).
    """

    checkpoint: Path
    info: CheckpointInfo
    data_root: Path
    candidates: CandidateArrays
    selection: Selection
    annotations: pd.DataFrame
    excluded: pd.DataFrame | None
    scorer: Scorer
    width_irc: tuple[int, int, int]
    out_dir: Path


@dataclasses.dataclass(frozen=True)
class Scores:
    """What `score_selection` produced.

    probability: (n,) float64 P(nodule), in `Selection.indices` order. seconds: inference time
    (without filling the cache). chunks_cached_now: chunks written to the cache first.
    cache_dir / num_workers: None with --no-cache.
    """

    probability: np.ndarray
    seconds: float
    chunks_cached_now: int
    cache_dir: str | None
    num_workers: int | None


def default_out_dir(checkpoint: Path, selection_name: str, series: Sequence[str] = ()) -> Path:
    """`data-unversioned/eval/<run folder>-<checkpoint stem>-<split>` (for --series: `series-<hash>`)."""
    label = selection_name
    if selection_name == "series":
        label = "series-" + hashlib.sha1("\n".join(sorted(series)).encode()).hexdigest()[:8]
    return DEFAULT_EVAL_DIR / f"{checkpoint.parent.name}-{checkpoint.stem}-{label}"


def prepare(config: EvalConfig) -> EvalInputs:
    """Load the checkpoint, the candidates and the reference, and choose what to score (nothing scored yet)."""
    checkpoint = resolve_checkpoint(config.checkpoint, config.models_dir, task=config.task)
    hint = " (--task malignancy scores a malignancy model)" if config.task == "nodule" else ""
    model, info = load_model(checkpoint, task=config.task, use=f"{PROG} --task {config.task}{hint}")
    data_root = resolve_data_root(config.data_root or info.config.data_root)
    candidates = get_task_arrays(data_root, config.task)  # malignancy: the annotated nodules, not candidates
    selection = select_candidates(candidates, info.config, data_root, config.split, config.series)
    if config.task == "malignancy":
        annotations, excluded = pd.DataFrame(columns=list(ANNOTATION_COLUMNS)), None
    else:
        annotations, excluded = read_reference(data_root, selection.series_uids)
    out_dir = Path(config.out) if config.out else default_out_dir(checkpoint, selection.name, config.series)
    check_output_dir(out_dir, "--out")  # every output location, before the first chunk is read
    if not config.no_cache:
        check_output_dir(resolve_cache_dir(config.cache_dir or info.config.cache_dir), "--cache-dir")
    scorer = make_scorer(model, config.device, config.amp, config.channels_last)
    configure_backends(scorer.device, config.cudnn_benchmark == "on")
    return EvalInputs(
        checkpoint=checkpoint,
        info=info,
        data_root=data_root,
        candidates=candidates,
        selection=selection,
        annotations=annotations,
        excluded=excluded,
        scorer=scorer,
        width_irc=check_width_irc(info.config.width_irc),
        out_dir=out_dir,
    )


def _default_num_workers(device: torch.device) -> int:
    # On the CPU the model is the bottleneck and 2 workers gain 10-20% (BENCHMARKS.md); a GPU needs more.
    return min(2 if device.type == "cpu" else 8, os.cpu_count() or 1)


def _score_through_cache(inputs: EvalInputs, config: EvalConfig) -> Scores:
    cache_dir = resolve_cache_dir(config.cache_dir or inputs.info.config.cache_dir)
    cache = ChunkCache(cache_dir, inputs.data_root)
    indices = inputs.selection.indices
    workers = config.num_workers if config.num_workers is not None else _default_num_workers(inputs.scorer.device)
    # CT by CT (one load each) in as many processes as the loader has workers: the cache is then warm for the
    # DataLoader workers below, which would otherwise load a whole CT for every chunk they miss.
    written = fill_missing(
        cache, inputs.candidates, indices, inputs.width_irc, num_workers=min(workers, 8), progress=config.progress
    )
    _check_all_cached(inputs, config, cache)
    started = time.perf_counter()  # the rate reported is inference from the (now warm) cache
    # A sample hands over its int16 chunk, label and centre (int64) through shared memory.
    check_loader_shared_memory([math.prod(inputs.width_irc) * 2 + 32], config.batch_size, workers, reuse=True)
    with shared_memory_errors(f"--batch-size {config.batch_size}, --num-workers {workers}"):
        probability = score_from_cache(
            inputs.scorer,
            inputs.candidates,
            indices,
            cache,
            width_irc=inputs.width_irc,
            batch_size=config.batch_size,
            num_workers=workers,
            progress=config.progress,
        )
    return Scores(probability, time.perf_counter() - started, written, str(cache.cache_dir), workers)


def _check_all_cached(inputs: EvalInputs, config: EvalConfig, cache: ChunkCache) -> None:
    """CandidateOutsideCtError naming the CSV line of a selected candidate outside its CT.

    `fill_missing` caches every chunk it can and skips centres outside their CT, so a chunk still
    missing is one of those: its CT is loaded again here to say which, as --no-cache does.
    """
    candidates, indices = inputs.candidates, inputs.selection.indices
    left = np.zeros(len(indices), dtype=bool)
    for rows in group_rows(candidates.series_index[indices]):
        uid = candidates.series_uid(int(indices[rows[0]]))
        left[rows] = cache.missing(uid, np.ascontiguousarray(candidates.center_xyz[indices[rows]]), inputs.width_irc)
    if left.any():
        _score_from_cts(inputs, config, np.flatnonzero(left))


def _outside_report(inputs: EvalInputs, config: EvalConfig, rows: np.ndarray) -> OutsideReport:
    """How an evaluated candidate outside its CT is named: the file and line it was read from."""
    malignancy = config.task == "malignancy"
    path = inputs.data_root / MALIGNANCY_FILE if malignancy else find_candidates_file(inputs.data_root)
    candidates = inputs.candidates

    def where(row: int) -> str:
        k = int(rows[row])
        return csv_line(path, candidates.series_uid(k), candidates.center_xyz[k])

    return OutsideReport(where=where, fix="correct its coordinates in the CSV, or remove the row")


def _score_from_cts(inputs: EvalInputs, config: EvalConfig, positions: np.ndarray | None = None) -> Scores:
    """Score the selection (or its `positions`) from the CTs; a candidate outside its CT is an error."""
    started = time.perf_counter()
    rows = inputs.selection.indices if positions is None else inputs.selection.indices[positions]
    probability, _ = predict_locations(
        inputs.scorer,
        inputs.data_root,
        submission_frame(inputs.candidates, rows, np.zeros(len(rows))),
        width_irc=inputs.width_irc,
        batch_size=config.batch_size,
        outside="error",
        skip_missing_series=False,
        progress=config.progress and positions is None,
        report=_outside_report(inputs, config, rows),
    )
    return Scores(probability, time.perf_counter() - started, 0, None, None)


def score_selection(inputs: EvalInputs, config: EvalConfig) -> Scores:
    """P(nodule) of every selected candidate: through the chunk cache (filled first), or with
    --no-cache cropped from the CTs in memory (one load per CT, nothing written)."""
    if config.no_cache:
        return _score_from_cts(inputs, config)
    return _score_through_cache(inputs, config)


# ---------------------------------------------------------------------------------------------
# metrics, plot, report


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def compute_metrics(
    predictions: pd.DataFrame,
    labels: np.ndarray,
    annotations: pd.DataFrame,
    excluded: pd.DataFrame | None,
    series_uids: Sequence[str],
    *,
    threshold: float,
    bootstrap: int,
    seed: int,
    confidence: float,
) -> tuple[FrocResult, dict[str, Any]]:
    """(FrocResult, classification dict) for one evaluation.

    predictions: submission rows; labels: (n,) bool, candidate k is a nodule (candidates.csv class);
    annotations / excluded: rows of the evaluated scans; series_uids: the evaluated scans.
    """
    result = froc(
        predictions,
        annotations,
        excluded,
        series_uids=list(series_uids),
        bootstrap=bootstrap,
        seed=seed,
        confidence=confidence,
    )
    prob = torch.tensor(predictions["probability"].to_numpy(dtype=np.float64))
    summary = classification_summary(torch.tensor(np.asarray(labels, dtype=bool)), prob, threshold=threshold)
    classification = {
        "threshold": threshold,
        "rule": "positive when probability > threshold",
        "auc": _number(summary["pr/auc"]),
        "average_precision": _number(summary["pr/average_precision"]),
        "precision": _number(summary["pr/precision"]),
        "recall": _number(summary["pr/recall"]),
        "f1": _number(summary["pr/f1_score"]),
        **{key: int(summary[f"count/{key}"]) for key in ("tp", "fp", "tn", "fn")},
    }
    return result, classification


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_report(metrics: dict[str, Any]) -> str:
    """The human summary of a metrics.json dict (a few lines, also printed)."""
    ck, sel, counts, fr, cls = (metrics[k] for k in ("checkpoint", "selection", "counts", "froc", "classification"))
    nodules = f"{counts['nodules']:,} annotated nodule{'' if counts['nodules'] == 1 else 's'}"
    lines = [
        f"p2ch evaluation of {ck['path']} (epoch {ck['epoch']}, sha1 {ck['sha1'][:12]})",
        f"{sel['name']}: {counts['scans']:,} scans, {counts['candidates']:,} candidates "
        f"({counts['positives']:,} positive), {nodules}"
        + (f", split mode {sel['split_mode']}" if sel.get("split_mode") else ""),
    ]
    if sel.get("series_in_training"):
        lines.append(
            f"WARNING: {sel['series_in_training']} of these scans were in the checkpoint's training part; "
            "the scores below are optimistic"
        )
    if fr["cpm"] is None:
        lines.append("CPM: undefined (no annotated nodules in these scans)")
    else:
        ci = fr["cpm_ci"]
        interval = (
            f" ({fr['confidence']:.0%} CI {_fmt(ci[0])}–{_fmt(ci[1])}, {fr['bootstrap']} bootstraps)"
            if ci[0] is not None
            else ""
        )
        lines.append(f"CPM {_fmt(fr['cpm'])}{interval}")
        sens = fr["sensitivities"]
        lines.append(
            "sensitivity at " + ", ".join(f"{fp_label(float(k))}: {_fmt(v, 2)}" for k, v in sens.items()) + " FPs/scan"
        )
        if fr["num_detected"] < fr["num_nodules"]:
            lines.append(
                f"candidates hit {fr['num_detected']} of {fr['num_nodules']} nodules; the other "
                f"{fr['num_nodules'] - fr['num_detected']} are missed at any threshold"
            )
    lines.append(f"AUC {_fmt(cls['auc'])}, average precision {_fmt(cls['average_precision'])}")
    lines.append(
        f"at threshold {cls['threshold']:g}: precision {_fmt(cls['precision'])}, recall "
        f"{_fmt(cls['recall'])}, F1 {_fmt(cls['f1'])} (tp {cls['tp']}, fp {cls['fp']}, fn {cls['fn']}, "
        f"tn {cls['tn']})"
    )
    timing = metrics["timing"]
    lines.append(
        f"scored in {timing['scoring_seconds']:.1f} s ({timing['candidates_per_sec']:,.0f} candidates/s) "
        f"on {metrics['device']['name']}, AMP {metrics['device']['amp']}"
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the whole evaluation


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What `evaluate` produced: the metrics dict (as in metrics.json), the report and the output folder."""

    metrics: dict[str, Any]
    report: str
    out_dir: Path


def _what_was_scored(inputs: EvalInputs, scores: Scores) -> dict[str, Any]:
    """The "selection" and "data" parts of metrics.json."""
    selection, train_config = inputs.selection, inputs.info.config
    return {
        "selection": {
            "name": selection.name,
            "split_mode": selection.split_mode,
            "split_settings": {k: v for k, v in train_config.to_dict().items() if k in SPLIT_SETTINGS},
            "series_in_training": selection.series_in_training,
        },
        "data": {
            "data_root": str(inputs.data_root.absolute()),
            "cache_dir": scores.cache_dir,
            "candidates_file": find_candidates_file(inputs.data_root).name,
            "width_irc": list(inputs.width_irc),
        },
    }


def build_metrics_dict(
    config: EvalConfig, inputs: EvalInputs, scores: Scores, result: FrocResult, classification: dict[str, Any]
) -> dict[str, Any]:
    """The content of metrics.json (without "pictures" and timing.total_seconds, which come last)."""
    indices, scorer = inputs.selection.indices, inputs.scorer
    froc_dict = result.to_dict(include_curve=False)
    return {
        "format": METRICS_FORMAT,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpm": froc_dict["cpm"],
        "cpm_ci": froc_dict["cpm_ci"],
        "checkpoint": inputs.info.to_dict(),
        **_what_was_scored(inputs, scores),
        "counts": {
            "scans": len(inputs.selection.series_uids),
            "candidates": len(indices),
            "positives": int(inputs.candidates.is_nodule[indices].sum()),
            "nodules": result.num_nodules,
            "nodules_hit_by_candidates": result.num_detected,
            "excluded_findings": 0 if inputs.excluded is None else len(inputs.excluded),
            "predictions_on_excluded": result.num_excluded_predictions,
            "false_positives": result.num_false_positives,
            "chunks_cached_now": scores.chunks_cached_now,
        },
        "froc": froc_dict,
        "classification": classification,
        "device": {
            "name": str(scorer.device),
            "amp": str(scorer.amp_dtype).replace("torch.", "") if scorer.amp_dtype else "off",
            "channels_last": scorer.channels_last,
            "num_workers": scores.num_workers,
        },
        "timing": {
            "scoring_seconds": round(scores.seconds, 3),
            "candidates_per_sec": round(len(indices) / scores.seconds, 1) if scores.seconds > 0 else None,
        },
        "settings": config.to_dict(),
        "versions": versions(),
    }


def _write_pictures(config: EvalConfig, inputs: EvalInputs, predictions: pd.DataFrame) -> dict[str, Any]:
    """Draw the --pictures sheets; returns the "pictures" part of metrics.json."""
    pictures = write_pictures(
        predictions,
        inputs.annotations,
        inputs.excluded,
        inputs.data_root,
        inputs.out_dir / PICTURES_DIR,
        config.pictures,
        config.threshold,
    )
    return {
        "dir": PICTURES_DIR,
        "false_positives": pictures.false_positives,
        "missed_nodules": pictures.missed_nodules,
        "missed_nodules_total": pictures.missed_nodules_total,
        "sheets": [p.name for p in [*pictures.false_positive_sheets, *pictures.missed_nodule_sheets]],
    }


def write_outputs(
    config: EvalConfig,
    inputs: EvalInputs,
    predictions: pd.DataFrame,
    result: FrocResult,
    metrics: dict[str, Any],
    started: float,
) -> str:
    """Write every file into `inputs.out_dir` (metrics.json and report.txt last); returns the report.

    Adds "pictures" (with --pictures) and timing.total_seconds (since `started`, a perf_counter) to `metrics`.
    """
    out_dir = inputs.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / SUBMISSION_FILE, predictions.to_csv(index=False))
    pd.DataFrame(
        {"fps_per_scan": result.fps_per_scan, "sensitivity": result.sensitivity, "threshold": result.thresholds}
    ).to_csv(out_dir / FROC_CURVE_FILE, index=False)
    checkpoint, selection = inputs.checkpoint, inputs.selection
    title = (
        f"{checkpoint.parent.name}/{checkpoint.name} (epoch {inputs.info.epoch}) on {selection.name}: "
        f"{len(selection.series_uids)} scans, {result.num_nodules} nodules"
    )
    save_figure_png(froc_figure(result, title=title), out_dir / FROC_PLOT_FILE)
    if config.pictures:
        metrics["pictures"] = _write_pictures(config, inputs, predictions)
    metrics["timing"]["total_seconds"] = round(time.perf_counter() - started, 3)
    report = format_report(metrics)
    report += f"wrote {out_dir}/: {SUBMISSION_FILE}, {METRICS_FILE}, {FROC_PLOT_FILE}, {REPORT_FILE}"
    report += f", {PICTURES_DIR}/ ({len(metrics['pictures']['sheets'])} sheets)\n" if config.pictures else "\n"
    write_text_atomic(out_dir / METRICS_FILE, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    write_text_atomic(out_dir / REPORT_FILE, report)
    return report


def _log_start(inputs: EvalInputs) -> None:
    indices = inputs.selection.indices
    if inputs.info.task == "malignancy":
        malignant = int(inputs.candidates.is_mal[indices].sum())
        what = f"{len(indices)} annotated nodules ({malignant} malignant, {len(indices) - malignant} benign)"
    else:
        what = f"{len(indices)} candidates, {len(inputs.annotations)} nodules"
    log.info(
        "evaluating %s (epoch %s) on %s: %d scans, %s; device %s, AMP %s; output %s",
        inputs.checkpoint,
        inputs.info.epoch,
        inputs.selection.name,
        len(inputs.selection.series_uids),
        what,
        inputs.scorer.device,
        inputs.scorer.amp_dtype or "off",
        inputs.out_dir,
    )


def evaluate(config: EvalConfig) -> EvalResult:
    """Run one evaluation (see the module docstring): prepare → score → metrics → write; returns the metrics."""
    config.validate()
    started = time.perf_counter()
    inputs = prepare(config)
    _log_start(inputs)
    scores = score_selection(inputs, config)
    if config.task == "malignancy":
        return evaluate_malignancy(config, inputs, scores, started)
    indices = inputs.selection.indices
    predictions = submission_frame(inputs.candidates, indices, scores.probability)
    result, classification = compute_metrics(
        predictions,
        inputs.candidates.is_nodule[indices],
        inputs.annotations,
        inputs.excluded,
        inputs.selection.series_uids,
        threshold=config.threshold,
        bootstrap=config.bootstrap,
        seed=config.seed,
        confidence=config.confidence,
    )
    metrics = build_metrics_dict(config, inputs, scores, result, classification)
    report = write_outputs(config, inputs, predictions, result, metrics, started)
    return EvalResult(metrics=metrics, report=report, out_dir=inputs.out_dir)


# ---------------------------------------------------------------------------------------------
# the malignancy task (--task malignancy): annotated nodules, benign vs malignant


def malignancy_table(
    candidates: CandidateArrays, indices: np.ndarray, probability: np.ndarray, threshold: float
) -> pd.DataFrame:
    """One row per scored nodule: seriesuid, coordX/Y/Z (mm), diameter_mm, mal_bool (the label),
    p_malignant, predicted_malignant (p_malignant > threshold) and correct."""
    xyz = candidates.center_xyz[indices]
    label = candidates.is_mal[indices].astype(bool)
    predicted = np.asarray(probability, dtype=np.float64) > threshold
    return pd.DataFrame(
        {
            "seriesuid": candidates.series_uids[candidates.series_index[indices]],
            "coordX": xyz[:, 0],
            "coordY": xyz[:, 1],
            "coordZ": xyz[:, 2],
            "diameter_mm": candidates.diameter_mm[indices].astype(np.float64),
            "mal_bool": label,
            "p_malignant": np.asarray(probability, dtype=np.float64),
            "predicted_malignant": predicted,
            "correct": predicted == label,
        }
    )


def compute_malignancy_metrics(
    table: pd.DataFrame, *, threshold: float, bootstrap: int, seed: int, confidence: float
) -> tuple[RocCurve | None, AucResult | None, dict[str, Any]]:
    """(ROC curve, AUC with its CI, the "malignancy" part of metrics.json) for a `malignancy_table`.

    With only one class among the nodules, AUC and the curve are undefined: None / null, said in the report.
    """
    labels = table["mal_bool"].to_numpy(dtype=bool)
    prob = table["p_malignant"].to_numpy(dtype=np.float64)
    counts = confusion_counts(torch.tensor(labels), torch.tensor(prob), threshold=threshold)
    sensitivity, specificity = sensitivity_specificity(labels, prob, threshold)
    both = 0 < labels.sum() < len(labels)
    curve = roc_curve(labels, prob) if both else None
    auc = auc_with_ci(labels, prob, bootstrap=bootstrap, seed=seed, confidence=confidence) if both else None
    return (
        curve,
        auc,
        {
            "auc": None if auc is None else _number(auc.auc),
            "auc_ci": [None, None] if auc is None else [_number(auc.ci_low), _number(auc.ci_high)],
            "bootstrap": bootstrap,
            "confidence": confidence,
            "ci_method": "stratified bootstrap over nodules (benign and malignant resampled separately)",
            "threshold": threshold,
            "rule": "malignant when p_malignant > threshold",
            "sensitivity": _number(sensitivity),
            "specificity": _number(specificity),
            "malignant": int(labels.sum()),
            "benign": int(len(labels) - labels.sum()),
            **{key: getattr(counts, key) for key in ("tp", "fp", "tn", "fn")},
        },
    )


def format_malignancy_report(metrics: dict[str, Any]) -> str:
    """The human summary of a malignancy metrics.json dict (a few lines, also printed)."""
    ck, sel, counts, mal = (metrics[k] for k in ("checkpoint", "selection", "counts", "malignancy"))
    lines = [
        f"p2ch malignancy evaluation of {ck['path']} (epoch {ck['epoch']}, sha1 {ck['sha1'][:12]})",
        f"{sel['name']}: {counts['scans']:,} scans, {counts['nodules']:,} annotated nodules "
        f"({mal['malignant']} malignant, {mal['benign']} benign)"
        + (f", split mode {sel['split_mode']}" if sel.get("split_mode") else ""),
    ]
    if sel.get("series_in_training"):
        lines.append(
            f"WARNING: {sel['series_in_training']} of these scans were in the checkpoint's training part; "
            "the scores below are optimistic"
        )
    if mal["auc"] is None:
        lines.append("AUC: undefined (the nodules scored are all of one class)")
    else:
        low, high = mal["auc_ci"]
        interval = f" ({mal['confidence']:.0%} CI {_fmt(low)}–{_fmt(high)}, {mal['bootstrap']} bootstraps)"
        lines.append(f"AUC {_fmt(mal['auc'])}{interval if low is not None else ''}")
    lines.append(
        f"at threshold {mal['threshold']:g}: sensitivity {_fmt(mal['sensitivity'])}, specificity "
        f"{_fmt(mal['specificity'])} (tp {mal['tp']}, fp {mal['fp']}, fn {mal['fn']}, tn {mal['tn']})"
    )
    timing = metrics["timing"]
    lines.append(f"scored in {timing['scoring_seconds']:.1f} s on {metrics['device']['name']}")
    return "\n".join(lines) + "\n"


def _malignancy_metrics_dict(
    config: EvalConfig, inputs: EvalInputs, scores: Scores, malignancy: dict[str, Any]
) -> dict[str, Any]:
    """The content of a malignancy metrics.json (timing.total_seconds comes last)."""
    scorer, nodules = inputs.scorer, len(inputs.selection.indices)
    scored = _what_was_scored(inputs, scores)
    scored["data"]["candidates_file"] = MALIGNANCY_FILE
    return {
        "format": METRICS_FORMAT,
        "task": "malignancy",
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "auc": malignancy["auc"],
        "auc_ci": malignancy["auc_ci"],
        "checkpoint": inputs.info.to_dict(),
        **scored,
        "counts": {
            "scans": len(inputs.selection.series_uids),
            "nodules": nodules,
            "chunks_cached_now": scores.chunks_cached_now,
        },
        "malignancy": malignancy,
        "device": {
            "name": str(scorer.device),
            "amp": str(scorer.amp_dtype).replace("torch.", "") if scorer.amp_dtype else "off",
            "channels_last": scorer.channels_last,
            "num_workers": scores.num_workers,
        },
        "timing": {
            "scoring_seconds": round(scores.seconds, 3),
            "nodules_per_sec": round(nodules / scores.seconds, 1) if scores.seconds > 0 else None,
        },
        "settings": config.to_dict(),
        "versions": versions(),
    }


def evaluate_malignancy(config: EvalConfig, inputs: EvalInputs, scores: Scores, started: float) -> EvalResult:
    """Metrics and files of a malignancy evaluation: nodules.csv, roc.png, roc_curve.csv, metrics.json, report.txt."""
    table = malignancy_table(inputs.candidates, inputs.selection.indices, scores.probability, config.threshold)
    curve, auc, malignancy = compute_malignancy_metrics(
        table, threshold=config.threshold, bootstrap=config.bootstrap, seed=config.seed, confidence=config.confidence
    )
    metrics = _malignancy_metrics_dict(config, inputs, scores, malignancy)
    out_dir = inputs.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / NODULES_FILE, table.to_csv(index=False))
    written = [NODULES_FILE, METRICS_FILE, REPORT_FILE]
    if curve is not None:
        pd.DataFrame({"fpr": curve.fpr, "tpr": curve.tpr, "threshold": curve.thresholds}).to_csv(
            out_dir / ROC_CURVE_FILE, index=False
        )
        checkpoint, selection = inputs.checkpoint, inputs.selection
        title = (
            f"{checkpoint.parent.name}/{checkpoint.name} (epoch {inputs.info.epoch}) on {selection.name}: "
            f"{len(selection.series_uids)} scans, {len(table)} nodules"
        )
        point = (1.0 - malignancy["specificity"], malignancy["sensitivity"])
        fig = roc_figure(curve, auc, title=title, threshold_point=point)
        save_figure_png(fig, out_dir / ROC_PLOT_FILE)
        written[1:1] = [ROC_PLOT_FILE, ROC_CURVE_FILE]
    metrics["timing"]["total_seconds"] = round(time.perf_counter() - started, 3)
    report = format_malignancy_report(metrics) + f"wrote {out_dir}/: {', '.join(written)}\n"
    write_text_atomic(out_dir / METRICS_FILE, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    write_text_atomic(out_dir / REPORT_FILE, report)
    return EvalResult(metrics=metrics, report=report, out_dir=out_dir)


# ---------------------------------------------------------------------------------------------
# command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a LunaModel checkpoint the LUNA16 way: FROC/CPM with a bootstrap confidence "
        "interval, AUC, precision/recall/F1; writes a LUNA16 submission CSV, metrics.json, a FROC "
        "plot and a report. With --task malignancy: AUC with CI, ROC plot, sensitivity/specificity and a "
        "per-nodule CSV of a malignancy classifier.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Examples: python -m p2ch.evaluate (newest best.pt on its validation split); "
        "python -m p2ch.evaluate --checkpoint data-unversioned/models/p2ch/RUN/best.pt --split test "
        "--pictures 16 --out eval-test; python -m p2ch.evaluate --task malignancy (newest malignancy best.pt)",
    )
    model = add_model_arguments(parser)
    model.add_argument(
        "--task",
        choices=TASKS,
        default=EvalConfig.task,
        help="nodule: FROC/CPM of a nodule classifier over candidates; malignancy: AUC (bootstrap CI), ROC, "
        "sensitivity/specificity of a malignancy classifier over the annotated nodules "
        "(annotations_with_malignancy.csv)",
    )
    _add_selection_arguments(
        parser.add_argument_group("what to score (the split is recomputed from the checkpoint's settings)")
    )
    _add_data_arguments(parser.add_argument_group("data"))
    _add_metrics_arguments(parser.add_argument_group("metrics"))
    _add_speed_arguments(parser.add_argument_group("speed"))
    _add_output_arguments(parser.add_argument_group("output"))
    return parser


def _add_selection_arguments(g: argparse._ArgumentGroup) -> None:
    which = g.add_mutually_exclusive_group()
    which.add_argument(
        "--split",
        choices=SPLITS,
        default=None,
        help="val: the run's validation part; test: its held-out test part; all: every candidate "
        "(includes training CTs) (default: val)",
    )
    which.add_argument("--series", nargs="+", default=None, metavar="UID", help="score these CTs instead of a split")


def _add_data_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--data-root",
        default=None,
        help="LUNA16 root (default: the checkpoint's, else $P2CH_DATA_ROOT or data-unversioned/part2/luna)",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="chunk cache, filled where chunks are missing (default: the checkpoint's, else "
        "$P2CH_CACHE_DIR or data-unversioned/cache)",
    )
    g.add_argument(
        "--no-cache",
        action="store_true",
        help="crop chunks from the CTs in memory (one load per CT) and write no cache",
    )


def _add_metrics_arguments(g: argparse._ArgumentGroup) -> None:
    d = EvalConfig()
    g.add_argument(
        "--threshold",
        type=float,
        default=d.threshold,
        help="probability above which a candidate counts as a nodule (precision/recall/F1, pictures)",
    )
    g.add_argument(
        "--bootstrap",
        type=int,
        default=d.bootstrap,
        help="bootstrap resamples of the scans for the confidence intervals (0: none)",
    )
    g.add_argument("--confidence", type=float, default=d.confidence, help="confidence level of the intervals")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the bootstrap")


def _add_speed_arguments(g: argparse._ArgumentGroup) -> None:
    add_inference_arguments(g)
    g.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers reading the cache (default: min(2, CPUs) on the CPU, where the model is "
        "the bottleneck and 2 workers gain 10-20%%; min(8, CPUs) with a GPU)",
    )


def _add_output_arguments(g: argparse._ArgumentGroup) -> None:
    d = EvalConfig()
    g.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"output folder (default: {DEFAULT_EVAL_DIR}/<run>-<checkpoint>-<split>)",
    )
    g.add_argument(
        "--pictures",
        type=int,
        default=d.pictures,
        metavar="N",
        help="also draw the N most confident false positives and up to N missed nodules",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar or progress log lines")
    g.add_argument(
        "--log-level", default=d.log_level, choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level"
    )


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    config = EvalConfig(
        checkpoint=args.checkpoint,
        models_dir=args.models_dir,
        task=args.task,
        split=args.split or "val",
        series=tuple(args.series or ()),
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        no_cache=args.no_cache,
        batch_size=inference_batch_size(args.batch_size, args.device),
        num_workers=args.num_workers,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        cudnn_benchmark=args.cudnn_benchmark,
        threshold=args.threshold,
        bootstrap=args.bootstrap,
        seed=args.seed,
        confidence=args.confidence,
        out=args.out,
        pictures=args.pictures,
        progress=not args.no_progress,
        log_level=args.log_level,
    )
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    """The command's work for parsed arguments: evaluate and print the report; returns 0."""
    config = config_from_args(args)
    log.info("settings: %s", json.dumps(config.to_dict(), sort_keys=True))
    result = evaluate(config)
    sys.stdout.write(result.report)
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(args.log_level)
    return run_cli(PROG, lambda: run(args), "interrupted; the output folder may hold files of an earlier run")


if __name__ == "__main__":
    sys.exit(main())
