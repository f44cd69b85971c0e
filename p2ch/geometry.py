"""Patient (world, mm) and voxel (index, row, col) coordinates, as SimpleITK defines them.

SimpleITK maps a continuous voxel index to a physical point by

    point_xyz = origin_xyz + D @ (spacing_xyz * index_xyz)

where `index_xyz = (col, row, index)` and D is the 3x3 direction matrix (columns are the
world directions of the image axes). Our voxel arrays are laid out (index, row, col) = (z, y, x),
so `irc` is `index_xyz` reversed. The inverse is `index_xyz = (D^-1 @ (point - origin)) / spacing`.
(The book's version multiplied by D^-1 from the wrong side, which only works when D is the
identity or symmetric; LUNA16's CTs have identity directions, which hid the bug.)
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

XyzTuple = namedtuple("XyzTuple", ["x", "y", "z"])
IrcTuple = namedtuple("IrcTuple", ["index", "row", "col"])


def _as_matrix(direction_a) -> np.ndarray:
    direction = np.asarray(direction_a, dtype=np.float64)
    if direction.shape == (9,):
        direction = direction.reshape(3, 3)
    if direction.shape != (3, 3):
        raise ValueError(f"direction_a must be a 3x3 matrix (or 9 values), got shape {direction.shape}")
    return direction


def _as_points(coords) -> tuple[np.ndarray, bool]:
    points = np.asarray(coords, dtype=np.float64)
    single = points.ndim == 1
    if points.shape[-1:] != (3,) or points.ndim > 2:
        raise ValueError(f"coordinates must be 3 values or an (N, 3) array, got shape {points.shape}")
    return np.atleast_2d(points), single


def xyz2irc(coord_xyz, origin_xyz, vx_size_xyz, direction_a, *, rounded: bool = True):
    """World mm → voxel index.

    coord_xyz: 3 values or (N, 3) array, mm (x, y, z). origin_xyz, vx_size_xyz: 3 values, mm.
    direction_a: (3, 3) direction matrix (or its 9 values as SimpleITK returns them).
    Returns an `IrcTuple` of ints for one point, an (N, 3) int64 array (index, row, col) for
    many. With `rounded=False` the continuous index is returned instead (floats), the exact
    inverse of `irc2xyz` for any point.
    """
    points, single = _as_points(coord_xyz)
    origin = np.asarray(origin_xyz, dtype=np.float64)
    spacing = np.asarray(vx_size_xyz, dtype=np.float64)
    direction = _as_matrix(direction_a)
    # (D^-1 @ (p - o)) for row vectors is (p - o) @ D^-1.T; solve() avoids forming the inverse.
    index_xyz = np.linalg.solve(direction, (points - origin).T).T / spacing
    irc = index_xyz[:, ::-1]
    if rounded:
        irc = np.rint(irc).astype(np.int64)
        if single:
            return IrcTuple(*(int(v) for v in irc[0]))
        return irc
    if single:
        return IrcTuple(*(float(v) for v in irc[0]))
    return np.ascontiguousarray(irc)


def irc2xyz(coord_irc, origin_xyz, vx_size_xyz, direction_a):
    """Voxel index (index, row, col), integer or continuous → world mm.

    coord_irc: 3 values or (N, 3) array. Returns an `XyzTuple` of floats for one point, an
    (N, 3) float64 array (x, y, z) mm for many.
    """
    points, single = _as_points(coord_irc)
    origin = np.asarray(origin_xyz, dtype=np.float64)
    spacing = np.asarray(vx_size_xyz, dtype=np.float64)
    direction = _as_matrix(direction_a)
    index_xyz = points[:, ::-1]
    xyz = (index_xyz * spacing) @ direction.T + origin
    if single:
        return XyzTuple(*(float(v) for v in xyz[0]))
    return xyz
