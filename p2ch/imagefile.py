"""A CT from one NIfTI or NRRD file (`.nii`, `.nii.gz`, `.nrrd`, `.nhdr`), checked before it is trusted.

SimpleITK reads these formats and converts their patient space to ITK's (LPS: x to the patient's
left, y to the back, z up): NIfTI stores RAS (x right, y front), so its reader flips x and y; NRRD
says which space it uses in its `space` field. It applies NIfTI's `scl_slope`/`scl_inter` (the
voxels come back as float32) and scales NIfTI's metres or microns to mm. What it lets through
silently, and `read_image_file` refuses in one line naming the file (`DataFormatError`):

- not one 3-D volume of one value per voxel: a 2-D image, a single slice, a 4-D series (a
  4-D file of one time point is read as 3-D and accepted), RGB or vector voxels;
- a voxel type that cannot hold Hounsfield units: unsigned (no rescale was stored, so the values
  are likely the scanner's 0..4095, air at about 0; see `--hu-offset`) or complex;
- a spacing that is not 3 positive finite numbers (SimpleITK reads NIfTI's pixdim 0 as 1 mm),
  an origin that is not finite, a direction matrix that is not orthonormal within
  `p2ch.geometry.DIRECTION_TOL`;
- no patient space: a NIfTI with neither qform nor sform (`qform_code = sform_code = 0`), an NRRD
  without `space`/`space directions` (SimpleITK would put 1 mm voxels at the origin, orientation
  unknown);
- a NIfTI whose sform is not what SimpleITK read (a sheared or scaled sform makes ITK fall back to
  the qform with only a console warning, placing every voxel elsewhere than the sform says);
- values that are not HU of a chest CT (`check_hu_range`): nan or infinite voxels; nothing below
  `AIR_MAX_HU` means no air.
  Values that start at 0 and reach ≥ 1000 are named as likely unrescaled (stored values without
  the rescale to HU); other values (e.g. normalised 0..1) as not HU.

A file known to store HU + 1024 as 0..4095 (unsigned, or signed without a rescale) can be read with
`hu_offset=-1024` (`--hu-offset -1024`): the offset is added to every voxel before the HU checks.
Nothing is guessed: without the offset such a file is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import DIRECTION_TOL, direction_error

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")
# A chest CT in HU has air (-1000 HU) around the body and in the lungs (about -850 HU), so its lowest
# voxel is far below this; stored values that were never rescaled start at 0 (air) instead.
AIR_MAX_HU = -500
UNRESCALED_MIN_HIGH = 1000  # values from 0 up to at least this look like a scanner's 0..4095 without the rescale
MAX_HU_OFFSET = 10000
_SIGNED_OR_FLOAT = frozenset(
    {sitk.sitkInt8, sitk.sitkInt16, sitk.sitkInt32, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64}
)
_UNSIGNED = frozenset({sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64})
_NIFTI_UNIT_MM = {1: 1000.0, 2: 1.0, 3: 0.001}  # xyzt_units & 7: metre, mm, micron (ITK scales to mm)
_SFORM_ATOL_MM = 1e-3  # the sform's text form has 6 significant digits
_SFORM_RTOL = 1e-4


def image_suffix(path: str | os.PathLike[str]) -> str | None:
    """The NIfTI/NRRD suffix of `path` (lower case, `.nii.gz` as one), or None for any other file name."""
    name = Path(path).name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), None)


def image_stem(path: str | os.PathLike[str]) -> str:
    """The file name without its NIfTI/NRRD suffix (`scan.nii.gz` → `scan`)."""
    name = Path(path).name
    suffix = image_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else Path(path).stem


def check_hu_offset(hu_offset: object) -> int:
    """`hu_offset` as an int in [-MAX_HU_OFFSET, MAX_HU_OFFSET], or ConfigError."""
    if isinstance(hu_offset, bool) or not isinstance(hu_offset, (int, np.integer)) or abs(hu_offset) > MAX_HU_OFFSET:
        raise ConfigError(
            f"--hu-offset {hu_offset!r}: expected an integer number of HU within ±{MAX_HU_OFFSET} "
            "(e.g. -1024 for a file that stores HU + 1024)"
        )
    return int(hu_offset)


@contextlib.contextmanager
def _itk_warnings_hidden() -> Iterator[None]:
    # ITK prints warnings (e.g. "unexpected scales in sform") to the console; our own checks name the problem.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _sitk_reason(exc: RuntimeError) -> str:
    # SimpleITK's first line names its own source file; the reason is on the lines after.
    # teem (NRRD) stacks its messages, the most specific last: keep the first and the last when they are long.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = lines[1:] or lines or [type(exc).__name__]
    reason = " ".join(lines)
    return reason if len(reason) <= 300 else f"{lines[0][:140]} … {lines[-1][:140]}"


def _read_information(path: Path) -> sitk.ImageFileReader:
    """A reader with the file's header read (no voxels yet)."""
    if not path.exists():
        raise DataNotFoundError(f"{path}: file not found")
    if path.is_dir():
        raise DataFormatError(f"{path}: a folder, not a NIfTI or NRRD file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _itk_warnings_hidden():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataFormatError(f"{path}: SimpleITK cannot read its header ({_sitk_reason(exc)})") from None
    return reader


def _check_shape(reader: sitk.ImageFileReader, path: Path) -> None:
    size = tuple(int(v) for v in reader.GetSize())
    shown = " × ".join(map(str, size))
    if reader.GetDimension() != 3:
        what = "a series of volumes (4-D); extract one volume" if reader.GetDimension() == 4 else "not a volume"
        raise DataFormatError(
            f"{path}: a {reader.GetDimension()}-D image of size {shown}: expected one 3-D CT volume ({what})"
        )
    if reader.GetNumberOfComponents() != 1:
        raise DataFormatError(
            f"{path}: {reader.GetNumberOfComponents()} values per voxel (RGB or vector data): expected 1 (a CT "
            "has one value per voxel)"
        )
    if min(size) < 1 or size[2] < 2:
        raise DataFormatError(f"{path}: size {shown}: expected a 3-D CT volume of at least 2 slices")


def _check_type(reader: sitk.ImageFileReader, path: Path, hu_offset: int) -> None:
    pixel = reader.GetPixelID()
    name = sitk.GetPixelIDValueAsString(pixel)
    if pixel in _UNSIGNED and not hu_offset:
        raise DataFormatError(
            f"{path}: voxels are {name} with no rescale to Hounsfield units, so they are likely unrescaled "
            "stored values (a CT in HU is signed: air is -1000 HU); if the file stores HU + 1024, pass "
            "--hu-offset -1024, else convert it to HU (signed or float voxels, or a NIfTI scl_slope/scl_inter)"
        )
    if pixel not in _SIGNED_OR_FLOAT and pixel not in _UNSIGNED:
        raise DataFormatError(f"{path}: voxels are {name}: expected a signed integer or float type holding HU")


def _check_geometry(reader: sitk.ImageFileReader, path: Path) -> None:
    spacing = np.array(reader.GetSpacing(), dtype=np.float64)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise DataFormatError(
            f"{path}: voxel spacing {tuple(spacing.tolist())}: expected 3 positive numbers (mm per voxel along x, y, z)"
        )
    origin = np.array(reader.GetOrigin(), dtype=np.float64)
    if not np.isfinite(origin).all():
        raise DataFormatError(f"{path}: origin {tuple(origin.tolist())}: expected 3 finite numbers (mm)")
    error = direction_error(reader.GetDirection())
    if not error <= DIRECTION_TOL:
        raise DataFormatError(
            f"{path}: direction matrix {[round(v, 6) for v in reader.GetDirection()]} is not orthonormal (max "
            f"|DDᵀ − I| = {error:.3g} > {DIRECTION_TOL:g}); expected unit axes at right angles (a sheared or "
            "resampled grid: resample it to an orthogonal one)"
        )


def _meta(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _meta_numbers(reader: sitk.ImageFileReader, key: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in _meta(reader, key).split()], dtype=np.float64)
    except ValueError:
        return np.array([], dtype=np.float64)


def _check_nifti_space(reader: sitk.ImageFileReader, path: Path) -> None:
    """A qform or sform present, and the sform (when set) the geometry SimpleITK read."""
    qform, sform = _meta(reader, "qform_code"), _meta(reader, "sform_code")
    if qform in ("", "0") and sform in ("", "0"):
        raise DataFormatError(
            f"{path}: no qform or sform (qform_code = sform_code = 0), so the file does not say where its voxels "
            "are in the patient; expected a NIfTI with its orientation (as dcm2niix writes it)"
        )
    if sform in ("", "0"):
        return
    rows = np.stack([_meta_numbers(reader, f"srow_{axis}") for axis in "xyz"]) if _srows_readable(reader) else None
    if rows is None:
        return
    units = int(_meta_numbers(reader, "xyzt_units")[0]) & 7 if _meta(reader, "xyzt_units") else 2
    rows = rows * _NIFTI_UNIT_MM.get(units, 1.0)
    direction = np.array(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = direction * np.array(reader.GetSpacing(), dtype=np.float64)[None, :]
    read = np.concatenate([matrix, np.array(reader.GetOrigin(), dtype=np.float64)[:, None]], axis=1)
    read[:2] *= -1.0  # LPS (what SimpleITK gives) → RAS (what the sform holds)
    if not np.allclose(rows, read, rtol=_SFORM_RTOL, atol=_SFORM_ATOL_MM):
        raise DataFormatError(
            f"{path}: its sform (srow_x/y/z {rows.round(4).tolist()}, RAS mm) is not a rotation and voxel spacing "
            "(sheared or scaled), so SimpleITK placed the voxels by the qform instead; expected a NIfTI whose sform "
            "is orthonormal (resample it to an orthogonal grid)"
        )


@dataclasses.dataclass(frozen=True)
class _NiftiHeader:
    """What we read of a NIfTI header ourselves: pixdim[1..3] (3,) as stored, the voxel data's offset and bytes."""

    pixdim: np.ndarray
    vox_offset: int
    data_bytes: int


def _nifti_header(data: bytes) -> _NiftiHeader | None:
    """The NIfTI-1 (348 bytes, float32 pixdim) or NIfTI-2 (540 bytes, float64) header at the start of `data`, in
    either byte order; None when it is neither (SimpleITK then says what is wrong)."""
    for endian in "<>":
        size = struct.unpack_from(f"{endian}i", data, 0)[0] if len(data) >= 4 else 0
        if size == 348 and len(data) >= 348:
            dims = struct.unpack_from(f"{endian}8h", data, 40)
            bitpix, pixdim = struct.unpack_from(f"{endian}h", data, 72)[0], struct.unpack_from(f"{endian}3f", data, 80)
            offset = struct.unpack_from(f"{endian}f", data, 108)[0]
        elif size == 540 and len(data) >= 540:
            dims = struct.unpack_from(f"{endian}8q", data, 16)
            bitpix, pixdim = struct.unpack_from(f"{endian}h", data, 14)[0], struct.unpack_from(f"{endian}3d", data, 112)
            offset = struct.unpack_from(f"{endian}q", data, 168)[0]
        else:
            continue
        count = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]]))
        return _NiftiHeader(np.array(pixdim, dtype=np.float64), int(offset), count * max(int(bitpix), 0) // 8)
    return None


def _stored_bytes(path: Path) -> int:
    """The file's bytes, decompressed for `.gz` (streamed, so the CT is never held twice)."""
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size
    total = 0
    try:
        with gzip.open(path, "rb") as file:
            while chunk := file.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a cut stream ends in EOFError
        raise DataFormatError(f"{path}: damaged gzip data ({exc}); re-download or re-export the file") from None
    return total


def _gzip_trailer_size(path: Path) -> int | None:
    """ISIZE of a `.gz` file: its last 4 bytes, the uncompressed size mod 2³² of a whole single-member
    stream (None for other files). Reading it costs nothing; decompressing a CT to count costs ~0.5 s."""
    if not path.name.lower().endswith(".gz") or path.stat().st_size < 18:
        return None
    with open(path, "rb") as file:
        file.seek(-4, os.SEEK_END)
        return struct.unpack("<I", file.read(4))[0]


def _check_nifti_file(path: Path) -> None:
    """pixdim[1..3] positive as stored (ITK replaces 0 by 1 mm) and the voxel data complete (ITK fills a
    truncated file's missing voxels with 0 without a word)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as file:
            header = _nifti_header(file.read(540))
    except (OSError, EOFError):
        header = None  # SimpleITK's own error names what is wrong
    if header is None:
        return
    if not (np.isfinite(header.pixdim).all() and (header.pixdim > 0).all()):
        raise DataFormatError(
            f"{path}: pixdim[1..3] = {header.pixdim.tolist()} in its header: expected 3 positive voxel sizes "
            "(SimpleITK would take 1 mm for 0)"
        )
    needed = header.vox_offset + header.data_bytes
    if _gzip_trailer_size(path) == needed % 2**32:
        return  # a whole gzip stream of the size needed (a cut stream ends in this value by a chance of 2⁻³²)
    stored = _stored_bytes(path)
    if stored < needed:
        raise DataFormatError(
            f"{path}: truncated, {stored} bytes{' uncompressed' if path.suffix.lower() == '.gz' else ''} but its "
            f"header needs {needed} ({header.vox_offset} before the voxels + {header.data_bytes}); re-download or "
            "re-export the file"
        )


def _srows_readable(reader: sitk.ImageFileReader) -> bool:
    return all(_meta_numbers(reader, f"srow_{axis}").shape == (4,) for axis in "xyz")


def _check_nrrd_space(reader: sitk.ImageFileReader, path: Path) -> None:
    if not _meta(reader, "NRRD_space"):
        raise DataFormatError(
            f"{path}: no 'space' and 'space directions' fields, so the file does not say where its voxels are in "
            "the patient (SimpleITK would put 1 mm voxels at the origin); expected an NRRD with its patient space "
            "(as 3D Slicer writes it)"
        )


def check_hu_range(hu: np.ndarray, path: str | os.PathLike[str], hu_offset: int = 0) -> None:
    """Refuse values that are not HU of a chest CT: hu, any shape and numeric dtype, offset already added.

    A chest CT in HU has air: its lowest value is ≤ AIR_MAX_HU. Values from 0 to ≥ 1000 are named as likely
    unrescaled (with the `--hu-offset` hint), anything else as not HU.
    """
    low, high = float(np.min(hu)), float(np.max(hu))  # np.min/np.max propagate nan
    if not (np.isfinite(low) and np.isfinite(high)):
        raise DataFormatError(f"{path}: voxel values {low:g}..{high:g}: expected finite numbers (no nan or inf) in HU")
    if low <= AIR_MAX_HU:
        return
    after = f" after --hu-offset {hu_offset}" if hu_offset else ""
    if low >= 0 and high >= UNRESCALED_MIN_HIGH:
        raise DataFormatError(
            f"{path}: voxel values {low:g}..{high:g}{after} look like stored values without the rescale to "
            f"Hounsfield units (likely unrescaled: air would be -1000 HU, here nothing is below {low:g}); if the "
            "file stores HU + 1024, pass --hu-offset -1024, else convert it to HU"
        )
    raise DataFormatError(
        f"{path}: voxel values {low:g}..{high:g}{after}: nothing below {AIR_MAX_HU} HU, so no air: not Hounsfield "
        "units of a chest CT (air is -1000 HU, lungs about -850); convert it to HU"
    )


def read_image_file(path: str | os.PathLike[str], hu_offset: int = 0) -> sitk.Image:
    """A NIfTI or NRRD CT as a SimpleITK image in HU (`hu_offset` added), after every check of the module docstring.

    Raises DataNotFoundError for a missing file, DataFormatError for anything the checks refuse or
    SimpleITK cannot read, ConfigError for a bad `hu_offset`.
    """
    path = Path(path)
    hu_offset = check_hu_offset(hu_offset)
    suffix = image_suffix(path)
    if suffix is None:
        raise DataFormatError(f"{path}: not a NIfTI or NRRD file name; expected a name ending in {IMAGE_SUFFIXES}")
    reader = _read_information(path)
    _check_shape(reader, path)
    _check_type(reader, path, hu_offset)
    _check_geometry(reader, path)
    if suffix.startswith(".nii"):
        _check_nifti_file(path)
        _check_nifti_space(reader, path)
    else:
        _check_nrrd_space(reader, path)
    try:
        with _itk_warnings_hidden():
            image = reader.Execute()
    except RuntimeError as exc:
        raise DataFormatError(f"{path}: SimpleITK cannot read its voxels ({_sitk_reason(exc)})") from None
    if hu_offset and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = image + float(hu_offset)
    elif hu_offset:  # in int32, so that 0..65535 + a negative offset neither wraps nor clamps
        image = sitk.Cast(image, sitk.sitkInt32) + hu_offset
    check_hu_range(sitk.GetArrayViewFromImage(image), path, hu_offset)
    return image
