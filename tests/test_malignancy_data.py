"""annotations_with_malignancy.csv (the book's chapter 14): reading, matching, is_mal, the dataset, prefill."""

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from p2ch import candidates as cmod
from p2ch import ct as ct_module
from p2ch import prefill, prepcache
from p2ch.cache import ChunkCache
from p2ch.candidates import (
    MALIGNANCY_TOLERANCE_MM,
    CandidateArrays,
    get_candidate_arrays,
    get_malignancy_arrays,
    get_malignancy_stats,
    match_malignancy,
    read_annotations,
    read_malignancy,
)
from p2ch.datasets import BalancedSampler, LunaDataset, MalignantLunaDataset, split_candidates
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import IrcTuple
from p2ch.luna import ANNOTATIONS_FILE, MALIGNANCY_COLUMNS, MALIGNANCY_FILE

from conftest import ANNOTATIONS_HEADER, CANDIDATES_HEADER, make_uid, write_csv

MAL_HEADER = ",".join(MALIGNANCY_COLUMNS)
# A row of the book's real file, verbatim.
BOOK_ROW = (
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860,-128.6994211,-175.31927180000002,"
    '-298.38750639999995,5.651470635,True,"[4, 2, 4, 2]",-131.89648,-178.25976125,-299.8000036716461,'
    "-125.4511675,-172.45898,-296.2000037670135,4"
)
SMALL_WIDTH = (4, 6, 8)


@pytest.fixture(autouse=True)
def _fresh_caches():
    cmod.clear_candidate_cache()
    ct_module.clear_caches()
    yield
    cmod.clear_candidate_cache()
    ct_module.clear_caches()


def mal_row(uid, xyz, diameter, mal_bool="True", ratings=(4, 2, 4, 2), length=None):
    """One line of annotations_with_malignancy.csv (box: centre ± radius)."""
    x, y, z = (float(v) for v in xyz)
    r = diameter / 2.0
    details = '"[' + ", ".join(str(v) for v in ratings) + ']"'
    count = len(ratings) if length is None else length
    return (uid, x, y, z, diameter, mal_bool, details, x - r, y - r, z - r, x + r, y + r, z + r, count)


def annotation_rows(root: Path) -> list[tuple]:
    frame = read_annotations(root / ANNOTATIONS_FILE)
    return list(frame.itertuples(index=False, name=None))


def write_malignancy(root: Path, rows) -> Path:
    return write_csv(root / MALIGNANCY_FILE, MAL_HEADER, rows)


def tiny_malignancy(root: Path) -> list[tuple]:
    """tiny_root's two annotations: the 10 mm one malignant, the 5 mm one benign."""
    (uid, *big, d_big), (_, *small, d_small) = annotation_rows(root)
    return [mal_row(uid, big, d_big, "True", (5, 4, 3)), mal_row(uid, small, d_small, "False", (1, 2, 4))]


# --- reading -----------------------------------------------------------------------------------


def test_reads_the_books_row_and_the_accepted_spellings(tmp_path):
    uid = make_uid(1)
    path = write_csv(
        tmp_path / MALIGNANCY_FILE,
        MAL_HEADER,
        [
            BOOK_ROW.split(","),  # joined again by commas: the quoted list survives
            mal_row(uid, (1, 2, 3), 6.0, "false", (1,)),
            mal_row(uid, (4, 5, 6), 7.0, "1", (5, 5, 1, 3)),
            mal_row(uid, (7, 8, 9), 8.0, "0", (2, 2)),
            mal_row(uid, (0, 0, 0), 9.0, "TRUE", (4, 4)),
        ],
        newline="\r\n",
        bom=True,
    )
    frame = read_malignancy(path)
    assert list(frame.columns) == list(MALIGNANCY_COLUMNS)
    assert frame["mal_bool"].dtype == bool
    assert frame["mal_bool"].tolist() == [True, False, True, False, True]
    assert frame["mal_details"].tolist() == [(4, 2, 4, 2), (1,), (5, 5, 1, 3), (2, 2), (4, 4)]
    assert frame["len_mal_details"].dtype == np.int64 and frame["len_mal_details"].tolist() == [4, 1, 4, 2, 2]
    for column in ("coordX", "coordY", "coordZ", "diameter_mm", "bboxLowX", "bboxHighZ"):
        assert frame[column].dtype == np.float64
    assert frame["seriesuid"].iloc[0] == "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    assert frame["coordY"].iloc[0] == pytest.approx(-175.31927180000002)
    assert frame["bboxLowZ"].iloc[0] == pytest.approx(-299.8000036716461)
    assert frame["diameter_mm"].iloc[1] == 6.0


