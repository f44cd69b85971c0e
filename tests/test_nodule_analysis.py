"""python -m p2ch.nodule_analysis end to end on tiny synthetic CTs (CPU).

Most tests replace the segmentation step by the synthetic set's true nodule masks (`synth --masks`),
so everything after it — components, centres in mm, classification, malignancy, outputs, FROC and
the confusion matrix — is checked against known nodules; one test runs a real (untrained) UNet.
"""

from __future__ import annotations

import html.parser
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from p2ch import nodule_analysis, runtime
from p2ch.candidates import read_candidates
from p2ch.checkpoint import save_checkpoint
from p2ch.config import SegTrainingConfig, TrainingConfig
from p2ch.datasets import split_series
from p2ch.luna import series_index
from p2ch.metrics import match_predictions
from p2ch.unet import SkipSplitUpBlock, UNetWrapper, unet_signature

from conftest import chest_phantom, make_model, write_checkpoint, write_ct

SETTINGS = {"num_cts": 3, "size": 96, "slices": 48, "candidates_per_ct": 20, "nodules_per_ct": 3, "seed": 12}


@pytest.fixture(scope="module")
def root(synth_set) -> Path:
    return synth_set(masks=True, **SETTINGS)


def _seg_model() -> tuple[UNetWrapper, SegTrainingConfig]:
    config = SegTrainingConfig(context_slices=1, depth=2, wf=2)
    model = UNetWrapper(in_channels=3, n_classes=1, depth=2, wf=2, padding=True, batch_norm=True, up_mode="upconv")
    return model, config


@pytest.fixture(scope="module")
def models(root, tmp_path_factory) -> Path:
    """A models folder with one checkpoint of each kind (untrained weights)."""
    folder = tmp_path_factory.mktemp("models")
    seg, seg_config = _seg_model()
    (folder / "seg").mkdir()
    save_checkpoint(
        {"arch": unet_signature(seg), "task": "segmentation", "model": seg.state_dict(),
         "config": seg_config.to_dict(), "epoch": 1},
        folder / "seg" / "best.pt",
    )  # fmt: skip
    config = TrainingConfig(data_root=str(root), val_fraction=0.5)
    for name, task, seed in (("nod", "nodule", 0), ("mal", "malignancy", 1)):
        (folder / name).mkdir()
        task_config = TrainingConfig(**{**config.__dict__, "task": task})
        write_checkpoint(folder / name / "best.pt", make_model(seed), task_config)
    return folder


def _true_segmentation(root: Path):
    """A stand-in for segment_ct: P = 1 on the synthetic set's true nodule voxels."""

    def segment(model, ct, **kwargs):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "masks" / f"{ct.series_uid}.mhd")))
        assert mask.shape == ct.hu.shape
        return (mask > 0).astype(np.float16)

    return segment


def _annotations(root: Path, uid: str) -> pd.DataFrame:
    ann = pd.read_csv(root / "annotations.csv", dtype={"seriesuid": str})
    return ann[ann["seriesuid"] == uid].reset_index(drop=True)


def _uids_with_nodules(root: Path) -> list[str]:
    ann = pd.read_csv(root / "annotations.csv", dtype={"seriesuid": str})
    return sorted(ann["seriesuid"].unique())


def _argv(models: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--models-dir", str(models), "--data-root", str(root), "--out", str(out), "--no-progress",
        "--log-level", "WARNING", "--bootstrap", "50", "--runs-dir", str(out / "runs"), *extra,
    ]  # fmt: skip


def test_help_names_the_books_flags(capsys):
    with pytest.raises(SystemExit):
        nodule_analysis.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--run-validation", "--include-train", "--segmentation-path", "--classification-path",
                 "--malignancy-path", "--batch-size", "--num-workers", "--tb-prefix", "--dicom-series",
                 "--write-candidates", "--min-diameter-mm", "--max-diameter-mm"):  # fmt: skip
        assert flag in out, flag


