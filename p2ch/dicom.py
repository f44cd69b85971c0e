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

Files in the folder that are not DICOM are ignored; subfolders are not searched. Every error
names the folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

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


def read_dicom_image(folder: str | os.PathLike[str], series_uid: str | None = None) -> tuple[sitk.Image, str]:
    """(image, SeriesInstanceUID) of a DICOM folder's CT series (the one there, or `series_uid`), voxels
    in HU (GDCM applies the rescale), slices ordered by position; `p2ch.ct.load_dicom` makes it a `Ct`.

    Raises DataNotFoundError for a missing folder, one without DICOM series or without
    `series_uid`; DataFormatError for several series and no `series_uid`, a series that is not
    CT, has no HU rescale, no positions, mixed orientations or uneven slice positions.
    """
    folder = _check_folder(folder)
    series = _choose_series(folder, series_uid)
    slices = _order_slices([_read_slice(path, folder) for path in series.files], folder)
    uid = slices[0].series_uid
    if not is_valid_series_uid(uid):
        raise DataFormatError(
            f"{folder}: SeriesInstanceUID {uid!r} ({SERIES_UID_TAG}) is not a DICOM uid (digits and dots, "
            "at most 64 characters)"
        )
    return _read_pixels([s.path for s in slices], folder), uid


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
