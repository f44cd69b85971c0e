import os
from pathlib import Path

import pytest
import torch

from p2ch.checkpoint import (
    CHECKPOINT_FORMAT,
    find_latest,
    load_checkpoint,
    load_model,
    save_checkpoint,
    sha1_of,
)
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError


def test_round_trip_weights_only(tmp_path):
    path = tmp_path / "run" / "last.pt"
    state = {"arch": "A", "model": {"w": torch.arange(4.0)}, "epoch": 3, "config": {"lr": 0.1, "x": [1, 2]}}
    digest = save_checkpoint(state, path)
    assert digest == sha1_of(path) and len(digest) == 40
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["versions"]["torch"] == torch.__version__
    loaded = load_checkpoint(path, arch="A")
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"arch": "A", "epoch": 1}, path)
    before = path.read_bytes()

    def boom(obj, handle):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint({"arch": "A", "epoch": 2}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_refuses_other_architecture_and_foreign_files(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"arch": "LunaModel-v1"}, path)
    expected = r"architecture 'LunaModel-v1' \(trained with --model-width 8\), this model is 'Other'"
    with pytest.raises(ConfigError, match=expected):
        load_checkpoint(path, arch="Other")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(DataFormatError, match="not a p2ch checkpoint"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="not a readable checkpoint"):
        load_checkpoint(garbage)
    with pytest.raises(DataNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "x": Evil()}, path)
    with pytest.raises(DataFormatError) as info:
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    assert "\n" not in str(info.value), "torch's page-long message must be cut to one line"


def test_checkpoint_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint({"arch": "x"}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


def test_find_latest(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"no best\.pt under"):
        find_latest(tmp_path)
    old = tmp_path / "p" / "a" / "best.pt"
    new = tmp_path / "p" / "b" / "best.pt"
    save_checkpoint({}, old)
    save_checkpoint({}, new)
    os.utime(old, (1_000_000, 1_000_000))
    assert find_latest(tmp_path) == new


def test_checkpoint_of_the_previous_format_loads_for_scoring():
    """tests/fixtures/legacy-v1-last.pt was written by p2ch before the spine refactor (how: see
    tests/test_training.py::test_checkpoint_of_the_previous_format_resumes)."""
    legacy = Path(__file__).parent / "fixtures" / "legacy-v1-last.pt"
    model, info = load_model(legacy)
    assert info.epoch == 1 and info.config.width_irc == (32, 48, 48) and info.config.balanced
    assert info.config.data_root == "luna"  # stored relative then; new runs store absolute paths
    x = torch.zeros(2, 1, 32, 48, 48)
    logits, prob = model(x)
    assert logits.shape == (2, 2) and torch.allclose(prob.sum(dim=1), torch.ones(2))


def test_weights_of_the_wrong_shape_name_the_first_mismatch(tmp_path):
    from p2ch.config import TrainingConfig

    from conftest import make_model, write_checkpoint

    model = make_model()
    state = model.state_dict()
    key = next(k for k in state if k.endswith("conv1.weight"))
    state[key] = torch.zeros(3, 3)
    path = write_checkpoint(tmp_path / "bad.pt", model, TrainingConfig())
    saved = load_checkpoint(path)
    saved["model"] = state
    save_checkpoint(saved, path)
    with pytest.raises(DataFormatError, match=rf"bad.pt: the model weights do not load into LunaModel \(.*{key}"):
        load_model(path)


def _segmentation_checkpoint(path: Path, *, weights: dict | None = None) -> torch.nn.Module:
    """A checkpoint shaped like SegmentationTrainingApp's (TrainingRun._state) of a tiny UNet."""
    from p2ch.config import SegTrainingConfig
    from p2ch.unet import UNetWrapper, unet_signature

    torch.manual_seed(1)
    model = UNetWrapper(in_channels=3, depth=2, wf=1, up_mode="upsample")
    config = SegTrainingConfig(context_slices=1, depth=2, wf=1, up_mode="upsample", threshold=0.3)
    save_checkpoint(
        {
            "arch": unet_signature(model),
            "task": "segmentation",
            "model": weights if weights is not None else model.state_dict(),
            "optimizer": {},
            "scaler": None,
            "epoch": 4,
            "samples_seen": 64,
            "best_metric": float("nan"),
            "selected_by": "recall",
            "config": config.to_dict(),
            "run_time": "2025-01-01_00.00.00",
            "rng": {"torch": torch.get_rng_state()},
        },
        path,
    )
    return model


def test_a_segmentation_model_round_trips_with_its_settings(tmp_path):
    from p2ch.checkpoint import load_segmentation_model

    path = tmp_path / "seg" / "best.pt"
    saved = _segmentation_checkpoint(path)
    model, settings = load_segmentation_model(path)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    assert model.settings == saved.settings
    loaded, expected = model.state_dict(), saved.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert settings["context_slices"] == 1 and settings["threshold"] == 0.3 and settings["config"].up_mode == "upsample"
    info = settings["info"]
    assert info["path"] == str(path.absolute()) and info["sha1"] == sha1_of(path) and info["epoch"] == 4
    assert info["task"] == "segmentation" and info["best_metric"] is None and info["selected_by"] == "recall"
    x = torch.randn(2, 3, 16, 16) * 300
    with torch.no_grad():
        assert torch.equal(model(x), saved.eval()(x))


def test_segmentation_loader_refuses_classifiers_and_wrong_weights(tmp_path):
    from p2ch.checkpoint import load_segmentation_model
    from p2ch.config import TrainingConfig

    from conftest import make_model, write_checkpoint

    nodule = write_checkpoint(tmp_path / "nodule.pt", make_model(), TrainingConfig())
    malignancy = write_checkpoint(tmp_path / "mal.pt", make_model(), TrainingConfig(task="malignancy"))
    for path, kind in ((nodule, "nodule"), (malignancy, "malignancy")):
        with pytest.raises(ConfigError, match=f"this is a {kind} model .* needs a segmentation model") as info:
            load_segmentation_model(path, use="nodule_analysis --segmentation")
        assert "\n" not in str(info.value) and "nodule_analysis --segmentation" in str(info.value)
    state = _segmentation_checkpoint(tmp_path / "good.pt").state_dict()
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    state[key] = torch.zeros(2, 2)
    _segmentation_checkpoint(tmp_path / "bad.pt", weights=state)
    with pytest.raises(
        DataFormatError, match=rf"bad.pt: the model weights do not load into UNetWrapper \(.*{key}"
    ) as info:
        load_segmentation_model(tmp_path / "bad.pt")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="this is a segmentation model"):
        load_model(tmp_path / "good.pt")