BAD_ROWS = [
    ({"mal_bool": "yes"}, r"line 2: mal_bool is 'yes'; expected True or False"),
    ({"mal_bool": ""}, r"line 2: mal_bool is ''"),
    ({"mal_bool": "2"}, r"line 2: mal_bool is '2'"),
    ({"details": "4"}, r"line 2: mal_details is '4'; expected a list of the readers' LIDC malignancy ratings"),
    ({"details": '"[a, b]"'}, r"line 2: mal_details is '\[a, b\]'"),
    ({"details": '"[]"'}, r"line 2: mal_details is '\[\]'"),
    ({"details": '"[6]"'}, r"line 2: mal_details is '\[6\]'.*integers 1 to 5"),
    ({"details": '"[0, 3]"'}, r"line 2: mal_details is '\[0, 3\]'"),
    ({"length": 3}, r"line 2: len_mal_details is 3; expected 4, the number of ratings"),
    ({"length": 4.5}, r"line 2: len_mal_details is 4.5; expected 4"),
    ({"length": "x"}, r"line 2: len_mal_details is 'x'; expected a number"),
    ({"diameter": 0.0}, r"line 2: diameter_mm is 0.0; expected a positive diameter"),
    ({"diameter": -3.0}, r"line 2: diameter_mm is -3.0"),
    ({"bbox": "nan"}, r"line 2: bboxLowX is 'nan'; expected a number"),
]


