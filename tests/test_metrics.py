"""p2ch.metrics: classification metrics on tensors, LUNA16 FROC/CPM, all against hand-computed values."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from p2ch import metrics
from p2ch.errors import ConfigError, DataFormatError, P2chError
from p2ch.metrics import (
    FROC_FPS_PER_SCAN,
    SUMMARY_KEYS,
    ConfusionCounts,
    average_precision,
    classification_summary,
    confusion_counts,
    froc,
    match_predictions,
    precision_recall_f1,
    roc_auc,
)

nan = math.nan


def nan_equal(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


# -- reference implementations written from the definitions, one pair / threshold at a time --


def brute_auc(labels, scores) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_ap(labels, scores) -> float:
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    positives = labels.sum()
    if positives == 0:
        return nan
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        kept = scores >= t
        tp = (kept & labels).sum()
        recall, precision = tp / positives, tp / kept.sum()
        ap += (recall - last_recall) * precision
        last_recall = recall
    return ap


# -- Part 1: classification metrics ----------------------------------------------------------


def test_confusion_counts_by_hand_and_threshold_is_strict():
    labels = torch.tensor([1, 1, 0, 0, 1, 0])
    probs = torch.tensor([0.9, 0.4, 0.6, 0.1, 0.5, 0.5])
    # predicted positive only when prob > 0.5: rows 0 and 2; the 0.5s are negative predictions
    assert confusion_counts(labels, probs) == ConfusionCounts(tp=1, fp=1, tn=2, fn=2)
    assert confusion_counts(labels.bool(), probs) == ConfusionCounts(tp=1, fp=1, tn=2, fn=2)
    assert confusion_counts(labels, probs, threshold=0.45) == ConfusionCounts(tp=2, fp=2, tn=1, fn=1)
    assert confusion_counts(labels, probs).total == 6


def test_precision_recall_f1_by_hand_and_zero_denominators():
    p, r, f1 = precision_recall_f1(ConfusionCounts(tp=1, fp=1, tn=2, fn=2))
    assert (p, r) == (0.5, pytest.approx(1 / 3))
    assert f1 == pytest.approx(2 * p * r / (p + r)) == pytest.approx(0.4)
    p, r, f1 = precision_recall_f1(ConfusionCounts(tp=0, fp=0, tn=5, fn=0))
    assert math.isnan(p) and math.isnan(r) and math.isnan(f1)
    p, r, f1 = precision_recall_f1(ConfusionCounts(tp=0, fp=0, tn=3, fn=2))  # says "no" to everything
    assert math.isnan(p) and r == 0.0 and f1 == 0.0
    p, r, f1 = precision_recall_f1(ConfusionCounts(tp=0, fp=2, tn=3, fn=0))  # no positives at all
    assert p == 0.0 and math.isnan(r) and f1 == 0.0


def test_roc_auc_by_hand_with_a_tie():
    # pairs (pos, neg): 0.8>0.4, 0.8>0.2, 0.4=0.4 (one half), 0.4>0.2  -> 3.5 / 4
    assert roc_auc(torch.tensor([1, 0, 1, 0]), torch.tensor([0.8, 0.4, 0.4, 0.2])) == 0.875
    assert roc_auc(torch.tensor([1, 0]), torch.tensor([0.1, 0.9])) == 0.0
    assert roc_auc(torch.tensor([1, 0, 1]), torch.tensor([0.3, 0.3, 0.3])) == 0.5


def test_roc_auc_matches_brute_force_pairs_on_random_ties():
    gen = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 50, 301):
        labels = torch.rand(n, generator=gen) < 0.3
        scores = torch.randint(0, 6, (n,), generator=gen).float() / 5  # many ties
        assert nan_equal(roc_auc(labels, scores), brute_auc(labels.tolist(), scores.tolist()))


def test_roc_auc_nan_with_one_class_and_when_empty():
    assert math.isnan(roc_auc(torch.tensor([1, 1]), torch.tensor([0.2, 0.9])))
    assert math.isnan(roc_auc(torch.tensor([0, 0]), torch.tensor([0.2, 0.9])))
    assert math.isnan(roc_auc(torch.zeros(0, dtype=torch.bool), torch.zeros(0)))


def test_average_precision_by_hand():
    # thresholds 0.9: P=1 R=1/3; 0.8: R unchanged; 0.7: P=2/3 R=2/3; 0.6: R unchanged; 0.5: P=3/5 R=1
    ap = average_precision(torch.tensor([1, 0, 1, 0, 1]), torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]))
    assert ap == pytest.approx(34 / 45, abs=1e-12)
    # tied 0.5s enter together: P=1/2 R=1/2, then 0.2: P=2/3 R=1  -> 1/4 + 1/3
    ap = average_precision(torch.tensor([1, 0, 1]), torch.tensor([0.5, 0.5, 0.2]))
    assert ap == pytest.approx(7 / 12, abs=1e-12)
    assert average_precision(torch.tensor([0, 1]), torch.tensor([0.1, 0.9])) == 1.0
    assert math.isnan(average_precision(torch.tensor([0, 0]), torch.tensor([0.1, 0.9])))


def test_average_precision_matches_brute_force_on_random_ties():
    gen = torch.Generator().manual_seed(5)
    for n in (1, 3, 40, 257):
        labels = torch.rand(n, generator=gen) < 0.4
        scores = torch.randint(0, 8, (n,), generator=gen).double() / 7
        assert nan_equal(average_precision(labels, scores), brute_ap(labels.numpy(), scores.numpy()))


def test_classification_summary_by_hand():
    labels = torch.tensor([True, True, False, False, True, False])
    probs = torch.tensor([0.9, 0.4, 0.6, 0.1, 0.5, 0.5])
    losses = torch.tensor([0.1, 0.9, 0.9, 0.1, 0.7, 0.7])
    s = classification_summary(labels, probs, losses)
    assert tuple(s) == SUMMARY_KEYS
    assert s["loss/all"] == pytest.approx(3.4 / 6)
    assert s["loss/pos"] == pytest.approx(1.7 / 3)
    assert s["loss/neg"] == pytest.approx(1.7 / 3)
    assert s["correct/all"] == pytest.approx(100 * 3 / 6)
    assert s["correct/pos"] == pytest.approx(100 / 3)
    assert s["correct/neg"] == pytest.approx(200 / 3)
    assert s["pr/precision"] == 0.5
    assert (s["pr/recall"], s["pr/f1_score"]) == (pytest.approx(1 / 3), pytest.approx(0.4))
    assert s["pr/auc"] == pytest.approx(brute_auc(labels.tolist(), probs.tolist()))
    assert s["pr/average_precision"] == pytest.approx(brute_ap(labels.numpy(), probs.numpy()))
    assert {k: s[k] for k in SUMMARY_KEYS if k.startswith("count/")} == {
        "count/all": 6,
        "count/neg": 3,
        "count/pos": 3,
        "count/tp": 1,
        "count/fp": 1,
        "count/tn": 2,
        "count/fn": 2,
    }
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s.values())


def test_classification_summary_without_losses_and_with_one_class():
    s = classification_summary(torch.tensor([0, 0, 0]), torch.tensor([0.2, 0.7, 0.1]))
    assert "loss/all" not in s and tuple(s) == SUMMARY_KEYS[3:]
    assert math.isnan(s["correct/pos"]) and s["correct/neg"] == pytest.approx(200 / 3)
    assert math.isnan(s["pr/recall"]) and s["pr/precision"] == 0.0
    assert math.isnan(s["pr/auc"]) and math.isnan(s["pr/average_precision"])
    s = classification_summary(torch.tensor([1, 1]), torch.tensor([0.2, 0.7]), torch.tensor([1.5, 0.5]))
    assert math.isnan(s["loss/neg"]) and s["loss/pos"] == 1.0 and math.isnan(s["correct/neg"])


def test_classification_summary_of_nothing_is_nan_not_an_error():
    s = classification_summary(torch.zeros(0, dtype=torch.bool), torch.zeros(0), torch.zeros(0))
    assert s["count/all"] == 0
    for key in ("loss/all", "correct/all", "pr/precision", "pr/recall", "pr/f1_score", "pr/auc"):
        assert math.isnan(s[key]), key


def test_classification_summary_syncs_with_the_host_once(monkeypatch):
    calls = []
    for name in ("item", "tolist", "numpy", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    gen = torch.Generator().manual_seed(0)
    labels = torch.rand(10_000, generator=gen) < 0.1
    s = classification_summary(labels, torch.rand(10_000, generator=gen), torch.rand(10_000, generator=gen))
    assert calls == ["tolist"]
    assert s["count/all"] == 10_000


@pytest.mark.parametrize(
    "bad, message",
    [
        ((torch.tensor([1, 0, 1]), torch.tensor([0.1, 0.2])), "same length"),
        ((torch.tensor([[1, 0]]), torch.tensor([[0.1, 0.2]])), "1-D"),
        ((torch.tensor([1, 2, 0]), torch.tensor([0.1, 0.2, 0.3])), "other than 0 and 1"),
        ((torch.tensor([1.0, 0.0]), torch.tensor([0.1, 0.2])), "bool or an integer"),
        ((torch.tensor([1, 0]), torch.tensor([1, 0])), "floating-point"),
        ((torch.tensor([1, 0]), torch.tensor([0.1, float("nan")])), "NaN"),
    ],
)
def test_bad_tensors_raise_clear_errors(bad, message):
    for fn in (confusion_counts, roc_auc, average_precision, classification_summary):
        with pytest.raises(DataFormatError, match=message):
            fn(*bad)


def test_bad_losses_raise():
    with pytest.raises(DataFormatError, match="one loss per sample"):
        classification_summary(torch.tensor([1, 0]), torch.tensor([0.1, 0.2]), torch.tensor([0.1]))
    with pytest.raises(DataFormatError, match="losses: 1 NaN"):
        classification_summary(torch.tensor([1, 0]), torch.tensor([0.1, 0.2]), torch.tensor([0.1, math.inf]))


@pytest.mark.gpu
def test_classification_metrics_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    gen = torch.Generator().manual_seed(1)
    labels = torch.rand(200_000, generator=gen) < 0.01
    probs = (torch.rand(200_000, generator=gen) * 100).round() / 100  # ties
    losses = torch.rand(200_000, generator=gen)
    cpu = classification_summary(labels, probs, losses)
    gpu = classification_summary(labels.cuda(), probs.cuda(), losses.cuda())
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-9, abs=1e-9), key
    assert roc_auc(labels.cuda(), probs.cuda()) == roc_auc(labels, probs)


# -- Part 2: FROC / CPM ------------------------------------------------------------------------

UIDS = [f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{100000000000 + n}" for n in range(12)]


def preds(rows) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=list(metrics.PREDICTION_COLUMNS))


def anns(rows) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=list(metrics.ANNOTATION_COLUMNS))


def cpm_of(points) -> float:
    return sum(points) / len(points)


def test_froc_points_are_lunas():
    assert FROC_FPS_PER_SCAN == (0.125, 0.25, 0.5, 1, 2, 4, 8)


def test_perfect_predictions_give_cpm_one():
    a, b = UIDS[:2]
    annotations = anns([(a, 0, 0, 0, 6.0), (a, 40, 0, 0, 10.0), (b, 5, 5, 5, 8.0)])
    predictions = preds(
        [(a, 0, 0, 0, 0.9), (a, 40, 0, 0, 0.8), (b, 5, 5, 5, 0.95), (a, 100, 0, 0, 0.1), (b, -50, 0, 0, 0.2)]
    )
    result = froc(predictions, annotations, bootstrap=0)
    assert result.cpm == 1.0
    assert result.sensitivities == dict.fromkeys(FROC_FPS_PER_SCAN, 1.0)
    assert (result.num_detected, result.num_hits, result.num_false_positives) == (3, 3, 2)
    assert math.isnan(result.cpm_ci[0]) and math.isnan(result.cpm_ci[1])


def test_predictions_far_from_every_nodule_give_cpm_zero():
    a, b = UIDS[:2]
    annotations = anns([(a, 0, 0, 0, 6.0), (b, 5, 5, 5, 8.0)])
    predictions = preds([(a, 30, 0, 0, 0.9), (b, 5, 5, 20, 0.8), (b, 0, 0, 0, 0.1)])
    result = froc(predictions, annotations, bootstrap=50)
    assert result.cpm == 0.0
    assert (result.num_detected, result.num_false_positives) == (0, 3)
    np.testing.assert_array_equal(result.sensitivity, 0.0)
    assert result.cpm_ci == (0.0, 0.0)


def test_double_hits_count_once_with_the_highest_probability():
    a = UIDS[0]
    annotations = anns([(a, 0, 0, 0, 10.0)])
    predictions = preds([(a, 1, 0, 0, 0.3), (a, 0, 2, 0, 0.8), (a, 50, 0, 0, 0.5)])
    result = froc(predictions, annotations, series_uids=[a], bootstrap=0)
    # nodule enters at 0.8 (not 0.3, and the 0.3 hit is no false positive): (0,0) (0,1) (1,1)
    np.testing.assert_array_equal(result.fps_per_scan, [0, 0, 1])
    np.testing.assert_array_equal(result.sensitivity, [0, 1, 1])
    np.testing.assert_array_equal(result.thresholds, [np.inf, 0.8, 0.5])
    assert result.cpm == 1.0
    assert (result.num_hits, result.num_detected, result.num_false_positives) == (2, 1, 1)
    match = match_predictions(predictions, annotations)
    np.testing.assert_array_equal(match.nodule_index, [0, 0, -1])
    np.testing.assert_array_equal(match.nodule_prediction, [1])
    np.testing.assert_array_equal(match.nodule_probability, [0.8])


def test_predictions_on_excluded_findings_are_neither_hits_nor_false_positives():
    a = UIDS[0]
    annotations = anns([(a, 0, 0, 0, 10.0)])
    excluded = anns(
        [
            (a, 100, 0, 0, 6.0),  # radius 3
            (a, 0, 100, 0, -1.0),  # unknown size: LUNA16 uses 10 mm, radius 5
            (a, 2, 0, 0, 20.0),  # overlaps the nodule: a hit stays a hit
        ]
    )
    predictions = preds(
        [
            (a, 1, 0, 0, 0.4),  # hit (also inside the third excluded finding)
            (a, 101, 0, 0, 0.99),  # on excluded finding 0: ignored
            (a, 0, 104.9, 0, 0.98),  # 4.9 mm from the -1 finding: ignored
            (a, 0, 105, 0, 0.97),  # exactly 5 mm: outside, false positive
            (a, 0, 105.1, 0, 0.96),  # outside: false positive
            (a, 9, 0, 0, 0.95),  # inside excluded finding 2 only (7 mm from it, 9 from the nodule): ignored
        ]
    )
    match = match_predictions(predictions, annotations, excluded)
    np.testing.assert_array_equal(match.is_hit, [True, False, False, False, False, False])
    np.testing.assert_array_equal(match.is_excluded, [False, True, True, False, False, True])
    np.testing.assert_array_equal(match.is_false_positive, [False, False, False, True, True, False])
    result = froc(predictions, annotations, excluded, bootstrap=0)
    assert (result.num_hits, result.num_excluded_predictions, result.num_false_positives) == (1, 3, 2)
    # FPs at 0.97 and 0.96 then the nodule at 0.4: (0,0) (1,0) (2,0) (2,1)
    np.testing.assert_array_equal(result.fps_per_scan, [0, 1, 2, 2])
    np.testing.assert_array_equal(result.sensitivity, [0, 0, 0, 1])
    assert result.cpm == pytest.approx(cpm_of([0, 0, 0, 0, 1, 1, 1]))
    without = froc(predictions, annotations, None, bootstrap=0)
    # five FPs (fps 1..5) before the nodule: only 8 FPs/scan reaches it
    assert without.num_false_positives == 5 and without.cpm == pytest.approx(cpm_of([0, 0, 0, 0, 0, 0, 1]))


def test_scans_without_nodules_count_in_the_false_positive_average():
    a, b, c, d = UIDS[:4]
    annotations = anns([(a, 0, 0, 0, 10.0)])
    predictions = preds([(a, 0, 0, 0, 0.5), (a, 50, 0, 0, 0.9), (b, 0, 0, 0, 0.8)])
    # FP 0.9, FP 0.8, then the nodule at 0.5; false positives divided by the number of scans
    two = froc(predictions, annotations, series_uids=[a, b], bootstrap=0)
    np.testing.assert_array_equal(two.fps_per_scan, [0, 0.5, 1, 1])
    assert two.cpm == pytest.approx(cpm_of([0, 0, 0, 1, 1, 1, 1]))
    four = froc(predictions, annotations, series_uids=[a, b, c, d], bootstrap=0)
    np.testing.assert_array_equal(four.fps_per_scan, [0, 0.25, 0.5, 0.5])
    assert four.cpm == pytest.approx(cpm_of([0, 0, 1, 1, 1, 1, 1]))
    assert four.num_scans == 4
    # None means the scans named in predictions or annotations: here a and b
    assert froc(predictions, annotations, bootstrap=0).num_scans == 2


def test_tied_probabilities_enter_the_curve_together():
    a, b = UIDS[:2]
    annotations = anns([(a, 0, 0, 0, 10.0)])
    predictions = preds([(b, 0, 0, 0, 0.9), (a, 0, 0, 1, 0.5), (a, 30, 0, 0, 0.5), (b, 9, 9, 9, 0.5)])
    result = froc(predictions, annotations, bootstrap=0)
    # FP 0.9 -> (0.5, 0); at 0.5 one nodule and two FPs at once -> (1.5, 1); no point in between
    np.testing.assert_array_equal(result.fps_per_scan, [0, 0.5, 1.5])
    np.testing.assert_array_equal(result.sensitivity, [0, 0, 1])
    np.testing.assert_array_equal(result.thresholds, [np.inf, 0.9, 0.5])
    # at 1 FP/scan halfway along the diagonal from (0.5, 0) to (1.5, 1)
    assert result.sensitivities[1] == 0.5
    assert result.cpm == pytest.approx(cpm_of([0, 0, 0, 0.5, 1, 1, 1]))


def test_a_point_exactly_on_the_radius_is_not_a_hit():
    a = UIDS[0]
    annotations = anns([(a, 0, 0, 0, 10.0)])
    predictions = preds([(a, 5, 0, 0, 0.9), (a, 3, 4, 0, 0.8), (a, 0, 0, -5, 0.7), (a, 4.999, 0, 0, 0.1)])
    match = match_predictions(predictions, annotations)
    np.testing.assert_array_equal(match.nodule_index, [-1, -1, -1, 0])
    result = froc(predictions, annotations, bootstrap=0)
    assert result.num_false_positives == 3 and result.num_detected == 1


def test_overlapping_nodules_take_the_nearest_and_both_count():
    a = UIDS[0]
    annotations = anns([(a, 0, 0, 0, 10.0), (a, 4, 0, 0, 10.0)])
    predictions = preds([(a, 3, 0, 0, 0.7), (a, -1, 0, 0, 0.6)])
    match = match_predictions(predictions, annotations)
    np.testing.assert_array_equal(match.nodule_index, [1, 0])  # nearest nodule per prediction
    np.testing.assert_array_equal(match.nodule_prediction, [0, 0])  # 0.7 lies in both: best for both
    result = froc(predictions, annotations, bootstrap=0)
    assert (result.num_detected, result.num_false_positives, result.cpm) == (2, 0, 1.0)


def test_missed_nodules_cap_the_sensitivity():
    a, b = UIDS[:2]
    annotations = anns([(a, 0, 0, 0, 10.0), (a, 50, 50, 50, 8.0), (b, 0, 0, 0, 4.0)])
    predictions = preds([(a, 0, 0, 0, 0.9), (b, 10, 0, 0, 0.3)])
    result = froc(predictions, annotations, bootstrap=0)
    assert result.num_nodules == 3 and result.num_detected == 1
    assert result.sensitivity.max() == pytest.approx(1 / 3)
    assert result.cpm == pytest.approx(1 / 3)


def test_froc_curve_and_cpm_by_hand():
    s1, s2, s3, s4 = UIDS[:4]
    annotations = anns(
        [
            (s1, 0, 0, 0, 6.0),  # N1, radius 3
            (s1, 50, 0, 0, 8.0),  # N2, radius 4
            (s2, 10, 10, 10, 10.0),  # N3, radius 5
            (s2, -40, 0, 0, 4.0),  # N4, radius 2: missed
        ]
    )
    predictions = preds(
        [
            (s1, 1, 0, 0, 0.95),  # N1 (d² 1)
            (s1, 0, 1, 1, 0.40),  # N1 again (d² 2): ignored, N1 keeps 0.95
            (s1, 52, 0, 0, 0.60),  # N2 (d² 4)
            (s1, 20, 0, 0, 0.90),  # FP
            (s1, 30, 0, 0, 0.30),  # FP
            (s2, 10, 10, 13, 0.85),  # N3 (d² 9)
            (s2, -40, 0, 3, 0.70),  # FP: 3 mm from N4 is outside its 2 mm radius
            (s2, 0, 0, 0, 0.20),  # FP
            (s3, 5, 5, 5, 0.80),  # FP on a scan without nodules
            (s3, 6, 6, 6, 0.60),  # FP, tied with N2's 0.60
        ]
    )
    result = froc(predictions, annotations, series_uids=[s1, s2, s3, s4], bootstrap=0)
    # sorted: .95 N, .90 F, .85 N, .80 F, .70 F, .60 N+F, .30 F, .20 F; 4 scans, 4 nodules
    np.testing.assert_array_equal(result.thresholds, [np.inf, 0.95, 0.90, 0.85, 0.80, 0.70, 0.60, 0.30, 0.20])
    np.testing.assert_array_equal(result.fps_per_scan, [0, 0, 0.25, 0.25, 0.5, 0.75, 1, 1.25, 1.5])
    np.testing.assert_array_equal(result.sensitivity, [0, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75, 0.75])
    # 1/8: between (0, .25) and (.25, .25); 1/4: the upper of the two points at .25; beyond 1.5 flat
    expected = {0.125: 0.25, 0.25: 0.5, 0.5: 0.5, 1: 0.75, 2: 0.75, 4: 0.75, 8: 0.75}
    assert result.sensitivities == pytest.approx(expected)
    assert result.cpm == pytest.approx(4.25 / 7)
    assert (result.num_scans, result.num_nodules, result.num_predictions) == (4, 4, 10)
    assert (result.num_hits, result.num_detected, result.num_false_positives) == (4, 3, 6)
    assert result.num_excluded_predictions == 0
    # the operating points a threshold gives: the lowest curve point still at or above it
    assert result.operating_point(0.6) == {
        "threshold": 0.6, "nodules_detected": 3, "num_nodules": 4, "sensitivity": 0.75, "false_positives": 4,
        "fps_per_scan": 1.0, "fps_per_nodule": 1.0,
    }  # fmt: skip
    assert (
        result.operating_point(0.61)["false_positives"] == 3 and result.operating_point(0.61)["nodules_detected"] == 2
    )
    assert result.operating_point(0.99)["nodules_detected"] == result.operating_point(0.99)["false_positives"] == 0
    assert result.operating_point(0.0)["false_positives"] == 6
    # the suggested threshold: the most nodules within the price in false positives per true nodule, and of
    # the thresholds (0.01 … 0.99) that find them, the highest (the fewest false positives)
    assert result.suggested_threshold(1.0) == result.operating_point(0.6)  # 3 found, 4 FPs; 0.30 adds an FP
    half = result.suggested_threshold(0.5)  # ≤ 2 FPs: 2 found from 0.71 up to 0.85, where 1 FP is left
    assert (half["threshold"], half["nodules_detected"], half["false_positives"]) == (0.85, 2, 1)
    assert result.suggested_threshold(2.0)["threshold"] == 0.6  # 0.01 finds no more than 0.6 does
    assert result.suggested_threshold(0.0)["threshold"] == 0.95  # .95 alone: one nodule, no false positive
    no_nodules = froc(predictions[predictions["seriesuid"] == s3], annotations.iloc[:0], series_uids=[s3], bootstrap=0)
    assert no_nodules.suggested_threshold() is None
    # a false positive above the only hit: no threshold finds a nodule for free
    costly = froc(preds([(s1, 30, 30, 30, 0.9), (s1, 0, 0, 0, 0.5)]), anns([(s1, 0, 0, 0, 6.0)]), bootstrap=0)
    assert costly.suggested_threshold(0.0) is None and costly.suggested_threshold(1.0)["threshold"] == 0.5


def test_interpolation_between_curve_points():
    a, b = UIDS[:2]
    annotations = anns([(a, 0, 0, 0, 10.0), (b, 0, 0, 0, 10.0)])
    # one FP per scan (fps 1) then nodule 1, then 2 more FPs per scan (fps 3) then nodule 2
    predictions = preds(
        [
            (a, 50, 0, 0, 0.9),
            (b, 50, 0, 0, 0.9),
            (a, 0, 0, 0, 0.8),
            (a, 60, 0, 0, 0.7),
            (a, 70, 0, 0, 0.7),
            (b, 60, 0, 0, 0.7),
            (b, 70, 0, 0, 0.7),
            (b, 1, 0, 0, 0.6),
        ]
    )
    result = froc(predictions, annotations, bootstrap=0)
    np.testing.assert_array_equal(result.fps_per_scan, [0, 1, 1, 3, 3])
    np.testing.assert_array_equal(result.sensitivity, [0, 0, 0.5, 0.5, 1])
    # 1/8..1/2 on the segment (0,0)-(1,0): 0; at 1 the upper point: .5; at 2 halfway (1,.5)-(3,.5): .5
    assert [result.sensitivities[fp] for fp in FROC_FPS_PER_SCAN] == [0, 0, 0, 0.5, 0.5, 1, 1]


def test_empty_predictions():
    a, b = UIDS[:2]
    empty = preds([])
    result = froc(empty, anns([(a, 0, 0, 0, 10.0)]), series_uids=[a, b], bootstrap=20)
    assert result.cpm == 0.0 and result.num_predictions == 0 and result.num_nodules == 1
    np.testing.assert_array_equal(result.fps_per_scan, [0.0])
    assert result.cpm_ci == (0.0, 0.0)
    nothing = froc(empty, anns([]), series_uids=[a], bootstrap=20)
    assert math.isnan(nothing.cpm) and math.isnan(nothing.cpm_ci[0])
    assert np.isnan(match_predictions(empty, anns([(a, 0, 0, 0, 10.0)])).nodule_probability).all()


def test_annotations_on_scans_outside_series_uids_are_ignored():
    a, b = UIDS[:2]
    annotations = anns([(a, 0, 0, 0, 10.0), (b, 0, 0, 0, 10.0)])
    result = froc(preds([(a, 0, 0, 0, 0.9)]), annotations, series_uids=[a], bootstrap=0)
    assert (result.num_scans, result.num_nodules, result.cpm) == (1, 1, 1.0)


def test_to_dict_is_strict_json():
    a = UIDS[0]
    result = froc(preds([(a, 0, 0, 0, 0.9), (a, 50, 0, 0, 0.4)]), anns([(a, 0, 0, 0, 10.0)]), bootstrap=10)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["cpm"] == 1.0 and data["sensitivities"]["0.125"] == 1.0
    assert data["curve"]["thresholds"][0] is None  # +inf
    assert data["num_false_positives"] == 1
    empty = froc(preds([]), anns([]), series_uids=[a], bootstrap=0).to_dict(include_curve=False)
    assert json.loads(json.dumps(empty, allow_nan=False))["cpm"] is None and "curve" not in empty


# -- bootstrap ------------------------------------------------------------------------------------


def random_case(seed: int, scans: int = 30, per_scan: int = 40, excluded: bool = True):
    rng = np.random.default_rng(seed)
    uids = [f"1.2.840.{seed}.{k}" for k in range(scans)]
    ann_rows, exc_rows, pred_rows = [], [], []
    for uid in uids:
        for _ in range(rng.integers(0, 4)):
            centre = rng.uniform(-60, 60, 3)
            diameter = float(rng.uniform(3, 20))
            ann_rows.append((uid, *centre, diameter))
            for _ in range(rng.integers(0, 3)):  # hits, sometimes several
                offset = rng.normal(0, diameter / 3, 3)
                pred_rows.append((uid, *(centre + offset), float(np.round(rng.uniform(0.2, 1), 1))))
        if excluded:
            for _ in range(rng.integers(0, 3)):
                centre = rng.uniform(-60, 60, 3)
                exc_rows.append((uid, *centre, float(rng.choice([-1.0, rng.uniform(2, 10)]))))
                near = centre + rng.normal(0, 2, 3)
                pred_rows.append((uid, *near, float(np.round(rng.uniform(0, 1), 1))))
        for _ in range(rng.integers(0, per_scan)):
            pred_rows.append((uid, *rng.uniform(-80, 80, 3), float(np.round(rng.uniform(0, 0.9), 1))))
    return preds(pred_rows), anns(ann_rows), anns(exc_rows), uids


def within(row, cand, r2) -> bool:
    return (row.coordX - cand[1]) ** 2 + (row.coordY - cand[2]) ** 2 + (row.coordZ - cand[3]) ** 2 < r2


def reference_froc(predictions, annotations, excluded, uids):
    """LUNA16's procedure spelled out: per scan, per annotation, per prediction; a threshold sweep."""
    nodule_scores, fp_scores, nodules = [], [], 0
    for uid in uids:
        cands = predictions[predictions.seriesuid == uid].to_numpy()
        remaining = set(range(len(cands)))
        for _, row in annotations[annotations.seriesuid == uid].iterrows():
            nodules += 1
            r2 = (row.diameter_mm / 2) ** 2
            hits = [k for k, c in enumerate(cands) if within(row, c, r2)]
            remaining -= set(hits)
            if hits:
                nodule_scores.append(max(cands[k][4] for k in hits))
        for _, row in excluded[excluded.seriesuid == uid].iterrows():
            diameter = row.diameter_mm if row.diameter_mm >= 0 else 10.0
            r2 = (diameter / 2) ** 2
            remaining -= {k for k, c in enumerate(cands) if within(row, c, r2)}
        fp_scores += [cands[k][4] for k in remaining]
    nodule_scores, fp_scores = np.array(nodule_scores, float), np.array(fp_scores, float)
    fps, sens = [0.0], [0.0]
    for t in sorted(set(nodule_scores.tolist()) | set(fp_scores.tolist()), reverse=True):
        fps.append((fp_scores >= t).sum() / len(uids))
        sens.append((nodule_scores >= t).sum() / nodules)
    points = np.interp(FROC_FPS_PER_SCAN, fps, sens)
    return float(points.mean()), np.array(fps), np.array(sens)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_froc_matches_a_literal_reference_implementation(seed):
    predictions, annotations, excluded, uids = random_case(seed, scans=12, per_scan=25)
    result = froc(predictions, annotations, excluded, uids, bootstrap=0)
    cpm, fps, sens = reference_froc(predictions, annotations, excluded, uids)
    assert result.cpm == pytest.approx(cpm, abs=1e-12)
    np.testing.assert_allclose(result.fps_per_scan, fps, atol=1e-12)
    np.testing.assert_allclose(result.sensitivity, sens, atol=1e-12)
    assert result.num_excluded_predictions > 0 and 0 < result.num_detected < result.num_nodules


