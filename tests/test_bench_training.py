"""benchmarks/bench_training.py tells the truth: its rate is the samples of the timed epoch over its wall time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from p2ch.config import TrainingConfig
from p2ch.training import LunaTrainingApp

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"
BATCH, BATCHES = 4, 4


def load_bench():
    return load_script("benchmarks/bench_training.py")


@pytest.fixture(scope="module")
def tiny(synth_set):
    return synth_set(num_cts=4, size=96, slices=48, candidates_per_ct=40, nodules_per_ct=2, seed=11)


@pytest.mark.parametrize("timing", ["epoch", pytest.param("early-stop", marks=pytest.mark.slow)])
def test_reported_rate_matches_the_wall_clock_of_the_timed_epoch(tiny, tmp_path, monkeypatch, timing):
    """One persistent worker, a warm-up epoch cut after 1 batch (as the benchmark does), then the timed epoch."""
    walls: list[float] = []
    epochs: list[tuple[int | None, bool]] = []  # (the sampler's epoch size, whether the epoch ran to its end)
    widths: list[int] = []
    train_epoch = LunaTrainingApp.train_epoch

    def timed(app, epoch):
        started = time.perf_counter()
        result = train_epoch(app, epoch)
        walls.append(time.perf_counter() - started)
        widths.append(app.config.model_width)
        epochs.append((app.config.epoch_size, result.complete))
        return result

    monkeypatch.setattr(LunaTrainingApp, "train_epoch", timed)
    cache = tiny.parent / "cache-bench"
    bench = load_bench()
    row = bench.measure(tiny, cache, "cpu", BATCH, 1, "off", "on", BATCHES, 1, tmp_path, timing, val_fraction=0.5)
    assert len(walls) == 2  # the warm-up, then the timed epoch
    assert row["model_width"] == 8 and widths == [8, 8]  # the book's model, so figures compare with its code
    assert TrainingConfig.model_width == 16  # … which is not p2ch.training's default
    assert row["samples"] == BATCH * BATCHES  # the whole sampler epoch (epoch) / the cut (early-stop)
    assert row["samples_per_sec"] == pytest.approx(row["samples"] / row["seconds"], rel=0.01)
    wall = walls[1]
    # The timed span plus the start-up left out of it is the epoch's wall time.
    assert row["seconds"] + row["startup_seconds"] == pytest.approx(wall, rel=0.15)
    assert row["samples_per_sec"] == pytest.approx(row["samples"] / (wall - row["startup_seconds"]), rel=0.15)
    assert row["wall_seconds"] == pytest.approx(wall, rel=0.05)  # its own clock around the same call
    assert row["wall_agreement"] == pytest.approx(1.0, abs=0.15)
    if timing == "early-stop":
        assert row["startup_seconds"] == 0.0  # the old timing counts the loader's restart in the epoch
        assert epochs[1] == (BATCH * (1 + BATCHES), False)  # cut before its end
    else:
        assert row["startup_seconds"] > 0.0
        assert epochs[1] == (row["samples"], True)  # the sampler's whole epoch, no cut


def test_bad_sizes_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        load_bench().main(["--batches", "0"])
    assert exc.value.code == 2
    assert "--batches, --warmup-batches and --batch-sizes must be ≥ 1" in capsys.readouterr().err
