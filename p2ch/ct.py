"""One CT volume (`Ct`), its geometry, cropping chunks, and finding a CT on disk.

LUNA16 stores each CT as a MetaIO header (`<series_uid>.mhd`) next to raw int16 voxels
(`<series_uid>.raw`) in `subset0/` … `subset9/`. We check the header and the size of the raw
file ourselves before handing the pair to SimpleITK (`read_mhd_header`), because SimpleITK's
own errors for a missing or truncated `.raw` do not say which file or what was wrong, and
because it reads some broken headers without a word and returns a wrong CT. Each of these is a
DataFormatError naming the file and the header line:

- a data file whose size is not exactly DimSize × the element's bytes (smaller: truncated;
  larger: DimSize would drop part of the CT); compressed data (`CompressedData = True`,
  `.zraw`) is left to SimpleITK; `HeaderSize` is honoured; `LOCAL` data (the voxels after the
  header in the `.mhd`) is measured the same way;
- no `ElementSpacing` (nor `ElementSize`) line (SimpleITK would take 1 mm), a spacing that is
  not 3 positive numbers, an `Offset`/`Origin`/`Position` that is not 3 finite numbers, a
  `TransformMatrix`/`Rotation`/`Orientation` that is not orthonormal within `DIRECTION_TOL`;
- an unsigned `ElementType` (MET_UCHAR, MET_USHORT, …): HU are negative, and MetaIO has no
  rescale field to map unsigned values to HU;
- an `ElementDataFile` outside the `.mhd`'s folder (`../../elsewhere/x.raw`, an absolute path
  elsewhere; judged on the path as written, so a symbolic link in the folder is fine): a data
  root should be self-contained. Set the environment variable `P2CH_ALLOW_EXTERNAL_DATA=1` to
  read such files anyway.

A CT can come from three kinds of input (`load_ct_input`, for commands that take "any CT"):

- a LUNA16 series uid: `<data root>/subset*/<uid>.mhd`, through `get_ct` (cached);
- a path to a `.mhd` file anywhere: `load_mhd` (same header and `.raw` checks). Its series uid is
  the file name's stem when that is a uid (digits and dots); otherwise one derived from the
  file's absolute path, `2.25.<int of the first 30 hex digits of sha1(path)>`: 2.25 is the
  OID root for UUID-derived uids, so it is a valid DICOM uid (≤ 42 characters), the same for
  the same file on every run, and never a LUNA16 uid;
- a path to a folder of DICOM files: `load_dicom` (checks in `p2ch.dicom`) (one CT series; pick one with
  `dicom_series` when the folder holds several);
- a path to a NIfTI or NRRD file (`.nii`, `.nii.gz`, `.nrrd`, `.nhdr`): `load_image_file` (checks in
  `p2ch.imagefile`: one 3-D volume, a signed or float type, geometry, a patient space, values in HU;
  `hu_offset` for a file known to store HU + 1024); its series uid as for a `.mhd`, from the name
  without the suffix (`scan.nii.gz` → `scan`).

Every input ends in `Ct.from_image`, so the voxels (int16 HU clipped to [-1000, 1000]) and the
geometry are handled the same way whatever the source.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from p2ch import dicom, imagefile
from p2ch.config import resolve_data_root
from p2ch.errors import CandidateOutsideCtError, ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import (
    DEFAULT_WIDTH_IRC,
    DIRECTION_TOL,
    IrcTuple,
    XyzTuple,
    check_width_irc,
    direction_error,
    inside_volume,
    xyz2irc,
)
from p2ch.luna import check_series_uid, clear_series_index, cut_text, find_mhd, is_valid_series_uid, quoted

log = logging.getLogger(__name__)

HU_MIN = -1000
HU_MAX = 1000
CT_CACHE_SIZE = 3

# MetaIO writes some fields under several names and reads whichever it finds; we check each one present.
SPACING_KEYS = ("ElementSpacing", "ElementSize")  # ElementSize stands in when ElementSpacing is absent
ORIGIN_KEYS = ("Offset", "Origin", "Position")
DIRECTION_KEYS = ("TransformMatrix", "Rotation", "Orientation")
ALLOW_EXTERNAL_DATA_ENV = "P2CH_ALLOW_EXTERNAL_DATA"
_HEADER_BYTES = 65536  # a MetaIO header is a few hundred bytes; LOCAL voxels may follow it

# Bytes per voxel of MetaIO's signed element types. HU are negative for air and fat, and MetaIO has
# no rescale field that would map unsigned stored values to HU, so a CT must be stored signed.
_ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_SHORT": 2,
    "MET_INT": 4,
    "MET_LONG": 4,
    "MET_LONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
_UNSIGNED_TYPES = frozenset({"MET_UCHAR", "MET_USHORT", "MET_UINT", "MET_ULONG", "MET_ULONG_LONG"})


def read_mhd_header(mhd_path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a MetaIO header and check it describes a CT SimpleITK will read right (see the module docstring).

    Returns the header's `key = value` pairs. Raises DataNotFoundError for a missing `.mhd` or
    data file, DataFormatError naming the file and header line for anything else: not a 3-D
    image, an unsigned or unknown ElementType, no or non-positive spacing, a non-finite origin, a
    non-orthonormal direction, a data file outside the `.mhd`'s folder (unless
    P2CH_ALLOW_EXTERNAL_DATA=1) or one whose size is not what DimSize and ElementType describe.
    """
    mhd_path = Path(mhd_path)
    header, local_offset, list_lines = _parse_header(mhd_path)
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in header:
            raise DataFormatError(
                f"{mhd_path}: corrupt MetaIO header, no '{key} = …' line "
                "(expected a LUNA16 .mhd with NDims, DimSize, ElementType, ElementDataFile)"
            )
    try:
        ndims = int(header["NDims"])
        dims = [int(v) for v in header["DimSize"].split()]
    except ValueError:
        raise DataFormatError(
            f"{mhd_path}: corrupt MetaIO header, NDims={quoted(header['NDims'])} "
            f"DimSize={quoted(header['DimSize'])} are not integers"
        ) from None
    if ndims != 3 or len(dims) != 3 or min(dims) < 1:
        raise DataFormatError(f"{mhd_path}: expected a 3-D CT volume, got NDims={ndims} DimSize={dims}")
    element_bytes = _element_bytes(header["ElementType"], mhd_path)
    _check_geometry(header, mhd_path)
    if _header_int(header, "ElementNumberOfChannels", 1, mhd_path) != 1:
        raise DataFormatError(
            f"{mhd_path}: header line 'ElementNumberOfChannels = {cut_text(header['ElementNumberOfChannels'])}': "
            "expected 1 (a CT has one value per voxel)"
        )
    _check_data(header, mhd_path, dims, element_bytes, local_offset, list_lines)
    return header