def test_bootstrap_ci_contains_estimate_and_is_reproducible_per_seed():
    predictions, annotations, excluded, uids = random_case(7)
    first = froc(predictions, annotations, excluded, uids, bootstrap=200, seed=11)
    again = froc(predictions, annotations, excluded, uids, bootstrap=200, seed=11)
    other = froc(predictions, annotations, excluded, uids, bootstrap=200, seed=12)
    low, high = first.cpm_ci
    assert low < first.cpm < high
    assert first.cpm_ci == again.cpm_ci and first.sensitivities_ci == again.sensitivities_ci
    assert other.cpm_ci != first.cpm_ci
    for fp in FROC_FPS_PER_SCAN:
        lo, hi = first.sensitivities_ci[fp]
        assert lo <= first.sensitivities[fp] <= hi
    narrow = froc(predictions, annotations, excluded, uids, bootstrap=200, seed=11, confidence=0.5)
    assert first.cpm_ci[0] <= narrow.cpm_ci[0] <= narrow.cpm_ci[1] <= first.cpm_ci[1]


def test_bootstrap_of_identical_scans_collapses_to_the_estimate():
    rows_p, rows_a = [], []
    for uid in UIDS[:5]:  # every scan the same: every resample has the same curve
        rows_a.append((uid, 0, 0, 0, 10.0))
        rows_p += [(uid, 0, 0, 0, 0.6), (uid, 40, 0, 0, 0.9), (uid, 60, 0, 0, 0.3)]
    result = froc(preds(rows_p), anns(rows_a), bootstrap=100)
    assert result.cpm == pytest.approx(cpm_of([0, 0, 0, 1, 1, 1, 1]))
    assert result.cpm_ci == (pytest.approx(result.cpm), pytest.approx(result.cpm))


