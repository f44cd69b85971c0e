"""LUNA16's CSVs: reading and validating them, and the candidate lists built from them.

`get_candidate_info_list()` is the book's `getCandidateInfoList()`: one `CandidateInfoTuple`
per row of `candidates.csv`, with the nodule diameter taken from `annotations.csv` and, when the
data root holds the book's `annotations_with_malignancy.csv`, the nodule's malignancy (`is_mal`).

Matching follows LUNA16's own hit rule: a positive candidate takes the diameter of the nearest
annotation of its series whose centre lies within that annotation's radius (diameter / 2).
The book matched by a per-axis box of diameter / 4 instead, which leaves 323 of the 1,351 real
positives with diameter 0; positives that match no annotation are counted and reported.

Malignancy (the book's chapter 14)
----------------------------------
`annotations_with_malignancy.csv` comes with the book's code (data/part2/luna/ in its
repository), not with LUNA16: the rows of annotations.csv with LIDC's per-reader malignancy
ratings (`mal_details`, integers 1..5), `mal_bool` and the nodule's bounding box. In the real
file mal_bool is True exactly when at least two readers rated 4 or 5; `read_malignancy` logs a
count of rows where that does not hold but takes mal_bool as given. Rules:

- Each row must match an annotation of its series whose centre is within
  `MALIGNANCY_TOLERANCE_MM` (1 mm; the real file repeats annotations.csv's coordinates up to
  ~1e-8 mm of float noise), else DataFormatError naming the line, series and nearest distance.
- Two rows matching one annotation: a warning naming both lines; the first is kept.
- Annotations without a row (4 of the real 1,186) are counted and logged, never an error: they
  are left out of the malignancy task and the candidates matched to them get is_mal False (as
  every candidate does when the file is absent).

`get_candidate_arrays()` sets `is_mal` of a positive matched to a malignant annotation;
`get_malignancy_arrays()` is the malignancy task's list: one row per malignancy row (the
annotated nodule at the row's centre, is_nodule and has_annotation True, is_mal = mal_bool).

DataLoader workers should use the columnar form (`get_candidate_arrays()`): numpy arrays, not
551k Python tuples whose reference counts, touched on every access, make each forked worker
copy the whole list page by page.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from p2ch.config import resolve_data_root
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import XyzTuple
from p2ch.luna import (
    ANNOTATION_COLUMNS,
    ANNOTATIONS_FILE,
    CANDIDATE_COLUMNS,
    EXCLUDED_FILE,
    LOCATION_COLUMNS,
    MALIGNANCY_COLUMNS,
    MALIGNANCY_FILE,
    cut_text,
    find_candidates_file,
    is_valid_series_uid,
    no_data_message,
    quoted,
    series_index,
)

log = logging.getLogger(__name__)


class CandidateInfoTuple(NamedTuple):
    """One candidate location (the book's chapter-14 fields, in the book's order).

    is_nodule: `class` 1 in candidates.csv. has_annotation: matched an annotation (so
    `diameter_mm` is that annotation's). is_mal: that annotation is malignant (mal_bool of its
    row in annotations_with_malignancy.csv; False when unmatched, when the annotation has no
    row or without the file). diameter_mm: mm, 0.0 when unmatched. center_xyz: (x, y, z) in mm.
    """

    is_nodule: bool
    has_annotation: bool
    is_mal: bool
    diameter_mm: float
    series_uid: str
    center_xyz: XyzTuple


_COORDS = ["coordX", "coordY", "coordZ"]
# A malignancy row belongs to the annotation of its series whose centre is this close (inclusive):
# the book's file repeats annotations.csv's coordinates up to ~1e-8 mm of float noise.
MALIGNANCY_TOLERANCE_MM = 1.0
# mal_details: a bracketed, comma-separated list of integers ("[4, 2, 4, 2]").
_MAL_DETAILS_RE = re.compile(r"^\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]$")
_MAL_RATINGS = range(1, 6)  # LIDC's malignancy scale
_TRUE_WORDS, _FALSE_WORDS = frozenset({"true", "1"}), frozenset({"false", "0"})


def _file_line(row: int) -> int:
    # pandas row 0 is the line after the header.
    return row + 2


def read_luna_csv(
    path: str | os.PathLike[str], columns: tuple[str, ...], text_columns: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Read one LUNA16 CSV and check its header, uids and coordinates.

    Accepts a UTF-8 BOM and CRLF line endings. Returns a DataFrame with exactly `columns`
    (seriesuid as str, the others float64) in file order, index 0..n-1 (row k is line k + 2).
    Columns named in `text_columns` are kept as stripped str for the caller to parse (e.g. the
    malignancy file's mal_bool and mal_details). Raises DataNotFoundError for a missing file,
    DataFormatError naming the file, line and expectation for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"{path}: file not found; LUNA16's CSVs (annotations.csv, candidates.csv) belong in "
            "the data root (see --data-root / P2CH_DATA_ROOT)"
        )
    frame = _read_fields(path, columns)
    uids = frame["seriesuid"].str.strip()
    bad_uid = ~uids.map(is_valid_series_uid)
    if bad_uid.any():
        row = int(np.flatnonzero(bad_uid.to_numpy())[0])
        raise DataFormatError(
            f"{path}: line {_file_line(row)}: seriesuid {quoted(uids.iloc[row])} is not a series uid "
            "(expected digits and dots, like 1.3.6.1.4.1.14519.5.2.1.6279.6001.1051…)"
        )
    frame["seriesuid"] = uids
    for column in columns[1:]:
        raw = frame[column].str.strip()
        if column in text_columns:
            frame[column] = raw
            continue
        values = pd.to_numeric(raw, errors="coerce")
        bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataFormatError(
                f"{path}: line {_file_line(row)}: {column} is {quoted(raw.iloc[row])}; expected a number"
            )
        frame[column] = values.astype(np.float64)
    return frame.reset_index(drop=True)


_FIELD_COUNT_RE = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def _read_fields(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """The CSV's `columns` as str, index 0..n-1 (row k is line k + 2).

    The header is read as a row of its own (header=None): pandas would otherwise take the first
    field as the index when every row has one field more than the header (a trailing comma), and
    blame the next field for the shift. A row with more fields than the header is an error here.
    """
    try:
        frame = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False, header=None)
    except pd.errors.EmptyDataError:
        raise DataFormatError(f"{path}: empty file; expected the header {','.join(columns)} and rows") from None
    except pd.errors.ParserError as exc:
        counts = _FIELD_COUNT_RE.search(str(exc))
        if counts is None:
            raise DataFormatError(f"{path}: not a readable CSV ({cut_text(' '.join(str(exc).split()))})") from None
        _check_header(path, _header_names(path), columns)
        header_fields, line, fields = counts.groups()
        raise DataFormatError(
            f"{path}: line {line} has {fields} fields, the header has {header_fields} (a trailing comma?); "
            f"expected {','.join(columns)}"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            f"{path}: not a readable CSV, not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    names = [str(c).strip() for c in frame.iloc[0]]
    _check_header(path, names, columns)
    return frame.iloc[1:].set_axis(names, axis=1).reset_index(drop=True)[list(columns)].copy()


def _header_names(path: Path) -> list[str]:
    return [str(c).strip() for c in pd.read_csv(path, encoding="utf-8-sig", dtype=str, nrows=0).columns]


def _check_header(path: Path, names: list[str], columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {', '.join(missing)}; expected the header "
            f"{','.join(columns)}, got {cut_text(','.join(names))}"
        )
    repeated = [c for c in columns if names.count(c) > 1]
    if repeated:
        raise DataFormatError(f"{path}: column {repeated[0]} appears {names.count(repeated[0])} times in the header")


def _drop_duplicates(frame: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, int]:
    duplicated = frame.duplicated()
    count = int(duplicated.sum())
    if count:
        log.warning("%s: %d duplicate row(s) ignored", path, count)
        frame = frame[~duplicated].reset_index(drop=True)
    return frame, count


def _check_diameters(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    bad = frame["diameter_mm"] <= 0
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataFormatError(
            f"{path}: line {_file_line(row)}: diameter_mm is {frame['diameter_mm'].iloc[row]}; "
            "expected a positive diameter in mm"
        )


def read_annotations(path: str | os.PathLike[str]) -> pd.DataFrame:
    """`annotations.csv`: seriesuid, coordX/Y/Z (mm), diameter_mm > 0. Duplicate rows dropped."""
    frame = read_luna_csv(path, ANNOTATION_COLUMNS)
    _check_diameters(frame, path)
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
    frame = _drop_class_conflicts(frame, Path(path))
    return _drop_duplicates(frame, Path(path))


def _drop_class_conflicts(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Drop class-0 rows at a location a class-1 row also lists (same series, centre equal to the µm).

    A nodule is a nodule: class 1 wins. One warning names the file lines of the first few pairs.
    `frame` as from read_luna_csv (row k is line k + 2); the result is indexed 0..m-1.
    """
    located = pd.DataFrame(
        np.rint(frame[_COORDS].to_numpy(dtype=np.float64) * 1000.0).astype(np.int64), columns=_COORDS
    )  # µm
    located["seriesuid"] = frame["seriesuid"].to_numpy()
    located["row"] = np.arange(len(frame))
    is_nodule = frame["class"].to_numpy() == 1
    keys = ["seriesuid", *_COORDS]
    positives = located[is_nodule].drop_duplicates(keys)  # the first class-1 line of each location
    pairs = located[~is_nodule].merge(positives, on=keys, suffixes=("_neg", "_pos"))
    if pairs.empty:
        return frame
    pairs = pairs.sort_values("row_neg")
    shown = ", ".join(
        f"lines {_file_line(pos)} (class 1) and {_file_line(neg)} (class 0)"
        for pos, neg in zip(pairs["row_pos"][:3].tolist(), pairs["row_neg"][:3].tolist(), strict=True)
    )
    more = f" and {len(pairs) - 3} more" if len(pairs) > 3 else ""
    log.warning(
        "%s: %d class-0 row(s) list a location (same series, same centre to the µm) that a class-1 row also "
        "lists: %s%s; class 1 wins (a nodule is a nodule), the class-0 rows are dropped",
        path,
        len(pairs),
        shown,
        more,
    )
    drop = np.zeros(len(frame), dtype=bool)
    drop[pairs["row_neg"].to_numpy()] = True
    return frame[~drop].reset_index(drop=True)


