"""Pictures of what a classifier gets wrong: sheets of its most confident false positives and missed nodules.

Each finding is one row of a sheet: the axial, coronal and sagittal slices through its centre,
`context_mm` (default 64 mm) across, read from the CT itself (a wider view than the 32×48×48
chunk the model sees), in a lung window of -1000..400 HU. Nodules get a circle of their radius
(diameter / 2, the LUNA16 hit radius), false positives a crosshair with a gap. The row's label
names the series (shortened), the centre in mm, the diameter and the probability.

Sheets hold `SHEET_ROWS` findings and always have the same size in pixels (`sheet_size_px()`),
so they line up in a viewer; `index.csv` next to them lists every finding with its sheet and row.
Drawing uses matplotlib's Agg canvas through `matplotlib.figure.Figure`, never pyplot, so it
needs no display and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from p2ch.ct import Ct
from p2ch.metrics import match_predictions

LUNG_WINDOW_HU = (-1000.0, 400.0)
OUTSIDE_HU = -32768  # fills slice pixels beyond the CT volume (CT voxels are clipped to -1000..1000 HU)
CONTEXT_MM = 64.0
SHEET_ROWS = 4
PANEL_INCHES = 2.5
LABEL_INCHES = 0.45
DPI = 100
FALSE_POSITIVE, MISSED_NODULE, DETECTED = "false_positive", "missed_nodule", "detected"
_VIEWS = ("axial", "coronal", "sagittal")
_MARK_COLOUR = "#ff3b30"
_OUTSIDE_COLOUR = "#27324a"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One location to draw.

    kind: FALSE_POSITIVE, MISSED_NODULE or DETECTED (a nodule found by `nodule_analysis`).
    rank: 1-based position in its list. center_xyz: (x, y, z) mm. diameter_mm: the nodule's (nan for
    a false positive; the estimate from its segmented volume for a detected one).
    probability: the candidate's P(nodule); for a missed nodule the best hit's, nan when no
    candidate lies within its radius. p_malignant: a detected nodule's P(malignant) (nan: not scored).
    """

    kind: str
    rank: int
    series_uid: str
    center_xyz: tuple[float, float, float]
    diameter_mm: float
    probability: float
    p_malignant: float = math.nan

    def label(self, total: int) -> str:
        x, y, z = self.center_xyz
        where = f"{short_uid(self.series_uid)}  ({x:.1f}, {y:.1f}, {z:.1f}) mm"
        if self.kind == FALSE_POSITIVE:
            return f"false positive {self.rank}/{total}: p = {self.probability:.3f}\n{where}"
        if self.kind == DETECTED:
            malignant = "not scored" if math.isnan(self.p_malignant) else f"{self.p_malignant:.3f}"
            return (
                f"nodule {self.rank}/{total}: p_nodule = {self.probability:.3f}, p_malignant = {malignant}, "
                f"d ≈ {self.diameter_mm:.1f} mm\n{where}"
            )
        best = (
            "no candidate within its radius"
            if math.isnan(self.probability)
            else f"best candidate p = {self.probability:.3f}"
        )
        return f"missed nodule {self.rank}/{total}: d = {self.diameter_mm:.1f} mm, {best}\n{where}"


def short_uid(series_uid: str, keep: int = 14) -> str:
    """The end of a series uid (the part that differs between LUNA16 CTs), e.g. '…297188014009'."""
    return series_uid if len(series_uid) <= keep + 1 else "…" + series_uid[-keep:]


def sheet_size_px(rows: int = SHEET_ROWS) -> tuple[int, int]:
    """(width, height) in pixels of a sheet with `rows` rows (every sheet has SHEET_ROWS rows)."""
    return (round(3 * PANEL_INCHES * DPI), round(rows * (PANEL_INCHES + LABEL_INCHES) * DPI))


# ---------------------------------------------------------------------------------------------
# choosing findings