def test_one_series_finds_its_nodules_with_probabilities(root, models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nodule_analysis, "segment_ct", _true_segmentation(root))
    uid = _uids_with_nodules(root)[0]
    out = tmp_path / "out"
    assert nodule_analysis.main([uid, *_argv(models, root, out, "--nodule-threshold", "0")]) == 0
    folder = out / uid
    components = pd.read_csv(folder / "components.csv", dtype={"seriesuid": str})
    nodules = pd.read_csv(folder / "nodules.csv", dtype={"seriesuid": str})
    ann = _annotations(root, uid)
    kept = components[components["kept"]]
    match = match_predictions(
        kept.assign(probability=kept["p_nodule"])[[*list(nodule_analysis.LOCATION_COLUMNS), "probability"]], ann
    )
    assert match.is_detected.all(), "every true nodule yields a component whose centre lies within its radius"
    assert np.isfinite(kept["p_nodule"]).all() and np.isfinite(kept["p_malignant"]).all()
    assert list(nodules.columns) == list(nodule_analysis.NODULE_COLUMNS)
    assert len(nodules) == len(kept) and nodules["p_nodule"].is_monotonic_decreasing
    # the estimated diameter of each nodule's component is close to its annotated one
    hit_rows = np.flatnonzero(match.is_hit)
    diameters = ann["diameter_mm"].to_numpy()[match.nodule_index[hit_rows]]
    np.testing.assert_allclose(kept["diameter_mm"].to_numpy()[hit_rows], diameters, rtol=0.35)
    summary = json.loads((folder / "analysis.json").read_text())
    assert set(summary["seconds"]) == set(nodule_analysis.STEPS)
    assert summary["models"]["segmentation"]["path"].endswith("seg/best.pt")
    assert summary["models"]["malignancy"]["path"].endswith("mal/best.pt")
    assert summary["pictures"] and (folder / summary["pictures"][0]).read_bytes()[:4] == b"\x89PNG"
    assert f"{uid}: {len(nodules)} nodule(s)" in capsys.readouterr().out


def test_threshold_leaves_malignancy_to_likely_nodules(root, models, tmp_path, monkeypatch):
    monkeypatch.setattr(nodule_analysis, "segment_ct", _true_segmentation(root))
    uid = _uids_with_nodules(root)[0]
    out = tmp_path / "out"
    assert nodule_analysis.main([uid, *_argv(models, root, out, "--nodule-threshold", "0.5", "--no-pictures")]) == 0
    components = pd.read_csv(out / uid / "components.csv")
    likely = components["p_nodule"] > 0.5
    assert np.isfinite(components.loc[likely, "p_malignant"]).all()
    assert components.loc[~likely, "p_malignant"].isna().all()
    assert not list((out / uid).glob("*.png"))


def test_a_malignancy_model_fine_tuned_from_the_nodule_model_shares_its_early_stages(
    root, models, tmp_path, monkeypatch, caplog
):
    """The book's chapter-14 recipe (--finetune --finetune-depth 2) leaves tail_batchnorm … block3 as the nodule
    classifier's: nodule_analysis computes them once, and p_malignant is what the model alone gives."""
    monkeypatch.setattr(nodule_analysis, "segment_ct", _true_segmentation(root))
    folder = tmp_path / "models"
    shutil.copytree(models / "seg", folder / "seg")
    shutil.copytree(models / "nod", folder / "nod")
    malignancy = make_model(0)  # the nodule model's weights (seed 0), block4 and head fine-tuned
    with torch.no_grad():
        for param in [*malignancy.block4.parameters(), *malignancy.head_linear.parameters()]:
            param.add_(torch.randn_like(param) * param.std())
    config = TrainingConfig(data_root=str(root), val_fraction=0.5, task="malignancy")
    write_checkpoint(folder / "mal" / "best.pt", malignancy, config)
    uid = _uids_with_nodules(root)[0]
    argv = [uid, *_argv(folder, root, tmp_path / "all", "--nodule-threshold", "0", "--no-pictures")]
    assert nodule_analysis.main(argv) == 0
    threshold = f"{pd.read_csv(tmp_path / 'all' / uid / 'components.csv')['p_nodule'].median():.6f}"
    results = {}
    for label in ("shared", "alone"):
        if label == "alone":
            monkeypatch.setattr(nodule_analysis, "shared_stages", lambda first, second: 0)
        out = tmp_path / label
        caplog.clear()
        with caplog.at_level("INFO", logger="p2ch.nodule_analysis"):
            argv = _argv(folder, root, out, "--nodule-threshold", threshold, "--no-pictures", "--log-level", "INFO")
            assert nodule_analysis.main([uid, *argv]) == 0
        said = "shares tail_batchnorm, block1, block2, block3 with the nodule classifier" in caplog.text
        assert said == (label == "shared")
        results[label] = pd.read_csv(out / uid / "components.csv")
    shared, alone = results["shared"], results["alone"]
    likely = shared["p_nodule"] > float(threshold)
    assert 0 < likely.sum() < shared["kept"].sum(), "some kept components are below the threshold"
    np.testing.assert_array_equal(shared["p_nodule"], alone["p_nodule"])
    np.testing.assert_allclose(shared["p_malignant"], alone["p_malignant"], rtol=1e-5, equal_nan=True)
    assert np.isfinite(shared.loc[likely, "p_malignant"]).all() and shared.loc[~likely, "p_malignant"].isna().all()
    assert not np.allclose(shared.loc[likely, "p_malignant"], shared.loc[likely, "p_nodule"])


