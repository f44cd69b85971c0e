"""A CT from a folder of DICOM files: find its series, check the slices, read the voxels in HU.

A DICOM CT is one file per slice; a folder may hold several series (a scout, two
reconstructions, …), told apart by their SeriesInstanceUID. `list_dicom_series` lists them;
`read_dicom_image` reads one into a `p2ch.ct.Ct` after checking, from every file's header
(no pixels read), what SimpleITK would otherwise get silently wrong:

- the modality is CT (an MR or PET series has no Hounsfield units);
- RescaleSlope and RescaleIntercept are present (they turn stored values into HU; SimpleITK
  applies them while reading, so the voxels it returns are HU);
- every slice has a position and the same orientation;
- ordered along the slice normal (the cross product of the row and column directions), the
  slices are evenly spaced: SimpleITK takes the spacing from the first two slices, so a
  duplicate, a missing slice or uneven gaps would put voxels at the wrong place. A gap may differ
  from the median gap by at most `GAP_REL_TOL` of it or `GAP_ABS_TOL_MM`, whichever is larger.

A series whose slices are tilted or sheared (gantry tilt: the step from one ImagePositionPatient
to the next is not along the slice normal) is resampled onto an orthogonal grid, as dcm2niix does:
each slice stays in its own plane and is shifted within it (linear interpolation) so that every
output voxel lies where the files put that point; the grid grows to hold every slice whole, the
rest is air. SimpleITK alone would stack the slices straight, each one off by its drift (tens of
mm at the far end of a tilted chest series). The tilt is logged and recorded in the image's
metadata (`TILT_KEY`, `RESAMPLED_KEY`), which `p2ch.ct.Ct` keeps as its `provenance`.

Files in the folder that are not DICOM are ignored; subfolders are not searched. A file that
looks like DICOM (a `.dcm`/`.ima` name or the "DICM" marker) but cannot be read is named as
damaged (truncated, or not intact) rather than left out, unless the series uid it still holds
is another series' (then it is logged and skipped). Every error names the folder.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from p2ch.errors import DataFormatError, DataNotFoundError
from p2ch.luna import is_valid_series_uid

MODALITY_TAG = "0008|0060"
SERIES_DESCRIPTION_TAG = "0008|103e"
SERIES_UID_TAG = "0020|000e"
POSITION_TAG = "0020|0032"  # ImagePositionPatient: x, y, z of the first voxel, mm
ORIENTATION_TAG = "0020|0037"  # ImageOrientationPatient: row direction, then column direction
INTERCEPT_TAG = "0028|1052"
SLOPE_TAG = "0028|1053"

GAP_REL_TOL = 0.01  # a gap may differ from the median gap by 1 % of it …
GAP_ABS_TOL_MM = 0.01  # … or by 0.01 mm, whichever is larger (positions are written rounded)
ORIENTATION_TOL = 1e-4  # direction cosines that differ by less are the same orientation
# In-plane drift of the slices (over the whole series, in pixels) below which a series counts as orthogonal:
# stacking it straight misplaces no voxel by more than this fraction of its width.
TILT_TOL_PIXELS = 0.05
SNAP_PIXELS = 1e-3  # a slice's shift this close to a whole number of pixels is taken as whole
OUTSIDE_HU = -1000.0  # what the resampled grid holds where no slice reaches: air (p2ch.ct.HU_MIN)
TILT_KEY = "p2ch:gantry_tilt_deg"  # image metadata: the tilt angle of a resampled series, degrees
RESAMPLED_KEY = "p2ch:resampled"  # image metadata: how it was resampled
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # names that say "DICOM file" even without the DICM marker
_PREAMBLE = 128  # bytes before the "DICM" marker of a DICOM Part 10 file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DicomSeries:
    """One series of a DICOM folder: its uid, files (sorted by name), description and modality."""

    series_uid: str
    files: tuple[Path, ...]
    description: str
    modality: str


@dataclass(frozen=True)
class _Slice:
    """What one file's header says: position_xyz (3,) mm, orientation (6,) direction cosines."""

    path: Path
    series_uid: str
    position_xyz: np.ndarray
    orientation: np.ndarray


