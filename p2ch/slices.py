"""CT slices and nodule label masks on disk for the 2D segmentation model (chapter 13): `SliceCache`.

The segmentation model reads a slice with its neighbours (validation: whole slices; training:
96 x 96 crops around each nodule), and its target is the nodule mask of the middle slice. Both
come from a CT that takes about a second to load, so they are written once per CT (`fill_series`,
run CT by CT in worker processes by `python -m p2ch.prepcache --segmentation`, see
`p2ch.prefill.fill_slices`) and read slice by slice. A CT not filled yet is filled on first read.

Store: a `p2ch.store.ByteStore` in `<cache_dir>/segmentation/`, a folder of its own next to the
chunk cache's shards, with its own record format (`SLICE_RECORD`, magic `P2SL`). Every record is
a 24-byte little-endian header (`HEADER`: magic, format version, kind, flags, shape (3 x 16 bits),
payload length, CRC-32 of the payload as stored) in the SQLite row and its payload in the value
file. Per CT:

- `hu/<k>` for every slice k: (R, C) int16 HU, raw C order (`KIND_HU`); the value file is the
  slice's bytes, so a 512 x 512 slice is exactly 128 pages of 4 KiB.
- `mask/<k>` only for the slices that hold nodule voxels: (R, C) uint8 labels, 0 background and
  k + 1 on nodule k (`KIND_MASK`), zlib-compressed when that is smaller (it nearly always is:
  a nodule covers a few hundred of 262,144 pixels). A slice without a record is all background.
- `meta`, written LAST: shape, spacing, origin, direction, the nodules (annotation rows, centres
  in mm and voxels, diameters, labelled voxels), the slices holding nodule voxels, and the
  identities in its key, as UTF-8 JSON (`KIND_META`). Its presence marks the CT complete: a fill
  killed midway leaves no meta, and the next fill writes what is missing (slices already present
  are not rewritten) and then the meta.

Keys name everything that determines the value, so nothing stale is ever served:

    p2ch-slices/v1/<series_uid>/<CT identity>/hu/<k>
    p2ch-slices/v1/<series_uid>/<CT identity>/<annotations id>/m<mask version>/mask/<k>
    p2ch-slices/v1/<series_uid>/<CT identity>/<annotations id>/m<mask version>/meta

The CT identity is `p2ch.cache.source_identity` (size and mtime of the .mhd and .raw). The
annotations id hashes this CT's rows of annotations.csv (centre and diameter, in file order,
which is also the label order), so editing another CT's row leaves this CT valid. The mask
version is `p2ch.masks.MASK_VERSION` (or, with another `mask_builder`, the version given with
it). HU slices depend on the CT alone, so an annotation change rewrites only the small mask and
meta records. Records are tagged (`v1/<uid>/<CT identity>[/<annotations id>/m<version>]`).

Reads check each record's header and length; full-slice reads (`slab`, `mask`, `info`) also
check the CRC-32 (`verify`). A training crop (`crop`) reads only the rows it needs from each
slice's value file (a 96-row band of a 512-row slice), so it checks the header and file length
but cannot check the whole slice's CRC. A damaged or missing record is logged once, deleted with
its CT's meta, and the CT refilled; the read then succeeds.

Padding: a slab around slice k takes slices k - c … k + c; those beyond the CT's ends repeat the
first or last slice (the book's rule: the model sees plausible anatomy, not a wall of air). A
crop is clamped inside the CT in rows and columns (the nodule is then off-centre, as in
`Ct.get_raw_candidates`); where the CT is smaller than the crop, the rest is air (-1000 HU) and
background.

Per process, the identity of each CT's files and this CT's annotations are looked up once
(annotations.csv is read once per process); call `refresh()` after changing files in a
long-running process. Picklable: a `SliceCache` holds paths and settings, and rebuilds that
state in each process (DataLoader workers, prefill workers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from p2ch import masks
from p2ch.cache import source_identity
from p2ch.candidates import group_rows, read_annotations
from p2ch.config import CACHE_DIR_ENV, resolve_cache_dir, resolve_data_root
from p2ch.ct import HU_MIN, Ct, clear_caches
from p2ch.errors import ConfigError, DataFormatError
from p2ch.geometry import IrcTuple, XyzTuple
from p2ch.luna import ANNOTATIONS_FILE
from p2ch.store import (
    DEFAULT_SHARDS,
    DEFAULT_TIMEOUT_S,
    ByteStore,
    DamagedRecord,
    Record,
    RecordDisk,
    RecordFormat,
    StoreKind,
)

log = logging.getLogger(__name__)

# Bump when the key scheme or a record layout changes: old records are then never read.
SLICE_FORMAT_VERSION = 1
KEY_PREFIX = "p2ch-slices"
STORE_SUBDIR = "segmentation"
MAGIC = b"P2SL"
# magic, format version, kind, flags, shape (3 x uint16; unused sides 0), payload bytes, CRC-32.
HEADER = struct.Struct("<4sHHHHHHII")
KIND_HU, KIND_MASK, KIND_META = 1, 2, 3
FLAG_ZLIB = 1
DEFAULT_CONTEXT_SLICES = 3
DEFAULT_CROP_SIZE = 96
MAX_LABELS = 255  # labels are uint8: at most 255 nodules per CT

SLICE_RECORD = RecordFormat(magic=MAGIC, header_size=HEADER.size, noun="encoded slice record", encoder="encode_record")
SLICE_STORE = StoreKind(
    label="slice cache",
    source="p2ch/slices.py",
    dir_option="--cache-dir",
    dir_env=CACHE_DIR_ENV,
    full_advice="free some space, delete it (python -m p2ch.prepcache --segmentation --clear), or point "
    f"--cache-dir / {CACHE_DIR_ENV} at a bigger disk (all of LUNA16 takes about as much as its .raw files)",
)

# (ct, centers_xyz (N, 3) float mm, diameters_mm (N,) float) -> (I, R, C) int labels, k + 1 on nodule k.
MaskBuilder = Callable[[Ct, np.ndarray, np.ndarray], np.ndarray]


class SliceDisk(RecordDisk):
    """The store's serialiser for slice records: `HEADER` in the SQLite row, the payload in the value file."""

    record = SLICE_RECORD


