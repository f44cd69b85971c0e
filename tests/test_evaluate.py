"""`python -m p2ch.evaluate` end to end on a tiny synthetic LUNA16 set (CPU)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from p2ch import evaluate, vis
from p2ch.candidates import get_candidate_arrays, read_annotations, read_excluded
from p2ch.config import TrainingConfig
from p2ch.ct import Ct
from p2ch.datasets import split_candidates
from p2ch.metrics import FROC_FPS_PER_SCAN, froc
from p2ch.model import LunaModel, arch_signature

from conftest import make_model, write_checkpoint

SUBMISSION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
BOOTSTRAP = 200
PICTURES = 5
UNKNOWN_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.999999999999999999999"


@pytest.fixture(scope="module")
def world(tmp_path_factory, synth_set):
    """6 synthetic CTs, a checkpoint whose series split has val (with and without nodules) and test parts."""
    base = tmp_path_factory.mktemp("evaluate")
    root = synth_set(num_cts=6, size=96, slices=48, candidates_per_ct=40, nodules_per_ct=2, seed=11)
    config = TrainingConfig(data_root=str(root), cache_dir=str(base / "cache"), val_fraction=0.4, test_fraction=0.3)
    model = make_model()
    checkpoint = write_checkpoint(base / "models" / "p2ch" / "2025-01-01_00.00.00-test" / "best.pt", model, config)
    candidates = get_candidate_arrays(root)
    split = split_candidates(candidates, "series", val_fraction=0.4, test_fraction=0.3)
    annotations = read_annotations(root / "annotations.csv")
    per_series = annotations.groupby("seriesuid").size()
    val_nodules = [int(per_series.get(uid, 0)) for uid in split.val_series]
    # What the tests below rely on: val holds scans with and without nodules, and there is a test part.
    assert sum(val_nodules) >= 2 and min(val_nodules) == 0 and len(split.test) > 0
    return {
        "base": base,
        "root": root,
        "config": config,
        "model": model,
        "checkpoint": checkpoint,
        "candidates": candidates,
        "split": split,
        "annotations": annotations,
        "excluded": read_excluded(root / "annotations_excluded.csv"),
        "no_nodule_series": [u for u, n in zip(split.val_series, val_nodules, strict=True) if n == 0],
    }


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = evaluate.main([*args, "--log-level", "WARNING", "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as handle:
        header = handle.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def read_submission(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"seriesuid": str})


def strict_json(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def val_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("val_run") / "out"
    rc = evaluate.main(
        [
            "--checkpoint",
            str(world["checkpoint"]),
            "--out",
            str(out),
            "--bootstrap",
            str(BOOTSTRAP),
            "--pictures",
            str(PICTURES),
            "--batch-size",
            "16",
            "--log-level",
            "WARNING",
            "--no-progress",
        ]
    )
    assert rc == 0
    return {
        "out": out,
        "metrics": strict_json(out / "metrics.json"),
        "submission": read_submission(out / "submission.csv"),
    }


def _key_frame(candidates, rows) -> pd.DataFrame:
    xyz = candidates.center_xyz[rows]
    return pd.DataFrame(
        {
            "seriesuid": candidates.series_uids[candidates.series_index[rows]],
            "coordX": xyz[:, 0],
            "coordY": xyz[:, 1],
            "coordZ": xyz[:, 2],
        }
    )


def _sorted_keys(frame: pd.DataFrame) -> list[tuple]:
    return sorted(zip(frame["seriesuid"], frame["coordX"], frame["coordY"], frame["coordZ"], strict=True))


# ---------------------------------------------------------------------------------------------


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--checkpoint",
        "--models-dir",
        "--split",
        "--series",
        "--data-root",
        "--cache-dir",
        "--no-cache",
        "--batch-size",
        "--num-workers",
        "--device",
        "--amp",
        "--threshold",
        "--bootstrap",
        "--seed",
        "--out",
        "--pictures",
    ):
        assert flag in out


def test_val_run_writes_all_files(val_run):
    out = val_run["out"]
    for name in ("submission.csv", "metrics.json", "froc.png", "froc_curve.csv", "report.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert png_size(out / "froc.png") == (700, 500)
    assert list(val_run["submission"].columns) == SUBMISSION_COLUMNS


def test_submission_is_exactly_the_checkpoints_val_split(world, val_run):
    split, candidates = world["split"], world["candidates"]
    submission = val_run["submission"]
    assert len(submission) == len(split.val)
    assert _sorted_keys(submission) == _sorted_keys(_key_frame(candidates, split.val))
    assert sorted(submission["seriesuid"].unique()) == sorted(split.val_series)
    # The checkpoint's settings, not the training defaults (val_fraction 0.1), chose these series.
    selection = val_run["metrics"]["selection"]
    assert selection["split_settings"]["val_fraction"] == 0.4
    assert selection["split_settings"]["test_fraction"] == 0.3
    assert selection["series_in_training"] == 0
    assert not set(submission["seriesuid"]) & set(split.train_series)
    probability = submission["probability"].to_numpy()
    assert np.all((probability > 0) & (probability < 1)) and np.ptp(probability) > 0.01


def test_metrics_match_froc_recomputed_from_submission(world, val_run):
    metrics, submission = val_run["metrics"], val_run["submission"]
    val_series = list(world["split"].val_series)
    annotations = world["annotations"][world["annotations"]["seriesuid"].isin(val_series)]
    excluded = world["excluded"][world["excluded"]["seriesuid"].isin(val_series)]
    expected = froc(submission, annotations, excluded, series_uids=val_series, bootstrap=BOOTSTRAP, seed=0)
    got = metrics["froc"]
    assert got["cpm"] == pytest.approx(expected.cpm, abs=1e-12)
    assert metrics["cpm"] == got["cpm"]
    assert got["cpm_ci"] == pytest.approx(list(expected.cpm_ci), abs=1e-12)
    assert metrics["cpm_ci"] == got["cpm_ci"]
    assert list(got["sensitivities"]) == [f"{fp:g}" for fp in FROC_FPS_PER_SCAN]
    for fp in FROC_FPS_PER_SCAN:
        assert got["sensitivities"][f"{fp:g}"] == pytest.approx(expected.sensitivities[fp], abs=1e-12)
        assert got["sensitivities_ci"][f"{fp:g}"] == pytest.approx(list(expected.sensitivities_ci[fp]), abs=1e-12)
    assert got["cpm_ci"][0] <= got["cpm"] <= got["cpm_ci"][1]
    assert got["bootstrap"] == BOOTSTRAP
    counts = metrics["counts"]
    assert counts["scans"] == len(val_series) == got["num_scans"]
    assert counts["candidates"] == len(submission)
    assert counts["nodules"] == len(annotations) == got["num_nodules"]
    assert counts["positives"] == int(world["candidates"].is_nodule[world["split"].val].sum())
    assert counts["excluded_findings"] == len(excluded)
    curve = pd.read_csv(val_run["out"] / "froc_curve.csv")
    np.testing.assert_allclose(curve["fps_per_scan"], expected.fps_per_scan)
    np.testing.assert_allclose(curve["sensitivity"], expected.sensitivity)


def test_classification_metrics_by_hand(world, val_run):
    submission = val_run["submission"]
    candidates = world["candidates"]
    uids = candidates.series_uids[candidates.series_index]
    label_of = {
        (str(u), *xyz): bool(n)
        for u, xyz, n in zip(uids, candidates.center_xyz.tolist(), candidates.is_nodule, strict=True)
    }
    labels = np.array(
        [
            label_of[key]
            for key in zip(
                submission["seriesuid"], submission["coordX"], submission["coordY"], submission["coordZ"], strict=True
            )
        ]
    )
    prob = submission["probability"].to_numpy()
    pos, neg = prob[labels], prob[~labels]
    assert len(pos) and len(neg)
    auc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    cls = val_run["metrics"]["classification"]
    assert cls["auc"] == pytest.approx(auc, abs=1e-12)
    threshold = cls["threshold"]
    assert threshold == 0.5
    predicted = prob > threshold
    tp, fp = int((predicted & labels).sum()), int((predicted & ~labels).sum())
    fn, tn = int((~predicted & labels).sum()), int((~predicted & ~labels).sum())
    assert (cls["tp"], cls["fp"], cls["fn"], cls["tn"]) == (tp, fp, fn, tn)
    assert cls["recall"] == pytest.approx(tp / (tp + fn))
    assert cls["precision"] == (pytest.approx(tp / (tp + fp)) if tp + fp else None)


def test_checkpoint_identity_and_report(world, val_run):
    ck = val_run["metrics"]["checkpoint"]
    assert ck["path"] == str(world["checkpoint"].absolute())
    assert ck["sha1"] == hashlib.sha1(world["checkpoint"].read_bytes()).hexdigest()
    assert ck["epoch"] == 3 and ck["arch"] == arch_signature(LunaModel())
    assert val_run["metrics"]["selection"]["name"] == "val"
    workers = min(2, os.cpu_count() or 1)  # the CPU default
    assert val_run["metrics"]["device"] == {"name": "cpu", "amp": "off", "channels_last": True, "num_workers": workers}
    assert (val_run["out"] / "report.txt").read_text().count("\n") >= 5


def test_probabilities_are_the_models_on_the_ct_chunks(world, val_run):
    """Scores equal the model's output on chunks cropped straight from the CT (no cache involved)."""
    submission = val_run["submission"]
    rows = submission.iloc[::7]
    model = world["model"]
    for uid, group in rows.groupby("seriesuid"):
        ct = Ct(uid, world["root"])
        chunks, _ = ct.get_raw_candidates(group[["coordX", "coordY", "coordZ"]].to_numpy())
        with torch.no_grad():
            _, prob = model(torch.from_numpy(chunks).unsqueeze(1).float())
        np.testing.assert_allclose(group["probability"].to_numpy(), prob[:, 1].numpy(), rtol=0, atol=1e-6)