def _check_data(
    header: dict[str, str],
    mhd_path: Path,
    dims: list[int],
    element_bytes: int,
    local_offset: int,
    list_lines: list[str],
) -> None:
    """The data file(s) inside the .mhd's folder, present, and exactly as large as the header says."""
    compressed = header.get("CompressedData", "False").lower() == "true"
    # ASCII voxels (BinaryData = False) have no fixed size; SimpleITK checks them while reading.
    measured = not compressed and header.get("BinaryData", "True").lower() != "false"
    names, file_dims = _data_file_names(header["ElementDataFile"], list_lines, mhd_path)
    expected = int(np.prod(dims[:file_dims])) * element_bytes  # per data file
    described = f"{'x'.join(map(str, dims[:file_dims]))} × {element_bytes} bytes"
    if names is None:  # LOCAL: the voxels follow the header in the .mhd itself
        actual = mhd_path.stat().st_size - local_offset
        if measured and actual != expected:
            raise DataFormatError(
                f"{mhd_path}: {actual} bytes of LOCAL data after the header, but the header describes "
                f"{expected} ({described}); re-download or re-extract this series"
            )
        return
    count = int(np.prod(dims[file_dims:]))
    if len(names) != count:
        raise DataFormatError(
            f"{mhd_path}: header line 'ElementDataFile = {cut_text(header['ElementDataFile'])}' names "
            f"{len(names)} data file(s), but DimSize {'x'.join(map(str, dims))} needs {count} ({described} each)"
        )
    paths = [_data_path(name, mhd_path) for name in names]
    for path in paths:
        if not path.is_file():
            raise DataNotFoundError(f"{mhd_path}: its voxel file {path} is missing; unpack the .raw next to the .mhd")
    header_size = _header_int(header, "HeaderSize", 0, mhd_path)
    for path in paths if measured else ():
        _check_data_size(path, mhd_path, path.stat().st_size, expected, header_size, described)
    if compressed and len(paths) == 1 and header_size == 0:
        _check_compressed(paths[0], mhd_path, header)