def default_mask_builder(ct: Ct, centers_xyz: np.ndarray, diameters_mm: np.ndarray) -> np.ndarray:
    """`p2ch.masks.ct_mask` with per-nodule labels: (I, R, C) int32, k + 1 on nodule k, 0 elsewhere."""
    return masks.ct_mask(ct, centers_xyz, diameters_mm, labels=True)


# --- records ------------------------------------------------------------------------------------


def encode_record(kind: int, payload: np.ndarray | bytes, compress: bool = False) -> bytes:
    """One record: `HEADER` + payload. payload: a 2-D array (its shape goes into the header) or bytes.

    compress: zlib level 1, kept only when smaller than the raw payload.
    """
    shape = (0, 0, 0)
    if isinstance(payload, np.ndarray):
        assert payload.ndim == 2 and max(payload.shape) <= 0xFFFF, f"slice shape {payload.shape}"
        shape = (1, *payload.shape)
        data: Any = memoryview(np.ascontiguousarray(payload)).cast("B")
    else:
        data = payload
    flags = 0
    if compress:
        packed = zlib.compress(data, 1)
        if len(packed) < len(data):
            data, flags = packed, FLAG_ZLIB
    header = HEADER.pack(MAGIC, SLICE_FORMAT_VERSION, kind, flags, *shape, len(data), zlib.crc32(data))
    return b"".join((header, data))


def _parse_header(header: bytes, kind: int, shape: tuple[int, ...] | None, itemsize: int) -> tuple[int, int, int]:
    """(flags, payload length, CRC) of a record header, or DamagedRecord."""
    if len(header) != HEADER.size:
        raise DamagedRecord(f"header is {len(header)} bytes, expected {HEADER.size}")
    magic, version, got_kind, flags, d0, d1, d2, length, crc = HEADER.unpack(header)
    if magic != MAGIC or version != SLICE_FORMAT_VERSION or got_kind != kind:
        raise DamagedRecord(f"magic {magic!r} version {version} kind {got_kind}, expected {MAGIC!r} v1 kind {kind}")
    if flags & ~FLAG_ZLIB:
        raise DamagedRecord(f"unknown flags {flags:#x}")
    if shape is not None and (d0, d1, d2) != (1, *shape):
        raise DamagedRecord(f"shape {(d1, d2)}, expected {shape}")
    if not flags and shape is not None and length != itemsize * shape[0] * shape[1]:
        raise DamagedRecord(f"payload length {length} does not match shape {shape}")
    return flags, length, crc


