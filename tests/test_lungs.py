"""p2ch.lungs: the lungs of a CT, where the detector looks."""

from __future__ import annotations

import numpy as np
import pytest

from p2ch.errors import DataFormatError
from p2ch.lungs import (
    SURFACE_MAX_ELONGATION,
    SURFACE_MIN_HU,
    SURFACE_MIN_RADIUS_MM,
    _block_means,
    coarse_factors,
    coarse_sample,
    lung_mask,
    surface_bumps,
)

from conftest import WALL_PHANTOM_SPACING_XYZ, chest_phantom, wall_nodule_phantom

SPACING_XYZ = (1.0, 1.0, 2.0)


@pytest.fixture(scope="module")
def phantom():
    hu, landmarks = chest_phantom(spacing_xyz=SPACING_XYZ)
    return hu, landmarks, lung_mask(hu, SPACING_XYZ)


def test_the_lungs_are_found_and_measured(phantom):
    hu, _, lungs = phantom
    assert lungs.found
    inside_body_air = (hu == -850).sum() * np.prod(SPACING_XYZ) / 1000.0
    # the nodules inside are filled in, the closing smooths: the volume is the lungs' within 15 %
    assert lungs.volume_ml == pytest.approx(inside_body_air, rel=0.15)


def test_nodules_touching_the_lungs_are_in_them_and_the_mediastinum_is_not(phantom):
    _, landmarks, lungs = phantom
    points = np.array([landmarks["juxtapleural"], landmarks["inner"], landmarks["mediastinum"]])
    assert lungs.contains(points).tolist() == [True, True, False]
    # the juxtapleural nodule's centre lies outside the air: only "near the lungs" takes it in
    assert not lungs.contains(points[:1], distance_mm=0.0)[0]


def test_the_box_holds_the_lungs_with_a_margin_and_slice_boxes_follow_them(phantom):
    hu, _, lungs = phantom
    index, rows, cols = lungs.box(margin_mm=0.0)
    lung_voxels = np.argwhere(hu == -850)
    low, high = lung_voxels.min(axis=0), lung_voxels.max(axis=0)
    for axis, part in enumerate((index, rows, cols)):
        assert part.start <= low[axis] and part.stop > high[axis]
    wider = lungs.box(margin_mm=10.0)
    assert wider[2].start == max(cols.start - 10, 0) and wider[2].stop == min(cols.stop + 10, hu.shape[2])
    assert wider[0].start == max(index.start - 5, 0) and wider[0].stop == min(index.stop + 5, hu.shape[0])
    boxes = lungs.slice_boxes(margin_mm=0.0)
    assert boxes.shape == (hu.shape[0], 4)
    empty = (boxes[:, 1] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 2])
    assert empty[0] and empty[-1]  # slices far from the lungs are not segmented
    for k in np.flatnonzero(~empty):
        on_slice = np.argwhere(hu[k] == -850)
        if len(on_slice):
            assert boxes[k, 0] <= on_slice[:, 0].min() and boxes[k, 1] > on_slice[:, 0].max()
            assert boxes[k, 2] <= on_slice[:, 1].min() and boxes[k, 3] > on_slice[:, 1].max()


def test_a_ct_without_lungs_is_searched_whole():
    hu, landmarks = chest_phantom(spacing_xyz=SPACING_XYZ, with_lungs=False)
    lungs = lung_mask(hu, SPACING_XYZ)
    assert not lungs.found and lungs.volume_ml == 0.0
    assert [(s.start, s.stop) for s in lungs.box()] == [(0, n) for n in hu.shape]
    assert (lungs.slice_boxes() == [0, hu.shape[1], 0, hu.shape[2]]).all()
    assert lungs.contains(np.array([landmarks["mediastinum"]])).all()


def test_outside_air_and_small_pockets_are_not_lungs():
    hu, _ = chest_phantom(spacing_xyz=SPACING_XYZ, with_lungs=False)
    hu[18:22, 40:44, 60:64] = -1000  # a 4 × 4 × 8 mm gas pocket inside the body: 0.13 ml
    assert not lung_mask(hu, SPACING_XYZ).found


def test_coarse_grid_and_sampling():
    assert coarse_factors((0.7, 0.7, 2.5)) == (1, 4, 4)
    assert coarse_factors((3.5, 3.5, 5.0)) == (1, 1, 1)
    hu = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    sample = coarse_sample(hu, (2, 3, 3))
    assert sample.shape == (3, 2, 3)
    assert sample[0, 0, 0] == hu[1, 1, 1] and sample[-1, -1, -1] == hu[4, 4, 6]  # the last block clipped


def test_bad_input_is_refused():
    with pytest.raises(DataFormatError, match="expected an"):
        lung_mask(np.zeros((4, 4)), SPACING_XYZ)


