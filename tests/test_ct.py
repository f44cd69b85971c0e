import hashlib
import re

import numpy as np
import pytest
import SimpleITK as sitk
from test_dicom import SERIES_UID, rotation, write_dicom_series

from p2ch import ct as ct_module
from p2ch.ct import Ct, get_ct, load_ct_input, load_mhd, read_mhd_header
from p2ch.errors import CandidateOutsideCtError, ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import IrcTuple, XyzTuple, irc2xyz
from p2ch.luna import find_mhd, is_valid_series_uid, series_index

from conftest import make_uid, write_ct


@pytest.fixture(autouse=True)
def _fresh_index():
    ct_module.clear_caches()
    yield
    ct_module.clear_caches()


def test_series_index_and_find(tiny_root):
    index = series_index(tiny_root)
    assert set(index) == {make_uid(1), make_uid(2)}
    assert index[make_uid(2)].parent.name == "subset1"
    assert find_mhd(make_uid(1), tiny_root) == tiny_root / "subset0" / f"{make_uid(1)}.mhd"


def test_series_index_scans_once(tiny_root, monkeypatch):
    series_index(tiny_root)
    calls = []
    original = type(tiny_root).glob
    monkeypatch.setattr(type(tiny_root), "glob", lambda self, pat: calls.append(pat) or original(self, pat))
    find_mhd(make_uid(1), tiny_root)
    find_mhd(make_uid(2), tiny_root)
    assert calls == []


def test_data_root_from_environment(tiny_root, monkeypatch):
    monkeypatch.setenv("P2CH_DATA_ROOT", str(tiny_root))
    assert find_mhd(make_uid(2)).parent.name == "subset1"


def test_missing_series_and_empty_root(tiny_root, tmp_path):
    with pytest.raises(DataNotFoundError, match=r"series 1\.3\.6.*999 not found.*2 series there"):
        find_mhd("1.3.6.1.999", tiny_root)
    with pytest.raises(DataNotFoundError, match=r"no \.mhd files under .*empty/subset\*/.*p2ch\.synth"):
        find_mhd(make_uid(1), tmp_path / "empty")


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.3/4", "1.2.*", "", "1.2.3 ", "a.b", "1" * 65])
def test_series_uid_with_path_characters_rejected(tiny_root, uid):
    with pytest.raises(DataFormatError, match="invalid series_uid"):
        find_mhd(uid, tiny_root)
    with pytest.raises(DataFormatError, match="invalid series_uid"):
        Ct(uid, tiny_root)


def test_ct_loads_clips_and_matches_simpleitk(tiny_root):
    ct = Ct(make_uid(1), tiny_root)
    assert ct.hu.dtype == np.int16 and ct.hu.shape == (40, 64, 64)
    assert ct.hu[0, 0, 0] == -1000 and ct.hu[1, 0, 0] == 1000
    assert ct.hu.min() >= -1000 and ct.hu.max() <= 1000
    assert isinstance(ct.origin_xyz, XyzTuple) and ct.origin_xyz == (-180.0, -170.0, -320.0)
    np.testing.assert_allclose(ct.voxel_size_xyz, (0.7, 0.7, 1.25))
    np.testing.assert_array_equal(ct.direction, np.eye(3))
    image = sitk.ReadImage(str(ct.mhd_path))
    point = image.TransformIndexToPhysicalPoint((34, 30, 20))
    assert ct.xyz2irc(point) == IrcTuple(20, 30, 34)


def test_crop_centre_and_edges(tiny_root):
    ct = Ct(make_uid(1), tiny_root)
    center = irc2xyz((20, 30, 34), ct.origin_xyz, ct.voxel_size_xyz, ct.direction)
    chunk, center_irc = ct.get_raw_candidate(center)
    assert chunk.dtype == np.int16 and chunk.shape == (32, 48, 48)
    assert center_irc == (20, 30, 34)
    # The window starts at centre - width // 2 when it fits, so the candidate sits at its centre.
    np.testing.assert_array_equal(chunk, ct.hu[4:36, 6:54, 10:58])
    assert chunk[16, 24, 24] == 100
    # Near an edge the window shifts inside the volume: index 35 + 16 > 40.
    near_edge = irc2xyz((35, 30, 34), ct.origin_xyz, ct.voxel_size_xyz, ct.direction)
    chunk, center_irc = ct.get_raw_candidate(near_edge)
    assert center_irc == (35, 30, 34)
    np.testing.assert_array_equal(chunk, ct.hu[8:40, 6:54, 10:58])
    corner = irc2xyz((39, 63, 63), ct.origin_xyz, ct.voxel_size_xyz, ct.direction)
    chunk, center_irc = ct.get_raw_candidate(corner, width_irc=(8, 10, 12))
    np.testing.assert_array_equal(chunk, ct.hu[32:40, 54:64, 52:64])
    origin_chunk, _ = ct.get_raw_candidate(ct.origin_xyz, width_irc=(4, 6, 8))
    np.testing.assert_array_equal(origin_chunk, ct.hu[:4, :6, :8])


