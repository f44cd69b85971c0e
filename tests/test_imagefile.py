"""NIfTI and NRRD CTs: written with SimpleITK (headers patched byte by byte for the broken cases) into tmp_path."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_dicom import rotation

from p2ch.ct import HU_MAX, HU_MIN, load_ct_input, load_image_file
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import irc2xyz, xyz2irc
from p2ch.imagefile import image_stem, image_suffix, read_image_file

SPACING_XYZ = (0.7, 0.8, 1.25)
ORIGIN_XYZ = (-120.5, -95.25, -310.0)
# Offsets in a NIfTI-1 header (nifti1.h): pixdim[1], scl_slope/scl_inter, xyzt_units, qform/sform codes, srow_x.
PIXDIM1, SCL_SLOPE, XYZT_UNITS, QFORM_CODE, SFORM_CODE, SROW_X = 80, 112, 123, 252, 254, 280


def make_hu(shape=(6, 10, 12), seed=0) -> np.ndarray:
    """(I, R, C) int16 HU of a chest-like CT: air to bone, some values beyond [-1000, 1000]."""
    return np.random.default_rng(seed).integers(-1200, 1500, size=shape).astype(np.int16)


def write_image(
    path: Path, values: np.ndarray, *, spacing=SPACING_XYZ, origin=ORIGIN_XYZ, direction=None
) -> sitk.Image:
    """values (I, R, C) as one image file (the format from the suffix); returns the image written."""
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(tuple(np.asarray(direction, dtype=np.float64).ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def patched_nifti(path: Path, values: np.ndarray, patches: dict[int, tuple[str, tuple]]) -> Path:
    """An uncompressed .nii of `values` with header fields overwritten: {offset: (struct format, values)}."""
    write_image(path, values)
    data = bytearray(path.read_bytes())
    for offset, (fmt, fields) in patches.items():
        struct.pack_into(fmt, data, offset, *fields)
    path.write_bytes(bytes(data))
    return path


def nrrd_file(path: Path, values: np.ndarray, fields: list[str]) -> Path:
    """A raw little-endian short NRRD with the given header field lines."""
    size = " ".join(str(v) for v in values.shape[::-1])
    header = ["NRRD0004", "type: short", "dimension: 3", f"sizes: {size}", "endian: little", "encoding: raw", *fields]
    path.write_bytes(("\n".join(header) + "\n\n").encode("ascii") + values.astype("<i2").tobytes())
    return path


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.nrrd", "scan.nhdr"])
def test_round_trip_of_voxels_and_an_oblique_geometry(tmp_path, name):
    hu = make_hu()
    direction = rotation((1.0, 2.0, 3.0), 0.4)
    image = write_image(tmp_path / name, hu, direction=direction)
    ct = load_ct_input(str(tmp_path / name))
    np.testing.assert_array_equal(ct.hu, np.clip(hu, HU_MIN, HU_MAX))
    np.testing.assert_allclose(ct.origin_xyz, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ct.voxel_size_xyz, image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(ct.direction.ravel(), image.GetDirection(), atol=1e-6)
    reread = sitk.ReadImage(str(tmp_path / name))
    for point in ([-118.0, -90.0, -305.0], [-110.3, -88.8, -302.2]):
        expected_ijk = reread.TransformPhysicalPointToContinuousIndex(point)
        continuous = xyz2irc(point, ct.origin_xyz, ct.voxel_size_xyz, ct.direction, rounded=False)
        np.testing.assert_allclose(continuous, expected_ijk[::-1], atol=1e-4)
    assert ct.source == (tmp_path / name).resolve()


def test_nifti_stores_ras_and_mm_positions_survive_the_round_trip(tmp_path):
    """A bright voxel at a known LPS position: the file's sform (RAS) and p2ch's xyz both put it there."""
    hu = np.full((8, 9, 10), -900, dtype=np.int16)
    hu[5, 2, 7] = 900
    direction = rotation((0.3, -1.0, 0.5), 0.3)
    image = write_image(tmp_path / "blob.nii.gz", hu, direction=direction)
    blob_lps = np.array(image.TransformIndexToPhysicalPoint((7, 2, 5)))
    ct = load_image_file(tmp_path / "blob.nii.gz")
    assert ct.xyz2irc(blob_lps) == (5, 2, 7)
    np.testing.assert_allclose(irc2xyz((5, 2, 7), ct.origin_xyz, ct.voxel_size_xyz, ct.direction), blob_lps, atol=1e-4)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp_path / "blob.nii.gz"))
    reader.ReadImageInformation()
    sform = np.array([[float(v) for v in reader.GetMetaData(f"srow_{a}").split()] for a in "xyz"])
    blob_ras = sform @ np.array([7.0, 2.0, 5.0, 1.0])
    np.testing.assert_allclose(blob_ras, blob_lps * [-1.0, -1.0, 1.0], atol=1e-3)


def test_a_nifti_rescale_is_applied_and_unrescaled_values_are_named(tmp_path):
    stored = np.random.default_rng(1).integers(0, 4096, size=(5, 6, 7)).astype(np.uint16)
    stored[0, 0, :2] = (0, 4095)  # air and dense bone as a scanner stores them without the rescale
    scaled = patched_nifti(tmp_path / "scaled.nii", stored, {SCL_SLOPE: ("<ff", (1.0, -1024.0))})
    ct = load_image_file(scaled)
    np.testing.assert_array_equal(ct.hu, np.clip(stored.astype(np.int32) - 1024, HU_MIN, HU_MAX))
    write_image(tmp_path / "unsigned.nii.gz", stored)
    with pytest.raises(DataFormatError, match=r"16-bit unsigned integer .*likely unrescaled.*--hu-offset -1024"):
        load_image_file(tmp_path / "unsigned.nii.gz")
    write_image(tmp_path / "signed.nii.gz", stored.astype(np.int16))
    with pytest.raises(DataFormatError, match=r"voxel values 0\.\.4095 .*likely unrescaled.*--hu-offset -1024") as info:
        load_image_file(tmp_path / "signed.nii.gz")
    assert "\n" not in str(info.value)
    for name in ("unsigned.nii.gz", "signed.nii.gz"):
        ct = load_image_file(tmp_path / name, hu_offset=-1024)
        np.testing.assert_array_equal(ct.hu, np.clip(stored.astype(np.int32) - 1024, HU_MIN, HU_MAX))


def test_values_without_air_are_not_hu(tmp_path):
    write_image(tmp_path / "normalised.nrrd", np.random.default_rng(2).random((4, 5, 6)).astype(np.float32))
    with pytest.raises(DataFormatError, match=r"nothing below -500 HU, so no air"):
        load_image_file(tmp_path / "normalised.nrrd")
    holes = make_hu().astype(np.float32)
    holes[1, 2, 3] = np.nan
    write_image(tmp_path / "holes.nrrd", holes)  # (SimpleITK reads a NIfTI nan as 0)
    with pytest.raises(DataFormatError, match=r"voxel values nan\.\.nan: expected finite numbers"):
        load_image_file(tmp_path / "holes.nrrd")
    write_image(tmp_path / "shifted.nii.gz", make_hu())
    with pytest.raises(DataFormatError, match=r"after --hu-offset 900: nothing below -500 HU"):
        load_image_file(tmp_path / "shifted.nii.gz", hu_offset=900)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(make_hu())] * 3), str(p)),
         r"a 4-D image of size 12 × 10 × 6 × 3: expected one 3-D CT volume \(a series of volumes"),
        (lambda p: sitk.WriteImage(sitk.GetImageFromArray(make_hu()[0]), str(p)), r"a 2-D image of size 12 × 10"),
        (lambda p: write_image(p, make_hu((1, 10, 12))), r"size 12 × 10 × 1: expected a 3-D CT volume of at least 2"),
        (lambda p: sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(p)),
         r"3 values per voxel"),
    ],
)  # fmt: skip
def test_not_one_volume_is_refused_in_one_line(tmp_path, make, expected):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(DataFormatError, match=expected) as info:
        load_ct_input(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_4d_file_of_one_time_point_is_a_volume(tmp_path):
    hu = make_hu((5, 6, 7))
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(hu)]), str(tmp_path / "t1.nii.gz"))
    np.testing.assert_array_equal(load_image_file(tmp_path / "t1.nii.gz").hu, np.clip(hu, HU_MIN, HU_MAX))


def test_nifti_geometry_that_simpleitk_would_guess_is_refused(tmp_path):
    hu = make_hu((4, 5, 6))
    cases = {
        "pixdim0.nii": ({PIXDIM1: ("<f", (0.0,))}, r"pixdim\[1\.\.3\] = \[0\.0, 0\.8.*1 mm for 0"),
        "nospace.nii": ({QFORM_CODE: ("<hh", (0, 0))}, r"no qform or sform \(qform_code = sform_code = 0\)"),
        "sheared.nii": (
            {SROW_X: ("<ffff", (-0.7, 0.3, 0.0, 120.5))},
            r"its sform .*\(sheared or scaled\).*by the qform",
        ),
    }
    for name, (patches, expected) in cases.items():
        path = patched_nifti(tmp_path / name, hu, patches)
        with pytest.raises(DataFormatError, match=expected) as info:
            load_image_file(path)
        assert str(path) in str(info.value), name
    metres = patched_nifti(tmp_path / "metres.nii", hu, {XYZT_UNITS: ("<B", (9,))})  # read as metres, scaled
    np.testing.assert_allclose(load_image_file(metres).voxel_size_xyz, np.array(SPACING_XYZ) * 1000, rtol=1e-6)


def test_nrrd_without_patient_space_or_with_a_sheared_grid_is_refused(tmp_path):
    hu = make_hu((4, 5, 6))
    with pytest.raises(DataFormatError, match=r"no 'space' and 'space directions' fields"):
        load_image_file(nrrd_file(tmp_path / "bare.nrrd", hu, ["spacings: 0.7 0.8 1.25"]))
    sheared = ["space: left-posterior-superior", "space directions: (0.7,0.3,0) (0,0.8,0) (0,0,1.25)",
               "space origin: (1,2,3)"]  # fmt: skip
    with pytest.raises(DataFormatError, match=r"direction matrix .* is not orthonormal"):
        load_image_file(nrrd_file(tmp_path / "sheared.nrrd", hu, sheared))
    zero = ["space: left-posterior-superior", "space directions: (0,0,0) (0,0.8,0) (0,0,1.25)", "space origin: (1,2,3)"]
    with pytest.raises(DataFormatError, match=r"voxel spacing \(0\.0, 0\.8, 1\.25\): expected 3 positive numbers"):
        load_image_file(nrrd_file(tmp_path / "zero.nrrd", hu, zero))
    ras = [
        "space: right-anterior-superior",
        "space directions: (0.7,0,0) (0,0.8,0) (0,0,1.25)",
        "space origin: (1,2,3)",
    ]
    ct = load_image_file(nrrd_file(tmp_path / "ras.nrrd", hu, ras))
    np.testing.assert_allclose(ct.origin_xyz, (-1.0, -2.0, 3.0))
    np.testing.assert_allclose(ct.direction, np.diag([-1.0, -1.0, 1.0]))


def test_damaged_missing_and_misnamed_files(tmp_path):
    path = tmp_path / "cut.nii.gz"
    write_image(path, make_hu((8, 30, 30)))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataFormatError, match=r"cut\.nii\.gz: damaged gzip data") as info:
        load_image_file(path)
    assert "\n" not in str(info.value)
    plain = tmp_path / "cut.nii"  # SimpleITK reads a cut file with the missing voxels set to 0
    write_image(plain, make_hu((8, 30, 30)))
    plain.write_bytes(plain.read_bytes()[:-200])
    with pytest.raises(DataFormatError, match=r"cut\.nii: truncated, 14552 bytes but its header needs 14752"):
        load_image_file(plain)
    short = tmp_path / "short.nii.gz"  # a whole gzip stream of too few voxels
    short.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(DataFormatError, match=r"short\.nii\.gz: truncated, 14552 bytes uncompressed but"):
        load_image_file(short)
    cut_nrrd = nrrd_file(tmp_path / "cut.nrrd", make_hu((4, 5, 6)), ["space: left-posterior-superior",
                         "space directions: (1,0,0) (0,1,0) (0,0,1)", "space origin: (0,0,0)"])  # fmt: skip
    cut_nrrd.write_bytes(cut_nrrd.read_bytes()[:-20])
    with pytest.raises(
        DataFormatError, match=r"cut\.nrrd: SimpleITK cannot read its voxels \(.*fread got only"
    ) as info:
        load_image_file(cut_nrrd)
    assert "\n" not in str(info.value)
    with pytest.raises(DataNotFoundError, match=r"nowhere\.nrrd: file not found"):
        load_ct_input(str(tmp_path / "nowhere.nrrd"))
    (tmp_path / "text.nii").write_text("not an image")
    with pytest.raises(DataFormatError, match=r"text\.nii: SimpleITK cannot read its header"):
        load_image_file(tmp_path / "text.nii")
    with pytest.raises(DataFormatError, match=r"not a NIfTI or NRRD file name"):
        read_image_file(tmp_path / "scan.img")


def test_series_uid_from_the_name_or_stably_from_the_path(tmp_path):
    hu = make_hu((3, 4, 5))
    write_image(tmp_path / "1.2.826.0.1.77.nii.gz", hu)
    assert load_image_file(tmp_path / "1.2.826.0.1.77.nii.gz").series_uid == "1.2.826.0.1.77"
    for name in ("patient 7.nii.gz", "patient8.nii.gz"):
        write_image(tmp_path / name, hu)
    first = load_image_file(tmp_path / "patient 7.nii.gz").series_uid
    assert re.fullmatch(r"2\.25\.\d+", first) and len(first) <= 42
    assert load_ct_input(str(tmp_path / "patient 7.nii.gz")).series_uid == first
    assert load_image_file(tmp_path / "patient8.nii.gz").series_uid != first
    assert (image_suffix("A.NII.GZ"), image_stem("a.b.nii.gz"), image_suffix("x.raw")) == (".nii.gz", "a.b", None)


def test_hu_offset_applies_to_image_files_only(tmp_path, tiny_root):
    from conftest import make_uid

    with pytest.raises(ConfigError, match=r"--hu-offset -1024 applies to NIfTI and NRRD files only"):
        load_ct_input(make_uid(1), tiny_root, hu_offset=-1024)
    write_image(tmp_path / "a.nii.gz", make_hu((3, 4, 5)))
    with pytest.raises(ConfigError, match=r"--hu-offset 99999: expected an integer"):
        load_ct_input(str(tmp_path / "a.nii.gz"), hu_offset=99999)
