"""Segmentation measures: the book's Dice losses, pixel counts, and per-nodule hits in 3D.

Part 1 (torch, on the training device): `dice_loss` and `segmentation_loss` (chapter 13's soft
Dice plus its false-negative term), `pixel_counts` (tp, fn, fp per sample, no host transfer)
and `pixel_summary` (the TensorBoard numbers, one `.tolist()` per call).

Part 2 (numpy + scipy.ndimage, per CT): `nodule_hits` and `summarize_nodules`, what matters
downstream: which annotated nodules a predicted mask finds, and how many predicted blobs are no
nodule at all. Blobs are 3D connected components with 26-connectivity by default (voxels that
share a face, an edge or a corner are one blob). The book's chapter 14 groups with
scipy.ndimage.label's default, 6-connectivity (faces only); 26 is chosen here because a
small predicted nodule drawn on anisotropic slices often touches its neighbour slice only at an
edge or a corner, and 6-connectivity would split it into a hit plus a false positive.
`connectivity=6` is there for comparing with the book.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.ndimage
import torch

from p2ch.errors import ConfigError, DataFormatError
from p2ch.metrics import ConfusionCounts, precision_recall_f1

# The book's weight of the false-negative Dice term in chapter 13's loss.
BOOK_FN_WEIGHT = 8.0
# Nodules at least this wide count in `nodule/recall_5mm` (mm).
RECALL_MIN_DIAMETER_MM = 5.0

PIXEL_SUMMARY_KEYS = (
    "pr/precision",
    "pr/recall",
    "pr/f1_score",
    "percent_all/tp",
    "percent_all/fn",
    "percent_all/fp",
)
"""Keys of `pixel_summary` (TensorBoard tags)."""

# --------------------------------------------------------------------------------------------
# Part 1: losses and pixel counts on torch tensors
# --------------------------------------------------------------------------------------------


def _check_maps(prob: Any, label: Any, what: str) -> None:
    if not isinstance(prob, torch.Tensor) or prob.ndim != 4 or not prob.is_floating_point():
        found = (tuple(prob.shape), prob.dtype) if isinstance(prob, torch.Tensor) else type(prob).__name__
        raise DataFormatError(f"{what}: prob is {found}; expected a (N, 1, H, W) float tensor of probabilities")
    if not isinstance(label, torch.Tensor) or label.shape != prob.shape:
        found = (tuple(label.shape), label.dtype) if isinstance(label, torch.Tensor) else type(label).__name__
        raise DataFormatError(f"{what}: label is {found}; expected a {tuple(prob.shape)} bool tensor like prob")


def dice_loss(prob: torch.Tensor, label: torch.Tensor, epsilon: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample: 1 - (2·Σ p·l + ε) / (Σ p + Σ l + ε).

    prob: (N, 1, H, W) float probabilities. label: (N, 1, H, W) bool (or 0/1 numbers).
    epsilon: smoothing, so an empty label with an empty prediction gives loss 0, not 0/0.
    Returns (N,) float32 (float64 for float64 input), computed in float32 even under autocast.
    """
    _check_maps(prob, label, "dice_loss")
    work = torch.promote_types(prob.dtype, torch.float32)
    # Element-wise products and sums keep their inputs' dtype under autocast, so casting here is
    # what keeps the sums over 4096+ pixels in float32.
    p, lab = prob.to(work), label.to(work)
    dims = tuple(range(1, p.ndim))
    correct = (p * lab).sum(dim=dims)
    ratio = (2.0 * correct + epsilon) / (p.sum(dim=dims) + lab.sum(dim=dims) + epsilon)
    return 1.0 - ratio


