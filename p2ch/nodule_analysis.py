"""`python -m p2ch.nodule_analysis`: any chest CT in, its nodules with malignancy out (the book's chapter 14).

    python -m p2ch.nodule_analysis 1.3.6.1.4.1.14519.5.2.1.6279.6001.1051…   # a series of the data root
    python -m p2ch.nodule_analysis scans/patient7.mhd scans/dicom_folder/     # any .mhd, any DICOM series
    python -m p2ch.nodule_analysis --run-validation                           # the detector, scored LUNA16's way

Per CT, in this order (seconds of each step go into analysis.json):

1. **segmentation**: the UNet of `python -m p2ch.seg_training` on every slice (with the context
   slices it was trained with), batched on the device, AMP where available → P(nodule voxel);
2. **grouping**: voxels above the segmentation threshold → 3D connected components (scipy.ndimage,
   26-connectivity) → each component's density-weighted centre (irc → world mm, exact for any
   direction matrix), its voxel count and equivalent-sphere diameter; components outside
   [--min-diameter-mm, --max-diameter-mm] or under --min-voxels are dropped ("too_small", "too_large");
3. **classification**: the nodule classifier (`python -m p2ch.training`) scores every kept component
   on a chunk cropped from the CT in memory (no cache) → p_nodule;
4. **malignancy**: the malignancy classifier (`--malignant`) scores the components with p_nodule above
   --nodule-threshold → p_malignant.

Written into `--out` (default `data-unversioned/analysis/<time>/`), one folder per CT:
`nodules.csv` (seriesuid, coordX/Y/Z mm, diameter_mm (estimated), p_nodule, p_malignant; the
components above --nodule-threshold, most probable first), `components.csv` (every component,
dropped ones with their reason), `analysis.json` (the CT's geometry, settings, models used, step
times, counts) and `nodules_NN.png` (each nodule in three planes, lung window, with its
probabilities). `--write-candidates` writes every kept component of all CTs as a LUNA16-format
`candidates.csv` in `--out` (class 1 where a component lies within an annotated nodule's radius,
when the data root has annotations.csv; else 0), so the classifier can be trained on candidates
of one's own.

`--run-validation` analyses the validation series of the classifier's split (also the training
series with `--include-train`, reported apart) and writes into `--out/validation/` (and `train/`):
the book's confusion matrix (rows non-nodule / benign / malignant; columns complete miss / filtered
out / predicted benign / predicted malignant; `p2ch.metrics.detection_confusion`), the detection
FROC/CPM of the whole detector under LUNA16's rules with a bootstrap CI (`p2ch.metrics.froc`:
predictions are the kept components with p_nodule), `froc.png`, `submission.csv` (which
`python -m p2ch.evaluate`'s metrics can score too) and `metrics.json`; TensorBoard gets the CPM, the
seven FROC sensitivities and the FROC figure under `runs/<tb-prefix>/<time>-val_analysis-<comment>`.

Models default to the newest best.pt of each kind under --models-dir; the command logs which.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from p2ch.candidates import read_annotations, read_excluded, read_rated_annotations
from p2ch.checkpoint import load_model, load_segmentation_model, resolve_checkpoint, versions
from p2ch.cli import configure_logging, run_cli
from p2ch.config import (
    DefaultsHelpFormatter,
    add_inference_arguments,
    check_finite_settings,
    check_output_dir,
    resolve_data_root,
    resolve_runs_dir,
)
from p2ch.ct import Ct, load_ct_input
from p2ch.datasets import split_series
from p2ch.detect import Components, find_components, segment_ct
from p2ch.errors import ConfigError, DataNotFoundError
from p2ch.fileio import write_text_atomic
from p2ch.inference import Scorer, make_scorer, score_ct
from p2ch.luna import (
    ANNOTATION_COLUMNS,
    ANNOTATIONS_FILE,
    CANDIDATE_COLUMNS,
    EXCLUDED_FILE,
    LOCATION_COLUMNS,
    SUBMISSION_COLUMNS,
    series_index,
)
from p2ch.metrics import (
    CONFUSION_COLUMNS,
    CONFUSION_ROWS,
    FROC_FPS_PER_SCAN,
    FrocResult,
    detection_confusion,
    froc,
    match_predictions,
)
from p2ch.plots import froc_figure, save_figure_png
from p2ch.runtime import configure_backends
from p2ch.tblog import RunWriters
from p2ch.vis import DETECTED, Finding, write_sheets

log = logging.getLogger("p2ch.nodule_analysis")

PROG = "python -m p2ch.nodule_analysis"
DEFAULT_OUT_DIR = Path("data-unversioned/analysis")
ANALYSIS_FORMAT = "p2ch-analysis-v1"
STEPS = ("segmentation", "grouping", "classification", "malignancy")


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """Every setting of an analysis (saved in analysis.json and metrics.json)."""

    inputs: tuple[str, ...] = ()
    run_validation: bool = False
    include_train: bool = False
    segmentation_path: str | None = None
    classification_path: str | None = None
    malignancy_path: str | None = None
    models_dir: str | None = None
    data_root: str | None = None
    dicom_series: str | None = None
    batch_size: int = 16
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "on"
    cudnn_benchmark: str = "on"
    segmentation_threshold: float | None = None
    nodule_threshold: float = 0.5
    malignancy_threshold: float = 0.5
    min_voxels: int = 2
    min_diameter_mm: float = 2.0
    max_diameter_mm: float = 40.0
    pictures: bool = True
    write_candidates: bool = False
    bootstrap: int = 1000
    seed: int = 0
    out: str | None = None
    tb_prefix: str = "p2ch"
    runs_dir: str | None = None
    progress: bool = True
    log_level: str = "INFO"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check_finite_settings(self)
        need(
            bool(self.inputs) or self.run_validation,
            "nothing to analyse: give CTs (series uids of the data root, .mhd files or DICOM folders) or "
            "--run-validation",
        )
        need(not (self.include_train and not self.run_validation), "--include-train goes with --run-validation")
        need(self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}")
        for name in ("nodule_threshold", "malignancy_threshold"):
            value = getattr(self, name)
            need(0.0 <= value < 1.0, f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        seg = self.segmentation_threshold
        need(seg is None or 0.0 < seg < 1.0, f"--segmentation-threshold must be in (0, 1), got {seg}")
        need(self.min_voxels >= 1, f"--min-voxels must be ≥ 1, got {self.min_voxels}")
        need(
            0.0 <= self.min_diameter_mm < self.max_diameter_mm,
            f"--min-diameter-mm {self.min_diameter_mm} and --max-diameter-mm {self.max_diameter_mm}: expected "
            "0 ≤ min < max",
        )
        need(self.bootstrap >= 0, f"--bootstrap must be ≥ 0, got {self.bootstrap}")


# ---------------------------------------------------------------------------------------------
# models


@dataclasses.dataclass
class Models:
    """The three models on the device, what they are, and the settings they bring."""

    segmentation: Any
    segmentation_info: dict[str, Any]
    context_slices: int
    segmentation_threshold: float
    nodule: Scorer
    nodule_info: dict[str, Any]
    malignancy: Scorer | None
    malignancy_info: dict[str, Any] | None
    width_irc: tuple[int, int, int]
    classifier_config: Any

    def describe(self) -> dict[str, Any]:
        return {
            "segmentation": self.segmentation_info,
            "classification": self.nodule_info,
            "malignancy": self.malignancy_info,
        }


def _find(path: str | None, models_dir: str | None, task: str, flag: str, required: bool) -> Path | None:
    """The checkpoint for `flag`: the given path, else the newest best.pt of `task` (None if optional and absent)."""
    try:
        return resolve_checkpoint(path, models_dir, task=task)
    except DataNotFoundError as exc:
        if path or required:
            raise DataNotFoundError(f"{flag}: {exc}") from None
        return None


def load_models(config: AnalysisConfig) -> Models:
    """The segmentation, nodule and (when one exists or is given) malignancy models, on the device."""
    models_dir = config.models_dir
    seg_path = _find(config.segmentation_path, models_dir, "segmentation", "--segmentation-path", True)
    cls_path = _find(config.classification_path, models_dir, "nodule", "--classification-path", True)
    mal_path = _find(config.malignancy_path, models_dir, "malignancy", "--malignancy-path", False)
    seg_model, seg = load_segmentation_model(seg_path, use=f"{PROG} --segmentation-path")
    nodule_model, nodule_info = load_model(cls_path, task="nodule", use=f"{PROG} --classification-path")
    nodule = make_scorer(nodule_model, config.device, config.amp, config.channels_last)
    configure_backends(nodule.device, config.cudnn_benchmark == "on")
    malignancy, mal_info = None, None
    if mal_path is not None:
        mal_model, mal_info = load_model(mal_path, task="malignancy", use=f"{PROG} --malignancy-path")
        malignancy = make_scorer(mal_model, config.device, config.amp, config.channels_last)
        if tuple(mal_info.config.width_irc) != tuple(nodule_info.config.width_irc):
            raise ConfigError(
                f"--malignancy-path {mal_path} crops {list(mal_info.config.width_irc)} voxels, the nodule model "
                f"{list(nodule_info.config.width_irc)}; use models trained on the same chunk size"
            )
    threshold = config.segmentation_threshold or seg["threshold"]
    models = Models(
        segmentation=seg_model, segmentation_info=_info_dict(seg["info"]), context_slices=seg["context_slices"],
        segmentation_threshold=threshold, nodule=nodule, nodule_info=_info_dict(nodule_info), malignancy=malignancy,
        malignancy_info=None if mal_info is None else _info_dict(mal_info),
        width_irc=tuple(nodule_info.config.width_irc), classifier_config=nodule_info.config,
    )  # fmt: skip
    for kind, info in models.describe().items():
        if info is None:
            log.warning("no malignancy model (none given, none under the models folder): p_malignant stays empty")
        else:
            log.info("%s model: %s (epoch %s, sha1 %s)", kind, info["path"], info.get("epoch"), info["sha1"][:12])
    return models


def _info_dict(info: Any) -> dict[str, Any]:
    return info.to_dict() if hasattr(info, "to_dict") else dict(info)


# ---------------------------------------------------------------------------------------------
# one CT


@dataclasses.dataclass
class CtResult:
    """What the analysis of one CT found. p_nodule / p_malignant: (n,) float64 per component, nan where
    the step did not score it (dropped by the size rule; below the nodule threshold; no malignancy model)."""

    ct: Ct
    components: Components
    p_nodule: np.ndarray
    p_malignant: np.ndarray
    seconds: dict[str, float]


def analyse_ct(ct: Ct, models: Models, config: AnalysisConfig) -> CtResult:
    """Segment, group, classify and (for likely nodules) grade one CT; see the module docstring."""
    device = models.nodule.device
    seconds = {}
    started = time.perf_counter()
    prob = segment_ct(
        models.segmentation, ct, context_slices=models.context_slices, device=device,
        amp_dtype=models.nodule.amp_dtype, batch_size=config.batch_size,
        channels_last=config.channels_last == "on", progress=config.progress,
    )  # fmt: skip
    seconds["segmentation"] = time.perf_counter() - started
    started = time.perf_counter()
    components = find_components(
        prob > models.segmentation_threshold, ct, min_voxels=config.min_voxels,
        min_diameter_mm=config.min_diameter_mm, max_diameter_mm=config.max_diameter_mm,
    )  # fmt: skip
    del prob
    seconds["grouping"] = time.perf_counter() - started
    p_nodule = np.full(len(components), np.nan)
    p_malignant = np.full(len(components), np.nan)
    started = time.perf_counter()
    kept = np.flatnonzero(components.kept)
    p_nodule[kept] = _score(models.nodule, ct, components.center_xyz[kept], models, config)
    seconds["classification"] = time.perf_counter() - started
    started = time.perf_counter()
    likely = np.flatnonzero(p_nodule > config.nodule_threshold)
    if models.malignancy is not None and len(likely):
        p_malignant[likely] = _score(models.malignancy, ct, components.center_xyz[likely], models, config)
    seconds["malignancy"] = time.perf_counter() - started
    log.info(
        "%s: %d components (%d kept by size), %d nodules above %.2f; %s",
        ct.series_uid, len(components), len(kept), len(likely), config.nodule_threshold,
        ", ".join(f"{step} {seconds[step]:.1f} s" for step in STEPS),
    )  # fmt: skip
    return CtResult(ct, components, p_nodule, p_malignant, seconds)


def _score(scorer: Scorer, ct: Ct, centers_xyz: np.ndarray, models: Models, config: AnalysisConfig) -> np.ndarray:
    if len(centers_xyz) == 0:
        return np.zeros(0)
    return score_ct(scorer, ct, centers_xyz, width_irc=models.width_irc, batch_size=max(config.batch_size, 64))


def component_table(result: CtResult) -> pd.DataFrame:
    """Every component of one CT: seriesuid, coordX/Y/Z (mm), diameter_mm, voxels, kept, reason, p_nodule,
    p_malignant."""
    c = result.components
    return pd.DataFrame(
        {
            "seriesuid": result.ct.series_uid,
            "coordX": c.center_xyz[:, 0],
            "coordY": c.center_xyz[:, 1],
            "coordZ": c.center_xyz[:, 2],
            "diameter_mm": c.diameter_mm,
            "voxels": c.voxels,
            "kept": c.kept,
            "reason": c.reason,
            "p_nodule": result.p_nodule,
            "p_malignant": result.p_malignant,
        }
    )


COMPONENT_COLUMNS = (
    "seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "voxels", "kept", "reason", "p_nodule", "p_malignant",
)  # fmt: skip
NODULE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "p_nodule", "p_malignant")


def nodule_table(components: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The components above the nodule threshold, most probable first (nodules.csv)."""
    nodules = components[components["p_nodule"] > threshold]
    return nodules.sort_values("p_nodule", ascending=False, kind="stable")[list(NODULE_COLUMNS)].reset_index(drop=True)


