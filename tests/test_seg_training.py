"""python -m p2ch.seg_training end to end on tiny synthetic sets (CPU, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from p2ch import seg_training, training
from p2ch.checkpoint import load_checkpoint
from p2ch.detect import CandidateRule

SCALARS = {
    "loss/all",
    "pr/precision",
    "pr/recall",
    "pr/f1_score",
    "percent_all/tp",
    "percent_all/fn",
    "percent_all/fp",
    "perf/samples_per_sec",
}
NODULE_SCALARS = {"nodule/recall", "nodule/recall_5mm", "nodule/fp_per_ct", "nodule/candidates_per_ct"}
BATCH = 4


@pytest.fixture(scope="module")
def small(synth_set):
    """4 CTs of 64 × 64 × 24 voxels with nodules (CT 2 has none)."""
    return synth_set(num_cts=4, size=64, slices=24, candidates_per_ct=10, nodules_per_ct=2, seed=21)


def _args(root: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--data-root", str(root), "--cache-dir", str(work / "cache"), "--runs-dir", str(work / "runs"),
        "--checkpoint-dir", str(work / "models"), "--batch-size", str(BATCH), "--num-workers", "0",
        "--epoch-size", "8", "--crop-size", "32", "--val-fraction", "0.5", "--images-every", "1",
        "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def _run_dir(work: Path) -> Path:
    (found,) = (work / "models" / "p2ch").iterdir()
    return found


def _events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_help_names_the_books_flags(capsys):
    with pytest.raises(SystemExit):
        seg_training.main(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--batch-size",
        "--num-workers",
        "--epochs",
        "--augmented",
        "--augment-flip",
        "--tb-prefix",
        "--context-slices",
        "--crop-size",
        "--fn-weight",
        "--val-slices",
        "--resume",
        "--report",
        "comment",
    ):
        assert flag in out, flag
    assert "(default: 16)" in out and "(default: adam)" in out


def test_two_epochs_log_checkpoint_report_then_resume(small, tmp_path):
    report = tmp_path / "report.json"
    # a constant lr, so the finished run can be extended (a one-cycle schedule ends with its run)
    args = _args(small, tmp_path, "--augmented", "--lr-schedule", "constant", "--report", str(report), "segsmoke")
    assert seg_training.main([*args, "--epochs", "2"]) == 0
    run = _run_dir(tmp_path)
    state = load_checkpoint(run / "last.pt")
    assert state["arch"].startswith("UNetWrapper-v1:") and state["epoch"] == 2 and state["samples_seen"] == 16
    assert (run / "best.pt").is_file() and state["config"]["context_slices"] == 3
    dirs = {p.name.split("-")[-2].split("_")[0]: p for p in sorted((tmp_path / "runs" / "p2ch").iterdir())}
    assert set(dirs) == {"trn", "val"} and all("_seg-segsmoke" in p.name for p in dirs.values())
    trn, val = _events(dirs["trn"]), _events(dirs["val"])
    assert set(trn.Tags()["scalars"]) >= SCALARS
    assert set(val.Tags()["scalars"]) >= SCALARS | NODULE_SCALARS
    assert [e.step for e in val.Scalars("loss/all")] == [8, 16]
    assert all(math.isfinite(e.value) for e in val.Scalars("nodule/fp_per_ct"))
    assert 0.0 <= val.Scalars("nodule/recall")[-1].value <= 1.0
    assert "val/slices" in val.Tags()["images"]
    data = json.loads(report.read_text())
    assert data["epoch"] == 2 and data["validation"]["nodule/recall"] is not None
    assert data["best"]["by"] in ("recall", "f1", "fp_per_ct")

    assert seg_training.main(["--resume", str(run / "last.pt"), "--epochs", "3", "--log-level", "WARNING"]) == 0
    again = load_checkpoint(run / "last.pt")
    assert again["epoch"] == 3 and again["samples_seen"] == 24 and _run_dir(tmp_path) == run
    assert [e.step for e in _events(dirs["val"]).Scalars("loss/all")] == [8, 16, 24]


def test_a_classifier_checkpoint_is_refused_by_the_segmentation_app_and_the_reverse(small, tmp_path, capsys):
    from p2ch.config import TrainingConfig

    from conftest import make_model, write_checkpoint

    classifier = write_checkpoint(tmp_path / "cls.pt", make_model(), TrainingConfig())
    capsys.readouterr()
    assert seg_training.main([*_args(small, tmp_path / "a"), "--init-weights", str(classifier)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LunaModel-v1" in err and "UNetWrapper-v1" in err
    assert seg_training.main([*_args(small, tmp_path / "b"), "--epochs", "1"]) == 0
    unet = _run_dir(tmp_path / "b") / "last.pt"
    capsys.readouterr()
    assert training.main(["--data-root", str(small), "--resume", str(unet), "--log-level", "WARNING"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LunaModel-v1" in err and "UNetWrapper-v1" in err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--crop-size", "30"], "--crop-size 30: a UNet of depth 3 needs a multiple of 4"),
        (["--context-slices", "-1"], "--context-slices must be in 0…32"),
        (["--val-slices", "nodules", "--val-negative-fraction", "2"], "--val-negative-fraction must be in [0, 1]"),
        (["--fn-weight", "inf"], "--fn-weight must be a finite number, got inf"),
        (["--threshold", "nan"], "--threshold must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--momentum", "nan"], "--momentum must be a finite number, got nan"),
        (["--val-fraction", "1.5"], "--val-fraction must be a fraction in [0, 1), got 1.5"),
    ],
)
def test_bad_settings_are_one_line(small, tmp_path, capsys, extra, expected):
    assert seg_training.main([*_args(small, tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--runs-dir", "--cache-dir", "--report"])
def test_an_output_location_below_a_file_fails_before_any_data_is_read(small, tmp_path, capsys, monkeypatch, flag):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder belongs")
    monkeypatch.setattr(seg_training, "build_seg_data", lambda *a: pytest.fail("data read before the check"))
    assert seg_training.main([*_args(small, tmp_path), flag, str(blocker / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {flag} {blocker / 'x'}: {blocker} is a file, not a folder" in err


def test_a_loss_that_turns_nan_stops_the_run_without_saving(small, tmp_path, capsys):
    assert seg_training.main([*_args(small, tmp_path), "--lr", "1e30", "--epochs", "2", "--epoch-size", "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epoch 1 train: the loss (losses) became nan or infinite" in err
    assert "no checkpoint was written yet" in err and not list((tmp_path / "models").rglob("*.pt"))


def test_the_stride_split_is_not_offered(small, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        seg_training.main([*_args(small, tmp_path), "--split", "stride"])
    assert exc.value.code == 2 and "invalid choice: 'stride'" in capsys.readouterr().err


def test_training_cts_without_nodules_are_a_clear_error(synth_set, tmp_path, capsys):
    root = synth_set(num_cts=4, size=64, slices=24, candidates_per_ct=10, nodules_per_ct=0, seed=2)
    assert seg_training.main([*_args(root, tmp_path), "--val-fraction", "0.25"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training CTs have no annotated nodule" in err


def test_unet_learns_the_easy_set_to_find_nodules(synth_set, tmp_path):
    """A short CPU run finds most validation nodules (a check that slices, masks and crops line up)."""
    root = synth_set(num_cts=8, size=64, slices=32, candidates_per_ct=10, nodules_per_ct=3, seed=5, easy=True)
    report = tmp_path / "r.json"
    args = _args(root, tmp_path, "--epoch-size", "256", "--epochs", "3", "--batch-size", "16", "--augment-flip",
                 "--report", str(report), "--seed", "1")  # fmt: skip
    assert seg_training.main(args) == 0
    validation = json.loads(report.read_text())["validation"]
    assert validation["nodule/recall"] >= 0.5, validation


def test_ddp_two_cpu_processes_score_whole_cts(small, tmp_path):
    """torchrun with 2 gloo processes: CT-aligned validation shards, per-nodule metrics over both."""
    import os
    import subprocess
    import sys

    report = tmp_path / "report.json"
    args = _args(small, tmp_path, "--epochs", "1", "--device", "cpu", "--report", str(report), "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "p2ch.seg_training",
    ]
    done = subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    validation = json.loads(report.read_text())["validation"]
    single = tmp_path / "single.json"
    assert seg_training.main([*_args(small, tmp_path / "one", "--epochs", "1", "--report", str(single))]) == 0
    alone = json.loads(single.read_text())["validation"]
    assert validation["nodule/count"] == alone["nodule/count"] > 0  # every validation nodule scored once
    assert validation["nodule/ct_count"] == alone["nodule/ct_count"]


def test_background_crops_are_sampled_beside_nodule_crops(small, tmp_path):
    from p2ch.config import SegTrainingConfig
    from p2ch.datasets import BalancedSampler

    config = SegTrainingConfig(
        data_root=str(small), cache_dir=str(tmp_path / "cache"), runs_dir=str(tmp_path / "runs"),
        checkpoint_dir=str(tmp_path / "models"), batch_size=BATCH, num_workers=0, epoch_size=16, crop_size=32,
        val_fraction=0.5, background_crops=10, background_ratio=3,
    )  # fmt: skip
    app = seg_training.SegmentationTrainingApp(config)
    try:
        sampler, dataset = app.data.train_sampler, app.data.train_ds
        assert isinstance(sampler, BalancedSampler) and (~dataset.is_nodule).sum() == 10 * len(app.data.split.train)
        chosen = dataset.is_nodule[sampler.indices()]
        assert chosen.sum() * 3 == (~chosen).sum()  # 1 nodule crop per 3 background crops
        app.run()
        assert app.samples_seen == 16
    finally:
        app.close()


def test_a_crop_larger_than_the_slices_is_refused_before_the_cache_is_filled(small, tmp_path, capsys):
    args = _args(small, tmp_path)
    args[args.index("--crop-size") + 1] = "128"  # the slices are 64 x 64: every crop would be 3/4 air
    assert seg_training.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("p2ch.seg_training: error: --crop-size 128: larger than the 64 × 64")
    assert "at least 75% padding" in err and "--crop-size 64 or less (a multiple of 4" in err
    assert not (tmp_path / "cache").exists()  # refused from the headers, before any CT was loaded
    args[args.index("--crop-size") + 1] = "64"  # as large as the slices: accepted
    assert seg_training.main([*args, "--max-train-batches", "1", "--max-val-batches", "1"]) == 0


def test_no_prefill_leaves_the_slice_cache_to_the_datasets(small, tmp_path, monkeypatch):
    from p2ch import prefill

    monkeypatch.setattr(prefill, "_run_tasks", lambda *a, **k: pytest.fail("prefilled with --no-prefill"))
    args = [*_args(small, tmp_path), "--no-prefill", "--max-train-batches", "1", "--max-val-batches", "1"]
    assert seg_training.main(args) == 0  # the datasets wrote each CT as they first read it


def test_validation_counts_a_nodule_only_when_a_candidate_centre_is_within_its_radius():
    """The VolumeAssembler scores complete CTs with nodule_analysis's candidate rule and LUNA16's hit rule: a blob
    that overlaps a nodule but is centred elsewhere finds nothing (the old mask-overlap rule counted it)."""
    shape = (12, 40, 40)
    spacing = (1.0, 1.0, 1.0)
    nodules_irc = np.array([[6, 10, 10], [6, 30, 30]])
    info = SimpleNamespace(
        shape_irc=shape, voxel_size_xyz=spacing, origin_xyz=(0.0, 0.0, 0.0), direction=np.eye(3),
        nodule_center_xyz=nodules_irc[:, ::-1].astype(float), nodule_diameter_mm=np.array([6.0, 6.0]),
    )  # fmt: skip
    prob = np.zeros(shape, dtype=np.float32)
    prob[5:8, 8:13, 8:13] = 0.9  # centred on nodule 0
    prob[5:8, 28:31, 28:40] = 0.9  # overlaps nodule 1 (its centre voxel too) but is centred 4.5 mm away
    hu = np.full(shape, -800, dtype=np.int16)
    assembler = seg_training.VolumeAssembler(
        SimpleNamespace(info=lambda uid: info), CandidateRule(lungs=False, split=False, max_candidates=0)
    )
    order = np.random.default_rng(0).permutation(shape[0])  # slices arrive in any order
    for start in range(0, shape[0], 5):
        k = order[start : start + 5]
        assembler.add(["ct"] * len(k), k, prob[k], hu[k])
    (hits,) = assembler.hits
    assert hits.found.tolist() == [True, False]
    assert (hits.components, hits.fp_components) == (2, 1)
    assert assembler.pending == {}


def test_best_pt_ranks_by_candidate_recall_only_when_whole_cts_are_validated(caplog):
    """--val-slices all: candidate recall, then fewer false positives per CT; --val-slices nodules has no whole CT to
    find candidates in, so pixel F1 ranks without a warning that recall is undefined."""
    whole = seg_training.best_checkpoint(seg_training.SegTrainingConfig(val_slices="all"))
    assert [m.name for m in whole.metrics] == ["recall", "f1"] and whole.loss_key == "nodule/fp_per_ct"
    assert whole.update({"nodule/recall": 0.8, "pr/f1_score": 0.2, "nodule/fp_per_ct": 20.0}, 1)
    assert not whole.update({"nodule/recall": 0.8, "pr/f1_score": 0.9, "nodule/fp_per_ct": 25.0}, 2)
    assert whole.update({"nodule/recall": 0.8, "pr/f1_score": 0.1, "nodule/fp_per_ct": 10.0}, 3)
    sample = seg_training.best_checkpoint(seg_training.SegTrainingConfig(val_slices="nodules"))
    with caplog.at_level("WARNING"):
        assert sample.update({"pr/f1_score": 0.4, "loss/all": 1.0}, 1)
    assert sample.name == "f1" and "undefined" not in caplog.text
