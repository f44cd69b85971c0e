import logging
import pickle

import numpy as np
import pytest

from p2ch import candidates as cmod
from p2ch import ct as ct_module
from p2ch.candidates import (
    CandidateArrays,
    CandidateInfoTuple,
    get_candidate_arrays,
    get_candidate_info_list,
    get_candidate_stats,
    read_annotations,
    read_candidates,
    read_excluded,
)
from p2ch.errors import DataFormatError, DataNotFoundError

from conftest import ANNOTATIONS_HEADER, CANDIDATES_HEADER, make_uid, write_csv


@pytest.fixture(autouse=True)
def _fresh_caches():
    cmod.clear_candidate_cache()
    ct_module.clear_caches()
    yield
    cmod.clear_candidate_cache()
    ct_module.clear_caches()


def test_list_matches_by_luna_hit_rule_and_sorts(tiny_root):
    result = get_candidate_info_list(tiny_root)
    assert len(result) == 7
    assert all(isinstance(c, CandidateInfoTuple) for c in result)
    # Nodules first, annotated ones first, largest first.
    assert [(c.is_nodule, c.has_annotation, c.diameter_mm) for c in result[:3]] == [
        (True, True, 10.0),
        (True, True, 5.0),
        (True, False, 0.0),
    ]
    assert all(not c.is_nodule and c.diameter_mm == 0.0 for c in result[3:])
    assert result[0].series_uid == make_uid(1)
    assert result[0].center_xyz == pytest.approx((-180 + 34 * 0.7 + 1.0, -170 + 30 * 0.7, -320 + 20 * 1.25))
    stats = get_candidate_stats(tiny_root)
    assert (stats.candidates, stats.positives, stats.positives_matched, stats.positives_unmatched) == (7, 3, 2, 1)
    assert stats.annotations == 2 and stats.annotations_without_candidate == 0
    assert stats.series == 2 and stats.series_not_on_disk == 0