def write_ct_outputs(result: CtResult, models: Models, config: AnalysisConfig, out_dir: Path) -> dict[str, Any]:
    """nodules.csv, components.csv, nodules_NN.png and analysis.json of one CT in `out_dir`; returns the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    components = component_table(result)
    nodules = nodule_table(components, config.nodule_threshold)
    write_text_atomic(out_dir / "nodules.csv", nodules.to_csv(index=False))
    write_text_atomic(out_dir / "components.csv", components.to_csv(index=False))
    sheets = []
    if config.pictures and len(nodules):
        findings = [
            Finding(DETECTED, k + 1, row.seriesuid, (row.coordX, row.coordY, row.coordZ), row.diameter_mm,
                    row.p_nodule, row.p_malignant)
            for k, row in enumerate(nodules.itertuples(index=False))
        ]  # fmt: skip
        written = write_sheets(findings, None, out_dir, "nodules", cts={result.ct.series_uid: result.ct})
        sheets = [path.name for path, _ in written]
    ct = result.ct
    summary = {
        "format": ANALYSIS_FORMAT,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "series_uid": ct.series_uid,
        "source": str(getattr(ct, "source", ct.mhd_path)),
        "ct": {
            "shape_irc": list(ct.shape_irc),
            "voxel_size_xyz": list(ct.voxel_size_xyz),
            "origin_xyz": list(ct.origin_xyz),
            "direction": ct.direction.ravel().tolist(),
            "provenance": dict(getattr(ct, "provenance", {})),  # e.g. a DICOM series resampled for its gantry tilt
        },
        "counts": {
            "components": len(components),
            "kept_by_size": int(components["kept"].sum()),
            "nodules": len(nodules),
            "malignant": int((nodules["p_malignant"] > config.malignancy_threshold).sum()),
        },
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        "segmentation_threshold": models.segmentation_threshold,
        "models": models.describe(),
        "pictures": sheets,
        "settings": config.to_dict(),
        "versions": versions(),
    }
    write_text_atomic(out_dir / "analysis.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------
# many CTs, validation

# ---------------------------------------------------------------------------------------------
# many CTs


def _loaded(specs: Sequence[str], config: AnalysisConfig, data_root: Path | None, pool) -> Iterator[Ct]:
    """The CTs named by `specs` in order; with a pool, the next one is read while this one is analysed."""

    def load(spec: str) -> Ct:
        return load_ct_input(spec, data_root, config.dicom_series)

    if pool is None:
        for spec in specs:
            yield load(spec)
        return
    pending = pool.submit(load, specs[0]) if specs else None
    for k in range(len(specs)):
        ct = pending.result()
        pending = pool.submit(load, specs[k + 1]) if k + 1 < len(specs) else None
        yield ct
        del ct


def analyse_many(
    specs: Sequence[str], models: Models, config: AnalysisConfig, out: Path, data_root: Path | None, num_workers: int
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Analyse every CT of `specs`, each into `out/<series_uid>/`; returns (all components, analysis.json per CT)."""
    tables, summaries = [], {}
    pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 0 and len(specs) > 1 else None
    try:
        for ct in _loaded(specs, config, data_root, pool):
            result = analyse_ct(ct, models, config)
            summaries[ct.series_uid] = write_ct_outputs(result, models, config, out / ct.series_uid)
            tables.append(component_table(result))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(COMPONENT_COLUMNS))
    return frame, summaries


