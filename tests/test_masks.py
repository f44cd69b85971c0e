"""p2ch.masks: nodule masks from annotations, against synthetic truth and hand-made volumes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from p2ch.ct import Ct
from p2ch.errors import ConfigError, DataFormatError
from p2ch.masks import MASK_VERSION, MaskRule, book_mask, build_mask, ct_mask, nodule_masks

from conftest import make_uid, write_ct

# Three CTs with several nodules each (CT 2 has none), and their true masks.
MASKED = dict(num_cts=3, size=128, slices=64, candidates_per_ct=20, nodules_per_ct=3.0, seed=5, masks=True)
LUNG_HU, SOLID_HU = -850, 40


def offsets_mm(shape, center_irc, spacing):
    """(I, R, C, 3) mm from `center_irc` to every voxel centre."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return (grid - np.asarray(center_irc)) * np.asarray(spacing)


def ball(shape, center_irc, radius_mm, spacing) -> np.ndarray:
    """Voxels whose centre lies within radius_mm of center_irc (in mm): (I, R, C) bool."""
    return np.linalg.norm(offsets_mm(shape, center_irc, spacing), axis=-1) < radius_mm


def volume(shape, fill=LUNG_HU, noise_hu=0.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.full(shape, fill, dtype=np.float64) + rng.normal(0.0, noise_hu, shape)).round().astype(np.int16)


def paint(hu: np.ndarray, where: np.ndarray, value: int) -> np.ndarray:
    out = hu.copy()
    out[where] = value
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def false_per_true(built: np.ndarray, true: np.ndarray) -> float:
    return np.count_nonzero(built & ~true) / np.count_nonzero(true)


def test_masks_match_synthetic_truth_and_beat_the_book(synth_set):
    root = synth_set(**MASKED)
    uids = (root / "seriesuids.csv").read_text().split()
    rows = [line.split(",") for line in (root / "annotations.csv").read_text().splitlines()[1:]]
    ours, book, checked = [], [], 0
    for uid in uids:
        found = [r for r in rows if r[0] == uid]
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "masks" / f"{uid}.mhd")))
        if not found:
            assert not truth.any()
            continue
        ct = Ct(uid, root)
        centers_xyz = np.array([[float(v) for v in r[1:4]] for r in found])
        diameters = np.array([float(r[4]) for r in found])
        labels = ct_mask(ct, centers_xyz, diameters, labels=True)
        assert labels.dtype == np.int32 and labels.shape == ct.hu.shape
        np.testing.assert_array_equal(ct_mask(ct, centers_xyz, diameters), labels > 0)
        centers_irc = ct.xyz2irc(centers_xyz)  # rounded: the voxel holding each centre
        spacing_irc = tuple(ct.voxel_size_xyz)[::-1]
        for k in range(len(found)):
            true = truth == k + 1
            ours.append(dice(labels == k + 1, true))
            book.append(dice(book_mask(ct.hu, centers_irc[k : k + 1], diameters[k : k + 1], spacing_irc), true))
            checked += 1
        assert false_per_true(labels > 0, truth > 0) <= 0.2
    assert checked >= 4
    assert min(ours) >= 0.8, ours
    assert np.mean(ours) > np.mean(book) + 0.1, (ours, book)


def test_sphere_is_in_mm_not_in_voxels():
    # Inside solid tissue every ray is blocked: the mask is the annotation's sphere, in mm.
    shape, spacing, center = (15, 41, 41), (2.5, 0.7, 0.7), (7.0, 20.0, 20.0)
    hu = volume(shape, fill=SOLID_HU)
    built = build_mask(hu, np.array([center]), np.array([10.0]), spacing)
    expected = ball(shape, center, 5.0, spacing)
    np.testing.assert_array_equal(built, expected)
    index, row, _ = np.nonzero(built)
    assert index.max() - index.min() + 1 == 3  # within 5 mm at 2.5 mm per slice: 1 slice each way
    assert row.max() - row.min() + 1 == 15  # within 5 mm at 0.7 mm per row: 7 rows each way
    # The same voxels read with isotropic spacing are a different ball.
    assert not np.array_equal(build_mask(hu, np.array([center]), np.array([10.0]), (1.0, 1.0, 1.0)), expected)


def test_nodule_in_lung_with_anisotropic_spacing_matches_its_ball():
    shape, spacing, center = (20, 48, 48), (1.8, 0.6, 0.6), (9.6, 23.3, 24.1)
    true = ball(shape, center, 4.5, spacing)
    hu = paint(volume(shape, noise_hu=30.0), true, SOLID_HU)
    built = build_mask(hu, np.array([center]), np.array([9.0]), spacing)
    assert dice(built, true) >= 0.95