def _check_compressed(path: Path, mhd_path: Path, header: dict[str, str]) -> None:
    """A compressed data file must be zlib or gzip data of CompressedDataSize bytes (when given):
    SimpleITK reads anything else as garbage voxels after printing 'Uncompress failed'."""
    with open(path, "rb") as file:
        magic = file.read(2)
    zlib_header = len(magic) == 2 and magic[0] & 0x0F == 8 and (magic[0] * 256 + magic[1]) % 31 == 0
    if not (zlib_header or magic == b"\x1f\x8b"):
        raise DataFormatError(
            f"{path}: not zlib-compressed data, but the header {mhd_path.name} says 'CompressedData = True'; "
            "re-download or re-extract this series"
        )
    size = _header_int(header, "CompressedDataSize", 0, mhd_path)
    if size and path.stat().st_size != size:
        raise DataFormatError(
            f"{path}: {path.stat().st_size} bytes, but the header {mhd_path.name} says "
            f"'CompressedDataSize = {size}'; re-download or re-extract this series"
        )


def _parse_header(mhd_path: Path) -> tuple[dict[str, str], int, list[str]]:
    """The `key = value` pairs up to ElementDataFile, the byte offset just after that line (where
    LOCAL voxels start) and the lines after it (the file names of `ElementDataFile = LIST`)."""
    try:
        with open(mhd_path, "rb") as file:
            data = file.read(_HEADER_BYTES)
    except FileNotFoundError:
        raise DataNotFoundError(f"{mhd_path}: file not found") from None
    except IsADirectoryError:
        raise DataFormatError(f"{mhd_path}: a folder, not a MetaIO header") from None
    header: dict[str, str] = {}
    offset = 0
    for raw_line in data.splitlines(keepends=True):
        offset += len(raw_line)
        try:
            line = raw_line.decode("ascii")
        except UnicodeDecodeError:
            raise DataFormatError(f"{mhd_path}: not a MetaIO header (not ASCII text)") from None
        if "=" not in line:
            continue
        key, _, value = line.partition("=")
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break  # binary data may follow in a LOCAL file
    rest = data[offset:].decode("ascii", errors="replace") if "ElementDataFile" in header else ""
    return header, offset, [line.strip() for line in rest.splitlines() if line.strip()]


def _element_bytes(element_type: str, mhd_path: Path) -> int:
    if element_type in _UNSIGNED_TYPES:
        raise DataFormatError(
            f"{mhd_path}: header line 'ElementType = {element_type}' is unsigned; a CT must be stored as a "
            "signed type (HU are negative: air is -1000), e.g. MET_SHORT as in LUNA16, and MetaIO has no rescale "
            "to turn unsigned values into HU"
        )
    element_bytes = _ELEMENT_BYTES.get(element_type)
    if element_bytes is None:
        raise DataFormatError(f"{mhd_path}: unsupported ElementType {quoted(element_type)} (LUNA16 uses MET_SHORT)")
    return element_bytes