@pytest.mark.parametrize(("change", "message"), BAD_ROWS)
def test_bad_rows_give_one_line_naming_file_line_and_field(tmp_path, change, message):
    uid = make_uid(1)
    row = list(mal_row(uid, (0, 0, 0), change.get("diameter", 6.0), change.get("mal_bool", "True")))
    if "details" in change:
        row[6] = change["details"]
    if "length" in change:
        row[13] = change["length"]
    if "bbox" in change:
        row[7] = change["bbox"]
    good = mal_row(uid, (9, 9, 9), 6.0)
    path = write_csv(tmp_path / MALIGNANCY_FILE, MAL_HEADER, [row, good])
    with pytest.raises(DataFormatError, match=message) as info:
        read_malignancy(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_row_further_down_names_its_line(tmp_path):
    uid = make_uid(1)
    rows = [mal_row(uid, (k, 0, 0), 6.0) for k in range(3)] + [mal_row(uid, (9, 0, 0), 6.0, "maybe")]
    with pytest.raises(DataFormatError, match=r"line 5: mal_bool is 'maybe'"):
        read_malignancy(write_csv(tmp_path / MALIGNANCY_FILE, MAL_HEADER, rows))


def test_missing_column_and_missing_file(tmp_path):
    path = write_csv(tmp_path / MALIGNANCY_FILE, ANNOTATIONS_HEADER, [(make_uid(1), 0, 0, 0, 5)])
    with pytest.raises(DataFormatError, match=r"missing column\(s\) mal_bool, mal_details, bboxLowX"):
        read_malignancy(path)
    with pytest.raises(DataNotFoundError, match=r"book's repository.*python -m p2ch\.synth") as info:
        read_malignancy(tmp_path / "nothing" / MALIGNANCY_FILE)
    assert "data/part2/luna/annotations_with_malignancy.csv" in str(info.value)


def test_mal_bool_is_taken_as_given_even_against_the_readers(tmp_path):
    # mal_bool True with a single high rating breaks the book's rule; it is counted, not changed.
    uid = make_uid(1)
    path = write_csv(tmp_path / MALIGNANCY_FILE, MAL_HEADER, [mal_row(uid, (0, 0, 0), 6.0, "True", (5, 1, 1))])
    assert read_malignancy(path)["mal_bool"].tolist() == [True]
    assert cmod._count_mal_bool_disagreements(read_malignancy(path), path) == 1


# --- matching to annotations.csv ----------------------------------------------------------------


def test_rows_match_the_nearest_annotation_within_the_tolerance(tmp_path):
    uid, other = make_uid(1), make_uid(2)
    annotations = read_annotations(
        write_csv(
            tmp_path / ANNOTATIONS_FILE,
            ANNOTATIONS_HEADER,
            [(uid, 0.0, 0.0, 0.0, 6.0), (uid, 30.0, 0.0, 0.0, 8.0), (other, 0.0, 0.0, 0.0, 5.0)],
        )
    )
    noise = 1e-8  # the real file's float noise
    rows = [
        mal_row(other, (0.0, 0.0, noise), 5.0),
        mal_row(uid, (30.0, 0.0, MALIGNANCY_TOLERANCE_MM), 8.0),  # exactly at the tolerance: matches
        mal_row(uid, (noise, -noise, 0.0), 6.0),
    ]
    malignancy = read_malignancy(write_csv(tmp_path / MALIGNANCY_FILE, MAL_HEADER, rows))
    np.testing.assert_array_equal(match_malignancy(malignancy, annotations), [2, 1, 0])


@pytest.mark.parametrize(
    ("xyz", "series", "message"),
    [
        ((1.5, 0.0, 0.0), 1, r"line 3: no annotation of series .*100000000001 .* within 1 mm .*nearest is 1\.500 mm"),
        ((0.0, 0.0, 0.0), 7, r"line 3: no annotation of series .*100000000007 .*that series has no annotation"),
    ],
)
def test_a_row_that_matches_no_annotation_is_an_error(tmp_path, xyz, series, message):
    uid = make_uid(1)
    annotations = read_annotations(write_csv(tmp_path / ANNOTATIONS_FILE, ANNOTATIONS_HEADER, [(uid, 0, 0, 0, 6)]))
    rows = [mal_row(uid, (0, 0, 0), 6.0), mal_row(make_uid(series), xyz, 6.0)]
    path = write_csv(tmp_path / MALIGNANCY_FILE, MAL_HEADER, rows)
    with pytest.raises(DataFormatError, match=message) as info:
        match_malignancy(read_malignancy(path), annotations, path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_two_rows_for_one_annotation_warn_and_keep_the_first(tiny_root, caplog):
    first, second = tiny_malignancy(tiny_root)
    repeat = (*first[:5], "False", *first[6:])  # same nodule, other verdict: the first one stays
    write_malignancy(tiny_root, [first, repeat, second])
    with caplog.at_level(logging.WARNING, logger="p2ch.candidates"):
        arrays = get_malignancy_arrays(tiny_root)
    assert any(r.levelno == logging.WARNING and r.name == "p2ch.candidates" for r in caplog.records)
    stats = get_malignancy_stats(tiny_root)
    assert (stats.rows, stats.matched, stats.duplicates) == (3, 2, 1)
    assert len(arrays) == 2 and arrays.is_mal.tolist() == [True, False]
    malignancy = read_malignancy(tiny_root / MALIGNANCY_FILE)
    np.testing.assert_array_equal(
        match_malignancy(malignancy, read_annotations(tiny_root / ANNOTATIONS_FILE)), [0, -1, 1]
    )


def test_annotations_without_a_row_are_counted_not_an_error(tiny_root):
    write_malignancy(tiny_root, tiny_malignancy(tiny_root)[:1])
    stats = get_malignancy_stats(tiny_root)
    assert (stats.rows, stats.matched, stats.annotations, stats.annotations_without_row) == (1, 1, 2, 1)
    assert (stats.malignant, stats.benign, stats.series, stats.series_not_on_disk) == (1, 0, 1, 0)
    # The candidate matched to the annotation without a row is not malignant.
    arrays = get_candidate_arrays(tiny_root)
    assert arrays.is_mal.tolist() == [True, False, False, False, False, False, False]


# --- is_mal in the candidate list, and the malignancy rows -----------------------------------------


def test_is_mal_flows_into_the_candidate_list_without_changing_its_order(tiny_root):
    without = get_candidate_arrays(tiny_root)
    assert not without.is_mal.any()
    write_malignancy(tiny_root, tiny_malignancy(tiny_root))
    cmod.clear_candidate_cache()
    arrays = get_candidate_arrays(tiny_root)
    np.testing.assert_array_equal(arrays.center_xyz, without.center_xyz)
    np.testing.assert_array_equal(arrays.diameter_mm, without.diameter_mm)
    # Rows: the 10 mm nodule's positive (malignant), the 5 mm one's (benign), an unmatched positive, negatives.
    assert arrays.diameter_mm[:2].tolist() == [10.0, 5.0]
    assert arrays.is_mal.tolist() == [True, False, False, False, False, False, False]
    listed = cmod.get_candidate_info_list(tiny_root)
    assert listed[0].is_mal is True and listed[0] == (True, True, True, 10.0, make_uid(1), listed[0].center_xyz)
    assert CandidateArrays.from_list(listed).to_list() == listed


def test_malignancy_arrays_rows_order_and_series_on_disk(tiny_root):
    (uid, *big, d_big), (_, *small, d_small) = annotation_rows(tiny_root)
    uid_gone = make_uid(9)  # annotated, but its CT is not on disk
    write_csv(
        tiny_root / ANNOTATIONS_FILE,
        ANNOTATIONS_HEADER,
        [(uid, *big, d_big), (uid, *small, d_small), (uid_gone, 1.0, 2.0, 3.0, 12.0)],
    )
    write_malignancy(
        tiny_root,
        [
            mal_row(uid, big, d_big, "False", (1, 2)),
            mal_row(uid_gone, (1.0, 2.0, 3.0), 12.0, "True", (5, 5)),
            mal_row(uid, small, d_small, "True", (4, 5)),
        ],
    )
    arrays = get_malignancy_arrays(tiny_root)
    assert len(arrays) == 2
    # Malignant first (the small one), then benign.
    assert arrays.is_mal.tolist() == [True, False] and arrays.diameter_mm.tolist() == [5.0, 10.0]
    assert arrays.is_nodule.all() and arrays.has_annotation.all()
    np.testing.assert_allclose(arrays.center_xyz, [small, big])
    assert arrays.series_uids.tolist() == [uid] and arrays.series_index.dtype == np.int32
    stats = get_malignancy_stats(tiny_root)
    assert (stats.series, stats.series_not_on_disk, stats.malignant, stats.benign) == (1, 1, 1, 1)
    everything = get_malignancy_arrays(tiny_root, require_on_disk=False)
    assert everything.diameter_mm.tolist() == [12.0, 5.0, 10.0]
    assert get_malignancy_arrays(tiny_root) is arrays  # cached per root


def test_malignancy_arrays_need_the_file_and_a_row_on_disk(tiny_root):
    with pytest.raises(DataNotFoundError, match=r"annotations_with_malignancy\.csv: file not found"):
        get_malignancy_arrays(tiny_root)
    cmod.clear_candidate_cache()
    write_csv(tiny_root / ANNOTATIONS_FILE, ANNOTATIONS_HEADER, [(make_uid(9), 1.0, 2.0, 3.0, 12.0)])
    write_malignancy(tiny_root, [mal_row(make_uid(9), (1.0, 2.0, 3.0), 12.0)])
    with pytest.raises(DataNotFoundError, match=r"none of the 1 rows of .* is of one of the 2 series under"):
        get_malignancy_arrays(tiny_root)


# --- MalignantLunaDataset --------------------------------------------------------------------------


class FakeSource:
    """Chunks filled with round(x mm) of the centre."""

    def get_ct_raw_candidate(self, series_uid, center_xyz, width_irc=SMALL_WIDTH):
        return np.full(tuple(width_irc), round(center_xyz[0]), dtype=np.int16), IrcTuple(0, 0, 0)


def nodule_arrays(count: int, malignant_every: int = 3) -> CandidateArrays:
    rows = np.arange(count)
    return CandidateArrays(
        series_uids=np.array([make_uid(1), make_uid(2)]),
        series_index=(rows % 2).astype(np.int32),
        center_xyz=np.stack([rows * 10.0, rows * 0.0, rows * 0.0], axis=1),
        is_nodule=np.ones(count, dtype=bool),
        has_annotation=np.ones(count, dtype=bool),
        is_mal=rows % malignant_every == 0,
        diameter_mm=np.full(count, 6.0, dtype=np.float32),
    )


def test_malignant_dataset_labels_are_is_mal():
    arrays = nodule_arrays(9)
    ds = MalignantLunaDataset(arrays, np.array([0, 1, 3, 5]), FakeSource(), SMALL_WIDTH)
    assert ds.labels.dtype == bool and ds.labels.tolist() == [True, False, True, False]
    assert [int(ds[k].label) for k in range(4)] == [1, 0, 1, 0]
    assert int(ds[2].chunk[0, 0, 0, 0]) == 30
    assert repr(ds).startswith("MalignantLunaDataset(4 nodules: 2 benign, 2 malignant")
    assert isinstance(ds, LunaDataset) and len(MalignantLunaDataset(arrays, None, FakeSource(), SMALL_WIDTH)) == 9


def test_malignant_dataset_refuses_rows_that_are_not_annotated_nodules(tiny_root):
    candidates = get_candidate_arrays(tiny_root)  # rows 2..6: an unmatched positive and negatives
    MalignantLunaDataset(candidates, [0, 1], FakeSource(), SMALL_WIDTH)
    with pytest.raises(ConfigError, match=r"3 of 4 rows are not annotated nodules .*get_malignancy_arrays\(\)"):
        MalignantLunaDataset(candidates, [0, 2, 3, 4], FakeSource(), SMALL_WIDTH)


def test_balanced_sampler_draws_benign_and_malignant_half_and_half():
    ds = MalignantLunaDataset(nodule_arrays(30, malignant_every=5), None, FakeSource(), SMALL_WIDTH)
    sampler = BalancedSampler(ds.labels, ratio=1, epoch_size=40, seed=3)
    drawn = ds.labels[sampler.indices(0)]
    assert drawn.sum() == 20 and (~drawn).sum() == 20


# --- splits ------------------------------------------------------------------------------------------


def test_series_split_of_malignancy_rows_agrees_with_the_candidate_split(tmp_path):
    root = tmp_path / "luna"
    root.mkdir()
    annotations, candidates, malignancy = [], [], []
    for n in range(60):
        uid = make_uid(200 + n)
        xyz = (float(n), -float(n), 10.0)
        annotations.append((uid, *xyz, 6.0))
        candidates += [(uid, xyz[0] + 0.5, xyz[1], xyz[2], 1), (uid, 40.0, 40.0, 40.0, 0)]
        malignancy.append(mal_row(uid, xyz, 6.0, "True" if n % 2 else "False"))
    write_csv(root / ANNOTATIONS_FILE, ANNOTATIONS_HEADER, annotations)
    write_csv(root / "candidates.csv", CANDIDATES_HEADER, candidates)
    write_malignancy(root, malignancy)
    nodule_arrays_ = get_candidate_arrays(root, require_on_disk=False)
    mal_arrays = get_malignancy_arrays(root, require_on_disk=False)
    assert nodule_arrays_.is_mal.sum() == 30 and mal_arrays.is_mal.sum() == 30
    settings = {"val_fraction": 0.2, "test_fraction": 0.1}
    assert_same_parts(split_candidates(nodule_arrays_, **settings), split_candidates(mal_arrays, **settings))


def assert_same_parts(nodule_split, mal_split):
    parts = {}
    for name in ("train", "val", "test"):
        for uid in getattr(nodule_split, f"{name}_series").tolist():
            parts[uid] = name
    for name in ("train", "val", "test"):
        series = getattr(mal_split, f"{name}_series").tolist()
        assert all(parts[uid] == name for uid in series), name
    assert len(mal_split.train) and len(mal_split.val)


def linked_copy(source: Path, root: Path) -> Path:
    """A data root with `source`'s CT folders (symlinked) and copies of its LUNA16 CSVs, no malignancy file."""
    root.mkdir(parents=True)
    for folder in source.glob("subset*"):
        os.symlink(folder, root / folder.name)
    for name in (ANNOTATIONS_FILE, "candidates.csv"):
        shutil.copy(source / name, root / name)
    return root


def test_subset_split_of_malignancy_rows_on_disk_agrees_with_the_candidate_split(synth_set, tmp_path):
    # CT k of a synthetic set is in subset k; CT 2 has no nodules.
    source = synth_set(num_cts=4, size=96, slices=48, candidates_per_ct=40, nodules_per_ct=2, seed=11)
    root = linked_copy(source, tmp_path / "luna")
    rows = annotation_rows(root)
    write_malignancy(
        root, [mal_row(u, (x, y, z), d, "True" if k % 2 else "False") for k, (u, x, y, z, d) in enumerate(rows)]
    )
    mal_arrays = get_malignancy_arrays(root)
    assert len(mal_arrays) == len(rows) and mal_arrays.is_mal.sum() == len(rows) // 2
    candidates = get_candidate_arrays(root)
    assert candidates.is_mal.any() and (candidates.has_annotation & ~candidates.is_mal).any()
    assert not (candidates.is_mal & ~candidates.has_annotation).any()
    settings = {"mode": "subset", "val_subsets": (1,), "test_subsets": (3,), "data_root": root}
    assert_same_parts(split_candidates(candidates, **settings), split_candidates(mal_arrays, **settings))


# --- prefill -----------------------------------------------------------------------------------------


def test_prepcache_malignant_plans_and_fills_the_malignancy_chunks(tiny_root, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    width = ["--width-irc", "4", "6", "8"]
    base = ["--data-root", str(tiny_root), "--cache-dir", str(cache_dir), "--log-level", "WARNING", *width]
    # Without the file, --malignant is an error; without the flag, only the candidates are planned.
    assert prepcache.main([*base, "--malignant", "--dry-run"]) == 2
    assert "annotations_with_malignancy.csv: file not found" in capsys.readouterr().err
    write_malignancy(tiny_root, tiny_malignancy(tiny_root))
    cache = ChunkCache(cache_dir, tiny_root)
    plain = prefill.make_plan(cache, SMALL_WIDTH)
    plan = prefill.make_plan(cache, SMALL_WIDTH, malignant=True)
    assert (plain.chunks, plan.chunks, plan.cts) == (7, 9, 2)  # + the 2 nodule centres (not candidate centres)
    mal_centers = get_malignancy_arrays(tiny_root).center_xyz
    (task,) = [t for t in plan.tasks if t.series_uid == make_uid(1)]
    np.testing.assert_allclose(task.centers_xyz[-2:], mal_centers)  # after the candidates' centres
    assert prepcache.main([*base, "--malignant", "--num-workers", "0"]) == 0
    assert not cache.missing(make_uid(1), mal_centers, SMALL_WIDTH).any()
    assert prefill.make_plan(cache, SMALL_WIDTH, malignant=True).to_write == 0
    assert prepcache.main([*base, "--malignant", "--segmentation"]) == 2
    assert "--malignant apply to the chunk cache" in capsys.readouterr().err
