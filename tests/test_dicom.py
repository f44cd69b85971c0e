"""Reading a CT from a DICOM folder: series written slice by slice with SimpleITK into tmp_path."""

from __future__ import annotations

import locale
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from p2ch.ct import HU_MAX, HU_MIN
from p2ch.ct import load_dicom as read_dicom_series
from p2ch.dicom import RESAMPLED_KEY, TILT_KEY, DicomSeries, list_dicom_series, volume_series
from p2ch.errors import DataFormatError, DataNotFoundError
from p2ch.geometry import irc2xyz, xyz2irc

SERIES_UID = "1.2.826.0.1.3680043.8.498.1001"
OTHER_UID = "1.2.826.0.1.3680043.8.498.1002"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def make_hu(shape=(6, 10, 12), seed=0) -> np.ndarray:
    """(I, R, C) int16 HU, with values beyond [-1000, 1000] so that clipping shows."""
    rng = np.random.default_rng(seed)
    return rng.integers(-3024, 3000, size=shape).astype(np.int16)


def rotation(axis, angle: float) -> np.ndarray:
    """(3, 3) proper rotation about `axis` by `angle` radians (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing_xyz=(0.7, 0.8, 1.25),
    origin_xyz=(-120.0, -95.5, -310.25),
    direction=None,
    series_uid: str = SERIES_UID,
    modality: str = "CT",
    description: str = "chest",
    names=None,
    index_z=None,
    intercept: str | None = "-1024",
    drift_xyz=None,
) -> sitk.Image:
    """Write hu (I, R, C) int16 HU as one DICOM file per slice; returns the source image.

    names: file name per slice (default `slice_<k>.dcm`). index_z: the (continuous) slice index
    each file's ImagePositionPatient is computed at (default k): to make gaps uneven or missing.
    intercept None writes no rescale tags at all. drift_xyz: mm added to the position per slice
    index (a gantry tilt when it is not along the slice normal).
    """
    folder.mkdir(parents=True, exist_ok=True)
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer sets the C locale (ASCII text I/O after it)
    try:
        return _write_slices(folder, hu, spacing_xyz, origin_xyz, direction, series_uid, modality, description,
                             names, index_z, intercept, drift_xyz)  # fmt: skip
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def _write_slices(folder, hu, spacing_xyz, origin_xyz, direction, series_uid, modality, description, names, index_z,
                  intercept, drift_xyz=None) -> sitk.Image:  # fmt: skip
    image = sitk.GetImageFromArray(np.asarray(hu, dtype=np.int16))
    image.SetSpacing(tuple(float(v) for v in spacing_xyz))
    image.SetOrigin(tuple(float(v) for v in origin_xyz))
    if direction is not None:
        image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        z = k if index_z is None else index_z[k]
        position = image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, float(z)))
        if drift_xyz is not None:
            position = np.add(position, np.multiply(z, drift_xyz))
        tags = {
            "0008|0060": modality,
            "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
            "0008|103e": description,
            "0020|000e": series_uid,
            "0020|000d": STUDY_UID,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0028|0030": f"{spacing_xyz[1]}\\{spacing_xyz[0]}",
        }
        if intercept is not None:
            tags.update({"0028|1052": intercept, "0028|1053": "1"})
        piece = image[:, :, k]
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        path = folder / (f"slice_{k:03d}.dcm" if names is None else names[k])
        writer.SetFileName(str(path))
        writer.Execute(piece)
        if intercept is None:
            _drop_elements(path, [(0x0028, 0x1052), (0x0028, 0x1053), (0x0028, 0x1054)])
    return image


def _drop_elements(path: Path, tags) -> None:
    # GDCM adds default rescale tags to every CT it writes; a file without them needs surgery.
    # The data set after the file meta group is implicit VR little endian: tag, 4-byte length, value.
    data = path.read_bytes()
    for group, element in tags:
        at = data.find(struct.pack("<HH", group, element))
        if at >= 0:
            (length,) = struct.unpack("<I", data[at + 4 : at + 8])
            data = data[:at] + data[at + 8 + length :]
    path.write_bytes(data)


def assert_same_geometry(ct, image: sitk.Image) -> None:
    np.testing.assert_allclose(ct.origin_xyz, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ct.voxel_size_xyz, image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(ct.direction.ravel(), image.GetDirection(), atol=1e-4)


def test_round_trip_hu_and_geometry(tmp_path):
    hu = make_hu()
    image = write_dicom_series(tmp_path / "scan", hu)
    ct = read_dicom_series(tmp_path / "scan")
    assert ct.series_uid == SERIES_UID
    assert ct.source == ct.mhd_path == tmp_path / "scan"
    assert ct.hu.dtype == np.int16 and ct.hu.shape == hu.shape
    np.testing.assert_array_equal(ct.hu, np.clip(hu, HU_MIN, HU_MAX))
    assert_same_geometry(ct, image)


def test_round_trip_oblique_orientation(tmp_path):
    hu = make_hu((5, 8, 9), seed=1)
    direction = rotation((1.0, 2.0, 3.0), 0.4)
    image = write_dicom_series(tmp_path / "scan", hu, spacing_xyz=(0.6, 0.9, 2.5), direction=direction)
    ct = read_dicom_series(tmp_path / "scan")
    np.testing.assert_array_equal(ct.hu, np.clip(hu, HU_MIN, HU_MAX))
    assert_same_geometry(ct, image)
    point = image.TransformIndexToPhysicalPoint((7, 3, 2))
    assert ct.xyz2irc(point) == (2, 3, 7)


def test_order_comes_from_positions_and_other_files_are_ignored(tmp_path):
    hu = make_hu((7, 6, 5), seed=2)
    folder = tmp_path / "scan"
    names = [f"img{n}.dcm" for n in (5, 2, 6, 0, 3, 1, 4)]  # name order is not slice order
    image = write_dicom_series(folder, hu, names=names)
    (folder / "README.txt").write_text("exported by the scanner\n")
    (folder / "thumbnail.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "sub").mkdir()
    ct = read_dicom_series(folder)
    np.testing.assert_array_equal(ct.hu, np.clip(hu, HU_MIN, HU_MAX))
    assert_same_geometry(ct, image)


def test_list_series(tmp_path):
    write_dicom_series(tmp_path, make_hu((3, 4, 4)), description="lung kernel")
    write_dicom_series(tmp_path, make_hu((4, 4, 4)), series_uid=OTHER_UID, names=[f"b{k}.dcm" for k in range(4)])
    found = sorted(list_dicom_series(tmp_path), key=lambda s: s.series_uid)
    assert [s.series_uid for s in found] == [SERIES_UID, OTHER_UID]
    assert isinstance(found[0], DicomSeries)
    assert found[0].files == tuple(tmp_path / f"slice_{k:03d}.dcm" for k in range(3))
    assert (found[0].description, found[0].modality, len(found[1].files)) == ("lung kernel", "CT", 4)


def test_two_series_need_a_choice(tmp_path):
    hu_a, hu_b = make_hu((3, 4, 5), seed=3), make_hu((4, 4, 5), seed=4)
    write_dicom_series(tmp_path, hu_a, description="soft")
    write_dicom_series(tmp_path, hu_b, series_uid=OTHER_UID, description="sharp", names=[f"b{k}.dcm" for k in range(4)])
    with pytest.raises(DataFormatError, match=r"holds 2 DICOM series; pass --dicom-series UID") as info:
        read_dicom_series(tmp_path)
    message = str(info.value)
    assert f"{SERIES_UID} (3 slices, 'soft')" in message and f"{OTHER_UID} (4 slices, 'sharp')" in message
    assert str(tmp_path) in message and "\n" not in message
    np.testing.assert_array_equal(read_dicom_series(tmp_path, OTHER_UID).hu, np.clip(hu_b, HU_MIN, HU_MAX))
    assert read_dicom_series(tmp_path, SERIES_UID).series_uid == SERIES_UID
    with pytest.raises(DataNotFoundError, match=rf"no DICOM series 1\.2\.3; the series there: .*{OTHER_UID}"):
        read_dicom_series(tmp_path, "1.2.3")


def test_missing_slice(tmp_path):
    write_dicom_series(tmp_path, make_hu((6, 4, 4)))
    (tmp_path / "slice_003.dcm").unlink()
    with pytest.raises(
        DataFormatError, match=r"1 slice\(s\) missing: a gap of 2\.500 mm .*\(slice_002\.dcm and slice_004\.dcm\)"
    ):
        read_dicom_series(tmp_path)


def test_uneven_spacing_and_duplicates(tmp_path):
    write_dicom_series(tmp_path / "uneven", make_hu((6, 4, 4)), index_z=[0, 1, 2, 3.4, 4, 5])
    with pytest.raises(
        DataFormatError, match=r"uneven slice spacing: a gap of 1\.750 mm .*slice_002\.dcm and slice_003"
    ):
        read_dicom_series(tmp_path / "uneven")
    write_dicom_series(tmp_path / "dup", make_hu((5, 4, 4)), index_z=[0, 1, 2, 2, 3])
    with pytest.raises(DataFormatError, match=r"two slices at the same position .*slice_002\.dcm and slice_003"):
        read_dicom_series(tmp_path / "dup")


def test_spacing_within_tolerance_is_accepted(tmp_path):
    # Positions rounded by a scanner differ by far less than 1 % of the spacing (0.0125 mm here).
    hu = make_hu((5, 4, 4), seed=5)
    write_dicom_series(tmp_path, hu, index_z=[0, 1.004, 2, 2.996, 4])
    np.testing.assert_array_equal(read_dicom_series(tmp_path).hu, np.clip(hu, HU_MIN, HU_MAX))


def test_not_ct_modality(tmp_path):
    write_dicom_series(tmp_path, make_hu((3, 4, 4)), modality="MR")
    with pytest.raises(DataFormatError, match=r"modality 'MR', not 'CT'"):
        read_dicom_series(tmp_path)


def test_no_rescale_tags(tmp_path):
    write_dicom_series(tmp_path, make_hu((3, 4, 4)), intercept=None)
    assert len(list_dicom_series(tmp_path)[0].files) == 3  # still DICOM, only the tags are gone
    with pytest.raises(DataFormatError, match=r"no HU rescale \(RescaleSlope/RescaleIntercept"):
        read_dicom_series(tmp_path)


def test_empty_missing_and_single_slice_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataNotFoundError, match=r"empty: no DICOM series found"):
        read_dicom_series(tmp_path / "empty")
    assert list_dicom_series(tmp_path / "empty") == []
    with pytest.raises(DataNotFoundError, match=r"nowhere: no such folder"):
        read_dicom_series(tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match=r"notes\.txt: not a folder"):
        read_dicom_series(tmp_path / "empty" / "notes.txt")
    write_dicom_series(tmp_path / "one", make_hu((1, 4, 4)))
    with pytest.raises(DataFormatError, match=r"one: the series has 1 slice; a CT needs at least 2"):
        read_dicom_series(tmp_path / "one")


def test_slice_references_follow_the_ct_order_not_the_file_order(tmp_path):
    """Written with z pointing down (as many scanners store a head-first series): the CT's slice 0 is the last
    file written, and InstanceNumber runs opposite to the CT's index."""
    hu = make_hu((5, 4, 6), seed=7)
    names = [f"img{n}.dcm" for n in (3, 0, 4, 1, 2)]
    write_dicom_series(tmp_path, hu, direction=np.diag([1.0, 1.0, -1.0]), names=names)
    ct = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(ct.hu, np.clip(hu[::-1], HU_MIN, HU_MAX))
    refs = ct.dicom_slices
    assert refs.instance_numbers == (5, 4, 3, 2, 1)
    assert refs.file_names == tuple(reversed(names))
    for name, sop_uid in zip(refs.file_names, refs.sop_instance_uids, strict=True):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(tmp_path / name))
        reader.ReadImageInformation()
        assert sop_uid == reader.GetMetaData("0008|0018").strip(" \0") and sop_uid
    assert len(set(refs.sop_instance_uids)) == 5