def write_candidates(components: pd.DataFrame, data_root: Path | None, path: Path) -> int:
    """Every kept component as a LUNA16 candidates.csv row (class 1 within an annotated nodule's radius,
    when the data root has annotations.csv; else 0). Returns how many rows are class 1."""
    kept = components[components["kept"]].reset_index(drop=True)
    label = np.zeros(len(kept), dtype=np.int64)
    annotations_path = None if data_root is None else data_root / ANNOTATIONS_FILE
    if annotations_path is not None and annotations_path.is_file() and len(kept):
        annotations = read_annotations(annotations_path)
        scored = kept[list(LOCATION_COLUMNS)].assign(probability=0.0)
        label = match_predictions(scored, annotations).is_hit.astype(np.int64)
    else:
        log.warning("--write-candidates: no annotations.csv under the data root; every candidate is class 0")
    rows = kept[list(LOCATION_COLUMNS)].assign(**{"class": label})
    write_text_atomic(path, rows[list(CANDIDATE_COLUMNS)].to_csv(index=False))
    return int(label.sum())


# ---------------------------------------------------------------------------------------------
# validation: the whole detector scored


def validation_parts(config: AnalysisConfig, models: Models) -> tuple[Path, dict[str, list[str]]]:
    """(data root, {"validation": uids[, "train": uids]}) from the classifier's split settings."""
    classifier = models.classifier_config
    data_root = resolve_data_root(config.data_root or classifier.data_root)
    uids = sorted(series_index(data_root))
    if not uids:
        raise DataNotFoundError(f"--run-validation: no .mhd files under {data_root}/subset*/")
    mode = "series" if classifier.split == "stride" else classifier.split
    if classifier.split == "stride":
        log.warning("the classifier used the book's stride split, which has no validation CTs; using the series split")
    split = split_series(uids, mode, **classifier.split_settings(), data_root=data_root)
    parts = {"validation": [str(u) for u in split.val]}
    if config.include_train:
        parts["train"] = [str(u) for u in split.train]
    return data_root, parts


