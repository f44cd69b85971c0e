"""`python -m p2ch.predict`: scoring candidate locations straight from the CTs (CPU)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from p2ch import evaluate, predict
from p2ch.checkpoint import save_checkpoint
from p2ch.config import TrainingConfig
from p2ch.ct import Ct
from p2ch.errors import DataNotFoundError
from p2ch.inference import Scorer, predict_locations
from p2ch.model import LunaModel, arch_signature

from conftest import make_model, write_checkpoint

KEYS = ["seriesuid", "coordX", "coordY", "coordZ"]
UNKNOWN_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.999999999999999999999"


@pytest.fixture(scope="module")
def world(tmp_path_factory, synth_set):
    base = tmp_path_factory.mktemp("predict")
    root = synth_set(num_cts=3, size=96, slices=48, candidates_per_ct=30, nodules_per_ct=2, seed=5)
    model = make_model()
    # The checkpoint names the data root, so commands find the CTs without --data-root.
    config = TrainingConfig(data_root=str(root), cache_dir=str(base / "cache"), val_fraction=0.5)
    checkpoint = write_checkpoint(base / "models" / "run" / "best.pt", model, config)
    candidates = pd.read_csv(root / "candidates.csv", dtype={"seriesuid": str})
    return {"base": base, "root": root, "model": model, "checkpoint": checkpoint, "candidates": candidates}


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = predict.main([*args, "--log-level", "WARNING"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def model_probabilities(world, frame: pd.DataFrame) -> np.ndarray:
    """P(nodule) of the model on chunks cropped with Ct directly, in frame order."""
    out = np.empty(len(frame))
    for uid, group in frame.groupby("seriesuid"):
        chunks, _ = Ct(uid, world["root"]).get_raw_candidates(group[["coordX", "coordY", "coordZ"]].to_numpy())
        with torch.no_grad():
            _, prob = world["model"](torch.from_numpy(chunks).unsqueeze(1).float())
        out[frame.index.get_indexer(group.index)] = prob[:, 1].numpy()
    return out


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        predict.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--checkpoint",
        "--models-dir",
        "--data-root",
        "--series",
        "--candidates",
        "--out",
        "--outside",
        "--batch-size",
        "--device",
        "--amp",
    ):
        assert flag in out


def test_one_series_to_stdout(world, capsys):
    uid = world["candidates"]["seriesuid"].iloc[0]
    rc, out, err = run(capsys, "--checkpoint", str(world["checkpoint"]), "--series", uid, "--batch-size", "7")
    assert rc == 0, err
    got = pd.read_csv(io.StringIO(out), dtype={"seriesuid": str})
    expected = world["candidates"][world["candidates"]["seriesuid"] == uid].reset_index(drop=True)
    assert list(got.columns) == [*KEYS, "probability"]
    pd.testing.assert_frame_equal(got[KEYS], expected[KEYS])  # every row, in the CSV's order
    np.testing.assert_allclose(got["probability"], model_probabilities(world, expected), rtol=0, atol=1e-6)


def test_all_series_match_evaluate_and_create_no_cache(world, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("P2CH_CACHE_DIR", str(tmp_path / "never-cache"))
    out = tmp_path / "scores.csv"
    rc, stdout, err = run(capsys, "--models-dir", str(world["base"] / "models"), "--out", str(out))
    assert rc == 0, err
    assert stdout == ""
    assert not (tmp_path / "never-cache").exists() and not (world["base"] / "cache").exists()
    assert list(work.iterdir()) == []  # no data-unversioned/ either
    got = pd.read_csv(out, dtype={"seriesuid": str})
    pd.testing.assert_frame_equal(got[KEYS], world["candidates"][KEYS])

    # evaluate, through the chunk cache, gives the same probabilities for the same candidates.
    rc = evaluate.main(
        [
            "--checkpoint",
            str(world["checkpoint"]),
            "--split",
            "all",
            "--out",
            str(tmp_path / "eval"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--bootstrap",
            "0",
            "--num-workers",
            "0",
            "--log-level",
            "WARNING",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert (tmp_path / "cache").exists()
    submission = pd.read_csv(tmp_path / "eval" / "submission.csv", dtype={"seriesuid": str})
    merged = got.merge(submission, on=KEYS, suffixes=("", "_evaluate"))
    assert len(merged) == len(got) == len(submission)
    np.testing.assert_allclose(merged["probability"], merged["probability_evaluate"], rtol=0, atol=1e-6)


def test_detector_csv_without_class_skips_outside_and_absent_series(world, tmp_path, capsys):
    candidates = world["candidates"]
    inside = candidates.iloc[[3, 40, 5]][KEYS].reset_index(drop=True)
    outside = inside.iloc[[0]].assign(coordZ=inside["coordZ"].iloc[0] + 5000.0)
    absent = inside.iloc[[1]].assign(seriesuid=UNKNOWN_UID)
    detector = pd.concat([inside.iloc[[0]], outside, inside.iloc[[1]], absent, inside.iloc[[2]]], ignore_index=True)
    detector["score"] = 0.9  # a detector's own column: ignored
    path = tmp_path / "detector.csv"
    detector.to_csv(path, index=False)
    out = tmp_path / "scores.csv"
    rc, _, err = run(capsys, "--checkpoint", str(world["checkpoint"]), "--candidates", str(path), "--out", str(out))
    assert rc == 0, err
    got = pd.read_csv(out, dtype={"seriesuid": str})
    pd.testing.assert_frame_equal(got[KEYS], inside[KEYS])  # input order, skipped rows left out
    np.testing.assert_allclose(got["probability"], model_probabilities(world, inside), rtol=0, atol=1e-6)

    rc, _, err = run(
        capsys,
        "--checkpoint",
        str(world["checkpoint"]),
        "--candidates",
        str(path),
        "--out",
        str(tmp_path / "strict.csv"),
        "--outside",
        "error",
    )
    assert rc == 2 and "outside CT" in err
    assert not (tmp_path / "strict.csv").exists()
    # The header is line 1, so the second data row (the outside one) is line 3 of the file.
    x, y, z = (round(float(v), 2) for v in outside[["coordX", "coordY", "coordZ"]].iloc[0])
    assert f"error: {path}: line 3: candidate centre ({x}, {y}, {z}) mm lies outside CT" in err
    assert err.count("\n") == 1 and "np.float64" not in err


def test_an_out_that_cannot_be_written_fails_before_any_ct_is_read(world, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    monkeypatch.setattr(predict, "predict_locations", lambda *a, **k: pytest.fail("scored before --out was checked"))
    for out, expected in ((blocker / "scores.csv", f"{blocker} is a file, not a folder"), (tmp_path, "is a folder")):
        rc, stdout, err = run(capsys, "--checkpoint", str(world["checkpoint"]), "--out", str(out))
        assert rc == 2 and stdout == ""
        assert err.count("\n") == 1 and f"error: --out {out}: " in err and expected in err


def test_predict_locations_counts(world):
    model = world["model"]
    scorer = Scorer(model, torch.device("cpu"), None, channels_last=False)
    frame = world["candidates"][KEYS].iloc[:10].copy()
    frame.loc[3, "coordX"] += 10_000.0
    frame.loc[7, "seriesuid"] = UNKNOWN_UID
    probability, stats = predict_locations(scorer, world["root"], frame, batch_size=4, progress=False)
    assert np.isnan(probability[[3, 7]]).all() and np.isfinite(np.delete(probability, [3, 7])).all()
    assert (stats.rows, stats.scored, stats.outside, stats.not_on_disk, stats.not_on_disk_series) == (10, 8, 1, 1, 1)
    assert stats.cts == frame.loc[[0, 1, 2, 4, 5, 6, 8, 9], "seriesuid"].nunique()
    with pytest.raises(DataNotFoundError, match=UNKNOWN_UID):
        predict_locations(scorer, world["root"], frame, skip_missing_series=False, progress=False)


@pytest.fixture
def bad_files(world, tmp_path):
    no_class = tmp_path / "no_coordz.csv"
    world["candidates"][["seriesuid", "coordX", "coordY", "class"]].to_csv(no_class, index=False)
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("seriesuid,coordX,coordY,coordZ\n")
    other_arch = tmp_path / "other.pt"
    model = LunaModel(conv_channels=4)
    save_checkpoint(
        {"arch": arch_signature(model), "model": model.state_dict(), "config": TrainingConfig().to_dict()}, other_arch
    )
    return {"no_coordz": no_class, "header_only": header_only, "other_arch": other_arch}


@pytest.mark.parametrize(
    "case",
    [
        "missing_columns",
        "no_rows",
        "missing_csv",
        "unknown_series",
        "series_not_in_csv",
        "missing_checkpoint",
        "other_arch",
    ],
)
def test_bad_input_exits_2_with_one_clear_line(case, world, bad_files, tmp_path, capsys):
    ck = ["--checkpoint", str(world["checkpoint"])]
    lonely_uid = world["candidates"]["seriesuid"].iloc[0]
    only_other = tmp_path / "only_other.csv"
    world["candidates"][world["candidates"]["seriesuid"] != lonely_uid].to_csv(only_other, index=False)
    args, named = {
        "missing_columns": ([*ck, "--candidates", str(bad_files["no_coordz"])], "coordZ"),
        "no_rows": ([*ck, "--candidates", str(bad_files["header_only"])], str(bad_files["header_only"])),
        "missing_csv": ([*ck, "--candidates", str(tmp_path / "nope.csv")], str(tmp_path / "nope.csv")),
        "unknown_series": ([*ck, "--series", UNKNOWN_UID], UNKNOWN_UID),
        "series_not_in_csv": ([*ck, "--series", lonely_uid, "--candidates", str(only_other)], lonely_uid),
        "missing_checkpoint": (["--checkpoint", str(tmp_path / "nope.pt")], str(tmp_path / "nope.pt")),
        "other_arch": (
            ["--checkpoint", str(bad_files["other_arch"]), "--data-root", str(world["root"])],
            "architecture",
        ),
    }[case]
    out = tmp_path / "scores.csv"
    rc, stdout, err = run(capsys, *args, "--out", str(out))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m p2ch.predict: error: ")
    assert named in lines[0]
    assert stdout == "" and not out.exists()
