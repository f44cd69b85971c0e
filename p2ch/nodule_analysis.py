"""`python -m p2ch.nodule_analysis`: any chest CT in, its nodules with malignancy out (the book's chapter 14).

    python -m p2ch.nodule_analysis 1.3.6.1.4.1.14519.5.2.1.6279.6001.1051…   # a series of the data root
    python -m p2ch.nodule_analysis scans/patient7.mhd scans/dicom_folder/     # any .mhd, any DICOM series
    python -m p2ch.nodule_analysis scans/patient8.nii.gz scans/study/ --dicom-series all   # NIfTI; every series
    python -m p2ch.nodule_analysis --run-validation                           # the detector, scored LUNA16's way

Per CT, in this order (seconds of each step go into analysis.json):

1. **lungs**: `p2ch.lungs.lung_mask` finds the lungs (large bodies of air inside the body) on a 3 mm
   grid; the rest of the work stays in their box (`--no-lung-mask`: the whole CT; a CT without lungs
   found is searched whole, with a warning);
2. **segmentation**: the UNet of `python -m p2ch.seg_training` on every slice of the lungs' box (with
   the context slices it was trained with), batched on the device, AMP where available, as
   `p2ch.unet.inference_copy` (batch norms folded; in float32 on a CPU the skips joined without concatenation)
   → P(nodule voxel);
3. **grouping**: `p2ch.detect.find_candidates`, the rule the segmentation's validation scores by:
   voxels above the segmentation threshold → 3D components (26-connectivity), each split at its
   probability peaks (`--no-split`: not), so a small nodule touching a vessel gets a candidate of its
   own → each region's probability-weighted centre (irc → world mm, exact for any direction matrix),
   voxel count, equivalent-sphere diameter and the segmentation's confidence; regions outside
   [--min-diameter-mm, --max-diameter-mm] or under --min-voxels ("too_small", "too_large"), that do not
   touch the lungs ("outside_lungs") or beyond the --max-candidates surest ("over_max_candidates") are dropped;
   then up to --surface-candidates bumps on the lungs' surface (`p2ch.lungs.surface_bumps`: compact lumps
   of tissue the lungs' air wraps around, nodules on the chest wall or the mediastinum, where the
   segmentation is weakest) not near a kept candidate join them, on top of --max-candidates
   (components.csv's `found_by`: "segmentation" or "lung surface");
4. **classification**: the nodule classifier (`python -m p2ch.training`) scores every kept candidate
   on a chunk cropped from the CT in memory (no cache), the mean of the chunk and its 7 mirror images
   (`--no-tta`: one look) → p_nodule;
5. **malignancy**: the malignancy classifier (`--malignant`) scores the candidates with p_nodule above
   --nodule-threshold → p_malignant; the leading stages it shares with the nodule classifier (fine-tuned
   from it with frozen blocks: `p2ch.model.shared_stages`) come from step 4, computed once.

Inputs: series uids of the data root, `.mhd` files, NIfTI/NRRD files (`.nii`, `.nii.gz`, `.nrrd`,
`.nhdr`; checked by `p2ch.imagefile`, `--hu-offset` for files known to store HU + 1024) and DICOM
folders (one series, `--dicom-series UID`, or `--dicom-series all`: every CT volume of the folder).

Written into `--out` (default `data-unversioned/analysis/<time>/`), one folder per CT: `nodules.csv`
(seriesuid, coordX/Y/Z mm, diameter_mm (estimated), p_nodule, p_malignant, then where it is:
voxel_index/row/col, the 1-based slice_number, for DICOM the slice's instance_number, sop_instance_uid
and dicom_file, and its label in the label map; the components above --nodule-threshold, most probable
first), `components.csv` (every component, dropped ones with their reason, the same positions, label 0
for non-nodules, p_segmentation and found_by), `nodules_mask.nii.gz` (label k on the voxels of row k of
nodules.csv, exactly on the CT's grid; `--mask-format mhd|nrrd|none`; with `--write-probability` also
`nodules_probability`, uint8 P × 255; for a DICOM input also `ct.nii.gz`, so a viewer opens the pair
without a DICOM reader), `analysis.json` (the CT's geometry, settings, models used, step times, counts,
files) and `nodules_NN.png` (the `--max-pictures` most probable nodules in three planes, lung window,
with their probabilities). `report.html` in `--out` shows every CT and all its nodules with their
pictures (and, with --run-validation, the detector's FROC and confusion matrix), readable offline.
`--write-candidates` writes every kept component of all CTs as a LUNA16-format `candidates.csv` in
`--out` (class 1 where a component lies within an annotated nodule's radius, when the data root has
annotations.csv; else 0), so the classifier can be trained on candidates of one's own.

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
    resolve_batch_size,
    resolve_data_root,
    resolve_runs_dir,
)
from p2ch.ct import Ct, load_ct_input
from p2ch.datasets import split_series
from p2ch.detect import CENTRES, CandidateRule, Components, find_candidates, segment_ct, segmentation_margin_mm
from p2ch.dicom import volume_series
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError, P2chError
from p2ch.fileio import write_text_atomic
from p2ch.imagefile import check_hu_offset, image_suffix
from p2ch.inference import Scorer, make_scorer, score_ct_then
from p2ch.labelmap import FORMATS as MASK_FORMATS
from p2ch.labelmap import (
    POSITION_COLUMNS,
    PROBABILITY_SCALE,
    image_on_grid,
    label_volume,
    probability_volume,
    slice_positions,
    volume_name,
    write_volume,
)
from p2ch.luna import (
    ANNOTATION_COLUMNS,
    ANNOTATIONS_FILE,
    CANDIDATE_COLUMNS,
    EXCLUDED_FILE,
    LOCATION_COLUMNS,
    SUBMISSION_COLUMNS,
    series_index,
)
from p2ch.lungs import lung_mask
from p2ch.metrics import (
    CONFUSION_COLUMNS,
    CONFUSION_ROWS,
    FROC_FPS_PER_SCAN,
    FrocResult,
    detection_confusion,
    froc,
    match_predictions,
)
from p2ch.model import STAGES, shared_stages
from p2ch.plots import froc_figure, save_figure_png
from p2ch.report import CtReport, PartReport, write_report
from p2ch.runtime import configure_backends
from p2ch.tblog import RunWriters
from p2ch.unet import inference_copy
from p2ch.vis import DETECTED, Finding, write_sheets

log = logging.getLogger("p2ch.nodule_analysis")

PROG = "python -m p2ch.nodule_analysis"
DEFAULT_OUT_DIR = Path("data-unversioned/analysis")
ANALYSIS_FORMAT = "p2ch-analysis-v1"
# --run-validation suggests the --nodule-threshold (steps of 0.01) that finds the most nodules at a cost of at most
# this many false positives per true nodule, with the fewest false positives (metrics.json: suggested_threshold).
SUGGEST_FPS_PER_NODULE = 1.0
STEPS = ("lungs", "segmentation", "grouping", "classification", "malignancy")
# Slices per forward pass of the segmentation: on a CPU, 512 × 512 slices in batches of 2 ran 1.7x faster
# than in batches of 16 (BENCHMARKS.md, issue 22): the activations of small batches stay in the caches.
SEGMENTATION_BATCH = {"cpu": 2, "cuda": 16}


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
    batch_size: int = SEGMENTATION_BATCH["cpu"]
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
    lung_mask: bool = True
    split: bool = True
    max_candidates: int = 30
    surface_candidates: int = 5
    tta: bool = True
    candidate_centre: str = "probability"
    pictures: bool = True
    max_pictures: int = 20
    mask_format: str = "nii.gz"
    write_probability: bool = False
    hu_offset: int = 0
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
        need(self.max_candidates >= 0, f"--max-candidates must be ≥ 0 (0: no limit), got {self.max_candidates}")
        need(self.surface_candidates >= 0, f"--surface-candidates must be ≥ 0 (0: none), got {self.surface_candidates}")
        need(
            0.0 <= self.min_diameter_mm < self.max_diameter_mm,
            f"--min-diameter-mm {self.min_diameter_mm} and --max-diameter-mm {self.max_diameter_mm}: expected "
            "0 ≤ min < max",
        )
        need(self.bootstrap >= 0, f"--bootstrap must be ≥ 0, got {self.bootstrap}")
        need(self.max_pictures >= 0, f"--max-pictures must be ≥ 0, got {self.max_pictures}")
        need(
            self.mask_format in (*MASK_FORMATS, "none"),
            f"--mask-format {self.mask_format!r}: expected one of {', '.join((*MASK_FORMATS, 'none'))}",
        )
        need(
            not (self.write_probability and self.mask_format == "none"),
            "--write-probability writes in the --mask-format; it cannot be 'none' with it",
        )
        check_hu_offset(self.hu_offset)
        need(
            not self.hu_offset or any(image_suffix(spec) for spec in self.inputs),
            f"--hu-offset {self.hu_offset} applies to NIfTI and NRRD inputs (.nii, .nii.gz, .nrrd, .nhdr), but none "
            "is given",
        )


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
    other_configs: dict[str, Any] = dataclasses.field(default_factory=dict)  # segmentation, malignancy: their runs
    # Leading stages the malignancy classifier shares with the nodule classifier (fine-tuned from it with
    # frozen early blocks, `model.shared_stages`): computed once per chunk, for both.
    shared_stages: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "segmentation": self.segmentation_info,
            "classification": self.nodule_info,
            "malignancy": self.malignancy_info,
        }

    @property
    def precision(self) -> str:
        """What --amp resolved to on this device: bfloat16, float16 or float32."""
        dtype = self.nodule.amp_dtype
        return "float32" if dtype is None else str(dtype).replace("torch.", "")

    def run_info(self) -> dict[str, str]:
        """Where and in what precision the models ran (analysis.json and metrics.json)."""
        return {"device": str(self.nodule.device), "precision": self.precision}


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
    nodule = make_scorer(nodule_model, config.device, config.amp, config.channels_last, cpu_bf16=True)
    # The same probabilities with less work: norms folded and, where it was measured to pay (float32 on a CPU),
    # the skips joined without concatenation; in bf16 it gave nothing and would round the sum twice.
    seg_model = inference_copy(seg_model, split_skips=nodule.device.type == "cpu" and nodule.amp_dtype is None)
    configure_backends(nodule.device, config.cudnn_benchmark == "on")
    malignancy, mal_info = None, None
    if mal_path is not None:
        mal_model, mal_info = load_model(mal_path, task="malignancy", use=f"{PROG} --malignancy-path")
        malignancy = make_scorer(mal_model, config.device, config.amp, config.channels_last, cpu_bf16=True)
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
        other_configs={"segmentation": seg["config"], **({} if mal_info is None else {"malignancy": mal_info.config})},
        shared_stages=0 if malignancy is None else shared_stages(nodule.model, malignancy.model),
    )  # fmt: skip
    for kind, info in models.describe().items():
        if info is None:
            log.warning("no malignancy model (none given, none under the models folder): p_malignant stays empty")
        else:
            log.info("%s model: %s (epoch %s, sha1 %s)", kind, info["path"], info.get("epoch"), info["sha1"][:12])
    log.info("running on %s in %s (--amp %s)", nodule.device, models.precision, config.amp)
    if models.shared_stages:
        log.info(
            "the malignancy classifier shares %s with the nodule classifier (fine-tuned from it): computed once",
            ", ".join(STAGES[: models.shared_stages]),
        )
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
    labels: np.ndarray | None = None  # (I, R, C) int32, j + 1 on component row j's voxels (None: no label map)
    probability: np.ndarray | None = None  # (I, R, C) uint8, round(255 × P) (--write-probability)


def candidate_rule(config: AnalysisConfig, models: Models) -> CandidateRule:
    """How this analysis turns the segmentation into candidates (the segmentation's validation uses the same
    rule with its own threshold)."""
    return CandidateRule(
        threshold=models.segmentation_threshold, min_voxels=config.min_voxels, min_diameter_mm=config.min_diameter_mm,
        max_diameter_mm=config.max_diameter_mm, lungs=config.lung_mask, split=config.split,
        max_candidates=config.max_candidates, centre=config.candidate_centre,
        surface_candidates=config.surface_candidates,
    )  # fmt: skip


def analyse_ct(ct: Ct, models: Models, config: AnalysisConfig) -> CtResult:
    """Segment, group, classify and (for likely nodules) grade one CT; see the module docstring."""
    device = models.nodule.device
    seconds = {}
    started = time.perf_counter()
    lungs = lung_mask(ct.hu, ct.voxel_size_xyz) if config.lung_mask else None
    if lungs is not None and not lungs.found:
        log.warning("%s: no lungs found (no large body of air inside the body); segmenting the whole CT", ct.series_uid)
    rule = candidate_rule(config, models)
    margin_mm = segmentation_margin_mm(models.segmentation, ct, rule.near_lungs_mm)
    region = lungs.slice_boxes(margin_mm) if lungs is not None and lungs.found else None
    seconds["lungs"] = time.perf_counter() - started
    started = time.perf_counter()
    prob = segment_ct(
        models.segmentation, ct, context_slices=models.context_slices, device=device,
        amp_dtype=models.nodule.amp_dtype, batch_size=config.batch_size,
        channels_last=config.channels_last == "on", progress=config.progress, region=region,
    )  # fmt: skip
    probability = probability_volume(prob) if config.write_probability else None
    seconds["segmentation"] = time.perf_counter() - started
    started = time.perf_counter()
    components, labels = find_candidates(prob, ct, rule, lungs=lungs)
    del prob
    seconds["grouping"] = time.perf_counter() - started
    p_nodule = np.full(len(components), np.nan)
    p_malignant = np.full(len(components), np.nan)
    started = time.perf_counter()
    kept = np.flatnonzero(components.kept)
    p_nodule[kept], follow = score_ct_then(
        models.nodule, models.malignancy, ct, components.center_xyz[kept], width_irc=models.width_irc,
        batch_size=max(config.batch_size, 64), flips=config.tta, above=config.nodule_threshold,
        stages=models.shared_stages,
    )  # fmt: skip
    p_malignant[kept[follow.rows]] = follow.probability  # the likely nodules: p_nodule above the threshold
    likely = np.flatnonzero(p_nodule > config.nodule_threshold)
    seconds["classification"] = time.perf_counter() - started - follow.seconds
    seconds["malignancy"] = follow.seconds
    log.info(
        "%s: %d components (%d kept), %d nodules above %.2f; %s",
        ct.series_uid, len(components), len(kept), len(likely), config.nodule_threshold,
        ", ".join(f"{step} {seconds[step]:.1f} s" for step in STEPS),
    )  # fmt: skip
    labels = None if config.mask_format == "none" else labels
    return CtResult(ct, components, p_nodule, p_malignant, seconds, labels, probability)


def nodule_rows(p_nodule: np.ndarray, threshold: float) -> np.ndarray:
    """The component rows of nodules.csv, in its order: p_nodule (n,) above `threshold`, most probable first
    (ties in component order). Row k of the result is label k + 1 of the label map."""
    above = np.flatnonzero(np.asarray(p_nodule) > threshold)
    return above[np.argsort(-np.asarray(p_nodule)[above], kind="stable")]


def component_table(result: CtResult, threshold: float) -> pd.DataFrame:
    """Every component of one CT: seriesuid, coordX/Y/Z (mm), diameter_mm, voxels, kept, reason, p_nodule,
    p_malignant, then where it is (`labelmap.POSITION_COLUMNS`: voxel, slice number, DICOM slice) and its
    label in the label map (its row of nodules.csv, 1-based; 0: not a nodule), p_segmentation, found_by."""
    c = result.components
    label = np.zeros(len(c), dtype=np.int64)
    rows = nodule_rows(result.p_nodule, threshold)
    label[rows] = np.arange(1, len(rows) + 1)
    frame = pd.DataFrame(
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
    positions = slice_positions(result.ct, c.center_irc)
    return pd.concat([frame, positions], axis=1).assign(label=label, p_segmentation=c.score, found_by=c.source)


# The columns other tools and tests read come first, in their original order; positions and the label after.
COMPONENT_COLUMNS = (
    "seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "voxels", "kept", "reason", "p_nodule", "p_malignant",
    *POSITION_COLUMNS, "label", "p_segmentation", "found_by",
)  # fmt: skip
NODULE_COLUMNS = (
    "seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "p_nodule", "p_malignant", *POSITION_COLUMNS, "label",
)  # fmt: skip


def nodule_table(components: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The components above the nodule threshold, most probable first (nodules.csv); row k has label k + 1."""
    rows = nodule_rows(components["p_nodule"].to_numpy(dtype=np.float64), threshold)
    return components.iloc[rows][list(NODULE_COLUMNS)].reset_index(drop=True)