def score_detector(
    components: pd.DataFrame, uids: Sequence[str], data_root: Path, config: AnalysisConfig
) -> tuple[FrocResult, dict[str, dict[str, int]], pd.DataFrame]:
    """(FROC of the kept components' p_nodule, the book's confusion matrix, the submission rows) over `uids`."""
    wanted = set(uids)
    annotations = read_rated_annotations(data_root)
    annotations = annotations[annotations["seriesuid"].isin(wanted)].reset_index(drop=True)
    excluded = None
    if (data_root / EXCLUDED_FILE).is_file():
        excluded = read_excluded(data_root / EXCLUDED_FILE)
        excluded = excluded[excluded["seriesuid"].isin(wanted)].reset_index(drop=True)
    kept = components[components["kept"]]
    submission = kept[list(LOCATION_COLUMNS)].assign(probability=kept["p_nodule"].to_numpy(dtype=np.float64))
    submission = submission.reset_index(drop=True)
    result = froc(
        submission, annotations[list(ANNOTATION_COLUMNS)], excluded, series_uids=sorted(wanted),
        bootstrap=config.bootstrap, seed=config.seed,
    )  # fmt: skip
    confusion = detection_confusion(
        components, annotations, excluded, nodule_threshold=config.nodule_threshold,
        malignancy_threshold=config.malignancy_threshold,
    )  # fmt: skip
    return result, confusion, submission