def test_resample_weights_equal_duplicating_scans():
    """The vectorised bootstrap on weights w equals froc() on data where scan s appears w[s] times."""
    predictions, annotations, excluded, uids = random_case(3, scans=6, per_scan=15)
    pred = metrics._read_predictions(predictions)
    ann = metrics._read_annotations(annotations)
    exc = metrics._read_excluded(excluded)
    index = pd.Index(uids)
    match = metrics._match(pred, ann, exc)
    det, fp = match.is_detected, match.is_false_positive
    entries = metrics._froc_entries(
        np.concatenate([index.get_indexer(ann.series)[det], index.get_indexer(pred.series)[fp]]),
        np.concatenate([np.ones(det.sum(), bool), np.zeros(fp.sum(), bool)]),
        np.concatenate([match.nodule_probability[det], pred.value[fp]]),
        np.bincount(index.get_indexer(ann.series), minlength=len(uids)),
    )
    weights = np.array([[1, 1, 1, 1, 1, 1], [3, 0, 1, 0, 2, 0], [0, 0, 0, 0, 0, 6]])
    got = metrics._weighted_sensitivities(entries, weights)
    for row, w in zip(got, weights, strict=True):
        copies = [(uid, f"{uid}.{k}") for uid, n in zip(uids, w, strict=True) for k in range(n)]
        dup_p = pd.concat([predictions[predictions.seriesuid == u].assign(seriesuid=n) for u, n in copies])
        dup_a = pd.concat([annotations[annotations.seriesuid == u].assign(seriesuid=n) for u, n in copies])
        dup_e = pd.concat([excluded[excluded.seriesuid == u].assign(seriesuid=n) for u, n in copies])
        if dup_a.empty:
            assert np.isnan(row).all()
            continue
        expected = froc(dup_p, dup_a, dup_e, [n for _, n in copies], bootstrap=0)
        np.testing.assert_allclose(row, [expected.sensitivities[f] for f in FROC_FPS_PER_SCAN], atol=1e-12)


