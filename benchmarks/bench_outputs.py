"""What nodule_analysis's viewer outputs and new inputs cost (issue 24), on one CT of a typical size.

1. Reading: the same CT as `.mhd`, as `.nii.gz` (p2ch's checks against SimpleITK's read alone; the gzip
   trailer makes the completeness check free; counting the decompressed bytes, the slow path, costs what
   is printed) and as a DICOM folder (the series read, then the per-slice references: InstanceNumber,
   SOPInstanceUID, file).
2. Writing on the CT's grid: the label map (uint8), a probability map (uint8) and the CT (int16) in each
   `--mask-format` (SimpleITK's default zlib level, as `labelmap.write_volume`), and at zlib level 1, with the
   file sizes.
3. Pictures: `vis.write_sheets` for the 20 most probable of many nodules (`--max-pictures 20`) against 200.
4. report.html for one CT with 2,920 nodules (the count a weak model gave on a real CT).

    .venv/bin/python benchmarks/bench_outputs.py --work /tmp/bench-outputs      # a 512 × 512 × 250 CT

Prints the figures and one JSON line. The synthetic CT is generated once into --work and reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.ndimage
import SimpleITK as sitk

from p2ch import dicom, imagefile, synth
from p2ch.ct import load_dicom, load_image_file, load_mhd
from p2ch.labelmap import (
    FORMATS,
    image_on_grid,
    label_volume,
    probability_volume,
    slice_positions,
    volume_name,
    write_volume,
)
from p2ch.report import CtReport, write_report
from p2ch.vis import DETECTED, Finding, write_sheets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_dicom import write_dicom_series  # the tests' DICOM writer: one file per slice, with SimpleITK


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder for the synthetic CT and its copies (kept)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodules", type=int, default=2920, help="rows of the report's one CT")
    return parser


def timed(repeats: int, fn) -> tuple[float, object]:
    """(median seconds of `repeats` calls, the last result)."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def prepare(work: Path, size: int, slices: int) -> tuple[Path, Path, Path, Path]:
    """(.mhd, its true nodule mask .mhd, .nii.gz copy, DICOM folder) of one synthetic CT, made once."""
    luna = work / "luna"
    if not list(luna.glob("subset*/*.mhd")):
        synth.generate(luna, num_cts=1, size=size, slices=slices, nodules_per_ct=6, masks=True, workers=1)
    mhd = sorted(luna.glob("subset*/*.mhd"))[0]
    nifti = work / f"{mhd.stem}.nii.gz"
    if not nifti.exists():
        sitk.WriteImage(sitk.ReadImage(str(mhd)), str(nifti))
    folder = work / "dicom"
    if not folder.exists():
        ct = load_mhd(mhd)
        write_dicom_series(folder, ct.hu, spacing_xyz=ct.voxel_size_xyz, origin_xyz=ct.origin_xyz, series_uid=mhd.stem)
    return mhd, luna / "masks" / mhd.name, nifti, folder


def bench_reading(mhd: Path, nifti: Path, folder: Path, repeats: int) -> dict[str, float]:
    figures = {"mhd_s": timed(repeats, lambda: load_mhd(mhd))[0]}
    figures["nifti_s"] = timed(repeats, lambda: load_image_file(nifti))[0]
    figures["nifti_simpleitk_read_s"] = timed(repeats, lambda: sitk.ReadImage(str(nifti)))[0]
    figures["nifti_count_bytes_slow_path_s"] = timed(repeats, lambda: imagefile._stored_bytes(nifti))[0]
    figures["dicom_s"] = timed(repeats, lambda: load_dicom(folder))[0]
    image, uid = dicom.read_dicom_image(folder)
    figures["dicom_slice_references_s"] = timed(repeats, lambda: dicom.read_slice_references(folder, uid, image))[0]
    return figures