def _check_folder(folder: str | os.PathLike[str]) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise DataNotFoundError(f"{folder}: {what}; expected a folder of DICOM files of one CT series")
    return folder


def _sitk_reason(exc: RuntimeError) -> str:
    # SimpleITK's first line names its own source file; the reason is on the lines after.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[1:] or lines)[:300] or type(exc).__name__


def _read_tags(path: Path, folder: Path) -> dict[str, str]:
    """The header tags we use of one DICOM file (pixels are not read)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataFormatError(f"{folder}: cannot read the DICOM header of {path.name} ({_sitk_reason(exc)})") from None
    tags = {}
    for tag in (MODALITY_TAG, SERIES_DESCRIPTION_TAG, SERIES_UID_TAG, POSITION_TAG, ORIENTATION_TAG):
        tags[tag] = _tag_value(reader, tag)
    for tag in (INTERCEPT_TAG, SLOPE_TAG):
        if reader.HasMetaDataKey(tag):
            tags[tag] = _tag_value(reader, tag)
    return tags


def _tag_value(reader: sitk.ImageFileReader, tag: str) -> str:
    if not reader.HasMetaDataKey(tag):
        return ""
    try:
        return reader.GetMetaData(tag).strip(" \0")
    except UnicodeDecodeError:  # a description in another character set
        return ""


def _series_ids(folder: Path) -> tuple[str, ...]:
    # ITK prints a warning for a folder without series; our own error says it better.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def list_dicom_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """The DICOM series directly in `folder` (not its subfolders); [] when there is none.

    Description and modality come from the first file of each series. Raises DataNotFoundError
    for a missing folder.
    """
    folder = _check_folder(folder)
    found = []
    for series_uid in _series_ids(folder):
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
        files = tuple(sorted(Path(name) for name in names))
        if not files:
            continue
        tags = _read_tags(files[0], folder)
        found.append(DicomSeries(series_uid, files, tags[SERIES_DESCRIPTION_TAG], tags[MODALITY_TAG]))
    return found


def _describe(series: list[DicomSeries]) -> str:
    return "; ".join(f"{s.series_uid} ({len(s.files)} slices, {s.description or 'no description'!r})" for s in series)


def _choose_series(folder: Path, series_uid: str | None) -> DicomSeries:
    found = list_dicom_series(folder)
    if not found:
        raise DataNotFoundError(
            f"{folder}: no DICOM series found (no DICOM image files directly in this folder; "
            "subfolders are not searched)"
        )
    if series_uid is None:
        if len(found) > 1:
            raise DataFormatError(
                f"{folder} holds {len(found)} DICOM series; pass --dicom-series UID to choose one: {_describe(found)}"
            )
        return found[0]
    for series in found:
        if series.series_uid == series_uid:
            return series
    raise DataNotFoundError(f"{folder}: no DICOM series {series_uid}; the series there: {_describe(found)}")


def _numbers(text: str, count: int, what: str, path: Path, folder: Path) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        values = np.array([])
    if values.shape != (count,) or not np.isfinite(values).all():
        missing = "no" if not text else f"an unreadable ({text!r})"
        raise DataFormatError(f"{folder}: {path.name} has {missing} {what}; expected {count} numbers")
    return values


def _read_slice(path: Path, folder: Path) -> _Slice:
    """One file's header, checked: a CT slice in HU with a position and an orientation."""
    tags = _read_tags(path, folder)
    if tags[MODALITY_TAG] != "CT":
        raise DataFormatError(
            f"{folder}: {path.name} has modality {tags[MODALITY_TAG] or 'unknown'!r}, not 'CT'; only a CT "
            "series has Hounsfield units"
        )
    if INTERCEPT_TAG not in tags or SLOPE_TAG not in tags:
        raise DataFormatError(
            f"{folder}: {path.name} has no HU rescale (RescaleSlope/RescaleIntercept, tags {SLOPE_TAG} and "
            f"{INTERCEPT_TAG}), so its values are not known to be Hounsfield units"
        )
    position = _numbers(tags[POSITION_TAG], 3, f"ImagePositionPatient ({POSITION_TAG})", path, folder)
    orientation = _numbers(tags[ORIENTATION_TAG], 6, f"ImageOrientationPatient ({ORIENTATION_TAG})", path, folder)
    return _Slice(path, tags[SERIES_UID_TAG], position, orientation)