def test_bootstrap_weights_resample_every_scan_count():
    weights = metrics._bootstrap_weights(7, 500, np.random.default_rng(0))
    assert weights.shape == (500, 7) and (weights.sum(axis=1) == 7).all()
    assert weights.mean() == pytest.approx(1.0, abs=0.05)


def test_interval_uses_lunas_order_statistics():
    values = np.arange(1000, dtype=float)
    assert metrics._interval(values, 0.95) == (25.0, 975.0)
    assert metrics._interval(np.array([nan, 2.0, 1.0]), 0.5) == (1.0, 2.0)
    assert all(math.isnan(v) for v in metrics._interval(np.array([nan]), 0.95))


# -- bad input --------------------------------------------------------------------------------------


def good():
    a = UIDS[0]
    return preds([(a, 0, 0, 0, 0.9)]), anns([(a, 0, 0, 0, 10.0)])


def test_missing_columns_are_named():
    p, a = good()
    with pytest.raises(DataFormatError, match=r"predictions: missing column.*probability"):
        froc(p.drop(columns="probability"), a)
    with pytest.raises(DataFormatError, match=r"annotations: missing column.*diameter_mm"):
        froc(p, a.rename(columns={"diameter_mm": "diameter"}))
    with pytest.raises(DataFormatError, match=r"excluded: missing column.*coordZ"):
        froc(p, a, a.drop(columns="coordZ"))
    with pytest.raises(DataFormatError, match="expected a pandas DataFrame"):
        froc(p.to_numpy(), a)


