"""Classification metrics for the training loop, and LUNA16's FROC / CPM score.

Part 1 (torch): `confusion_counts`, `precision_recall_f1`, `roc_auc`, `average_precision`,
`classification_summary`. They take the per-sample tensors an epoch leaves on its device,
reduce them there with torch ops and move a handful of numbers to the host with one
`.tolist()` per call, so a GPU epoch is not ended by thousands of tiny transfers.

Part 1 also has the ROC analysis a report needs, in numpy (labels and scores may be numpy arrays
or torch tensors on any device; they are copied to the host once): `roc_curve` (a `RocCurve`:
one point per distinct score, tied scores entering together, from (0, 0) to (1, 1); its `auc`
equals `roc_auc`), `auc_with_ci` (an `AucResult`: the AUC with a stratified bootstrap confidence
interval, positives and negatives each resampled with replacement, bounds by the same order
statistics as FROC's) and `sensitivity_specificity` at a threshold (positive when prob > threshold).

Part 2 (numpy / pandas): `match_predictions` and `froc`, LUNA16's evaluation of a set of
scored candidate locations, following the challenge's evaluation page
(luna16.grand-challenge.org/Evaluation) and its script `noduleCADEvaluationLIDC.py`:

- A prediction hits an annotated nodule when its Euclidean distance to the nodule's centre is
  strictly less than the radius: ``dx² + dy² + dz² < (diameter_mm / 2)²`` (mm). A point exactly
  on the sphere is not a hit.
- Several hits on one nodule count once, with the highest probability. A prediction within two
  overlapping nodules counts for both (the script does the same, with a warning).
- Predictions that hit no nodule but lie within a finding of `annotations_excluded.csv` are
  ignored: neither hits nor false positives. Excluded findings with a negative diameter
  (LUNA16 writes -1 where no size is known) get a 10 mm diameter, as in the script.
- Every other prediction is a false positive. The FROC curve has one point per distinct
  probability t (predictions with probability >= t kept): false positives / number of scans,
  against detected nodules / all nodules; the point (0, 0) is prepended. Nodules that no
  prediction hits count in the denominator, so sensitivity then never reaches 1.
- The sensitivities at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan are read off the
  curve by linear interpolation (`numpy.interp`, which is how the script turns the curve into
  the one it plots); CPM is their mean.
- The confidence interval comes from bootstrapping over scans: each bootstrap draws as many
  scans as there are, with replacement, and recomputes the curve on the drawn scans' findings.
  Bounds are the script's order statistics: sorted values v, lower v[floor(n·(1-c)/2)],
  upper v[floor(n·(1+c)/2)].

Part 3 (pandas): `detection_confusion`, the book's chapter-14 confusion matrix of a whole detector
(segmentation components, classified and graded), with the same hit rule as Part 2.

Where this module deliberately differs from the script: predictions that name a scan outside
the evaluated set raise `DataFormatError` (the script silently drops them); the confidence
interval is given for the CPM itself and for each of the seven sensitivities (the script gives
pointwise bounds along the whole curve); the bootstrap is seeded (the script uses numpy's
global, unseeded generator).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from p2ch.errors import ConfigError, DataFormatError

# --------------------------------------------------------------------------------------------
# Part 1: classification metrics on torch tensors
# --------------------------------------------------------------------------------------------

SUMMARY_KEYS = (
    "loss/all",
    "loss/neg",
    "loss/pos",
    "correct/all",
    "correct/neg",
    "correct/pos",
    "pr/precision",
    "pr/recall",
    "pr/f1_score",
    "pr/auc",
    "pr/average_precision",
    "count/all",
    "count/neg",
    "count/pos",
    "count/tp",
    "count/fp",
    "count/tn",
    "count/fn",
)
"""Keys of `classification_summary` (TensorBoard tags); the loss/* keys only when losses are given."""


@dataclasses.dataclass(frozen=True)
class ConfusionCounts:
    """Confusion-matrix counts of a binary classifier (positive = nodule)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def precision_recall_f1(counts: ConfusionCounts) -> tuple[float, float, float]:
    """(precision, recall, F1) from confusion counts; 0/0 gives nan, never ZeroDivisionError.

    precision = tp / (tp + fp): nan when nothing is predicted positive.
    recall = tp / (tp + fn): nan when there are no positives.
    F1 = 2·tp / (2·tp + fp + fn), the harmonic mean of precision and recall where both are
    defined and non-zero; 0 when tp is 0 but something was wrong, nan only when there are
    neither positives nor positive predictions.
    """
    precision = _ratio(counts.tp, counts.tp + counts.fp)
    recall = _ratio(counts.tp, counts.tp + counts.fn)
    f1 = _ratio(2 * counts.tp, 2 * counts.tp + counts.fp + counts.fn)
    return precision, recall, f1


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _check_pair(labels: Any, values: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and dtypes (no device sync); return (labels as bool-able tensor, values)."""
    labels, values = _as_tensor(labels), _as_tensor(values)
    if labels.ndim != 1 or values.ndim != 1 or labels.shape[0] != values.shape[0]:
        raise DataFormatError(
            f"labels shape {tuple(labels.shape)} and {what} shape {tuple(values.shape)}: expected two 1-D "
            "tensors of the same length N (one entry per sample)"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise DataFormatError(f"labels dtype {labels.dtype}: expected bool or an integer dtype holding 0/1")
    if not values.dtype.is_floating_point:
        raise DataFormatError(f"{what} dtype {values.dtype}: expected a floating-point tensor")
    if labels.device != values.device:
        raise DataFormatError(
            f"labels are on {labels.device} but {what} on {values.device}; put both on the same device"
        )
    if labels.device.type == "mps":  # no float64 on MPS; these reductions are cheap on the CPU
        labels, values = labels.cpu(), values.cpu()
    return labels, values


def _bad_label_count(labels: torch.Tensor) -> torch.Tensor:
    if labels.dtype == torch.bool:
        return torch.zeros((), dtype=torch.int64, device=labels.device)
    return ((labels != 0) & (labels != 1)).sum()


def _raise_if_bad(bad_labels: float, bad_values: float, what: str) -> None:
    if bad_labels:
        raise DataFormatError(f"labels: {int(bad_labels)} value(s) other than 0 and 1; expected 0/1 labels")
    if bad_values:
        raise DataFormatError(f"{what}: {int(bad_values)} NaN or infinite value(s); expected finite numbers")


def _confusion_terms(is_pos: torch.Tensor, prob_pos: torch.Tensor, threshold: float) -> list[torch.Tensor]:
    pred_pos = prob_pos > threshold
    tp = (is_pos & pred_pos).sum()
    fp = (~is_pos & pred_pos).sum()
    fn = (is_pos & ~pred_pos).sum()
    tn = is_pos.numel() - tp - fp - fn
    return [tp, fp, tn, fn]


def _ranking_terms(is_pos: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From one descending sort: (twice the tie-averaged rank sum of the positives, int64, exact;
    the sum over distinct thresholds of Δtp · precision, float64). AP = the second / positives."""
    n = scores.shape[0]
    sorted_scores, order = torch.sort(scores, descending=True)
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    ends = torch.cumsum(counts, 0) - 1  # 0-based position of the last score of each run of ties
    starts = ends - counts + 1
    tp = torch.cumsum(is_pos[order].to(torch.int64), 0)[ends]
    new_tp = torch.diff(tp, prepend=tp.new_zeros(1))
    # Sorted position p has ascending rank n - p; a run of ties shares the mean rank n - (start + end) / 2.
    rank_sum2 = (new_tp * (2 * n - starts - ends)).sum()
    precision = tp.to(torch.float64) / (ends + 1).to(torch.float64)
    return rank_sum2, (new_tp.to(torch.float64) * precision).sum()


def _auc_from(rank_sum2: float, positives: int, negatives: int) -> float:
    if positives == 0 or negatives == 0:
        return math.nan
    # Mann-Whitney U / (P·N), with U = rank sum of positives - P(P+1)/2; all terms doubled, exact.
    return (round(rank_sum2) - positives * (positives + 1)) / (2 * positives * negatives)


def confusion_counts(labels: torch.Tensor, prob_pos: torch.Tensor, threshold: float = 0.5) -> ConfusionCounts:
    """Confusion counts for predictions `prob_pos > threshold` (the book's rule: <= threshold is negative).

    labels: (N,) bool, or integer 0/1, on any device; 1/True = nodule.
    prob_pos: (N,) float, the predicted probability of the positive class, same device.
    Raises DataFormatError for mismatched shapes, non-binary labels or NaN probabilities.
    """
    labels, prob_pos = _check_pair(labels, prob_pos, "prob_pos")
    is_pos = labels.to(torch.bool)
    terms = [
        *_confusion_terms(is_pos, prob_pos, threshold),
        _bad_label_count(labels),
        (~torch.isfinite(prob_pos)).sum(),
    ]
    tp, fp, tn, fn, bad_labels, bad_probs = torch.stack(terms).tolist()
    _raise_if_bad(bad_labels, bad_probs, "prob_pos")
    return ConfusionCounts(tp=int(tp), fp=int(fp), tn=int(tn), fn=int(fn))


def roc_auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Exact area under the ROC curve (ties count one half: average ranks); nan with only one class.

    labels: (N,) bool or integer 0/1. scores: (N,) float, higher = more likely positive; same device.
    Equals the probability that a random positive scores above a random negative, plus half the
    probability of a tie (the trapezoidal area under the ROC curve).
    """
    labels, scores = _check_pair(labels, scores, "scores")
    is_pos = labels.to(torch.bool)
    rank_sum2, _ = _ranking_terms(is_pos, scores)
    terms = torch.stack([is_pos.sum(), rank_sum2, _bad_label_count(labels), (~torch.isfinite(scores)).sum()])
    positives, rank_sum2, bad_labels, bad_scores = terms.tolist()
    _raise_if_bad(bad_labels, bad_scores, "scores")
    return _auc_from(rank_sum2, int(positives), int(labels.shape[0]) - int(positives))


def average_precision(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Average precision, scikit-learn's step-wise definition; nan when there are no positives.

    AP = Σₖ (Rₖ - Rₖ₋₁)·Pₖ over the distinct score thresholds in descending order, Pₖ and Rₖ the
    precision and recall of `scores >= thresholdₖ` (no interpolation; tied scores enter together).
    labels: (N,) bool or integer 0/1. scores: (N,) float; same device.
    """
    labels, scores = _check_pair(labels, scores, "scores")
    is_pos = labels.to(torch.bool)
    _, ap_sum = _ranking_terms(is_pos, scores)
    terms = [is_pos.sum(), ap_sum, _bad_label_count(labels), (~torch.isfinite(scores)).sum()]
    positives, ap_sum, bad_labels, bad_scores = torch.stack([t.to(torch.float64) for t in terms]).tolist()
    _raise_if_bad(bad_labels, bad_scores, "scores")
    return ap_sum / positives if positives else math.nan


def classification_summary(
    labels: torch.Tensor,
    prob_pos: torch.Tensor,
    losses: torch.Tensor | None = None,
    threshold: float = 0.5,
) -> dict[str, float]:
    """One epoch's metrics, keyed by TensorBoard tag (see `SUMMARY_KEYS`), with a single device sync.

    labels: (N,) bool or integer 0/1. prob_pos: (N,) float probability of "nodule".
    losses: (N,) float per-sample loss, or None (then the loss/* keys are left out).
    All on the same device. Returns plain floats (counts as ints):
    loss/all|neg|pos: mean loss over all / negative / positive samples (nan when none);
    correct/all|neg|pos: percent classified correctly at `threshold` (nan when none);
    pr/precision|recall|f1_score: see `precision_recall_f1`; pr/auc: `roc_auc`;
    pr/average_precision: `average_precision`; count/all|neg|pos|tp|fp|tn|fn.
    """
    labels, prob_pos = _check_pair(labels, prob_pos, "prob_pos")
    is_pos = labels.to(torch.bool)
    terms = [
        *_confusion_terms(is_pos, prob_pos, threshold),
        *_ranking_terms(is_pos, prob_pos),
        _bad_label_count(labels),
        (~torch.isfinite(prob_pos)).sum(),
    ]
    if losses is not None:
        terms += _loss_terms(losses, labels, is_pos)
    values = torch.stack([t.to(torch.float64) for t in terms]).tolist()
    tp, fp, tn, fn = (int(v) for v in values[:4])
    rank_sum2, ap_sum, bad_labels, bad_probs = values[4:8]
    _raise_if_bad(bad_labels, bad_probs, "prob_pos")
    counts = ConfusionCounts(tp=tp, fp=fp, tn=tn, fn=fn)
    summary: dict[str, float] = {}
    if losses is not None:
        summary.update(_loss_summary(values[8:12], counts))
    summary.update(_prediction_summary(counts, rank_sum2, ap_sum))
    return summary


def _loss_terms(losses: Any, labels: torch.Tensor, is_pos: torch.Tensor) -> list[torch.Tensor]:
    """[sum of all, negative, positive losses, count of non-finite ones], each () float64 on labels' device.

    losses: (N,) float per-sample loss; DataFormatError unless it is a float tensor shaped like labels.
    """
    losses = _as_tensor(losses)
    if losses.shape != labels.shape or not losses.dtype.is_floating_point:
        raise DataFormatError(
            f"losses shape {tuple(losses.shape)} dtype {losses.dtype}: expected a float tensor of shape "
            f"{tuple(labels.shape)}, one loss per sample"
        )
    losses = losses.to(device=labels.device, dtype=torch.float64)
    return [losses.sum(), losses[~is_pos].sum(), losses[is_pos].sum(), (~torch.isfinite(losses)).sum()]


def _loss_summary(loss_values: Sequence[float], counts: ConfusionCounts) -> dict[str, float]:
    """The loss/* keys of `classification_summary` from the host values of `_loss_terms`."""
    loss_all, loss_neg, loss_pos, bad_losses = loss_values
    if bad_losses:
        raise DataFormatError(f"losses: {int(bad_losses)} NaN or infinite value(s); expected finite ones")
    positives, negatives = counts.tp + counts.fn, counts.tn + counts.fp
    return {
        "loss/all": _ratio(loss_all, positives + negatives),
        "loss/neg": _ratio(loss_neg, negatives),
        "loss/pos": _ratio(loss_pos, positives),
    }


def _prediction_summary(counts: ConfusionCounts, rank_sum2: float, ap_sum: float) -> dict[str, float]:
    """The correct/*, pr/* and count/* keys of `classification_summary`."""
    tp, fp, tn, fn = counts.tp, counts.fp, counts.tn, counts.fn
    positives, negatives = tp + fn, tn + fp
    total = positives + negatives
    precision, recall, f1 = precision_recall_f1(counts)
    return {
        "correct/all": _ratio(100.0 * (tp + tn), total),
        "correct/neg": _ratio(100.0 * tn, negatives),
        "correct/pos": _ratio(100.0 * tp, positives),
        "pr/precision": precision,
        "pr/recall": recall,
        "pr/f1_score": f1,
        "pr/auc": _auc_from(rank_sum2, positives, negatives),
        "pr/average_precision": _ratio(ap_sum, positives),
        "count/all": total,
        "count/neg": negatives,
        "count/pos": positives,
        "count/tp": tp,
        "count/fp": fp,
        "count/tn": tn,
        "count/fn": fn,
    }


# --------------------------------------------------------------------------------------------
# Part 2: LUNA16 FROC and CPM
# --------------------------------------------------------------------------------------------

FROC_FPS_PER_SCAN = (0.125, 0.25, 0.5, 1, 2, 4, 8)
"""False positives per scan at which LUNA16 reads the sensitivity; CPM is the mean of those."""

PREDICTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
EXCLUDED_UNKNOWN_DIAMETER_MM = 10.0
"""Diameter LUNA16's script gives excluded findings whose diameter_mm is negative (-1: unknown)."""

_COORDS = ("coordX", "coordY", "coordZ")
_BOOTSTRAP_BATCH_ELEMENTS = 4_000_000  # (bootstraps × findings) per batch: about 32 MB per array


@dataclasses.dataclass(frozen=True, eq=False)
class _Table:
    """A validated LUNA16 table: series (K,) str, center_xyz (K, 3) float64 mm, value (K,) float64."""

    series: np.ndarray
    center_xyz: np.ndarray
    value: np.ndarray

    def take(self, mask: np.ndarray) -> _Table:
        return _Table(self.series[mask], self.center_xyz[mask], self.value[mask])


def _show(value: Any) -> str:
    """A cell value as a user reads it: 'nan', '1.5', "'abc'"."""
    if isinstance(value, (float, np.floating, int, np.integer)) and not isinstance(value, bool):
        return f"{float(value):g}"
    return repr(value)


def _read_table(frame: Any, name: str, columns: tuple[str, ...]) -> _Table:
    if not isinstance(frame, pd.DataFrame):
        raise DataFormatError(
            f"{name}: got {type(frame).__name__}; expected a pandas DataFrame with the columns {','.join(columns)}"
        )
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataFormatError(
            f"{name}: missing column(s) {', '.join(missing)}; expected the LUNA16 header "
            f"{','.join(columns)}, got {','.join(map(str, frame.columns))}"
        )
    raw_series = frame["seriesuid"]
    series = raw_series.astype(str).str.strip()
    bad = raw_series.isna().to_numpy() | (series == "").to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(f"{name}: row {row}: seriesuid is {_show(raw_series.iloc[row])}; expected a series uid")
    numbers = []
    for column in columns[1:]:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataFormatError(
                f"{name}: row {row}: {column} is {_show(frame[column].iloc[row])}; expected a finite number"
            )
        numbers.append(values)
    return _Table(
        series=series.to_numpy(dtype=object),
        center_xyz=np.stack(numbers[:3], axis=1).reshape(-1, 3),
        value=numbers[3],
    )


def _read_predictions(predictions: Any) -> _Table:
    return _read_table(predictions, "predictions", PREDICTION_COLUMNS)


def _read_annotations(annotations: Any) -> _Table:
    table = _read_table(annotations, "annotations", ANNOTATION_COLUMNS)
    bad = table.value <= 0
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(
            f"annotations: row {row}: diameter_mm is {table.value[row]:g}; expected a positive diameter "
            "in mm (findings of unknown size belong in annotations_excluded.csv)"
        )
    return table


def _read_excluded(excluded: Any) -> _Table:
    table = _read_table(excluded, "excluded", ANNOTATION_COLUMNS)
    diameter = np.where(table.value < 0, EXCLUDED_UNKNOWN_DIAMETER_MM, table.value)
    return dataclasses.replace(table, value=diameter)


def _series_groups(points: _Table, findings: _Table) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per series with both points and findings: (point rows, finding rows, squared distances (n, m) mm²)."""
    if not len(points.series) or not len(findings.series):
        return
    codes, _ = pd.factorize(np.concatenate([points.series, findings.series]))
    point_codes, finding_codes = codes[: len(points.series)], codes[len(points.series) :]
    point_order = np.argsort(point_codes, kind="stable")
    point_sorted = point_codes[point_order]
    finding_order = np.argsort(finding_codes, kind="stable")
    finding_sorted = finding_codes[finding_order]
    series_codes, finding_starts = np.unique(finding_sorted, return_index=True)
    finding_ends = np.append(finding_starts[1:], len(finding_sorted))
    point_starts = np.searchsorted(point_sorted, series_codes, side="left")
    point_ends = np.searchsorted(point_sorted, series_codes, side="right")
    for fs, fe, ps, pe in zip(finding_starts, finding_ends, point_starts, point_ends, strict=True):
        if ps == pe:
            continue
        point_rows, finding_rows = point_order[ps:pe], finding_order[fs:fe]
        delta = points.center_xyz[point_rows][:, None, :] - findings.center_xyz[finding_rows][None, :, :]
        dx, dy, dz = delta[..., 0], delta[..., 1], delta[..., 2]
        yield point_rows, finding_rows, dx * dx + dy * dy + dz * dz


@dataclasses.dataclass(frozen=True, eq=False)
class PredictionMatch:
    """Which predictions hit which nodules, LUNA16's way (see the module docstring).

    Row k of the prediction arrays is row k (by position) of the predictions table; row j of the
    nodule arrays is row j of the annotations table.

    nodule_index: (N,) int64, the annotation row a prediction hits (the nearest one when it lies
        within several), -1 when it hits none.
    is_excluded: (N,) bool, hits no nodule but lies within an excluded finding: ignored.
    nodule_probability: (M,) float64, highest probability among a nodule's hits, nan if missed.
    nodule_prediction: (M,) int64, the prediction row that gave it (first such row on ties), -1 if missed.
    """

    nodule_index: np.ndarray
    is_excluded: np.ndarray
    nodule_probability: np.ndarray
    nodule_prediction: np.ndarray

    @property
    def is_hit(self) -> np.ndarray:
        """(N,) bool: the prediction lies within at least one annotated nodule."""
        return self.nodule_index >= 0

    @property
    def is_false_positive(self) -> np.ndarray:
        """(N,) bool: neither a hit nor on an excluded finding."""
        return (self.nodule_index < 0) & ~self.is_excluded

    @property
    def is_detected(self) -> np.ndarray:
        """(M,) bool: at least one prediction hits the nodule."""
        return self.nodule_prediction >= 0


def _match(predictions: _Table, annotations: _Table, excluded: _Table | None) -> PredictionMatch:
    count, nodules = len(predictions.series), len(annotations.series)
    nodule_index = np.full(count, -1, dtype=np.int64)
    nodule_probability = np.full(nodules, np.nan)
    nodule_prediction = np.full(nodules, -1, dtype=np.int64)
    radius2 = (annotations.value / 2.0) ** 2
    for point_rows, nodule_rows, dist2 in _series_groups(predictions, annotations):
        hit = dist2 < radius2[nodule_rows][None, :]
        if not hit.any():
            continue
        masked = np.where(hit, dist2, np.inf)
        nearest = masked.argmin(axis=1)
        hits_any = hit.any(axis=1)
        nodule_index[point_rows[hits_any]] = nodule_rows[nearest[hits_any]]
        probs = np.where(hit, predictions.value[point_rows][:, None], -np.inf)
        best = probs.argmax(axis=0)
        detected = hit.any(axis=0)
        nodule_probability[nodule_rows[detected]] = probs[best[detected], np.flatnonzero(detected)]
        nodule_prediction[nodule_rows[detected]] = point_rows[best[detected]]
    is_excluded = np.zeros(count, dtype=bool)
    if excluded is not None:
        excluded_radius2 = (excluded.value / 2.0) ** 2
        for point_rows, finding_rows, dist2 in _series_groups(predictions, excluded):
            within = (dist2 < excluded_radius2[finding_rows][None, :]).any(axis=1)
            is_excluded[point_rows[within]] = True
        is_excluded &= nodule_index < 0
    return PredictionMatch(nodule_index, is_excluded, nodule_probability, nodule_prediction)


def match_predictions(
    predictions: pd.DataFrame, annotations: pd.DataFrame, excluded: pd.DataFrame | None = None
) -> PredictionMatch:
    """Match scored predictions to annotated nodules and excluded findings by LUNA16's hit rule.

    predictions: seriesuid, coordX, coordY, coordZ (mm), probability. annotations: seriesuid,
    coordX, coordY, coordZ (mm), diameter_mm > 0. excluded: LUNA16's `annotations_excluded.csv`
    columns (diameter_mm < 0 means 10 mm), or None. Only rows of the same seriesuid are compared.
    Raises DataFormatError for missing columns, blank series uids, non-finite numbers or a
    non-positive annotation diameter.
    """
    return _match(
        _read_predictions(predictions),
        _read_annotations(annotations),
        None if excluded is None else _read_excluded(excluded),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class FrocResult:
    """LUNA16's FROC analysis of one set of predictions.

    cpm: mean sensitivity at `FROC_FPS_PER_SCAN` (nan without nodules).
    sensitivities: {false positives per scan: sensitivity} at those seven points.
    cpm_ci, sensitivities_ci: bootstrap confidence intervals (nan, nan when bootstrap is 0).
    fps_per_scan, sensitivity, thresholds: (K,) float64, the FROC curve: at threshold t (keep
        predictions with probability >= t) the false positives per scan and the fraction of
        nodules detected; the first point is (0, 0) at threshold +inf.
    num_scans: scans evaluated (the FP divisor). num_nodules: annotated nodules on them.
    num_predictions: predictions given. num_hits: predictions within a nodule.
    num_detected: nodules hit at least once. num_excluded_predictions: predictions ignored
    because they lie on an excluded finding. num_false_positives: the rest.
    """

    cpm: float
    sensitivities: dict[float, float]
    cpm_ci: tuple[float, float]
    sensitivities_ci: dict[float, tuple[float, float]]
    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    num_scans: int
    num_nodules: int
    num_predictions: int
    num_hits: int
    num_detected: int
    num_excluded_predictions: int
    num_false_positives: int
    bootstrap: int
    confidence: float
    seed: int

    def operating_point(self, threshold: float) -> dict[str, Any]:
        """What keeping the predictions with probability >= `threshold` finds: nodules detected (of
        `num_nodules`), false positives in all, per scan and per true nodule (sensitivity and per nodule:
        None without nodules).
        Read off the FROC curve, so excluded findings and double hits count as in the CPM."""
        point = int(np.searchsorted(-self.thresholds, -float(threshold), side="right")) - 1
        false_positives = round(float(self.fps_per_scan[point]) * self.num_scans)
        sensitivity = float(self.sensitivity[point])
        detected = round(sensitivity * self.num_nodules) if self.num_nodules else 0
        return {
            "threshold": float(threshold),
            "nodules_detected": detected,
            "num_nodules": self.num_nodules,
            "sensitivity": sensitivity if self.num_nodules else None,
            "false_positives": false_positives,
            "fps_per_scan": float(self.fps_per_scan[point]),
            "fps_per_nodule": false_positives / self.num_nodules if self.num_nodules else None,
        }

    def suggested_threshold(self, max_fps_per_nodule: float = 1.0, step: float = 0.01) -> dict[str, Any] | None:
        """The operating point that finds the most nodules at ≤ `max_fps_per_nodule` false positives per true
        nodule, with the fewest false positives: of the thresholds on a grid of `step` (0.01, 0.02, …, below 1)
        within that price, the highest that finds as many nodules as the lowest does.
        None without nodules, or when no grid threshold finds a nodule at that price."""
        if not self.num_nodules:
            return None
        points = [self.operating_point(round(float(t), 6)) for t in np.arange(1, round(1 / step)) * step]
        affordable = [p for p in points if p["fps_per_nodule"] <= max_fps_per_nodule]
        if not affordable or not affordable[0]["nodules_detected"]:
            return None
        most = affordable[0]["nodules_detected"]  # found only falls as the threshold rises
        return [p for p in affordable if p["nodules_detected"] == most][-1]

    def to_dict(self, include_curve: bool = True) -> dict[str, Any]:
        """Plain JSON-serialisable dict (nan and ±inf become None; FP rates as keys like "0.125")."""

        def number(value: float) -> float | None:
            value = float(value)
            return value if math.isfinite(value) else None

        result: dict[str, Any] = {
            "cpm": number(self.cpm),
            "cpm_ci": [number(v) for v in self.cpm_ci],
            "sensitivities": {f"{fp:g}": number(v) for fp, v in self.sensitivities.items()},
            "sensitivities_ci": {f"{fp:g}": [number(v) for v in ci] for fp, ci in self.sensitivities_ci.items()},
            "num_scans": self.num_scans,
            "num_nodules": self.num_nodules,
            "num_predictions": self.num_predictions,
            "num_hits": self.num_hits,
            "num_detected": self.num_detected,
            "num_excluded_predictions": self.num_excluded_predictions,
            "num_false_positives": self.num_false_positives,
            "bootstrap": self.bootstrap,
            "confidence": self.confidence,
            "seed": self.seed,
        }
        if include_curve:
            result["curve"] = {
                "fps_per_scan": [number(v) for v in self.fps_per_scan],
                "sensitivity": [number(v) for v in self.sensitivity],
                "thresholds": [number(v) for v in self.thresholds],
            }
        return result


@dataclasses.dataclass(frozen=True, eq=False)
class _FrocEntries:
    """What the FROC curve is built from, sorted by probability, highest first.

    scan: (E,) int64 scan index of each entry (a detected nodule or a false positive).
    is_nodule: (E,) bool. probability: (E,) float64 (a nodule's highest hit probability).
    ends: (G,) int64, last entry of each run of equal probabilities (one curve point each).
    nodules_per_scan: (S,) int64, all nodules of each scan, detected or not.
    """

    scan: np.ndarray
    is_nodule: np.ndarray
    probability: np.ndarray
    ends: np.ndarray
    nodules_per_scan: np.ndarray

    @property
    def num_scans(self) -> int:
        return len(self.nodules_per_scan)


def _froc_entries(
    scan: np.ndarray, is_nodule: np.ndarray, probability: np.ndarray, nodules_per_scan: np.ndarray
) -> _FrocEntries:
    order = np.argsort(-probability, kind="stable")
    probability = probability[order]
    ends = np.zeros(0, dtype=np.int64)
    if len(probability):
        ends = np.flatnonzero(np.append(probability[1:] != probability[:-1], True))
    return _FrocEntries(scan[order], is_nodule[order], probability, ends, nodules_per_scan)


def _froc_curve(entries: _FrocEntries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fps_per_scan, sensitivity, thresholds), each (G + 1,) float64, starting at (0, 0, +inf)."""
    tp = np.cumsum(entries.is_nodule, dtype=np.int64)[entries.ends]
    fp = entries.ends + 1 - tp
    total = int(entries.nodules_per_scan.sum())
    fps = np.concatenate([[0.0], fp / entries.num_scans])
    sensitivity = np.concatenate([[0.0], tp / total]) if total else np.full(len(fps), np.nan)
    thresholds = np.concatenate([[np.inf], entries.probability[entries.ends]])
    return fps, sensitivity, thresholds


def _sensitivities_at(fps: np.ndarray, sensitivity: np.ndarray) -> np.ndarray:
    """(7,) float64: the curve read at FROC_FPS_PER_SCAN by linear interpolation (numpy.interp)."""
    return np.interp(np.asarray(FROC_FPS_PER_SCAN, dtype=np.float64), fps, sensitivity)


def _weighted_sensitivities(entries: _FrocEntries, weights: np.ndarray) -> np.ndarray:
    """(B, 7) float64: sensitivities at FROC_FPS_PER_SCAN when scan s appears weights[b, s] times.

    weights: (B, S) int, multiplicity of each scan in each resample (a row of ones is the
    original data). A resample with no nodules gives nan.
    """
    count, scans = weights.shape
    out = np.full((count, len(FROC_FPS_PER_SCAN)), np.nan)
    weights = weights.astype(np.int64)
    total = weights @ entries.nodules_per_scan
    # Detected nodules are few: count them over their own entries, and all entries in one pass.
    nodule_entries = np.flatnonzero(entries.is_nodule)
    nodule_scan = entries.scan[nodule_entries]
    nodules_up_to_end = np.searchsorted(nodule_entries, entries.ends, side="right")
    batch = max(1, _BOOTSTRAP_BATCH_ELEMENTS // max(1, len(entries.scan)))
    zero = np.zeros(1)
    for start in range(0, count, batch):
        w = weights[start : start + batch]
        kept = np.cumsum(w[:, entries.scan], axis=1)[:, entries.ends]  # (b, G) entries >= threshold
        tp = np.concatenate([np.zeros((len(w), 1), np.int64), np.cumsum(w[:, nodule_scan], axis=1)], axis=1)
        tp = tp[:, nodules_up_to_end]
        fp = kept - tp
        for row in range(w.shape[0]):
            nodules = total[start + row]
            if nodules == 0:
                continue
            out[start + row] = _sensitivities_at(
                np.concatenate([zero, fp[row] / scans]), np.concatenate([zero, tp[row] / nodules])
            )
    return out


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """LUNA16's bootstrap bounds: sorted v, v[floor(n·(1-c)/2)] and v[floor(n·(1+c)/2)]; nan ignored."""
    values = np.sort(values[~np.isnan(values)])
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    lower = values[min(math.floor(tail * n), n - 1)]
    upper = values[min(math.floor((1.0 - tail) * n), n - 1)]
    return float(lower), float(upper)


def _bootstrap_weights(scans: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, scans) int64: how often each scan is drawn in each resample (scans draws with replacement)."""
    draws = rng.integers(0, scans, size=(count, scans))
    flat = draws + np.arange(count)[:, None] * scans
    return np.bincount(flat.ravel(), minlength=count * scans).reshape(count, scans)


def _scan_uids(series_uids: Sequence[str] | None, predictions: _Table, annotations: _Table) -> pd.Index:
    if series_uids is None:
        uids = sorted(set(predictions.series) | set(annotations.series))
    else:
        if isinstance(series_uids, str):
            raise ConfigError("series_uids is a single string; expected a sequence of series uids")
        uids = [str(uid).strip() for uid in series_uids]
    index = pd.Index(uids)
    if index.has_duplicates:
        duplicated = index[index.duplicated()].unique()
        raise DataFormatError(
            f"series_uids: {len(duplicated)} uid(s) listed more than once (first {duplicated[0]}); "
            "list each evaluated scan once"
        )
    if len(index) == 0:
        raise DataFormatError(
            "no scans to evaluate: series_uids is empty and there are no predictions or annotations; "
            "pass the series uids of the evaluated scans"
        )
    return index


def froc(
    predictions: pd.DataFrame,
    annotations: pd.DataFrame,
    excluded: pd.DataFrame | None = None,
    series_uids: Sequence[str] | None = None,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> FrocResult:
    """LUNA16's FROC curve, CPM and bootstrap confidence interval (rules: module docstring).

    predictions: DataFrame seriesuid, coordX, coordY, coordZ (mm), probability (any finite
        number, higher = more suspicious); one row per scored candidate location.
    annotations: DataFrame seriesuid, coordX, coordY, coordZ (mm), diameter_mm > 0 (annotations.csv).
    excluded: DataFrame with the same columns (annotations_excluded.csv; diameter_mm -1 = 10 mm), or None.
    series_uids: the scans evaluated; false positives are averaged over all of them, including
        scans without nodules or without predictions. None means the union of the series named in
        predictions and annotations, which misses scans that have neither: pass the list (LUNA16:
        all 888) to get LUNA16's figure. Annotations and excluded findings on other scans are
        ignored, as in LUNA16's script; predictions on other scans raise DataFormatError.
    bootstrap: number of resamples of the scans for the confidence interval (0: none).
    seed: seeds the resampling, so the interval is reproducible. confidence: e.g. 0.95.
    """
    _check_froc_options(bootstrap, confidence)
    uids, pred, pred_scan, ann, ann_scan, exc = _evaluated_findings(predictions, annotations, excluded, series_uids)
    match = _match(pred, ann, exc)
    detected = match.is_detected
    false_positive = match.is_false_positive
    entries = _froc_entries(
        scan=np.concatenate([ann_scan[detected], pred_scan[false_positive]]).astype(np.int64),
        is_nodule=np.repeat([True, False], [int(detected.sum()), int(false_positive.sum())]),
        probability=np.concatenate([match.nodule_probability[detected], pred.value[false_positive]]),
        nodules_per_scan=np.bincount(ann_scan, minlength=len(uids)).astype(np.int64),
    )
    fps, sensitivity, thresholds = _froc_curve(entries)
    at_points = _sensitivities_at(fps, sensitivity)
    # No interval without nodules: every resample's sensitivity would be nan.
    cpm_ci, points_ci = _bootstrap_intervals(entries, int(bootstrap) if len(ann_scan) else 0, seed, confidence)
    return FrocResult(
        cpm=float(np.mean(at_points)),
        sensitivities={fp: float(s) for fp, s in zip(FROC_FPS_PER_SCAN, at_points, strict=True)},
        cpm_ci=cpm_ci,
        sensitivities_ci=dict(zip(FROC_FPS_PER_SCAN, points_ci, strict=True)),
        fps_per_scan=fps,
        sensitivity=sensitivity,
        thresholds=thresholds,
        num_scans=len(uids),
        num_nodules=len(ann_scan),
        num_predictions=len(pred.series),
        num_hits=int(match.is_hit.sum()),
        num_detected=int(detected.sum()),
        num_excluded_predictions=int(match.is_excluded.sum()),
        num_false_positives=int(false_positive.sum()),
        bootstrap=int(bootstrap),
        confidence=float(confidence),
        seed=int(seed),
    )


def _check_froc_options(bootstrap: Any, confidence: Any) -> None:
    """ConfigError unless bootstrap is a whole number >= 0 and 0 < confidence < 1."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ConfigError(f"bootstrap is {bootstrap!r}; expected a whole number >= 0 (0 turns it off)")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence is {confidence!r}; expected a number between 0 and 1, like 0.95")


def _evaluated_findings(
    predictions: Any, annotations: Any, excluded: Any, series_uids: Sequence[str] | None
) -> tuple[pd.Index, _Table, np.ndarray, _Table, np.ndarray, _Table | None]:
    """`froc`'s tables, checked and kept to the evaluated scans.

    Returns (uids, pred, pred_scan, ann, ann_scan, exc): uids (S,) the evaluated scans;
    pred_scan (P,) int64 and ann_scan (A,) int64 the scan index of each prediction and kept
    annotation. Annotations and excluded findings on other scans are dropped; predictions on
    other scans raise DataFormatError.
    """
    pred = _read_predictions(predictions)
    ann = _read_annotations(annotations)
    exc = None if excluded is None else _read_excluded(excluded)
    uids = _scan_uids(series_uids, pred, ann)
    pred_scan = uids.get_indexer(pred.series)
    unknown = pred_scan < 0
    if unknown.any():
        names = pd.unique(pred.series[unknown])
        raise DataFormatError(
            f"predictions: {int(unknown.sum())} row(s) on {len(names)} series not among the {len(uids)} "
            f"evaluated scans (first {names[0]}, row {int(np.flatnonzero(unknown)[0])}); add the series to "
            "series_uids or drop those predictions"
        )
    ann_scan = uids.get_indexer(ann.series)
    ann = ann.take(ann_scan >= 0)
    ann_scan = ann_scan[ann_scan >= 0]
    if exc is not None:
        exc = exc.take(uids.get_indexer(exc.series) >= 0)
    return uids, pred, pred_scan, ann, ann_scan, exc


def _bootstrap_intervals(
    entries: _FrocEntries, bootstrap: int, seed: int, confidence: float
) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """(CPM interval, [interval of each of the 7 sensitivities]) from `bootstrap` seeded resamples of the scans.

    With bootstrap 0 every interval is (nan, nan).
    """
    if bootstrap == 0:
        return (math.nan, math.nan), [(math.nan, math.nan)] * len(FROC_FPS_PER_SCAN)
    weights = _bootstrap_weights(entries.num_scans, bootstrap, np.random.default_rng(seed))
    resampled = _weighted_sensitivities(entries, weights)
    cpm_ci = _interval(resampled.mean(axis=1), confidence)
    points_ci = [_interval(resampled[:, k], confidence) for k in range(len(FROC_FPS_PER_SCAN))]
    return cpm_ci, points_ci


# --------------------------------------------------------------------------------------------
# Part 1, continued: ROC curve, AUC with a bootstrap confidence interval (numpy, on the host;
# after Part 2 because the interval uses its `_interval`)
# --------------------------------------------------------------------------------------------


def _host_array(value: Any) -> np.ndarray:
    """`value` (numpy array, sequence, or torch tensor on any device) as a numpy array on the host."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()  # numpy has no bfloat16
    return np.asarray(value)


def _host_pair(labels: Any, scores: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(is_pos (N,) bool, scores (N,) float64) on the host, checked as Part 1 checks its tensors."""
    labels, scores = _host_array(labels), _host_array(scores)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise DataFormatError(
            f"labels shape {labels.shape} and {what} shape {scores.shape}: expected two 1-D "
            "arrays of the same length N (one entry per sample)"
        )
    if labels.size and labels.dtype.kind not in "biu":
        raise DataFormatError(f"labels dtype {labels.dtype}: expected bool or an integer dtype holding 0/1")
    if scores.size and scores.dtype.kind not in "iuf":
        raise DataFormatError(f"{what} dtype {scores.dtype}: expected real numbers (a floating-point array)")
    scores = scores.astype(np.float64)
    bad_labels = 0 if labels.dtype == np.bool_ else int(((labels != 0) & (labels != 1)).sum())
    _raise_if_bad(bad_labels, int((~np.isfinite(scores)).sum()), what)
    return labels.astype(bool), scores


def _class_counts(is_pos: np.ndarray) -> tuple[int, int]:
    """(positives, negatives); DataFormatError unless both are present (an ROC curve needs both)."""
    positives = int(is_pos.sum())
    negatives = len(is_pos) - positives
    if len(is_pos) == 0:
        raise DataFormatError("labels and scores are empty: an ROC curve needs samples of both classes")
    if positives == 0 or negatives == 0:
        raise DataFormatError(
            f"an ROC curve needs both classes: got {positives} positive(s) and {negatives} negative(s); "
            "evaluate on samples that include both"
        )
    return positives, negatives


@dataclasses.dataclass(frozen=True, eq=False)
class RocCurve:
    """ROC curve: at threshold t (positive when score >= t) the false and true positive rates.

    fpr, tpr, thresholds: (K,) float64. The first point is (0, 0) at threshold +inf, then one
    point per distinct score, highest first (tied scores enter together); the last is (1, 1).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray

    @property
    def auc(self) -> float:
        """Trapezoidal area under the curve; equals `roc_auc` (ties count one half)."""
        return float(np.sum(np.diff(self.fpr) * (self.tpr[1:] + self.tpr[:-1])) / 2.0)


def roc_curve(labels: Any, scores: Any) -> RocCurve:
    """The ROC curve of `scores` against `labels` (one point per distinct score).

    labels: (N,) bool or integer 0/1, numpy or torch (any device); 1/True = positive.
    scores: (N,) real, higher = more likely positive. Raises DataFormatError for mismatched
    shapes, non-binary labels, NaN or infinite scores, empty input or only one class present.
    """
    is_pos, scores = _host_pair(labels, scores, "scores")
    positives, negatives = _class_counts(is_pos)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))  # last of each tie run
    tp = np.cumsum(is_pos[order], dtype=np.int64)[ends]
    fp = ends + 1 - tp
    return RocCurve(
        fpr=np.concatenate([[0.0], fp / negatives]),
        tpr=np.concatenate([[0.0], tp / positives]),
        thresholds=np.concatenate([[np.inf], sorted_scores[ends]]),
    )


@dataclasses.dataclass(frozen=True)
class AucResult:
    """ROC AUC with a bootstrap confidence interval (ci_low, ci_high nan when bootstrap is 0).

    positives, negatives: the class counts. bootstrap: resamples drawn. confidence: e.g. 0.95.
    """

    auc: float
    ci_low: float
    ci_high: float
    positives: int
    negatives: int
    bootstrap: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (nan and ±inf become None)."""
        values = dataclasses.asdict(self)
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def _aucs_of_draws(pos_bucket: np.ndarray, neg_bucket: np.ndarray, buckets: int) -> np.ndarray:
    """(B,) float64, the exact AUC of each row of drawn samples.

    pos_bucket: (B, P) int64, neg_bucket: (B, N) int64: the score rank (0 .. buckets - 1, ties
    share one) of each drawn positive and negative. A positive wins over every negative ranked
    below it and half of those tied with it.
    """
    rows = len(neg_bucket)
    flat = (neg_bucket + np.arange(rows)[:, None] * buckets).ravel()
    per_bucket = np.bincount(flat, minlength=rows * buckets).reshape(rows, buckets)
    wins2 = 2 * np.cumsum(per_bucket, axis=1) - per_bucket  # twice (below + half of tied), exact
    total2 = np.take_along_axis(wins2, pos_bucket, axis=1).sum(axis=1)
    return total2 / (2.0 * pos_bucket.shape[1] * neg_bucket.shape[1])


def _bootstrap_aucs(
    pos_bucket: np.ndarray, neg_bucket: np.ndarray, buckets: int, bootstrap: int, rng: np.random.Generator
) -> np.ndarray:
    """(bootstrap,) float64: AUCs of stratified resamples (each class drawn with replacement, its own size)."""
    positives, negatives = len(pos_bucket), len(neg_bucket)
    values = np.empty(bootstrap, dtype=np.float64)
    batch = max(1, _BOOTSTRAP_BATCH_ELEMENTS // (positives + negatives + buckets))
    for start in range(0, bootstrap, batch):
        rows = min(batch, bootstrap - start)
        pos = pos_bucket[rng.integers(0, positives, size=(rows, positives))]
        neg = neg_bucket[rng.integers(0, negatives, size=(rows, negatives))]
        values[start : start + rows] = _aucs_of_draws(pos, neg, buckets)
    return values


def auc_with_ci(
    labels: Any, scores: Any, *, bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95
) -> AucResult:
    """ROC AUC and its stratified bootstrap confidence interval.

    labels: (N,) bool or integer 0/1; scores: (N,) real; numpy or torch (any device).
    Each resample draws as many positives and as many negatives as there are, with replacement
    (so every resample has both classes), seeded by `seed`; bounds are LUNA16's order statistics
    (`_interval`), as for FROC. bootstrap 0: no interval (nan bounds). Raises ConfigError for bad
    options and DataFormatError as `roc_curve` does (also when only one class is present).
    """
    _check_froc_options(bootstrap, confidence)
    is_pos, scores = _host_pair(labels, scores, "scores")
    positives, negatives = _class_counts(is_pos)
    _, bucket = np.unique(scores, return_inverse=True)
    bucket = bucket.reshape(-1).astype(np.int64)
    buckets = int(bucket.max()) + 1
    pos_bucket, neg_bucket = bucket[is_pos], bucket[~is_pos]
    auc = float(_aucs_of_draws(pos_bucket[None], neg_bucket[None], buckets)[0])
    ci_low, ci_high = math.nan, math.nan
    if bootstrap:
        rng = np.random.default_rng(seed)
        ci_low, ci_high = _interval(_bootstrap_aucs(pos_bucket, neg_bucket, buckets, int(bootstrap), rng), confidence)
    return AucResult(
        auc=auc,
        ci_low=ci_low,
        ci_high=ci_high,
        positives=positives,
        negatives=negatives,
        bootstrap=int(bootstrap),
        confidence=float(confidence),
    )


def sensitivity_specificity(labels: Any, prob: Any, threshold: float = 0.5) -> tuple[float, float]:
    """(sensitivity, specificity) of the predictions `prob > threshold` (the module's rule).

    labels: (N,) bool or integer 0/1; prob: (N,) real; numpy or torch (any device).
    sensitivity = tp / positives (nan without positives); specificity = tn / negatives (nan
    without negatives). Raises DataFormatError for mismatched shapes, non-binary labels or NaN.
    """
    is_pos, prob = _host_pair(labels, prob, "prob")
    predicted = prob > threshold
    positives = int(is_pos.sum())
    tp = int((predicted & is_pos).sum())
    tn = int((~predicted & ~is_pos).sum())
    return _ratio(tp, positives), _ratio(tn, len(is_pos) - positives)


# --------------------------------------------------------------------------------------------
# Part 3: the whole detector's confusion matrix (the book's chapter 14 nodule_analysis)
# --------------------------------------------------------------------------------------------

CONFUSION_ROWS = ("non-nodule", "benign", "malignant", "nodule, no malignancy rating")
CONFUSION_COLUMNS = (
    "complete miss",
    "filtered out",
    "predicted benign",
    "predicted malignant",
    "predicted nodule, malignancy not scored",
)


def detection_confusion(
    components: pd.DataFrame,
    annotations: pd.DataFrame,
    excluded: pd.DataFrame | None = None,
    *,
    nodule_threshold: float = 0.5,
    malignancy_threshold: float = 0.5,
) -> dict[str, dict[str, int]]:
    """The book's confusion matrix of a whole detector: {row: {column: count}} (rows `CONFUSION_ROWS`,
    columns `CONFUSION_COLUMNS`; the last row and column stay 0 when every nodule is rated and every
    predicted nodule scored).

    components: what the detector found, one row each: seriesuid, coordX, coordY, coordZ (mm),
    p_nodule (nan: dropped before classification, e.g. by the size rule) and p_malignant (nan: not
    scored). annotations: seriesuid, coordX/Y/Z, diameter_mm and is_mal (True, False, or nan for a
    nodule without a malignancy rating). excluded: annotations_excluded.csv rows or None.

    A nodule's row: its label. Its column: "complete miss" when no component lies within its radius
    (LUNA16's hit rule); "filtered out" when the best component hitting it was dropped or scored
    p_nodule ≤ nodule_threshold; else predicted malignant when that component's p_malignant >
    malignancy_threshold, benign when ≤, "not scored" when nan. Components that hit no nodule and no
    excluded finding make the non-nodule row ("complete miss" stays 0 there); those on excluded
    findings are ignored, as in FROC.
    """
    for column in ("p_nodule", "p_malignant"):
        if column not in components.columns:
            raise DataFormatError(f"components: missing column {column}")
    if "is_mal" not in annotations.columns:
        raise DataFormatError("annotations: missing column is_mal (True, False or nan when not rated)")
    p_nodule = components["p_nodule"].to_numpy(dtype=np.float64)
    p_mal = components["p_malignant"].to_numpy(dtype=np.float64)
    scored = components[list(PREDICTION_COLUMNS[:4])].assign(probability=np.where(np.isnan(p_nodule), -1.0, p_nodule))
    match = match_predictions(scored, annotations[list(ANNOTATION_COLUMNS)], excluded)
    matrix = {row: dict.fromkeys(CONFUSION_COLUMNS, 0) for row in CONFUSION_ROWS}

    def column_of(k: int) -> str:
        if not p_nodule[k] > nodule_threshold:  # nan (dropped) or below the threshold
            return "filtered out"
        if np.isnan(p_mal[k]):
            return "predicted nodule, malignancy not scored"
        return "predicted malignant" if p_mal[k] > malignancy_threshold else "predicted benign"

    labels = annotations["is_mal"].to_numpy(dtype=object)
    for j, k in enumerate(match.nodule_prediction.tolist()):
        label = labels[j]
        row = CONFUSION_ROWS[3] if label is None or pd.isna(label) else ("malignant" if bool(label) else "benign")
        matrix[row]["complete miss" if k < 0 else column_of(k)] += 1
    for k in np.flatnonzero(match.is_false_positive).tolist():
        matrix["non-nodule"][column_of(k)] += 1
    return matrix