def test_crop_thinner_than_window_pads_with_air(tmp_path):
    uid = make_uid(7)
    hu = np.arange(10 * 20 * 20, dtype=np.int16).reshape(10, 20, 20) % 500
    write_ct(tmp_path, uid, hu, spacing_xyz=(1, 1, 1), origin_xyz=(0, 0, 0))
    ct = Ct(uid, tmp_path)
    chunk, center_irc = ct.get_raw_candidate((10.0, 10.0, 5.0), width_irc=(16, 16, 16))
    assert center_irc == (5, 10, 10)
    np.testing.assert_array_equal(chunk[:10, :, :], hu[:, 2:18, 2:18])
    assert (chunk[10:] == -1000).all()


def test_many_crops_equal_single_crops(tiny_root):
    ct = Ct(make_uid(1), tiny_root)
    irc = np.array([[20, 30, 34], [0, 0, 0], [39, 63, 63], [5, 40, 10]])
    xyz = irc2xyz(irc, ct.origin_xyz, ct.voxel_size_xyz, ct.direction)
    chunks, centers = ct.get_raw_candidates(xyz)
    np.testing.assert_array_equal(centers, irc)
    for k in range(len(irc)):
        np.testing.assert_array_equal(chunks[k], ct.get_raw_candidate(xyz[k])[0])


def test_crop_with_oblique_direction_uses_true_inverse(tmp_path):
    uid = make_uid(8)
    hu = np.full((30, 40, 50), -900, dtype=np.int16)
    hu[12, 17, 33] = 777
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    path = write_ct(tmp_path, uid, hu, spacing_xyz=(0.6, 0.9, 1.5), origin_xyz=(10, 20, 30), direction=direction)
    point = sitk.ReadImage(str(path)).TransformIndexToPhysicalPoint((33, 17, 12))
    ct = Ct(uid, tmp_path)
    chunk, center_irc = ct.get_raw_candidate(point, width_irc=(4, 4, 4))
    assert center_irc == (12, 17, 33)
    assert chunk[2, 2, 2] == 777


def test_centre_outside_ct_is_a_clear_error(tiny_root):
    ct = Ct(make_uid(1), tiny_root)
    with pytest.raises(CandidateOutsideCtError, match=r"outside CT .* volume \(40, 64, 64\)") as caught:
        ct.get_raw_candidate((0.0, 0.0, 0.0))
    assert "candidate centre (0.0, 0.0, 0.0) mm" in str(caught.value) and "np.float64" not in str(caught.value)
    with pytest.raises(CandidateOutsideCtError):
        ct.get_raw_candidate(irc2xyz((40, 0, 0), ct.origin_xyz, ct.voxel_size_xyz, ct.direction))
    with pytest.raises(ConfigError, match="expected 3 positive integers"):
        ct.get_raw_candidate(ct.origin_xyz, width_irc=(32, 48))


def test_mhd_without_raw(tiny_root):
    (tiny_root / "subset0" / f"{make_uid(1)}.raw").unlink()
    with pytest.raises(DataNotFoundError, match=r"voxel file .*\.raw is missing"):
        Ct(make_uid(1), tiny_root)


def test_truncated_raw(tiny_root):
    raw = tiny_root / "subset0" / f"{make_uid(1)}.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(DataFormatError, match=r"\.raw: truncated, 1000 bytes but the header .* needs 327680"):
        Ct(make_uid(1), tiny_root)


def test_corrupt_header(tiny_root):
    mhd = tiny_root / "subset0" / f"{make_uid(1)}.mhd"
    mhd.write_text("this is not a header\n")
    with pytest.raises(DataFormatError, match=r"corrupt MetaIO header, no 'NDims"):
        Ct(make_uid(1), tiny_root)
    mhd.write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(DataFormatError, match="not a MetaIO header"):
        Ct(make_uid(1), tiny_root)
    mhd.write_text("NDims = 3\nDimSize = 64 x 64\nElementType = MET_SHORT\nElementDataFile = a.raw\n")
    with pytest.raises(DataFormatError, match="not integers"):
        read_mhd_header(mhd)