def test_nan_coordinates_and_probabilities_are_rejected():
    p, a = good()
    with pytest.raises(DataFormatError, match="predictions: row 0: coordY is nan; expected a finite number"):
        froc(p.assign(coordY=np.nan), a)
    with pytest.raises(DataFormatError, match="probability is 'high'"):
        froc(p.assign(probability="high"), a)
    with pytest.raises(DataFormatError, match="annotations: row 0: coordX"):
        match_predictions(p, a.assign(coordX=np.inf))
    with pytest.raises(DataFormatError, match="seriesuid"):
        froc(p.assign(seriesuid=None), a)


@pytest.mark.parametrize("diameter", [-1.0, 0.0])
def test_non_positive_annotation_diameters_are_rejected(diameter):
    p, a = good()
    with pytest.raises(DataFormatError, match=f"diameter_mm is {diameter:g}; expected a positive diameter"):
        froc(p, a.assign(diameter_mm=diameter))


def test_predictions_on_unknown_scans_raise():
    p, a = good()
    with pytest.raises(DataFormatError, match=r"not among the 1 evaluated scans.*series_uids"):
        froc(p, a, series_uids=[UIDS[1]])


def test_bad_settings_raise():
    p, a = good()
    with pytest.raises(DataFormatError, match="listed more than once"):
        froc(p, a, series_uids=[UIDS[0], UIDS[0]])
    with pytest.raises(DataFormatError, match="no scans to evaluate"):
        froc(preds([]), anns([]))
    with pytest.raises(ConfigError, match="bootstrap"):
        froc(p, a, bootstrap=-1)
    with pytest.raises(ConfigError, match="confidence"):
        froc(p, a, confidence=95)
    with pytest.raises(ConfigError, match="single string"):
        froc(p, a, series_uids=UIDS[0])
    assert issubclass(DataFormatError, P2chError)