def _header_int(header: dict[str, str], key: str, default: int, mhd_path: Path) -> int:
    text = header.get(key, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise DataFormatError(f"{mhd_path}: header line '{key} = {cut_text(text)}': expected an integer") from None


def _header_numbers(header: dict[str, str], key: str, count: int, mhd_path: Path, expected: str) -> np.ndarray:
    """`count` finite numbers of a header line, else DataFormatError naming the line and `expected`."""
    text = header[key]
    try:
        values = np.array([float(v) for v in text.split()], dtype=np.float64)
    except ValueError:
        values = np.array([])
    if values.shape != (count,) or not np.isfinite(values).all():
        raise DataFormatError(f"{mhd_path}: header line '{key} = {cut_text(text)}': expected {expected}")
    return values


def _check_geometry(header: dict[str, str], mhd_path: Path) -> None:
    """Spacing present and positive, origin finite, direction orthonormal: what SimpleITK lets through."""
    if not any(key in header for key in SPACING_KEYS):
        raise DataFormatError(
            f"{mhd_path}: no 'ElementSpacing = …' line (nor ElementSize), so SimpleITK would take 1 mm voxels; "
            "expected the voxel spacing in mm along x, y, z (LUNA16's headers have it)"
        )
    for key in (k for k in SPACING_KEYS if k in header):
        spacing = _header_numbers(header, key, 3, mhd_path, "3 finite numbers (mm per voxel along x, y, z)")
        if (spacing <= 0).any():
            flipped = "; a flipped axis belongs in TransformMatrix" if (spacing < 0).any() else ""
            raise DataFormatError(
                f"{mhd_path}: header line '{key} = {header[key]}': expected 3 positive numbers (mm per voxel along "
                f"x, y, z){flipped}"
            )
    for key in (k for k in ORIGIN_KEYS if k in header):
        _header_numbers(header, key, 3, mhd_path, "3 finite numbers (the first voxel's position in mm)")
    for key in (k for k in DIRECTION_KEYS if k in header):
        direction = _header_numbers(header, key, 9, mhd_path, "9 finite numbers (a 3 × 3 direction matrix)")
        error = direction_error(direction)
        if error > DIRECTION_TOL:
            raise DataFormatError(
                f"{mhd_path}: header line '{key} = {header[key]}' is not an orthonormal direction matrix "
                f"(max |DDᵀ − I| = {error:.3g} > {DIRECTION_TOL:g}); expected unit axes at right angles"
            )


def _data_file_names(value: str, list_lines: list[str], mhd_path: Path) -> tuple[list[str] | None, int]:
    """The data files an ElementDataFile names (None for LOCAL) and how many of the image's leading
    dimensions each holds: one file (spaces allowed) holds all 3; a LIST (`LIST [2D]`, names on the
    following lines) or a pattern `format first last [step]` (`slice%03d.raw 1 40 1`) one slice each."""
    if value.upper() == "LOCAL":
        return None, 3
    listed = re.match(r"^LIST\s*(?:([123])D)?\s*$", value, flags=re.IGNORECASE)
    if listed:
        return _named(list_lines, value, mhd_path), int(listed.group(1) or 2)
    if "%" not in value:
        return [value], 3
    fields = value.split()
    try:
        first, last, step = (int(v) for v in (fields[1:4] if len(fields) > 3 else [*fields[1:3], "1"]))
        names = [fields[0] % k for k in range(first, last + 1, step)]
    except (ValueError, TypeError, IndexError):
        names = []
    return _named(names, value, mhd_path), 2


def _named(names: list[str], value: str, mhd_path: Path) -> list[str]:
    if not names:
        raise DataFormatError(
            f"{mhd_path}: header line 'ElementDataFile = {cut_text(value)}': expected a file name, LOCAL, "
            "LIST (and the names on the lines after it) or a pattern 'name%03d.raw first last step'"
        )
    return names


def _data_path(name: str, mhd_path: Path) -> Path:
    """The path of a data file named in the header, refused outside the `.mhd`'s folder (the path as
    written, symbolic links not followed) unless P2CH_ALLOW_EXTERNAL_DATA=1."""
    folder = os.path.normpath(os.path.abspath(mhd_path.parent))
    path = os.path.normpath(os.path.join(folder, name))
    if os.path.commonpath([folder, path]) != folder and os.environ.get(ALLOW_EXTERNAL_DATA_ENV) != "1":
        raise DataFormatError(
            f"{mhd_path}: header line 'ElementDataFile = {cut_text(name)}' points outside the .mhd's folder "
            f"({path}); a data root must be self-contained: put the data file next to the .mhd, or set "
            f"{ALLOW_EXTERNAL_DATA_ENV}=1 to read it anyway"
        )
    return Path(path)


def _check_data_size(
    raw_path: Path, mhd_path: Path, actual: int, expected: int, header_bytes: int, described: str
) -> None:
    """Raise unless the data file(s) hold exactly the voxels (HeaderSize = -1: at least, at the end)."""
    if header_bytes < 0:
        expected_total, exact = expected, False
    else:
        expected_total, exact = expected + header_bytes, True
    if actual < expected_total:
        raise DataFormatError(
            f"{raw_path}: truncated, {actual} bytes but the header {mhd_path.name} needs "
            f"{expected_total} ({described}); re-download or re-extract this series"
        )
    if exact and actual > expected_total:
        raise DataFormatError(
            f"{raw_path}: {actual} bytes but the header {mhd_path.name} describes {expected_total} ({described}): "
            "its DimSize or ElementType does not match the data, so part of the CT would be dropped; "
            "fix the header or re-extract this series"
        )


def _read_mhd_image(mhd_path: Path) -> sitk.Image:
    """Check a `.mhd` + `.raw` pair (`read_mhd_header`) and read it with SimpleITK."""
    read_mhd_header(mhd_path)
    try:
        return sitk.ReadImage(str(mhd_path))
    except RuntimeError as exc:
        # SimpleITK's first line names its own source file; the reason is on the lines after.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = " ".join(lines[1:] or lines)[:300] or type(exc).__name__
        raise DataFormatError(
            f"{mhd_path}: SimpleITK cannot read it ({reason}); re-download or re-extract it"
        ) from None


class Ct:
    """One CT: HU voxels (index, row, col) and the geometry to map them to patient mm.

    Attributes:
        series_uid: the LUNA16 (or DICOM, or path-derived) series uid.
        source: where it was read from: the `.mhd` file, or the DICOM folder.
        mhd_path: the same as `source` (the name older callers use; a folder for a DICOM CT).
        hu: (I, R, C) int16 HU, clipped to [-1000, 1000]. Air is -1000 and anything denser
            than bone is noise for nodule finding; clipping also folds LUNA16's out-of-field
            padding (-3024 or -2000) into air. Clipping happens on int16, before any float
            conversion, so a volume never exists as float32.
        origin_xyz: XyzTuple, mm. voxel_size_xyz: XyzTuple, mm per voxel along (x, y, z).
        direction: (3, 3) float64 direction matrix.
        dicom_slices: per slice, the DICOM file, InstanceNumber and SOPInstanceUID (`p2ch.dicom.DicomSlices`)
            of a CT read from a DICOM folder; None for other sources.
        provenance: {key: text} of what was done to the voxels on the way in, e.g. a DICOM series
            resampled for its gantry tilt (`p2ch.dicom.TILT_KEY`); empty for a CT read as stored.
    """

    dicom_slices: dicom.DicomSlices | None = None

    def __init__(self, series_uid: str, data_root: str | os.PathLike[str] | None = None):
        series_uid = check_series_uid(series_uid)
        mhd_path = find_mhd(series_uid, data_root)
        self._set_image(_read_mhd_image(mhd_path), series_uid, mhd_path)

    @classmethod
    def from_image(cls, image: sitk.Image, series_uid: str, source: str | os.PathLike[str]) -> Ct:
        """A `Ct` from a SimpleITK image already read (voxels in HU, any pixel type).

        `source` (the file or folder it came from) is kept as `source` and `mhd_path` and named
        in errors. Raises DataFormatError for an image that is not 3-D single-channel.
        """
        ct = cls.__new__(cls)
        ct._set_image(image, check_series_uid(series_uid), Path(source))
        return ct

    def _set_image(self, image: sitk.Image, series_uid: str, source: Path) -> None:
        self.series_uid = series_uid
        self.source = source
        self.mhd_path = source
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise DataFormatError(
                f"{source}: expected a 3-D single-channel CT, got {image.GetDimension()}-D "
                f"with {image.GetNumberOfComponentsPerPixel()} components per voxel"
            )
        hu = sitk.GetArrayFromImage(image)
        if hu.dtype == np.int16:
            np.clip(hu, HU_MIN, HU_MAX, out=hu)
        else:
            hu = np.clip(hu, HU_MIN, HU_MAX).astype(np.int16)
        self.hu = hu
        self.origin_xyz = XyzTuple(*image.GetOrigin())
        self.voxel_size_xyz = XyzTuple(*image.GetSpacing())
        self.direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        self.provenance = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys() if key.startswith("p2ch:")}

    def __repr__(self) -> str:
        return f"Ct({self.series_uid!r}, shape={self.hu.shape}, spacing={tuple(self.voxel_size_xyz)})"

    @property
    def shape_irc(self) -> IrcTuple:
        return IrcTuple(*self.hu.shape)

    def xyz2irc(self, center_xyz) -> IrcTuple | np.ndarray:
        """World mm (3 values or (N, 3)) → rounded voxel index of this CT."""
        return xyz2irc(center_xyz, self.origin_xyz, self.voxel_size_xyz, self.direction)

    def locate(self, centers_xyz) -> tuple[np.ndarray, np.ndarray]:
        """Voxels of many centres and whether each lies inside this CT.

        centers_xyz: (N, 3) float mm. Returns `(centers_irc, inside)`: (N, 3) int64 and (N,) bool.
        """
        centers_irc = np.atleast_2d(np.asarray(self.xyz2irc(np.atleast_2d(centers_xyz))))
        return centers_irc, inside_volume(centers_irc, self.hu.shape)

    def _check_inside(self, centers_irc: np.ndarray, centers_xyz: np.ndarray) -> None:
        shape = self.hu.shape
        outside = ~inside_volume(centers_irc, shape)
        if outside.any():
            k = int(np.flatnonzero(outside)[0])
            raise CandidateOutsideCtError(
                f"candidate centre {tuple(round(float(v), 2) for v in centers_xyz[k])} mm lies outside CT "
                f"{self.series_uid} (voxel {tuple(int(v) for v in centers_irc[k])}, volume "
                f"{tuple(int(v) for v in shape)} index/row/col); check the CSV coordinates "
                f"({int(outside.sum())} of {len(outside)} centres are outside)"
            )

    def _window_starts(self, centers_irc: np.ndarray, width_irc: np.ndarray) -> np.ndarray:
        # Centre the window on the candidate, then shift it back inside the volume at an edge
        # (the chunk stays full-size; the candidate is then off-centre in it, as in the book).
        shape = np.asarray(self.hu.shape)
        starts = centers_irc - width_irc // 2
        return np.clip(starts, 0, np.maximum(shape - width_irc, 0))

    def get_raw_candidates(self, centers_xyz, width_irc: Sequence[int] = DEFAULT_WIDTH_IRC):
        """Crop many chunks at once.

        centers_xyz: (N, 3) float mm. Returns `(chunks, centers_irc)`: chunks (N, *width_irc)
        int16 HU, centers_irc (N, 3) int64. A volume thinner than the window along some axis
        is padded with air (-1000 HU) at the far end.
        """
        centers_xyz = np.atleast_2d(np.asarray(centers_xyz, dtype=np.float64))
        width = np.asarray(check_width_irc(width_irc), dtype=np.int64)
        centers_irc = np.atleast_2d(np.asarray(self.xyz2irc(centers_xyz)))
        self._check_inside(centers_irc, centers_xyz)
        starts = self._window_starts(centers_irc, width)
        chunks = np.full((len(centers_irc), *width), HU_MIN, dtype=np.int16)
        for n, (i, r, c) in enumerate(starts):
            block = self.hu[i : i + width[0], r : r + width[1], c : c + width[2]]
            chunks[n, : block.shape[0], : block.shape[1], : block.shape[2]] = block
        return chunks, centers_irc

    def get_raw_candidate(self, center_xyz, width_irc: Sequence[int] = DEFAULT_WIDTH_IRC):
        """Crop one chunk around `center_xyz` (3 values, mm).

        Returns `(chunk, center_irc)`: chunk (*width_irc) int16 HU (default (32, 48, 48)),
        center_irc an IrcTuple of the candidate's voxel. Raises CandidateOutsideCtError when
        the centre is outside the volume.
        """
        chunks, centers_irc = self.get_raw_candidates([center_xyz], width_irc)
        return chunks[0], IrcTuple(*(int(v) for v in centers_irc[0]))


