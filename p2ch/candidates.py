"""LUNA16's CSVs: reading and validating them, and the candidate list built from them.

`get_candidate_info_list()` is the book's `getCandidateInfoList()`: one `CandidateInfoTuple`
per row of `candidates.csv`, with the nodule diameter taken from `annotations.csv`.

Matching follows LUNA16's own hit rule: a positive candidate takes the diameter of the nearest
annotation of its series whose centre lies within that annotation's radius (diameter / 2).
The book matched by a per-axis box of diameter / 4 instead, which leaves 323 of the 1,351 real
positives with diameter 0; positives that match no annotation are counted and reported.

DataLoader workers should use the columnar form (`get_candidate_arrays()`): numpy arrays, not
551k Python tuples whose reference counts, touched on every access, make each forked worker
copy the whole list page by page.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from p2ch.config import resolve_data_root
from p2ch.errors import DataFormatError, DataNotFoundError
from p2ch.geometry import XyzTuple
from p2ch.luna import (
    ANNOTATION_COLUMNS,
    ANNOTATIONS_FILE,
    CANDIDATE_COLUMNS,
    EXCLUDED_FILE,
    find_candidates_file,
    is_valid_series_uid,
    no_data_message,
    series_index,
)

log = logging.getLogger(__name__)


class CandidateInfoTuple(NamedTuple):
    """One candidate location (the book's fields, in the book's order).

    is_nodule: `class` 1 in candidates.csv. has_annotation: matched an annotation (so
    `diameter_mm` is that annotation's). diameter_mm: mm, 0.0 when unmatched. center_xyz:
    (x, y, z) in mm.
    """

    is_nodule: bool
    has_annotation: bool
    diameter_mm: float
    series_uid: str
    center_xyz: XyzTuple


_COORDS = ["coordX", "coordY", "coordZ"]


def _file_line(row: int) -> int:
    # pandas row 0 is the line after the header.
    return row + 2


def read_luna_csv(path: str | os.PathLike[str], columns: tuple[str, ...]) -> pd.DataFrame:
    """Read one LUNA16 CSV and check its header, uids and coordinates.

    Accepts a UTF-8 BOM and CRLF line endings. Returns a DataFrame with exactly `columns`
    (seriesuid as str, coordinates float64) in file order. Raises DataNotFoundError for a
    missing file, DataFormatError naming the file, line and expectation for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"{path}: file not found; LUNA16's CSVs (annotations.csv, candidates.csv) belong in "
            "the data root (see --data-root / P2CH_DATA_ROOT)"
        )
    try:
        frame = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataFormatError(f"{path}: empty file; expected the header {','.join(columns)} and rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: not a readable CSV ({exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {', '.join(missing)}; expected the header "
            f"{','.join(columns)}, got {','.join(frame.columns)}"
        )
    frame = frame[list(columns)].copy()
    uids = frame["seriesuid"].str.strip()
    bad_uid = ~uids.map(is_valid_series_uid)
    if bad_uid.any():
        row = int(np.flatnonzero(bad_uid.to_numpy())[0])
        raise DataFormatError(
            f"{path}: line {_file_line(row)}: seriesuid {uids.iloc[row]!r} is not a series uid "
            "(expected digits and dots, like 1.3.6.1.4.1.14519.5.2.1.6279.6001.1051…)"
        )
    frame["seriesuid"] = uids
    for column in columns[1:]:
        raw = frame[column].str.strip()
        values = pd.to_numeric(raw, errors="coerce")
        bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataFormatError(f"{path}: line {_file_line(row)}: {column} is {raw.iloc[row]!r}; expected a number")
        frame[column] = values.astype(np.float64)
    return frame.reset_index(drop=True)


def _drop_duplicates(frame: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, int]:
    duplicated = frame.duplicated()
    count = int(duplicated.sum())
    if count:
        log.warning("%s: %d duplicate row(s) ignored", path, count)
        frame = frame[~duplicated].reset_index(drop=True)
    return frame, count


def read_annotations(path: str | os.PathLike[str]) -> pd.DataFrame:
    """`annotations.csv`: seriesuid, coordX/Y/Z (mm), diameter_mm > 0. Duplicate rows dropped."""
    frame = read_luna_csv(path, ANNOTATION_COLUMNS)
    bad = frame["diameter_mm"] <= 0
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataFormatError(
            f"{path}: line {_file_line(row)}: diameter_mm is {frame['diameter_mm'].iloc[row]}; "
            "expected a positive diameter in mm"
        )
    return _drop_duplicates(frame, Path(path))[0]