def segmentation_loss(
    prob: torch.Tensor, label: torch.Tensor, fn_weight: float = BOOK_FN_WEIGHT, bce_weight: float = 0.0
) -> torch.Tensor:
    """Chapter 13's loss per sample: dice_loss(prob, label) + fn_weight · dice_loss(prob · label, label).

    The second term sees only the predictions inside the label, so it is the loss of the false
    negatives: weighting it makes missing nodule pixels cost more than over-painting.
    bce_weight: adds that many times the pixels' mean binary cross-entropy (per sample). Dice
    alone hardly punishes a crop without a nodule: its loss is 1 - 1/(1 + Σp), flat once a blob
    is painted, and the false-negative term rewards painting beyond the nodule; the
    cross-entropy charges every wrongly painted pixel, so blobs stay the nodule's size and crops
    of vessels stay dark.
    prob: (N, 1, H, W) float probabilities. label: (N, 1, H, W) bool.
    Returns (N,) float32 (float64 for float64 input); take `.mean()` for the batch loss.
    """
    _check_maps(prob, label, "segmentation_loss")
    if isinstance(fn_weight, bool) or not isinstance(fn_weight, (int, float)) or not fn_weight >= 0:
        raise ConfigError(f"segmentation_loss: fn_weight is {fn_weight!r}; expected a number >= 0 (the book uses 8)")
    if isinstance(bce_weight, bool) or not isinstance(bce_weight, (int, float)) or not bce_weight >= 0:
        raise ConfigError(f"segmentation_loss: bce_weight is {bce_weight!r}; expected a number >= 0")
    work = torch.promote_types(prob.dtype, torch.float32)
    p, lab = prob.to(work), label.to(work)
    loss = dice_loss(p, lab) + fn_weight * dice_loss(p * lab, lab)
    if bce_weight:
        # torch refuses a nan probability inside the cross-entropy; the Dice terms above are nan then already,
        # which is what the training loop stops on
        bce = torch.nn.functional.binary_cross_entropy(torch.nan_to_num(p, nan=0.5), lab, reduction="none")
        loss = loss + bce_weight * bce.mean(dim=tuple(range(1, p.ndim)))
    return loss


def pixel_counts(prob: torch.Tensor, label: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-sample pixel counts (tp, fn, fp) of the thresholded prediction, on the tensors' device.

    prob: (N, 1, H, W) float probabilities; a pixel is predicted positive when prob > threshold.
    label: (N, 1, H, W) bool.
    Returns (N, 3) int64: columns tp, fn, fp (no host transfer; concatenate over an epoch and
        pass to `pixel_summary`).
    """
    _check_maps(prob, label, "pixel_counts")
    predicted = prob > threshold
    truth = label.bool()
    dims = tuple(range(1, prob.ndim))
    tp = (predicted & truth).sum(dim=dims)
    fn = (~predicted & truth).sum(dim=dims)
    fp = (predicted & ~truth).sum(dim=dims)
    return torch.stack([tp, fn, fp], dim=1).to(torch.int64)


def _percent(numerator: int, denominator: int) -> float:
    return 100.0 * numerator / denominator if denominator else math.nan


def pixel_summary(counts: torch.Tensor | np.ndarray) -> dict[str, float]:
    """The epoch's pixel measures from `pixel_counts` rows, keyed by TensorBoard tag.

    counts: (M, 3) integers (tp, fn, fp), any device.
    Returns `PIXEL_SUMMARY_KEYS` → float: precision, recall and F1 of the label-positive pixels
        (`p2ch.metrics.precision_recall_f1`: nan where undefined, F1 0 when tp is 0 but something
        was wrong), and tp, fn and fp as percent of all label-positive pixels (tp + fn), as the
        book logs them (nan without label-positive pixels; fp can exceed 100).
    """
    counts = torch.as_tensor(counts)
    if counts.ndim != 2 or counts.shape[1] != 3 or counts.is_floating_point() or counts.dtype == torch.bool:
        raise DataFormatError(
            f"pixel_summary: counts is {tuple(counts.shape)} {counts.dtype}; expected (M, 3) integers (tp, fn, fp)"
        )
    tp, fn, fp = (int(v) for v in counts.sum(dim=0).tolist())
    precision, recall, f1 = precision_recall_f1(ConfusionCounts(tp=tp, fp=fp, tn=0, fn=fn))
    positives = tp + fn
    return {
        "pr/precision": precision,
        "pr/recall": recall,
        "pr/f1_score": f1,
        "percent_all/tp": _percent(tp, positives),
        "percent_all/fn": _percent(fn, positives),
        "percent_all/fp": _percent(fp, positives),
    }


# --------------------------------------------------------------------------------------------
# Part 2: per-nodule hits of a predicted 3D mask
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare arrays ambiguously
class NoduleHits:
    """What one CT's predicted mask did: found: (N,) bool per annotated nodule; its blob counts."""

    found: np.ndarray
    fp_components: int
    components: int


def component_structure(connectivity: int = 26) -> np.ndarray:
    """scipy.ndimage.label's structuring element: (3, 3, 3) bool for 6- or 26-connectivity."""
    if connectivity not in (6, 26):
        raise ConfigError(f"connectivity is {connectivity!r}; expected 6 (faces) or 26 (faces, edges, corners)")
    return scipy.ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)