def _order_slices(slices: list[_Slice], folder: Path) -> list[_Slice]:
    """The slices in order along the slice normal, checked to be evenly spaced."""
    if len(slices) < 2:
        raise DataFormatError(f"{folder}: the series has {len(slices)} slice; a CT needs at least 2")
    first = slices[0]
    for other in slices[1:]:
        if not np.allclose(other.orientation, first.orientation, atol=ORIENTATION_TOL):
            raise DataFormatError(
                f"{folder}: slices of different orientations (ImageOrientationPatient {first.path.name}: "
                f"{first.orientation.tolist()}, {other.path.name}: {other.orientation.tolist()})"
            )
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    if np.linalg.norm(normal) < 0.5:
        raise DataFormatError(
            f"{folder}: ImageOrientationPatient {first.orientation.tolist()} of {first.path.name} "
            "has parallel row and column directions"
        )
    along_mm = np.array([s.position_xyz @ normal for s in slices])
    order = np.argsort(along_mm, kind="stable")
    ordered = [slices[k] for k in order]
    _check_gaps(along_mm[order], [s.path for s in ordered], folder)
    return ordered


def _check_gaps(along_mm: np.ndarray, paths: list[Path], folder: Path) -> None:
    """along_mm: (N,) sorted slice positions along the normal, mm; raises at the first bad gap."""
    gaps = np.diff(along_mm)
    median = float(np.median(gaps))
    tol = max(GAP_REL_TOL * median, GAP_ABS_TOL_MM)
    for k, gap in enumerate(gaps.tolist()):
        where = (
            f"between positions {along_mm[k]:.3f} and {along_mm[k + 1]:.3f} mm along the slice normal "
            f"({paths[k].name} and {paths[k + 1].name})"
        )
        if gap <= tol:
            raise DataFormatError(f"{folder}: two slices at the same position {where}; remove the duplicate")
        if abs(gap - median) <= tol:
            continue
        missing = round(gap / median) - 1 if median > tol else 0
        if missing >= 1 and abs(gap / median - (missing + 1)) < 0.1:
            raise DataFormatError(
                f"{folder}: {missing} slice(s) missing: a gap of {gap:.3f} mm {where}, where the "
                f"usual gap is {median:.3f} mm; the series is incomplete"
            )
        raise DataFormatError(
            f"{folder}: uneven slice spacing: a gap of {gap:.3f} mm {where}, where the usual gap is "
            f"{median:.3f} mm (tolerance {tol:.3f} mm); a CT needs evenly spaced slices"
        )