# -- ROC curve, AUC with bootstrap CI, sensitivity / specificity (numpy) ---------------------------

ROC_LABELS = [1, 0, 1, 1, 0, 0, 1, 0]
ROC_SCORES = [0.9, 0.8, 0.8, 0.6, 0.5, 0.3, 0.3, 0.1]  # two ties, each with one positive and one negative


def random_ties(seed: int, n: int = 300, rate: float = 0.3, shift: float = 0.2):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rate
    scores = np.round(rng.random(n) + shift * labels, 1)  # few distinct values: many ties
    return labels, scores


def test_roc_curve_by_hand_with_ties():
    curve = metrics.roc_curve(np.array(ROC_LABELS), np.array(ROC_SCORES))
    # 4 positives, 4 negatives; the tie at 0.8 adds (1 neg, 1 pos), the tie at 0.3 (1 neg, 1 pos).
    np.testing.assert_array_equal(curve.thresholds, [np.inf, 0.9, 0.8, 0.6, 0.5, 0.3, 0.1])
    np.testing.assert_array_equal(curve.fpr, [0, 0, 0.25, 0.25, 0.5, 0.75, 1])
    np.testing.assert_array_equal(curve.tpr, [0, 0.25, 0.5, 0.75, 0.75, 1, 1])
    assert all(a.dtype == np.float64 for a in (curve.fpr, curve.tpr, curve.thresholds))
    # Pairs: 16; positive above negative in 11, tied in 2 → (11 + 1) / 16.
    assert curve.auc == 0.75 == roc_auc(torch.tensor(ROC_LABELS), torch.tensor(ROC_SCORES, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_roc_curve_area_equals_roc_auc_on_random_ties(seed):
    labels, scores = random_ties(seed)
    curve = metrics.roc_curve(torch.from_numpy(labels), torch.from_numpy(scores))
    exact = roc_auc(torch.from_numpy(labels), torch.from_numpy(scores))
    assert curve.auc == pytest.approx(exact, rel=1e-12, abs=1e-15)
    assert curve.auc == pytest.approx(brute_auc(labels.tolist(), scores.tolist()), rel=1e-12)
    assert metrics.auc_with_ci(labels, scores, bootstrap=0).auc == pytest.approx(exact, rel=1e-12)
    assert len(curve.thresholds) == len(np.unique(scores)) + 1
    assert (np.diff(curve.fpr) >= 0).all() and (np.diff(curve.tpr) >= 0).all()
    assert (curve.fpr[-1], curve.tpr[-1]) == (1.0, 1.0)


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], r"needs both classes: got 3 positive\(s\) and 0 negative\(s\)"),
        ([0, 0], [0.1, 0.2], r"needs both classes: got 0 positive\(s\) and 2 negative\(s\)"),
        ([1, 0], [0.1, nan], "scores: 1 NaN"),
        ([1, 0, 1], [0.1, 0.2], "same length"),
        ([[1, 0]], [[0.1, 0.2]], "1-D"),
        ([1, 2], [0.1, 0.2], "other than 0 and 1"),
        ([1.0, 0.0], [0.1, 0.2], "bool or an integer"),
        ([], [], "empty"),
    ],
)
def test_roc_curve_and_auc_with_ci_reject_bad_input(labels, scores, message):
    for fn in (metrics.roc_curve, metrics.auc_with_ci):
        with pytest.raises(DataFormatError, match=message):
            fn(np.array(labels), np.array(scores))