def candidate_hits(candidates_xyz: Any, nodules_xyz: Any, diameters_mm: Any) -> NoduleHits:
    """Which nodules a CT's candidates find by LUNA16's hit rule, and how many candidates find none.

    candidates_xyz: (K, 3) float mm, the kept candidates' centres (`p2ch.detect.find_candidates`).
    nodules_xyz: (N, 3) float mm and diameters_mm: (N,) float, the CT's annotated nodules.
    Nodule n is found when a candidate's centre lies within diameters_mm[n] / 2 of its centre (the
    rule of LUNA16's FROC, so this is the candidate recall the whole detector starts from; a blob
    that only overlaps a nodule, with its centre outside, finds nothing). A candidate within no
    nodule's radius is a false positive. Returns NoduleHits(found (N,) bool, fp_components,
    components = K).
    """
    candidates = _points(candidates_xyz, "candidates_xyz")
    nodules = _points(nodules_xyz, "nodules_xyz")
    radius = np.asarray(diameters_mm, dtype=np.float64).reshape(-1) / 2.0
    if radius.shape != (len(nodules),) or not np.all(np.isfinite(radius) & (radius > 0)):
        raise DataFormatError(
            f"candidate_hits: diameters_mm is {radius.shape}; expected ({len(nodules)},) positive mm, one per nodule"
        )
    distance = np.linalg.norm(candidates[:, None, :] - nodules[None, :, :], axis=2)
    inside = distance <= radius[None, :]
    return NoduleHits(
        found=inside.any(axis=0), fp_components=int((~inside.any(axis=1)).sum()), components=len(candidates)
    )


def _points(values: Any, name: str) -> np.ndarray:
    points = np.asarray(values, dtype=np.float64)
    if points.size == 0:
        points = points.reshape(0, 3)
    if points.ndim != 2 or points.shape[1] != 3 or not np.isfinite(points).all():
        raise DataFormatError(f"candidate_hits: {name} is {points.shape}; expected (n, 3) finite mm (x, y, z)")
    return points


def summarize_nodules(
    hits_per_ct: Sequence[NoduleHits], diameters_mm: Sequence[Sequence[float] | np.ndarray]
) -> dict[str, float]:
    """Per-nodule recall and false positives over CTs.

    hits_per_ct: one `NoduleHits` per CT. diameters_mm: per CT, (N,) float nodule diameters in
        mm, in the order of that CT's `found`.
    Returns `nodule/recall` (found / all nodules), `nodule/recall_5mm` (the same for nodules of
        at least `RECALL_MIN_DIAMETER_MM`), `nodule/fp_per_ct` (false-positive candidates or blobs
        per CT), `nodule/candidates_per_ct` (all of them per CT) and the counts `nodule/count`,
        `nodule/found`, `nodule/count_5mm`, `nodule/found_5mm`, `nodule/fp`, `nodule/ct_count`; a
        ratio without a denominator is nan.
    """
    if len(hits_per_ct) != len(diameters_mm):
        raise DataFormatError(
            f"summarize_nodules: {len(hits_per_ct)} CTs of hits but {len(diameters_mm)} of diameters; "
            "expected one list of diameters per CT"
        )
    count = found = count_5mm = found_5mm = fp = candidates = 0
    for k, (hits, diameters) in enumerate(zip(hits_per_ct, diameters_mm, strict=True)):
        diameters = np.asarray(diameters, dtype=np.float64).reshape(-1)
        if diameters.shape != hits.found.shape:
            raise DataFormatError(
                f"summarize_nodules: CT {k} has {hits.found.size} nodules but {diameters.size} diameters"
            )
        large = diameters >= RECALL_MIN_DIAMETER_MM
        count += hits.found.size
        found += int(hits.found.sum())
        count_5mm += int(large.sum())
        found_5mm += int((hits.found & large).sum())
        fp += hits.fp_components
        candidates += hits.components
    cts = len(hits_per_ct)
    return {
        "nodule/recall": found / count if count else math.nan,
        "nodule/recall_5mm": found_5mm / count_5mm if count_5mm else math.nan,
        "nodule/fp_per_ct": fp / cts if cts else math.nan,
        "nodule/candidates_per_ct": candidates / cts if cts else math.nan,
        "nodule/count": float(count),
        "nodule/found": float(found),
        "nodule/count_5mm": float(count_5mm),
        "nodule/found_5mm": float(found_5mm),
        "nodule/fp": float(fp),
        "nodule/ct_count": float(cts),
    }