@pytest.mark.parametrize(
    ("name", "halo_hu", "core_hu"),
    [("ground-glass", -550, None), ("faint ground-glass", -650, None), ("part-solid", -450, 30)],
)
def test_ground_glass_and_part_solid_nodules(name, halo_hu, core_hu):
    shape, spacing, center = (24, 40, 40), (1.0, 0.7, 0.7), (12.0, 20.0, 19.6)
    true = ball(shape, center, 5.0, spacing)
    hu = paint(volume(shape, fill=-880, noise_hu=25.0), true, halo_hu)
    if core_hu is not None:
        hu = paint(hu, ball(shape, center, 2.8, spacing), core_hu)
    built = build_mask(hu, np.array([center]), np.array([10.0]), spacing)
    assert dice(built, true) >= 0.9, name


def test_vessel_through_a_nodule_does_not_leak():
    shape, spacing, center = (30, 60, 60), (1.0, 0.7, 0.7), (15.0, 30.0, 30.0)
    true = ball(shape, center, 4.0, spacing)
    offsets = offsets_mm(shape, center, spacing)
    vessel = np.hypot(offsets[..., 0], offsets[..., 1]) < 1.2  # a tube along the columns, through the centre
    hu = paint(paint(volume(shape, noise_hu=20.0), vessel, SOLID_HU), true, SOLID_HU)
    built = build_mask(hu, np.array([center]), np.array([8.0]), spacing)
    assert dice(built, true) >= 0.9
    assert false_per_true(built, true) <= 0.1
    assert np.linalg.norm(offsets[built], axis=1).max() < 4.0 * 1.3
    book = book_mask(hu, np.array([center]), np.array([8.0]), spacing)
    assert false_per_true(book, true) > 0.3  # the book's box runs along the vessel


def test_nodule_on_the_chest_wall_stops_at_its_radius():
    shape, spacing, center = (30, 60, 60), (1.25, 0.7, 0.7), (15.0, 30.0, 30.0)
    true = ball(shape, center, 5.0, spacing)
    offsets = offsets_mm(shape, center, spacing)
    wall = offsets[..., 1] > 3.5  # soft tissue from 3.5 mm below the centre on: the nodule sinks into it
    hu = paint(paint(volume(shape, noise_hu=25.0), wall, SOLID_HU), true, SOLID_HU)
    built = build_mask(hu, np.array([center]), np.array([10.0]), spacing)
    assert dice(built, true) >= 0.9
    assert false_per_true(built, true) <= 0.1


def test_two_nodules_union_and_distinct_labels():
    shape, spacing = (30, 64, 64), (1.0, 0.75, 0.75)
    centers = np.array([[10.0, 20.0, 20.0], [20.0, 44.0, 40.0]])
    balls = [ball(shape, c, 4.0, spacing) for c in centers]
    hu = paint(volume(shape, noise_hu=20.0), balls[0] | balls[1], SOLID_HU)
    labels = nodule_masks(hu, centers, np.array([8.0, 8.0]), spacing)
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1, 2}
    for k, true in enumerate(balls):
        assert dice(labels == k + 1, true) >= 0.95
    np.testing.assert_array_equal(build_mask(hu, centers, np.array([8.0, 8.0]), spacing), labels > 0)


def test_touching_nodules_split_by_the_nearer_centre():
    shape, spacing = (24, 48, 60), (1.0, 0.8, 0.8)
    centers = np.array([[12.0, 24.0, 22.0], [12.0, 24.0, 36.0]])  # 11.2 mm apart, radii 6 mm: they merge
    hu = paint(volume(shape), ball(shape, centers[0], 6.0, spacing) | ball(shape, centers[1], 6.0, spacing), 40)
    labels = nodule_masks(hu, centers, np.array([12.0, 12.0]), spacing)
    voxels = np.argwhere(labels > 0)
    distances = np.stack([np.linalg.norm((voxels - c) * spacing, axis=1) for c in centers], axis=1)
    nearer = np.where(distances[:, 1] < distances[:, 0], 2, 1)
    np.testing.assert_array_equal(labels[tuple(voxels.T)], nearer)
    assert {1, 2} <= set(np.unique(labels))


def test_no_nodules_gives_an_empty_mask():
    hu = volume((8, 16, 16))
    assert not build_mask(hu, np.empty((0, 3)), np.empty(0), (1.0, 1.0, 1.0)).any()
    labels = nodule_masks(hu, [], [], (1.0, 1.0, 1.0))
    assert labels.shape == (8, 16, 16) and not labels.any()