def format_confusion(confusion: dict[str, dict[str, int]]) -> str:
    """The confusion matrix as a text table (rows and columns with any count; the book's four columns always)."""
    columns = [c for c in CONFUSION_COLUMNS if c in CONFUSION_COLUMNS[:4] or any(r[c] for r in confusion.values())]
    rows = [r for r in CONFUSION_ROWS if r in CONFUSION_ROWS[:3] or any(confusion[r].values())]
    width = max(len(r) for r in rows) + 2
    lines = [" " * width + " | ".join(f"{c:>14}" for c in columns)]
    for r in rows:
        cells = ["-" if r == "non-nodule" and c == "complete miss" else str(confusion[r][c]) for c in columns]
        lines.append(f"{r:<{width}}" + " | ".join(f"{v:>14}" for v in cells))
    return "\n".join(lines)


def write_part_outputs(
    name: str, uids: Sequence[str], components: pd.DataFrame, data_root: Path, config: AnalysisConfig,
    models: Models, out: Path,
) -> dict[str, Any]:  # fmt: skip
    """submission.csv, froc.png, froc_curve.csv, confusion.csv, metrics.json and report.txt of one part."""
    result, confusion, submission = score_detector(components, uids, data_root, config)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "submission.csv", submission[list(SUBMISSION_COLUMNS)].to_csv(index=False))
    pd.DataFrame(
        {"fps_per_scan": result.fps_per_scan, "sensitivity": result.sensitivity, "threshold": result.thresholds}
    ).to_csv(out / "froc_curve.csv", index=False)
    pd.DataFrame(confusion).T.to_csv(out / "confusion.csv", index_label="actual")
    title = f"whole detector on the {name} series: {len(uids)} CTs, {result.num_nodules} nodules"
    save_figure_png(froc_figure(result, title=title), out / "froc.png")
    metrics = {
        "format": ANALYSIS_FORMAT,
        "part": name,
        "scans": len(uids),
        "froc": result.to_dict(include_curve=False),
        "confusion": confusion,
        "models": models.describe(),
        "settings": config.to_dict(),
        "versions": versions(),
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    cpm = "undefined (no nodules)" if result.num_nodules == 0 else _cpm_text(result)
    report = (
        f"{name}: {len(uids)} CTs, {result.num_nodules} nodules, {len(submission)} candidates from the "
        f"segmentation ({result.num_detected} nodules hit); detection CPM {cpm}\n"
        f"{format_confusion(confusion)}\n"
    )
    write_text_atomic(out / "report.txt", report)
    return {"result": result, "report": report, "metrics": metrics}


def _cpm_text(result: FrocResult) -> str:
    low, high = result.cpm_ci
    interval = f" (95% CI {low:.3f}–{high:.3f}, {result.bootstrap} bootstraps)" if np.isfinite(low) else ""
    return f"{result.cpm:.3f}{interval}"


def log_to_tensorboard(parts: dict[str, dict[str, Any]], config: AnalysisConfig, run_time: str) -> Path:
    """CPM, the seven FROC sensitivities and the FROC figure of each part (validation: `val`, train: `trn`)."""
    writers = RunWriters(resolve_runs_dir(config.runs_dir), config.tb_prefix, run_time, "analysis", kind="analysis")
    try:
        for name, part in parts.items():
            mode = "val" if name == "validation" else "trn"
            result = part["result"]
            values = {"froc/cpm": result.cpm}
            values.update({f"froc/sensitivity_at_{fp:g}_fp": result.sensitivities[fp] for fp in FROC_FPS_PER_SCAN})
            writers.scalars(mode, values, 0)
            writers.figure(mode, "froc", froc_figure(result, title=f"{name}: whole detector"), 0)
    finally:
        writers.close()
    return writers.root


# ---------------------------------------------------------------------------------------------
# command line


def get_args_parser() -> argparse.ArgumentParser:
    d = AnalysisConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Find the nodules of any chest CT and grade them: the segmentation model on every slice, "
        "3D components, the nodule classifier on each, the malignancy classifier on the likely nodules. Writes "
        "nodules.csv, components.csv, analysis.json and picture sheets per CT; --run-validation scores the whole "
        "detector the LUNA16 way (FROC/CPM with CI) and prints the book's confusion matrix.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Examples: python -m p2ch.nodule_analysis 1.3.6.1.4.1.14519.5.2.1.6279.6001.1057566580315150620… "
        "(a series of the data root); "
        "python -m p2ch.nodule_analysis scan.mhd dicom_folder/ --out results; "
        "python -m p2ch.nodule_analysis --run-validation --include-train",
    )
    parser.add_argument(
        "inputs", nargs="*", metavar="CT",
        help="series uid(s) of the data root (comma-separated as the book's series_uid also works), .mhd files "
        "or folders of DICOM files (one series each; see --dicom-series)",
    )  # fmt: skip
    _add_model_arguments(parser.add_argument_group("models (default: the newest best.pt of each kind)"))
    _add_data_arguments(parser.add_argument_group("data"))
    _add_detector_arguments(parser.add_argument_group("detector"), d)
    _add_validation_arguments(parser.add_argument_group("validation"), d)
    speed = parser.add_argument_group("speed")
    add_inference_arguments(speed)
    speed.set_defaults(batch_size=d.batch_size)
    speed.add_argument(
        "--num-workers", type=int, default=1,
        help="threads reading the next CTs while one is analysed (0: read each when its turn comes)",
    )  # fmt: skip
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT_DIR}/<time>)")
    out.add_argument("--no-pictures", action="store_true", help="no picture sheets of the nodules found")
    out.add_argument(
        "--write-candidates", action="store_true",
        help="also write every kept component of all CTs as a LUNA16 candidates.csv in --out (class from "
        "annotations.csv when the data root has one)",
    )  # fmt: skip
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--log-level", default=d.log_level, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _add_model_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--segmentation-path", default=None, metavar="PATH", help="python -m p2ch.seg_training checkpoint")
    g.add_argument(
        "--classification-path", default=None, metavar="PATH", help="python -m p2ch.training checkpoint (nodules)"
    )
    g.add_argument(
        "--malignancy-path", default=None, metavar="PATH",
        help="python -m p2ch.training --malignant checkpoint (optional: without one, p_malignant stays empty)",
    )  # fmt: skip
    g.add_argument(
        "--models-dir", default=None, help="where to look (default: $P2CH_MODELS_DIR or data-unversioned/models)"
    )