def test_run_validation_scores_the_detector(root, models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nodule_analysis, "segment_ct", _true_segmentation(root))
    out = tmp_path / "out"
    argv = _argv(models, root, out, "--run-validation", "--include-train", "--nodule-threshold", "0", "--no-pictures")
    assert nodule_analysis.main(argv) == 0
    printed = capsys.readouterr().out
    assert "validation:" in printed and "train:" in printed and "complete miss" in printed
    for part in ("validation", "train"):
        metrics = json.loads((out / part / "metrics.json").read_text())
        froc = metrics["froc"]
        assert froc["num_detected"] == froc["num_nodules"], "true masks find every nodule"
        point = metrics["operating_point"]
        assert point["threshold"] == 0 and point["nodules_detected"] == froc["num_nodules"]
        assert point["false_positives"] == froc["num_false_positives"]
        assert f"at --nodule-threshold 0: {froc['num_nodules']} of {froc['num_nodules']} nodules found" in printed
        suggested = metrics["suggested_threshold"]
        assert suggested["fps_per_nodule"] <= 1 and 0 < suggested["threshold"] < 1
        assert "suggested (the most nodules at ≤ 1 false positive per true nodule): at --nodule-threshold " in printed
        confusion = metrics["confusion"]
        rated = confusion["benign"] | confusion["malignant"]
        assert sum(confusion["benign"].values()) + sum(confusion["malignant"].values()) == froc["num_nodules"]
        assert confusion["benign"]["complete miss"] == confusion["malignant"]["complete miss"] == 0
        assert rated
        submission = pd.read_csv(out / part / "submission.csv")
        assert list(submission.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
        assert (out / part / "froc.png").is_file() and (out / part / "confusion.csv").is_file()
    events = list((out / "runs" / "p2ch").glob("*-val_analysis-analysis/events.out.tfevents.*"))
    assert events
    page = ReportPage.parse(out / "report.html")
    assert {"validation/froc.png", "train/froc.png", "validation/metrics.json"} <= page.links
    assert all((out / link).is_file() for link in page.links)
    for part in ("validation", "train"):
        confusion = json.loads((out / part / "metrics.json").read_text())["confusion"]
        header, *rows = page.confusion[part]
        for row in rows:
            shown = {column: cell for column, cell in zip(header[1:], row[1:], strict=True) if cell != "–"}
            assert shown == {c: str(confusion[row[0]][c]) for c in shown}, (part, row)
        assert [r[0] for r in rows][:3] == ["non-nodule", "benign", "malignant"]
        uids = {u for u in page.rows if (out / part / u).is_dir()}
        assert uids == {d.name for d in (out / part).iterdir() if d.is_dir()}, "every analysed CT is in the report"


def test_write_candidates_is_a_luna16_candidates_file(root, models, tmp_path, monkeypatch):
    monkeypatch.setattr(nodule_analysis, "segment_ct", _true_segmentation(root))
    uids = _uids_with_nodules(root)
    out = tmp_path / "out"
    assert nodule_analysis.main([",".join(uids), *_argv(models, root, out, "--write-candidates", "--no-pictures")]) == 0
    candidates = read_candidates(out / "candidates.csv")
    assert set(candidates["seriesuid"]) <= set(uids)
    annotations = pd.read_csv(root / "annotations.csv", dtype={"seriesuid": str})
    assert candidates["class"].sum() >= len(annotations[annotations["seriesuid"].isin(uids)])


def test_mhd_path_and_dicom_folder_inputs(root, models, tmp_path, monkeypatch):
    from test_dicom import write_dicom_series

    from p2ch.ct import Ct

    monkeypatch.setattr(nodule_analysis, "segment_ct", _true_segmentation(root))
    uid = _uids_with_nodules(root)[0]
    source = Ct(uid, root)
    elsewhere = tmp_path / "scans"
    elsewhere.mkdir()
    for suffix in (".mhd", ".raw"):
        shutil.copy(source.mhd_path.with_suffix(suffix), elsewhere / f"{uid}{suffix}")
    write_dicom_series(
        tmp_path / "dicom", source.hu, spacing_xyz=source.voxel_size_xyz, origin_xyz=source.origin_xyz,
        direction=source.direction, series_uid=uid,
    )  # fmt: skip
    for spec, name in ((elsewhere / f"{uid}.mhd", "mhd"), (tmp_path / "dicom", "dicom")):
        out = tmp_path / name
        assert nodule_analysis.main([str(spec), *_argv(models, root, out, "--no-pictures")]) == 0
        components = pd.read_csv(out / uid / "components.csv", dtype={"seriesuid": str})
        kept = components[components["kept"]]
        scored = kept[list(nodule_analysis.LOCATION_COLUMNS)].assign(probability=kept["p_nodule"])
        assert match_predictions(scored, _annotations(root, uid)).is_detected.all(), name


def test_oblique_ct_centres_land_on_the_nodules(synth_set, models, tmp_path, monkeypatch):
    oblique = synth_set(masks=True, direction="oblique", **SETTINGS)
    monkeypatch.setattr(nodule_analysis, "segment_ct", _true_segmentation(oblique))
    uid = _uids_with_nodules(oblique)[0]
    out = tmp_path / "out"
    assert nodule_analysis.main([uid, *_argv(models, oblique, out, "--no-pictures")]) == 0
    kept = pd.read_csv(out / uid / "components.csv", dtype={"seriesuid": str}).query("kept")
    scored = kept[list(nodule_analysis.LOCATION_COLUMNS)].assign(probability=kept["p_nodule"])
    assert match_predictions(scored, _annotations(oblique, uid)).is_detected.all()


def test_real_unet_on_a_ct_without_lungs(models, tmp_path):
    """No lungs in view (soft tissue only): the untrained UNet runs end to end; no crash, sane files."""
    data = tmp_path / "luna"
    uid = "1.2.840.99.1"
    write_ct(data, uid, np.full((20, 40, 44), 40, dtype=np.int16))
    out = tmp_path / "out"
    argv = [str(data / "subset0" / f"{uid}.mhd"), *_argv(models, data, out, "--no-pictures", "--batch-size", "4")]
    assert nodule_analysis.main(argv) == 0
    summary = json.loads((out / uid / "analysis.json").read_text())
    assert summary["ct"]["shape_irc"] == [20, 40, 44]
    assert summary["counts"]["nodules"] <= summary["counts"]["kept_by_size"] <= summary["counts"]["components"]


@pytest.mark.parametrize(
    ("flag", "kind", "expected"),
    [
        ("--segmentation-path", "nod", "this is a nodule model"),
        ("--classification-path", "seg", "this is a segmentation model"),
        ("--classification-path", "mal", "this is a malignancy model"),
        ("--malignancy-path", "nod", "this is a nodule model"),
    ],
)
def test_model_of_the_wrong_kind_is_one_line(root, models, tmp_path, capsys, flag, kind, expected):
    uid = _uids_with_nodules(root)[0]
    argv = [uid, *_argv(models, root, tmp_path / "out"), flag, str(models / kind / "best.pt")]
    assert nodule_analysis.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_inputs_are_one_line(root, models, tmp_path, capsys):
    cases = [
        ([], "nothing to analyse"),
        (["1.2.3.4.5"], "1.2.3.4.5"),
        ([str(tmp_path)], "DICOM"),
        (["--include-train", "1.2.3"], "--include-train goes with --run-validation"),
    ]
    for inputs, expected in cases:
        assert nodule_analysis.main([*inputs, *_argv(models, root, tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (inputs, err)
    empty = tmp_path / "empty-models"
    empty.mkdir()
    assert nodule_analysis.main(["1.2.3", *_argv(empty, root, tmp_path / "out")]) == 2
    assert "no best.pt of a segmentation model" in capsys.readouterr().err


def test_dicom_folder_with_two_series_asks_for_one(root, models, tmp_path, capsys):
    from test_dicom import write_dicom_series

    hu = np.full((4, 16, 16), -800, dtype=np.int16)
    write_dicom_series(tmp_path / "two", hu, series_uid="1.2.826.0.1.1", names=[f"a{k}.dcm" for k in range(4)])
    write_dicom_series(tmp_path / "two", hu, series_uid="1.2.826.0.1.2", names=[f"b{k}.dcm" for k in range(4)])
    assert nodule_analysis.main([str(tmp_path / "two"), *_argv(models, root, tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "1.2.826.0.1.1" in err and "1.2.826.0.1.2" in err and "--dicom-series" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-diameter-mm", "inf"], "--max-diameter-mm must be a finite number"),
        (["--nodule-threshold", "nan"], "--nodule-threshold must be a finite number"),
    ],
)
def test_non_finite_flags_are_refused(root, models, tmp_path, capsys, flags, expected):
    uid = _uids_with_nodules(root)[0]
    assert nodule_analysis.main([uid, *_argv(models, root, tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_out_that_is_a_file_is_refused_before_any_model_loads(root, models, tmp_path, capsys, monkeypatch):
    uid = _uids_with_nodules(root)[0]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setattr(
        nodule_analysis, "load_models", lambda config: pytest.fail("models loaded before --out was checked")
    )
    assert nodule_analysis.main([uid, *_argv(models, root, blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'out'}: {blocker} is a file, not a folder" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# results where viewers read them: label maps, positions, NIfTI/NRRD inputs, several series, report.html


def _centres_mm(label_image: sitk.Image) -> dict[int, np.ndarray]:
    """{label: centre of its voxels, in mm by SimpleITK's own transform of the label image}: a candidate's centre
    is the probability-weighted one, and the stand-in segmentation's probability is 1 on every nodule voxel."""
    labels = sitk.GetArrayFromImage(label_image)
    centres = {}
    for k in np.unique(labels[labels > 0]).tolist():
        irc = np.argwhere(labels == k).mean(axis=0)
        centres[k] = np.array(label_image.TransformContinuousIndexToPhysicalPoint(tuple(irc[::-1].tolist())))
    return centres


def test_dicom_ct_gets_a_label_map_and_a_ct_on_its_grid_and_slice_references(
    synth_set, models, tmp_path, monkeypatch
):  # fmt: skip
    from test_dicom import write_dicom_series

    from p2ch.ct import Ct

    oblique = synth_set(masks=True, direction="oblique", **SETTINGS)
    monkeypatch.setattr(nodule_analysis, "segment_ct", _true_segmentation(oblique))
    uid = _uids_with_nodules(oblique)[0]
    source = Ct(uid, oblique)
    write_dicom_series(
        tmp_path / "dicom", source.hu, spacing_xyz=source.voxel_size_xyz, origin_xyz=source.origin_xyz,
        direction=source.direction, series_uid=uid,
    )  # fmt: skip
    out = tmp_path / "out"
    assert nodule_analysis.main([str(tmp_path / "dicom"), *_argv(models, oblique, out, "--nodule-threshold", "0")]) == 0
    folder = out / uid
    nodules = pd.read_csv(folder / "nodules.csv", dtype={"seriesuid": str, "sop_instance_uid": str})
    assert list(nodules.columns[:7]) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "p_nodule",
                                         "p_malignant"]  # fmt: skip
    assert len(nodules) >= 2 and nodules["label"].tolist() == list(range(1, len(nodules) + 1))
    mask = sitk.ReadImage(str(folder / "nodules_mask.nii.gz"))
    ct_image = sitk.ReadImage(str(folder / "ct.nii.gz"))
    for image in (mask, ct_image):
        assert image.GetSize() == source.hu.shape[::-1]
        np.testing.assert_allclose(image.GetSpacing(), source.voxel_size_xyz, rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), source.origin_xyz, atol=1e-3)
        np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), source.direction, atol=1e-5)
    assert mask.GetPixelID() == sitk.sitkUInt8
    hu = sitk.GetArrayFromImage(ct_image)
    np.testing.assert_array_equal(hu, source.hu)
    centres = _centres_mm(mask)
    assert sorted(centres) == nodules["label"].tolist()
    for row in nodules.itertuples(index=False):
        np.testing.assert_allclose(centres[row.label], (row.coordX, row.coordY, row.coordZ), atol=2e-3)
        continuous = ct_image.TransformPhysicalPointToContinuousIndex((row.coordX, row.coordY, row.coordZ))
        assert (row.voxel_index, row.voxel_row, row.voxel_col) == tuple(round(v) for v in continuous[::-1])
        assert row.slice_number == row.voxel_index + 1
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(tmp_path / "dicom" / row.dicom_file))
        reader.ReadImageInformation()
        assert int(reader.GetMetaData("0020|0013")) == row.instance_number
        assert reader.GetMetaData("0008|0018").strip(" \0") == row.sop_instance_uid
        position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
        assert round(ct_image.TransformPhysicalPointToContinuousIndex(position)[2]) == row.voxel_index
    components = pd.read_csv(folder / "components.csv", dtype={"seriesuid": str})
    labelled = components[components["label"] > 0].sort_values("label")
    assert labelled["voxels"].tolist() == [int((sitk.GetArrayFromImage(mask) == k).sum()) for k in centres]
    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["source_kind"] == "DICOM" and summary["files"]["label_map"] == "nodules_mask.nii.gz"


def test_oblique_nifti_input_with_mhd_label_maps_and_the_probability(synth_set, models, tmp_path, monkeypatch):
    from p2ch.ct import Ct

    root = synth_set(masks=True, direction="oblique", **SETTINGS)
    monkeypatch.setattr(nodule_analysis, "segment_ct", _true_segmentation(root))
    uid = _uids_with_nodules(root)[0]
    source = Ct(uid, root)
    sitk.WriteImage(sitk.ReadImage(str(source.mhd_path)), str(tmp_path / f"{uid}.nii.gz"))
    out = tmp_path / "out"
    (out / uid).mkdir(parents=True)
    (out / uid / "nodules_mask.nii.gz").write_bytes(b"an earlier run's label map")
    argv = [str(tmp_path / f"{uid}.nii.gz"), *_argv(models, root, out, "--nodule-threshold", "0", "--no-pictures",
            "--mask-format", "mhd", "--write-probability")]  # fmt: skip
    assert nodule_analysis.main(argv) == 0
    folder = out / uid
    kept = pd.read_csv(folder / "components.csv", dtype={"seriesuid": str}).query("kept")
    scored = kept[list(nodule_analysis.LOCATION_COLUMNS)].assign(probability=kept["p_nodule"])
    assert match_predictions(scored, _annotations(root, uid)).is_detected.all(), "mm survive NIfTI's RAS"
    assert kept["instance_number"].isna().all() and kept["dicom_file"].isna().all()
    assert {p.name for p in folder.iterdir()} >= {"nodules_mask.mhd", "nodules_mask.zraw", "nodules_probability.mhd"}
    assert not list(folder.glob("ct.*")), "the CT itself is written for DICOM inputs only"
    assert not (folder / "nodules_mask.nii.gz").exists(), "an earlier run's volume in another format is removed"
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "masks" / f"{uid}.mhd"))) > 0
    probability = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "nodules_probability.mhd")))
    np.testing.assert_array_equal(probability, np.where(truth, 255, 0))
    given, mask = sitk.ReadImage(str(tmp_path / f"{uid}.nii.gz")), sitk.ReadImage(str(folder / "nodules_mask.mhd"))
    assert not np.allclose(np.reshape(given.GetDirection(), (3, 3)), np.eye(3)) and mask.GetSize() == given.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), given.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetSpacing(), given.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetDirection(), given.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(mask)
    assert set(np.unique(labels).tolist()) == {0, *range(1, len(kept) + 1)} and not labels[~truth].any()