def test_volume_series_sets_aside_what_is_not_a_ct_volume(tmp_path):
    write_dicom_series(tmp_path, make_hu((3, 4, 4)), description="lung")
    write_dicom_series(
        tmp_path, make_hu((3, 4, 4)), series_uid=OTHER_UID, modality="MR", names=["m0.dcm", "m1.dcm", "m2.dcm"]
    )
    write_dicom_series(tmp_path, make_hu((1, 4, 4)), series_uid=OTHER_UID + "1", names=["scout.dcm"])
    volumes, others = volume_series(tmp_path)
    assert [s.series_uid for s in volumes] == [SERIES_UID]
    reasons = {s.series_uid: why for s, why in others}
    assert reasons == {OTHER_UID: "modality 'MR', not 'CT'", OTHER_UID + "1": "1 image, not a volume"}


# --- gantry tilt: resampled onto an orthogonal grid, every pixel where its file puts it -------------


def file_geometry(folder: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]]:
    """Per file (in name order): ImagePositionPatient, row and column directions, (Δx, Δy) mm, from its header."""
    found = []
    for path in sorted(folder.glob("*.dcm")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        orientation = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
        dy, dx = (float(v) for v in reader.GetMetaData("0028|0030").split("\\"))  # PixelSpacing: row, column
        found.append((position, orientation[:3], orientation[3:], (dx, dy)))
    return found


def file_points(geometry, rows: int, cols: int) -> np.ndarray:
    """(rows * cols, 3) mm: where one file puts each of its pixels (row-major)."""
    position, row_dir, col_dir, (dx, dy) = geometry
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return position + (c.reshape(-1, 1) * dx) * row_dir + (r.reshape(-1, 1) * dy) * col_dir


def test_gantry_tilt_is_resampled_so_every_pixel_stays_where_its_file_puts_it(tmp_path):
    hu = make_hu((6, 10, 12), seed=6)
    write_dicom_series(tmp_path, hu, drift_xyz=(0.0, 0.8, 0.0))  # each slice 0.8 mm (one row) further along y
    ct = read_dicom_series(tmp_path)
    assert ct.hu.shape == (6, 15, 12)  # grown by the 5 rows of drift, so that every slice is whole
    r, c = np.meshgrid(np.arange(10), np.arange(12), indexing="ij")
    for k, geometry in enumerate(file_geometry(tmp_path)):
        irc = xyz2irc(file_points(geometry, 10, 12), ct.origin_xyz, ct.voxel_size_xyz, ct.direction, rounded=False)
        expected = np.stack([np.full(r.size, k), r.ravel() + k, c.ravel()], axis=1)
        np.testing.assert_allclose(irc, expected, atol=1e-4)  # exactly on the grid: the values are the file's own
        np.testing.assert_array_equal(ct.hu[k, k : k + 10], np.clip(hu[k], HU_MIN, HU_MAX))
        assert (ct.hu[k, :k] == HU_MIN).all() and (ct.hu[k, k + 10 :] == HU_MIN).all()  # no slice reaches: air
    angle = math.degrees(math.atan2(5 * 0.8, 5 * 1.25))
    assert (
        float(ct.provenance[TILT_KEY]) == pytest.approx(angle, abs=1e-3) and "shifted" in ct.provenance[RESAMPLED_KEY]
    )
    np.testing.assert_allclose(ct.direction, np.eye(3), atol=1e-6)  # orthonormal, as every Ct


def test_sheared_oblique_series_is_interpolated_at_the_files_positions(tmp_path):
    """A fractional drift along both in-plane axes of an oblique series: a linear ramp is interpolated exactly."""
    i, r, c = np.meshgrid(np.arange(5), np.arange(9), np.arange(11), indexing="ij")
    hu = (100 * i + 20 * r + 7 * c - 500).astype(np.int16)
    direction = rotation((1.0, 2.0, 3.0), 0.4)
    spacing = (0.6, 0.9, 2.0)
    drift = direction @ np.array([0.3 * 0.6, -0.45 * 0.9, 0.0])  # 0.3 column and -0.45 row per slice
    write_dicom_series(tmp_path, hu, spacing_xyz=spacing, direction=direction, drift_xyz=drift)
    ct = read_dicom_series(tmp_path)
    assert ct.hu.shape == (5, 9 + 2, 11 + 2) and float(ct.provenance[TILT_KEY]) > 5.0
    out_irc = np.argwhere(np.ones(ct.hu.shape, dtype=bool))
    world = irc2xyz(out_irc, ct.origin_xyz, ct.voxel_size_xyz, ct.direction)
    checked = 0
    for k, (position, row_dir, col_dir, (dx, dy)) in enumerate(file_geometry(tmp_path)):
        mine = out_irc[:, 0] == k
        offset = world[mine] - position
        np.testing.assert_allclose(offset @ np.cross(row_dir, col_dir), 0.0, atol=1e-4)  # in file k's plane
        c_f, r_f = offset @ row_dir / dx, offset @ col_dir / dy  # where in file k, continuous pixels
        inside = (r_f > -1e-6) & (r_f < 8 + 1e-6) & (c_f > -1e-6) & (c_f < 10 + 1e-6)
        expected = np.rint(100 * k + 20 * r_f + 7 * c_f - 500)[inside]
        got = ct.hu[tuple(out_irc[mine][inside].T)]
        np.testing.assert_allclose(got, expected, atol=1)  # linear interpolation of a linear ramp
        checked += int(inside.sum())
    assert checked >= 5 * 8 * 10  # about every pixel of every file


def test_positions_that_drift_less_than_a_twentieth_pixel_are_read_as_they_are(tmp_path):
    hu = make_hu((6, 8, 8), seed=7)
    image = write_dicom_series(tmp_path, hu, drift_xyz=(0.0, 0.005, 0.0))  # 0.025 mm over the series
    ct = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(ct.hu, np.clip(hu, HU_MIN, HU_MAX))
    assert_same_geometry(ct, image)
    assert ct.provenance == {}


# --- damaged files: named, not mistaken for a missing slice ------------------------------------------


def test_a_truncated_slice_is_named_as_damaged(tmp_path):
    write_dicom_series(tmp_path, make_hu((6, 16, 16), seed=8))
    path = tmp_path / "slice_003.dcm"
    path.write_bytes(path.read_bytes()[:-100])  # cut inside the pixel data
    with pytest.raises(DataFormatError) as info:
        read_dicom_series(tmp_path)
    message = str(info.value)
    assert f"{tmp_path}: slice_003.dcm is not a readable DICOM file ({path.stat().st_size:,} bytes" in message
    assert f"a slice of series {SERIES_UID}" in message and "missing" not in message
    path.write_bytes(path.read_bytes()[:100])  # the series uid is gone too: it may still be one of ours
    with pytest.raises(DataFormatError, match=r"slice_003\.dcm is not a readable .* maybe a slice of series"):
        read_dicom_series(tmp_path)


def test_a_damaged_file_of_another_series_is_skipped(tmp_path):
    hu = make_hu((4, 8, 8), seed=9)
    write_dicom_series(tmp_path, hu)
    write_dicom_series(tmp_path, make_hu((3, 8, 8)), series_uid=OTHER_UID, names=[f"b{k}.dcm" for k in range(3)])
    other = tmp_path / "b1.dcm"
    other.write_bytes(other.read_bytes()[:-50])
    np.testing.assert_array_equal(read_dicom_series(tmp_path, SERIES_UID).hu, np.clip(hu, HU_MIN, HU_MAX))