@functools.lru_cache(maxsize=CT_CACHE_SIZE)
def _get_ct(series_uid: str, root: str) -> Ct:
    return Ct(series_uid, root)


def get_ct(series_uid: str, data_root: str | os.PathLike[str] | None = None) -> Ct:
    """A `Ct`, kept in a small per-process LRU (a CT is ~150 MB as int16; a few fit)."""
    root = resolve_data_root(data_root)
    return _get_ct(check_series_uid(series_uid), str(root.resolve()))


def clear_caches() -> None:
    """Forget the series index and the CTs kept by `get_ct` (after CT files were added or replaced)."""
    clear_series_index()
    _get_ct.cache_clear()


def _derived_series_uid(path: Path) -> str:
    """`2.25.<decimal>` from sha1 of the absolute path: a stable, valid DICOM uid (≤ 42 characters)."""
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()
    return "2.25." + str(int(digest[:30], 16))


def load_mhd(path: str | os.PathLike[str]) -> Ct:
    """A `Ct` from a `.mhd` (+ its `.raw`) anywhere on disk, not only in a LUNA16 data root.

    The series uid is the file's stem when it is a uid (digits and dots, ≤ 64 characters), else
    `2.25.<int(sha1(absolute path)[:30 hex digits], 16)>` (see the module docstring). Not cached.
    """
    mhd_path = Path(path).resolve()
    image = _read_mhd_image(mhd_path)
    uid = mhd_path.stem if is_valid_series_uid(mhd_path.stem) else _derived_series_uid(mhd_path)
    return Ct.from_image(image, uid, mhd_path)