def test_header_simpleitk_rejects_is_wrapped(tiny_root):
    # ASCII voxels (BinaryData = False) have no fixed size, so only SimpleITK can find this one wrong.
    mhd = _set_header(tiny_root / "subset0" / f"{make_uid(1)}.mhd", "BinaryData", "False")
    with pytest.raises(DataFormatError, match=r"\.mhd: SimpleITK cannot read it \("):
        Ct(make_uid(1), tiny_root)
    assert mhd.is_file()


def _set_header(mhd, key, value=None):
    """Replace (or add, before ElementDataFile) the header line `key = value`; value None removes it."""
    lines = mhd.read_text().splitlines()
    keys = [line.partition("=")[0].strip() for line in lines]
    new = [] if value is None else [f"{key} = {value}"]
    at = keys.index(key) if key in keys else keys.index("ElementDataFile")
    lines[at : at + (key in keys)] = new
    mhd.write_text("\n".join(lines) + "\n")
    return mhd


# Headers SimpleITK reads without a word into a wrong CT (1 mm voxels, origin 0, a skewed or
# scaled direction, 0..65535 read as HU), each refused naming the header line.
BAD_HEADERS = [
    ("ElementSpacing", None, r"no 'ElementSpacing = …' line \(nor ElementSize\), so SimpleITK would take 1 mm"),
    ("ElementSpacing", "-0.7 0.7 1.25", r"line 'ElementSpacing = -0\.7 0\.7 1\.25': expected 3 positive numbers"),
    ("ElementSpacing", "0.7 0 1.25", r"line 'ElementSpacing = 0\.7 0 1\.25': expected 3 positive numbers"),
    ("ElementSpacing", "0.7 0.7", r"line 'ElementSpacing = 0\.7 0\.7': expected 3 finite numbers"),
    ("ElementSpacing", "not numbers", r"line 'ElementSpacing = not numbers': expected 3 finite numbers"),
    ("ElementSize", "0.7 -1 1.25", r"line 'ElementSize = 0\.7 -1 1\.25': expected 3 positive numbers"),
    ("Offset", "nan -170 -320", r"line 'Offset = nan -170 -320': expected 3 finite numbers"),
    ("Position", "1 inf 3", r"line 'Position = 1 inf 3': expected 3 finite numbers"),
    ("Origin", "1 2", r"line 'Origin = 1 2': expected 3 finite numbers"),
    ("TransformMatrix", "1 0 0 0 2 0 0 0 1", r"'TransformMatrix = 1 0 0 0 2 0 0 0 1' is not an orthonormal"),
    (
        "TransformMatrix",
        "1 0.01 0 0 1 0 0 0 1",
        r"'TransformMatrix = 1 0\.01 .*' is not an orthonormal.* 0\.01 > 0\.001",
    ),
    ("Rotation", "1 0 0 0 1 0 0 0 -2", r"'Rotation = .*' is not an orthonormal direction matrix"),
    ("Orientation", "1 0 0", r"line 'Orientation = 1 0 0': expected 9 finite numbers"),
    ("ElementType", "MET_USHORT", r"'ElementType = MET_USHORT' is unsigned; a CT must be stored as a signed type"),
    ("ElementType", "MET_UCHAR", r"'ElementType = MET_UCHAR' is unsigned"),
    ("ElementNumberOfChannels", "2", r"line 'ElementNumberOfChannels = 2': expected 1"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_HEADERS)
def test_header_that_simpleitk_misreads_is_refused(tiny_root, key, value, message):
    mhd = _set_header(tiny_root / "subset0" / f"{make_uid(1)}.mhd", key, value)
    with pytest.raises(DataFormatError, match=message) as info:
        Ct(make_uid(1), tiny_root)
    assert str(info.value).startswith(f"{mhd}: ") and "\n" not in str(info.value)
    with pytest.raises(DataFormatError, match=message):
        load_mhd(mhd)


def test_header_geometry_within_tolerance_and_element_size_load(tiny_root):
    mhd = tiny_root / "subset0" / f"{make_uid(1)}.mhd"
    direction = np.round(rotation((0.3, -1.0, 0.6), 0.7), 4)  # headers store the matrix rounded
    _set_header(mhd, "TransformMatrix", " ".join(str(v) for v in direction.T.ravel()))
    _set_header(mhd, "ElementSpacing")
    _set_header(mhd, "ElementSize", "0.5 0.6 2")
    ct = Ct(make_uid(1), tiny_root)
    np.testing.assert_allclose(ct.voxel_size_xyz, (0.5, 0.6, 2.0))
    np.testing.assert_allclose(ct.direction, direction, atol=1e-6)


def test_raw_larger_than_dimsize_is_refused(tiny_root):
    """DimSize 64 x 64 x 20 on a 40-slice raw: SimpleITK reads half the CT without a word."""
    mhd = _set_header(tiny_root / "subset0" / f"{make_uid(1)}.mhd", "DimSize", "64 64 20")
    with pytest.raises(
        DataFormatError, match=r"\.raw: 327680 bytes but the header .*\.mhd describes 163840 \(64x64x20 × 2 bytes\)"
    ):
        Ct(make_uid(1), tiny_root)
    _set_header(mhd, "DimSize", "64 64 40")
    raw = mhd.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes() + b"\0\0")
    with pytest.raises(DataFormatError, match=r"327682 bytes but the header .* describes 327680"):
        Ct(make_uid(1), tiny_root)


