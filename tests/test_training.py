"""The training app end to end on tiny synthetic LUNA16 sets (CPU)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from p2ch import training
from p2ch.checkpoint import load_checkpoint, save_checkpoint
from p2ch.synth import generate

REPO = Path(__file__).resolve().parents[1]
SCALAR_TAGS = {
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
    "perf/samples_per_sec",
    "perf/data_wait_fraction",
}
CHECKPOINT_KEYS = {
    "format",
    "arch",
    "model",
    "optimizer",
    "scaler",
    "epoch",
    "samples_seen",
    "best_metric",
    "best_epoch",
    "best_loss",
    "selected_by",
    "config",
    "run_time",
    "rng",
    "versions",
}
BATCH = 4
TRAIN_BATCHES = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 small CTs (CT 2 has no nodules), 40 candidates each."""
    root = tmp_path_factory.mktemp("train") / "luna"
    generate(root, num_cts=4, size=96, slices=48, candidates_per_ct=40, nodules_per_ct=2, seed=11, workers=1)
    return root


def _args(root: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--data-root",
        str(root),
        "--cache-dir",
        str(root.parent / "cache"),
        "--runs-dir",
        str(work / "runs"),
        "--checkpoint-dir",
        str(work / "models"),
        "--batch-size",
        str(BATCH),
        "--num-workers",
        "0",
        "--images-every",
        "1",
        "--val-fraction",
        "0.5",
        "--log-level",
        "WARNING",
        *extra,
    ]


def _run_dir(work: Path) -> Path:
    (found,) = (work / "models" / "p2ch").iterdir()
    return found


def _events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _tb_dirs(work: Path) -> dict[str, Path]:
    dirs = sorted((work / "runs" / "p2ch").iterdir())
    assert len(dirs) == 2, dirs
    return {"trn" if "-trn_cls-" in d.name else "val": d for d in dirs}


def test_help_lists_groups_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        training.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--batch-size",
        "--num-workers",
        "--epochs",
        "--balanced",
        "--augmented",
        "--augment-flip",
        "--augment-offset",
        "--augment-scale",
        "--augment-rotate",
        "--augment-noise",
        "--tb-prefix",
        "--data-root",
        "--cache-dir",
        "--split",
        "--val-fraction",
        "--val-stride",
        "--val-subsets",
        "--balance-ratio",
        "--epoch-size",
        "--optimizer",
        "--lr",
        "--weight-decay",
        "--label-smoothing",
        "--amp",
        "--device",
        "--seed",
        "--val-every",
        "--checkpoint-dir",
        "--resume",
        "--init-weights",
        "--max-train-batches",
        "--max-val-batches",
        "--compile",
        "--log-level",
        "--select-by",
        "--sync-bn",
        "comment",
    ):
        assert flag in out, flag
    assert "(default: 32)" in out and "(default: sgd)" in out and "(default: 0.001)" in out
    for group in ("data:", "split", "sampling:", "augmentation", "optimisation:", "speed:", "output:"):
        assert group in out, group