def test_auc_with_ci_is_reproducible_and_contains_the_auc():
    labels, scores = random_ties(1, n=200)
    first = metrics.auc_with_ci(labels, scores, bootstrap=500, seed=3)
    again = metrics.auc_with_ci(torch.from_numpy(labels), torch.from_numpy(scores), bootstrap=500, seed=3)
    other = metrics.auc_with_ci(labels, scores, bootstrap=500, seed=4)
    assert first == again and other != first
    assert first.ci_low < first.auc < first.ci_high
    assert (first.positives, first.negatives) == (int(labels.sum()), int((~labels).sum()))
    assert (first.bootstrap, first.confidence) == (500, 0.95)
    narrow = metrics.auc_with_ci(labels, scores, bootstrap=500, seed=3, confidence=0.5)
    assert first.ci_low <= narrow.ci_low <= narrow.ci_high <= first.ci_high
    assert json.loads(json.dumps(first.to_dict(), allow_nan=False)) == vars(first)


def test_auc_with_ci_narrows_with_more_samples():
    small = metrics.auc_with_ci(*random_ties(2, n=60), bootstrap=400)
    large = metrics.auc_with_ci(*random_ties(2, n=3000), bootstrap=400)
    assert large.ci_high - large.ci_low < 0.5 * (small.ci_high - small.ci_low)