def read_excluded(path: str | os.PathLike[str]) -> pd.DataFrame:
    """`annotations_excluded.csv` (findings that count neither as hit nor as false positive).

    Same columns as annotations; LUNA16 writes diameter_mm -1 where no size is known.
    """
    frame = read_luna_csv(path, ANNOTATION_COLUMNS)
    return _drop_duplicates(frame, Path(path))[0]


def read_candidates(path: str | os.PathLike[str]) -> pd.DataFrame:
    """`candidates.csv` / `candidates_V2.csv`: seriesuid, coordX/Y/Z (mm), class 0 or 1.

    Rejects a file with no rows; drops (and logs) exact duplicate rows.
    """
    return _read_candidates(path)[0]


def _read_candidates(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, int]:
    frame = read_luna_csv(path, CANDIDATE_COLUMNS)
    if frame.empty:
        raise DataFormatError(f"{path}: no candidate rows after the header")
    bad = ~frame["class"].isin([0.0, 1.0])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataFormatError(f"{path}: line {_file_line(row)}: class is {frame['class'].iloc[row]:g}; expected 0 or 1")
    frame["class"] = frame["class"].astype(np.int8)
    return _drop_duplicates(frame, Path(path))


@dataclasses.dataclass(frozen=True)
class CandidateStats:
    """What building the candidate list found (logged once, shown by the commands)."""

    candidates: int
    positives: int
    positives_matched: int
    positives_unmatched: int
    annotations: int
    annotations_without_candidate: int
    duplicate_rows: int
    series: int
    series_not_on_disk: int
    candidates_not_on_disk: int


@dataclasses.dataclass(frozen=True, eq=False)
class CandidateArrays:
    """The candidate list in columnar form: what DataLoader workers should hold.

    Row k describes candidate k of `get_candidate_info_list()` (same order).
    series_uids: (S,) str, the distinct series; series_index: (N,) int32 into series_uids;
    center_xyz: (N, 3) float64 mm; is_nodule, has_annotation: (N,) bool;
    diameter_mm: (N,) float32 mm (0 when unmatched).
    """

    series_uids: np.ndarray
    series_index: np.ndarray
    center_xyz: np.ndarray
    is_nodule: np.ndarray
    has_annotation: np.ndarray
    diameter_mm: np.ndarray

    def __len__(self) -> int:
        return len(self.series_index)

    def series_uid(self, k: int) -> str:
        return str(self.series_uids[self.series_index[k]])

    def __getitem__(self, k: int) -> CandidateInfoTuple:
        return CandidateInfoTuple(
            bool(self.is_nodule[k]),
            bool(self.has_annotation[k]),
            float(self.diameter_mm[k]),
            self.series_uid(k),
            XyzTuple(*(float(v) for v in self.center_xyz[k])),
        )

    def to_list(self) -> list[CandidateInfoTuple]:
        uids = [str(u) for u in self.series_uids]
        return [
            CandidateInfoTuple(n, a, d, uids[s], XyzTuple(*c))
            for n, a, d, s, c in zip(
                self.is_nodule.tolist(),
                self.has_annotation.tolist(),
                self.diameter_mm.tolist(),
                self.series_index.tolist(),
                self.center_xyz.tolist(),
                strict=True,
            )
        ]

    def take(self, indices) -> CandidateArrays:
        """A new CandidateArrays of the rows `indices` (ints or a boolean mask), same series table."""
        return dataclasses.replace(
            self,
            series_index=self.series_index[indices],
            center_xyz=self.center_xyz[indices],
            is_nodule=self.is_nodule[indices],
            has_annotation=self.has_annotation[indices],
            diameter_mm=self.diameter_mm[indices],
        )

    @classmethod
    def from_list(cls, candidates: list[CandidateInfoTuple]) -> CandidateArrays:
        uids = sorted({c.series_uid for c in candidates})
        lookup = {u: i for i, u in enumerate(uids)}
        return cls(
            series_uids=np.array(uids, dtype=str),
            series_index=np.array([lookup[c.series_uid] for c in candidates], dtype=np.int32),
            center_xyz=np.array([c.center_xyz for c in candidates], dtype=np.float64).reshape(-1, 3),
            is_nodule=np.array([c.is_nodule for c in candidates], dtype=bool),
            has_annotation=np.array([c.has_annotation for c in candidates], dtype=bool),
            diameter_mm=np.array([c.diameter_mm for c in candidates], dtype=np.float32),
        )