def select_false_positives(predictions: pd.DataFrame, match, count: int) -> list[Finding]:
    """The `count` highest-scoring false positives (LUNA16's sense: no nodule hit, not on an excluded finding).

    predictions: seriesuid, coordX, coordY, coordZ (mm), probability. match: the
    `p2ch.metrics.PredictionMatch` of these predictions (row k = row k by position).
    Ties keep the predictions' order.
    """
    rows = np.flatnonzero(match.is_false_positive)
    probability = predictions["probability"].to_numpy(dtype=np.float64)
    rows = rows[np.argsort(-probability[rows], kind="stable")][: max(0, count)]
    xyz = predictions[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64)
    uids = predictions["seriesuid"].astype(str).to_numpy()
    return [
        Finding(FALSE_POSITIVE, rank, str(uids[k]), tuple(float(v) for v in xyz[k]), math.nan, float(probability[k]))
        for rank, k in enumerate(rows.tolist(), start=1)
    ]


def missed_nodule_rows(match, threshold: float) -> np.ndarray:
    """(K,) int64 annotation rows of the nodules missed at `threshold`, worst first.

    A nodule is missed when no prediction hits it, or its best hit's probability is not above
    `threshold` (a candidate counts as positive when p > threshold). Worst first: never hit,
    then by ascending best probability; ties keep the annotations' order.
    """
    best = np.asarray(match.nodule_probability, dtype=np.float64)
    missed = np.flatnonzero(np.isnan(best) | (best <= threshold))
    key = np.where(np.isnan(best[missed]), -np.inf, best[missed])
    return missed[np.argsort(key, kind="stable")].astype(np.int64)


def select_missed_nodules(annotations: pd.DataFrame, match, threshold: float, count: int) -> list[Finding]:
    """Up to `count` nodules missed at `threshold` (see `missed_nodule_rows`), worst first.

    annotations: seriesuid, coordX, coordY, coordZ (mm), diameter_mm, in the row order `match`
    was computed with.
    """
    rows = missed_nodule_rows(match, threshold)[: max(0, count)]
    xyz = annotations[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64)
    diameter = annotations["diameter_mm"].to_numpy(dtype=np.float64)
    uids = annotations["seriesuid"].astype(str).to_numpy()
    best = np.asarray(match.nodule_probability, dtype=np.float64)
    return [
        Finding(MISSED_NODULE, rank, str(uids[k]), tuple(float(v) for v in xyz[k]), float(diameter[k]), float(best[k]))
        for rank, k in enumerate(rows.tolist(), start=1)
    ]


# ---------------------------------------------------------------------------------------------
# slices


@dataclasses.dataclass(frozen=True)
class OrthoSlices:
    """Three centre slices around a point, each (H, W) int16 HU, OUTSIDE_HU where they reach beyond the CT.

    axial: rows = CT rows (y), columns = CT columns (x). coronal: rows = CT slices (z), columns = x.
    sagittal: rows = z, columns = CT rows (y). spacing_mm: per view, (row, column) mm per pixel.
    center_irc: the voxel the slices go through. The point is the middle pixel of every slice.
    """

    axial: np.ndarray
    coronal: np.ndarray
    sagittal: np.ndarray
    spacing_mm: dict[str, tuple[float, float]]
    center_irc: tuple[int, int, int]


def _crop2d(plane: np.ndarray | None, center: tuple[int, int], half: tuple[int, int]) -> np.ndarray:
    """(2·half0 + 1, 2·half1 + 1) int16 window of `plane` centred on `center`, OUTSIDE_HU beyond it (all
    of it when `plane` is None)."""
    out = np.full((2 * half[0] + 1, 2 * half[1] + 1), OUTSIDE_HU, dtype=np.int16)
    if plane is None:
        return out
    src, dst = [], []
    for axis in range(2):
        low, high = center[axis] - half[axis], center[axis] + half[axis] + 1
        s0, s1 = max(low, 0), min(high, plane.shape[axis])
        if s1 <= s0:
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - low, s1 - low))
    out[dst[0], dst[1]] = plane[src[0], src[1]]
    return out