# --- annotations_with_malignancy.csv (the book's chapter 14) -------------------------------------


def malignancy_not_found_message(path: Path) -> str:
    return (
        f"{path}: file not found; {MALIGNANCY_FILE} comes with the book's code "
        f"(data/part2/luna/{MALIGNANCY_FILE} in the book's repository), not with LUNA16: copy it "
        f"into the data root next to annotations.csv, or make a synthetic set that has one with "
        "`python -m p2ch.synth`"
    )


def read_malignancy(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The book's `annotations_with_malignancy.csv`, validated (see the module docstring).

    Returns one row per line, in file order, index 0..n-1 (row k is line k + 2; rows that repeat
    an annotation are kept here, `match_malignancy` resolves them): seriesuid str; coordX/Y/Z,
    diameter_mm (> 0) and bboxLow/HighX/Y/Z float64 mm; mal_bool bool (True/False or 1/0 in
    the file, any case); mal_details tuple of int, one LIDC rating 1..5 per reader;
    len_mal_details int64, equal to len(mal_details). Accepts a UTF-8 BOM and CRLF. Raises
    DataNotFoundError for a missing file, DataFormatError naming file, line and field otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(malignancy_not_found_message(path))
    frame = read_luna_csv(path, MALIGNANCY_COLUMNS, text_columns=("mal_bool", "mal_details"))
    _check_diameters(frame, path)
    frame["mal_bool"] = _parse_mal_bool(frame["mal_bool"], path)
    frame["mal_details"] = _parse_mal_details(frame["mal_details"], path)
    frame["len_mal_details"] = _check_len_mal_details(frame, path)
    _count_mal_bool_disagreements(frame, path)
    return frame


def _parse_mal_bool(raw: pd.Series, path: Path) -> pd.Series:
    words = raw.str.lower()
    is_true = words.isin(_TRUE_WORDS)
    bad = ~(is_true | words.isin(_FALSE_WORDS))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataFormatError(
            f"{path}: line {_file_line(row)}: mal_bool is {quoted(raw.iloc[row])}; expected True or False (or 1 or 0)"
        )
    return is_true.astype(bool)


def _parse_mal_details(raw: pd.Series, path: Path) -> pd.Series:
    ratings_per_row = []
    for row, text in enumerate(raw.tolist()):
        match = _MAL_DETAILS_RE.match(text)
        ratings = tuple(int(v) for v in match.group(1).split(",")) if match else ()
        if not ratings or any(r not in _MAL_RATINGS for r in ratings):
            raise DataFormatError(
                f"{path}: line {_file_line(row)}: mal_details is {quoted(text)}; expected a list of the readers' "
                'LIDC malignancy ratings, integers 1 to 5, like "[4, 2, 4, 2]"'
            )
        ratings_per_row.append(ratings)
    return pd.Series(ratings_per_row, index=raw.index, dtype=object)


def _check_len_mal_details(frame: pd.DataFrame, path: Path) -> pd.Series:
    values = frame["len_mal_details"]
    lengths = frame["mal_details"].map(len).to_numpy(dtype=np.float64)
    bad = values.to_numpy() != lengths
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(
            f"{path}: line {_file_line(row)}: len_mal_details is {values.iloc[row]:g}; expected "
            f"{int(lengths[row])}, the number of ratings in mal_details {list(frame['mal_details'].iloc[row])}"
        )
    return values.astype(np.int64)


def _count_mal_bool_disagreements(frame: pd.DataFrame, path: Path) -> int:
    """Rows whose mal_bool is not "at least two readers rated 4 or 5" (the rule of the book's file); logged."""
    two_high = np.array([sum(r >= 4 for r in ratings) >= 2 for ratings in frame["mal_details"]], dtype=bool)
    count = int((two_high != frame["mal_bool"].to_numpy(dtype=bool)).sum())
    if count:
        log.warning(
            "%s: %d row(s) where mal_bool is not 'at least two readers rated 4 or 5' (the book's file's rule); "
            "mal_bool is used as given",
            path,
            count,
        )
    return count


def match_malignancy(
    malignancy: pd.DataFrame, annotations: pd.DataFrame, path: str | os.PathLike[str] = MALIGNANCY_FILE
) -> np.ndarray:
    """The annotation of each malignancy row: (R,) int64 positions in `annotations`, -1 for a repeat.

    A row matches the nearest annotation of its series whose centre is within
    MALIGNANCY_TOLERANCE_MM of the row's (inclusive). A row that matches none raises
    DataFormatError naming `path`, the line, the series and the nearest annotation's distance.
    When several rows match one annotation the first (in file order) keeps it; the others get -1
    and a warning naming both lines. `malignancy` as from `read_malignancy` (row k = line k + 2).
    """
    mal_uids = malignancy["seriesuid"].to_numpy().astype(str)
    mal_xyz = malignancy[_COORDS].to_numpy(dtype=np.float64)
    ann_uids = annotations["seriesuid"].to_numpy().astype(str)
    ann_xyz = annotations[_COORDS].to_numpy(dtype=np.float64)
    ann_groups = {ann_uids[rows[0]]: rows for rows in group_rows(ann_uids)}
    match = np.full(len(malignancy), -1, dtype=np.int64)
    nearest_mm = np.full(len(malignancy), np.inf)
    for rows in group_rows(mal_uids):
        ann_rows = ann_groups.get(mal_uids[rows[0]])
        if ann_rows is None:
            continue
        dist = np.linalg.norm(mal_xyz[rows, None, :] - ann_xyz[None, ann_rows, :], axis=2)
        nearest = np.argmin(dist, axis=1)
        nearest_mm[rows] = dist[np.arange(len(rows)), nearest]
        match[rows] = np.where(nearest_mm[rows] <= MALIGNANCY_TOLERANCE_MM, ann_rows[nearest], -1)
    unmatched = np.flatnonzero(match < 0)
    if len(unmatched):
        row = int(unmatched[0])
        nearest_text = (
            f"the nearest is {nearest_mm[row]:.3f} mm away"
            if np.isfinite(nearest_mm[row])
            else "that series has no annotation"
        )
        raise DataFormatError(
            f"{path}: line {_file_line(row)}: no annotation of series {mal_uids[row]} in {ANNOTATIONS_FILE} lies "
            f"within {MALIGNANCY_TOLERANCE_MM:g} mm of this row's centre ({nearest_text}; {len(unmatched)} row(s) "
            f"match none); does {Path(path).name} belong to this {ANNOTATIONS_FILE}?"
        )
    _drop_repeated_matches(match, mal_uids, path)
    return match


def _drop_repeated_matches(match: np.ndarray, uids: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Set `match` to -1 (in place) on rows whose annotation an earlier row matched; warn for each."""
    first_row: dict[int, int] = {}
    for row, annotation in enumerate(match.tolist()):
        if annotation < 0:
            continue
        if annotation not in first_row:
            first_row[annotation] = row
            continue
        first = first_row[annotation]
        log.warning(
            "%s: lines %d and %d match the same annotation of series %s; keeping line %d",
            path,
            _file_line(first),
            _file_line(row),
            uids[row],
            _file_line(first),
        )
        match[row] = -1


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
    center_xyz: (N, 3) float64 mm; is_nodule, has_annotation, is_mal: (N,) bool (is_mal: see
    CandidateInfoTuple); diameter_mm: (N,) float32 mm (0 when unmatched). The malignancy task's
    rows (`get_malignancy_arrays()`) come in the same form. source_file: the CSV the rows were read
    from (None when built in memory), so that an error about a row can name its file and line
    (`row_location`).
    """

    series_uids: np.ndarray
    series_index: np.ndarray
    center_xyz: np.ndarray
    is_nodule: np.ndarray
    has_annotation: np.ndarray
    is_mal: np.ndarray
    diameter_mm: np.ndarray
    source_file: Path | None = None

    def __len__(self) -> int:
        return len(self.series_index)

    def series_uid(self, k: int) -> str:
        return str(self.series_uids[self.series_index[k]])

    def __getitem__(self, k: int) -> CandidateInfoTuple:
        return CandidateInfoTuple(
            bool(self.is_nodule[k]),
            bool(self.has_annotation[k]),
            bool(self.is_mal[k]),
            float(self.diameter_mm[k]),
            self.series_uid(k),
            XyzTuple(*(float(v) for v in self.center_xyz[k])),
        )

    def to_list(self) -> list[CandidateInfoTuple]:
        uids = [str(u) for u in self.series_uids]
        return [
            CandidateInfoTuple(n, a, m, d, uids[s], XyzTuple(*c))
            for n, a, m, d, s, c in zip(
                self.is_nodule.tolist(),
                self.has_annotation.tolist(),
                self.is_mal.tolist(),
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
            is_mal=self.is_mal[indices],
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
            is_mal=np.array([c.is_mal for c in candidates], dtype=bool),
            diameter_mm=np.array([c.diameter_mm for c in candidates], dtype=np.float32),
        )


def match_annotations(candidates: pd.DataFrame, annotations: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LUNA16's hit rule for the positive candidates.

    For each row of `candidates` with class 1, find the annotations of the same series whose
    centre lies within their radius (distance < diameter / 2, strictly, as LUNA16's evaluation
    script and `p2ch.metrics` count a hit) of the candidate, and take the nearest. Returns
    `(diameter_mm, matched, annotation_row)`: (N,) float32 mm (0 if none), (N,) bool and (N,)
    int64, the position in `annotations` of the matched annotation (-1 if none). Negatives are
    never matched.
    """
    diameter = np.zeros(len(candidates), dtype=np.float32)
    matched = np.zeros(len(candidates), dtype=bool)
    annotation_row = np.full(len(candidates), -1, dtype=np.int64)
    positives = candidates.index[candidates["class"].to_numpy() == 1]
    if len(positives) == 0 or annotations.empty:
        return diameter, matched, annotation_row
    annotations = annotations.reset_index(drop=True)  # index labels = positions
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
        annotation_row[rows[hit]] = ann.index.to_numpy()[nearest[hit]]
    return diameter, matched, annotation_row


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
    annotation_is_mal: np.ndarray | None = None,
) -> tuple[CandidateArrays, CandidateStats]:
    """Join candidates with annotations and sort; keep only series in `on_disk` when given.

    annotation_is_mal: (A,) bool per row of `annotations`, malignant (`_MalignancyTable`); a
    matched positive takes its annotation's. None: is_mal is False everywhere.
    Order: nodules first, annotated first, largest diameter first, then series_uid and centre
    descending (the book's `sort(reverse=True)` on the tuples, so it is deterministic). is_mal is
    not a sort key (unlike the book's chapter-14 tuple sort), so the order, and with it every
    split and saved run, is the same with or without the malignancy file.
    """
    diameter, matched, annotation_row = match_annotations(candidates, annotations)
    is_mal = np.zeros(len(candidates), dtype=bool)
    if annotation_is_mal is not None:
        is_mal[matched] = np.asarray(annotation_is_mal, dtype=bool)[annotation_row[matched]]
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
    is_nodule, matched, is_mal, diameter = is_nodule[keep], matched[keep], is_mal[keep], diameter[keep]
    uids, xyz = uids[keep], xyz[keep]
    series_uids, series_index = np.unique(uids, return_inverse=True)
    # np.lexsort sorts by the last key first; all keys ascending, then reversed.
    order = np.lexsort((xyz[:, 2], xyz[:, 1], xyz[:, 0], series_index, diameter, matched, is_nodule))[::-1]
    arrays = CandidateArrays(
        series_uids=series_uids.astype(str),
        series_index=series_index.astype(np.int32)[order],
        center_xyz=np.ascontiguousarray(xyz[order]),
        is_nodule=is_nodule[order],
        has_annotation=matched[order],
        is_mal=is_mal[order],
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
    annotation_is_mal = None
    if (data_root / MALIGNANCY_FILE).is_file():
        annotation_is_mal = _malignancy_table(root).annotation_is_mal
    arrays, stats = build_candidate_arrays(candidates, annotations, on_disk, duplicates, annotation_is_mal)
    arrays = dataclasses.replace(arrays, source_file=candidates_path)
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
    if annotation_is_mal is not None:
        log.info("is_mal from %s: %d positives matched a malignant annotation", MALIGNANCY_FILE, arrays.is_mal.sum())
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


# --- the malignancy task's rows ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _MalignancyTable:
    """annotations_with_malignancy.csv of one data root, matched to its annotations.csv.

    malignancy: read_malignancy's frame (R rows). annotation_row: (R,) int64, match_malignancy's.
    annotation_is_mal: (A,) bool per row of read_annotations(annotations.csv), its row's mal_bool
    (False without a row).
    """

    path: Path
    malignancy: pd.DataFrame
    annotation_row: np.ndarray
    annotation_is_mal: np.ndarray


@functools.lru_cache(maxsize=4)
def _malignancy_table(root: str) -> _MalignancyTable:
    data_root = Path(root)
    path = data_root / MALIGNANCY_FILE
    malignancy = read_malignancy(path)
    annotations = read_annotations(data_root / ANNOTATIONS_FILE)
    annotation_row = match_malignancy(malignancy, annotations, path)
    kept = annotation_row >= 0
    annotation_is_mal = np.zeros(len(annotations), dtype=bool)
    annotation_is_mal[annotation_row[kept]] = malignancy["mal_bool"].to_numpy(dtype=bool)[kept]
    without = len(annotations) - int(kept.sum())
    if without:
        log.info(
            "%s: %d of %d annotations have no malignancy row; they are left out of the malignancy task "
            "and their candidates get is_mal False",
            path,
            without,
            len(annotations),
        )
    return _MalignancyTable(path, malignancy, annotation_row, annotation_is_mal)


def read_rated_annotations(data_root: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """annotations.csv (as `read_annotations`) with a column `is_mal`: True / False from
    annotations_with_malignancy.csv, None for an annotation no row rates or when the file is absent."""
    root = resolve_data_root(data_root).resolve()
    annotations = read_annotations(root / ANNOTATIONS_FILE)
    is_mal = np.full(len(annotations), None, dtype=object)
    if (root / MALIGNANCY_FILE).is_file():
        table = _malignancy_table(str(root))
        kept = table.annotation_row >= 0
        values = table.malignancy["mal_bool"].to_numpy(dtype=bool)[kept]
        for row, value in zip(table.annotation_row[kept].tolist(), values.tolist(), strict=True):
            is_mal[row] = bool(value)
    return annotations.assign(is_mal=is_mal)


@dataclasses.dataclass(frozen=True)
class MalignancyStats:
    """What building the malignancy task's rows found (logged once).

    rows: lines of the file; matched: rows kept, each matched to a distinct annotation;
    duplicates: rows dropped because an earlier row matched the same annotation; annotations:
    rows of annotations.csv; annotations_without_row: of those, matched by no row; malignant,
    benign, series: of the rows returned (series on disk); series_not_on_disk: series of
    matched rows whose CT is not under subset*/.
    """

    rows: int
    matched: int
    annotations: int
    annotations_without_row: int
    malignant: int
    benign: int
    series: int
    series_not_on_disk: int
    duplicates: int


def _malignancy_arrays(table: _MalignancyTable, on_disk: set[str] | None) -> tuple[CandidateArrays, MalignancyStats]:
    kept = table.annotation_row >= 0
    frame = table.malignancy[kept]
    uids = frame["seriesuid"].to_numpy().astype(str)
    on = np.ones(len(frame), dtype=bool) if on_disk is None else np.isin(uids, np.array(sorted(on_disk), dtype=str))
    xyz = frame[_COORDS].to_numpy(dtype=np.float64)[on]
    diameter = frame["diameter_mm"].to_numpy(dtype=np.float32)[on]
    is_mal = frame["mal_bool"].to_numpy(dtype=bool)[on]
    series_uids, series_index = np.unique(uids[on], return_inverse=True)
    # Malignant first, largest first, then series and centre descending (as build_candidate_arrays).
    order = np.lexsort((xyz[:, 2], xyz[:, 1], xyz[:, 0], series_index, diameter, is_mal))[::-1]
    arrays = CandidateArrays(
        series_uids=series_uids.astype(str),
        series_index=series_index.astype(np.int32)[order],
        center_xyz=np.ascontiguousarray(xyz[order]),
        is_nodule=np.ones(len(order), dtype=bool),
        has_annotation=np.ones(len(order), dtype=bool),
        is_mal=is_mal[order],
        diameter_mm=diameter[order],
    )
    stats = MalignancyStats(
        rows=len(table.malignancy),
        matched=int(kept.sum()),
        annotations=len(table.annotation_is_mal),
        annotations_without_row=len(table.annotation_is_mal) - int(kept.sum()),
        malignant=int(is_mal.sum()),
        benign=int((~is_mal).sum()),
        series=len(series_uids),
        series_not_on_disk=len(set(uids.tolist()) - set(series_uids.tolist())),
        duplicates=int((~kept).sum()),
    )
    return arrays, stats


@functools.lru_cache(maxsize=4)
def _load_malignancy(root: str, require_on_disk: bool) -> tuple[CandidateArrays, MalignancyStats]:
    data_root = Path(root)
    on_disk = None
    if require_on_disk:
        on_disk = set(series_index(data_root))
        if not on_disk:
            raise DataNotFoundError(no_data_message(data_root))
    table = _malignancy_table(root)
    arrays, stats = _malignancy_arrays(table, on_disk)
    arrays = dataclasses.replace(arrays, source_file=table.path)
    if require_on_disk and len(arrays) == 0:
        raise DataNotFoundError(
            f"none of the {stats.matched} rows of {table.path} is of one of the {len(on_disk)} series under "
            f"{data_root}/subset*/; does the file belong to these CTs?"
        )
    log.info(
        "malignancy rows from %s: %d (%d malignant, %d benign) of %d series; %d of %d annotations have no row; "
        "%d repeated rows ignored; skipped the rows of %d series not on disk",
        table.path,
        len(arrays),
        stats.malignant,
        stats.benign,
        stats.series,
        stats.annotations_without_row,
        stats.annotations,
        stats.duplicates,
        stats.series_not_on_disk,
    )
    return arrays, stats


def get_malignancy_arrays(
    data_root: str | os.PathLike[str] | None = None, require_on_disk: bool = True
) -> CandidateArrays:
    """The malignancy task's rows (the book's chapter 14), cached per data root in this process.

    One row per row of annotations_with_malignancy.csv that matched an annotation (repeats
    dropped; see the module docstring), of series on disk with `require_on_disk`: is_nodule and
    has_annotation True, is_mal = mal_bool, diameter_mm and center_xyz the row's. Order:
    malignant first, largest first, then series_uid and centre descending. Raises
    DataNotFoundError when the file is missing or (with require_on_disk) no row is on disk.
    """
    root = resolve_data_root(data_root)
    return _load_malignancy(str(root.resolve()), require_on_disk)[0]


def get_task_arrays(data_root: str | os.PathLike[str] | None, task: str) -> CandidateArrays:
    """The rows a classifier task trains on and is scored on: every candidate of candidates.csv
    ("nodule") or the annotated nodules of annotations_with_malignancy.csv ("malignancy")."""
    if task == "malignancy":
        return get_malignancy_arrays(data_root)
    if task != "nodule":
        raise ConfigError(f"task {task!r}: expected nodule or malignancy")
    return get_candidate_arrays(data_root)


def get_malignancy_stats(
    data_root: str | os.PathLike[str] | None = None, require_on_disk: bool = True
) -> MalignancyStats:
    """Counts from building the malignancy rows (see MalignancyStats)."""
    root = resolve_data_root(data_root)
    return _load_malignancy(str(root.resolve()), require_on_disk)[1]


def clear_candidate_cache() -> None:
    """Forget cached candidate lists and malignancy rows (after the CSVs changed)."""
    _load.cache_clear()
    _as_list.cache_clear()
    _malignancy_table.cache_clear()
    _load_malignancy.cache_clear()


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


def csv_line(path: str | os.PathLike[str], series_uid: str, center_xyz) -> str:
    """`path: line N` of the first row of a LUNA16 CSV at this location (the header is line 1), else `path`.

    center_xyz: 3 floats, mm, matched to 1e-6 mm. Reads the file again: for error messages only.
    """
    frame = read_luna_csv(path, LOCATION_COLUMNS)
    same = (frame["seriesuid"].to_numpy() == series_uid) & np.isclose(
        frame[list(_COORDS)].to_numpy(dtype=np.float64), np.asarray(center_xyz), rtol=0, atol=1e-6
    ).all(axis=1)
    found = np.flatnonzero(same)
    return f"{path}: line {int(found[0]) + 2}" if len(found) else str(path)


def row_location(candidates: CandidateArrays, row: int) -> str | None:
    """Where row `row` of `candidates` was read: `<csv>: line N` (None for rows built in memory)."""
    if candidates.source_file is None:
        return None
    return csv_line(candidates.source_file, candidates.series_uid(row), candidates.center_xyz[row])


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