def bench_writing(ct, mask_path: Path, repeats: int) -> dict[str, float]:
    labels, count = scipy.ndimage.label(sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0)
    labels = labels.astype(np.int32)
    figures = {"components": count}
    figures["label_volume_s"], mask = timed(repeats, lambda: label_volume(labels, np.arange(count)))
    blurred = scipy.ndimage.gaussian_filter((labels > 0).astype(np.float32), 2.0).astype(np.float16)
    figures["probability_volume_s"], probability = timed(repeats, lambda: probability_volume(blurred))
    volumes = {"mask": mask, "probability": probability, "ct": ct.hu}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            for name, values in volumes.items():
                folder = Path(tmp) / f"{name}-{fmt}"
                target = folder / volume_name(name, fmt)
                write = lambda v=values, p=target: write_volume(image_on_grid(v, ct), p)  # noqa: E731
                figures[f"{name}_{fmt}_s"] = timed(repeats, write)[0]
                figures[f"{name}_{fmt}_mb"] = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
                # zlib level 1 instead of SimpleITK's default, for the choice labelmap.write_volume makes
                fast = Path(tmp) / f"{name}-{fmt}-level1" / volume_name(name, fmt)
                fast.parent.mkdir()
                write = lambda v=values, p=fast: sitk.WriteImage(image_on_grid(v, ct), str(p), True, 1)  # noqa: E731
                figures[f"{name}_{fmt}_level1_s"] = timed(repeats, write)[0]
                figures[f"{name}_{fmt}_level1_mb"] = sum(p.stat().st_size for p in fast.parent.iterdir()) / 1e6
    return figures


def _findings(ct, count: int, rng: np.random.Generator) -> list[Finding]:
    shape = np.asarray(ct.hu.shape)
    irc = rng.uniform(0.2, 0.8, size=(count, 3)) * shape
    xyz = ct.origin_xyz + irc[:, ::-1] * np.asarray(ct.voxel_size_xyz)
    return [
        Finding(DETECTED, k + 1, ct.series_uid, tuple(map(float, xyz[k])), 6.0, 0.9 - k * 1e-4, 0.2)
        for k in range(count)
    ]


def bench_pictures(ct, nodules: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (20, 200):
            found = _findings(ct, count, rng)
            started = time.perf_counter()
            write_sheets(found, None, Path(tmp) / str(count), "nodules", cts={ct.series_uid: ct})
            figures[f"sheets_{count}_s"] = time.perf_counter() - started
        figures["sheets_per_nodule_s"] = figures["sheets_200_s"] / 200
        irc = rng.uniform(0.2, 0.8, size=(nodules, 3)) * np.asarray(ct.hu.shape)
        rows = pd.DataFrame(
            {"seriesuid": ct.series_uid, "coordX": 1.0, "coordY": 2.0, "coordZ": 3.0, "diameter_mm": 5.0,
             "p_nodule": np.linspace(0.99, 0.51, nodules), "p_malignant": 0.3}
        ).join(slice_positions(ct, irc)).assign(label=np.arange(1, nodules + 1))  # fmt: skip
        summary = {
            "series_uid": ct.series_uid, "source": "bench", "source_kind": "MetaIO", "created": "now",
            "ct": {"shape_irc": list(ct.hu.shape), "voxel_size_xyz": list(ct.voxel_size_xyz),
                   "origin_xyz": list(ct.origin_xyz), "direction": ct.direction.ravel().tolist()},
            "counts": {"components": nodules, "kept_by_size": nodules, "nodules": nodules, "malignant": 0},
            "seconds": {"segmentation": 1.0}, "files": {},
        }  # fmt: skip
        pictures = {k: ("nodules_01.png", (k - 1) % 4) for k in range(1, 21)}
        entry = CtReport(Path(tmp) / ct.series_uid, summary, rows, pictures)
        header = {"time": "bench", "models": {}, "nodule_threshold": 0.5, "malignancy_threshold": 0.5, "version": ""}
        started = time.perf_counter()
        path = write_report(Path(tmp), [entry], [], header)
        figures["report_s"] = time.perf_counter() - started
        figures["report_mb"] = path.stat().st_size / 1e6
    return figures


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mhd, mask, nifti, folder = prepare(work, args.size, args.slices)
    figures = {"ct_shape_irc": [args.slices, args.size, args.size]}
    figures.update(bench_reading(mhd, nifti, folder, args.repeats))
    ct = load_mhd(mhd)
    figures.update(bench_writing(ct, mask, args.repeats))
    figures.update(bench_pictures(ct, args.nodules))
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"{key:36s} {shown}")
    record = {
        "bench": "outputs",
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        **figures,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
