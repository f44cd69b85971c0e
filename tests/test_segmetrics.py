"""Segmentation measures: Dice losses, pixel counts and summary, per-nodule hits, all by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from p2ch.errors import ConfigError, DataFormatError
from p2ch.segmetrics import (
    PIXEL_SUMMARY_KEYS,
    NoduleHits,
    candidate_hits,
    dice_loss,
    pixel_counts,
    pixel_summary,
    segmentation_loss,
    summarize_nodules,
)


def maps() -> tuple[torch.Tensor, torch.Tensor]:
    """Three (1, 2, 2) samples: (prob (3, 1, 2, 2) float32, label (3, 1, 2, 2) bool)."""
    prob = torch.tensor(
        [
            [[1.0, 0.5], [0.5, 0.0]],  # label top row: Σpl 1.5, Σp 2, Σl 2
            [[0.0, 0.0], [0.0, 0.0]],  # nothing anywhere
            [[1.0, 1.0], [1.0, 1.0]],  # all painted, no label
        ]
    ).unsqueeze(1)
    label = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool).unsqueeze(1)
    return prob, label


# -- losses -----------------------------------------------------------------------------------


def test_dice_loss_by_hand():
    prob, label = maps()
    loss = dice_loss(prob, label)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    # 1 - (2·1.5 + 1) / (2 + 2 + 1); 1 - 1/1; 1 - 1/(4 + 1)
    torch.testing.assert_close(loss, torch.tensor([0.2, 0.0, 0.8]))
    torch.testing.assert_close(dice_loss(prob, label, epsilon=0.0)[0], torch.tensor(0.25))


def test_segmentation_loss_adds_the_weighted_false_negative_term():
    prob, label = maps()
    loss = segmentation_loss(prob, label)
    # fn term of sample 0: prob·label = [[1, .5], [0, 0]]: 1 - (3 + 1) / (1.5 + 2 + 1) = 1/9.
    # samples 1 and 2: prob·label is empty and so is the label: 0.
    torch.testing.assert_close(loss, torch.tensor([0.2 + 8 / 9, 0.0, 0.8]))
    torch.testing.assert_close(segmentation_loss(prob, label, fn_weight=0.0), dice_loss(prob, label))
    with pytest.raises(ConfigError, match="fn_weight"):
        segmentation_loss(prob, label, fn_weight=math.nan)


def test_the_cross_entropy_term_charges_every_wrongly_painted_pixel():
    prob, label = maps()
    # per-pixel BCE with torch's clamp of log at -100: sample 0 has p = 1, .5 on the label (0, ln 2) and .5, 0
    # off it (ln 2, 0); sample 1 nothing; sample 2 four painted pixels without a label (100 each).
    bce = torch.tensor([2 * math.log(2) / 4, 0.0, 100.0])
    with_bce = segmentation_loss(prob, label, bce_weight=0.5)
    torch.testing.assert_close(with_bce, segmentation_loss(prob, label) + 0.5 * bce)
    with pytest.raises(ConfigError, match="bce_weight"):
        segmentation_loss(prob, label, bce_weight=-1.0)


def test_losses_are_float32_for_half_input_and_under_autocast():
    prob, label = maps()
    half = prob.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = segmentation_loss(half, label)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, segmentation_loss(prob, label))
    assert dice_loss(prob.double(), label).dtype == torch.float64


def test_losses_have_gradients():
    prob, label = maps()
    prob.requires_grad_(True)
    segmentation_loss(prob, label).mean().backward()
    assert prob.grad is not None and torch.isfinite(prob.grad).all()
    assert float(prob.grad[0, 0, 0, 1]) < 0  # more probability on a label pixel lowers the loss
    assert float(prob.grad[0, 0, 1, 0]) > 0  # and off the label raises it


@pytest.mark.parametrize(
    ("prob", "label", "words"),
    [
        (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool), "prob"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.long), torch.zeros(1, 1, 2, 2, dtype=torch.bool), "prob"),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3, dtype=torch.bool), "label"),
    ],
)
def test_bad_maps_are_refused(prob, label, words):
    for fn in (dice_loss, segmentation_loss, pixel_counts):
        with pytest.raises(DataFormatError, match=words):
            fn(prob, label)


# -- pixel counts -----------------------------------------------------------------------------


def test_pixel_counts_by_hand():
    prob, label = maps()
    counts = pixel_counts(prob, label)
    assert counts.dtype == torch.int64 and counts.shape == (3, 3)
    # Sample 0: 1.0 on a label pixel (tp), 0.5 on a label pixel is not > 0.5 (fn), 0.5 off it is not a fp.
    assert counts.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 4]]
    assert pixel_counts(prob, label, threshold=0.4).tolist()[0] == [2, 0, 1]


def test_pixel_summary_by_hand():
    summary = pixel_summary(torch.tensor([[1, 1, 0], [2, 0, 3]]))
    assert tuple(summary) == PIXEL_SUMMARY_KEYS
    assert summary["pr/precision"] == pytest.approx(3 / 6)
    assert summary["pr/recall"] == pytest.approx(3 / 4)
    assert summary["pr/f1_score"] == pytest.approx(2 * 3 / (2 * 3 + 3 + 1))
    assert summary["percent_all/tp"] == pytest.approx(75.0)
    assert summary["percent_all/fn"] == pytest.approx(25.0)
    assert summary["percent_all/fp"] == pytest.approx(75.0)
    assert pixel_summary(np.array([[1, 1, 0]]))["pr/recall"] == pytest.approx(0.5)


def test_pixel_summary_is_nan_safe():
    assert all(math.isnan(v) for v in pixel_summary(torch.zeros((0, 3), dtype=torch.int64)).values())
    only_fp = pixel_summary(torch.tensor([[0, 0, 2]]))
    assert only_fp["pr/precision"] == 0.0 and only_fp["pr/f1_score"] == 0.0
    assert math.isnan(only_fp["pr/recall"]) and math.isnan(only_fp["percent_all/fp"])
    with pytest.raises(DataFormatError, match="counts"):
        pixel_summary(torch.zeros((2, 3)))


# -- per-nodule hits --------------------------------------------------------------------------

NODULES_XYZ = np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0], [0.0, 30.0, 10.0]])
DIAMETERS_MM = np.array([6.0, 4.0, 8.0])


def test_candidate_hits_follow_luna16s_radius_rule():
    candidates = np.array(
        [
            [0.0, 2.9, 0.0],  # inside nodule 0 (radius 3)
            [1.0, 1.0, 1.0],  # nodule 0 again: no false positive
            [22.1, 0.0, 0.0],  # 2.1 mm from nodule 1 (radius 2): outside, a false positive
            [0.0, 30.0, 14.0],  # on nodule 2's radius (4 mm): inside
            [50.0, 50.0, 50.0],  # nowhere
        ]
    )
    hits = candidate_hits(candidates, NODULES_XYZ, DIAMETERS_MM)
    assert hits.found.tolist() == [True, False, True]
    assert (hits.components, hits.fp_components) == (5, 2)


def test_candidate_hits_with_nothing():
    none = candidate_hits(np.zeros((0, 3)), NODULES_XYZ, DIAMETERS_MM)
    assert none.found.tolist() == [False, False, False] and (none.components, none.fp_components) == (0, 0)
    no_nodules = candidate_hits(np.ones((2, 3)), np.zeros((0, 3)), np.zeros(0))
    assert no_nodules.found.shape == (0,) and no_nodules.fp_components == no_nodules.components == 2


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ((np.zeros((2, 2)), NODULES_XYZ, DIAMETERS_MM), "candidates_xyz"),
        ((np.full((1, 3), np.nan), NODULES_XYZ, DIAMETERS_MM), "finite"),
        ((np.zeros((1, 3)), NODULES_XYZ, DIAMETERS_MM[:2]), "diameters_mm"),
        ((np.zeros((1, 3)), NODULES_XYZ, -DIAMETERS_MM), "positive"),
    ],
)
def test_bad_hit_arguments_are_refused(arguments, words):
    with pytest.raises(DataFormatError, match=words):
        candidate_hits(*arguments)


def test_summarize_nodules_recall_5mm_and_fp_per_ct():
    first = candidate_hits(np.array([[0.0, 2.9, 0.0], [22.1, 0.0, 0.0], [0.0, 30.0, 14.0]]), NODULES_XYZ, DIAMETERS_MM)
    second = NoduleHits(found=np.array([False, True]), fp_components=1, components=2)
    summary = summarize_nodules([first, second], [DIAMETERS_MM, [5.0, 3.0]])
    assert summary["nodule/recall"] == pytest.approx(3 / 5)
    # >= 5 mm: 6 (found), 8 (found), 5.0 (missed): 4 mm and 3 mm are left out.
    assert summary["nodule/recall_5mm"] == pytest.approx(2 / 3)
    assert summary["nodule/fp_per_ct"] == pytest.approx((1 + 1) / 2)
    assert summary["nodule/candidates_per_ct"] == pytest.approx((3 + 2) / 2)
    counts = {k: summary[f"nodule/{k}"] for k in ("count", "found", "count_5mm", "found_5mm", "fp", "ct_count")}
    assert counts == {"count": 5, "found": 3, "count_5mm": 3, "found_5mm": 2, "fp": 2, "ct_count": 2}


def test_summarize_nodules_is_nan_safe():
    none = summarize_nodules([], [])
    assert math.isnan(none["nodule/recall"]) and math.isnan(none["nodule/fp_per_ct"])
    small = summarize_nodules([NoduleHits(found=np.array([True]), fp_components=0, components=1)], [[3.0]])
    assert small["nodule/recall"] == 1.0 and math.isnan(small["nodule/recall_5mm"])
    with pytest.raises(DataFormatError, match="diameters"):
        summarize_nodules([NoduleHits(found=np.array([True]), fp_components=0, components=1)], [[3.0, 4.0]])
    with pytest.raises(DataFormatError, match="one list of diameters per CT"):
        summarize_nodules([], [[3.0]])