def _read_pixels(paths: list[Path], folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise DataFormatError(f"{folder}: SimpleITK cannot read the series ({_sitk_reason(exc)})") from None


# --- damaged files ------------------------------------------------------------------------------


def _looks_like_dicom(path: Path) -> bool:
    """A `.dcm`-like name or the Part 10 marker "DICM" after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as file:
            file.seek(_PREAMBLE)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def _readable_header(path: Path) -> bool:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        return True
    except RuntimeError:
        return False


def _raw_series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID (0020,000E) of a damaged file, read from its bytes (None when not found).

    Little-endian only (what nearly every CT writes): explicit VR ("UI" and a 2-byte length) or implicit
    VR (a 4-byte length). Header elements come before the pixel data, so a file truncated in its pixels
    still holds it.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return None
    at = data.find(b"\x20\x00\x0e\x00")
    if at < 0:
        return None
    header = data[at + 4 : at + 8]  # explicit VR: "UI" and a 2-byte length; implicit: a 4-byte length
    if len(header) < 4:
        return None
    (length,) = struct.unpack("<H", header[2:]) if header[:2] == b"UI" else struct.unpack("<I", header)
    uid = data[at + 8 : at + 8 + length].decode("ascii", "replace").strip(" \0")
    return uid if length <= 64 and is_valid_series_uid(uid) else None


def check_damaged_files(folder: Path, series: DicomSeries) -> None:
    """DataFormatError naming the files of `folder` that look like DICOM but that GDCM cannot read (a truncated
    or damaged file is left out of every series, so the series would seem to miss a slice), unless the series
    uid still in such a file is another series' (then it is logged and skipped)."""
    listed = set(series.files)
    damaged = []
    for path in sorted(folder.iterdir()):
        if path in listed or not path.is_file() or not _looks_like_dicom(path) or _readable_header(path):
            continue
        uid = _raw_series_uid(path)
        if uid is not None and uid != series.series_uid:
            log.warning("%s: %s is damaged (not readable DICOM) and of series %s; skipped", folder, path.name, uid)
            continue
        damaged.append((path, uid))
    if damaged:
        (first, uid), others = damaged[0], [p.name for p, _ in damaged[1:]]
        more = f" (and {len(others)} more: {', '.join(others[:3])}{', …' if len(others) > 3 else ''})" if others else ""
        whose = "a slice" if uid == series.series_uid else "maybe a slice"
        raise DataFormatError(
            f"{folder}: {first.name} is not a readable DICOM file ({first.stat().st_size:,} bytes: truncated or "
            f"damaged){more}, {whose} of series {series.series_uid}; replace it with an intact copy (export the "
            "series again) or remove it"
        )


# --- gantry tilt --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tilt:
    """How a series' slices drift within their planes: offsets of each slice from the first, mm.

    along_row_mm, along_col_mm: (N,) in-plane offsets along ImageOrientationPatient's row and column
    directions; spacing_mm: the step along the slice normal; angle_deg: the tilt of the stack.
    """

    along_row_mm: np.ndarray
    along_col_mm: np.ndarray
    spacing_mm: float
    angle_deg: float


def _measure_tilt(slices: list[_Slice]) -> tuple[np.ndarray, _Tilt]:
    """(direction (3, 3) with columns row, column, normal; the tilt) of slices ordered along their normal."""
    row_dir = slices[0].orientation[:3] / np.linalg.norm(slices[0].orientation[:3])
    col_dir = slices[0].orientation[3:] / np.linalg.norm(slices[0].orientation[3:])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    offsets = np.array([s.position_xyz - slices[0].position_xyz for s in slices])  # (N, 3) mm
    along = offsets @ normal
    spacing = float((along[-1] - along[0]) / (len(slices) - 1))
    drift = math.hypot(float(offsets[-1] @ row_dir), float(offsets[-1] @ col_dir))
    angle = math.degrees(math.atan2(drift, float(along[-1])))
    tilt = _Tilt(offsets @ row_dir, offsets @ col_dir, spacing, angle)
    return np.stack([row_dir, col_dir, normal], axis=1), tilt


def _shifted_slices(hu: np.ndarray, shift_rc: np.ndarray, shape_rc: tuple[int, int]) -> np.ndarray:
    """Each slice of hu (I, R, C) moved by shift_rc[k] pixels (row, col) onto a (R', C') grid, linearly
    interpolated; air beyond the slice. Integer inputs are rounded back to their dtype."""
    out = np.empty((hu.shape[0], *shape_rc), dtype=np.float32)
    for k in range(hu.shape[0]):
        # affine_transform reads input[o - shift] for output pixel o: the slice lands shift pixels further on.
        ndimage.affine_transform(
            hu[k].astype(np.float32), np.ones(2), offset=-shift_rc[k], output_shape=shape_rc, output=out[k],
            order=1, mode="constant", cval=OUTSIDE_HU,
        )  # fmt: skip
    if np.issubdtype(hu.dtype, np.integer):
        info = np.iinfo(hu.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(hu.dtype)
    return out


def _snapped(shift: np.ndarray) -> np.ndarray:
    """Shifts within SNAP_PIXELS of a whole pixel made whole: positions are written rounded, and a slice moved
    by 0.9999 pixels would lose its last row to the edge of the interpolation."""
    whole = np.rint(shift)
    return np.where(np.abs(shift - whole) <= SNAP_PIXELS, whole, shift)


def correct_tilt(image: sitk.Image, slices: list[_Slice], folder: Path) -> sitk.Image:
    """The series on an orthogonal grid when its slices drift within their planes (gantry tilt), else `image`.

    image: the series as SimpleITK read it, slices in the order of `slices` (ordered along the normal).
    Output voxel (k, r, c) lies at origin + c·Δx·row + r·Δy·column + k·spacing·normal, where origin
    is the first slice's position moved to the corner that holds every slice; its value is slice k's,
    interpolated at that point (each slice stays in its plane). Logged, and recorded in the image
    metadata (`TILT_KEY`, `RESAMPLED_KEY`).
    """
    direction, tilt = _measure_tilt(slices)
    dx, dy = image.GetSpacing()[:2]
    shift_c, shift_r = _snapped(tilt.along_row_mm / dx), _snapped(tilt.along_col_mm / dy)  # (N,) pixels
    if max(np.abs(shift_c).max(), np.abs(shift_r).max()) <= TILT_TOL_PIXELS:
        return image
    hu = sitk.GetArrayFromImage(image)  # (I, R, C)
    low = np.array([shift_r.min(), shift_c.min()])
    extent = np.array([shift_r.max(), shift_c.max()]) - low
    shape_rc = tuple(int(n + math.ceil(e - TILT_TOL_PIXELS)) for n, e in zip(hu.shape[1:], extent, strict=True))
    out = _shifted_slices(hu, np.stack([shift_r, shift_c], axis=1) - low, shape_rc)
    resampled = sitk.GetImageFromArray(out)
    resampled.SetSpacing((float(dx), float(dy), tilt.spacing_mm))
    origin = slices[0].position_xyz + low[1] * dx * direction[:, 0] + low[0] * dy * direction[:, 1]
    resampled.SetOrigin(tuple(float(v) for v in origin))
    resampled.SetDirection(tuple(float(v) for v in direction.ravel()))
    drift = float(np.hypot(tilt.along_row_mm, tilt.along_col_mm).max())
    how = (
        f"slices shifted within their planes by up to {drift:.1f} mm onto an orthogonal {out.shape[0]} x "
        f"{out.shape[1]} x {out.shape[2]} grid (linear interpolation; air where no slice reaches)"
    )
    resampled.SetMetaData(TILT_KEY, f"{tilt.angle_deg:.3f}")
    resampled.SetMetaData(RESAMPLED_KEY, how)
    log.warning("%s: gantry tilt of %.2f° (ImagePositionPatient steps off the slice normal); %s", folder,
                tilt.angle_deg, how)  # fmt: skip
    return resampled


def read_dicom_image(folder: str | os.PathLike[str], series_uid: str | None = None) -> tuple[sitk.Image, str]:
    """(image, SeriesInstanceUID) of a DICOM folder's CT series (the one there, or `series_uid`), voxels
    in HU (GDCM applies the rescale), slices ordered by position; `p2ch.ct.load_dicom` makes it a `Ct`.

    Raises DataNotFoundError for a missing folder, one without DICOM series or without
    `series_uid`; DataFormatError for several series and no `series_uid`, a series that is not
    CT, has no HU rescale, no positions, mixed orientations or uneven slice positions, or a damaged
    file that may be one of its slices. A tilted series comes back resampled (`correct_tilt`).
    """
    folder = _check_folder(folder)
    series = _choose_series(folder, series_uid)
    check_damaged_files(folder, series)
    slices = _order_slices([_read_slice(path, folder) for path in series.files], folder)
    uid = slices[0].series_uid
    if not is_valid_series_uid(uid):
        raise DataFormatError(
            f"{folder}: SeriesInstanceUID {uid!r} ({SERIES_UID_TAG}) is not a DICOM uid (digits and dots, "
            "at most 64 characters)"
        )
    return correct_tilt(_read_pixels([s.path for s in slices], folder), slices, folder), uid


# ---------------------------------------------------------------------------------------------
# per-slice references (what a viewer or PACS navigates by) and folders of several series

INSTANCE_NUMBER_TAG = "0020|0013"
SOP_INSTANCE_UID_TAG = "0008|0018"


@dataclass(frozen=True)
class DicomSlices:
    """Per slice of a CT read from DICOM, in the CT's slice order (entry i is `ct.hu[i]`): the file's name
    (in the folder), its InstanceNumber (None when absent or not an integer) and its SOPInstanceUID ("" when
    absent). A PACS shows slices by InstanceNumber, which may run the other way than the CT's index."""

    file_names: tuple[str, ...]
    instance_numbers: tuple[int | None, ...]
    sop_instance_uids: tuple[str, ...]


def _slice_ids(path: Path, folder: Path) -> tuple[np.ndarray, int | None, str]:
    """(ImagePositionPatient (3,) mm, InstanceNumber, SOPInstanceUID) of one file's header."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataFormatError(f"{folder}: cannot read the DICOM header of {path.name} ({_sitk_reason(exc)})") from None
    position = _numbers(_tag_value(reader, POSITION_TAG), 3, f"ImagePositionPatient ({POSITION_TAG})", path, folder)
    number = _tag_value(reader, INSTANCE_NUMBER_TAG)
    try:
        instance = int(float(number)) if number else None
    except ValueError:
        instance = None
    return position, instance, _tag_value(reader, SOP_INSTANCE_UID_TAG)


def read_slice_references(folder: str | os.PathLike[str], series_uid: str, image: sitk.Image) -> DicomSlices:
    """The file, InstanceNumber and SOPInstanceUID of every slice of `image` (read by `read_dicom_image` from
    `folder`'s series `series_uid`). Each file is placed by its ImagePositionPatient: the slice index it
    lands on in `image`. Raises DataFormatError when the files do not land one on each slice."""
    folder = _check_folder(folder)
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    depth = image.GetDepth()
    found: dict[int, tuple[str, int | None, str]] = {}
    for name in names:
        path = Path(name)
        position, instance, sop_uid = _slice_ids(path, folder)
        index = image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in position))[2]
        k = round(index)
        if abs(index - k) > 0.1 or not 0 <= k < depth or k in found:
            raise DataFormatError(
                f"{folder}: {path.name} (ImagePositionPatient {position.tolist()}) does not fall on its own slice of "
                f"the series read ({index:.2f} of {depth}); the folder changed while it was read?"
            )
        found[k] = (path.name, instance, sop_uid)
    if len(found) != depth:
        raise DataFormatError(f"{folder}: {len(found)} files for the {depth} slices read; the folder changed?")
    ordered = [found[k] for k in range(depth)]
    return DicomSlices(*(tuple(column) for column in zip(*ordered, strict=True)))


def volume_series(folder: str | os.PathLike[str]) -> tuple[list[DicomSeries], list[tuple[DicomSeries, str]]]:
    """(the series of `folder` that may be CT volumes, [(series, why not)] for the others): a volume is a
    series of modality CT with at least 2 files; localizers of one image, dose reports, MR and the like are
    set aside with the reason. The volumes' own checks come when each is read."""
    volumes, others = [], []
    for series in list_dicom_series(folder):
        if series.modality != "CT":
            others.append((series, f"modality {series.modality or 'unknown'!r}, not 'CT'"))
        elif len(series.files) < 2:
            others.append((series, f"{len(series.files)} image, not a volume"))
        else:
            volumes.append(series)
    return volumes, others
