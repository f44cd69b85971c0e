"""p2ch.vis: centre slices, choosing false positives and missed nodules, and the PNG sheets."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from p2ch import vis
from p2ch.ct import Ct
from p2ch.metrics import match_predictions

from conftest import make_uid, write_ct

SPACING_XYZ = (0.8, 0.7, 2.0)
ORIGIN_XYZ = (-100.0, -50.0, 300.0)
SHAPE_IRC = (30, 120, 110)


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def xyz_of(irc) -> tuple[float, float, float]:
    i, r, c = irc
    return (ORIGIN_XYZ[0] + c * SPACING_XYZ[0], ORIGIN_XYZ[1] + r * SPACING_XYZ[1], ORIGIN_XYZ[2] + i * SPACING_XYZ[2])


@pytest.fixture(scope="module")
def noise_ct(tmp_path_factory):
    """One CT of random HU in [-1000, 1000] (so every crop can be compared voxel by voxel)."""
    root = tmp_path_factory.mktemp("vis") / "luna"
    hu = np.random.default_rng(3).integers(-1000, 1001, size=SHAPE_IRC, dtype=np.int16)
    uid = make_uid(7)
    write_ct(root, uid, hu, spacing_xyz=SPACING_XYZ, origin_xyz=ORIGIN_XYZ)
    return {"root": root, "uid": uid, "hu": hu, "ct": Ct(uid, root)}


def test_orthogonal_slices_inside(noise_ct):
    hu = noise_ct["hu"]
    i, r, c = 15, 60, 50
    slices = vis.orthogonal_slices(noise_ct["ct"], xyz_of((i, r, c)), context_mm=20.0)
    hi, hr, hc = math.ceil(10 / 2.0), math.ceil(10 / 0.7), math.ceil(10 / 0.8)  # half widths in voxels
    assert slices.center_irc == (i, r, c)
    np.testing.assert_array_equal(slices.axial, hu[i, r - hr : r + hr + 1, c - hc : c + hc + 1])
    np.testing.assert_array_equal(slices.coronal, hu[i - hi : i + hi + 1, r, c - hc : c + hc + 1])
    np.testing.assert_array_equal(slices.sagittal, hu[i - hi : i + hi + 1, r - hr : r + hr + 1, c])
    assert slices.spacing_mm == {"axial": (0.7, 0.8), "coronal": (2.0, 0.8), "sagittal": (2.0, 0.7)}
    # Every view spans (about) the same 20 mm in both directions.
    for view in ("axial", "coronal", "sagittal"):
        image, (dy, dx) = getattr(slices, view), slices.spacing_mm[view]
        assert 20.0 <= image.shape[0] * dy <= 20.0 + 3 * dy + 1e-9
        assert 20.0 <= image.shape[1] * dx <= 20.0 + 3 * dx + 1e-9


def test_orthogonal_slices_at_the_edge_and_outside(noise_ct):
    hu = noise_ct["hu"]
    slices = vis.orthogonal_slices(noise_ct["ct"], xyz_of((0, 2, 109)), context_mm=20.0)
    hr, hc = math.ceil(10 / 0.7), math.ceil(10 / 0.8)
    axial = slices.axial
    assert axial.shape == (2 * hr + 1, 2 * hc + 1)
    # rows 2 - hr .. -1 and columns past 109 are beyond the volume
    np.testing.assert_array_equal(axial[hr - 2 :, : hc + 1], hu[0, 0 : hr + 3, 109 - hc : 110])
    assert (axial[: hr - 2] == vis.OUTSIDE_HU).all() and (axial[:, hc + 1 :] == vis.OUTSIDE_HU).all()
    assert (slices.coronal[:5] == vis.OUTSIDE_HU).all()  # below slice 0
    far = vis.orthogonal_slices(noise_ct["ct"], xyz_of((-40, 60, 50)), context_mm=20.0)
    assert (far.axial == vis.OUTSIDE_HU).all()


def test_lung_window():
    got = vis.lung_window(np.array([-1000, -300, 400, 1000, -3024], dtype=np.int16))
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 1.0, 0.0])
    assert got.dtype == np.float32


def test_short_uid():
    assert vis.short_uid("1.2.3") == "1.2.3"
    uid = make_uid(123)
    assert vis.short_uid(uid) == "…" + uid[-14:] and len(vis.short_uid(uid)) == 15


def _tables(uid_a: str, uid_b: str):
    annotations = pd.DataFrame(
        {
            "seriesuid": [uid_a, uid_a, uid_b],
            "coordX": [0.0, 50.0, 0.0],
            "coordY": [0.0, 0.0, 0.0],
            "coordZ": [0.0, 0.0, 0.0],
            "diameter_mm": [10.0, 6.0, 8.0],
        }
    )
    excluded = pd.DataFrame(
        {"seriesuid": [uid_b], "coordX": [30.0], "coordY": [0.0], "coordZ": [0.0], "diameter_mm": [-1.0]}
    )
    predictions = pd.DataFrame(
        {
            "seriesuid": [uid_a, uid_a, uid_a, uid_b, uid_b, uid_b, uid_a],
            "coordX": [1.0, -2.0, 20.0, 31.0, 60.0, 0.5, 80.0],
            "coordY": [0.0] * 7,
            "coordZ": [0.0] * 7,
            #           hit A0  hit A0 FP    excl.  FP   hit B0 FP
            "probability": [0.9, 0.95, 0.7, 0.99, 0.7, 0.2, 0.4],
        }
    )
    return predictions, annotations, excluded


def test_select_false_positives_and_missed_nodules():
    uid_a, uid_b = make_uid(1), make_uid(2)
    predictions, annotations, excluded = _tables(uid_a, uid_b)
    match = match_predictions(predictions, annotations, excluded)
    fps = vis.select_false_positives(predictions, match, 10)
    # The excluded finding (0.99) and the hits are not false positives; equal scores keep their order.
    assert [(f.series_uid, f.center_xyz[0], f.probability) for f in fps] == [
        (uid_a, 20.0, 0.7),
        (uid_b, 60.0, 0.7),
        (uid_a, 80.0, 0.4),
    ]
    assert [f.rank for f in fps] == [1, 2, 3] and all(f.kind == vis.FALSE_POSITIVE for f in fps)
    assert len(vis.select_false_positives(predictions, match, 2)) == 2
    # A0 best 0.95 (found), A1 never hit, B0 best 0.2: missed at 0.5 are A1 (no hit) then B0.
    np.testing.assert_array_equal(vis.missed_nodule_rows(match, 0.5), [1, 2])
    np.testing.assert_array_equal(vis.missed_nodule_rows(match, 0.95), [1, 2, 0])  # p > threshold is found
    missed = vis.select_missed_nodules(annotations, match, 0.5, 5)
    assert [(f.series_uid, f.diameter_mm) for f in missed] == [(uid_a, 6.0), (uid_b, 8.0)]
    assert math.isnan(missed[0].probability) and missed[1].probability == pytest.approx(0.2)
    assert "no candidate" in missed[0].label(2) and "0.200" in missed[1].label(2)


def test_write_pictures_sheets(tiny_root, tmp_path):
    uid_a, uid_b = make_uid(1), make_uid(2)
    ct_a, ct_b = Ct(uid_a, tiny_root), Ct(uid_b, tiny_root)

    def world(ct, irc):
        return tuple(float(o + v * s) for o, v, s in zip(ct.origin_xyz, irc[::-1], ct.voxel_size_xyz, strict=True))

    annotations = pd.DataFrame(
        [(uid_a, *world(ct_a, (20, 30, 34)), 10.0), (uid_a, *world(ct_a, (10, 10, 50)), 5.0)],
        columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
    )
    rows = []
    for k in range(6):  # false positives in both CTs, distinct scores
        ct, uid = (ct_a, uid_a) if k % 2 else (ct_b, uid_b)
        rows.append((uid, *world(ct, (5 + k, 40, 20 + k)), 0.9 - 0.1 * k))
    rows.append((uid_a, *world(ct_a, (20, 30, 35)), 0.8))  # hits the 10 mm nodule: found at 0.5
    predictions = pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"])
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "false_positives_09.png").write_bytes(b"stale")
    result = vis.write_pictures(predictions, annotations, None, tiny_root, out, count=5, threshold=0.5)
    assert result.false_positives == 5 and result.missed_nodules == 1 == result.missed_nodules_total
    assert [p.name for p in result.false_positive_sheets] == ["false_positives_01.png", "false_positives_02.png"]
    assert [p.name for p in result.missed_nodule_sheets] == ["missed_nodules_01.png"]
    assert sorted(p.name for p in out.glob("*.png")) == [
        "false_positives_01.png",
        "false_positives_02.png",
        "missed_nodules_01.png",
    ]
    for path in out.glob("*.png"):
        assert png_size(path) == vis.sheet_size_px() == (750, 1180)
    index = pd.read_csv(out / "index.csv", dtype={"seriesuid": str})
    assert list(index["kind"]) == ["false_positive"] * 5 + ["missed_nodule"]
    assert list(index["row"]) == [1, 2, 3, 4, 1, 1]
    np.testing.assert_allclose(index["probability"].iloc[:5], [0.9, 0.8, 0.7, 0.6, 0.5])
    assert index["diameter_mm"].iloc[5] == 5.0

    # A second run with fewer pictures leaves no sheets of the first behind.
    result = vis.write_pictures(predictions, annotations, None, tiny_root, out, count=2, threshold=0.5)
    assert sorted(p.name for p in out.glob("*.png")) == ["false_positives_01.png", "missed_nodules_01.png"]
    assert len(pd.read_csv(out / "index.csv")) == 3


def test_no_findings_write_no_sheets(tiny_root, tmp_path):
    uid_a = make_uid(1)
    empty = pd.DataFrame(columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
    predictions = pd.DataFrame(
        {"seriesuid": [uid_a], "coordX": [0.0], "coordY": [0.0], "coordZ": [0.0], "probability": [0.3]}
    )
    result = vis.write_pictures(predictions, empty, None, tiny_root, tmp_path / "p", count=0)
    assert result.false_positive_sheets == [] and result.missed_nodule_sheets == []
    assert list((tmp_path / "p").glob("*.png")) == [] and len(pd.read_csv(result.index)) == 0