def test_pictures(world, val_run):
    from p2ch.metrics import match_predictions

    out = val_run["out"] / "pictures"
    submission = val_run["submission"]
    val_series = list(world["split"].val_series)
    annotations = world["annotations"][world["annotations"]["seriesuid"].isin(val_series)].reset_index(drop=True)
    excluded = world["excluded"][world["excluded"]["seriesuid"].isin(val_series)].reset_index(drop=True)
    match = match_predictions(submission, annotations, excluded)
    fp_prob = np.sort(submission["probability"].to_numpy()[match.is_false_positive])[::-1]
    best = match.nodule_probability
    missed = int((np.isnan(best) | (best <= 0.5)).sum())
    expected_fp, expected_missed = min(PICTURES, len(fp_prob)), min(PICTURES, missed)
    assert expected_fp == PICTURES and expected_missed >= 2

    index = pd.read_csv(out / "index.csv", dtype={"seriesuid": str})
    fps = index[index["kind"] == "false_positive"]
    assert len(fps) == expected_fp
    np.testing.assert_allclose(fps["probability"].to_numpy(), fp_prob[:expected_fp])
    assert list(fps["rank"]) == list(range(1, expected_fp + 1))
    assert len(index[index["kind"] == "missed_nodule"]) == expected_missed
    sheets = sorted(p.name for p in out.glob("*.png"))
    n_fp, n_missed = math.ceil(expected_fp / vis.SHEET_ROWS), math.ceil(expected_missed / vis.SHEET_ROWS)
    assert sheets == [f"false_positives_{k:02d}.png" for k in range(1, n_fp + 1)] + [
        f"missed_nodules_{k:02d}.png" for k in range(1, n_missed + 1)
    ]
    for sheet in sheets:
        assert png_size(out / sheet) == vis.sheet_size_px()
    assert set(index["sheet"]) == set(sheets)
    assert val_run["metrics"]["pictures"]["sheets"] == sheets
    assert val_run["metrics"]["pictures"]["missed_nodules_total"] == missed


