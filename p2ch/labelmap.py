"""Results where viewers read them: label maps, the probability map and the CT itself on the CT's own grid,
and the voxel and slice positions users navigate by.

A viewer (3D Slicer, ITK-SNAP, a PACS with a NIfTI import) overlays one image on another only when
both share the grid: size, spacing, origin and direction. Every image here is built from the `Ct`
it belongs to (`image_on_grid`), so it lies exactly on that CT's voxels; SimpleITK converts ITK's
LPS to NIfTI's RAS (and NRRD's declared space) when writing, as it does when reading.

- `label_volume`: label k on the voxels of the k-th nodule (1-based, the row order of nodules.csv),
  0 elsewhere; uint8 up to 255 nodules, uint16 up to 65,535, else uint32.
- `probability_volume`: the segmentation model's P(nodule voxel) as uint8, round(255 × P): a value
  v means P = v / 255 (NIfTI cannot hold float16, and float32 would be 4 bytes a voxel).
- `slice_positions`: for centres in voxels, the voxel (index, row, col), the 1-based slice number
  (`voxel_index + 1`: slice 1 is the first slice of the volume as stored and as p2ch indexes it, the
  count a viewer shows when it numbers the volume's slices from its first; for a DICOM folder, p2ch
  orders slices along the slice normal, so slice 1 is the lowest position: the feet end of an axial
  series in the usual orientation) and, for a DICOM CT, the InstanceNumber, SOPInstanceUID and file of
  that slice (a PACS numbers slices by InstanceNumber, which may run the other way).
- `write_volume`: one image in `FORMATS` (compressed: `.nii.gz`; `.mhd` + `.zraw`; `.nrrd` gzip),
  written beside its final name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from p2ch.cli import signals_deferred

FORMATS = ("nii.gz", "mhd", "nrrd")
PROBABILITY_SCALE = 255  # a probability map's value v means P = v / 255
_SLAB = 16  # slices converted at a time (a float32 copy of a whole CT is ~300 MB)


def image_on_grid(values: np.ndarray, ct) -> sitk.Image:
    """values (I, R, C) of any pixel type SimpleITK holds → an image on `ct`'s grid (spacing, origin, direction).

    ct: a `p2ch.ct.Ct` (or anything with `hu`, `voxel_size_xyz`, `origin_xyz`, `direction`) of the same shape.
    """
    if values.shape != ct.hu.shape:
        raise ValueError(f"values of shape {values.shape} are not on the CT's grid {ct.hu.shape}")
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(tuple(float(v) for v in ct.voxel_size_xyz))
    image.SetOrigin(tuple(float(v) for v in ct.origin_xyz))
    image.SetDirection(tuple(float(v) for v in np.asarray(ct.direction, dtype=np.float64).ravel()))
    return image


def label_dtype(count: int) -> np.dtype:
    """The smallest unsigned type holding labels 0..count."""
    return np.dtype(np.uint8 if count <= 0xFF else np.uint16 if count <= 0xFFFF else np.uint32)


def label_volume(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The label map of nodules.csv: (I, R, C) unsigned, k + 1 on the voxels of component `rows[k]`, 0 elsewhere.

    labels: (I, R, C) int32, j + 1 on the voxels of component row j (`detect.find_components(...,
    return_labels=True)`), 0 elsewhere. rows: (n,) int, the component row of each nodule in nodules.csv order.
    """
    rows = np.asarray(rows, dtype=np.int64)
    # a row may have no voxel left in `labels` (a candidate from the lungs' surface inside a segmented region)
    size = max(int(labels.max(initial=0)), int(rows.max(initial=-1)) + 1) + 1
    lookup = np.zeros(size, dtype=label_dtype(len(rows)))
    lookup[rows + 1] = np.arange(1, len(rows) + 1)
    out = np.empty(labels.shape, dtype=lookup.dtype)
    for start in range(0, len(labels), _SLAB):  # slab by slab: no int64 index copy of the whole volume
        np.take(lookup, labels[start : start + _SLAB], out=out[start : start + _SLAB])
    return out


def probability_volume(prob: np.ndarray) -> np.ndarray:
    """prob (I, R, C) float in [0, 1] → (I, R, C) uint8 round(255 × P) (`PROBABILITY_SCALE`)."""
    out = np.empty(prob.shape, dtype=np.uint8)
    for start in range(0, len(prob), _SLAB):
        slab = np.clip(prob[start : start + _SLAB].astype(np.float32), 0.0, 1.0) * PROBABILITY_SCALE
        np.rint(slab, out=slab)
        out[start : start + _SLAB] = slab
    return out


POSITION_COLUMNS = (
    "voxel_index", "voxel_row", "voxel_col", "slice_number", "instance_number", "sop_instance_uid", "dicom_file",
)  # fmt: skip


def slice_positions(ct, center_irc: np.ndarray) -> pd.DataFrame:
    """The POSITION_COLUMNS of centres in `ct`: center_irc (n, 3) float continuous voxel index → voxel_index,
    voxel_row, voxel_col (int64, rounded as `Ct.xyz2irc` rounds), slice_number (int64, voxel_index + 1), and
    from `ct.dicom_slices` (a DICOM CT; else empty) instance_number (nullable Int64), sop_instance_uid and
    dicom_file (str). A centre of mass lies within its component, so every voxel is inside the CT.
    """
    voxel = np.rint(np.asarray(center_irc, dtype=np.float64)).astype(np.int64).reshape(-1, 3)
    index = voxel[:, 0]
    refs = getattr(ct, "dicom_slices", None)
    if refs is None:
        instance = pd.array([pd.NA] * len(index), dtype="Int64")
        sop_uid = file_name = np.full(len(index), "", dtype=object)
    else:
        instance = pd.array([refs.instance_numbers[i] for i in index], dtype="Int64")
        sop_uid = np.array([refs.sop_instance_uids[i] for i in index], dtype=object)
        file_name = np.array([refs.file_names[i] for i in index], dtype=object)
    return pd.DataFrame(
        {
            "voxel_index": index,
            "voxel_row": voxel[:, 1],
            "voxel_col": voxel[:, 2],
            "slice_number": index + 1,
            "instance_number": instance,
            "sop_instance_uid": sop_uid,
            "dicom_file": file_name,
        }
    )


def volume_name(stem: str, fmt: str) -> str:
    """`<stem>.<fmt>` after checking `fmt` is one of FORMATS."""
    if fmt not in FORMATS:
        raise ValueError(f"image format {fmt!r}: expected one of {FORMATS}")
    return f"{stem}.{fmt}"


def write_volume(image: sitk.Image, path: str | os.PathLike[str]) -> Path:
    """Write `image` compressed to `path` (its suffix picks the format: .nii.gz, .mhd, .nrrd); returns `path`.

    Written under a temporary name in the same folder and renamed (a `.mhd`'s data file first, its header
    last), with Ctrl-C and SIGTERM deferred until the file is whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    with signals_deferred(), tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        staged = Path(tmp) / f"{path.name[: -len(suffix)]}{suffix}"
        # SimpleITK's default zlib level: level 1 wrote a 512 × 512 × 250 CT (.mhd) 1.6× faster but 30 % larger, and
        # a label map 10× larger (BENCHMARKS.md); NIfTI's writer ignores the level anyway.
        sitk.WriteImage(image, str(staged), True)
        if suffix == ".mhd":
            data = staged.with_suffix(".zraw")
            os.replace(data, path.with_suffix(".zraw"))
        os.replace(staged, path)
    return path
