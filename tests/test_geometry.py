import numpy as np
import pytest
import SimpleITK as sitk

from p2ch.geometry import IrcTuple, XyzTuple, irc2xyz, xyz2irc


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


GEOMETRIES = {
    "identity": (np.eye(3), (0.7, 0.7, 2.5), (-180.0, -170.0, -320.0)),
    "anisotropic": (np.eye(3), (0.5, 0.96, 0.6), (-250.0, -150.0, 1450.0)),
    "flipped": (np.diag([-1.0, 1.0, -1.0]), (0.8, 0.8, 1.0), (190.0, -160.0, 40.0)),
    "axes-permuted": (np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]), (0.6, 0.9, 1.7), (5, 6, 7)),
    "oblique": (_rotation(np.array([1.0, 2.0, 0.5]), 0.4), (0.66, 0.75, 1.25), (-120, 30, -700)),
    "oblique-flipped": (
        _rotation(np.array([0.2, -1.0, 0.3]), 1.1) @ np.diag([1.0, -1.0, 1.0]),
        (0.9, 0.55, 2.0),
        (10, -20, 300),
    ),
}


def _image(direction, spacing, origin):
    image = sitk.Image(20, 30, 40, sitk.sitkInt16)
    image.SetDirection(tuple(np.asarray(direction).ravel()))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_matches_simpleitk_both_ways(name):
    direction, spacing, origin = GEOMETRIES[name]
    image = _image(direction, spacing, origin)
    rng = np.random.default_rng(0)
    for _ in range(20):
        index_xyz = rng.uniform(-5, 45, size=3)
        expected_xyz = image.TransformContinuousIndexToPhysicalPoint(tuple(index_xyz))
        got_xyz = irc2xyz(index_xyz[::-1], origin, spacing, direction)
        assert isinstance(got_xyz, XyzTuple)
        np.testing.assert_allclose(got_xyz, expected_xyz, atol=1e-9)

        point = tuple(rng.uniform(-300, 300, size=3))
        expected_index = image.TransformPhysicalPointToContinuousIndex(point)
        got_irc = xyz2irc(point, origin, spacing, direction, rounded=False)
        np.testing.assert_allclose(got_irc[::-1], expected_index, atol=1e-9)
        rounded = xyz2irc(point, origin, spacing, direction)
        assert isinstance(rounded, IrcTuple)
        assert all(isinstance(v, int) for v in rounded)
        np.testing.assert_array_equal(rounded, np.rint(np.asarray(expected_index)[::-1]))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_exact_inverses(name):
    direction, spacing, origin = GEOMETRIES[name]
    rng = np.random.default_rng(1)
    irc_int = rng.integers(0, 500, size=(100, 3))
    xyz = irc2xyz(irc_int, origin, spacing, direction)
    np.testing.assert_array_equal(xyz2irc(xyz, origin, spacing, direction), irc_int)
    points = rng.uniform(-400, 400, size=(100, 3))
    back = irc2xyz(xyz2irc(points, origin, spacing, direction, rounded=False), origin, spacing, direction)
    np.testing.assert_allclose(back, points, atol=1e-9)


def test_book_formula_is_wrong_for_non_symmetric_direction():
    # Guard that our oblique case really exercises the direction matrix: the book multiplied
    # (p - origin) by D^-1 from the other side, which disagrees with SimpleITK here.
    direction, spacing, origin = GEOMETRIES["oblique"]
    image = _image(direction, spacing, origin)
    point = (12.0, -40.0, -650.0)
    book = ((np.array(point) - origin) @ np.linalg.inv(direction)) / spacing
    expected = np.array(image.TransformPhysicalPointToContinuousIndex(point))
    assert np.abs(book - expected).max() > 1.0
    np.testing.assert_allclose(xyz2irc(point, origin, spacing, direction, rounded=False)[::-1], expected)


def test_arrays_match_single_points_and_accept_flat_direction():
    direction, spacing, origin = GEOMETRIES["oblique-flipped"]
    points = np.random.default_rng(2).uniform(-100, 100, size=(7, 3))
    many = xyz2irc(points, origin, spacing, tuple(direction.ravel()))
    assert many.shape == (7, 3) and many.dtype == np.int64
    for k in range(7):
        assert tuple(many[k]) == xyz2irc(points[k], origin, spacing, direction)
    xyz = irc2xyz(many, origin, spacing, direction)
    assert xyz.shape == (7, 3)
    np.testing.assert_allclose(xyz[3], irc2xyz(many[3], origin, spacing, direction))


@pytest.mark.parametrize("bad", [(1.0, 2.0), np.zeros((2, 2)), np.zeros((2, 3, 3))])
def test_bad_coordinate_shapes(bad):
    with pytest.raises(ValueError, match="coordinates must be 3 values"):
        xyz2irc(bad, (0, 0, 0), (1, 1, 1), np.eye(3))


def test_bad_direction_shape():
    with pytest.raises(ValueError, match="direction must be a 3x3"):
        irc2xyz((1, 2, 3), (0, 0, 0), (1, 1, 1), np.eye(2))
