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

from p2ch.config import DEFAULT_BATCH_SIZE, DefaultsHelpFormatter, add_inference_arguments, add_model_arguments
from p2ch.errors import ConfigError, DataNotFoundError, P2chError

log = logging.getLogger("p2ch.evaluate")

PROG = "python -m p2ch.evaluate"
METRICS_FORMAT = "p2ch-eval-v1"
SPLITS = ("val", "test", "all")
DEFAULT_EVAL_DIR = Path("data-unversioned/eval")
SUBMISSION_FILE = "submission.csv"
METRICS_FILE = "metrics.json"
FROC_PLOT_FILE = "froc.png"
FROC_CURVE_FILE = "froc_curve.csv"
REPORT_FILE = "report.txt"
PICTURES_DIR = "pictures"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Every setting of an evaluation; logged once and saved in metrics.json."""

    checkpoint: str | None = None
    models_dir: str | None = None
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

        need(self.split in SPLITS, f"--split {self.split!r}: expected one of {', '.join(SPLITS)}")
        need(self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}")
        need(self.num_workers is None or self.num_workers >= 0, f"--num-workers must be ≥ 0, got {self.num_workers}")
        need(0.0 <= self.threshold <= 1.0, f"--threshold must be a probability in [0, 1], got {self.threshold}")
        need(self.bootstrap >= 0, f"--bootstrap must be ≥ 0 (0: no confidence interval), got {self.bootstrap}")
        need(0.0 < self.confidence < 1.0, f"--confidence must be in (0, 1), e.g. 0.95, got {self.confidence}")
        need(self.pictures >= 0, f"--pictures must be ≥ 0, got {self.pictures}")
        need(self.seed >= 0, f"--seed must be ≥ 0, got {self.seed}")


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


def _split_of(candidates, train_config, data_root):
    from p2ch.datasets import split_candidates

    return split_candidates(
        candidates,
        train_config.split,
        val_fraction=train_config.val_fraction,
        val_stride=train_config.val_stride,
        val_subsets=train_config.val_subsets,
        test_fraction=train_config.test_fraction,
        test_subsets=train_config.test_subsets,
        data_root=data_root,
    )


def select_candidates(
    candidates, train_config, data_root: Path, split: str = "val", series: Sequence[str] = ()
) -> Selection:
    """The candidate rows of `split` (recomputed with the checkpoint's split settings) or of `series`.

    candidates: `CandidateArrays`. train_config: the checkpoint's `TrainingConfig`. Raises
    ConfigError for an empty split, DataNotFoundError for a series without candidates.
    """
    from p2ch.luna import check_series_uid

    all_uids = np.asarray(candidates.series_uids, dtype=str)
    split_obj = None
    split_error: P2chError | None = None
    try:
        split_obj = _split_of(candidates, train_config, data_root)
    except P2chError as exc:  # explicit --series still works when the stored split does not apply here
        split_error = exc
    if series:
        wanted = list(dict.fromkeys(check_series_uid(str(uid).strip()) for uid in series))
        known = set(all_uids.tolist())
        absent = [uid for uid in wanted if uid not in known]
        if absent:
            from p2ch.luna import series_index

            where = "has no .mhd under" if absent[0] not in series_index(data_root) else "has no candidates in"
            raise DataNotFoundError(
                f"--series {absent[0]} {where} the data root {data_root} ({len(known)} series with candidates "
                f"there{f'; {len(absent)} of the {len(wanted)} requested are unknown' if len(absent) > 1 else ''}); "
                "check the uid and --data-root"
            )
        mask = np.isin(all_uids[candidates.series_index], wanted)
        name, rows = "series", np.flatnonzero(mask)
        uids = np.array(sorted(wanted), dtype=str)
    else:
        if split_obj is None:
            assert split_error is not None
            raise split_error
        if split == "all":
            rows, uids = np.arange(len(candidates), dtype=np.int64), np.unique(all_uids[candidates.series_index])
        else:
            rows, uids = getattr(split_obj, split), getattr(split_obj, f"{split}_series")
        name = split
        if len(rows) == 0:
            raise ConfigError(
                f"--split {split}: the checkpoint's split ({train_config.split}, test_fraction "
                f"{train_config.test_fraction:g}, test_subsets {list(train_config.test_subsets)}) has no {split} "
                f"part on {data_root}; train with --test-fraction or --test-subsets to hold out a test part, or "
                "evaluate --split val, --split all or --series UID"
            )
    rows = np.asarray(rows, dtype=np.int64)
    # Grouped by series, so a cold cache loads each CT once and pictures come CT by CT.
    rows = rows[np.argsort(candidates.series_index[rows], kind="stable")]
    in_training = None
    if split_obj is not None:
        in_training = int(np.isin(uids, split_obj.train_series).sum())
    return Selection(
        name, rows, np.asarray(uids, dtype=str), in_training, split_obj.mode if split_obj is not None else None
    )


# ---------------------------------------------------------------------------------------------
# scoring


def prefill_cache(cache, candidates, indices: np.ndarray, width_irc: Sequence[int], progress: bool = True) -> int:
    """Crop and store the chunks of `indices` that the cache lacks, one CT load per CT; returns how many.

    cache: `p2ch.cache.ChunkCache`. candidates: `CandidateArrays`. indices: (n,) int64 rows.
    """
    from p2ch.progress import Progress

    series_index = candidates.series_index[indices]
    order = np.argsort(series_index, kind="stable")
    groups = np.split(indices[order], np.flatnonzero(np.diff(series_index[order])) + 1) if len(indices) else []
    todo = []
    for rows in groups:
        uid = candidates.series_uid(int(rows[0]))
        missing = cache.missing(uid, candidates.center_xyz[rows], width_irc)
        if missing.any():
            todo.append((uid, rows[missing]))
    total = sum(len(rows) for _, rows in todo)
    if not total:
        return 0
    log.info("caching %d chunk(s) of %d CT(s) not in %s yet", total, len(todo), cache.cache_dir)
    written = 0
    with Progress(total, "caching", "chunks", enabled=progress) as bar:
        for uid, rows in todo:
            written += cache.fill_series(uid, candidates.center_xyz[rows], width_irc).written
            bar.update(len(rows))
    return written


def score_from_cache(
    scorer,
    candidates,
    indices: np.ndarray,
    cache,
    *,
    width_irc: Sequence[int],
    batch_size: int,
    num_workers: int,
    progress: bool = True,
) -> np.ndarray:
    """P(nodule) of candidates[indices] read through the chunk cache: (n,) float64, in `indices` order."""
    import torch

    from p2ch.datasets import EvalSampler, LunaDataset, create_loader
    from p2ch.progress import Progress

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
        for batch in loader:
            parts.append(scorer(batch.chunk))
            bar.update(len(batch.label))
    return torch.cat(parts).cpu().numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# metrics, plot, report


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def compute_metrics(
    predictions,
    labels: np.ndarray,
    annotations,
    excluded,
    series_uids: Sequence[str],
    *,
    threshold: float,
    bootstrap: int,
    seed: int,
    confidence: float,
):
    """(FrocResult, classification dict) for one evaluation.

    predictions: submission rows; labels: (n,) bool, candidate k is a nodule (candidates.csv class);
    annotations / excluded: rows of the evaluated scans; series_uids: the evaluated scans.
    """
    import torch

    from p2ch.metrics import classification_summary, froc

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


def _fp_label(fp: float) -> str:
    return f"1/{round(1 / fp)}" if fp < 1 else f"{fp:g}"


def plot_froc(result, path: Path, title: str) -> None:
    """Write the FROC curve of `result` (`p2ch.metrics.FrocResult`) as a PNG (700×500 px)."""
    from matplotlib.figure import Figure

    from p2ch.metrics import FROC_FPS_PER_SCAN

    fig = Figure(figsize=(7, 5), dpi=100, facecolor="white")
    ax = fig.add_subplot(1, 1, 1)
    points = np.asarray(FROC_FPS_PER_SCAN, dtype=np.float64)
    ax.set_xscale("log", base=2)
    ax.set_xlim(points[0] / 1.15, points[-1] * 1.15)
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(points)
    ax.set_xticklabels([_fp_label(p) for p in points])
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity (fraction of nodules detected)")
    ax.grid(True, which="major", alpha=0.3)
    if result.num_nodules == 0 or not math.isfinite(result.cpm):
        ax.text(
            0.5,
            0.5,
            "no annotated nodules in the evaluated scans:\nFROC and CPM are undefined",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=12,
        )
        ax.set_title(title, fontsize=10)
    else:
        fps, sens = result.fps_per_scan, result.sensitivity
        # Beyond the last threshold the curve stays flat (numpy.interp holds the last value), as CPM reads it.
        if fps[-1] < points[-1] * 1.15:
            fps, sens = np.append(fps, points[-1] * 1.15), np.append(sens, sens[-1])
        keep = fps > 0
        ax.plot(fps[keep], sens[keep], color="#1f77b4", linewidth=1.5, label="FROC")
        at = np.array([result.sensitivities[p] for p in FROC_FPS_PER_SCAN])
        ci = np.array([result.sensitivities_ci[p] for p in FROC_FPS_PER_SCAN], dtype=np.float64)
        if np.isfinite(ci).all():
            ax.fill_between(
                points,
                ci[:, 0],
                ci[:, 1],
                color="#1f77b4",
                alpha=0.15,
                label=f"{result.confidence:.0%} CI (bootstrap over scans, n={result.bootstrap})",
            )
        ax.plot(points, at, "o", color="#d62728", markersize=5, label="LUNA16 operating points")
        for p, s in zip(points, at, strict=True):
            ax.annotate(f"{s:.2f}", (p, s), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
        cpm = f"CPM {result.cpm:.3f}"
        if all(math.isfinite(v) for v in result.cpm_ci):
            cpm += f" [{result.cpm_ci[0]:.3f}, {result.cpm_ci[1]:.3f}]"
        ax.set_title(f"{title}\n{cpm}", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, facecolor="white")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_report(metrics: dict[str, Any]) -> str:
    """The human summary of a metrics.json dict (a few lines, also printed)."""
    ck, sel, counts, froc, cls = (metrics[k] for k in ("checkpoint", "selection", "counts", "froc", "classification"))
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
    if froc["cpm"] is None:
        lines.append("CPM: undefined (no annotated nodules in these scans)")
    else:
        ci = froc["cpm_ci"]
        interval = (
            f" ({froc['confidence']:.0%} CI {_fmt(ci[0])}–{_fmt(ci[1])}, {froc['bootstrap']} bootstraps)"
            if ci[0] is not None
            else ""
        )
        lines.append(f"CPM {_fmt(froc['cpm'])}{interval}")
        sens = froc["sensitivities"]
        lines.append(
            "sensitivity at " + ", ".join(f"{_fp_label(float(k))}: {_fmt(v, 2)}" for k, v in sens.items()) + " FPs/scan"
        )
        if froc["num_detected"] < froc["num_nodules"]:
            lines.append(
                f"candidates hit {froc['num_detected']} of {froc['num_nodules']} nodules; the other "
                f"{froc['num_nodules'] - froc['num_detected']} are missed at any threshold"
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


def default_out_dir(checkpoint: Path, selection_name: str, series: Sequence[str] = ()) -> Path:
    """`data-unversioned/eval/<run folder>-<checkpoint stem>-<split>` (for --series: `series-<hash>`)."""
    label = selection_name
    if selection_name == "series":
        label = "series-" + hashlib.sha1("\n".join(sorted(series)).encode()).hexdigest()[:8]
    return DEFAULT_EVAL_DIR / f"{checkpoint.parent.name}-{checkpoint.stem}-{label}"


def evaluate(config: EvalConfig) -> EvalResult:
    """Run one evaluation (see the module docstring) and write its files; returns the metrics."""
    import pandas as pd

    from p2ch.candidates import (
        ANNOTATIONS_FILE,
        EXCLUDED_FILE,
        find_candidates_file,
        get_candidate_arrays,
        read_annotations,
        read_excluded,
    )
    from p2ch.checkpoint import versions
    from p2ch.config import resolve_cache_dir, resolve_data_root
    from p2ch.fileio import write_text_atomic
    from p2ch.predict import load_model, make_scorer, predict_locations, resolve_checkpoint
    from p2ch.training import predictions_frame

    config.validate()
    started = time.perf_counter()
    checkpoint = resolve_checkpoint(config.checkpoint, config.models_dir)
    model, info = load_model(checkpoint)
    train_config = info.config
    data_root = resolve_data_root(config.data_root or train_config.data_root)
    candidates = get_candidate_arrays(data_root)
    selection = select_candidates(candidates, train_config, data_root, config.split, config.series)
    annotations = read_annotations(data_root / ANNOTATIONS_FILE)
    annotations = annotations[annotations["seriesuid"].isin(selection.series_uids)].reset_index(drop=True)
    excluded_path = data_root / EXCLUDED_FILE
    excluded = read_excluded(excluded_path) if excluded_path.is_file() else None
    if excluded is not None:
        excluded = excluded[excluded["seriesuid"].isin(selection.series_uids)].reset_index(drop=True)
    out_dir = Path(config.out) if config.out else default_out_dir(checkpoint, selection.name, config.series)
    scorer = make_scorer(model, config.device, config.amp, config.channels_last)
    width = tuple(int(v) for v in train_config.width_irc)
    indices = selection.indices
    log.info(
        "evaluating %s (epoch %s) on %s: %d scans, %d candidates, %d nodules; device %s, AMP %s; output %s",
        checkpoint,
        info.epoch,
        selection.name,
        len(selection.series_uids),
        len(indices),
        len(annotations),
        scorer.device,
        scorer.amp_dtype or "off",
        out_dir,
    )

    cache_dir = workers = None
    score_started = time.perf_counter()
    if config.no_cache:
        locations = predictions_frame(candidates, indices, np.zeros(len(indices)))
        prob, _ = predict_locations(
            scorer,
            data_root,
            locations,
            width_irc=width,
            batch_size=config.batch_size,
            outside="error",
            skip_missing_series=False,
            progress=config.progress,
        )
        prefilled = 0
    else:
        from p2ch.cache import ChunkCache

        cache = ChunkCache(resolve_cache_dir(config.cache_dir or train_config.cache_dir), data_root)
        cache_dir = str(cache.cache_dir)
        prefilled = prefill_cache(cache, candidates, indices, width, progress=config.progress)
        score_started = time.perf_counter()  # the rate below is inference from the (now warm) cache
        workers = config.num_workers
        if workers is None:
            workers = min(2 if scorer.device.type == "cpu" else 8, os.cpu_count() or 1)
        prob = score_from_cache(
            scorer,
            candidates,
            indices,
            cache,
            width_irc=width,
            batch_size=config.batch_size,
            num_workers=workers,
            progress=config.progress,
        )
    scoring_seconds = time.perf_counter() - score_started

    predictions = predictions_frame(candidates, indices, prob)
    labels = candidates.is_nodule[indices]
    result, classification = compute_metrics(
        predictions,
        labels,
        annotations,
        excluded,
        selection.series_uids,
        threshold=config.threshold,
        bootstrap=config.bootstrap,
        seed=config.seed,
        confidence=config.confidence,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / SUBMISSION_FILE, predictions.to_csv(index=False))
    pd.DataFrame(
        {"fps_per_scan": result.fps_per_scan, "sensitivity": result.sensitivity, "threshold": result.thresholds}
    ).to_csv(out_dir / FROC_CURVE_FILE, index=False)
    title = (
        f"{checkpoint.parent.name}/{checkpoint.name} (epoch {info.epoch}) on {selection.name}: "
        f"{len(selection.series_uids)} scans, {result.num_nodules} nodules"
    )
    plot_froc(result, out_dir / FROC_PLOT_FILE, title)

    froc_dict = result.to_dict(include_curve=False)
    metrics: dict[str, Any] = {
        "format": METRICS_FORMAT,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpm": froc_dict["cpm"],
        "cpm_ci": froc_dict["cpm_ci"],
        "checkpoint": info.to_dict(),
        "selection": {
            "name": selection.name,
            "split_mode": selection.split_mode,
            "split_settings": {
                k: v
                for k, v in train_config.to_dict().items()
                if k in ("split", "val_fraction", "val_stride", "val_subsets", "test_fraction", "test_subsets")
            },
            "series_in_training": selection.series_in_training,
        },
        "data": {
            "data_root": str(data_root.absolute()),
            "cache_dir": cache_dir,
            "candidates_file": find_candidates_file(data_root).name,
            "width_irc": list(width),
        },
        "counts": {
            "scans": len(selection.series_uids),
            "candidates": len(indices),
            "positives": int(labels.sum()),
            "nodules": result.num_nodules,
            "nodules_hit_by_candidates": result.num_detected,
            "excluded_findings": 0 if excluded is None else len(excluded),
            "predictions_on_excluded": result.num_excluded_predictions,
            "false_positives": result.num_false_positives,
            "chunks_cached_now": prefilled,
        },
        "froc": froc_dict,
        "classification": classification,
        "device": {
            "name": str(scorer.device),
            "amp": str(scorer.amp_dtype).replace("torch.", "") if scorer.amp_dtype else "off",
            "channels_last": scorer.channels_last,
            "num_workers": workers,
        },
        "timing": {
            "scoring_seconds": round(scoring_seconds, 3),
            "candidates_per_sec": round(len(indices) / scoring_seconds, 1) if scoring_seconds > 0 else None,
        },
        "settings": config.to_dict(),
        "versions": versions(),
    }
    if config.pictures:
        from p2ch.vis import write_pictures

        pictures = write_pictures(
            predictions, annotations, excluded, data_root, out_dir / PICTURES_DIR, config.pictures, config.threshold
        )
        metrics["pictures"] = {
            "dir": PICTURES_DIR,
            "false_positives": pictures.false_positives,
            "missed_nodules": pictures.missed_nodules,
            "missed_nodules_total": pictures.missed_nodules_total,
            "sheets": [p.name for p in [*pictures.false_positive_sheets, *pictures.missed_nodule_sheets]],
        }
    metrics["timing"]["total_seconds"] = round(time.perf_counter() - started, 3)
    report = format_report(metrics)
    report += f"wrote {out_dir}/: {SUBMISSION_FILE}, {METRICS_FILE}, {FROC_PLOT_FILE}, {REPORT_FILE}"
    report += f", {PICTURES_DIR}/ ({len(metrics['pictures']['sheets'])} sheets)\n" if config.pictures else "\n"
    write_text_atomic(out_dir / METRICS_FILE, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    write_text_atomic(out_dir / REPORT_FILE, report)
    return EvalResult(metrics=metrics, report=report, out_dir=out_dir)


# ---------------------------------------------------------------------------------------------
# command line


def get_args_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a LunaModel checkpoint the LUNA16 way: FROC/CPM with a bootstrap confidence "
        "interval, AUC, precision/recall/F1; writes a LUNA16 submission CSV, metrics.json, a FROC "
        "plot and a report.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Examples: python -m p2ch.evaluate (newest best.pt on its validation split); "
        "python -m p2ch.evaluate --checkpoint data-unversioned/models/p2ch/RUN/best.pt --split test "
        "--pictures 16 --out eval-test",
    )
    add_model_arguments(parser)

    g = parser.add_argument_group("what to score (the split is recomputed from the checkpoint's settings)")
    which = g.add_mutually_exclusive_group()
    which.add_argument(
        "--split",
        choices=SPLITS,
        default=None,
        help="val: the run's validation part; test: its held-out test part; all: every candidate "
        "(includes training CTs) (default: val)",
    )
    which.add_argument("--series", nargs="+", default=None, metavar="UID", help="score these CTs instead of a split")

    g = parser.add_argument_group("data")
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

    g = parser.add_argument_group("metrics")
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

    g = parser.add_argument_group("speed")
    add_inference_arguments(g)
    g.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers reading the cache (default: min(2, CPUs) on the CPU, where the model is "
        "the bottleneck and 2 workers gain 10-20%%; min(8, CPUs) with a GPU)",
    )

    g = parser.add_argument_group("output")
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
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    config = EvalConfig(
        checkpoint=args.checkpoint,
        models_dir=args.models_dir,
        split=args.split or "val",
        series=tuple(args.series or ()),
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        no_cache=args.no_cache,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
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


def main(argv: Sequence[str] | None = None) -> int:
    from p2ch.runtime import configure_logging

    args = get_args_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
        log.info("settings: %s", json.dumps(config.to_dict(), sort_keys=True))
        result = evaluate(config)
        sys.stdout.write(result.report)
        sys.stdout.flush()
        return 0
    except P2chError as exc:
        from p2ch.predict import one_line

        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the output folder may hold files of an earlier run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