def orthogonal_slices(ct, center_xyz: Sequence[float], context_mm: float = CONTEXT_MM) -> OrthoSlices:
    """Axial, coronal and sagittal slices through `center_xyz` (3 floats, mm), `context_mm` across.

    ct: a `p2ch.ct.Ct` (hu (I, R, C) int16 HU). The window is measured along the voxel axes, so
    with LUNA16's identity direction matrices it is `context_mm` along x, y and z.
    """
    center_irc = tuple(int(v) for v in ct.xyz2irc(tuple(float(v) for v in center_xyz)))
    sx, sy, sz = (float(v) for v in ct.voxel_size_xyz)
    half_i, half_r, half_c = (max(1, math.ceil(context_mm / 2.0 / s)) for s in (sz, sy, sx))
    i, r, c = center_irc
    hu = ct.hu

    def plane(axis: int, index: int) -> np.ndarray | None:
        # A centre outside the volume (annotations rarely are) still gets a picture, of nothing.
        return np.take(hu, index, axis=axis) if 0 <= index < hu.shape[axis] else None

    axial = _crop2d(plane(0, i), (r, c), (half_r, half_c))
    coronal = _crop2d(plane(1, r), (i, c), (half_i, half_c))
    sagittal = _crop2d(plane(2, c), (i, r), (half_i, half_r))
    return OrthoSlices(
        axial=axial,
        coronal=coronal,
        sagittal=sagittal,
        spacing_mm={"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)},
        center_irc=center_irc,
    )


def lung_window(hu: np.ndarray, window_hu: tuple[float, float] = LUNG_WINDOW_HU) -> np.ndarray:
    """hu: any shape, HU. Returns the same shape float32 in [0, 1]: (hu - low) / (high - low), clipped."""
    low, high = window_hu
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# drawing


def _draw_panel(ax, image: np.ndarray, spacing: tuple[float, float], view: str, finding: Finding) -> None:
    import matplotlib  # loaded only when a picture is drawn (see write_sheets)
    from matplotlib.patches import Circle

    half_h = image.shape[0] * spacing[0] / 2.0
    half_w = image.shape[1] * spacing[1] / 2.0
    # Offsets in mm from the finding, so circles are round whatever the voxel spacing. Axial:
    # row 0 (anterior) at the top; coronal and sagittal: the first slice (inferior) at the bottom.
    origin = "upper" if view == "axial" else "lower"
    # Beyond the CT volume is drawn in a colour of its own, so it is not mistaken for air.
    pixels = np.ma.masked_array(lung_window(image), mask=image == OUTSIDE_HU)
    cmap = matplotlib.colormaps["gray"].with_extremes(bad=_OUTSIDE_COLOUR)
    ax.imshow(
        pixels,
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        origin=origin,
        extent=(-half_w, half_w, -half_h, half_h),
        interpolation="nearest",
    )
    if finding.kind in (MISSED_NODULE, DETECTED) and math.isfinite(finding.diameter_mm):
        ax.add_patch(Circle((0.0, 0.0), finding.diameter_mm / 2.0, fill=False, edgecolor=_MARK_COLOUR, linewidth=1.2))
    else:
        inner, outer = 3.0, 9.0
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ax.plot([dx * inner, dx * outer], [dy * inner, dy * outer], color=_MARK_COLOUR, linewidth=1.2)
    ax.set_xlim(-half_w, half_w)
    ax.set_ylim(-half_h, half_h)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.03, 0.97, view, transform=ax.transAxes, color="white", fontsize=7, va="top", ha="left")


