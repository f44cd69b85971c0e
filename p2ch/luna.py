"""LUNA16's layout on disk: where the CTs and CSVs are, what they are called, what a series uid is.

Every fact about the data set's folders and file names has its home here, so that the readers
(candidates, ct, the commands) and the writer (p2ch.synth) agree by construction:

    <root>/subset0 … subset9/<series_uid>.mhd + .raw    the CTs (LUNA16's ten folds)
    <root>/annotations.csv                              the nodules (diameter_mm)
    <root>/annotations_excluded.csv                     findings that count neither way in FROC
    <root>/annotations_with_malignancy.csv              the nodules with LIDC malignancy ratings (the book's
                                                        chapter 14 file, from its repository, not LUNA16)
    <root>/candidates.csv (or candidates_V2.csv)        the candidate locations and their class
    <root>/seriesuids.csv                               every series uid, no header

Standard library only (p2ch.synth uses it without pulling in pandas or torch).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

from p2ch.config import resolve_data_root
from p2ch.errors import DataFormatError, DataNotFoundError

log = logging.getLogger(__name__)

NUM_SUBSETS = 10
SUBSET_GLOB = "subset*"
SUBSET_RE = re.compile(r"^subset(\d+)$")
ANNOTATIONS_FILE = "annotations.csv"
EXCLUDED_FILE = "annotations_excluded.csv"
MALIGNANCY_FILE = "annotations_with_malignancy.csv"
CANDIDATE_FILES = ("candidates.csv", "candidates_V2.csv")  # the first one present is used
SERIESUIDS_FILE = "seriesuids.csv"
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
# The book's data/part2/luna/annotations_with_malignancy.csv: annotations.csv's rows (same centres)
# plus mal_bool (True/False), mal_details (the quoted list of per-reader LIDC malignancy ratings
# 1..5, e.g. "[4, 2, 4, 2]"), the nodule's bounding box in mm and len_mal_details (that list's length).
MALIGNANCY_COLUMNS = (
    *ANNOTATION_COLUMNS,
    "mal_bool",
    "mal_details",
    "bboxLowX",
    "bboxLowY",
    "bboxLowZ",
    "bboxHighX",
    "bboxHighY",
    "bboxHighZ",
    "len_mal_details",
)
LOCATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ")
SUBMISSION_COLUMNS = (*LOCATION_COLUMNS, "probability")  # LUNA16's submission CSV

# A value read from a data file and quoted in a message is cut to this many characters: a 2 MB
# field must not make a 2 MB error line.
QUOTED_VALUE_CHARS = 80

# DICOM UIDs: digits and dots, at most 64 characters. Checked before a uid goes into a path.
SERIES_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SERIES_UID_MAX_LEN = 64


def subset_name(k: int) -> str:
    """The folder of LUNA16 fold `k`: `subset<k>`."""
    return f"subset{k}"


def subset_of(mhd_path: str | os.PathLike[str]) -> int | None:
    """The fold number of a CT from its folder name (`subset3/x.mhd` → 3); None for another folder."""
    match = SUBSET_RE.match(Path(mhd_path).parent.name)
    return int(match.group(1)) if match else None


def is_valid_series_uid(series_uid: str) -> bool:
    """True for a DICOM-style uid (digits and dots, ≤ 64 characters): safe to put in a path."""
    return (
        isinstance(series_uid, str)
        and len(series_uid) <= SERIES_UID_MAX_LEN
        and SERIES_UID_RE.match(series_uid) is not None
    )


def cut_text(value: object, limit: int = QUOTED_VALUE_CHARS) -> str:
    """`str(value)` for a message, cut to `limit` characters with "…" and the full length."""
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def quoted(value: object, limit: int = QUOTED_VALUE_CHARS) -> str:
    """`repr(str(value))` for a message, cut to `limit` characters with "…" and the full length."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"


def check_series_uid(series_uid: str) -> str:
    """Return `series_uid` unchanged, or raise DataFormatError if it is not digits and dots."""
    if not is_valid_series_uid(series_uid):
        raise DataFormatError(
            f"invalid series_uid {quoted(series_uid)}: expected a LUNA16/DICOM uid of digits and dots "
            f"(at most {SERIES_UID_MAX_LEN} characters)"
        )
    return series_uid


def no_data_message(data_root: Path) -> str:
    return (
        f"no .mhd files under {data_root}/{SUBSET_GLOB}/; download LUNA16 there "
        "(or point --data-root / P2CH_DATA_ROOT at it), or make a synthetic set with "
        f"`python -m p2ch.synth --out {data_root}`"
    )


@functools.lru_cache(maxsize=8)
def _series_index(root: str) -> dict[str, Path]:
    index: dict[str, Path] = {}
    root_path = Path(root)
    if not root_path.is_dir():
        return index
    for subset in sorted(p for p in root_path.glob(SUBSET_GLOB) if p.is_dir()):
        for mhd in sorted(subset.glob("*.mhd")):
            uid = mhd.stem
            if not is_valid_series_uid(uid):
                log.warning("ignoring %s: its name is not a series uid (digits and dots)", mhd)
                continue
            if uid in index:
                log.warning("series %s is in both %s and %s; using the first", uid, index[uid].parent, subset)
                continue
            index[uid] = mhd
    return index


def series_index(data_root: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Map every series_uid found as `<root>/subset*/<uid>.mhd` to its path.

    Built once per data root per process (one directory scan, not a glob per CT); call
    `clear_series_index()` after adding files. Returns a copy that callers may modify.
    """
    root = resolve_data_root(data_root)
    return dict(_series_index(str(root.resolve())))


def clear_series_index() -> None:
    """Forget the cached folder scans (after CT files were added, moved or removed)."""
    _series_index.cache_clear()


def find_mhd(series_uid: str, data_root: str | os.PathLike[str] | None = None) -> Path:
    """Path of `<root>/subset*/<series_uid>.mhd`, or DataNotFoundError saying where it looked."""
    check_series_uid(series_uid)
    root = resolve_data_root(data_root)
    index = _series_index(str(root.resolve()))
    if not index:
        raise DataNotFoundError(no_data_message(root))
    try:
        return index[series_uid]
    except KeyError:
        raise DataNotFoundError(
            f"series {series_uid} not found: no {series_uid}.mhd under {root}/{SUBSET_GLOB}/ "
            f"({len(index)} series there); is its subset downloaded and unpacked?"
        ) from None


def find_candidates_file(data_root: Path) -> Path:
    """`candidates.csv` if present, else `candidates_V2.csv`, in the data root."""
    for name in CANDIDATE_FILES:
        if (data_root / name).is_file():
            return data_root / name
    raise DataNotFoundError(
        f"no {' or '.join(CANDIDATE_FILES)} in {data_root}; put LUNA16's CSVFILES there, or make "
        f"a synthetic set with `python -m p2ch.synth --out {data_root}`"
    )
