"""p2ch.tblog: the ROC figure and AUC written to a run's event file."""

from __future__ import annotations

import pytest
import torch

from p2ch.metrics import roc_auc
from p2ch.tblog import RunWriters


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_roc_curve_writes_image_and_auc(tmp_path):
    writers = RunWriters(tmp_path, "p2ch", "2026-01-01_00.00.00", "roc")
    gen = torch.Generator().manual_seed(0)
    labels = torch.rand(300, generator=gen) < 0.3
    prob = (torch.rand(300, generator=gen) + 0.3 * labels).clamp(max=1.0)
    writers.roc_curve("val", labels, prob, 3)
    writers.roc_curve("val", labels, prob.half(), 5)
    writers.close()
    acc = _events(writers.path("val"))
    assert [e.step for e in acc.Images("roc")] == [3, 5]
    image = acc.Images("roc")[0]
    assert (image.width, image.height) == (600, 600) and image.encoded_image_string[:4] == b"\x89PNG"
    scalars = acc.Scalars("roc/auc")
    assert [s.step for s in scalars] == [3, 5]
    assert scalars[0].value == pytest.approx(roc_auc(labels, prob), abs=1e-6)


def test_roc_curve_with_one_class_or_disabled_writes_nothing(tmp_path):
    writers = RunWriters(tmp_path, "p2ch", "t", "one")
    writers.roc_curve("val", torch.ones(5, dtype=torch.bool), torch.rand(5), 1)
    writers.roc_curve("val", torch.zeros(0, dtype=torch.bool), torch.zeros(0), 1)
    off = RunWriters(tmp_path, "p2ch", "t", "off", enabled=False)
    off.roc_curve("val", torch.tensor([True, False]), torch.tensor([0.9, 0.1]), 1)
    writers.close()
    off.close()
    assert not (tmp_path / "p2ch").exists()