def _add_data_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--data-root", default=None,
        help="LUNA16 root for series uids and --run-validation (default: the classifier's, else $P2CH_DATA_ROOT)",
    )  # fmt: skip
    g.add_argument(
        "--dicom-series", default=None, metavar="UID", help="the series to read from a DICOM folder with several"
    )


def _add_detector_arguments(g: argparse._ArgumentGroup, d: AnalysisConfig) -> None:
    g.add_argument(
        "--segmentation-threshold", type=float, default=None,
        help="P(nodule voxel) above which a voxel is segmented (default: the segmentation run's --threshold)",
    )  # fmt: skip
    g.add_argument(
        "--nodule-threshold",
        type=float,
        default=d.nodule_threshold,
        help="p_nodule above which a component is a nodule",
    )
    g.add_argument(
        "--malignancy-threshold", type=float, default=d.malignancy_threshold,
        help="p_malignant above which a nodule counts as malignant (confusion matrix, counts)",
    )  # fmt: skip
    g.add_argument("--min-voxels", type=int, default=d.min_voxels, help="smaller components are dropped (too_small)")
    g.add_argument(
        "--min-diameter-mm", type=float, default=d.min_diameter_mm,
        help="components whose equivalent-sphere diameter is smaller are dropped (LUNA16's nodules are ≥ 3 mm)",
    )  # fmt: skip
    g.add_argument(
        "--max-diameter-mm", type=float, default=d.max_diameter_mm,
        help="larger components are dropped (too_large; LUNA16's nodules are ≤ 30 mm, a nodule's segmentation "
        "may run a little larger)",
    )  # fmt: skip