def test_bootstrap_aucs_equal_roc_auc_of_the_stratified_resamples():
    labels, scores = random_ties(5, n=40)
    result = metrics.auc_with_ci(labels, scores, bootstrap=50, seed=9, confidence=0.9)
    rng = np.random.default_rng(9)  # the same draws, in the same order: positives, then negatives
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    pos_draws = pos[rng.integers(0, len(pos), size=(50, len(pos)))]
    neg_draws = neg[rng.integers(0, len(neg), size=(50, len(neg)))]
    expected = [
        brute_auc([1] * len(p) + [0] * len(n), scores[np.concatenate([p, n])].tolist())
        for p, n in zip(pos_draws, neg_draws, strict=True)
    ]
    assert (result.ci_low, result.ci_high) == pytest.approx(metrics._interval(np.array(expected), 0.9), abs=1e-12)


def test_auc_with_ci_of_perfect_separation_is_one_and_bootstrap_zero_gives_nan():
    labels = np.array([0, 0, 0, 1, 1])
    perfect = metrics.auc_with_ci(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9]), bootstrap=200)
    assert (perfect.auc, perfect.ci_low, perfect.ci_high) == (1.0, 1.0, 1.0)
    none = metrics.auc_with_ci(labels, np.array([0.1, 0.2, 0.9, 0.8, 0.3]), bootstrap=0)
    assert none.auc == pytest.approx(4 / 6) and math.isnan(none.ci_low) and math.isnan(none.ci_high)
    assert none.to_dict()["ci_low"] is None and none.to_dict()["bootstrap"] == 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bootstrap": -1}, "bootstrap"),
        ({"bootstrap": 2.5}, "bootstrap"),
        ({"bootstrap": True}, "bootstrap"),
        ({"confidence": 0.0}, "confidence"),
        ({"confidence": 95}, "confidence"),
    ],
)
def test_auc_with_ci_rejects_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        metrics.auc_with_ci(np.array([0, 1]), np.array([0.1, 0.9]), **options)


def test_sensitivity_specificity_by_hand():
    labels, prob = np.array(ROC_LABELS), np.array(ROC_SCORES)
    # > 0.5: positives 0.9, 0.8, 0.6 (3 of 4); negatives 0.5, 0.3, 0.1 below (3 of 4; 0.5 is not > 0.5).
    assert metrics.sensitivity_specificity(labels, prob) == (0.75, 0.75)
    assert metrics.sensitivity_specificity(
        torch.tensor(ROC_LABELS).bool(), torch.tensor(ROC_SCORES, dtype=torch.float64), 0.8
    ) == (
        0.25,
        1.0,
    )
    sens, spec = metrics.sensitivity_specificity(np.array([1, 1]), np.array([0.9, 0.2]))
    assert sens == 0.5 and math.isnan(spec)
    sens, spec = metrics.sensitivity_specificity(np.array([0, 0]), np.array([0.9, 0.2]))
    assert math.isnan(sens) and spec == 0.5
    with pytest.raises(DataFormatError, match="NaN"):
        metrics.sensitivity_specificity(np.array([0, 1]), np.array([nan, 0.2]))


def test_detection_confusion_counts_each_cell():
    from p2ch.metrics import CONFUSION_COLUMNS, detection_confusion

    uid = "1.2.3"
    annotations = pd.DataFrame(
        {
            "seriesuid": [uid] * 5,
            "coordX": [0.0, 100.0, 200.0, 300.0, 400.0],
            "coordY": 0.0,
            "coordZ": 0.0,
            "diameter_mm": 10.0,
            "is_mal": [True, False, True, None, False],
        }
    )
    excluded = pd.DataFrame({"seriesuid": [uid], "coordX": [600.0], "coordY": 0.0, "coordZ": 0.0, "diameter_mm": -1.0})
    nan = float("nan")
    components = pd.DataFrame(
        {
            "seriesuid": uid,
            # hits: nodule 0 twice (best: malignant prediction), nodule 1 (filtered by the threshold),
            # nodule 3 (unrated, predicted, not graded); nodule 2 only by a dropped component; nodule 4 missed.
            "coordX": [1.0, -2.0, 101.0, 201.0, 301.0, 500.0, 510.0, 520.0, 601.0],
            "coordY": 0.0,
            "coordZ": 0.0,
            "p_nodule": [0.9, 0.6, 0.2, nan, 0.8, 0.1, 0.7, 0.95, 0.99],
            "p_malignant": [0.8, 0.1, nan, nan, nan, nan, 0.3, 0.6, 0.9],
        }
    )
    matrix = detection_confusion(components, annotations, excluded, nodule_threshold=0.5, malignancy_threshold=0.5)
    expected = {
        "non-nodule": {"filtered out": 1, "predicted benign": 1, "predicted malignant": 1},
        "benign": {"filtered out": 1, "complete miss": 1},
        "malignant": {"predicted malignant": 1, "filtered out": 1},
        "nodule, no malignancy rating": {"predicted nodule, malignancy not scored": 1},
    }
    for row, cells in expected.items():
        assert matrix[row] == {c: cells.get(c, 0) for c in CONFUSION_COLUMNS}, row


def test_detection_confusion_needs_its_columns():
    from p2ch.metrics import detection_confusion

    frame = pd.DataFrame({"seriesuid": ["1"], "coordX": [0.0], "coordY": [0.0], "coordZ": [0.0], "p_nodule": [0.5]})
    ann = pd.DataFrame({"seriesuid": ["1"], "coordX": [0.0], "coordY": [0.0], "coordZ": [0.0], "diameter_mm": [4.0]})
    with pytest.raises(DataFormatError, match="p_malignant"):
        detection_confusion(frame, ann.assign(is_mal=True))
    with pytest.raises(DataFormatError, match="is_mal"):
        detection_confusion(frame.assign(p_malignant=0.1), ann)