def test_no_cache_scores_match_and_write_no_cache(world, val_run, tmp_path, capsys):
    uid = world["no_nodule_series"][0]
    cache = tmp_path / "never"
    out = tmp_path / "out"
    rc, _, err = run(
        capsys,
        "--checkpoint",
        str(world["checkpoint"]),
        "--series",
        uid,
        "--no-cache",
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        "--bootstrap",
        "0",
    )
    assert rc == 0, err
    assert not cache.exists()
    mine = read_submission(out / "submission.csv")
    theirs = val_run["submission"][val_run["submission"]["seriesuid"] == uid]
    merged = mine.merge(theirs, on=["seriesuid", "coordX", "coordY", "coordZ"], suffixes=("", "_cache"))
    assert len(merged) == len(mine) == len(theirs) == 40
    np.testing.assert_allclose(merged["probability"], merged["probability_cache"], rtol=0, atol=1e-6)


def test_scans_without_nodules_give_null_cpm(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run(
        capsys,
        "--checkpoint",
        str(world["checkpoint"]),
        "--series",
        *world["no_nodule_series"],
        "--out",
        str(out),
        "--bootstrap",
        "50",
    )
    assert rc == 0, err
    metrics = strict_json(out / "metrics.json")
    assert metrics["cpm"] is None and metrics["froc"]["cpm"] is None
    assert metrics["cpm_ci"] == [None, None]
    assert all(v is None for v in metrics["froc"]["sensitivities"].values())
    assert metrics["counts"]["nodules"] == 0 and metrics["counts"]["scans"] == len(world["no_nodule_series"])
    assert metrics["classification"]["auc"] is None  # no positive candidates either
    assert metrics["selection"]["name"] == "series"
    assert png_size(out / "froc.png") == (700, 500)
    assert stdout == (out / "report.txt").read_text()


def test_test_and_all_splits(world, val_run, tmp_path, capsys):
    split = world["split"]
    rc, _, err = run(
        capsys,
        "--checkpoint",
        str(world["checkpoint"]),
        "--split",
        "test",
        "--out",
        str(tmp_path / "test"),
        "--bootstrap",
        "0",
    )
    assert rc == 0, err
    submission = read_submission(tmp_path / "test" / "submission.csv")
    assert _sorted_keys(submission) == _sorted_keys(_key_frame(world["candidates"], split.test))
    metrics = strict_json(tmp_path / "test" / "metrics.json")
    assert metrics["selection"]["series_in_training"] == 0 and metrics["counts"]["scans"] == len(split.test_series)

    # A run folder as --checkpoint, and a DataLoader worker process reading the cache.
    rc, _, err = run(
        capsys,
        "--checkpoint",
        str(world["checkpoint"].parent),
        "--split",
        "all",
        "--out",
        str(tmp_path / "all"),
        "--bootstrap",
        "0",
        "--num-workers",
        "1",
    )
    assert rc == 0, err
    metrics = strict_json(tmp_path / "all" / "metrics.json")
    assert metrics["counts"]["candidates"] == len(world["candidates"]) and metrics["device"]["num_workers"] == 1
    assert metrics["selection"]["series_in_training"] == len(split.train_series) > 0
    everything = read_submission(tmp_path / "all" / "submission.csv")
    merged = val_run["submission"].merge(
        everything, on=["seriesuid", "coordX", "coordY", "coordZ"], suffixes=("", "_all")
    )
    assert len(merged) == len(val_run["submission"])
    np.testing.assert_allclose(merged["probability"], merged["probability_all"], rtol=0, atol=1e-6)


def test_default_checkpoint_and_out_dir(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(
        capsys,
        "--models-dir",
        str(world["base"] / "models"),
        "--series",
        world["no_nodule_series"][0],
        "--bootstrap",
        "0",
    )
    assert rc == 0, err
    (out,) = (tmp_path / "data-unversioned" / "eval").iterdir()
    assert out.name.startswith("2025-01-01_00.00.00-test-best-series-")
    assert strict_json(out / "metrics.json")["checkpoint"]["path"] == str(world["checkpoint"].absolute())


@pytest.fixture
def bad_checkpoints(world, tmp_path):
    other = "LunaModel-v0:0123456789abcdef"  # an architecture this p2ch does not build
    paths = {
        "other_arch": write_checkpoint(tmp_path / "other.pt", world["model"], world["config"], arch=other),
        "no_test_part": write_checkpoint(
            tmp_path / "no_test.pt", world["model"], TrainingConfig(data_root=str(world["root"]), val_fraction=0.4)
        ),
        "garbage": tmp_path / "garbage.pt",
    }
    paths["garbage"].write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty_models").mkdir()
    return paths


@pytest.mark.parametrize(
    "case",
    [
        "missing_file",
        "no_checkpoint_found",
        "other_arch",
        "garbage",
        "unknown_series",
        "bad_uid",
        "empty_split",
        "bad_threshold",
        "nan_threshold",
        "inf_confidence",
        "bad_batch_size",
    ],
)
def test_bad_input_exits_2_with_one_clear_line(case, world, bad_checkpoints, tmp_path, capsys):
    checkpoint = str(world["checkpoint"])
    args, names = {
        "missing_file": (["--checkpoint", str(tmp_path / "nope.pt")], str(tmp_path / "nope.pt")),
        "no_checkpoint_found": (["--models-dir", str(tmp_path / "empty_models")], str(tmp_path / "empty_models")),
        "other_arch": (["--checkpoint", str(bad_checkpoints["other_arch"])], "architecture"),
        "garbage": (["--checkpoint", str(bad_checkpoints["garbage"])], str(bad_checkpoints["garbage"])),
        "unknown_series": (["--checkpoint", checkpoint, "--series", UNKNOWN_UID], UNKNOWN_UID),
        "bad_uid": (["--checkpoint", checkpoint, "--series", "not-a-uid"], "not-a-uid"),
        "empty_split": (["--checkpoint", str(bad_checkpoints["no_test_part"]), "--split", "test"], "--split test"),
        "bad_threshold": (["--checkpoint", checkpoint, "--threshold", "1.5"], "1.5"),
        "nan_threshold": (["--checkpoint", checkpoint, "--threshold", "nan"], "--threshold must be a finite number"),
        "inf_confidence": (["--checkpoint", checkpoint, "--confidence", "inf"], "--confidence must be a finite"),
        "bad_batch_size": (["--checkpoint", checkpoint, "--batch-size", "0"], "--batch-size"),
    }[case]
    out = tmp_path / "out"
    rc, _, err = run(capsys, *args, "--out", str(out))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m p2ch.evaluate: error: ")
    assert names in lines[0]
    assert not (out / "metrics.json").exists()


def test_out_that_is_a_file_fails_before_scoring(world, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where --out wants a folder")
    cache = tmp_path / "cache"
    rc, _, err = run(
        capsys, "--checkpoint", str(world["checkpoint"]), "--out", str(blocker / "eval"), "--cache-dir", str(cache)
    )
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m p2ch.evaluate: error: ") and str(blocker) in lines[0]
    assert not cache.exists()  # refused before the first chunk was read or cached
    assert blocker.read_text() == "a file where --out wants a folder"


@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_an_unwritable_output_location_fails_before_scoring(world, tmp_path, capsys, monkeypatch, flag):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    # Root may write anywhere, so the refusal of the file system is simulated for this folder.
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != ro and real_access(p, mode, **k))
    monkeypatch.setattr(evaluate, "fill_missing", lambda *a, **k: pytest.fail("scored before the outputs were checked"))
    for bad, expected in ((blocker / "x", f"{blocker} is a file, not a folder"), (ro / "x", f"the folder {ro} is not")):
        paths = {"--out": str(tmp_path / "out"), "--cache-dir": str(tmp_path / "cache"), flag: str(bad)}
        rc, _, err = run(capsys, "--checkpoint", str(world["checkpoint"]), *[v for pair in paths.items() for v in pair])
        assert rc == 2
        assert err.count("\n") == 1 and f"error: {flag} {bad}: {expected}" in err


@pytest.mark.parametrize("source", ["cache", "cts"])
def test_a_candidate_outside_its_ct_names_the_csv_line(world, tmp_path, capsys, source):
    import shutil

    root = tmp_path / "luna"
    shutil.copytree(world["root"], root)
    uid = str(world["split"].val_series[0])
    with open(root / "candidates.csv") as handle:
        lines = handle.read().splitlines()
    row = next(line for line in lines[1:] if line.startswith(uid)).split(",")
    row[3] = "5000.0"  # coordZ far above the CT
    lines.insert(4, ",".join(row))  # file line 5 (the header is line 1)
    (root / "candidates.csv").write_text("\n".join(lines) + "\n")
    more = ["--no-cache"] if source == "cts" else ["--cache-dir", str(tmp_path / "cache"), "--num-workers", "1"]
    rc, _, err = run(
        capsys, "--checkpoint", str(world["checkpoint"]), "--data-root", str(root), "--out", str(tmp_path / "o"), *more
    )
    assert rc == 2
    x, y = (round(float(v), 2) for v in row[1:3])
    assert (
        err.count("\n") == 1
        and f"error: {root / 'candidates.csv'}: line 5: candidate centre ({x}, {y}, 5000.0) mm" in err
    )
    assert f"lies outside CT {uid}" in err and "np.float64" not in err


def test_sigterm_while_scoring_exits_143_and_writes_no_metrics(world, tmp_path, capsys, monkeypatch):
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal arrives first

    monkeypatch.setattr(evaluate, "score_from_cache", terminated)
    out = tmp_path / "out"
    rc, _, err = run(capsys, "--checkpoint", str(world["checkpoint"]), "--out", str(out))
    assert rc == 143
    assert err == "python -m p2ch.evaluate: terminated (SIGTERM); the output folder may hold files of an earlier run\n"
    assert not (out / "metrics.json").exists()


def test_cpm_equals_what_training_logged(synth_set, tmp_path, capsys):
    """A real training run's best.pt: evaluating its val split reproduces the CPM it was selected by."""
    from p2ch import training
    from p2ch.checkpoint import load_checkpoint

    root = synth_set(num_cts=4, size=96, slices=48, candidates_per_ct=40, nodules_per_ct=2, seed=11)
    rc = training.main(
        [
            "--data-root",
            str(root),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--checkpoint-dir",
            str(tmp_path / "models"),
            "--epochs",
            "1",
            "--max-train-batches",
            "2",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--val-fraction",
            "0.5",
            "--images-every",
            "0",
            "--log-level",
            "WARNING",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    (best,) = (tmp_path / "models").rglob("best.pt")
    state = load_checkpoint(best)
    assert state["selected_by"] == "cpm"  # the val split of this set has nodules
    rc, _, err = run(
        capsys,
        "--models-dir",
        str(tmp_path / "models"),
        "--out",
        str(tmp_path / "out"),
        "--bootstrap",
        "0",
        "--batch-size",
        "8",
    )
    assert rc == 0, err
    metrics = strict_json(tmp_path / "out" / "metrics.json")
    assert metrics["froc"]["cpm"] == pytest.approx(state["best_metric"], abs=1e-9)
    assert metrics["data"]["cache_dir"] == str((tmp_path / "cache").absolute())
    assert metrics["counts"]["chunks_cached_now"] == 0  # training's validation filled the cache


@pytest.mark.gpu
def test_gpu_bf16_scores_close_to_cpu(world, val_run, tmp_path, capsys):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rc, _, err = run(
        capsys,
        "--checkpoint",
        str(world["checkpoint"]),
        "--device",
        "cuda",
        "--amp",
        "bf16",
        "--out",
        str(tmp_path / "gpu"),
        "--bootstrap",
        "0",
    )
    assert rc == 0, err
    gpu = read_submission(tmp_path / "gpu" / "submission.csv")
    merged = gpu.merge(val_run["submission"], on=["seriesuid", "coordX", "coordY", "coordZ"], suffixes=("", "_cpu"))
    assert len(merged) == len(gpu) == len(val_run["submission"])
    np.testing.assert_allclose(merged["probability"], merged["probability_cpu"], rtol=0, atol=0.02)
    assert strict_json(tmp_path / "gpu" / "metrics.json")["device"]["amp"] == "bfloat16"


def test_the_cache_is_filled_in_as_many_processes_as_the_loader_has_workers(world, tmp_path, capsys, monkeypatch):
    real, asked = evaluate.fill_missing, []

    def fill(*args, num_workers=0, **kwargs):
        asked.append(num_workers)
        return real(*args, num_workers=0, **kwargs)  # the fill itself in this process: tested in test_prepcache

    monkeypatch.setattr(evaluate, "fill_missing", fill)
    # Scoring is beside the point here (and 12 DataLoader workers would take seconds to start).
    monkeypatch.setattr(
        evaluate, "score_from_cache", lambda scorer, candidates, indices, *a, **k: np.linspace(0, 1, len(indices))
    )
    for workers in ("3", "12"):
        rc, _, err = run(
            capsys, "--checkpoint", str(world["checkpoint"]), "--out", str(tmp_path / workers),
            "--cache-dir", str(tmp_path / "cache"), "--num-workers", workers,
        )  # fmt: skip
        assert rc == 0, err
    assert asked == [3, 8]  # at most 8 processes, each holding one CT