def write_sheets(
    findings: Sequence[Finding],
    data_root: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    prefix: str,
    *,
    context_mm: float = CONTEXT_MM,
    cts: dict[str, Ct] | None = None,
) -> list[tuple[Path, list[Finding]]]:
    """Draw `findings` as sheets `<out_dir>/<prefix>_01.png`, `_02.png`, … of SHEET_ROWS rows each.

    Loads each CT once (findings of one series are drawn together), or takes it from `cts`
    (series uid → `Ct` already in memory, e.g. one read from DICOM; then `data_root` may be None).
    Returns [(path, findings on that sheet)], in order. Nothing is written for an empty list.
    """
    from matplotlib.figure import Figure  # matplotlib (0.4 s) is loaded only when a picture is drawn

    out_dir = Path(out_dir)
    if not findings:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    slices: dict[int, OrthoSlices] = {}
    by_series: dict[str, list[int]] = {}
    for k, finding in enumerate(findings):
        by_series.setdefault(finding.series_uid, []).append(k)
    for uid, ks in by_series.items():
        ct = cts[uid] if cts is not None and uid in cts else Ct(uid, data_root)
        for k in ks:
            slices[k] = orthogonal_slices(ct, findings[k].center_xyz, context_mm)
        del ct
    width_px, height_px = sheet_size_px()
    written = []
    for sheet, start in enumerate(range(0, len(findings), SHEET_ROWS), start=1):
        on_sheet = list(range(start, min(start + SHEET_ROWS, len(findings))))
        fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor="white")
        row_h = 1.0 / SHEET_ROWS
        panel_h = PANEL_INCHES / (PANEL_INCHES + LABEL_INCHES) * row_h
        for row, k in enumerate(on_sheet):
            bottom = 1.0 - (row + 1) * row_h
            for col, view in enumerate(_VIEWS):
                ax = fig.add_axes((col / 3.0 + 0.005, bottom + 0.005, 1.0 / 3.0 - 0.01, panel_h - 0.01))
                _draw_panel(ax, getattr(slices[k], view), slices[k].spacing_mm[view], view, findings[k])
            fig.text(
                0.01,
                bottom + panel_h + 0.003,
                findings[k].label(len(findings)),
                fontsize=8,
                va="bottom",
                ha="left",
                family="monospace",
            )
        path = out_dir / f"{prefix}_{sheet:02d}.png"
        fig.savefig(path, dpi=DPI, facecolor="white")
        written.append((path, [findings[k] for k in on_sheet]))
    return written


@dataclasses.dataclass(frozen=True)
class PicturesResult:
    """What `write_pictures` wrote: sheet paths per kind, the index CSV, and the findings drawn."""

    false_positive_sheets: list[Path]
    missed_nodule_sheets: list[Path]
    index: Path
    false_positives: int
    missed_nodules: int
    missed_nodules_total: int


def write_pictures(
    predictions: pd.DataFrame,
    annotations: pd.DataFrame,
    excluded: pd.DataFrame | None,
    data_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    count: int,
    threshold: float = 0.5,
    *,
    context_mm: float = CONTEXT_MM,
) -> PicturesResult:
    """Sheets of the `count` most confident false positives and of up to `count` missed nodules.

    predictions: LUNA16 submission rows (seriesuid, coordX, coordY, coordZ, probability) of the
    evaluated scans; annotations / excluded: annotations.csv / annotations_excluded.csv rows of the
    same scans (excluded may be None). Writes `<out_dir>/false_positives_NN.png`,
    `missed_nodules_NN.png` and `index.csv` (kind, rank, sheet, row, seriesuid, coordX, coordY,
    coordZ, diameter_mm, probability); old sheets in `out_dir` are removed first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("false_positives_*.png"), *out_dir.glob("missed_nodules_*.png")]:
        old.unlink()
    predictions = predictions.reset_index(drop=True)
    annotations = annotations.reset_index(drop=True)
    match = match_predictions(predictions, annotations, excluded)
    false_positives = select_false_positives(predictions, match, count)
    missed = select_missed_nodules(annotations, match, threshold, count)
    fp_sheets = write_sheets(false_positives, data_root, out_dir, "false_positives", context_mm=context_mm)
    missed_sheets = write_sheets(missed, data_root, out_dir, "missed_nodules", context_mm=context_mm)
    # One index row per drawn finding, in sheet order.
    columns = ["kind", "rank", "sheet", "row", "seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "probability"]
    rows = [
        (f.kind, f.rank, path.name, row, f.series_uid, *f.center_xyz, f.diameter_mm, f.probability)
        for path, on_sheet in [*fp_sheets, *missed_sheets]
        for row, f in enumerate(on_sheet, start=1)
    ]
    index = out_dir / "index.csv"
    pd.DataFrame(rows, columns=columns).to_csv(index, index=False)
    return PicturesResult(
        false_positive_sheets=[p for p, _ in fp_sheets],
        missed_nodule_sheets=[p for p, _ in missed_sheets],
        index=index,
        false_positives=len(false_positives),
        missed_nodules=len(missed),
        missed_nodules_total=len(missed_nodule_rows(match, threshold)),
    )