def _payload(record: Record, kind: int, verify: bool) -> bytes:
    """The whole (decompressed) payload of a meta or mask record."""
    flags, length, crc = _parse_header(record.header, kind, None, 1)
    data = record.file.read()
    if len(data) != length:
        raise DamagedRecord(f"read {len(data)} of {length} bytes")
    if verify and zlib.crc32(data) != crc:
        raise DamagedRecord("CRC-32 mismatch")
    if flags & FLAG_ZLIB:
        try:
            data = zlib.decompress(data)
        except zlib.error as exc:
            raise DamagedRecord(f"zlib: {exc}") from None
    return data


def _read_hu_into(record: Record, out: np.ndarray, verify: bool) -> None:
    """Read a whole HU slice record into `out` ((R, C) int16, C-contiguous)."""
    _, length, crc = _parse_header(record.header, KIND_HU, out.shape, 2)
    if record.size() != length:
        raise DamagedRecord(f"value file is {record.size()} bytes, header says {length}")
    view = memoryview(out).cast("B")
    record.read_exact(view)
    if verify and zlib.crc32(view) != crc:
        raise DamagedRecord("CRC-32 mismatch")


def _read_hu_rows(record: Record, shape_rc: tuple[int, int], first_row: int, out: np.ndarray) -> None:
    """Read rows [first_row, first_row + len(out)) of an HU slice record into `out` ((n, C) int16).

    Checks the header and the value file's length; the CRC covers the whole slice, so it is not checked.
    """
    _, length, _ = _parse_header(record.header, KIND_HU, shape_rc, 2)
    if record.size() != length:
        raise DamagedRecord(f"value file is {record.size()} bytes, header says {length}")
    record.file.seek(first_row * shape_rc[1] * 2)
    record.read_exact(memoryview(out).cast("B"))


def _read_mask(record: Record, shape_rc: tuple[int, int], verify: bool) -> np.ndarray:
    data = _payload(record, KIND_MASK, verify)
    if len(data) != shape_rc[0] * shape_rc[1]:
        raise DamagedRecord(f"mask of {len(data)} bytes for a {shape_rc} slice")
    _parse_header(record.header, KIND_MASK, shape_rc, 1)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape_rc).copy()


