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
        top = np.asarray(self.coarse.shape, dtype=np.int64) - 1
        coarse = np.minimum(voxels // np.asarray(self.factors, dtype=np.int64), top)
        return coarse[:, 0], coarse[:, 1], coarse[:, 2]

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
