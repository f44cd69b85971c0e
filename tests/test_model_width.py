"""--model-width: a wider (or narrower) LunaModel trained, saved, resumed, scored and refused where it cannot fit."""

from __future__ import annotations

import pytest
import torch
from test_training import _args, _run_dir

from p2ch import evaluate, training
from p2ch.checkpoint import load_checkpoint, load_finetune_weights, load_model, save_checkpoint
from p2ch.config import BOOK_MODEL_WIDTH, TrainingConfig, config_from_args
from p2ch.errors import ConfigError, DataFormatError
from p2ch.model import LunaModel, arch_signature

WIDTH = 4  # narrower than the book's 8: the cheapest model that is not the default


@pytest.fixture(scope="module")
def tiny(synth_set):
    return synth_set(num_cts=4, size=96, slices=48, candidates_per_ct=40, nodules_per_ct=2, seed=11)


@pytest.fixture(scope="module")
def narrow_run(tiny, tmp_path_factory):
    """A finished 1-epoch run with --model-width 4: (work folder, its last.pt, the flags it ran with)."""
    work = tmp_path_factory.mktemp("narrow")
    base = _args(tiny, work, "--max-train-batches", "1", "--max-val-batches", "2", "--model-width", str(WIDTH))
    assert training.main([*base, "--epochs", "1"]) == 0
    return work, _run_dir(work) / "last.pt", base


def test_the_run_trains_saves_and_reloads_a_model_of_that_width(narrow_run):
    _, last, _ = narrow_run
    state = load_checkpoint(last)
    assert state["config"]["model_width"] == WIDTH
    assert state["model"]["block1.conv1.weight"].shape[0] == WIDTH
    assert state["model"]["block4.conv2.weight"].shape[0] == 8 * WIDTH
    model, info = load_model(last)
    assert model.conv_channels == WIDTH and info.config.model_width == WIDTH
    _, probabilities = model(torch.zeros(2, 1, 32, 48, 48))
    assert probabilities.shape == (2, 2)


def test_evaluate_scores_a_checkpoint_of_another_width(narrow_run, tmp_path):
    _, last, _ = narrow_run
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(last), "--bootstrap", "0", "--num-workers", "0", "--no-progress", "--out", str(out)]
    assert evaluate.main(argv) == 0
    assert (out / "submission.csv").is_file()


def test_resume_keeps_the_width_and_refuses_another(narrow_run, tmp_path, capsys):
    import shutil

    _, last, base = narrow_run
    copy = tmp_path / "models" / "p2ch" / last.parent.name
    shutil.copytree(last.parent, copy)
    capsys.readouterr()
    assert training.main([*base, "--model-width", "8", "--epochs", "2", "--resume", str(copy / "last.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model-width 4 → 8" in err
    assert load_checkpoint(copy / "last.pt")["epoch"] == 1  # nothing ran
    without = [a for i, a in enumerate(base) if a != "--model-width" and base[i - 1] != "--model-width"]
    assert training.main([*without, "--epochs", "2", "--resume", str(copy / "last.pt")]) == 0
    resumed = load_checkpoint(copy / "last.pt")
    assert resumed["epoch"] == 2 and resumed["model"]["block1.conv1.weight"].shape[0] == WIDTH


def test_init_weights_of_another_width_names_both_widths(narrow_run, tiny, tmp_path, capsys):
    _, last, _ = narrow_run
    argv = _args(tiny, tmp_path, "--max-train-batches", "1", "--epochs", "1", "--init-weights", str(last))
    capsys.readouterr()
    assert training.main([*argv, "--model-width", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained with --model-width 4" in err


def test_init_weights_without_a_width_builds_the_loaded_models_width(narrow_run, tiny, tmp_path):
    _, last, _ = narrow_run
    argv = _args(tiny, tmp_path, "--max-train-batches", "1", "--max-val-batches", "1", "--init-weights", str(last))
    assert training.main([*argv, "--epochs", "1"]) == 0
    state = load_checkpoint(_run_dir(tmp_path) / "last.pt")
    assert state["config"]["model_width"] == WIDTH
    assert state["model"]["block1.conv1.weight"].shape[0] == WIDTH


def _completed_width(*argv: str) -> int | None:
    args = training.get_args_parser().parse_args(list(argv))
    training.complete_model_width(args)
    return args.model_width


def test_finetune_takes_the_width_of_its_nodule_model_unless_one_is_given(narrow_run):
    _, last, _ = narrow_run
    assert _completed_width("--malignant", "--finetune", str(last)) == WIDTH
    assert _completed_width("--malignant", "--finetune", str(last), "--model-width", "16") == 16  # given: kept
    assert _completed_width("--malignant") is None  # nothing loaded: the default, filled in by the config
    assert config_from_args(training.get_args_parser().parse_args([]), TrainingConfig).model_width == 16
    # a resumed run's width is the checkpoint's own (resume_config), never read from what it was started with
    assert _completed_width("--init-weights", str(last), "--resume", str(last)) is None


def test_a_missing_or_foreign_finetune_source_is_one_line(tiny, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for source, message in ((tmp_path / "none.pt", "none.pt not found"), (tmp_path / "junk.pt", "junk.pt: not a")):
        assert _completed_width("--malignant", "--finetune", str(source)) is None  # the load below says why
        capsys.readouterr()
        assert training.main([*_args(tiny, tmp_path), "--malignant", "--finetune", str(source)]) in (1, 2)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_finetune_from_another_width_names_both_widths(narrow_run):
    _, last, _ = narrow_run
    with pytest.raises(ConfigError, match=r"trained with --model-width 4.*\(--model-width 8\).*same --model-width"):
        load_finetune_weights(LunaModel(), last, (32, 48, 48))
    load_finetune_weights(LunaModel(conv_channels=WIDTH), last, (32, 48, 48))  # the same width fits


@pytest.mark.parametrize("value", ["0", "257"])
def test_a_width_out_of_range_is_refused(tiny, tmp_path, capsys, value):
    assert training.main([*_args(tiny, tmp_path), "--model-width", value]) == 2
    err = capsys.readouterr().err
    assert f"--model-width must be in 1..256 (conv channels of the first block), got {value}" in err


def _with_default_width(init, width: int):
    def patched(self, *args, **kwargs):
        init(self, *args, **{"model_width": width, **kwargs})

    return patched


def test_a_checkpoint_without_a_width_is_the_books_and_a_bad_width_is_one_line(narrow_run, tmp_path, monkeypatch):
    _, last, _ = narrow_run
    book = LunaModel()
    state = load_checkpoint(last)
    config = {k: v for k, v in state["config"].items() if k != "model_width"}  # as before --model-width existed
    old = {**state, "config": config, "model": book.state_dict(), "arch": arch_signature(book)}
    save_checkpoint(old, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt")[0].conv_channels == BOOK_MODEL_WIDTH == 8
    assert TrainingConfig.from_dict(config).model_width == 8  # what --resume rebuilds the run from
    # the width such a checkpoint was trained with, whatever the default is today
    monkeypatch.setattr(TrainingConfig, "__init__", _with_default_width(TrainingConfig.__init__, 16))
    assert TrainingConfig().model_width == 16 and TrainingConfig.from_dict(config).model_width == 8
    assert load_model(tmp_path / "old.pt")[0].conv_channels == 8
    for bad in ("wide", 0):  # 0 is a width too, only not one a model can have
        save_checkpoint({**old, "config": {**config, "model_width": bad}}, tmp_path / "bad.pt")
        with pytest.raises(DataFormatError, match=r"bad\.pt: the checkpoint's model width is unusable"):
            load_model(tmp_path / "bad.pt")