# --- what is known about a CT -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SliceInfo:
    """A filled CT: geometry, nodules and where their voxels are (the `meta` record).

    shape_irc: (I, R, C) voxels. voxel_size_xyz, origin_xyz: mm. direction: (3, 3) float64.
    nodule_rows: (n,) int64, each nodule's row in annotations.csv (0 = the first data row, after
    exact duplicates are dropped); nodule k has label k + 1. nodule_center_xyz: (n, 3) float64 mm.
    nodule_center_irc: (n, 3) int64 voxel (index, row, col). nodule_diameter_mm: (n,) float64.
    nodule_voxels: (n,) int64 voxels labelled k + 1. nodule_slices: (m,) int64 ascending, the
    slices holding any nodule voxel. ct_identity, annotations_id, mask_version: the key's parts.
    """

    series_uid: str
    shape_irc: IrcTuple
    voxel_size_xyz: XyzTuple
    origin_xyz: XyzTuple
    direction: np.ndarray
    nodule_rows: np.ndarray
    nodule_center_xyz: np.ndarray
    nodule_center_irc: np.ndarray
    nodule_diameter_mm: np.ndarray
    nodule_voxels: np.ndarray
    nodule_slices: np.ndarray
    ct_identity: str
    annotations_id: str
    mask_version: str

    def to_json(self) -> bytes:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        plain = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in values.items()}
        return json.dumps({"format": SLICE_FORMAT_VERSION, **plain}, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> SliceInfo:
        try:
            v = json.loads(data.decode("utf-8"))
            n = len(v["nodule_rows"])
            return cls(
                series_uid=str(v["series_uid"]),
                shape_irc=IrcTuple(*(int(x) for x in v["shape_irc"])),
                voxel_size_xyz=XyzTuple(*(float(x) for x in v["voxel_size_xyz"])),
                origin_xyz=XyzTuple(*(float(x) for x in v["origin_xyz"])),
                direction=np.array(v["direction"], dtype=np.float64).reshape(3, 3),
                nodule_rows=np.array(v["nodule_rows"], dtype=np.int64).reshape(n),
                nodule_center_xyz=np.array(v["nodule_center_xyz"], dtype=np.float64).reshape(n, 3),
                nodule_center_irc=np.array(v["nodule_center_irc"], dtype=np.int64).reshape(n, 3),
                nodule_diameter_mm=np.array(v["nodule_diameter_mm"], dtype=np.float64).reshape(n),
                nodule_voxels=np.array(v["nodule_voxels"], dtype=np.int64).reshape(n),
                nodule_slices=np.array(v["nodule_slices"], dtype=np.int64).reshape(-1),
                ct_identity=str(v["ct_identity"]),
                annotations_id=str(v["annotations_id"]),
                mask_version=str(v["mask_version"]),
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DamagedRecord(f"meta: {type(exc).__name__}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class SliceFillResult:
    """What `SliceCache.fill_series` did for one CT.

    written: records stored now; present: records already there (HU slices of an earlier,
    interrupted fill, or of the same CT with other annotations); ct_bytes: bytes of the CT's
    voxels read. All 0 when the CT was complete (nothing loaded or looked at).
    """

    series_uid: str
    written: int
    present: int
    ct_bytes: int


class _Nodules(NamedTuple):
    """One CT's annotations: rows (n,) int64 of annotations.csv, centers_xyz (n, 3) mm, diameters_mm (n,)."""

    rows: np.ndarray
    centers_xyz: np.ndarray
    diameters_mm: np.ndarray

    def identity(self) -> str:
        # Centre and diameter to the nm, in file order (the label order): 16 hex digits of SHA-256.
        values = np.round(np.column_stack([self.centers_xyz, self.diameters_mm]), 6).astype("<f8")
        return hashlib.sha256(values.tobytes()).hexdigest()[:16]


_NO_NODULES = _Nodules(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0))


def _read_nodules(data_root: Path) -> dict[str, _Nodules]:
    """annotations.csv (validated by `read_annotations`) grouped by series."""
    frame = read_annotations(data_root / ANNOTATIONS_FILE)
    uids = frame["seriesuid"].to_numpy(dtype=str)
    centers = frame[["coordX", "coordY", "coordZ"]].to_numpy(dtype=np.float64)
    diameters = frame["diameter_mm"].to_numpy(dtype=np.float64)
    return {
        str(uids[rows[0]]): _Nodules(rows.astype(np.int64), centers[rows], diameters[rows]) for rows in group_rows(uids)
    }


class _CtKeys(NamedTuple):
    """Key prefixes and tags of one CT as of its current identities."""

    hu_prefix: str
    hu_tag: str
    seg_prefix: str
    seg_tag: str

    def hu(self, k: int) -> str:
        return f"{self.hu_prefix}hu/{k}"

    def mask(self, k: int) -> str:
        return f"{self.seg_prefix}mask/{k}"

    @property
    def meta(self) -> str:
        return f"{self.seg_prefix}meta"


class _ProcessState:
    """What one process knows: annotations by series, CT identities, key prefixes, infos; and counters."""

    def __init__(self, data_root: Path, mask_version: str):
        self.pid = os.getpid()
        self.data_root = data_root
        self.mask_version = mask_version
        self.nodules_by_uid: dict[str, _Nodules] | None = None
        self.identities: dict[str, str] = {}
        self.keys_by_uid: dict[str, _CtKeys] = {}
        self.infos: dict[str, SliceInfo] = {}
        self.counts = {"hits": 0, "filled": 0, "corrupt": 0, "written": 0}
        self.corrupt_logged = False

    def nodules(self, series_uid: str) -> _Nodules:
        if self.nodules_by_uid is None:
            self.nodules_by_uid = _read_nodules(self.data_root)
        return self.nodules_by_uid.get(series_uid, _NO_NODULES)

    def keys(self, series_uid: str) -> _CtKeys:
        found = self.keys_by_uid.get(series_uid)
        if found is None:
            identity = self.identities.get(series_uid)
            if identity is None:
                identity = self.identities[series_uid] = source_identity(series_uid, self.data_root)
            ct_part = f"v{SLICE_FORMAT_VERSION}/{series_uid}/{identity}"
            seg_part = f"{ct_part}/{self.nodules(series_uid).identity()}/m{self.mask_version}"
            found = _CtKeys(f"{KEY_PREFIX}/{ct_part}/", ct_part, f"{KEY_PREFIX}/{seg_part}/", seg_part)
            self.keys_by_uid[series_uid] = found
        return found

    def loaded(self, series_uid: str, identity: str) -> None:
        """A CT was just read with files of `identity`: forget keys of an older identity."""
        if self.identities.get(series_uid) != identity:
            self.identities[series_uid] = identity
            self.keys_by_uid.pop(series_uid, None)
            self.infos.pop(series_uid, None)

    def note_corrupt(self, where: str, key: str, exc: BaseException | str) -> None:
        self.counts["corrupt"] += 1
        if not self.corrupt_logged:
            self.corrupt_logged = True
            log.warning(
                "damaged record in slice cache %s (%s: %s); refilling its CT (further ones logged at debug level)",
                where,
                key,
                exc,
            )
        else:
            log.debug("damaged record %s (%s); refilling its CT", key, exc)


def _load_ct(series_uid: str, data_root: Path) -> tuple[Ct, str]:
    """Load a CT and the identity of the files it was read from (the same before and after the read)."""
    for _ in range(3):
        before = source_identity(series_uid, data_root)
        ct = Ct(series_uid, data_root)
        if source_identity(series_uid, data_root) == before:
            return ct, before
    raise DataFormatError(
        f"CT {series_uid} under {data_root} keeps changing while being read; wait until it is "
        "completely written, then retry"
    )


def _check_nodules(ct: Ct, nodules: _Nodules, data_root: Path) -> np.ndarray:
    """(n, 3) int64 voxel of each nodule centre; DataFormatError naming the series, row and value when outside."""
    centers_irc, inside = ct.locate(nodules.centers_xyz) if len(nodules.rows) else (np.zeros((0, 3)), [])
    for k in range(len(nodules.rows)):
        where = f"{data_root / ANNOTATIONS_FILE}: line {int(nodules.rows[k]) + 2}, series {ct.series_uid}"
        if not inside[k]:
            raise DataFormatError(
                f"{where}: nodule centre {tuple(round(float(v), 2) for v in nodules.centers_xyz[k])} mm is voxel "
                f"{tuple(int(v) for v in centers_irc[k])}, outside the CT's {'x'.join(map(str, ct.hu.shape))} "
                "voxels; fix the annotation's coordinates (or the CT)"
            )
        if not nodules.diameters_mm[k] > 0:
            raise DataFormatError(f"{where}: diameter_mm is {nodules.diameters_mm[k]:g}; expected a positive size")
    return np.asarray(centers_irc, dtype=np.int64).reshape(-1, 3)


def _labels(builder: MaskBuilder, ct: Ct, nodules: _Nodules) -> np.ndarray:
    """(I, R, C) uint8 labels of the CT's nodules from `builder` (all 0 without nodules)."""
    count = len(nodules.rows)
    if count == 0:
        return np.zeros(ct.hu.shape, dtype=np.uint8)
    if count > MAX_LABELS:
        raise DataFormatError(f"{ct.series_uid}: {count} annotations; the slice cache labels at most {MAX_LABELS}")
    labels = np.asarray(builder(ct, nodules.centers_xyz, nodules.diameters_mm))
    if labels.shape != ct.hu.shape or not (labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)):
        raise ConfigError(
            f"mask_builder returned {labels.dtype} {labels.shape} for CT {ct.series_uid}; expected integer "
            f"labels of the CT's shape {ct.hu.shape}"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > count):
        raise ConfigError(f"mask_builder returned labels outside 0..{count} for CT {ct.series_uid}")
    return labels.astype(np.uint8, copy=False)


def _info(ct: Ct, identity: str, nodules: _Nodules, centers_irc: np.ndarray, labels: np.ndarray, mask_version: str):
    """The `SliceInfo` of a CT being filled (labels: (I, R, C) uint8)."""
    counts = np.bincount(labels.ravel(), minlength=len(nodules.rows) + 1)[1:]
    return SliceInfo(
        series_uid=ct.series_uid,
        shape_irc=IrcTuple(*ct.hu.shape),
        voxel_size_xyz=XyzTuple(*(float(v) for v in ct.voxel_size_xyz)),
        origin_xyz=XyzTuple(*(float(v) for v in ct.origin_xyz)),
        direction=np.asarray(ct.direction, dtype=np.float64),
        nodule_rows=nodules.rows,
        nodule_center_xyz=nodules.centers_xyz,
        nodule_center_irc=centers_irc,
        nodule_diameter_mm=nodules.diameters_mm,
        nodule_voxels=counts.astype(np.int64),
        nodule_slices=np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1)).astype(np.int64),
        ct_identity=identity,
        annotations_id=nodules.identity(),
        mask_version=mask_version,
    )


