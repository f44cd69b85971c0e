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

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from p2ch.errors import ConfigError

# The book's chunk: 32 slices of 48 x 48 voxels around a candidate.
DEFAULT_WIDTH_IRC = (32, 48, 48)
MAX_WIDTH = 0xFFFF  # the chunk cache's header stores each side in 16 bits
DIRECTION_TOL = 1e-3  # max |DDᵀ − I| of a direction matrix (headers store it rounded)


class XyzTuple(NamedTuple):
    """A point in patient (world) space, mm."""

    x: float
    y: float
    z: float


class IrcTuple(NamedTuple):
    """A voxel position: index (slice, z), row (y), col (x)."""

    index: int
    row: int
    col: int


def check_width_irc(width_irc: Sequence[int]) -> tuple[int, int, int]:
    """`width_irc` as 3 Python ints (index, row, col), or ConfigError.

    Accepts ints, numpy integers and integral floats (32.0, as a JSON config may spell it);
    refuses bools, fractions, sides < 1 or > 65535.
    """
    try:
        values = list(width_irc)
        exact = all(not isinstance(v, (bool, np.bool_)) and float(v) == int(v) for v in values)
        width = tuple(int(v) for v in values)
    except (TypeError, ValueError, OverflowError):
        width, exact = (), False
    if len(width) != 3 or not exact or min(width) < 1 or max(width) > MAX_WIDTH:
        raise ConfigError(
            f"width_irc {width_irc!r}: expected 3 positive integers (index, row, col), e.g. {DEFAULT_WIDTH_IRC}"
        )
    return width  # type: ignore[return-value]


def inside_volume(centers_irc, shape_irc: Sequence[int]) -> np.ndarray:
    """Which voxel positions lie inside a volume: centers_irc (N, 3) int → (N,) bool."""
    centers = np.atleast_2d(np.asarray(centers_irc))
    return np.all((centers >= 0) & (centers < np.asarray(shape_irc)), axis=1)


def direction_error(direction) -> float:
    """How far a direction matrix (3 × 3, or its 9 values) is from orthonormal: max |DDᵀ − I| (nan if not finite)."""
    matrix = _as_matrix(direction)
    if not np.isfinite(matrix).all():
        return float("nan")
    return float(np.abs(matrix @ matrix.T - np.eye(3)).max())


def _as_matrix(direction) -> np.ndarray:
    direction = np.asarray(direction, dtype=np.float64)
    if direction.shape == (9,):
        direction = direction.reshape(3, 3)
    if direction.shape != (3, 3):
        raise ValueError(f"direction must be a 3x3 matrix (or 9 values), got shape {direction.shape}")
    return direction


def _as_points(coords) -> tuple[np.ndarray, bool]:
    points = np.asarray(coords, dtype=np.float64)
    single = points.ndim == 1
    if points.shape[-1:] != (3,) or points.ndim > 2:
        raise ValueError(f"coordinates must be 3 values or an (N, 3) array, got shape {points.shape}")
    return np.atleast_2d(points), single


def xyz2irc(coord_xyz, origin_xyz, voxel_size_xyz, direction, *, rounded: bool = True):
    """World mm → voxel index.

    coord_xyz: 3 values or (N, 3) array, mm (x, y, z). origin_xyz, voxel_size_xyz: 3 values, mm.
    direction: (3, 3) direction matrix (or its 9 values as SimpleITK returns them).
    Returns an `IrcTuple` of ints for one point, an (N, 3) int64 array (index, row, col) for
    many. With `rounded=False` the continuous index is returned instead (floats), the exact
    inverse of `irc2xyz` for any point.
    """
    points, single = _as_points(coord_xyz)
    origin = np.asarray(origin_xyz, dtype=np.float64)
    spacing = np.asarray(voxel_size_xyz, dtype=np.float64)
    matrix = _as_matrix(direction)
    # (D^-1 @ (p - o)) for row vectors is (p - o) @ D^-1.T; solve() avoids forming the inverse.
    index_xyz = np.linalg.solve(matrix, (points - origin).T).T / spacing
    irc = index_xyz[:, ::-1]
    if rounded:
        irc = np.rint(irc).astype(np.int64)
        if single:
            return IrcTuple(*(int(v) for v in irc[0]))
        return irc
    if single:
        return IrcTuple(*(float(v) for v in irc[0]))
    return np.ascontiguousarray(irc)


def irc2xyz(coord_irc, origin_xyz, voxel_size_xyz, direction):
    """Voxel index (index, row, col), integer or continuous → world mm.

    coord_irc: 3 values or (N, 3) array. Returns an `XyzTuple` of floats for one point, an
    (N, 3) float64 array (x, y, z) mm for many.
    """
    points, single = _as_points(coord_irc)
    origin = np.asarray(origin_xyz, dtype=np.float64)
    spacing = np.asarray(voxel_size_xyz, dtype=np.float64)
    matrix = _as_matrix(direction)
    index_xyz = points[:, ::-1]
    xyz = (index_xyz * spacing) @ matrix.T + origin
    if single:
        return XyzTuple(*(float(v) for v in xyz[0]))
    return xyz
