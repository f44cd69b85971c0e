"""Plots of the metrics (matplotlib, no pyplot state): LUNA16's FROC curve and the ROC curve.

Figures are built with matplotlib's object-oriented API (`matplotlib.figure.Figure`, drawn by
the Agg canvas), so plotting never touches pyplot's global figure list or picks a GUI backend,
and is safe in DataLoader workers, threads and headless servers.
"""

from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from p2ch.fileio import atomic_writer
from p2ch.metrics import FROC_FPS_PER_SCAN, AucResult, FrocResult, RocCurve

FIGURE_DPI = 100
ROC_FIGSIZE = (6, 6)  # inches: 600×600 px at FIGURE_DPI
ROC_X_LABEL = "1 − specificity (false positive rate)"
ROC_Y_LABEL = "sensitivity (true positive rate)"


def _auc_label(curve: RocCurve, auc: AucResult | None) -> str:
    """'AUC 0.912 [0.871, 0.948] (95% CI), 40 pos / 60 neg' or, without `auc`, the curve's area."""
    if auc is None:
        return f"AUC {curve.auc:.3f}"
    label = f"AUC {auc.auc:.3f}"
    if math.isfinite(auc.ci_low) and math.isfinite(auc.ci_high):
        label += f" [{auc.ci_low:.3f}, {auc.ci_high:.3f}] ({auc.confidence:.0%} CI, n={auc.bootstrap})"
    return f"{label}\n{auc.positives} positive / {auc.negatives} negative"


def roc_figure(
    curve: RocCurve,
    auc: AucResult | None = None,
    *,
    title: str,
    threshold_point: tuple[float, float] | None = None,
) -> Figure:
    """The ROC curve with the chance diagonal, the AUC (with CI and class counts when `auc` is given).

    threshold_point: (false positive rate, true positive rate) of the chosen operating point,
    i.e. (1 - specificity, sensitivity) at the threshold, drawn as a marker; None draws none.
    Returns a 600×600 px figure on a white background (an Agg canvas is attached).
    """
    fig = Figure(figsize=ROC_FIGSIZE, dpi=FIGURE_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="0.6", linewidth=1.0, label="chance (AUC 0.5)")
    ax.plot(
        np.asarray(curve.fpr, dtype=np.float64),
        np.asarray(curve.tpr, dtype=np.float64),
        color="#1f77b4",
        linewidth=1.5,
        label=_auc_label(curve, auc),
    )
    if threshold_point is not None:
        fpr, tpr = (float(v) for v in threshold_point)
        ax.plot(
            [fpr],
            [tpr],
            "o",
            color="#d62728",
            markersize=6,
            label=f"operating point ({1 - fpr:.2f} spec, {tpr:.2f} sens)",
        )
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(ROC_X_LABEL)
    ax.set_ylabel(ROC_Y_LABEL)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def figure_rgb(fig: Figure) -> np.ndarray:
    """The figure rendered by Agg: (H, W, 3) uint8 RGB (H, W = size in inches × dpi)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def save_figure_png(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Write `fig` as a PNG to `path` atomically (temporary file, then rename); creates the parent folder."""
    with atomic_writer(path) as handle:
        fig.savefig(handle, format="png", dpi=FIGURE_DPI, facecolor="white")


def fp_label(fp: float) -> str:
    """1/8, 1/4, 1/2, 1, 2, 4, 8: false positives per scan as LUNA16 writes them."""
    return f"1/{round(1 / fp)}" if fp < 1 else f"{fp:g}"


def froc_figure(result: FrocResult, *, title: str) -> Figure:
    """The FROC curve of `result` on a log axis from 1/8 to 8 FPs per scan, its seven points and CI band
    (700×500 px); a note instead when no nodule was evaluated."""
    fig = Figure(figsize=(7, 5), dpi=FIGURE_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points = np.asarray(FROC_FPS_PER_SCAN, dtype=np.float64)
    ax.set_xscale("log", base=2)
    ax.set_xlim(points[0] / 1.15, points[-1] * 1.15)
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(points)
    ax.set_xticklabels([fp_label(p) for p in points])
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
        _draw_froc(ax, result, points)
        cpm = f"CPM {result.cpm:.3f}"
        if all(math.isfinite(v) for v in result.cpm_ci):
            cpm += f" [{result.cpm_ci[0]:.3f}, {result.cpm_ci[1]:.3f}]"
        ax.set_title(f"{title}\n{cpm}", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _draw_froc(ax, result: FrocResult, points: np.ndarray) -> None:
    """The curve, its CI band at LUNA16's seven operating points (`points`, FPs per scan), and those points."""
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