def test_dicom_series_all_analyses_each_ct_volume(root, models, tmp_path, monkeypatch, capsys):
    from test_dicom import write_dicom_series

    monkeypatch.setattr(nodule_analysis, "segment_ct", lambda model, ct, **kw: np.zeros(ct.hu.shape, np.float16))
    hu = np.full((4, 16, 16), -800, dtype=np.int16)
    folder = tmp_path / "study"
    write_dicom_series(folder, hu, series_uid="1.2.826.0.1.1", names=[f"a{k}.dcm" for k in range(4)])
    write_dicom_series(folder, hu, series_uid="1.2.826.0.1.2", names=[f"b{k}.dcm" for k in range(4)])
    write_dicom_series(folder, hu, series_uid="1.2.826.0.1.3", modality="MR", names=[f"m{k}.dcm" for k in range(4)])
    write_dicom_series(folder, hu, series_uid="1.2.826.0.1.4", names=[f"c{k}.dcm" for k in range(4)],
                       index_z=[0, 1, 2, 4])  # fmt: skip
    out = tmp_path / "out"
    assert nodule_analysis.main([str(folder), *_argv(models, root, out, "--dicom-series", "all")]) == 0
    printed = capsys.readouterr().out
    assert (out / "1.2.826.0.1.1" / "analysis.json").is_file() and (out / "1.2.826.0.1.2" / "ct.nii.gz").is_file()
    assert not (out / "1.2.826.0.1.3").exists() and not (out / "1.2.826.0.1.4").exists()
    assert "skipped:" in printed and "1 slice(s) missing" in printed
    broken = tmp_path / "broken"  # two CT volumes, each missing a slice: nothing to analyse is an error
    for k, uid in enumerate(("1.2.826.0.1.5", "1.2.826.0.1.6")):
        write_dicom_series(broken, hu, series_uid=uid, names=[f"{k}_{n}.dcm" for n in range(4)], index_z=[0, 1, 2, 4])
    assert nodule_analysis.main([str(broken), *_argv(models, root, out, "--dicom-series", "all")]) == 2
    err = capsys.readouterr().err
    assert (
        "no CT could be analysed" in err and err.count("slice(s) missing") == 2 and len(err.strip().splitlines()) == 1
    )
    empty = tmp_path / "mr-only"
    write_dicom_series(empty, hu, series_uid="1.2.826.0.1.3", modality="MR")
    assert nodule_analysis.main([str(empty), *_argv(models, root, out, "--dicom-series", "all")]) == 2
    err = capsys.readouterr().err
    assert "found no CT volume" in err and "modality 'MR'" in err and len(err.strip().splitlines()) == 1


