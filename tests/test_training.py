"""The training app end to end on tiny synthetic LUNA16 sets (CPU)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import wait_for_children, wait_until_gone

from p2ch import training
from p2ch.checkpoint import load_checkpoint, save_checkpoint
from p2ch.config import display_path

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
    "task",
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
def tiny(synth_set):
    """4 small CTs (CT 2 has no nodules), 40 candidates each."""
    return synth_set(num_cts=4, size=96, slices=48, candidates_per_ct=40, nodules_per_ct=2, seed=11)


def _args(root: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--data-root",
        str(root),
        "--cache-dir",
        str(root.parent / "cache-training"),  # the data set is shared with other test files; the cache is not
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
        # these tests extend runs (--resume … --epochs N), which the default one-cycle lr refuses past its end
        "--lr-schedule",
        "constant",
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
    text = " ".join(out.split())  # argparse wraps lines at the terminal's width
    assert "(default: 32" in text and "(default: adam)" in text and "(default: 0.003)" in text
    assert "(default: onecycle)" in text and "Default: 16, or with --finetune/--init-weights" in text
    for flag in ("--lr-schedule", "--warmup-samples", "--schedule-samples", "--mixup", "--momentum"):
        assert flag in out, flag
    assert "sgd, with --lr 0.001 --momentum 0.99 --lr-schedule constant" in text  # the book's recipe
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

    LunaModel(conv_channels=state["config"]["model_width"]).load_state_dict(state["model"])  # the unwrapped model's

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
    assert trn.Scalars("lr")[0].value == pytest.approx(training.TrainingConfig.lr)
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


def test_validation_without_nodules_does_not_crash(synth_set, tmp_path):
    """No positives anywhere: nan-safe metrics, best.pt still chosen (by loss)."""
    root = synth_set(num_cts=4, size=96, slices=48, candidates_per_ct=12, nodules_per_ct=0, seed=2)
    args = _args(root, tmp_path, "--split", "stride", "--val-stride", "4", "--max-train-batches", "2", "--epochs", "1")
    assert training.main(args) == 0
    best = load_checkpoint(_run_dir(tmp_path) / "best.pt")
    assert best["selected_by"] == "loss" and math.isfinite(best["best_metric"])
    val = _events(_tb_dirs(tmp_path)["val"])
    assert val.Scalars("count/pos")[0].value == 0
    assert math.isfinite(val.Scalars("loss/all")[0].value)


def test_balanced_without_positives_is_a_clear_error(synth_set, tmp_path, capsys):
    root = synth_set(num_cts=4, size=96, slices=48, candidates_per_ct=12, nodules_per_ct=0, seed=2)
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
    # a kill mid-save can leave only the atomic writer's temporary file beside the intact checkpoints
    left = [p.name for p in last.parent.iterdir() if p.name not in ("last.pt", "best.pt")]
    assert all(re.fullmatch(r"\.(last|best)\.pt\.\w+\.tmp", name) for name in left), left
    (last.parent / ".best.pt.cutoff.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-save leaves
    done = load_checkpoint(last)["epoch"]
    assert 2 <= done < 1000
    argv = [a if a != "1000" else str(done + 1) for a in args]
    assert training.main([*argv, "--resume", str(last)]) == 0
    state = load_checkpoint(last)
    assert state["epoch"] == done + 1 and state["samples_seen"] == (done + 1) * 2 * BATCH
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]  # the resume cleaned up


def test_sigterm_is_handled_like_ctrl_c_and_its_dataloader_workers_exit(tiny, tmp_path):
    """SIGTERM (a scheduler's stop): exit 143 with where to resume; the DataLoader workers end with the run."""
    args = _args(tiny, tmp_path, "--max-train-batches", "2", "--max-val-batches", "1", "--epochs", "1000")
    args[args.index("--num-workers") + 1] = "2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2ch.training", *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "models").rglob("last.pt")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.1)
        (last,) = (tmp_path / "models").rglob("last.pt")
        workers = wait_for_children(proc.pid, 2, 30)
        assert len(workers) >= 2, workers
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
        assert code == 143, stderr[-3000:]
        final = stderr.strip().splitlines()[-1]  # nothing after the one line: no worker's traceback
        hint = f"p2ch.training: terminated (SIGTERM); resume with --resume {last.relative_to(tmp_path)}"
        assert final == hint, stderr[-3000:]
        assert not wait_until_gone(workers, 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert load_checkpoint(last)["epoch"] >= 1  # what it saved before the signal still loads


@pytest.mark.slow
def test_learns_easy_synthetic_set(synth_set, tmp_path):
    """About 1,500 balanced samples on an easy set reach validation AUC > 0.9 (labels, crops and
    coordinates line up; a misaligned crop or label leaves the AUC near 0.5-0.7)."""
    root = synth_set(num_cts=24, size=128, slices=96, candidates_per_ct=30, nodules_per_ct=6, seed=8, easy=True)
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


@pytest.fixture(scope="module")
def one_epoch(tiny, tmp_path_factory):
    """A finished 1-epoch run to resume from: (work folder, its last.pt, the flags it ran with)."""
    work = tmp_path_factory.mktemp("one_epoch")
    base = _args(tiny, work, "--balanced", "--max-train-batches", "1", "--max-val-batches", "1", "first")
    assert training.main([*base, "--epochs", "1"]) == 0
    return work, _run_dir(work) / "last.pt", base


def _copy_run(source_last: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "models" / "p2ch" / source_last.parent.name
    shutil.copytree(source_last.parent, target)
    return target / "last.pt"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--val-fraction", "0.25"], "--val-fraction 0.5 → 0.25"),
        (["--split", "stride"], "--split series → stride"),
        (["--tb-prefix", "other"], "--tb-prefix p2ch → other"),
    ],
)
def test_resume_refuses_changed_split_or_run_folder_naming_it(one_epoch, tmp_path, capsys, change, named):
    _, last, base = one_epoch
    last = _copy_run(last, tmp_path)
    capsys.readouterr()
    assert training.main([*base, *change, "--epochs", "2", "--resume", str(last)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "--allow-config-change" in err
    assert load_checkpoint(last)["epoch"] == 1  # nothing ran


def test_resume_refuses_another_data_root_unless_allowed(one_epoch, tiny, tmp_path, capsys):
    import shutil

    _, last, base = one_epoch
    last = _copy_run(last, tmp_path)
    copy = tmp_path / "copy" / "luna"
    shutil.copytree(tiny, copy)
    other = [*base[:1], str(copy), *base[2:]]  # base starts with --data-root ROOT
    capsys.readouterr()
    assert training.main([*other, "--epochs", "2", "--resume", str(last)]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert training.main([*other, "--epochs", "2", "--resume", str(last), "--allow-config-change"]) == 0
    state = load_checkpoint(last)
    assert state["epoch"] == 2 and state["config"]["data_root"] == str(copy.absolute())


def test_resume_takes_the_checkpoints_settings_and_keeps_its_tensorboard_folders(one_epoch, tmp_path):
    work, last, _ = one_epoch
    last = _copy_run(last, tmp_path)
    before = {p.name for p in (work / "runs" / "p2ch").iterdir()}
    # Only --resume and --epochs: comment, --balanced, batch size and the folders come from the checkpoint.
    assert training.main(["--resume", str(last), "--epochs", "2", "--log-level", "WARNING"]) == 0
    state = load_checkpoint(last)
    assert state["epoch"] == 2 and state["samples_seen"] == 2 * BATCH
    assert state["config"]["balanced"] is True and state["config"]["comment"] == "first"
    after = {p.name for p in (work / "runs" / "p2ch").iterdir()}
    assert after == before and all(name.endswith("_cls-first") for name in after)


def test_resume_of_a_checkpoint_without_run_state_is_one_line(one_epoch, tmp_path, capsys):
    _, last, base = one_epoch
    state = load_checkpoint(last)
    partial = tmp_path / "partial.pt"
    save_checkpoint({k: state[k] for k in ("arch", "model", "config")}, partial)
    capsys.readouterr()
    assert training.main([*base, "--epochs", "2", "--resume", str(partial)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lacks optimizer" in err and "run_time" in err


def test_resume_with_a_weight_of_the_wrong_shape_is_one_line(one_epoch, tmp_path, capsys):
    from p2ch.model import arch_signature

    _, last, base = one_epoch
    state = load_checkpoint(last)
    key = next(k for k in state["model"] if k.endswith("conv1.weight"))
    state["model"][key] = torch.zeros(3, 3)
    width = state["config"]["model_width"]
    assert state["arch"] == arch_signature(training.LunaModel(conv_channels=width))  # the tag still matches
    save_checkpoint(state, tmp_path / "bad.pt")
    capsys.readouterr()
    assert training.main([*base, "--epochs", "2", "--resume", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "do not load into LunaModel" in err and key in err


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--runs-dir", "--cache-dir"])
@pytest.mark.parametrize("where", ["the file", "below the file"])
def test_an_output_location_that_is_a_file_fails_before_any_data_is_read(
    tiny, tmp_path, capsys, monkeypatch, flag, where
):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder belongs")
    named = blocker if where == "the file" else blocker / "sub"
    monkeypatch.setattr(training, "build_data", lambda *a: pytest.fail("data read before the outputs were checked"))
    args = _args(tiny, tmp_path, "--cache-dir", str(tmp_path / "cache"), flag, str(named), "--max-train-batches", "1")
    assert training.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {flag} {named}: {blocker} is a file, not a folder" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


def test_an_unwritable_checkpoint_folder_fails_at_start(tiny, tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    real_access = os.access
    # Root may write anywhere, so the refusal of the file system is simulated for this folder.
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != models and real_access(p, mode, **k))
    monkeypatch.setattr(training, "build_data", lambda *a: pytest.fail("data read before the outputs were checked"))
    assert training.main(_args(tiny, tmp_path, "--cache-dir", str(tmp_path / "cache"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--checkpoint-dir {models}: the folder {models} is not writable" in err


def test_resume_into_an_unwritable_folder_fails_at_start(one_epoch, tmp_path, capsys, monkeypatch):
    _, last, base = one_epoch
    last = _copy_run(last, tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != last.parent and real_access(p, mode, **k))
    monkeypatch.setattr(training, "build_data", lambda *a: pytest.fail("data read before the outputs were checked"))
    assert training.main([*base, "--epochs", "2", "--resume", str(last)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume {last}: the folder {last.parent} is not writable" in err


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--lr", "0"),
        ("--lr", "-0.1"),
        ("--momentum", "nan"),
        ("--momentum", "1.5"),
        ("--momentum", "-1"),
        ("--weight-decay", "inf"),
        ("--label-smoothing", "nan"),
        ("--val-fraction", "inf"),
        ("--test-fraction", "nan"),
    ],
)
def test_a_float_flag_that_is_not_finite_or_out_of_range_is_one_line(tiny, tmp_path, capsys, monkeypatch, flag, value):
    monkeypatch.setattr(training, "build_data", lambda *a: pytest.fail("data read before the flags were checked"))
    assert training.main(_args(tiny, tmp_path, flag, value)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {flag} must be" in err and value in err
    assert not (tmp_path / "models").exists()


def test_a_loss_that_turns_nan_stops_the_run_at_once_without_saving(tiny, tmp_path, capsys):
    args = _args(tiny, tmp_path, "--lr", "1e30", "--max-train-batches", "3", "--epochs", "2", "--balanced")
    assert training.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epoch 1 train: the loss (losses) became nan or infinite by batch 3" in err
    assert "--lr 1e+30" in err and "no checkpoint was written yet" in err
    assert not list((tmp_path / "models").rglob("*.pt"))


def test_a_nan_loss_after_a_good_epoch_names_the_last_good_checkpoint(one_epoch, tmp_path, capsys):
    _, last, base = one_epoch
    last = _copy_run(last, tmp_path)
    before = last.read_bytes()
    # A changed --lr applies on resume (the optimizer state restored from last.pt carries the old one).
    args = [*base, "--epochs", "2", "--resume", str(last), "--lr", "1e30", "--max-train-batches", "3"]
    assert training.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epoch 2 train: the loss (losses) became nan or infinite" in err
    shown = display_path(last)  # relative to the working directory when shorter (e.g. a clone in /tmp)
    assert f"the last good checkpoint is {shown} (epoch 1): continue with --resume {shown} and a lower --lr" in err
    assert last.read_bytes() == before  # the broken weights were not saved
    state_lr = load_checkpoint(last)["optimizer"]["param_groups"][0]["lr"]
    assert state_lr == pytest.approx(training.TrainingConfig.lr)


def test_a_candidate_outside_its_ct_read_by_a_dataloader_worker_is_one_line(tiny, tmp_path, capsys):
    """The worker's CandidateOutsideCtError reaches the user as its one line, not torch's wrapped traceback."""
    import shutil

    root = tmp_path / "luna"
    shutil.copytree(tiny, root)
    from p2ch.candidates import get_candidate_arrays
    from p2ch.datasets import split_candidates

    val_uid = str(split_candidates(get_candidate_arrays(tiny), "series", val_fraction=0.5).val_series[0])
    lines = (root / "candidates.csv").read_text().splitlines()
    row = next(line for line in lines if line.startswith(val_uid)).split(",")
    row[3], row[4] = "5000.0", "0"  # coordZ far above the CT; validation reads every candidate of its CTs
    (root / "candidates.csv").write_text("\n".join([*lines, ",".join(row)]) + "\n")
    args = _args(root, tmp_path, "--cache-dir", str(tmp_path / "cache"), "--num-workers", "1", "--no-prefill")
    assert training.main([*args, "--max-train-batches", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lies outside CT" in err and "5000" in err
    assert "Traceback" not in err and "DataLoader worker" not in err
    # the same line as in the main process: the CSV file and line of the candidate first
    assert err.startswith(f"p2ch.training: error: {root / 'candidates.csv'}: line {len(lines) + 1}: candidate centre")


def test_before_the_first_batch_the_cache_holds_every_chunk_the_run_reads(tiny, tmp_path, monkeypatch):
    """A cold cache is filled CT by CT before training; with --no-prefill the first batch still misses."""
    from p2ch.datasets import LunaDataset

    real = LunaDataset.__getitems__
    missing_per_batch: list[int] = []

    def counting(self, ks):
        found = [self.source.missing(self.series_uid(k), self._center_xyz[[k]]) for k in ks]  # a key check
        missing_per_batch.append(int(np.concatenate(found).sum()))
        return real(self, ks)

    monkeypatch.setattr(LunaDataset, "__getitems__", counting)
    for prefill, work in ((True, tmp_path / "warm"), (False, tmp_path / "cold")):
        missing_per_batch.clear()
        args = _args(
            tiny, work, "--cache-dir", str(work / "cache"), "--max-train-batches", "2", "--max-val-batches", "2"
        )
        assert training.main([*args, "--max-val-batches", "2", *([] if prefill else ["--no-prefill"])]) == 0
        assert len(missing_per_batch) == 4  # two training and two validation batches
        assert (sum(missing_per_batch) == 0) is prefill, missing_per_batch


def test_a_candidate_outside_its_ct_stops_the_run_before_its_first_batch(tiny, tmp_path, capsys, monkeypatch):
    import shutil

    from p2ch.datasets import LunaDataset

    root = tmp_path / "luna"
    shutil.copytree(tiny, root)
    lines = (root / "candidates.csv").read_text().splitlines()
    row = lines[3].split(",")
    row[3] = "-5000.0"  # coordZ far below its CT; every candidate is read (no --max-*-batches)
    lines[3] = ",".join(row)
    (root / "candidates.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(LunaDataset, "__getitems__", lambda *a: pytest.fail("read a batch"))
    assert training.main(_args(root, tmp_path, "--cache-dir", str(tmp_path / "cache"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"p2ch.training: error: {root / 'candidates.csv'}: line 4: candidate centre (")
    assert "-5000.0) mm lies outside CT" in err and not (tmp_path / "models").exists()


def test_sampler_reads_are_what_every_rank_iterates():
    from p2ch.datasets import BalancedSampler, EvalSampler

    labels = np.zeros(50, dtype=bool)
    labels[[3, 17, 40]] = True
    for max_batches in (None, 2):
        for epoch in (1, 2):
            ranks = [BalancedSampler(labels, epoch_size=30, seed=4, rank=r, world_size=2) for r in range(2)]
            iterated = []
            for sampler in ranks:
                sampler.set_epoch(epoch)
                iterated += list(sampler)[: None if max_batches is None else max_batches * 4]
            reads = training.sampler_reads(ranks[0], epoch, 4, max_batches)
            assert sorted(reads.tolist()) == sorted(iterated)
        evals = [EvalSampler(11, rank=r, world_size=3) for r in range(3)]
        iterated = [k for sampler in evals for k in list(sampler)[: None if max_batches is None else max_batches * 1]]
        assert training.sampler_reads(evals[1], 0, 1, max_batches).tolist() == iterated


def test_paths_are_stored_absolute(tiny, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny, tmp_path / "luna")
    monkeypatch.chdir(tmp_path)
    args = ["--data-root", "luna", "--cache-dir", "cache", "--runs-dir", "runs", "--checkpoint-dir", "models"]
    args += ["--batch-size", str(BATCH), "--num-workers", "0", "--val-fraction", "0.5", "--log-level", "WARNING"]
    assert training.main([*args, "--max-train-batches", "1", "--max-val-batches", "1"]) == 0
    (run,) = (tmp_path / "models" / "p2ch").iterdir()
    config = load_checkpoint(run / "last.pt")["config"]
    for key, name in (
        ("data_root", "luna"),
        ("cache_dir", "cache"),
        ("runs_dir", "runs"),
        ("checkpoint_dir", "models"),
    ):
        assert config[key] == str(tmp_path / name), key


def test_training_leaves_numpys_global_random_state_alone(one_epoch, tmp_path):
    import numpy as np

    _, _, base = one_epoch
    np.random.seed(12345)
    expected = np.random.get_state()[1].copy()
    np.random.seed(12345)
    args = [*base[:-1], "--checkpoint-dir", str(tmp_path / "m"), "--runs-dir", str(tmp_path / "r"), "--epochs", "1"]
    assert training.main(args) == 0
    assert (np.random.get_state()[1] == expected).all()


def test_cut_validation_labels_its_cpm_partial(one_epoch):
    work, _, _ = one_epoch  # ran with --max-val-batches 1 on a validation part of more than one batch
    (val_dir,) = (work / "runs" / "p2ch").glob("*-val_cls-first")
    val = _events(val_dir)
    scalars = set(val.Tags()["scalars"])
    assert "froc/cpm_partial" in scalars and "froc/cpm" not in scalars


def test_only_rank_0_computes_cpm():
    from types import SimpleNamespace

    from p2ch.loop import EpochResult
    from p2ch.runtime import DistInfo

    val = EpochResult({}, count=10, seconds=1.0, data_wait_seconds=0.0, complete=True)
    rank1 = SimpleNamespace(dist=DistInfo(rank=1, world_size=2))
    assert training.LunaTrainingApp._validation_extra(rank1, val) == {}


LEGACY = Path(__file__).parent / "fixtures" / "legacy-v1-last.pt"


def test_checkpoint_of_the_previous_format_resumes(synth_set, tmp_path, monkeypatch):
    """tests/fixtures/legacy-v1-last.pt was written by p2ch 89d2145 (before this refactor) with
    `python -m p2ch.synth --out luna --num-cts 4 --size 64 --slices 48 --candidates-per-ct 30` and
    `python -m p2ch.training --data-root luna --cache-dir cache --checkpoint-dir models --runs-dir runs
    --epochs 1 --batch-size 4 --num-workers 0 --max-train-batches 2 --max-val-batches 2 --balanced
    --val-fraction 0.25 --tb-prefix fixture legacy`. It stored its paths relative, as that version did."""
    import shutil

    shutil.copytree(synth_set(num_cts=4, size=64, slices=48, candidates_per_ct=30), tmp_path / "luna")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "models" / "fixture" / "legacy-run"
    run.mkdir(parents=True)
    shutil.copy(LEGACY, run / "last.pt")
    old = load_checkpoint(run / "last.pt")
    assert old["config"]["data_root"] == "luna" and "best_key" not in old
    assert training.main(["--resume", str(run / "last.pt"), "--epochs", "2", "--log-level", "WARNING"]) == 0
    new = load_checkpoint(run / "last.pt")
    assert new["epoch"] == 2 and new["samples_seen"] == old["samples_seen"] + 2 * 4
    assert new["config"]["data_root"] == str(tmp_path / "luna") and new["config"]["comment"] == "legacy"
    assert {p.name for p in (tmp_path / "runs" / "fixture").iterdir()} == {
        f"{old['run_time']}-trn_cls-legacy",
        f"{old['run_time']}-val_cls-legacy",
    }


@pytest.mark.parametrize("flag", ["reuse", "fresh"])
def test_batch_buffers_flag_decides_whether_workers_reuse_buffers(tiny, tmp_path, flag):
    from p2ch.batchbuffers import BatchBuffers
    from p2ch.config import config_from_args
    from p2ch.runtime import DistInfo

    args = _args(tiny, tmp_path, "--batch-buffers", flag)
    args[args.index("--num-workers") + 1] = "1"
    config = config_from_args(training.get_args_parser().parse_args(args), training.TrainingConfig)
    data = training.build_data(config, DistInfo(), torch.device("cpu"))
    for loader in (data.train_loader, data.val_loader):
        pools = loader.dataset.buffers
        assert isinstance(pools, BatchBuffers) if flag == "reuse" else pools is None
    assert data.train_loader.dataset.buffers is not data.val_loader.dataset.buffers or flag == "fresh"


def test_an_unknown_batch_buffers_value_is_refused(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        training.main(_args(tiny, tmp_path, "--batch-buffers", "recycle"))
    assert exc.value.code == 2
    assert "--batch-buffers: invalid choice: 'recycle'" in capsys.readouterr().err


def test_the_prepcache_line_of_the_no_prefill_warning_fills_this_runs_chunks(tmp_path):
    from p2ch.config import TrainingConfig, display_path

    # paths as display_path shows them (relative to the working directory when that is shorter)
    luna, cache = display_path(tmp_path / "luna"), display_path(tmp_path / "c")
    config = TrainingConfig(data_root=str(tmp_path / "luna"), cache_dir=str(tmp_path / "c"), task="malignancy")
    assert training.prepcache_command(config) == (
        f"python -m p2ch.prepcache --data-root {luna} --cache-dir {cache} --malignant"
    )
    wide = TrainingConfig(data_root=str(tmp_path / "luna"), width_irc=(16, 32, 32))
    assert training.prepcache_command(wide) == f"python -m p2ch.prepcache --data-root {luna} --width-irc 16 32 32"