INPUT_KINDS = (
    "a LUNA16 series uid, a .mhd file (with its .raw), a NIfTI or NRRD file (.nii, .nii.gz, .nrrd, .nhdr) or a "
    "folder of DICOM files"
)


def load_image_file(path: str | os.PathLike[str], hu_offset: int = 0) -> Ct:
    """A `Ct` from a NIfTI or NRRD file (`p2ch.imagefile.read_image_file` checks it; `hu_offset` is added to
    every voxel, for a file known to store HU + 1024). Series uid: the name without its suffix when that is a
    uid, else `2.25.…` from the absolute path, as `load_mhd` does. Not cached."""
    path = Path(path).resolve()
    image = imagefile.read_image_file(path, hu_offset)
    stem = imagefile.image_stem(path)
    return Ct.from_image(image, stem if is_valid_series_uid(stem) else _derived_series_uid(path), path)


def load_dicom(folder: str | os.PathLike[str], series_uid: str | None = None) -> Ct:
    """The CT of a folder of DICOM files (its one series, or `series_uid`): see `p2ch.dicom.read_dicom_image`
    for the checks (CT modality, HU rescale, one orientation, evenly spaced slices, no gaps). Its
    `dicom_slices` (`p2ch.dicom.DicomSlices`) name each slice's file, InstanceNumber and SOPInstanceUID."""
    image, uid = dicom.read_dicom_image(folder, series_uid)
    ct = Ct.from_image(image, uid, Path(folder))
    ct.dicom_slices = dicom.read_slice_references(folder, uid, image)
    return ct