def test_header_size_local_list_and_compressed_data_load(tmp_path):
    hu = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) - 30
    _write_mhd(tmp_path / "plain.mhd", hu)
    header = (tmp_path / "plain.mhd").read_text()
    raw = (tmp_path / "plain.raw").read_bytes()
    (tmp_path / "skip.raw").write_bytes(b"x" * 100 + raw)
    variants = {
        "skip.mhd": header.replace("ElementDataFile = plain.raw", "HeaderSize = 100\nElementDataFile = skip.raw"),
        "tail.mhd": header.replace("ElementDataFile = plain.raw", "HeaderSize = -1\nElementDataFile = skip.raw"),
        "list.mhd": header.replace("plain.raw", "LIST\n" + "\n".join(f"s{k}.raw" for k in range(3))),
        "pattern.mhd": header.replace("plain.raw", "s%d.raw 0 2 1"),
    }
    for k in range(3):  # one slice per file
        (tmp_path / f"s{k}.raw").write_bytes(hu[k].tobytes())
    for name, text in variants.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "local.mhd").write_bytes(header.replace("plain.raw", "LOCAL").encode() + raw)
    image = sitk.GetImageFromArray(hu)
    sitk.WriteImage(image, str(tmp_path / "packed.mhd"), useCompression=True)
    for name in ("plain.mhd", "skip.mhd", "tail.mhd", "list.mhd", "pattern.mhd", "local.mhd", "packed.mhd"):
        np.testing.assert_array_equal(load_mhd(tmp_path / name).hu, hu, err_msg=name)
    (tmp_path / "short.mhd").write_bytes(header.replace("plain.raw", "LOCAL").encode() + raw[:-2])
    with pytest.raises(
        DataFormatError, match=r"short\.mhd: 118 bytes of LOCAL data after the header, .* describes 120"
    ):
        load_mhd(tmp_path / "short.mhd")
    # MetaIO reads a LIST one slice per file: the whole volume in one listed file is not 3 slices.
    (tmp_path / "one.mhd").write_text(header.replace("plain.raw", "LIST\nplain.raw"))
    with pytest.raises(
        DataFormatError, match=r"'ElementDataFile = LIST' names 1 data file\(s\), but DimSize 5x4x3 needs 3"
    ):
        load_mhd(tmp_path / "one.mhd")


def test_compressed_flag_on_uncompressed_data_is_refused(tiny_root):
    """SimpleITK prints 'Uncompress failed' and returns garbage voxels."""
    _set_header(tiny_root / "subset0" / f"{make_uid(1)}.mhd", "CompressedData", "True")
    with pytest.raises(
        DataFormatError, match=r"\.raw: not zlib-compressed data, but the header .* 'CompressedData = True'"
    ):
        Ct(make_uid(1), tiny_root)