def test_report_lists_every_nodule_with_its_picture_and_links(root, models, tmp_path, monkeypatch):
    monkeypatch.setattr(nodule_analysis, "segment_ct", _true_segmentation(root))
    uids = _uids_with_nodules(root)[:2]
    out = tmp_path / "out"
    argv = [",".join(uids), *_argv(models, root, out, "--nodule-threshold", "0", "--max-pictures", "2")]
    assert nodule_analysis.main(argv) == 0
    page = ReportPage.parse(out / "report.html")
    assert set(page.rows) == set(uids)
    for uid in uids:
        nodules = pd.read_csv(out / uid / "nodules.csv", dtype={"seriesuid": str})
        assert len(nodules) > 2
        rows = page.rows[uid]
        assert [r["label"] for r in rows] == nodules["label"].tolist()
        assert [r["p_nodule"] for r in rows] == [f"{p:.3f}" for p in nodules["p_nodule"]]
        assert [r["slice"] for r in rows] == [str(v) for v in nodules["slice_number"]]
        assert [r["pictures"] for r in rows] == [1, 1] + [0] * (len(nodules) - 2), "pictures of the 2 most probable"
        summary = json.loads((out / uid / "analysis.json").read_text())
        assert summary["nodules_drawn"] == 2 and summary["pictures"] == ["nodules_01.png"]
    assert page.links and all((out / link).is_file() for link in page.links), page.links
    assert {f"{uid}/nodules_01.png" for uid in uids} | {f"{uid}/nodules_mask.nii.gz" for uid in uids} <= page.links
    assert not page.scripts and not any("://" in link for link in page.links)