def _write_ct(store: ByteStore, keys: _CtKeys, ct: Ct, labels: np.ndarray, info: SliceInfo) -> tuple[int, int]:
    """Store a CT's missing HU slices, its mask slices, then its meta; (written, present) records."""
    records = [(keys.hu(k), keys.hu_tag, KIND_HU, k) for k in range(len(ct.hu))]
    records += [(keys.mask(k), keys.seg_tag, KIND_MASK, k) for k in info.nodule_slices.tolist()]
    written = present = 0
    for key, tag, kind, k in records:
        if store.contains(key):
            present += 1
            continue
        value = encode_record(kind, ct.hu[k]) if kind == KIND_HU else encode_record(kind, labels[k], compress=True)
        if store.add(key, value, tag):
            written += 1
        else:
            present += 1
    # Last: its presence says every record above is stored.
    if store.add(keys.meta, encode_record(KIND_META, info.to_json(), compress=True), keys.seg_tag):
        written += 1
    else:
        present += 1
    return written, present


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} is {value!r}; expected an integer >= {minimum}")
    return int(value)


def _check_crop_size(crop_size: int | Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of a crop: one integer (a square) or two, each >= 1."""
    sides = [crop_size] if isinstance(crop_size, (int, np.integer)) else list(crop_size)
    if len(sides) not in (1, 2):
        raise ConfigError(f"crop_size {crop_size!r}: expected one integer (a square) or two (rows, cols)")
    rows = _check_int("crop_size", sides[0], 1)
    return rows, _check_int("crop_size", sides[-1], 1)


def _check_builder(mask_builder: MaskBuilder | None, mask_version: str | int | None) -> tuple[MaskBuilder, str]:
    """(builder, version for the keys): p2ch.masks' by default; ConfigError for unusable arguments."""
    if mask_builder is None:
        if mask_version is not None:
            raise ConfigError("mask_version goes with a mask_builder of your own; leave both unset for p2ch.masks")
        return default_mask_builder, str(masks.MASK_VERSION)
    if not callable(mask_builder):
        raise ConfigError(f"mask_builder: expected a function (ct, centers_xyz, diameters_mm), got {mask_builder!r}")
    if mask_version is None:
        mask_version = f"{mask_builder.__module__}.{getattr(mask_builder, '__qualname__', '?')}"
    if not str(mask_version) or "/" in str(mask_version):
        raise ConfigError(f"mask_version {mask_version!r}: expected a non-empty name without '/'")
    return mask_builder, str(mask_version)


def _window(center: int, width: int, extent: int) -> tuple[int, int]:
    """(start, count) of a `width`-long window around `center` moved inside [0, extent); count <= width."""
    start = min(max(center - width // 2, 0), max(extent - width, 0))
    return start, min(width, extent)


# --- the cache ----------------------------------------------------------------------------------


class SliceCache:
    """CT slices (int16 HU) and nodule label masks (uint8) per CT on disk, filled from the CTs on a miss.

    cache_dir: the cache folder (default `resolve_cache_dir()`: $P2CH_CACHE_DIR, else
    `data-unversioned/cache`); the records live in its subfolder `segmentation/`. data_root:
    LUNA16 root (default `resolve_data_root()`). Both are made absolute. mask_builder:
    `(ct, centers_xyz (N, 3) mm, diameters_mm (N,)) -> (I, R, C) int labels` (k + 1 on nodule k);
    default `default_mask_builder` (`p2ch.masks`), whose `MASK_VERSION` goes into the keys. With
    another builder, pass `mask_version` (str; default its module and qualified name) and change
    it whenever the builder's output changes. It must be picklable (a module-level function) for
    worker processes. verify: check the CRC-32 of whole-slice reads. shards, timeout_s: the
    store's (see `p2ch.store.ByteStore`).

    Reads: `info(uid)` (`SliceInfo`), `slab(uid, k, context_slices)`, `mask(uid, k)`,
    `crop(uid, center_irc, crop_size, context_slices)`. Writes: `fill_series(uid)` (and any read
    of a CT not filled yet). See the module docstring for records, keys and padding.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        data_root: str | os.PathLike[str] | None = None,
        *,
        mask_builder: MaskBuilder | None = None,
        mask_version: str | int | None = None,
        verify: bool = True,
        shards: int = DEFAULT_SHARDS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        self.mask_builder, self.mask_version = _check_builder(mask_builder, mask_version)
        self.cache_dir = resolve_cache_dir(cache_dir).absolute()
        self.data_root = resolve_data_root(data_root).absolute()
        self.directory = self.cache_dir / STORE_SUBDIR
        self.verify = bool(verify)
        self.store = ByteStore(self.directory, SliceDisk, SLICE_STORE, shards=shards, timeout_s=timeout_s)
        self._state = _ProcessState(self.data_root, self.mask_version)

    def __getstate__(self) -> dict[str, Any]:
        keep = ("cache_dir", "data_root", "directory", "mask_builder", "mask_version", "verify", "store")
        return {name: getattr(self, name) for name in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._state = _ProcessState(self.data_root, self.mask_version)

    def __repr__(self) -> str:
        return f"SliceCache({str(self.cache_dir)!r}, data_root={str(self.data_root)!r})"

    def _here(self) -> _ProcessState:
        """This process's state (a fresh one after a fork)."""
        if self._state.pid != os.getpid():
            self._state = _ProcessState(self.data_root, self.mask_version)
        return self._state

    # --- filling -------------------------------------------------------------------------------

    def complete(self, series_uid: str) -> bool:
        """True when the CT's meta record is present under its current key: nothing to fill.

        Reads only the index (creates nothing). Raises DataNotFoundError for a series not on disk.
        """
        keys = self._here().keys(series_uid)
        return self.store.exists() and self.store.contains(keys.meta)

    def fill_series(self, series_uid: str) -> SliceFillResult:
        """Store every slice, mask slice and the meta of one CT; load it only when its meta is absent.

        Memory: the CT and its labels. Raises DataNotFoundError for a series not on disk,
        DataFormatError for an unreadable CT or an annotation outside it, CacheFullError /
        CacheDirError when the store cannot be written.
        """
        if self.complete(series_uid):
            return SliceFillResult(series_uid, 0, 0, 0)
        state = self._here()
        ct, identity = _load_ct(series_uid, self.data_root)
        state.loaded(series_uid, identity)
        keys, nodules = state.keys(series_uid), state.nodules(series_uid)
        centers_irc = _check_nodules(ct, nodules, self.data_root)
        labels = _labels(self.mask_builder, ct, nodules)
        info = _info(ct, identity, nodules, centers_irc, labels, self.mask_version)
        written, present = _write_ct(self.store, keys, ct, labels, info)
        state.counts["written"] += written
        state.infos[series_uid] = info
        return SliceFillResult(series_uid, written, present, int(ct.hu.nbytes))

    # --- reading -------------------------------------------------------------------------------

    def _read(self, series_uid: str, key_of: Callable[[_CtKeys], str], decode: Callable[[Record], Any]) -> Any:
        """`decode(record)` of the CT's record `key_of(keys)`, filling the CT first when it is missing.

        A damaged record, or a slice record missing from a complete CT, is deleted with the CT's
        meta and the CT refilled.
        """
        state = self._here()
        for _ in range(3):
            keys = state.keys(series_uid)
            key, problem = key_of(keys), None
            try:
                record = self.store.get(key)
                if record is not None:
                    with record.file:
                        value = decode(record)
                    state.counts["hits"] += 1
                    return value
            except (DamagedRecord, OSError) as exc:
                problem = exc
            if problem is not None or key != keys.meta:
                state.note_corrupt(str(self.directory), key, problem or "record missing from a complete CT")
                self.store.delete([key, keys.meta])
            state.infos.pop(series_uid, None)
            state.counts["filled"] += 1
            self.fill_series(series_uid)
        raise DataFormatError(
            f"slice cache {self.directory}: record {key} is still unreadable after refilling CT {series_uid}; "
            "delete the folder (it is only a cache) and fill it again"
        )

    def _decode_info(self, series_uid: str, record: Record) -> SliceInfo:
        info = SliceInfo.from_json(_payload(record, KIND_META, self.verify))
        keys = self._here().keys(series_uid)
        if (info.series_uid, f"v{SLICE_FORMAT_VERSION}/{series_uid}/{info.ct_identity}") != (series_uid, keys.hu_tag):
            raise DamagedRecord(f"meta of {info.series_uid} / {info.ct_identity} under another CT's key")
        return info

    def info(self, series_uid: str) -> SliceInfo:
        """The CT's `SliceInfo` (kept per process), filling the CT first when needed."""
        state = self._here()
        found = state.infos.get(series_uid)
        if found is None:
            found = self._read(series_uid, lambda keys: keys.meta, lambda r: self._decode_info(series_uid, r))
            state.infos[series_uid] = found
        return found

    def _slice_indices(self, info: SliceInfo, slice_index: Any, context_slices: Any) -> np.ndarray:
        """(2c + 1,) slices around `slice_index`, those beyond the ends repeating the first or last."""
        n_i = info.shape_irc.index
        k = _check_int("slice_index", slice_index, 0)
        if k >= n_i:
            raise ConfigError(f"slice_index {k}: CT {info.series_uid} has slices 0 … {n_i - 1}")
        c = _check_int("context_slices", context_slices, 0)
        return np.clip(np.arange(k - c, k + c + 1), 0, n_i - 1)

    def slab(self, series_uid: str, slice_index: int, context_slices: int = DEFAULT_CONTEXT_SLICES) -> np.ndarray:
        """Slices k - c … k + c of a CT: (2c + 1, R, C) int16 HU, writable.

        Slices beyond the CT's ends repeat its first or last slice (never an error).
        """
        info = self.info(series_uid)
        wanted = self._slice_indices(info, slice_index, context_slices)
        out = np.empty((len(wanted), *info.shape_irc[1:]), dtype=np.int16)
        first: dict[int, int] = {}
        for j, s in enumerate(wanted.tolist()):
            if s in first:
                out[j] = out[first[s]]
                continue
            first[s] = j
            view = out[j]
            self._read(series_uid, lambda keys, s=s: keys.hu(s), lambda r, v=view: _read_hu_into(r, v, self.verify))
        return out

    def mask(self, series_uid: str, slice_index: int) -> np.ndarray:
        """Nodule labels of slice k: (R, C) uint8, 0 background, k + 1 on nodule k (`info().nodule_*[k]`)."""
        info = self.info(series_uid)
        k = int(self._slice_indices(info, slice_index, 0)[0])
        shape_rc = (info.shape_irc.row, info.shape_irc.col)
        at = int(np.searchsorted(info.nodule_slices, k))
        if at == len(info.nodule_slices) or info.nodule_slices[at] != k:
            return np.zeros(shape_rc, dtype=np.uint8)
        return self._read(series_uid, lambda keys: keys.mask(k), lambda r: _read_mask(r, shape_rc, self.verify))

    def crop(
        self,
        series_uid: str,
        center_irc: Sequence[int],
        crop_size: int | Sequence[int] = DEFAULT_CROP_SIZE,
        context_slices: int = DEFAULT_CONTEXT_SLICES,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A training crop around `center_irc` (3 ints, inside the CT): (image, mask).

        image: (2c + 1, S_r, S_c) int16 HU, slices as in `slab`; mask: (S_r, S_c) uint8 labels of
        the middle slice. The window is moved inside the CT at its edges; where the CT is smaller
        than the crop the rest is air (-1000 HU) and background. Reads only the crop's rows.
        """
        info = self.info(series_uid)
        rows, cols = _check_crop_size(crop_size)
        i, r, c = (int(v) for v in center_irc)
        if not all(0 <= v < n for v, n in zip((i, r, c), info.shape_irc, strict=True)):
            raise ConfigError(f"center_irc {(i, r, c)} lies outside CT {series_uid} of shape {tuple(info.shape_irc)}")
        wanted = self._slice_indices(info, i, context_slices)
        shape_rc = (info.shape_irc.row, info.shape_irc.col)
        (r0, nr), (c0, nc) = _window(r, rows, shape_rc[0]), _window(c, cols, shape_rc[1])
        image = np.full((len(wanted), rows, cols), HU_MIN, dtype=np.int16)
        band = np.empty((nr, shape_rc[1]), dtype=np.int16)
        first: dict[int, int] = {}
        for j, s in enumerate(wanted.tolist()):
            if s not in first:
                first[s] = j
                self._read(series_uid, lambda keys, s=s: keys.hu(s), lambda rec: _read_hu_rows(rec, shape_rc, r0, band))
                band_cols = band[:, c0 : c0 + nc]
            else:
                band_cols = image[first[s], :nr, :nc]
            image[j, :nr, :nc] = band_cols
        mask = np.zeros((rows, cols), dtype=np.uint8)
        mask[:nr, :nc] = self.mask(series_uid, i)[r0 : r0 + nr, c0 : c0 + nc]
        return image, mask

    # --- maintenance ---------------------------------------------------------------------------

    def exists(self) -> bool:
        """True when the folder already holds a slice store (checking creates nothing)."""
        return self.store.exists()

    def close(self) -> None:
        """Close this process's SQLite connections (reopened on next use)."""
        self.store.close()

    def refresh(self) -> None:
        """Forget what this process knows about CT files and annotations (after changing them)."""
        self._state = _ProcessState(self.data_root, self.mask_version)
        clear_caches()

    def stats(self) -> dict[str, int]:
        """This process's counters: hits (records read), filled (CTs filled on a read), corrupt, written."""
        return dict(self._here().counts)

    def __len__(self) -> int:
        return len(self.store)

    def volume(self) -> int:
        """Bytes on disk (0 when there is no store yet)."""
        return self.store.volume()

    def clear(self) -> int:
        """Delete every record; returns how many."""
        removed = self.store.clear()
        self.refresh()
        return removed