def load_ct_input(
    spec: str,
    data_root: str | os.PathLike[str] | None = None,
    dicom_series: str | None = None,
    hu_offset: int = 0,
) -> Ct:
    """A `Ct` from whatever names one: a `.mhd` path, a NIfTI/NRRD path, a DICOM folder or a series uid.

    `spec` ending in `.mhd` → `load_mhd`; in `.nii`, `.nii.gz`, `.nrrd` or `.nhdr` → `load_image_file(spec,
    hu_offset)`; an existing folder → `load_dicom(spec, dicom_series)`; an existing file of another kind →
    DataFormatError; else a series uid → `get_ct(spec, data_root)`. `dicom_series` is only for a DICOM
    folder and `hu_offset` only for a NIfTI/NRRD file (ConfigError otherwise).
    """
    path = Path(spec)
    is_image_file = imagefile.image_suffix(path) is not None
    if hu_offset and not is_image_file:
        raise ConfigError(f"--hu-offset {hu_offset} applies to NIfTI and NRRD files only, but {spec} is not one")
    if path.is_dir():
        return load_dicom(path, dicom_series)
    if dicom_series is not None:
        raise ConfigError(f"--dicom-series {dicom_series} applies to a DICOM folder only, but {spec} is not a folder")
    if path.suffix.lower() == ".mhd":
        return load_mhd(path)
    if is_image_file:
        return load_image_file(path, hu_offset)
    if path.exists():
        hint = f"; pass {path.with_suffix('.mhd')} instead" if path.suffix.lower() == ".raw" else ""
        raise DataFormatError(f"{spec}: not a CT input; expected {INPUT_KINDS}{hint}")
    if not is_valid_series_uid(spec):
        raise DataNotFoundError(
            f"{spec!r}: no such file or folder, and not a series uid (digits and dots); expected {INPUT_KINDS}"
        )
    try:
        return get_ct(spec, data_root)
    except DataNotFoundError as exc:
        raise DataNotFoundError(f"{exc}; a path to a .mhd file or to a folder of DICOM files also works") from None