def test_smoke_two_epochs_then_resume_to_three(tiny, tmp_path):
    work = tmp_path
    args = _args(tiny, work, "--balanced", "--augmented", "--max-train-batches", str(TRAIN_BATCHES), "smoke")
    assert training.main([*args, "--epochs", "2"]) == 0
    run = _run_dir(work)
    assert run.name.endswith("-smoke")
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert set(state) >= CHECKPOINT_KEYS
    assert state["epoch"] == 2 and state["samples_seen"] == 2 * TRAIN_BATCHES * BATCH
    assert state["config"]["balanced"] is True and state["config"]["batch_size"] == BATCH
    assert state["arch"].startswith("LunaModel-v1:")
    assert (run / "best.pt").is_file()
    best = load_checkpoint(run / "best.pt", arch=state["arch"])
    assert best["selected_by"] in ("cpm", "f1", "loss") and 1 <= best["best_epoch"] <= 2
    from p2ch.model import LunaModel

    LunaModel().load_state_dict(state["model"])  # plain state dict of the unwrapped model

    dirs = _tb_dirs(work)
    steps = [TRAIN_BATCHES * BATCH, 2 * TRAIN_BATCHES * BATCH]
    for mode, path in dirs.items():
        acc = _events(path)
        tags = acc.Tags()
        assert set(tags["scalars"]) >= SCALAR_TAGS, (mode, SCALAR_TAGS - set(tags["scalars"]))
        for tag in ("loss/all", "correct/all", "pr/auc", "perf/samples_per_sec"):
            events = acc.Scalars(tag)
            assert [e.step for e in events] == steps, (mode, tag)
            assert all(math.isfinite(e.value) for e in events), (mode, tag)
        assert "pr" in tags["tensors"]  # add_pr_curve
        assert {"is_neg", "is_pos"} & set(tags["histograms"])
    trn = _events(dirs["trn"])
    assert {"lr", "cache/hit_rate"} <= set(trn.Tags()["scalars"])
    assert trn.Scalars("lr")[0].value == pytest.approx(0.001)
    assert 0.0 <= trn.Scalars("cache/hit_rate")[-1].value <= 1.0
    val = _events(dirs["val"])
    assert {"froc/cpm", "count/all"} <= set(val.Tags()["scalars"])
    assert {"val/hardest_negatives", "val/hardest_positives"} <= set(val.Tags()["images"])
    assert all(0.0 <= e.value <= 1.0 for e in val.Scalars("froc/cpm"))

    # --resume continues the same run at epoch 3: same checkpoint folder and TensorBoard dirs.
    assert training.main([*args, "--epochs", "3", "--resume", str(run / "last.pt")]) == 0
    assert _run_dir(work) == run
    state3 = load_checkpoint(run / "last.pt")
    assert state3["epoch"] == 3 and state3["samples_seen"] == 3 * TRAIN_BATCHES * BATCH
    assert _tb_dirs(work) == dirs
    events = _events(dirs["trn"]).Scalars("loss/all")
    assert [e.step for e in events] == [*steps, 3 * TRAIN_BATCHES * BATCH]


