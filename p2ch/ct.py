"""One CT volume (`Ct`), its geometry, cropping chunks, and finding a CT on disk.

LUNA16 stores each CT as a MetaIO header (`<series_uid>.mhd`) next to raw int16 voxels
(`<series_uid>.raw`) in `subset0/` … `subset9/`. We check the header and the size of the raw
file ourselves before handing the pair to SimpleITK, because SimpleITK's own errors for a
missing or truncated `.raw` do not say which file or what was wrong.

A CT can come from three kinds of input (`load_ct_input`, for commands that take "any CT"):

- a LUNA16 series uid: `<data root>/subset*/<uid>.mhd`, through `get_ct` (cached);
- a path to a `.mhd` file anywhere: `load_mhd` (same header and `.raw` checks). Its series uid is
  the file name's stem when that is a uid (digits and dots); otherwise one derived from the
  file's absolute path, `2.25.<int of the first 30 hex digits of sha1(path)>`: 2.25 is the
  OID root for UUID-derived uids, so it is a valid DICOM uid (≤ 42 characters), the same for
  the same file on every run, and never a LUNA16 uid;
- a path to a folder of DICOM files: `load_dicom` (checks in `p2ch.dicom`) (one CT series; pick one with
  `dicom_series` when the folder holds several).

Every input ends in `Ct.from_image`, so the voxels (int16 HU clipped to [-1000, 1000]) and the
geometry are handled the same way whatever the source.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from p2ch import dicom
from p2ch.config import resolve_data_root
from p2ch.errors import CandidateOutsideCtError, ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import DEFAULT_WIDTH_IRC, IrcTuple, XyzTuple, check_width_irc, inside_volume, xyz2irc
from p2ch.luna import check_series_uid, clear_series_index, find_mhd, is_valid_series_uid

log = logging.getLogger(__name__)

HU_MIN = -1000
HU_MAX = 1000
CT_CACHE_SIZE = 3

_ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def read_mhd_header(mhd_path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a MetaIO header and check it describes a 3-D image whose data file is complete.

    Returns the header's `key = value` pairs. Raises DataNotFoundError for a missing `.mhd` or
    `.raw`, DataFormatError for an unreadable or non-3-D header or a truncated `.raw`.
    """
    mhd_path = Path(mhd_path)
    try:
        text = mhd_path.read_bytes()[:65536].decode("ascii")
    except FileNotFoundError:
        raise DataNotFoundError(f"{mhd_path}: file not found") from None
    except UnicodeDecodeError:
        raise DataFormatError(f"{mhd_path}: not a MetaIO header (not ASCII text)") from None
    header: dict[str, str] = {}
    for line in text.splitlines():
        if "=" not in line:
            continue
        key, _, value = line.partition("=")
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break  # binary data may follow in a LOCAL file
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
            f"{mhd_path}: corrupt MetaIO header, NDims={header['NDims']!r} "
            f"DimSize={header['DimSize']!r} are not integers"
        ) from None
    if ndims != 3 or len(dims) != 3 or min(dims) < 1:
        raise DataFormatError(f"{mhd_path}: expected a 3-D CT volume, got NDims={ndims} DimSize={dims}")
    data_file = header["ElementDataFile"]
    element_bytes = _ELEMENT_BYTES.get(header["ElementType"])
    if element_bytes is None:
        raise DataFormatError(f"{mhd_path}: unsupported ElementType {header['ElementType']!r} (LUNA16 uses MET_SHORT)")
    compressed = header.get("CompressedData", "False").lower() == "true"
    if data_file.upper() != "LOCAL" and " " not in data_file and "%" not in data_file:
        raw_path = mhd_path.parent / data_file
        if not raw_path.is_file():
            raise DataNotFoundError(
                f"{mhd_path}: its voxel file {raw_path} is missing; unpack the .raw next to the .mhd"
            )
        if not compressed:
            channels = int(header.get("ElementNumberOfChannels", "1") or 1)
            expected = int(np.prod(dims)) * element_bytes * channels
            actual = raw_path.stat().st_size
            if actual < expected:
                raise DataFormatError(
                    f"{raw_path}: truncated, {actual} bytes but the header {mhd_path.name} needs "
                    f"{expected} ({'x'.join(map(str, dims))} × {element_bytes} bytes); "
                    "re-download or re-extract this series"
                )
    return header


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
    """

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
                f"candidate centre {tuple(np.round(centers_xyz[k], 2))} mm lies outside CT "
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


INPUT_KINDS = "a LUNA16 series uid, a .mhd file (with its .raw) or a folder of DICOM files"


def load_dicom(folder: str | os.PathLike[str], series_uid: str | None = None) -> Ct:
    """The CT of a folder of DICOM files (its one series, or `series_uid`): see `p2ch.dicom.read_dicom_image`
    for the checks (CT modality, HU rescale, one orientation, evenly spaced slices, no gaps)."""
    image, uid = dicom.read_dicom_image(folder, series_uid)
    return Ct.from_image(image, uid, Path(folder))


def load_ct_input(spec: str, data_root: str | os.PathLike[str] | None = None, dicom_series: str | None = None) -> Ct:
    """A `Ct` from whatever names one: a `.mhd` path, a DICOM folder or a series uid.

    `spec` ending in `.mhd` → `load_mhd`; an existing folder → `load_dicom(spec, dicom_series)`; an
    existing file of another kind → DataFormatError; else a series uid → `get_ct(spec, data_root)`.
    `dicom_series` is only for a DICOM folder (ConfigError otherwise).
    """
    path = Path(spec)
    if path.is_dir():
        return load_dicom(path, dicom_series)
    if dicom_series is not None:
        raise ConfigError(f"--dicom-series {dicom_series} applies to a DICOM folder only, but {spec} is not a folder")
    if path.suffix.lower() == ".mhd":
        return load_mhd(path)
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
