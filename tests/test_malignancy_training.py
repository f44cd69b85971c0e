"""The malignancy task end to end: --malignant / --dataset, --finetune, --finetune-depth, best.pt by AUC,
the task in checkpoints, and evaluate --task malignancy (CPU, tiny synthetic sets)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from p2ch import evaluate, predict, training
from p2ch.candidates import clear_candidate_cache
from p2ch.checkpoint import load_checkpoint, load_finetune_weights, load_model, save_checkpoint, task_of
from p2ch.config import TrainingConfig
from p2ch.errors import ConfigError, DataNotFoundError
from p2ch.luna import MALIGNANCY_COLUMNS, MALIGNANCY_FILE
from p2ch.model import LunaModel, arch_signature, freeze_for_finetune, set_train_mode, weight_blocks
from p2ch.unet import UNetWrapper, unet_signature

BATCH = 4


def _write_malignancy(root: Path, labels_of) -> pd.DataFrame:
    """annotations_with_malignancy.csv from the root's annotations.csv; labels_of(frame) → (N,) bool."""
    ann = pd.read_csv(root / "annotations.csv", dtype={"seriesuid": str})
    ann = ann.sort_values(["seriesuid", "coordX"]).reset_index(drop=True)
    mal = np.asarray(labels_of(ann), dtype=bool)
    rows = []
    for (_, row), is_mal in zip(ann.iterrows(), mal, strict=True):
        ratings = [4, 4, 5, 2] if is_mal else [2, 3, 3, 4]
        r = row["diameter_mm"] / 2
        centre = [row["coordX"], row["coordY"], row["coordZ"]]
        low, high = [c - r for c in centre], [c + r for c in centre]
        rows.append([row["seriesuid"], *centre, row["diameter_mm"], str(bool(is_mal)), str(ratings), *low, *high, 4])
    pd.DataFrame(rows, columns=list(MALIGNANCY_COLUMNS)).to_csv(root / MALIGNANCY_FILE, index=False)
    clear_candidate_cache()
    return ann.assign(mal=mal)


def _private_root(source: Path, target: Path) -> Path:
    """A data root of its own: the CTs linked, the CSVs copied (so a test may rewrite them)."""
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.is_dir() and entry.name.startswith("subset"):
            (target / entry.name).symlink_to(entry, target_is_directory=True)
        elif entry.suffix == ".csv":
            shutil.copy(entry, target / entry.name)
    return target


@pytest.fixture(scope="module")
def mal_root(synth_set, tmp_path_factory):
    """6 small CTs (4 with nodules), every other nodule malignant, so each split part has both classes."""
    source = synth_set(num_cts=6, size=96, slices=48, candidates_per_ct=30, nodules_per_ct=4, seed=12)
    root = _private_root(source, tmp_path_factory.mktemp("mal") / "luna")
    _write_malignancy(root, lambda ann: np.arange(len(ann)) % 2 == 1)
    return root


