"""The lungs of a chest CT: where the nodule detector looks (numpy and scipy.ndimage only).

`lung_mask(hu, voxel_size_xyz)` finds the lungs as the large bodies of air inside the body and
returns a `LungMask` on a coarse grid (about `COARSE_MM` per voxel, sampled from the CT):

1. air: coarse voxels below `AIR_HU` (lung parenchyma is -950 … -500 HU; soft tissue is above);
2. outside air goes: per slice, air regions that touch the slice's border (the room, the field of
   view's padding, which `p2ch.ct.Ct` clips to -1000 HU) are dropped;
3. the lungs are the 3D air components of at least `MIN_LUNG_FRACTION` of the largest and
   `MIN_LUNG_ML` (the trachea and main bronchi join them; bowel gas and small pockets are dropped);
4. holes are filled slice by slice, so vessels and nodules inside the lungs belong to them, and a
   small closing smooths the boundary.

A nodule touching the pleura (juxtapleural) lies outside the air by definition, so what the
detector keeps is "touches the lungs": `LungMask.near(distance_mm)` is the mask grown by that
many mm, and a component is in the lungs when any of its voxels is near them
(`LungMask.contains`). `LungMask.box(margin_mm)` is the lungs' bounding box in CT voxels, which
the segmentation model runs on (`p2ch.detect.segment_ct`), and `LungMask.slice_boxes` the same
per slice.

`surface_bumps(hu, lungs)` looks for nodules on the lungs' surface, the ones a segmentation model
trained on nodule crops misses most: a nodule on the chest wall or the mediastinum is a bump of tissue
that the lungs' air wraps around. On a ~`SURFACE_GRID_MM` grid the lungs' air is closed by a ball of
`SURFACE_BALL_MM` (two distance transforms); what the closing adds and is tissue is where that ball
cannot reach from inside, and each such piece that is dense, thick, round and small enough to be a
nodule is a candidate (`SurfaceBumps`).

A CT in which no such air is found (a phantom, a CT of the abdomen or the head, a CT whose HU are
wrong) gets `found = False` and a mask covering the whole volume, so the detector then looks
everywhere rather than nowhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import scipy.ndimage

from p2ch.errors import DataFormatError

COARSE_MM = 3.0  # coarse grid: about this many mm per voxel along each axis (never finer than the CT)
AIR_HU = -400  # below: air or lung parenchyma (block means, so partial volume at edges counts half)
MIN_LUNG_FRACTION = 0.1  # a lung is at least this fraction of the largest air body inside the body
MIN_LUNG_ML = 20.0  # and at least this many millilitres (an adult lung holds 1,500-3,000 ml)
CLOSING_MM = 4.0  # the closing that smooths the lungs' boundary
DEFAULT_NEAR_MM = 4.0  # a component within this distance of the lungs is in them (juxtapleural nodules)
DEFAULT_BOX_MARGIN_MM = 15.0  # the segmentation's region: the lungs' box grown by this


@dataclasses.dataclass(frozen=True, eq=False)
class LungMask:
    """The lungs of one CT on a coarse grid.

    coarse: (I', R', C') bool, True inside the lungs (holes filled). factors: (fi, fr, fc), CT voxels
    per coarse voxel along (index, row, col); coarse voxel (a, b, c) covers CT voxels
    [a·fi, (a+1)·fi) × … (the last one also whatever is left at the far end). shape_irc: the CT's
    (I, R, C). voxel_size_xyz: the CT's spacing in mm (x, y, z). found: False when no lungs were found
    and `coarse` covers everything. volume_ml: the lungs' volume (0 when not found).
    """

    coarse: np.ndarray
    factors: tuple[int, int, int]
    shape_irc: tuple[int, int, int]
    voxel_size_xyz: tuple[float, float, float]
    found: bool
    volume_ml: float

    @property
    def coarse_spacing_irc(self) -> np.ndarray:
        """(3,) float64 mm per coarse voxel along (index, row, col)."""
        return np.asarray(self.voxel_size_xyz[::-1], dtype=np.float64) * np.asarray(self.factors)

    def near(self, distance_mm: float = DEFAULT_NEAR_MM) -> np.ndarray:
        """(I', R', C') bool: coarse voxels within `distance_mm` of the lungs (the lungs included)."""
        if not self.found or distance_mm <= 0:
            return self.coarse.copy()
        if not self.coarse.any():
            return self.coarse.copy()
        distance = scipy.ndimage.distance_transform_edt(~self.coarse, sampling=self.coarse_spacing_irc)
        return distance <= distance_mm

    def coarse_index(self, voxels_irc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The coarse voxel of each CT voxel: voxels_irc (n, 3) integer → three (n,) int64 index arrays."""
        voxels = np.asarray(voxels_irc, dtype=np.int64).reshape(-1, 3)
        return tuple(self.coarse_axis(voxels[:, axis], axis) for axis in range(3))  # type: ignore[return-value]

    def coarse_axis(self, positions: np.ndarray, axis: int) -> np.ndarray:
        """The coarse index along `axis` (0 index, 1 row, 2 col) of CT voxel positions (int) along it."""
        coarse = np.asarray(positions, dtype=np.int64) // self.factors[axis]
        return np.minimum(coarse, self.coarse.shape[axis] - 1)

    def contains(self, voxels_irc: np.ndarray, distance_mm: float = DEFAULT_NEAR_MM) -> np.ndarray:
        """(n,) bool: which CT voxels (n, 3) (index, row, col) lie within `distance_mm` of the lungs."""
        return self.near(distance_mm)[self.coarse_index(voxels_irc)]

    def box(self, margin_mm: float = DEFAULT_BOX_MARGIN_MM) -> tuple[slice, slice, slice]:
        """The lungs' bounding box in CT voxels (index, row, col slices), grown by `margin_mm` and one coarse
        voxel (the coarse grid samples one voxel per block, so a lung edge may lie anywhere in the next
        block) and clipped to the CT; the whole CT when no lungs were found."""
        if not self.found:
            return tuple(slice(0, n) for n in self.shape_irc)  # type: ignore[return-value]
        where = [np.flatnonzero(self.coarse.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        return tuple(
            _grown(int(w[0]) * f, (int(w[-1]) + 1) * f if w[-1] + 1 < n_coarse else n, margin_mm / mm + f, n)
            for w, f, n, n_coarse, mm in zip(
                where, self.factors, self.shape_irc, self.coarse.shape, self.voxel_size_xyz[::-1], strict=True
            )
        )  # type: ignore[return-value]

    def slice_boxes(self, margin_mm: float = DEFAULT_BOX_MARGIN_MM) -> np.ndarray:
        """(I, 4) int64 per CT slice: row start, row stop, col start, col stop of the lungs within
        `margin_mm` (in-plane, and along the slices: a slice near the lungs gets their box there), grown
        by one coarse voxel as `box`; 0, 0, 0, 0 for a slice with no lungs within that. The whole slice
        when not found."""
        n_slices, rows, cols = self.shape_irc
        if not self.found:
            return np.tile(np.array([0, rows, 0, cols], dtype=np.int64), (n_slices, 1))
        spacing_i = self.voxel_size_xyz[2]
        reach = math.ceil(margin_mm / (spacing_i * self.factors[0])) + 1  # + 1: see `box`
        # A coarse slice's in-plane extent, spread to the coarse slices within the margin.
        present = scipy.ndimage.maximum_filter1d(self.coarse, size=2 * reach + 1, axis=0, mode="constant")
        out = np.zeros((n_slices, 4), dtype=np.int64)
        row_any, col_any = present.any(axis=2), present.any(axis=1)
        fi, fr, fc = self.factors
        for a in range(self.coarse.shape[0]):
            first, last = a * fi, n_slices if a == self.coarse.shape[0] - 1 else (a + 1) * fi
            r, c = np.flatnonzero(row_any[a]), np.flatnonzero(col_any[a])
            if len(r) == 0:
                continue
            r_stop = rows if r[-1] + 1 >= self.coarse.shape[1] else (int(r[-1]) + 1) * fr
            c_stop = cols if c[-1] + 1 >= self.coarse.shape[2] else (int(c[-1]) + 1) * fc
            row_box = _grown(int(r[0]) * fr, r_stop, margin_mm / self.voxel_size_xyz[1] + fr, rows)
            col_box = _grown(int(c[0]) * fc, c_stop, margin_mm / self.voxel_size_xyz[0] + fc, cols)
            out[first:last] = (row_box.start, row_box.stop, col_box.start, col_box.stop)
        return out


def _grown(start: int, stop: int, margin_voxels: float, extent: int) -> slice:
    grow = math.ceil(margin_voxels)
    return slice(max(start - grow, 0), min(stop + grow, extent))


def coarse_factors(voxel_size_xyz: Sequence[float], coarse_mm: float = COARSE_MM) -> tuple[int, int, int]:
    """CT voxels per coarse voxel along (index, row, col): about `coarse_mm`, at least 1."""
    spacing_irc = np.asarray(voxel_size_xyz, dtype=np.float64)[::-1]
    return tuple(max(1, round(coarse_mm / s)) for s in spacing_irc)  # type: ignore[return-value]


def coarse_sample(hu: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """(I', R', C') the CT on the coarse grid: coarse voxel (a, b, c) is CT voxel (a·fi + fi // 2, …), the
    middle of its block (clipped to the CT for the last, partial block). A sample, not a mean: the
    lungs are hundreds of HU below anything else, so noise does not matter, and it costs nothing."""
    index = [np.minimum(np.arange(0, n, f) + f // 2, n - 1) for n, f in zip(hu.shape, factors, strict=True)]
    return hu[np.ix_(*index)]


_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = scipy.ndimage.generate_binary_structure(2, 1)


def _inside_air(air: np.ndarray) -> np.ndarray:
    """Air that does not touch its slice's border (per-slice 4-connected regions)."""
    labels, _ = scipy.ndimage.label(air, structure=_IN_PLANE)
    border = np.concatenate(
        [labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
    )
    outside = np.zeros(int(labels.max()) + 1, dtype=bool)
    outside[np.unique(border)] = True
    outside[0] = True
    return ~outside[labels]


def _largest_bodies(inside: np.ndarray, voxel_ml: float) -> np.ndarray:
    """The air bodies big enough to be lungs (see the module docstring), as one bool mask."""
    labels, count = scipy.ndimage.label(inside)
    if count == 0:
        return np.zeros_like(inside)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:] * voxel_ml
    keep = (sizes >= MIN_LUNG_FRACTION * sizes.max()) & (sizes >= MIN_LUNG_ML)
    lookup = np.concatenate([[False], keep])
    return lookup[labels]


def _check_hu(hu: np.ndarray) -> np.ndarray:
    if not isinstance(hu, np.ndarray) or hu.ndim != 3 or 0 in hu.shape:
        found = (hu.shape, hu.dtype) if isinstance(hu, np.ndarray) else type(hu).__name__
        raise DataFormatError(f"lung_mask: hu is {found}; expected an (I, R, C) HU array (a p2ch.ct.Ct's hu)")
    return hu


def lung_mask(hu: np.ndarray, voxel_size_xyz: Sequence[float], coarse_mm: float = COARSE_MM) -> LungMask:
    """The lungs of a CT (see the module docstring). hu: (I, R, C) HU (int16 as `p2ch.ct.Ct.hu`);
    voxel_size_xyz: mm per voxel along (x, y, z). Never raises for a CT without lungs: `found` is False."""
    hu = _check_hu(hu)
    spacing = tuple(float(s) for s in voxel_size_xyz)
    factors = coarse_factors(spacing, coarse_mm)
    coarse_hu = coarse_sample(hu, factors)
    coarse_spacing = np.asarray(spacing[::-1]) * np.asarray(factors)
    voxel_ml = float(np.prod(coarse_spacing)) / 1000.0
    lungs = _largest_bodies(_inside_air(coarse_hu < AIR_HU), voxel_ml)
    if not lungs.any():
        return LungMask(np.ones(coarse_hu.shape, dtype=bool), factors, hu.shape, spacing, False, 0.0)
    lungs = scipy.ndimage.binary_fill_holes(lungs, structure=_IN_PLANE)
    reach = np.maximum(np.round(CLOSING_MM / coarse_spacing).astype(int), 0)
    if reach.any():
        structure = _ellipsoid(reach)
        padded = np.pad(lungs, [(r, r) for r in reach])
        closed = scipy.ndimage.binary_closing(padded, structure=structure)
        lungs = closed[tuple(slice(r, r + n) for r, n in zip(reach, lungs.shape, strict=True))]
    volume = float(lungs.sum()) * voxel_ml
    return LungMask(lungs, factors, hu.shape, spacing, True, volume)


def _ellipsoid(reach: np.ndarray) -> np.ndarray:
    """A bool ellipsoid structuring element with half-axes `reach` (3,) voxels."""
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    total = sum((g / max(r, 1)) ** 2 for g, r in zip(grids, reach, strict=True))
    return total <= 1.0


# ---------------------------------------------------------------------------------------------
# nodules on the lungs' surface: what a ball rolled inside the lungs cannot reach

SURFACE_GRID_MM = 1.5  # the surface is searched on a grid of about this many mm (block means of the CT)
SURFACE_BALL_MM = 8.0  # radius of the ball rolled inside the lungs: bumps up to about twice this across are found
SURFACE_MIN_HU = -200.0  # a bump's mean HU: soft tissue (a nodule), not partial-volume air at a smooth wall
SURFACE_MIN_RADIUS_MM = 2.0  # its thickness: the largest ball inside it has at least this radius (≥ 4 mm across)
SURFACE_MAX_ELONGATION = 3.0  # longest / second-longest axis (of its covariance): a vessel leaving the lung is long
# and a bump is at most 4 × the ball long in each direction (see `surface_bumps`)


@dataclasses.dataclass(frozen=True, eq=False)
class SurfaceBumps:
    """Compact lumps of tissue on the lungs' surface that the lungs' air wraps around: juxtapleural (or
    juxtamediastinal) nodule candidates (`surface_bumps`), best first (thickest).

    voxels_irc: one (m, 3) int64 array of CT voxels (index, row, col) per bump. center_irc: (n, 3) float64
    their mean (a continuous CT voxel position). radius_mm: (n,) the largest ball inside each. mean_hu: (n,).
    elongation: (n,) longest / second-longest axis (a cap on the wall is flat, but as wide as it is long).
    """

    voxels_irc: list[np.ndarray]
    center_irc: np.ndarray
    radius_mm: np.ndarray
    mean_hu: np.ndarray
    elongation: np.ndarray

    def __len__(self) -> int:
        return len(self.voxels_irc)


def _no_bumps() -> SurfaceBumps:
    empty = np.zeros(0, dtype=np.float64)
    return SurfaceBumps([], np.zeros((0, 3), dtype=np.float64), empty, empty.copy(), empty.copy())


def _block_means(hu: np.ndarray, factors: np.ndarray, slab: int = 16) -> np.ndarray:
    """(I', R', C') float32 means of the CT's complete blocks of `factors` voxels (a partial last block is left
    out), `slab` blocks of slices at a time (a float copy of a few slices, not of the whole CT)."""
    n = [size // f * f for size, f in zip(hu.shape, factors, strict=True)]
    fi, fr, fc = (int(f) for f in factors)
    out = np.empty((n[0] // fi, n[1] // fr, n[2] // fc), dtype=np.float32)
    for first in range(0, len(out), slab):
        part = hu[first * fi : min(first + slab, len(out)) * fi, : n[1], : n[2]].astype(np.float32)
        out[first : first + slab] = part.reshape(-1, fi, n[1] // fr, fr, n[2] // fc, fc).mean(axis=(1, 3, 5))
    return out


def _elongation(points_mm: np.ndarray) -> float:
    if len(points_mm) < 4:
        return 1.0
    eigen = np.linalg.eigvalsh(np.cov(points_mm.T))
    return float(np.sqrt(eigen[-1] / max(eigen[-2], 1e-6)))


def surface_bumps(hu: np.ndarray, lungs: LungMask, ball_mm: float = SURFACE_BALL_MM) -> SurfaceBumps:
    """Nodule candidates on the lungs' surface, where the segmentation model is weakest (see the module docstring).

    A nodule that touches the chest wall or the mediastinum is a bump of tissue that the lungs' air wraps
    around. On a ~`SURFACE_GRID_MM` grid over the lungs' box: the lungs' air (below `AIR_HU`, near `lungs`,
    not touching its slice's border, holes filled slice by slice, so vessels and nodules inside count as
    lung), closed by a ball of `ball_mm` (two distance transforms); what the closing adds is where that ball
    cannot reach from inside, the bumps. A bump is kept when it looks like a nodule: mean HU above
    `SURFACE_MIN_HU`, at least `SURFACE_MIN_RADIUS_MM` thick, at most `SURFACE_MAX_ELONGATION` times as long
    as it is wide (a vessel leaving the lung is long and thin; a nodule's cap is flat but round), and at
    most 4 × `ball_mm` long in each direction (what the closing fills around a nodule of radius r on a flat
    wall reaches 2·sqrt(ball·r) from its centre along the wall, ≤ 2 × ball for r ≤ ball; a ridge or a sheet
    of tissue between the lungs is longer). Nodules much wider than 2 × `ball_mm` are not found (the
    segmentation finds those); a compact pinch of tissue where two lungs come closer than 2 × `ball_mm` can
    be (the classifier judges it). No lungs found: no bumps.
    """
    hu = _check_hu(hu)
    if not isinstance(lungs, LungMask) or hu.shape != tuple(lungs.shape_irc):
        found = f"of a {tuple(lungs.shape_irc)} CT" if isinstance(lungs, LungMask) else f"a {type(lungs).__name__}"
        raise DataFormatError(f"surface_bumps: lungs is {found}; expected the LungMask of this {hu.shape} CT")
    if not lungs.found:
        return _no_bumps()
    spacing = np.asarray(lungs.voxel_size_xyz[::-1], dtype=np.float64)
    factors = np.maximum(1, np.round(SURFACE_GRID_MM / spacing)).astype(int)
    grid_mm = spacing * factors
    box = lungs.box(ball_mm + 2 * float(grid_mm.max()))
    start = np.array([part.start for part in box], dtype=np.int64)
    means = _block_means(hu[box], factors)
    if min(means.shape) == 0:
        return _no_bumps()
    air = _surface_air(means, lungs, start, factors, grid_mm)
    pad = int(np.ceil(ball_mm / grid_mm.min())) + 1
    padded = np.pad(air, pad)
    grown = scipy.ndimage.distance_transform_edt(~padded, sampling=grid_mm) <= ball_mm
    closed = scipy.ndimage.distance_transform_edt(grown, sampling=grid_mm) > ball_mm
    bumps = closed[pad:-pad, pad:-pad, pad:-pad] & ~air & (means > AIR_HU)
    labels, _ = scipy.ndimage.label(bumps, structure=np.ones((3, 3, 3), dtype=bool))
    found = []
    for j, part in enumerate(scipy.ndimage.find_objects(labels)):
        measured = _bump_shape(labels, j + 1, part, means, grid_mm, ball_mm)
        if measured is not None:
            found.append((*measured, j))
    found.sort(key=lambda item: (-item[0], item[-1]))  # thickest first
    offsets = np.stack(np.meshgrid(*[np.arange(f) for f in factors], indexing="ij"), -1).reshape(-1, 3)
    voxels = [(item[3][:, None, :] * factors + offsets[None]).reshape(-1, 3) + start for item in found]
    return SurfaceBumps(
        voxels_irc=voxels,
        center_irc=np.array([v.mean(axis=0) for v in voxels], dtype=np.float64).reshape(-1, 3),
        radius_mm=np.array([item[0] for item in found], dtype=np.float64),
        mean_hu=np.array([item[1] for item in found], dtype=np.float64),
        elongation=np.array([item[2] for item in found], dtype=np.float64),
    )


def _surface_air(
    means: np.ndarray, lungs: LungMask, start: np.ndarray, factors: np.ndarray, grid_mm: np.ndarray
) -> np.ndarray:
    """The lungs' air on `surface_bumps`' grid (block means `means` of the CT from voxel `start` on): below
    `AIR_HU`, not touching its slice's border (the room's air, where the chest wall is thin), each
    block's centre near the coarse lungs, holes filled slice by slice."""
    near = lungs.near(2.0 * float(grid_mm.max()))
    centres = [np.arange(n) * f + f // 2 + s for n, f, s in zip(means.shape, factors, start, strict=True)]
    air = _inside_air(means < AIR_HU) & near[np.ix_(*(lungs.coarse_axis(c, axis) for axis, c in enumerate(centres)))]
    return scipy.ndimage.binary_fill_holes(air, structure=_IN_PLANE)


def _bump_shape(
    labels: np.ndarray, label: int, part: tuple[slice, ...], means: np.ndarray, grid_mm: np.ndarray, ball_mm: float
) -> tuple[float, float, float, np.ndarray] | None:
    """(radius mm, mean HU, elongation, its grid cells (m, 3)) of bump `label` (box `part`), or None when it
    does not look like a nodule (see `surface_bumps`)."""
    member = labels[part] == label
    mean_hu = float(means[part][member].mean())
    depth = scipy.ndimage.distance_transform_edt(np.pad(member, 1), sampling=grid_mm)  # padded: the outside counts
    radius = float(depth.max())
    if mean_hu <= SURFACE_MIN_HU or radius < SURFACE_MIN_RADIUS_MM:
        return None
    cells = np.argwhere(member) + np.array([p.start for p in part])
    extent_mm = (cells.max(axis=0) - cells.min(axis=0) + 1) * grid_mm
    if (extent_mm > 4.0 * ball_mm + grid_mm).any():  # a ridge or a sheet of tissue, longer than a bump can be
        return None
    elongation = _elongation(cells * grid_mm)
    return (radius, mean_hu, elongation, cells) if elongation <= SURFACE_MAX_ELONGATION else None
