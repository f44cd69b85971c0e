"""The shared epoch loop and the best-checkpoint policy (p2ch.loop)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from p2ch import loop
from p2ch.loop import BestCheckpoint, Metric, run_epoch
from p2ch.runtime import DistInfo

LADDER = [Metric("cpm", "froc/cpm"), Metric("f1", "pr/f1_score")]


def summary(cpm=math.nan, f1=math.nan, loss=0.5):
    return {"froc/cpm": cpm, "pr/f1_score": f1, "loss/all": loss}


def test_first_result_wins_then_higher_metric_whatever_the_loss():
    best = BestCheckpoint(LADDER)
    assert best.update(summary(cpm=0.0, loss=0.7), 1)
    assert best.update(summary(cpm=0.5, loss=0.9), 2)
    assert not best.update(summary(cpm=0.3, loss=0.1), 3)
    assert (best.epoch, best.name, best.value) == (2, "cpm", 0.5)


def test_ties_are_broken_by_the_lower_loss():
    best = BestCheckpoint(LADDER)
    assert best.update(summary(cpm=0.0, f1=0.2, loss=0.79), 1)
    assert best.update(summary(cpm=0.0, f1=0.1, loss=0.65), 2)  # CPM plateau at 0: lower loss wins, not F1
    assert not best.update(summary(cpm=0.0, f1=0.9, loss=0.80), 3)
    assert best.epoch == 2


def test_a_metric_undefined_in_some_epochs_never_lets_a_worse_epoch_win():
    """The review's bug: F1 is nan while the model predicts no positives; each switch between F1
    and the loss fallback counted as an improvement, so best.pt flipped to worse epochs."""
    best = BestCheckpoint([Metric("f1", "pr/f1_score")])
    assert best.update(summary(f1=0.6, loss=0.30), 1)
    assert not best.update(summary(f1=math.nan, loss=0.50), 2)  # predicts no positives, worse loss
    assert not best.update(summary(f1=0.4, loss=0.60), 3)  # F1 again, but lower than epoch 1's
    assert not best.update(summary(f1=math.nan, loss=0.20), 4)  # lower loss, but F1 undefined
    assert best.epoch == 1 and best.name == "f1"
    assert best.update(summary(f1=0.7, loss=0.9), 5)


def test_undefined_everywhere_falls_back_to_loss_and_nan_loss_never_wins():
    best = BestCheckpoint(LADDER)
    assert best.update(summary(loss=0.4), 1)
    assert best.name == "loss" and best.value == pytest.approx(-0.4)
    assert not best.update(summary(loss=math.nan), 2)
    assert best.update(summary(loss=0.3), 3)
    assert best.update(summary(f1=0.1, loss=0.9), 4)  # a defined metric beats the loss fallback


def test_ranking_is_a_total_order_over_random_sequences():
    """Whatever the order of results, the best is the maximum of one fixed ranking."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        results = [
            summary(
                cpm=rng.choice([math.nan, rng.random()]),
                f1=rng.choice([math.nan, rng.random()]),
                loss=float(rng.random()),
            )
            for _ in range(8)
        ]
        forward, backward = BestCheckpoint(LADDER), BestCheckpoint(LADDER)
        for epoch, result in enumerate(results, 1):
            forward.update(result, epoch)
        for epoch, result in reversed(list(enumerate(results, 1))):
            backward.update(result, epoch)
        assert forward.key == backward.key


def test_state_round_trip_and_checkpoints_without_best_key():
    best = BestCheckpoint(LADDER)
    best.update(summary(cpm=0.25, f1=0.5, loss=0.4), 3)
    state = best.state_dict()
    assert {"best_metric", "best_epoch", "best_loss", "selected_by", "best_key"} <= set(state)
    again = BestCheckpoint(LADDER)
    again.load_state_dict(state)
    assert again.key == best.key and again.epoch == 3
    old = {k: v for k, v in state.items() if k != "best_key"}  # a checkpoint written before best_key
    legacy = BestCheckpoint(LADDER)
    legacy.load_state_dict(old)
    assert legacy.key == best.key
    assert not legacy.update(summary(cpm=0.2, loss=0.1), 4) and legacy.update(summary(cpm=0.3, loss=0.9), 5)


def test_a_key_written_by_another_ladder_is_ranked_again_from_its_metric():
    """A run resumed with a shorter ladder (the segmentation's --val-slices nodules) does not compare keys of two
    lengths: the stored best is ranked again from its metric name and value."""
    best = BestCheckpoint(LADDER)
    best.update(summary(cpm=math.nan, f1=0.5, loss=0.4), 3)
    shorter = BestCheckpoint([Metric("f1", "pr/f1_score")])
    shorter.load_state_dict(best.state_dict())
    assert len(shorter.key) == 3 and shorter.name == "f1" and shorter.value == 0.5
    assert not shorter.update(summary(f1=0.4, loss=0.1), 4) and shorter.update(summary(f1=0.6, loss=0.9), 5)