def _args(root: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--data-root", str(root), "--cache-dir", str(root.parent / "cache"), "--runs-dir", str(work / "runs"),
        "--checkpoint-dir", str(work / "models"), "--batch-size", str(BATCH), "--num-workers", "0",
        "--val-fraction", "0.5", "--images-every", "1", "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def _run_dir(work: Path) -> Path:
    (found,) = (work / "models" / "p2ch").iterdir()
    return found


@pytest.fixture(scope="module")
def nodule_run(mal_root, tmp_path_factory) -> Path:
    """A 1-epoch nodule classifier on the same data: its best.pt."""
    work = tmp_path_factory.mktemp("nodule")
    args = _args(mal_root, work, "--balanced", "--max-train-batches", "2", "--epochs", "1", "nod")
    assert training.main(args) == 0
    return _run_dir(work) / "best.pt"


@pytest.fixture(scope="module")
def mal_run(mal_root, nodule_run, tmp_path_factory) -> tuple[Path, list[str]]:
    """A 2-epoch malignancy run fine-tuned from `nodule_run` at depth 2: (its run folder, its flags)."""
    work = tmp_path_factory.mktemp("malrun")
    args = _args(mal_root, work, "--malignant", "--finetune", str(nodule_run), "--finetune-depth", "2", "mal")
    args += ["--lr-schedule", "constant"]  # a test below extends the run (--resume … --epochs 3)
    assert training.main([*args, "--epochs", "2"]) == 0
    return _run_dir(work), args


# -- flags and config ------------------------------------------------------------------------------


def test_task_flags_parse():
    parse = training.get_args_parser().parse_args
    assert parse([]).task == "nodule"
    assert parse(["--malignant"]).task == "malignancy"
    assert parse(["--dataset", "MalignantLunaDataset"]).task == "malignancy"
    assert parse(["--dataset", "LunaDataset"]).task == "nodule"
    assert TrainingConfig().best_by == "cpm"
    assert TrainingConfig(task="malignancy").best_by == "auc"
    assert TrainingConfig(task="malignancy", select_by="f1").best_by == "f1"


def test_unknown_dataset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        training.get_args_parser().parse_args(["--dataset", "LunaDatasetX"])
    assert "MalignantLunaDataset" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--finetune-depth", "2"], "--finetune-depth applies to --finetune"),
        (["--malignant", "--select-by", "cpm"], "CPM scores nodule detection"),
        (["--finetune", "x.pt", "--finetune-depth", "0"], "--finetune-depth must be ≥ 1"),
        (["--finetune", "x.pt", "--init-weights", "y.pt"], "use one of them"),
    ],
)
def test_bad_task_flags_are_one_line(tmp_path, capsys, extra, expected):
    assert training.main(["--data-root", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


# -- freezing and loading --------------------------------------------------------------------------


def test_freeze_for_finetune_depths():
    model = LunaModel()
    names = [name for name, _ in weight_blocks(model)]
    assert names == ["tail_batchnorm", "block1", "block2", "block3", "block4", "head_linear"]
    assert freeze_for_finetune(model, 1) == ["head_linear"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head_linear.weight", "head_linear.bias"}
    assert freeze_for_finetune(model, 2) == ["block4", "head_linear"]
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"block4", "head_linear"}
    assert freeze_for_finetune(model, 6) == names
    for depth in (0, 7, True):
        with pytest.raises(ConfigError, match="has 6 blocks with weights"):
            freeze_for_finetune(model, depth)


def test_frozen_batchnorm_keeps_its_statistics_in_training_mode():
    model = LunaModel()
    freeze_for_finetune(model, 1)
    set_train_mode(model)
    assert model.head_linear.training and not model.tail_batchnorm.training
    before = model.tail_batchnorm.running_mean.clone()
    model(torch.full((2, 1, 32, 48, 48), 300.0))
    assert torch.equal(model.tail_batchnorm.running_mean, before)
    set_train_mode(model, False)
    assert not model.training


def _checkpoint(path: Path, model: torch.nn.Module, arch: str, config: dict, task: str | None = None) -> Path:
    state = {"arch": arch, "model": model.state_dict(), "config": config, "epoch": 1}
    if task is not None:
        state["task"] = task
    save_checkpoint(state, path)
    return path


def test_load_finetune_weights_takes_all_but_the_head(tmp_path):
    torch.manual_seed(1)
    source = LunaModel()
    path = _checkpoint(tmp_path / "nod.pt", source, arch_signature(source), TrainingConfig().to_dict())
    torch.manual_seed(2)
    target = LunaModel()
    head_before = target.head_linear.weight.clone()
    load_finetune_weights(target, path, (32, 48, 48))
    assert torch.equal(target.block1.conv1.weight, source.block1.conv1.weight)
    assert torch.equal(target.tail_batchnorm.running_var, source.tail_batchnorm.running_var)
    assert torch.equal(target.head_linear.weight, head_before)


def test_finetune_refuses_the_wrong_kind_of_checkpoint(tmp_path):
    model = LunaModel()
    config = TrainingConfig().to_dict()
    unet = UNetWrapper(in_channels=7, n_classes=1, depth=3, wf=4, padding=True, batch_norm=True, up_mode="upconv")
    seg = _checkpoint(tmp_path / "seg.pt", unet, unet_signature(unet), {})
    with pytest.raises(ConfigError, match=r"this is a segmentation model .*--finetune needs a nodule model"):
        load_finetune_weights(model, seg, (32, 48, 48))
    mal = _checkpoint(tmp_path / "mal.pt", model, arch_signature(model), {**config, "task": "malignancy"}, "malignancy")
    with pytest.raises(ConfigError, match="this is a malignancy model"):
        load_finetune_weights(model, mal, (32, 48, 48))
    wide = _checkpoint(tmp_path / "wide.pt", model, arch_signature(model), {**config, "width_irc": [16, 48, 48]})
    with pytest.raises(ConfigError, match=r"chunks of \[16, 48, 48\] voxels"):
        load_finetune_weights(model, wide, (32, 48, 48))


def test_task_of_old_checkpoints():
    assert task_of({"arch": "LunaModel-v1:abc"}) == "nodule"
    assert task_of({"arch": "UNetWrapper-v1:abc"}) == "segmentation"
    assert task_of({"arch": "LunaModel-v1:abc", "config": {"task": "malignancy"}}) == "malignancy"


# -- training ------------------------------------------------------------------------------------


def test_malignancy_run_finetunes_selects_by_auc_and_records_the_task(mal_run, nodule_run):
    run, _ = mal_run
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best["task"] == last["task"] == "malignancy"
    assert best["config"]["task"] == "malignancy" and best["selected_by"] == "auc"
    nodule = load_checkpoint(nodule_run)
    assert nodule["task"] == "nodule"
    # depth 2: block4 and the head train, the blocks before them are the nodule model's, untouched
    for key in ("block1.conv1.weight", "block3.conv2.bias", "tail_batchnorm.running_mean"):
        assert torch.equal(last["model"][key], nodule["model"][key]), key
    assert not torch.equal(last["model"]["block4.conv1.weight"], nodule["model"]["block4.conv1.weight"])
    # the optimizer holds only the trained parameters: block4's 4 tensors and the head's 2
    assert len(last["optimizer"]["param_groups"][0]["params"]) == 6


def test_malignancy_run_logs_auc_and_a_roc_curve(mal_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = mal_run
    (val_dir,) = [d for d in (run.parents[2] / "runs" / "p2ch").iterdir() if "-val_mal-" in d.name]
    acc = EventAccumulator(str(val_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert len(acc.Scalars("pr/auc")) == 2 and "froc/cpm" not in acc.Tags()["scalars"]
    assert "roc/auc" in acc.Tags()["scalars"]
    assert any(tag.startswith("roc") for tag in acc.Tags()["images"])
    assert {"val/hardest_benign", "val/hardest_malignant"} <= set(acc.Tags()["images"])


def test_resume_keeps_the_task_and_refuses_a_task_change(mal_run, tmp_path, capsys):
    run, args = mal_run
    copy = tmp_path / "models" / "p2ch" / run.name
    shutil.copytree(run, copy)
    base = [a for a in args if a not in ("--malignant",)]
    drop = base.index("--finetune")
    base = base[:drop] + base[drop + 4 :]  # no --finetune/--finetune-depth: the checkpoint has them
    assert training.main([*base, "--dataset", "LunaDataset", "--epochs", "3", "--resume", str(copy / "last.pt")]) == 2
    assert "--task malignancy → nodule" in capsys.readouterr().err
    assert training.main([*base, "--epochs", "3", "--resume", str(copy / "last.pt")]) == 0
    resumed = load_checkpoint(copy / "last.pt")
    assert resumed["epoch"] == 3 and resumed["task"] == "malignancy"
    assert len(resumed["optimizer"]["param_groups"][0]["params"]) == 6


def test_validation_with_one_class_is_a_clear_error(mal_root, tmp_path, capsys):
    root = _private_root(mal_root, tmp_path / "luna")
    _write_malignancy(root, lambda ann: np.zeros(len(ann), dtype=bool))
    assert training.main(_args(root, tmp_path, "--malignant", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "malignancy split: training has 0 malignant" in err and "Traceback" not in err
    clear_candidate_cache()


# -- evaluation and refusals ------------------------------------------------------------------------


def test_evaluate_task_malignancy_writes_auc_roc_and_nodules(mal_run, mal_root, tmp_path, capsys):
    run, _ = mal_run
    out = tmp_path / "eval"
    argv = ["--task", "malignancy", "--checkpoint", str(run / "best.pt"), "--out", str(out), "--no-progress"]
    assert evaluate.main([*argv, "--num-workers", "0", "--bootstrap", "200"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "malignancy" and metrics["checkpoint"]["task"] == "malignancy"
    mal = metrics["malignancy"]
    assert 0.0 <= mal["auc"] <= 1.0 and mal["auc_ci"][0] <= mal["auc"] <= mal["auc_ci"][1]
    table = pd.read_csv(out / "nodules.csv")
    assert len(table) == metrics["counts"]["nodules"] == mal["malignant"] + mal["benign"]
    assert set(table.columns) >= {"seriesuid", "coordX", "diameter_mm", "mal_bool", "p_malignant"}
    assert mal["malignant"] == int(table["mal_bool"].sum()) > 0 and mal["benign"] > 0
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "AUC" in capsys.readouterr().out
    assert math.isfinite(mal["sensitivity"]) and math.isfinite(mal["specificity"])


def test_commands_refuse_the_other_tasks_model(mal_run, nodule_run, tmp_path, capsys):
    run, _ = mal_run
    assert evaluate.main(["--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err
    assert "this is a malignancy model" in err and "--task malignancy" in err
    argv = ["--task", "malignancy", "--checkpoint", str(nodule_run), "--out", str(tmp_path / "e2")]
    assert evaluate.main(argv) == 2
    assert "this is a nodule model" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "this is a malignancy model" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs a nodule model"):
        load_model(run / "best.pt")
    _model, info = load_model(run / "best.pt", task="malignancy")
    assert info.task == "malignancy"


def test_newest_model_of_each_kind_is_found(mal_run, nodule_run, tmp_path):
    from p2ch.checkpoint import find_latest

    models = tmp_path / "models"
    for name, source in (("a-nod", nodule_run), ("b-mal", mal_run[0] / "best.pt")):
        (models / name).mkdir(parents=True)
        shutil.copy(source, models / name / "best.pt")
    assert find_latest(models, task="nodule").parent.name == "a-nod"
    assert find_latest(models, task="malignancy").parent.name == "b-mal"
    with pytest.raises(DataNotFoundError, match=r"no best\.pt of a segmentation model"):
        find_latest(models, task="segmentation")


def test_finetune_flag_errors_are_one_line(mal_root, nodule_run, mal_run, tmp_path, capsys):
    deep = _args(mal_root, tmp_path, "--malignant", "--finetune", str(nodule_run), "--finetune-depth", "7")
    assert training.main(deep) == 2
    err = capsys.readouterr().err
    assert "--finetune-depth 7: LunaModel has 6 blocks with weights" in err and "Traceback" not in err
    missing = _args(mal_root, tmp_path, "--malignant", "--finetune", str(tmp_path / "nope.pt"))
    assert training.main(missing) == 2
    assert "nope.pt not found" in capsys.readouterr().err
    run, args = mal_run
    assert training.main([*args, "--epochs", "3", "--resume", str(run / "last.pt")]) == 2
    assert "drop --finetune" in capsys.readouterr().err


def test_evaluate_malignancy_refuses_pictures(tmp_path, capsys):
    assert evaluate.main(["--task", "malignancy", "--pictures", "4", "--out", str(tmp_path / "e")]) == 2
    assert "--pictures draws the nodule task's" in capsys.readouterr().err