def test_hit_rule_boundary_and_nearest(tmp_path):
    uid = make_uid(3)
    annotations = read_annotations(
        write_csv(
            tmp_path / "a.csv",
            ANNOTATIONS_HEADER,
            [
                (uid, 0.0, 0.0, 0.0, 10.0),
                (uid, 6.0, 0.0, 0.0, 20.0),
            ],
        )
    )
    candidates = read_candidates(
        write_csv(
            tmp_path / "c.csv",
            CANDIDATES_HEADER,
            [
                (uid, 4.0, 0.0, 0.0, 1),  # within both radii; nearer the 20 mm one (distance 2)
                (
                    uid,
                    0.0,
                    5.0,
                    0.0,
                    1,
                ),  # exactly on the 10 mm one's radius: outside it (strict <), so the 20 mm one (7.8)
                (uid, -4.9, 0.0, 0.0, 1),  # inside the 10 mm one only (dist 4.9 < 5; 10.9 > 10)
                (uid, -30.0, 0.0, 0.0, 1),  # matches nothing
                (uid, 1.0, 0.0, 0.0, 0),  # negatives are never matched
                (make_uid(4), 0.0, 0.0, 0.0, 1),  # other series: no annotations
            ],
        )
    )
    diameter, matched, annotation_row = cmod.match_annotations(candidates, annotations)
    np.testing.assert_array_equal(matched, [True, True, True, False, False, False])
    np.testing.assert_array_equal(diameter, [20.0, 20.0, 10.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(annotation_row, [1, 1, 0, -1, -1, -1])


def test_book_box_rule_would_lose_this_diameter(tmp_path):
    # A positive 3 mm off-centre on one axis of a 10 mm nodule: the book's per-axis d/4 box
    # (2.5 mm) drops it to diameter 0; LUNA16's radius rule (5 mm) keeps it.
    uid = make_uid(5)
    annotations = read_annotations(write_csv(tmp_path / "a.csv", ANNOTATIONS_HEADER, [(uid, 0, 0, 0, 10)]))
    candidates = read_candidates(write_csv(tmp_path / "c.csv", CANDIDATES_HEADER, [(uid, 3, 0, 0, 1)]))
    diameter, matched, annotation_row = cmod.match_annotations(candidates, annotations)
    assert matched[0] and diameter[0] == 10.0 and annotation_row[0] == 0


def test_columnar_form_matches_list(tiny_root):
    arrays = get_candidate_arrays(tiny_root)
    listed = get_candidate_info_list(tiny_root)
    assert len(arrays) == len(listed)
    assert arrays.to_list() == listed
    assert [arrays[k] for k in range(len(arrays))] == listed
    assert arrays.is_nodule.dtype == bool and arrays.diameter_mm.dtype == np.float32
    assert arrays.is_mal.dtype == bool and not arrays.is_mal.any()  # no annotations_with_malignancy.csv
    assert CandidateInfoTuple._fields == (
        "is_nodule",
        "has_annotation",
        "is_mal",
        "diameter_mm",
        "series_uid",
        "center_xyz",
    )
    assert arrays.center_xyz.shape == (7, 3) and arrays.center_xyz.dtype == np.float64
    assert arrays.series_index.dtype == np.int32
    assert arrays.series_uids.dtype.kind == "U"  # no Python objects for workers to refcount
    assert CandidateArrays.from_list(listed).to_list() == listed
    sub = arrays.take(arrays.is_nodule)
    assert len(sub) == 3 and sub.series_uid(0) == make_uid(1)
    clone = pickle.loads(pickle.dumps(arrays))
    assert clone.to_list() == listed


def test_cached_per_root_and_returns_fresh_list(tiny_root):
    first = get_candidate_info_list(tiny_root)
    first.clear()
    assert len(get_candidate_info_list(tiny_root)) == 7
    assert get_candidate_arrays(tiny_root) is get_candidate_arrays(tiny_root)


def test_deterministic_order_independent_of_csv_order(tiny_root):
    expected = get_candidate_info_list(tiny_root)
    path = tiny_root / "candidates.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    cmod.clear_candidate_cache()
    assert get_candidate_info_list(tiny_root) == expected


def test_require_on_disk_skips_missing_series(tiny_root):
    for path in (tiny_root / "subset1").iterdir():
        path.unlink()
    ct_module.clear_caches()
    result = get_candidate_info_list(tiny_root)
    assert len(result) == 5 and {c.series_uid for c in result} == {make_uid(1)}
    stats = get_candidate_stats(tiny_root)
    assert stats.candidates_not_on_disk == 2 and stats.series_not_on_disk == 1
    assert len(get_candidate_info_list(tiny_root, require_on_disk=False)) == 7


def test_no_ct_files_is_a_clear_error(tmp_path):
    root = tmp_path / "luna"
    root.mkdir()
    with pytest.raises(DataNotFoundError, match=r"no \.mhd files under .*luna/subset\*/"):
        get_candidate_info_list(root)


def test_csvs_that_do_not_belong_to_the_cts(tiny_root):
    write_csv(tiny_root / "candidates.csv", CANDIDATES_HEADER, [(make_uid(77), 0, 0, 0, 0)])
    with pytest.raises(DataNotFoundError, match=r"none of the 2 series .* appears in candidates\.csv"):
        get_candidate_info_list(tiny_root)


def test_missing_csvs(tiny_root):
    (tiny_root / "candidates.csv").unlink()
    with pytest.raises(DataNotFoundError, match=r"no candidates\.csv or candidates_V2\.csv in"):
        get_candidate_info_list(tiny_root)


def test_missing_annotations_csv(tiny_root):
    (tiny_root / "annotations.csv").unlink()
    with pytest.raises(DataNotFoundError, match=r"annotations\.csv: file not found"):
        get_candidate_info_list(tiny_root)


def test_candidates_v2_is_accepted(tiny_root):
    (tiny_root / "candidates.csv").rename(tiny_root / "candidates_V2.csv")
    assert len(get_candidate_info_list(tiny_root)) == 7


def test_bom_and_crlf_are_accepted(tmp_path):
    uid = make_uid(1)
    path = write_csv(
        tmp_path / "c.csv", CANDIDATES_HEADER, [(uid, 1.5, -2, 3e1, 1), (uid, 0, 0, 0, 0)], newline="\r\n", bom=True
    )
    frame = read_candidates(path)
    assert list(frame.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    assert frame["seriesuid"].tolist() == [uid, uid]
    assert frame["coordZ"].tolist() == [30.0, 0.0]
    assert frame["class"].tolist() == [1, 0]


def test_duplicate_rows_accepted_and_reported(tiny_root, caplog):
    path = tiny_root / "candidates.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[1], lines[4]]) + "\n")
    with caplog.at_level(logging.WARNING, logger="p2ch.candidates"):
        result = get_candidate_info_list(tiny_root)
    assert len(result) == 7
    assert get_candidate_stats(tiny_root).duplicate_rows == 2


BAD_CANDIDATES = [
    ("seriesuid,coordX,coordY,coordZ\n1.2.3,0,0,0\n", r"missing column\(s\) class"),
    ("seriesuid,coordX,coordY,coordZ,label\n1.2.3,0,0,0,1\n", r"missing column\(s\) class.*got .*label"),
    (
        "seriesuid,coordX,coordY,coordZ,class\n1.2.3,0,0,0,1\n1.2.3,abc,0,0,0\n",
        r"line 3: coordX is 'abc'; expected a number",
    ),
    ("seriesuid,coordX,coordY,coordZ,class\n1.2.3,0,,0,1\n", r"line 2: coordY is ''"),
    ("seriesuid,coordX,coordY,coordZ,class\n1.2.3,0,0,nan,1\n", r"line 2: coordZ is 'nan'"),
    ("seriesuid,coordX,coordY,coordZ,class\n1.2.3,0,0,inf,1\n", r"line 2: coordZ is 'inf'"),
    ("seriesuid,coordX,coordY,coordZ,class\n1.2.3,0,0,0,2\n", r"line 2: class is 2; expected 0 or 1"),
    ("seriesuid,coordX,coordY,coordZ,class\n1.2.3,0,0,0,0.5\n", r"class is 0.5; expected 0 or 1"),
    (
        "seriesuid,coordX,coordY,coordZ,class\n../../etc,0,0,0,1\n",
        r"line 2: seriesuid '\.\./\.\./etc' is not a series uid",
    ),
    ("seriesuid,coordX,coordY,coordZ,class\n1.2.3/4,0,0,0,1\n", r"is not a series uid"),
    ("seriesuid,coordX,coordY,coordZ,class\n", r"no candidate rows after the header"),
    ("", r"empty file; expected the header seriesuid,coordX,coordY,coordZ,class"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CANDIDATES)
def test_bad_candidates_csv(tmp_path, text, message):
    path = tmp_path / "candidates.csv"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=message) as info:
        read_candidates(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1.2.3,0,0,0,0", r"line 2: diameter_mm is 0.0; expected a positive diameter"),
        ("1.2.3,0,0,0,-4", r"diameter_mm is -4.0"),
        ("1.2.3,0,0,0,x", r"diameter_mm is 'x'; expected a number"),
    ],
)
def test_bad_annotations_csv(tmp_path, row, message):
    path = tmp_path / "annotations.csv"
    path.write_text(f"{ANNOTATIONS_HEADER}\n{row}\n")
    with pytest.raises(DataFormatError, match=message):
        read_annotations(path)


def test_empty_annotations_is_allowed_and_excluded_accepts_minus_one(tmp_path):
    path = write_csv(tmp_path / "annotations.csv", ANNOTATIONS_HEADER, [])
    assert read_annotations(path).empty
    excluded = read_excluded(write_csv(tmp_path / "x.csv", ANNOTATIONS_HEADER, [("1.2.3", 1, 2, 3, -1)]))
    assert excluded["diameter_mm"].tolist() == [-1.0]


def test_same_location_as_class_1_and_class_0_keeps_class_1(tiny_root, caplog):
    path = tiny_root / "candidates.csv"
    header, *rows = path.read_text().splitlines()
    uid, x, y, z, _ = rows[0].split(",")
    near = f"{float(x) + 0.0004:.6f}"  # the same centre to the µm
    other = f"{float(x) + 0.002:.6f}"  # 2 µm away: another location
    rows = [*rows, f"{uid},{near},{y},{z},0", f"{uid},{other},{y},{z},0", f"{uid},{x},{y},{z},0"]
    path.write_text("\n".join([header, *rows]) + "\n")
    with caplog.at_level(logging.WARNING, logger="p2ch.candidates"):
        arrays = get_candidate_arrays(tiny_root)
    assert len(arrays) == 8  # the 7 of the fixture + the one 2 µm away; both class-0 repeats dropped
    at_first = np.linalg.norm(arrays.center_xyz - [float(x), float(y), float(z)], axis=1) < 1e-3
    assert arrays.is_nodule[at_first].all() and at_first.sum() == 1
    assert arrays.has_annotation[at_first].all() and arrays.diameter_mm[at_first] == 10.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "class 1" in r.getMessage()]
    assert len(warnings) == 1
    assert "lines 2 (class 1) and 9 (class 0)" in warnings[0] and "lines 2 (class 1) and 11 (class 0)" in warnings[0]
    assert len(read_candidates(path)) == 8


def test_trailing_comma_names_the_line_and_field_counts(tmp_path):
    """pandas took the first field as the index and blamed the next one: "seriesuid '-171.6' is not a series uid"."""
    path = tmp_path / "candidates.csv"
    path.write_text(f"{CANDIDATES_HEADER}\n1.2.3,-171.616687,0,0,1,\n1.2.3,5,0,0,0,\n")
    with pytest.raises(
        DataFormatError, match=r"candidates\.csv: line 2 has 6 fields, the header has 5 \(a trailing comma\?\)"
    ):
        read_candidates(path)
    path.write_text(f"{CANDIDATES_HEADER}\n1.2.3,-171.616687,0,0,1\n\n1.2.3,5,0,0,0,\n")
    with pytest.raises(DataFormatError, match=r"line 4 has 6 fields, the header has 5") as info:
        read_candidates(path)
    assert "\n" not in str(info.value)
    path.write_text(f"{ANNOTATIONS_HEADER}\n1.2.3,1,2,3,4,\n")
    with pytest.raises(DataFormatError, match=r"line 2 has 6 fields, the header has 5"):
        read_annotations(path)


@pytest.mark.parametrize(
    "row",
    [
        "1.2." + "3" * 2_000_000 + ",0,0,0,1",  # a 2 MB uid
        "1.2.3," + "9" * 2_000_000 + "x,0,0,1",  # a 2 MB coordinate
        "x" * 2_000_000,  # a 2 MB line without a comma
    ],
)
def test_huge_values_are_cut_in_messages(tmp_path, row):
    path = tmp_path / "candidates.csv"
    path.write_text(f"{CANDIDATES_HEADER}\n{row}\n")
    with pytest.raises(DataFormatError, match=r"line 2: .*… \(2,000,00\d characters\)") as info:
        read_candidates(path)
    assert len(str(info.value)) < 400
    path.write_text("x" * 2_000_000 + "\n1.2.3,0,0,0,1\n")
    with pytest.raises(DataFormatError, match=r"missing column\(s\)") as info:
        read_candidates(path)
    assert len(str(info.value)) < 400