def test_data_file_outside_the_mhd_folder(tiny_root, tmp_path, monkeypatch):
    mhd = tiny_root / "subset0" / f"{make_uid(1)}.mhd"
    elsewhere = tmp_path / "elsewhere" / "x.raw"
    elsewhere.parent.mkdir()
    mhd.with_suffix(".raw").rename(elsewhere)
    expected = Ct(make_uid(2), tiny_root)  # unaffected
    for name in ("../../elsewhere/x.raw", str(elsewhere)):
        _set_header(mhd, "ElementDataFile", name)
        with pytest.raises(DataFormatError, match=rf"'ElementDataFile = {re.escape(name)}' points outside the \.mhd's"):
            Ct(make_uid(1), tiny_root)
        monkeypatch.setenv("P2CH_ALLOW_EXTERNAL_DATA", "1")
        assert Ct(make_uid(1), tiny_root).hu.shape == (40, 64, 64)
        monkeypatch.delenv("P2CH_ALLOW_EXTERNAL_DATA")
    # A symbolic link in the folder is the user's own choice: the path as written is inside.
    (mhd.parent / "linked.raw").symlink_to(elsewhere)
    _set_header(mhd, "ElementDataFile", "linked.raw")
    assert Ct(make_uid(1), tiny_root).hu.shape == (40, 64, 64)
    assert expected.hu.shape == (30, 50, 60)


def test_non_3d_image(tmp_path):
    uid = make_uid(9)
    folder = tmp_path / "subset0"
    folder.mkdir(parents=True)
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(folder / f"{uid}.mhd"))
    with pytest.raises(DataFormatError, match=r"expected a 3-D CT volume, got NDims=2"):
        Ct(uid, tmp_path)


def test_non_int16_voxels_are_clipped_then_converted(tmp_path):
    uid = make_uid(10)
    folder = tmp_path / "subset0"
    folder.mkdir(parents=True)
    arr = np.array([[[-5000.5, 0.4], [999.6, 40000.0]]], dtype=np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / f"{uid}.mhd"))
    ct = Ct(uid, tmp_path)
    assert ct.hu.dtype == np.int16
    np.testing.assert_array_equal(ct.hu, [[[-1000, 0], [999, 1000]]])


def test_get_ct_is_cached_and_cleared(tiny_root):
    a = get_ct(make_uid(1), tiny_root)
    assert get_ct(make_uid(1), tiny_root) is a
    ct_module.clear_caches()
    assert get_ct(make_uid(1), tiny_root) is not a


def _write_mhd(path, hu, **geometry):
    """Write hu (I, R, C) int16 as `path` (.mhd + .raw) outside any LUNA16 layout; returns the image."""
    image = sitk.GetImageFromArray(np.asarray(hu, dtype=np.int16))
    image.SetSpacing(geometry.get("spacing_xyz", (0.8, 0.7, 2.0)))
    image.SetOrigin(geometry.get("origin_xyz", (-50.0, 10.0, 300.0)))
    if "direction" in geometry:
        image.SetDirection(tuple(np.asarray(geometry["direction"], dtype=np.float64).ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def _same_ct(a: Ct, b: Ct) -> None:
    assert a.series_uid == b.series_uid
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.hu.dtype == b.hu.dtype == np.int16
    assert a.origin_xyz == b.origin_xyz and a.voxel_size_xyz == b.voxel_size_xyz
    np.testing.assert_array_equal(a.direction, b.direction)


def test_from_image_equals_reading_by_uid(tiny_root):
    by_uid = Ct(make_uid(1), tiny_root)
    assert by_uid.source == by_uid.mhd_path == find_mhd(make_uid(1), tiny_root)
    from_image = Ct.from_image(sitk.ReadImage(str(by_uid.mhd_path)), make_uid(1), by_uid.mhd_path)
    _same_ct(from_image, by_uid)
    assert from_image.source == from_image.mhd_path == by_uid.mhd_path
    with pytest.raises(DataFormatError, match="invalid series_uid"):
        Ct.from_image(sitk.ReadImage(str(by_uid.mhd_path)), "not/a/uid", by_uid.mhd_path)
    with pytest.raises(DataFormatError, match=r"flat\.png: expected a 3-D single-channel CT, got 2-D"):
        Ct.from_image(sitk.Image(8, 8, sitk.sitkInt16), make_uid(1), "flat.png")


def test_load_mhd_outside_a_data_root(tiny_root, tmp_path):
    path = tmp_path / "elsewhere" / f"{make_uid(1)}.mhd"
    path.parent.mkdir()
    for suffix in (".mhd", ".raw"):
        source = tiny_root / "subset0" / f"{make_uid(1)}{suffix}"
        path.with_suffix(suffix).write_bytes(source.read_bytes())
    ct = load_mhd(path)
    _same_ct(ct, Ct(make_uid(1), tiny_root))
    assert ct.source == ct.mhd_path == path.resolve()


def test_non_uid_file_name_gets_a_stable_derived_uid(tmp_path):
    hu = np.full((4, 5, 6), 2000, dtype=np.int16)
    path = tmp_path / "scans" / "patient 7.mhd"
    _write_mhd(path, hu)
    ct = load_mhd(path)
    digest = hashlib.sha1(str(path.resolve()).encode("utf-8")).hexdigest()
    assert ct.series_uid == "2.25." + str(int(digest[:30], 16))
    assert is_valid_series_uid(ct.series_uid) and len(ct.series_uid) <= 64
    assert load_mhd(path).series_uid == ct.series_uid
    assert (ct.hu == 1000).all()
    other = tmp_path / "scans" / "patient 8.mhd"
    _write_mhd(other, hu)
    assert load_mhd(other).series_uid != ct.series_uid


def test_oblique_xyz2irc_agrees_with_simpleitk(tmp_path):
    direction = rotation((0.3, -1.0, 0.6), 0.7)
    image = _write_mhd(
        tmp_path / "oblique.mhd", np.zeros((20, 30, 40)), spacing_xyz=(0.6, 0.9, 1.7), direction=direction
    )
    ct = load_mhd(tmp_path / "oblique.mhd")
    np.testing.assert_allclose(ct.direction, direction, atol=1e-6)
    rng = np.random.default_rng(0)
    # Continuous indices away from half-voxel boundaries, where both roundings agree by definition.
    index_xyz = rng.integers(0, (40, 30, 20), size=(12, 3)) + rng.uniform(-0.3, 0.3, size=(12, 3))
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(v)) for v in index_xyz])
    expected = np.array([image.TransformPhysicalPointToIndex(tuple(p))[::-1] for p in points])
    np.testing.assert_array_equal(ct.xyz2irc(points), expected)
    for point, want in zip(points, expected, strict=True):
        assert ct.xyz2irc(point) == IrcTuple(*want)