def write_ct_outputs(result: CtResult, models: Models, config: AnalysisConfig, out_dir: Path) -> CtReport:
    """nodules.csv, components.csv, the label map (probability map; a DICOM CT itself) on the CT's grid, picture
    sheets of the --max-pictures most probable nodules and analysis.json of one CT in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    components = component_table(result, config.nodule_threshold)
    nodules = nodule_table(components, config.nodule_threshold)
    write_text_atomic(out_dir / "nodules.csv", nodules.to_csv(index=False))
    write_text_atomic(out_dir / "components.csv", components.to_csv(index=False))
    volumes = write_volumes(result, nodule_rows(result.p_nodule, config.nodule_threshold), config, out_dir)
    pictures = draw_nodules(result.ct, nodules, config, out_dir)
    summary = ct_summary(result, components, nodules, models, config, volumes)
    summary["pictures"] = sorted({sheet for sheet, _ in pictures.values()})
    summary["nodules_drawn"] = len(pictures)
    write_text_atomic(out_dir / "analysis.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return CtReport(out_dir, summary, nodules, pictures)


def write_volumes(result: CtResult, rows: np.ndarray, config: AnalysisConfig, out_dir: Path) -> dict[str, str]:
    """In --mask-format, on the CT's grid: nodules_mask (label k + 1 on the voxels of component rows[k]), with
    --write-probability nodules_probability (uint8, P × 255), for a DICOM CT the CT (int16 HU as analysed);
    returns {what: file name}."""
    for stem in VOLUME_STEMS:  # an earlier run's volumes, perhaps in another format, would contradict this one's
        for fmt in MASK_FORMATS:
            (out_dir / volume_name(stem, fmt)).unlink(missing_ok=True)
        (out_dir / f"{stem}.zraw").unlink(missing_ok=True)
    if config.mask_format == "none" or result.labels is None:
        return {}
    ct, fmt = result.ct, config.mask_format
    mask = label_volume(result.labels, rows)
    files = {"label_map": write_volume(image_on_grid(mask, ct), out_dir / volume_name("nodules_mask", fmt)).name}
    del mask
    if result.probability is not None:
        path = out_dir / volume_name("nodules_probability", fmt)
        files["probability_map"] = write_volume(image_on_grid(result.probability, ct), path).name
    if ct.dicom_slices is not None:
        files["ct"] = write_volume(image_on_grid(ct.hu, ct), out_dir / volume_name("ct", fmt)).name
    return files


def draw_nodules(ct: Ct, nodules: pd.DataFrame, config: AnalysisConfig, out_dir: Path) -> dict[int, tuple[str, int]]:
    """Sheets `nodules_NN.png` of the --max-pictures most probable nodules (none with --no-pictures; older sheets
    in `out_dir` are removed); returns {label: (sheet file name, row on it, 0-based)}."""
    for old in out_dir.glob("nodules_*.png"):
        old.unlink()
    count = min(len(nodules), config.max_pictures if config.pictures else 0)
    if count < len(nodules) and count:
        log.info(
            "%s: %d nodules; pictures of the %d most probable (--max-pictures %d); nodules.csv and report.html "
            "list all", ct.series_uid, len(nodules), count, config.max_pictures,
        )  # fmt: skip
    findings = [
        Finding(DETECTED, int(row.label), row.seriesuid, (row.coordX, row.coordY, row.coordZ), row.diameter_mm,
                row.p_nodule, row.p_malignant)
        for row in nodules.head(count).itertuples(index=False)
    ]  # fmt: skip
    written = write_sheets(findings, None, out_dir, "nodules", cts={ct.series_uid: ct}) if findings else []
    return {f.rank: (path.name, row) for path, on_sheet in written for row, f in enumerate(on_sheet)}


def _source_kind(ct: Ct) -> str:
    if ct.dicom_slices is not None:
        return "DICOM"
    suffix = image_suffix(ct.source)
    if suffix is not None:
        return "NIfTI" if suffix.startswith(".nii") else "NRRD"
    return "MetaIO"


def ct_summary(
    result: CtResult, components: pd.DataFrame, nodules: pd.DataFrame, models: Models, config: AnalysisConfig,
    volumes: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    """analysis.json of one CT (without its pictures)."""
    ct = result.ct
    return {
        "format": ANALYSIS_FORMAT,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "series_uid": ct.series_uid,
        "source": str(getattr(ct, "source", ct.mhd_path)),
        "source_kind": _source_kind(ct),
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
        "files": {"nodules": "nodules.csv", "components": "components.csv", **volumes},
        "volumes": VOLUME_NOTES if volumes else {},
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        "segmentation_threshold": models.segmentation_threshold,
        "models": models.describe(),
        **models.run_info(),
        "settings": config.to_dict(),
        "versions": versions(),
    }


VOLUME_STEMS = ("nodules_mask", "nodules_probability", "ct")  # the volumes write_volumes may write
VOLUME_NOTES = {
    "grid": "every volume lies on the CT's grid: same size, spacing, origin and direction",
    "label_map": "label k on the voxels of row k of nodules.csv (its 'label' column), 0 elsewhere",
    "probability_map": f"uint8: P(nodule voxel) = value / {PROBABILITY_SCALE}",
    "ct": "DICOM input only: the CT as analysed, int16 HU clipped to [-1000, 1000]",
    "slice_number": "1-based: voxel_index + 1, counted from the first slice of the volume (DICOM: the lowest "
    "along the slice normal); instance_number is the DICOM InstanceNumber of that slice",
}


# ---------------------------------------------------------------------------------------------
# many CTs, validation

# ---------------------------------------------------------------------------------------------
# many CTs


ALL_SERIES = "all"  # --dicom-series all: every CT volume of each DICOM folder


@dataclasses.dataclass(frozen=True)
class CtInput:
    """One CT to read: a spec of `load_ct_input`, the DICOM series (None: the folder's only one), and whether
    a failed check only skips it (one of several volumes that --dicom-series all found in a folder)."""

    spec: str
    dicom_series: str | None = None
    optional: bool = False


def expand_inputs(specs: Sequence[str], dicom_series: str | None) -> list[CtInput]:
    """The CTs named by `specs`: with --dicom-series all, each DICOM folder becomes its CT volumes
    (`dicom.volume_series`; the other series are logged as set aside), else `dicom_series` goes with each spec."""
    if dicom_series != ALL_SERIES:
        return [CtInput(spec, dicom_series) for spec in specs]
    expanded = []
    for spec in specs:
        if not Path(spec).is_dir():
            expanded.append(CtInput(spec))
            continue
        volumes, others = volume_series(spec)
        for series, why in others:
            log.warning("%s: series %s set aside: %s", spec, series.series_uid, why)
        if not volumes:
            found = "; ".join(f"{series.series_uid}: {why}" for series, why in others) or "no DICOM series"
            raise DataNotFoundError(f"{spec}: --dicom-series all found no CT volume (CT modality, ≥ 2 images): {found}")
        expanded += [CtInput(spec, series.series_uid, optional=len(volumes) > 1) for series in volumes]
    return expanded


def _loaded(
    inputs: Sequence[CtInput], config: AnalysisConfig, data_root: Path | None, pool, skipped: list[str]
) -> Iterator[Ct | None]:
    """The CTs of `inputs` in order (None for an optional one that failed its checks, named in `skipped`);
    with a pool, the next one is read while this one is analysed."""

    def load(item: CtInput) -> Ct | None:
        hu_offset = config.hu_offset if image_suffix(item.spec) else 0
        try:
            return load_ct_input(item.spec, data_root, item.dicom_series, hu_offset)
        except DataFormatError as exc:
            if not item.optional:
                raise
            log.warning("skipped: %s", exc)
            skipped.append(str(exc))
            return None

    if pool is None:
        for item in inputs:
            yield load(item)
        return
    pending = pool.submit(load, inputs[0]) if inputs else None
    for k in range(len(inputs)):
        ct = pending.result()
        pending = pool.submit(load, inputs[k + 1]) if k + 1 < len(inputs) else None
        yield ct
        del ct


def analyse_many(
    specs: Sequence[str], models: Models, config: AnalysisConfig, out: Path, data_root: Path | None, num_workers: int
) -> tuple[pd.DataFrame, list[CtReport], list[str]]:
    """Analyse every CT of `specs`, each into `out/<series_uid>/`; returns (all components, what the report shows
    of each CT, the series --dicom-series all skipped, with why)."""
    inputs = expand_inputs(specs, config.dicom_series)
    tables, reports, skipped = [], [], []
    pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 0 and len(inputs) > 1 else None
    try:
        for ct in _loaded(inputs, config, data_root, pool, skipped):
            if ct is None:
                continue
            result = analyse_ct(ct, models, config)
            reports.append(write_ct_outputs(result, models, config, out / ct.series_uid))
            tables.append(component_table(result, config.nodule_threshold))
            del result, ct
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(COMPONENT_COLUMNS))
    return frame, reports, skipped


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
    warn_if_trained_on(parts["validation"], uids, data_root, models)
    if config.include_train:
        parts["train"] = [str(u) for u in split.train]
    return data_root, parts


def warn_if_trained_on(validation: Sequence[str], uids: Sequence[str], data_root: Path, models: Models) -> list[str]:
    """Warn (and return the lines) when the segmentation or malignancy model trained on validation CTs of the
    classifier's split (another --val-fraction, seed or split mode): the detector's scores are then optimistic."""
    lines = []
    wanted = set(validation)
    for kind, config in models.other_configs.items():
        settings = getattr(config, "split_settings", None)
        if settings is None or getattr(config, "split", "stride") == "stride":
            continue
        try:
            trained = set(map(str, split_series(uids, config.split, **settings(), data_root=data_root).train))
        except P2chError as exc:  # its split settings do not fit this data root: nothing to compare
            log.info("the %s model's split cannot be made on %s (%s)", kind, data_root, exc)
            continue
        trained &= wanted
        if trained:
            lines.append(
                f"the {kind} model trained on {len(trained)} of the {len(wanted)} validation CTs (its split: "
                f"{config.split}, --val-fraction {config.val_fraction}; the classifier's differs), so the detector's "
                "scores are optimistic; train every model with the same split settings"
            )
            log.warning("%s", lines[-1])
    return lines


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


def shown_confusion(confusion: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The rows and columns of the confusion matrix worth showing: those with any count, and always the book's
    three rows and four columns (in CONFUSION_ROWS / CONFUSION_COLUMNS order)."""
    columns = [c for c in CONFUSION_COLUMNS if c in CONFUSION_COLUMNS[:4] or any(r[c] for r in confusion.values())]
    rows = [r for r in CONFUSION_ROWS if r in CONFUSION_ROWS[:3] or any(confusion[r].values())]
    return {r: {c: confusion[r][c] for c in columns} for r in rows}


def format_confusion(confusion: dict[str, dict[str, int]]) -> str:
    """The confusion matrix as a text table (rows and columns with any count; the book's four columns always)."""
    shown = shown_confusion(confusion)
    rows, columns = list(shown), list(next(iter(shown.values())))
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
        "operating_point": result.operating_point(config.nodule_threshold),
        "suggested_threshold": result.suggested_threshold(SUGGEST_FPS_PER_NODULE),
        "confusion": confusion,
        "models": models.describe(),
        **models.run_info(),
        "settings": config.to_dict(),
        "versions": versions(),
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    cpm = "undefined (no nodules)" if result.num_nodules == 0 else _cpm_text(result)
    surface = int((components["kept"].astype(bool) & (components["found_by"] == "lung surface")).sum())
    report = (
        f"{name}: {len(uids)} CTs, {result.num_nodules} nodules, {len(submission)} candidates ({surface} from the "
        f"lungs' surface; {result.num_detected} nodules hit); detection CPM {cpm}\n"
        f"{_operating_point_text(metrics['operating_point'])}\n"
        f"{suggestion_text(metrics['suggested_threshold'])}\n"
        f"{format_confusion(confusion)}\n"
    )
    write_text_atomic(out / "report.txt", report)
    part = PartReport(name, out, len(uids), cpm, shown_confusion(confusion))
    return {"result": result, "report": report, "metrics": metrics, "part": part}


def _operating_point_text(point: dict[str, Any]) -> str:
    """One line: what the --nodule-threshold finds (the point the README recommends choosing by)."""
    found, per_nodule = "", ""
    if point["num_nodules"]:
        found = f"{point['nodules_detected']} of {point['num_nodules']} nodules found ({point['sensitivity']:.0%}), "
        per_nodule = f", {point['fps_per_nodule']:.2f} per true nodule"
    false_positives = f"{point['false_positives']} false positives ({point['fps_per_scan']:.2f} per CT{per_nodule})"
    return f"at --nodule-threshold {point['threshold']:g}: {found}{false_positives}"


def suggestion_text(point: dict[str, Any] | None) -> str:
    """One line: the --nodule-threshold that finds the most nodules at ≤ SUGGEST_FPS_PER_NODULE false positives per
    true nodule (`FrocResult.suggested_threshold`)."""
    price = f"≤ {SUGGEST_FPS_PER_NODULE:g} false positive per true nodule"
    if point is None:
        return f"suggested --nodule-threshold: none (no nodules, or no threshold finds one at {price})"
    return f"suggested (the most nodules at {price}): {_operating_point_text(point)}"


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
        "nodules.csv, components.csv (mm, voxel and slice positions), analysis.json, a label map on the CT's grid "
        "(nodules_mask.nii.gz; for DICOM also ct.nii.gz) and picture sheets per CT, and one report.html; "
        "--run-validation scores the whole detector the LUNA16 way (FROC/CPM with CI) and prints the book's "
        "confusion matrix.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Examples: python -m p2ch.nodule_analysis 1.3.6.1.4.1.14519.5.2.1.6279.6001.1057566580315150620… "
        "(a series of the data root); "
        "python -m p2ch.nodule_analysis scan.mhd scan2.nii.gz dicom_folder/ --out results; "
        "python -m p2ch.nodule_analysis study_folder/ --dicom-series all; "
        "python -m p2ch.nodule_analysis --run-validation --include-train",
    )
    parser.add_argument(
        "inputs", nargs="*", metavar="CT",
        help="series uid(s) of the data root (comma-separated as the book's series_uid also works), .mhd files, "
        "NIfTI/NRRD files (.nii, .nii.gz, .nrrd, .nhdr) or folders of DICOM files (one series each; see "
        "--dicom-series)",
    )  # fmt: skip
    _add_model_arguments(parser.add_argument_group("models (default: the newest best.pt of each kind)"))
    _add_data_arguments(parser.add_argument_group("data"))
    _add_detector_arguments(parser.add_argument_group("detector"), d)
    _add_validation_arguments(parser.add_argument_group("validation"), d)
    _add_speed_arguments(parser.add_argument_group("speed"))
    _add_output_arguments(parser.add_argument_group("output"), d)
    return parser