@pytest.mark.parametrize(
    ("centers", "diameters", "expected"),
    [
        (
            [[4.0, 8.0, 8.0], [4.0, 8.0, 16.2]],
            [5.0, 5.0],
            r"nodule 1 \(centre irc \(4\.0, 8\.0, 16\.2\), diameter 5 mm\)",
        ),
        ([[-0.6, 8.0, 8.0]], [5.0], r"nodule 0 .*outside the CT's 8×16×16 voxels"),
        ([[4.0, 8.0, 8.0]], [0.0], r"nodule 0 .*diameter 0 mm.*expected a diameter > 0"),
        ([[4.0, 8.0, 8.0]], [-1.0], r"nodule 0 .*diameter -1 mm"),
        ([[4.0, 8.0, 8.0]], [float("nan")], r"nodule 0 .*diameter nan mm"),
        ([[float("nan"), 8.0, 8.0]], [5.0], r"nodule 0 .*outside"),
    ],
)
def test_bad_annotations_give_one_line_data_errors(centers, diameters, expected):
    hu = volume((8, 16, 16))
    for make in (build_mask, nodule_masks, book_mask):
        with pytest.raises(DataFormatError, match=expected) as excinfo:
            make(hu, np.array(centers), np.array(diameters), (1.0, 1.0, 1.0))
        assert "\n" not in str(excinfo.value)


def test_ct_mask_names_the_series_and_follows_the_direction(tmp_path):
    uid = make_uid(7)
    spacing_xyz, origin = (0.7, 0.8, 1.25), (10.0, -20.0, 300.0)
    flipped = np.diag([-1.0, 1.0, -1.0])
    shape, center_irc = (24, 40, 40), (11.0, 18.0, 23.0)
    true = ball(shape, center_irc, 4.0, spacing_xyz[::-1])
    write_ct(
        tmp_path,
        uid,
        paint(volume(shape), true, SOLID_HU),
        spacing_xyz=spacing_xyz,
        origin_xyz=origin,
        direction=flipped,
    )
    ct = Ct(uid, tmp_path)
    image = sitk.ReadImage(str(tmp_path / "subset0" / f"{uid}.mhd"))
    center_xyz = image.TransformContinuousIndexToPhysicalPoint(center_irc[::-1])
    assert dice(ct_mask(ct, np.array([center_xyz]), np.array([8.0])), true) >= 0.95
    with pytest.raises(DataFormatError, match=rf"^{uid}: nodule 0 .*outside") as excinfo:
        ct_mask(ct, np.array([[center_xyz[0] + 500.0, center_xyz[1], center_xyz[2]]]), np.array([8.0]))
    assert "\n" not in str(excinfo.value)


def test_deterministic_and_leaves_its_input_alone():
    shape, spacing = (20, 40, 40), (1.5, 0.7, 0.7)
    centers = np.array([[10.2, 19.7, 20.4], [5.0, 8.0, 30.0]])
    hu = paint(volume(shape, noise_hu=35.0, seed=3), ball(shape, centers[0], 4.0, spacing), SOLID_HU)
    before = hu.copy()
    first = nodule_masks(hu, centers, np.array([8.0, 3.5]), spacing)
    np.testing.assert_array_equal(first, nodule_masks(hu.copy(), centers.copy(), np.array([8.0, 3.5]), spacing))
    np.testing.assert_array_equal(hu, before)


def test_settings_are_checked_and_versioned():
    assert MaskRule().as_dict()["mask_version"] == MASK_VERSION
    with pytest.raises(ConfigError, match=r"mask setting level=1\.5"):
        build_mask(volume((4, 8, 8)), [[2.0, 4.0, 4.0]], [3.0], (1.0, 1.0, 1.0), level=1.5)
    with pytest.raises(TypeError):
        build_mask(volume((4, 8, 8)), [[2.0, 4.0, 4.0]], [3.0], (1.0, 1.0, 1.0), no_such_setting=1)
    # A fixed threshold: a nodule fainter than it falls back to the annotation's sphere.
    shape, spacing, center = (16, 32, 32), (1.0, 1.0, 1.0), (8.0, 16.0, 16.0)
    hu = paint(volume(shape), ball(shape, center, 4.0, spacing), -650)
    fixed = build_mask(hu, np.array([center]), np.array([6.0]), spacing, threshold_hu=-600)
    np.testing.assert_array_equal(fixed, ball(shape, center, 3.0, spacing))