def _distance_mm(irc, point, spacing_xyz=WALL_PHANTOM_SPACING_XYZ) -> float:
    return float(np.linalg.norm((np.asarray(irc, dtype=float) - np.asarray(point)) * np.array(spacing_xyz[::-1])))


def test_a_nodule_on_the_chest_wall_is_a_surface_bump_and_the_ones_inside_or_in_the_wall_are_not():
    hu, _, centre = wall_nodule_phantom()
    bumps = surface_bumps(hu, lung_mask(hu, WALL_PHANTOM_SPACING_XYZ))
    # one bump, the 8 mm nodule's (LUNA16's hit rule: its centre within the radius); not the nodule inside the
    # lung (it is lung, filled), nor the 6 mm one that lies almost wholly in the wall (it bulges < 2 mm)
    assert len(bumps) == 1
    assert _distance_mm(bumps.center_irc[0], centre) <= 2.0
    assert bumps.radius_mm[0] >= SURFACE_MIN_RADIUS_MM and bumps.mean_hu[0] > SURFACE_MIN_HU
    assert bumps.elongation[0] <= SURFACE_MAX_ELONGATION
    voxels = bumps.voxels_irc[0]
    assert voxels.shape[1] == 3 and np.allclose(voxels.mean(axis=0), bumps.center_irc[0])
    assert (hu[tuple(voxels.T)] == 50).mean() > 0.5  # the nodule's voxels, not the air beside it


def test_smooth_lungs_have_no_bumps_and_a_vessel_leaving_the_wall_is_not_one():
    hu, landmarks = chest_phantom(spacing_xyz=WALL_PHANTOM_SPACING_XYZ, with_nodules=False)
    assert len(surface_bumps(hu, lung_mask(hu, WALL_PHANTOM_SPACING_XYZ))) == 0
    # a vessel, 6 mm thick, running about 22 mm from the right lung's outer wall into it
    i, r, c = landmarks["juxtapleural"]
    vessel = hu.copy()
    vessel[i - 1 : i + 2, r - 13 : r - 7, c - 2 : c + 18] = 50
    lungs = lung_mask(vessel, WALL_PHANTOM_SPACING_XYZ)
    assert len(surface_bumps(vessel, lungs)) == 0  # 3.3 times as long as wide, and longer than the ball across
    # the same vessel with a nodule's cap on the wall beside it: the nodule is found, the vessel still not
    _, _, centre = wall_nodule_phantom()
    with_nodule = vessel.copy()
    with_nodule[:, :, 64:] = wall_nodule_phantom()[0][:, :, 64:]  # the left lung, with the 8 mm wall nodule
    bumps = surface_bumps(with_nodule, lung_mask(with_nodule, WALL_PHANTOM_SPACING_XYZ))
    assert len(bumps) == 1 and _distance_mm(bumps.center_irc[0], centre) <= 2.0


def test_a_sheet_of_tissue_between_the_lungs_is_not_a_bump():
    hu, landmarks = chest_phantom(spacing_xyz=WALL_PHANTOM_SPACING_XYZ, with_nodules=False)
    # the lungs reach towards each other along 40 mm of slices, 6 mm apart: a sheet (a junction line), no bump
    i, r, c = landmarks["mediastinum"]
    sheet = hu.copy()
    sheet[i - 10 : i + 10, r - 4 : r + 4, c - 14 : c - 2] = -850
    sheet[i - 10 : i + 10, r - 4 : r + 4, c + 3 : c + 15] = -850
    assert len(surface_bumps(sheet, lung_mask(sheet, WALL_PHANTOM_SPACING_XYZ))) == 0


def test_surface_bumps_need_lungs_of_the_same_ct(phantom):
    hu, _, lungs = phantom
    body, _ = chest_phantom(spacing_xyz=SPACING_XYZ, with_lungs=False)
    assert len(surface_bumps(body, lung_mask(body, SPACING_XYZ))) == 0  # no lungs found: no bumps
    with pytest.raises(DataFormatError, match="LungMask of this"):
        surface_bumps(hu[:-1], lungs)
    with pytest.raises(DataFormatError, match="LungMask of this"):
        surface_bumps(hu, None)


def test_block_means_slab_by_slab_equal_the_whole_and_leave_partial_blocks_out():
    hu = np.random.default_rng(0).integers(-1000, 400, (37, 50, 61)).astype(np.int16)
    whole = hu[:36, :48, :60].astype(np.float64).reshape(18, 2, 16, 3, 20, 3).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(_block_means(hu, np.array([2, 3, 3]), slab=5), whole, atol=1e-3)
    assert _block_means(hu[:1], np.array([2, 3, 3])).shape == (0, 16, 20)  # one slice: no complete block