def _add_speed_arguments(speed: argparse._ArgumentGroup) -> None:
    add_inference_arguments(speed, cpu_bf16=True)
    for action in speed._group_actions:
        if action.dest == "batch_size":
            action.help = (
                f"slices per forward pass of the segmentation (default: {SEGMENTATION_BATCH['cpu']} on the CPU, where "
                f"small batches stay in the caches, {SEGMENTATION_BATCH['cuda']} on CUDA); the classifiers take at "
                "least 64 candidates"
            )
    speed.add_argument(
        "--num-workers", type=int, default=1,
        help="threads reading the next CTs while one is analysed (0: read each when its turn comes)",
    )  # fmt: skip


def _add_output_arguments(out: argparse._ArgumentGroup, d: AnalysisConfig) -> None:
    out.add_argument("--out", default=None, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT_DIR}/<time>)")
    out.add_argument("--no-pictures", action="store_true", help="no picture sheets of the nodules found")
    out.add_argument(
        "--max-pictures", type=int, default=d.max_pictures, metavar="N",
        help="picture sheets for the N most probable nodules of each CT (nodules.csv and report.html list all)",
    )  # fmt: skip
    out.add_argument(
        "--mask-format", default=d.mask_format, choices=(*MASK_FORMATS, "none"),
        help="format of nodules_mask (label k = row k of nodules.csv, on the CT's grid) and, for a DICOM input, "
        "of the CT itself (ct.<format>), for viewers; none: neither",
    )  # fmt: skip
    out.add_argument(
        "--write-probability", action="store_true",
        help=f"also nodules_probability.<format>: the segmentation's P(nodule voxel) as uint8, P = value / "
        f"{PROBABILITY_SCALE}",
    )  # fmt: skip
    out.add_argument(
        "--write-candidates", action="store_true",
        help="also write every kept component of all CTs as a LUNA16 candidates.csv in --out (class from "
        "annotations.csv when the data root has one)",
    )  # fmt: skip
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--log-level", default=d.log_level, choices=("DEBUG", "INFO", "WARNING", "ERROR"))


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
        "--dicom-series", default=None, metavar="UID",
        help=f"the series to read from a DICOM folder with several; {ALL_SERIES}: each CT volume of every folder "
        "(series of other modalities or of one image are set aside, and a volume that fails a check is skipped, "
        "each with a warning)",
    )  # fmt: skip
    g.add_argument(
        "--hu-offset", type=int, default=0, metavar="N",
        help="add N to every voxel of NIfTI/NRRD inputs, for files known to store HU + 1024 without a rescale "
        "(-1024); such files are refused as likely unrescaled without it",
    )  # fmt: skip


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
    g.add_argument(
        "--max-candidates", type=int, default=d.max_candidates,
        help="the segmentation's candidates per CT passed to the classifier: those it is surest of (the rest: "
        "over_max_candidates; 0: no limit); --surface-candidates come on top",
    )  # fmt: skip
    g.add_argument(
        "--surface-candidates", type=int, default=d.surface_candidates,
        help="at most this many candidates per CT from the lungs' surface: compact bumps of tissue the lungs' "
        "air wraps around (nodules on the chest wall or the mediastinum, which the segmentation misses most), "
        "on top of --max-candidates, never in place of one (0: none; off with --no-lung-mask)",
    )  # fmt: skip
    g.add_argument(
        "--no-lung-mask", dest="lung_mask", action="store_false",
        help="segment the whole CT and keep candidates outside the lungs too (default: the lungs' box is "
        "segmented and a candidate must touch the lungs; a CT without lungs found is segmented whole)",
    )  # fmt: skip
    g.add_argument(
        "--candidate-centre", choices=CENTRES, default=d.candidate_centre,
        help="where a candidate sits: its region's probability-weighted centre, or its density-weighted one "
        "(HU + 1001, the book's)",
    )  # fmt: skip
    g.add_argument(
        "--no-tta", dest="tta", action="store_false",
        help="one look per candidate (default: the classifiers' mean over the chunk and its 7 mirror images)",
    )  # fmt: skip
    g.add_argument(
        "--no-split", dest="split", action="store_false",
        help="one candidate per connected component (default: a component is split at its probability peaks)",
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
    values["batch_size"] = resolve_batch_size(
        args.batch_size, args.device, SEGMENTATION_BATCH["cpu"], SEGMENTATION_BATCH["cuda"]
    )
    config = AnalysisConfig(
        **{**values, "inputs": inputs, "pictures": not args.no_pictures, "progress": not args.no_progress}
    )
    config.validate()
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be ≥ 0, got {args.num_workers}")
    return config


def run(args: argparse.Namespace) -> int:
    """Analyse the CTs given and/or the validation series; write report.html; print where everything went."""
    config = config_from_args(args)
    run_time = datetime.datetime.now().strftime("%Y-%m-%d_%H.%M.%S")
    out = check_output_dir(Path(config.out) if config.out else DEFAULT_OUT_DIR / run_time, "--out")
    if config.run_validation:
        check_output_dir(resolve_runs_dir(config.runs_dir), "--runs-dir")
    models = load_models(config)
    data_root = resolve_data_root(config.data_root or models.classifier_config.data_root)
    tables, lines, cts, parts = [], [], [], []
    if config.inputs:
        components, cts, skipped = analyse_many(config.inputs, models, config, out, data_root, args.num_workers)
        if skipped and not cts:
            raise DataFormatError(f"no CT could be analysed: {'; '.join(skipped)}")
        tables.append(components)
        for ct in cts:
            uid, counts = ct.summary["series_uid"], ct.summary["counts"]
            lines.append(
                f"{uid}: {counts['nodules']} nodule(s), {counts['malignant']} malignant → {ct.folder}/nodules.csv"
            )
        lines += [f"skipped: {why}" for why in skipped]
    if config.run_validation:
        lines += _run_validation(config, models, out, run_time, args.num_workers, tables, cts, parts)
    if config.write_candidates:
        everything = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(COMPONENT_COLUMNS))
        positives = write_candidates(everything, data_root, out / "candidates.csv")
        lines.append(f"candidates: {int(everything['kept'].sum())} rows ({positives} class 1) → {out}/candidates.csv")
    header = {
        "time": run_time, "models": models.describe(), "nodule_threshold": config.nodule_threshold,
        "malignancy_threshold": config.malignancy_threshold, "version": versions().get("p2ch", ""),
    }  # fmt: skip
    lines.append(f"report: {write_report(out, cts, parts, header)}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _run_validation(
    config: AnalysisConfig, models: Models, out: Path, run_time: str, num_workers: int, tables: list[pd.DataFrame],
    cts: list[CtReport], parts: list[PartReport],
) -> list[str]:  # fmt: skip
    data_root, uids_of = validation_parts(config, models)
    scored = {}
    for name, uids in uids_of.items():
        log.info("%s: %d series of %s", name, len(uids), data_root)
        components, reports, _ = analyse_many(uids, models, config, out / name, data_root, num_workers)
        tables.append(components)
        cts += reports
        scored[name] = write_part_outputs(name, uids, components, data_root, config, models, out / name)
        parts.append(scored[name]["part"])
    tb_root = log_to_tensorboard(scored, config, run_time)
    return [part["report"] + f"→ {out / name}/ (TensorBoard: {tb_root})" for name, part in scored.items()]


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(args.log_level)
    return run_cli(PROG, lambda: run(args), "interrupted; the CTs analysed so far have their folders in --out")


if __name__ == "__main__":
    sys.exit(main())