class ReportPage(html.parser.HTMLParser):
    """report.html read back: nodule rows per CT section and every link and image source."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[dict]] = {}
        self.confusion: dict[str, list[list[str]]] = {}
        self._part: str | None = None
        self._table_row: list[str] | None = None
        self.links: set[str] = set()
        self.scripts = 0
        self._ct: str | None = None
        self._row: dict | None = None
        self._cell: str | None = None

    @classmethod
    def parse(cls, path: Path) -> ReportPage:
        page = cls()
        page.feed(path.read_text(encoding="utf-8"))
        return page

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.scripts += tag == "script"
        for key in ("href", "src"):
            if attrs.get(key) and not attrs[key].startswith("#"):
                self.links.add(attrs[key])
        if tag == "section" and attrs.get("class") == "part":
            self._part = attrs["id"].removeprefix("part-")
            self.confusion[self._part] = []
        elif tag == "table" and attrs.get("class") != "confusion":
            self._part = None
        elif tag == "tr" and self._part is not None:
            self._table_row = []
            self.confusion[self._part].append(self._table_row)
        if tag == "section" and attrs.get("class") == "ct":
            self._ct = attrs["id"].removeprefix("ct-")
            self.rows[self._ct] = []
        elif tag == "tr" and attrs.get("class") == "nodule":
            self._row = {"label": int(attrs["data-label"]), "pictures": 0}
            self.rows[self._ct].append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = attrs.get("class")
        elif tag == "img" and self._row is not None:
            self._row["pictures"] += 1

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = self._table_row = None
        elif tag == "section":
            self._part = None

    def handle_data(self, data):
        if self._table_row is not None and data.strip():
            self._table_row.append(data.strip())
        if self._row is not None and self._cell in ("p-nodule", "slice") and data.strip():
            self._row["p_nodule" if self._cell == "p-nodule" else "slice"] = data.strip()


def test_bad_nifti_inputs_and_output_flags_are_one_line(root, models, tmp_path, capfd):
    four_d = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.full((4, 8, 8), -900, np.int16))] * 2), str(four_d))
    stored = tmp_path / "stored.nii.gz"  # a scanner's 0..4095 without the rescale to HU
    sitk.WriteImage(sitk.GetImageFromArray(np.tile(np.array([0, 40, 1000, 4095], np.int16), (4, 8, 2))), str(stored))
    uid = _uids_with_nodules(root)[0]
    cases = [
        ([str(four_d)], "a 4-D image of size 8 × 8 × 4 × 2: expected one 3-D CT volume"),
        ([str(stored)], "voxel values 0..4095 look like stored values without the rescale"),
        ([uid, "--hu-offset", "-1024"], "--hu-offset -1024 applies to NIfTI and NRRD inputs"),
        ([str(stored), "--hu-offset", "20000"], "--hu-offset 20000: expected an integer number of HU"),
        ([uid, "--write-probability", "--mask-format", "none"], "--write-probability writes in the --mask-format"),
        ([uid, "--max-pictures", "-1"], "--max-pictures must be ≥ 0, got -1"),
        ([uid, "--surface-candidates", "-1"], "--surface-candidates must be ≥ 0 (0: none), got -1"),
    ]
    for inputs, expected in cases:
        assert nodule_analysis.main([*inputs, *_argv(models, root, tmp_path / "out")]) == 2, inputs
        err = capfd.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, (inputs, err)


def test_the_detector_levers_candidate_limit_lungs_and_looks(root, models, tmp_path, monkeypatch):
    seen = {}

    def segment(model, ct, **kwargs):
        seen[ct.series_uid] = kwargs.get("region")
        return _true_segmentation(root)(model, ct, **kwargs)

    monkeypatch.setattr(nodule_analysis, "segment_ct", segment)
    uid = max(_uids_with_nodules(root), key=lambda u: len(_annotations(root, u)))
    tables = {}
    for name, extra in (("one", ["--max-candidates", "1"]), ("all", []), ("plain", ["--no-tta", "--no-lung-mask"])):
        out = tmp_path / name
        assert nodule_analysis.main([uid, *_argv(models, root, out, "--nodule-threshold", "0", *extra)]) == 0
        tables[name] = pd.read_csv(out / uid / "components.csv", dtype={"seriesuid": str})
        tables[name + "_region"] = seen[uid]
    one, every, plain = tables["one"], tables["all"], tables["plain"]
    segmented = {name: table[table["found_by"] == "segmentation"] for name, table in (("one", one), ("all", every))}
    assert segmented["one"]["kept"].sum() == 1 and segmented["all"]["kept"].sum() >= 2
    assert (one["reason"] == "over_max_candidates").sum() == segmented["all"]["kept"].sum() - 1
    # those from the lungs' surface come on top of --max-candidates (fewer kept ones leave as many or more)
    assert (one["found_by"] == "lung surface").sum() >= (every["found_by"] == "lung surface").sum()
    assert (plain["found_by"] == "segmentation").all()  # no lungs, no surface
    # the stand-in segments every nodule: whatever comes from the lungs' surface is elsewhere, and found_by says so
    surface = every["found_by"] == "lung surface"
    assert set(every["found_by"]) <= {"segmentation", "lung surface"}
    assert (every.loc[~surface, "p_segmentation"] == 1.0).all()  # the stand-in's probability
    # the lungs' box is segmented (a (I, 4) box per slice), the whole CT without the lung mask
    boxes = tables["all_region"]
    assert boxes is not None and boxes.shape == (48, 4) and tables["plain_region"] is None
    assert (boxes[:, 1] - boxes[:, 0]).max() < 96 or (boxes[:, 3] - boxes[:, 2]).max() < 96
    # eight looks average to other probabilities than one look at the same centres
    kept, kept_plain = every[every["kept"]], plain[plain["kept"]]
    np.testing.assert_allclose(kept[["coordX", "coordY", "coordZ"]], kept_plain[["coordX", "coordY", "coordZ"]])
    assert not np.allclose(kept["p_nodule"], kept_plain["p_nodule"])


@pytest.mark.parametrize(
    ("native", "flags", "expected"),
    [(True, [], "bfloat16"), (False, [], "float32"), (True, ["--amp", "off"], "float32")],
)
def test_amp_auto_is_bf16_only_on_a_cpu_that_computes_it(root, models, tmp_path, monkeypatch, native, flags, expected):
    """--amp auto runs the analysis in bf16 where the CPU has bf16 instructions (about twice as fast), float32
    elsewhere (emulated bf16 is slower than float32) and with --amp off; analysis.json says which ran."""
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: native)
    seen, segmented_by = [], []

    def segment(model, ct, **kwargs):
        seen.append(kwargs["amp_dtype"])
        segmented_by.append(model)
        return _true_segmentation(root)(model, ct, **kwargs)

    monkeypatch.setattr(nodule_analysis, "segment_ct", segment)
    uid = _uids_with_nodules(root)[0]
    out = tmp_path / "out"
    assert nodule_analysis.main([uid, *_argv(models, root, out, "--device", "cpu", "--no-pictures", *flags)]) == 0
    summary = json.loads((out / uid / "analysis.json").read_text())
    assert summary["precision"] == expected and summary["device"] == "cpu"
    assert seen == [None if expected == "float32" else torch.bfloat16]
    # the segmentation joins its skips without concatenation only in float32, where that was measured to pay
    split = [isinstance(block, SkipSplitUpBlock) for block in segmented_by[0].unet.up_path]
    assert split == [expected == "float32"] * len(split) and split


def test_a_ct_without_lungs_is_segmented_whole(root, models, tmp_path, monkeypatch):
    hu, _ = chest_phantom(shape=(24, 64, 80), with_lungs=False)
    scans = tmp_path / "scans"
    write_ct(scans, "1.2.3.4.5", hu, spacing_xyz=(1.0, 1.0, 2.0), subset=0)
    seen = {}

    def segment(model, ct, **kwargs):
        seen["region"] = kwargs.get("region")
        return np.zeros(ct.hu.shape, dtype=np.float16)

    monkeypatch.setattr(nodule_analysis, "segment_ct", segment)
    mhd = next(scans.glob("subset0/*.mhd"))
    assert nodule_analysis.main([str(mhd), *_argv(models, root, tmp_path / "out")]) == 0
    assert seen["region"] is None


def test_models_trained_on_other_splits_are_named(root):
    uids = sorted(series_index(root))
    validation = [str(u) for u in split_series(uids, "series", val_fraction=0.5, data_root=root).val]
    same = SegTrainingConfig(data_root=str(root), val_fraction=0.5)
    other = SegTrainingConfig(data_root=str(root), val_fraction=0.34)
    trained_on = set(split_series(uids, "series", val_fraction=0.34, data_root=root).train) & set(validation)
    assert trained_on, "the fixture's split settings must overlap for this test"
    models = SimpleNamespace(other_configs={"segmentation": same})
    assert nodule_analysis.warn_if_trained_on(validation, uids, root, models) == []
    models = SimpleNamespace(other_configs={"segmentation": other, "malignancy": same})
    (line,) = nodule_analysis.warn_if_trained_on(validation, uids, root, models)
    assert line.startswith(f"the segmentation model trained on {len(trained_on)} of the {len(validation)}")