def _add_validation_arguments(g: argparse._ArgumentGroup, d: AnalysisConfig) -> None:
    g.add_argument(
        "--run-validation", action="store_true",
        help="analyse the validation series of the classifier's split and score the whole detector",
    )  # fmt: skip
    g.add_argument("--include-train", action="store_true", help="with --run-validation: the training series too, apart")
    g.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples of the CPM's CI (0: none)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the bootstrap")
    g.add_argument("--tb-prefix", default=d.tb_prefix, help="runs/<tb-prefix>/ for the TensorBoard record")
    g.add_argument("--runs-dir", default=None, help="TensorBoard root (default: $P2CH_RUNS_DIR or runs)")


def config_from_args(args: argparse.Namespace) -> AnalysisConfig:
    inputs = tuple(part for spec in args.inputs for part in (spec.split(",") if "," in spec else [spec]) if part)
    fields = {f.name for f in dataclasses.fields(AnalysisConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    config = AnalysisConfig(
        **{**values, "inputs": inputs, "pictures": not args.no_pictures, "progress": not args.no_progress}
    )
    config.validate()
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be ≥ 0, got {args.num_workers}")
    return config


def run(args: argparse.Namespace) -> int:
    """Analyse the CTs given and/or the validation series; print where everything went."""
    config = config_from_args(args)
    run_time = datetime.datetime.now().strftime("%Y-%m-%d_%H.%M.%S")
    out = check_output_dir(Path(config.out) if config.out else DEFAULT_OUT_DIR / run_time, "--out")
    if config.run_validation:
        check_output_dir(resolve_runs_dir(config.runs_dir), "--runs-dir")
    models = load_models(config)
    data_root = resolve_data_root(config.data_root or models.classifier_config.data_root)
    tables, lines = [], []
    if config.inputs:
        components, summaries = analyse_many(config.inputs, models, config, out, data_root, args.num_workers)
        tables.append(components)
        for uid, summary in summaries.items():
            counts = summary["counts"]
            lines.append(
                f"{uid}: {counts['nodules']} nodule(s), {counts['malignant']} malignant → {out / uid}/nodules.csv"
            )
    if config.run_validation:
        lines += _run_validation(config, models, out, run_time, args.num_workers, tables)
    if config.write_candidates:
        everything = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(COMPONENT_COLUMNS))
        positives = write_candidates(everything, data_root, out / "candidates.csv")
        lines.append(f"candidates: {int(everything['kept'].sum())} rows ({positives} class 1) → {out}/candidates.csv")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _run_validation(
    config: AnalysisConfig, models: Models, out: Path, run_time: str, num_workers: int, tables: list[pd.DataFrame]
) -> list[str]:
    data_root, parts = validation_parts(config, models)
    scored = {}
    for name, uids in parts.items():
        log.info("%s: %d series of %s", name, len(uids), data_root)
        components, _ = analyse_many(uids, models, config, out / name, data_root, num_workers)
        tables.append(components)
        scored[name] = write_part_outputs(name, uids, components, data_root, config, models, out / name)
    tb_root = log_to_tensorboard(scored, config, run_time)
    return [part["report"] + f"→ {out / name}/ (TensorBoard: {tb_root})" for name, part in scored.items()]


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(args.log_level)
    return run_cli(PROG, lambda: run(args), "interrupted; the CTs analysed so far have their folders in --out")


if __name__ == "__main__":
    sys.exit(main())