def match_annotations(candidates: pd.DataFrame, annotations: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """LUNA16's hit rule for the positive candidates.

    For each row of `candidates` with class 1, find the annotations of the same series whose
    centre lies within their radius (distance < diameter / 2, strictly, as LUNA16's evaluation
    script and `p2ch.metrics` count a hit) of the candidate, and take the
    nearest. Returns `(diameter_mm, matched)`: (N,) float32 mm (0 if none) and (N,) bool.
    Negatives are never matched.
    """
    diameter = np.zeros(len(candidates), dtype=np.float32)
    matched = np.zeros(len(candidates), dtype=bool)
    positives = candidates.index[candidates["class"].to_numpy() == 1]
    if len(positives) == 0 or annotations.empty:
        return diameter, matched
    by_series = {uid: group for uid, group in annotations.groupby("seriesuid", sort=False)}
    pos = candidates.loc[positives]
    for uid, group in pos.groupby("seriesuid", sort=False):
        ann = by_series.get(uid)
        if ann is None:
            continue
        ann_xyz = ann[_COORDS].to_numpy()
        ann_radius = ann["diameter_mm"].to_numpy() / 2.0
        cand_xyz = group[_COORDS].to_numpy()
        dist = np.linalg.norm(cand_xyz[:, None, :] - ann_xyz[None, :, :], axis=2)
        dist = np.where(dist < ann_radius[None, :], dist, np.inf)
        nearest = np.argmin(dist, axis=1)
        hit = np.isfinite(dist[np.arange(len(group)), nearest])
        rows = group.index.to_numpy()
        diameter[rows[hit]] = ann["diameter_mm"].to_numpy()[nearest[hit]]
        matched[rows[hit]] = True
    return diameter, matched


def _count_annotations_without_candidate(candidates: pd.DataFrame, annotations: pd.DataFrame) -> int:
    positives = candidates[candidates["class"] == 1]
    by_series = {uid: g[_COORDS].to_numpy() for uid, g in positives.groupby("seriesuid")}
    missing = 0
    for uid, group in annotations.groupby("seriesuid"):
        cand_xyz = by_series.get(uid)
        if cand_xyz is None:
            missing += len(group)
            continue
        dist = np.linalg.norm(group[_COORDS].to_numpy()[:, None, :] - cand_xyz[None], axis=2)
        missing += int((dist.min(axis=1) > group["diameter_mm"].to_numpy() / 2.0).sum())
    return missing


def build_candidate_arrays(
    candidates: pd.DataFrame,
    annotations: pd.DataFrame,
    on_disk: set[str] | None = None,
    duplicate_rows: int = 0,
) -> tuple[CandidateArrays, CandidateStats]:
    """Join candidates with annotations and sort; keep only series in `on_disk` when given.

    Order: nodules first, annotated first, largest diameter first, then series_uid and centre
    descending (the book's `sort(reverse=True)` on the tuples, so it is deterministic).
    """
    diameter, matched = match_annotations(candidates, annotations)
    is_nodule = candidates["class"].to_numpy() == 1
    uids = candidates["seriesuid"].to_numpy().astype(str)
    xyz = candidates[_COORDS].to_numpy(dtype=np.float64)
    all_series = set(uids.tolist())
    keep = np.ones(len(candidates), dtype=bool)
    if on_disk is not None:
        keep = np.isin(uids, np.array(sorted(on_disk), dtype=str))
    stats = CandidateStats(
        candidates=int(keep.sum()),
        positives=int(is_nodule[keep].sum()),
        positives_matched=int((matched & keep).sum()),
        positives_unmatched=int((is_nodule & ~matched & keep).sum()),
        annotations=len(annotations),
        annotations_without_candidate=_count_annotations_without_candidate(candidates, annotations),
        duplicate_rows=duplicate_rows,
        series=len(set(uids[keep].tolist())),
        series_not_on_disk=len(all_series - set(uids[keep].tolist())),
        candidates_not_on_disk=int((~keep).sum()),
    )
    is_nodule, matched, diameter, uids, xyz = (is_nodule[keep], matched[keep], diameter[keep], uids[keep], xyz[keep])
    series_uids, series_index = np.unique(uids, return_inverse=True)
    # np.lexsort sorts by the last key first; all keys ascending, then reversed.
    order = np.lexsort((xyz[:, 2], xyz[:, 1], xyz[:, 0], series_index, diameter, matched, is_nodule))[::-1]
    arrays = CandidateArrays(
        series_uids=series_uids.astype(str),
        series_index=series_index.astype(np.int32)[order],
        center_xyz=np.ascontiguousarray(xyz[order]),
        is_nodule=is_nodule[order],
        has_annotation=matched[order],
        diameter_mm=diameter[order],
    )
    return arrays, stats


@functools.lru_cache(maxsize=4)
def _load(root: str, require_on_disk: bool) -> tuple[CandidateArrays, CandidateStats]:
    data_root = Path(root)
    on_disk = None
    if require_on_disk:
        on_disk = set(series_index(data_root))
        if not on_disk:
            raise DataNotFoundError(no_data_message(data_root))
    candidates_path = find_candidates_file(data_root)
    candidates, duplicates = _read_candidates(candidates_path)
    annotations = read_annotations(data_root / ANNOTATIONS_FILE)
    arrays, stats = build_candidate_arrays(candidates, annotations, on_disk, duplicates)
    if require_on_disk and stats.candidates == 0:
        raise DataNotFoundError(
            f"none of the {len(on_disk)} series under {data_root}/subset*/ appears in "
            f"{candidates_path.name}; do the CSVs belong to these CTs?"
        )
    log.info(
        "candidates from %s: %d (%d positive: %d matched to an annotation, %d matched none); "
        "%d series; skipped %d candidates of %d series not on disk",
        candidates_path,
        stats.candidates,
        stats.positives,
        stats.positives_matched,
        stats.positives_unmatched,
        stats.series,
        stats.candidates_not_on_disk,
        stats.series_not_on_disk,
    )
    return arrays, stats


def get_candidate_arrays(
    data_root: str | os.PathLike[str] | None = None, require_on_disk: bool = True
) -> CandidateArrays:
    """Columnar candidate list (see CandidateArrays), cached per data root in this process."""
    root = resolve_data_root(data_root)
    return _load(str(root.resolve()), require_on_disk)[0]


def get_candidate_stats(
    data_root: str | os.PathLike[str] | None = None, require_on_disk: bool = True
) -> CandidateStats:
    """Counts from building the candidate list (positives matched/unmatched, series skipped…)."""
    root = resolve_data_root(data_root)
    return _load(str(root.resolve()), require_on_disk)[1]


@functools.lru_cache(maxsize=4)
def _as_list(root: str, require_on_disk: bool) -> tuple[CandidateInfoTuple, ...]:
    return tuple(_load(root, require_on_disk)[0].to_list())


def get_candidate_info_list(
    data_root: str | os.PathLike[str] | None = None, require_on_disk: bool = True
) -> list[CandidateInfoTuple]:
    """The book's getCandidateInfoList: every candidate, largest nodules first.

    `require_on_disk` keeps only series whose `.mhd` is under `<root>/subset*/` (many users
    download only some subsets). Cached per data root; returns a new list each call.
    """
    root = resolve_data_root(data_root)
    return list(_as_list(str(root.resolve()), require_on_disk))


def clear_candidate_cache() -> None:
    """Forget cached candidate lists (after the CSVs changed)."""
    _load.cache_clear()
    _as_list.cache_clear()


def group_rows(keys: np.ndarray) -> list[np.ndarray]:
    """Positions of equal keys, one array per distinct key (in key order), positions ascending.

    keys: (N,) int (e.g. `CandidateArrays.series_index`) or str (series uids). Used wherever work
    goes CT by CT (one CT load per group).
    """
    keys = np.asarray(keys)
    if len(keys) == 0:
        return []
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    return np.split(order, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1)


def submission_frame(candidates: CandidateArrays, indices: np.ndarray, probability: np.ndarray) -> pd.DataFrame:
    """LUNA16 submission rows (seriesuid, coordX, coordY, coordZ, probability) for candidates[indices].

    indices: (n,) int rows of `candidates`; probability: (n,) float P(nodule), same order.
    """
    xyz = candidates.center_xyz[indices]
    return pd.DataFrame(
        {
            "seriesuid": candidates.series_uids[candidates.series_index[indices]],
            "coordX": xyz[:, 0],
            "coordY": xyz[:, 1],
            "coordZ": xyz[:, 2],
            "probability": np.asarray(probability, dtype=np.float64),
        }
    )


def read_reference(data_root: Path, series_uids) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The reference for FROC/CPM over `series_uids`: their rows of annotations.csv and of
    annotations_excluded.csv (None when the data root has no such file), index reset.
    """
    wanted = set(np.asarray(series_uids, dtype=str).tolist())
    annotations = read_annotations(data_root / ANNOTATIONS_FILE)
    annotations = annotations[annotations["seriesuid"].isin(wanted)].reset_index(drop=True)
    excluded_path = data_root / EXCLUDED_FILE
    if not excluded_path.is_file():
        return annotations, None
    excluded = read_excluded(excluded_path)
    return annotations, excluded[excluded["seriesuid"].isin(wanted)].reset_index(drop=True)