def test_run_epoch_collects_counts_and_marks_a_cut_pass_incomplete():
    batches = [torch.arange(k * 4, k * 4 + 4, dtype=torch.float32) for k in range(5)]

    def step(batch):
        return {"value": batch * 2, "label": batch > 5}

    positions = np.arange(100, 120)
    full = run_epoch(
        batches, step, device=torch.device("cpu"), dist=DistInfo(), desc="t", total_samples=20, batches=5,
        positions=positions, show_progress=False,
    )  # fmt: skip
    assert full.count == 20 and full.complete
    assert torch.equal(full.outputs["value"], torch.arange(20, dtype=torch.float32) * 2)
    assert full.outputs["positions"].tolist() == list(range(100, 120))
    assert full.seconds >= full.data_wait_seconds >= 0
    cut = run_epoch(
        batches, step, device=torch.device("cpu"), dist=DistInfo(), desc="t", total_samples=20, batches=2,
        positions=positions, show_progress=False,
    )  # fmt: skip
    assert cut.count == 8 and not cut.complete and cut.outputs["positions"].tolist() == list(range(100, 108))


def _slow_loader(startup: float, fetch: float, n: int, size: int = 4):
    """Batches of `size` after `startup` seconds (a loader starting its workers), then one per `fetch` seconds."""
    time.sleep(startup)
    for k in range(n):
        if k:
            time.sleep(fetch)
        yield torch.full((size,), float(k))


def test_run_epoch_reports_the_start_up_apart_and_its_times_match_the_wall_clock():
    def step(batch):
        time.sleep(0.02)
        return {"x": batch}

    started = time.perf_counter()
    result = run_epoch(
        _slow_loader(0.3, 0.02, 6), step, device=torch.device("cpu"), dist=DistInfo(), desc="t",
        total_samples=24, batches=6, show_progress=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    assert result.count == 24 and result.complete
    assert 0.3 <= result.startup_seconds < 0.45
    assert result.seconds <= wall and result.seconds == pytest.approx(wall, rel=0.15)
    # from the first batch on: 6 steps and 5 more fetches of 0.02 s
    assert 0.22 <= result.steady_seconds < 0.4
    assert result.steady_samples_per_sec == pytest.approx(24 / result.steady_seconds)
    assert result.steady_samples_per_sec > 2 * result.samples_per_sec  # the start-up would halve the rate
    steady_wait = result.steady_data_wait_fraction * result.steady_seconds
    assert 0.1 <= steady_wait < 0.2 and result.data_wait_seconds >= 0.4


def test_run_epoch_synchronizes_the_device_at_the_first_batch_and_at_the_end(monkeypatch):
    events = []
    monkeypatch.setattr(loop, "synchronize", lambda device: events.append(("sync", str(device))))

    def step(batch):
        events.append(("step", int(batch[0])))
        return {"x": batch}

    run_epoch(
        _slow_loader(0.0, 0.0, 3), step, device=torch.device("cuda", 0), dist=DistInfo(), desc="t",
        total_samples=12, batches=3, show_progress=False,
    )  # fmt: skip
    assert events == [("sync", "cuda:0"), ("step", 0), ("step", 1), ("step", 2), ("sync", "cuda:0")]


@pytest.fixture(scope="module")
def tiny_app(synth_set, tmp_path_factory):
    """A classification app on the 4-CT synthetic set (CPU, no workers), closed at the end."""
    from p2ch.training import LunaTrainingApp, TrainingConfig

    root = synth_set(num_cts=4, size=96, slices=48, candidates_per_ct=40, nodules_per_ct=2, seed=11)
    work = tmp_path_factory.mktemp("loop-app")
    config = TrainingConfig(
        data_root=str(root), cache_dir=str(root.parent / "cache-loop"), runs_dir=str(work / "runs"),
        checkpoint_dir=str(work / "models"), balanced=True, batch_size=4, epoch_size=10, num_workers=0,
        device="cpu", val_fraction=0.5, max_val_batches=2,
    )  # fmt: skip
    app = LunaTrainingApp(config)
    yield app
    app.close()


def test_training_and_validation_epochs_both_synchronize(tiny_app, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "synchronize", lambda device: calls.append(device))
    tiny_app.train_epoch(1)
    assert len(calls) == 2
    tiny_app.validate(1)
    assert len(calls) == 4 and all(d == tiny_app.device for d in calls)


def test_training_drops_the_last_partial_batch_and_counts_samples_exactly(tiny_app):
    """--epoch-size 10 with batch 4: 2 whole batches (8 samples); validation keeps its partial batch."""
    assert tiny_app.data.train_loader.drop_last and not tiny_app.data.val_loader.drop_last
    result = tiny_app.train_epoch(2)
    assert len(tiny_app.data.train_loader) == 2 and result.count == 8 and result.complete
    assert len(result.outputs["positions"]) == 8
    assert result.outputs["positions"].tolist() == tiny_app.data.train_sampler.indices()[:8].tolist()