def test_resume_is_exact(tiny, tmp_path):
    """1 epoch + resume to 2 ends with the same weights as 2 epochs straight."""
    extra = ("--balanced", "--augmented", "--max-train-batches", "2", "--max-val-batches", "2", "--seed", "3")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert training.main([*_args(tiny, straight, *extra), "--epochs", "2"]) == 0
    assert training.main([*_args(tiny, split, *extra), "--epochs", "1"]) == 0
    last = _run_dir(split) / "last.pt"
    assert training.main([*_args(tiny, split, *extra), "--epochs", "2", "--resume", str(last)]) == 0
    a = load_checkpoint(_run_dir(straight) / "last.pt")
    b = load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 2 and a["samples_seen"] == b["samples_seen"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    # A different seed really changes the result (so the comparison above can fail).
    other = tmp_path / "other"
    assert training.main([*_args(tiny, other, *extra[:-1], "4"), "--epochs", "2"]) == 0
    c = load_checkpoint(_run_dir(other) / "last.pt")
    assert not all(torch.equal(t, c["model"][k]) for k, t in a["model"].items())


def test_init_weights_starts_a_new_run(tiny, tmp_path):
    base = _args(tiny, tmp_path / "a", "--max-train-batches", "1", "--max-val-batches", "1")
    assert training.main([*base, "--epochs", "1"]) == 0
    source = _run_dir(tmp_path / "a") / "last.pt"
    assert (
        training.main(
            [
                *_args(tiny, tmp_path / "b", "--max-train-batches", "1", "--max-val-batches", "1"),
                "--epochs",
                "1",
                "--lr",
                "1e-12",
                "--init-weights",
                str(source),
            ]
        )
        == 0
    )
    new = load_checkpoint(_run_dir(tmp_path / "b") / "last.pt")
    old = load_checkpoint(source)
    assert new["epoch"] == 1 and new["samples_seen"] == BATCH  # a new run, not a continuation
    key = next(k for k in old["model"] if k.endswith("weight") and old["model"][k].dim() == 5)
    # lr 1e-12: one step leaves the initial weights (the source's) practically unchanged.
    assert torch.allclose(new["model"][key], old["model"][key], atol=1e-6)


def test_resume_refuses_other_architecture(tiny, tmp_path, capsys):
    base = _args(tiny, tmp_path, "--max-train-batches", "1", "--max-val-batches", "1")
    assert training.main([*base, "--epochs", "1"]) == 0
    last = _run_dir(tmp_path) / "last.pt"
    state = load_checkpoint(last)
    state["arch"] = "OtherModel-v9:0123456789abcdef"
    save_checkpoint(state, tmp_path / "foreign.pt")
    capsys.readouterr()
    assert training.main([*base, "--epochs", "2", "--resume", str(tmp_path / "foreign.pt")]) == 2
    err = capsys.readouterr().err
    assert "OtherModel-v9" in err and "LunaModel-v1" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--batch-size", "0"], "--batch-size must be ≥ 1, got 0"),
        (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
        (["--resume", "x.pt", "--init-weights", "y.pt"], "either --resume or --init-weights"),
        (["--resume", "no-such.pt"], "no-such.pt: no such checkpoint file"),
        (["--sync-bn", "--device", "cpu"], "--sync-bn needs CUDA devices"),
    ],
)
def test_bad_flags(tiny, tmp_path, capsys, extra, expected):
    assert training.main([*_args(tiny, tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.startswith("p2ch.training: error:")


def test_no_data_names_path_and_ways_out(tmp_path, capsys):
    empty = tmp_path / "nowhere"
    assert training.main([*_args(empty, tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert str(empty) in err and "LUNA16" in err and "p2ch.synth" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown when CUDA is absent")
def test_cuda_asked_but_absent(tiny, tmp_path, capsys):
    assert training.main([*_args(tiny, tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "no CUDA GPU" in err and "--device cpu" in err


def test_fp16_on_cpu_refused(tiny, tmp_path, capsys):
    assert training.main([*_args(tiny, tmp_path), "--device", "cpu", "--amp", "fp16"]) == 2
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err


def test_validation_without_nodules_does_not_crash(tmp_path):
    """No positives anywhere: nan-safe metrics, best.pt still chosen (by loss)."""
    root = tmp_path / "luna"
    generate(root, num_cts=4, size=96, slices=48, candidates_per_ct=12, nodules_per_ct=0, seed=2, workers=1)
    args = _args(root, tmp_path, "--split", "stride", "--val-stride", "4", "--max-train-batches", "2", "--epochs", "1")
    assert training.main(args) == 0
    best = load_checkpoint(_run_dir(tmp_path) / "best.pt")
    assert best["selected_by"] == "loss" and math.isfinite(best["best_metric"])
    val = _events(_tb_dirs(tmp_path)["val"])
    assert val.Scalars("count/pos")[0].value == 0
    assert math.isfinite(val.Scalars("loss/all")[0].value)


def test_balanced_without_positives_is_a_clear_error(tmp_path, capsys):
    root = tmp_path / "luna"
    generate(root, num_cts=4, size=96, slices=48, candidates_per_ct=12, nodules_per_ct=0, seed=2, workers=1)
    assert training.main(_args(root, tmp_path, "--split", "stride", "--val-stride", "4", "--balanced")) == 2
    assert "balanced sampling needs at least one positive" in capsys.readouterr().err


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_ddp_two_cpu_processes(tiny, tmp_path):
    """torchrun with 2 gloo processes: disjoint shards, gathered metrics, rank 0 writes alone."""
    args = _args(
        tiny,
        tmp_path,
        "--balanced",
        "--max-train-batches",
        "2",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--log-level",
        "INFO",
        "ddp",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "p2ch.training",
        *args,
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stderr
    state = load_checkpoint(_run_dir(tmp_path) / "last.pt")
    assert state["epoch"] == 1 and state["samples_seen"] == 2 * 2 * BATCH  # both ranks' samples
    assert not any(k.startswith("module.") for k in state["model"])
    dirs = _tb_dirs(tmp_path)  # exactly one trn and one val dir: only rank 0 writes
    from p2ch.candidates import get_candidate_arrays
    from p2ch.datasets import split_candidates

    split = split_candidates(get_candidate_arrays(tiny), "series", val_fraction=0.5)
    val = _events(dirs["val"])
    assert val.Scalars("count/all")[0].value == len(split.val)  # every val candidate once, over 2 ranks
    assert _events(dirs["trn"]).Scalars("count/all")[0].value == 2 * 2 * BATCH


def test_sigkill_mid_run_then_resume(tiny, tmp_path):
    """A run killed with SIGKILL loses at most the epoch in progress."""
    args = _args(tiny, tmp_path, "--max-train-batches", "2", "--max-val-batches", "1", "--epochs", "1000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2ch.training", *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        last = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((tmp_path / "models").rglob("last.pt"))
            if found and load_checkpoint(found[0])["epoch"] >= 2:
                last = found[0]
                break
            time.sleep(0.2)
        assert last is not None, "no checkpoint of epoch 2 appeared"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [p for p in last.parent.iterdir() if p.name not in ("last.pt", "best.pt")]  # no temp files
    done = load_checkpoint(last)["epoch"]
    assert 2 <= done < 1000
    argv = [a if a != "1000" else str(done + 1) for a in args]
    assert training.main([*argv, "--resume", str(last)]) == 0
    state = load_checkpoint(last)
    assert state["epoch"] == done + 1 and state["samples_seen"] == (done + 1) * 2 * BATCH


@pytest.mark.slow
def test_learns_easy_synthetic_set(tmp_path):
    """About 1,500 balanced samples on an easy set reach validation AUC > 0.9 (labels, crops and
    coordinates line up; a misaligned crop or label leaves the AUC near 0.5-0.7)."""
    root = tmp_path / "luna"
    generate(root, num_cts=24, size=128, slices=96, candidates_per_ct=30, nodules_per_ct=6, seed=8, easy=True)
    args = [
        "--data-root",
        str(root),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--checkpoint-dir",
        str(tmp_path / "models"),
        "--num-workers",
        "1",
        "--batch-size",
        "16",
        "--balanced",
        "--optimizer",
        "adam",
        "--epochs",
        "6",
        "--epoch-size",
        "256",
        "--val-every",
        "3",
        "--val-fraction",
        "0.25",
        "--images-every",
        "0",
        "--device",
        "cpu",
        "--log-level",
        "WARNING",
        "learn",
    ]
    assert training.main(args) == 0
    auc = [e.value for e in _events(_tb_dirs(tmp_path)["val"]).Scalars("pr/auc")]
    assert len(auc) == 2 and auc[-1] > 0.9, auc


def test_best_checkpoint_rule_breaks_ties_by_loss():
    better = training.is_improvement
    assert better("cpm", 0.0, 0.7, "cpm", -math.inf, math.inf)  # the first result always wins
    assert better("cpm", 0.5, 0.9, "cpm", 0.4, 0.1)  # higher metric wins whatever the loss
    assert not better("cpm", 0.3, 0.1, "cpm", 0.4, 0.9)
    assert better("cpm", 0.0, 0.65, "cpm", 0.0, 0.79)  # CPM plateau at 0: lower loss wins
    assert not better("cpm", 0.0, 0.80, "cpm", 0.0, 0.79)
    assert better("f1", 0.1, 0.9, "cpm", 0.9, 0.1)  # metric switched: restart the comparison
    assert not better("cpm", math.nan, 0.1, "cpm", 0.0, 0.9)


def test_select_by_picks_the_metric_and_falls_back_when_undefined():
    from types import SimpleNamespace

    def pick(select_by, summary):
        app = SimpleNamespace(config=SimpleNamespace(select_by=select_by), _fallback_warned=set())
        return training.LunaTrainingApp._selection_value(app, summary)

    full = {"froc/cpm": 0.4, "pr/f1_score": 0.7, "loss/all": 0.3}
    assert pick("cpm", full) == ("cpm", 0.4)
    assert pick("f1", full) == ("f1", 0.7)
    no_nodules = {"froc/cpm": math.nan, "pr/f1_score": 0.7, "loss/all": 0.3}
    assert pick("cpm", no_nodules) == ("f1", 0.7)
    nothing = {"pr/f1_score": math.nan, "loss/all": 0.3}
    assert pick("cpm", nothing) == ("loss", -0.3) and pick("f1", nothing) == ("loss", -0.3)