def test_load_ct_input_dispatch(tiny_root, tmp_path):
    assert load_ct_input(make_uid(1), tiny_root) is get_ct(make_uid(1), tiny_root)
    mhd = tiny_root / "subset1" / f"{make_uid(2)}.mhd"
    _same_ct(load_ct_input(str(mhd)), Ct(make_uid(2), tiny_root))
    hu = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    write_dicom_series(tmp_path / "dicom", hu)
    (tmp_path / "dicom" / "notes.txt").write_text("not DICOM\n")
    ct = load_ct_input(str(tmp_path / "dicom"), tiny_root)
    assert ct.series_uid == SERIES_UID and ct.source == tmp_path / "dicom"
    np.testing.assert_array_equal(ct.hu, hu)
    assert load_ct_input(str(tmp_path / "dicom"), dicom_series=SERIES_UID).series_uid == SERIES_UID


def test_load_ct_input_errors(tiny_root, tmp_path):
    with pytest.raises(DataNotFoundError, match=rf"series 1\.2\.3 not found.*{tiny_root}.*\.mhd file or to a folder"):
        load_ct_input("1.2.3", tiny_root)
    with pytest.raises(DataNotFoundError, match=r"no \.mhd files under .*a folder of DICOM files also works"):
        load_ct_input("1.2.3", tmp_path / "no-data")
    raw = tiny_root / "subset0" / f"{make_uid(1)}.raw"
    with pytest.raises(DataFormatError, match=r"\.raw: not a CT input; .*pass .*\.mhd instead"):
        load_ct_input(str(raw))
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(DataFormatError, match=r"notes\.txt: not a CT input; expected a LUNA16 series uid"):
        load_ct_input(str(text))
    with pytest.raises(DataNotFoundError, match=r"'no-such-scan': no such file or folder, and not a series uid"):
        load_ct_input("no-such-scan", tiny_root)
    with pytest.raises(DataNotFoundError, match=r"missing\.mhd: file not found"):
        load_ct_input(str(tmp_path / "missing.mhd"))
    raw.unlink()
    with pytest.raises(DataNotFoundError, match=r"voxel file .*\.raw is missing"):
        load_ct_input(str(raw.with_suffix(".mhd")))
    with pytest.raises(ConfigError, match=r"--dicom-series 1\.2 applies to a DICOM folder only"):
        load_ct_input(make_uid(2), tiny_root, dicom_series="1.2")
