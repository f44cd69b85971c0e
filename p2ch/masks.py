"""Nodule masks from LUNA16 annotations (centre + diameter): the segmentation targets of chapter 13.

The rule (`MaskRule`, versioned by `MASK_VERSION`), for each annotation, on a box of voxels around it:

1. Search sphere: voxels whose centre lies within `search_scale` × radius + `margin_mm` of the
   annotation's centre, in mm, so anisotropic spacing gives a sphere in mm, not in voxels.
2. Threshold half-way between the nodule's density and the lung's around it: where partial volume
   puts the edge (a voxel half nodule, half lung reads the mean of the two). The nodule's density is
   a low percentile (`nodule_percentile`) of the voxels within `inner_fraction` × radius of the
   centre, so a part-solid nodule's core does not lift the threshold above its halo, and a
   ground-glass nodule (-500..-300 HU) gets a threshold below its own density rather than a fixed
   -600 that would cut it. The lung's is the median of the lung-like voxels (< `lung_max_hu`) in a
   shell `background_mm` thick around the search sphere (`lung_hu` when there are too few). The
   threshold is kept within [`min_threshold_hu`, `max_threshold_hu`]; `threshold_hu` fixes it.
3. Keep the face-connected (6-neighbour) component of the voxels above the threshold in the search
   sphere that holds the centre's voxel (or is nearest to the centre).
4. Rays (`rays`): a nodule touching the chest wall, the mediastinum or a vessel is as dense as what
   it touches, so no threshold separates them. From the centre, `ray_rows` × 2·`ray_rows` rays
   sample the HU (trilinear) and find where each first falls below the threshold. A ray that does
   (and not beyond `max_radius_ratio` × the median of such radii) has seen the nodule's edge: voxels
   in its direction are kept up to that radius + `edge_tolerance_mm`. In every other direction
   (blocked: still above the threshold at the search sphere; or far beyond the median: along a
   vessel) the edge is not seen and the mask stops at the median radius (the annotation's radius
   when fewer than `min_free_fraction` of the rays see an edge). The nodule is thus taken to be
   star-shaped about its centre; a lucency inside it (an air bronchogram) cuts the rays through it.
5. Fill the holes of what is left; with `recentre`, run 1-5 once more from the centroid of the first
   mask (an annotation's centre is a reader's click, and the rays see the edge evenly from the middle).
6. When nothing in the search sphere is above the threshold, the mask is the sphere of the
   annotation's diameter (the annotation says a nodule of that size is there).

Where two nodules' masks overlap, a voxel goes to the nearer annotation centre (mm). The result is a
deterministic function of the voxels, the annotations and the settings.

Measured against synthetic truth by `benchmarks/bench_masks.py` (figures in BENCHMARKS.md), next to
the book's rule (`book_mask`: a box grown while voxels stay above -700 HU, thresholded at -700 HU).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from p2ch.errors import ConfigError, DataFormatError
from p2ch.geometry import inside_volume, xyz2irc

if TYPE_CHECKING:
    from p2ch.ct import Ct

# Bump when the rule or its defaults change: caches key masks by it.
MASK_VERSION = 1

_FACES = ndimage.generate_binary_structure(3, 1)  # 6-connectivity: a diagonal touch does not join
_MIN_LUNG_VOXELS = 8


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """Settings of the mask rule (the module docstring's steps); HU and mm throughout.

    threshold_hu: a fixed threshold instead of the adaptive one (None: adaptive).
    level: where the adaptive threshold sits between lung (0) and nodule (1) density.
    min_threshold_hu, max_threshold_hu: bounds of the adaptive threshold.
    inner_fraction: the nodule's density is read within this fraction of its radius.
    nodule_percentile: the percentile of those voxels taken as the nodule's density.
    lung_max_hu: voxels below this count as lung when reading the lung's density.
    lung_hu: the lung's density when too few lung voxels surround the search sphere.
    background_mm: thickness of the shell around the search sphere where the lung is read.
    search_scale, margin_mm: the search sphere's radius is search_scale × radius + margin_mm.
    rays: cut along rays from the centre (step 4); False keeps the thresholded component as it is.
    ray_rows: rays on a polar grid of ray_rows × 2·ray_rows directions.
    max_radius_ratio: a ray's edge beyond this × the median edge radius is taken for a vessel.
    edge_tolerance_mm: slack beyond a ray's edge (a voxel's direction differs from its ray's).
    min_free_fraction: fewer rays than this seeing an edge: blocked directions stop at the
        annotation's radius instead of the median edge radius.
    recentre: a second pass from the centroid of the first mask.
    """

    threshold_hu: float | None = None
    level: float = 0.5
    min_threshold_hu: float = -700.0
    max_threshold_hu: float = -300.0
    inner_fraction: float = 0.75
    nodule_percentile: float = 20.0
    lung_max_hu: float = -600.0
    lung_hu: float = -850.0
    background_mm: float = 3.0
    search_scale: float = 1.5
    margin_mm: float = 0.5
    rays: bool = True
    ray_rows: int = 32
    max_radius_ratio: float = 1.25
    edge_tolerance_mm: float = 0.5
    min_free_fraction: float = 0.2
    recentre: bool = True

    def __post_init__(self) -> None:
        checks = (
            ("level", 0 < self.level < 1, "a fraction between 0 and 1"),
            ("inner_fraction", 0 < self.inner_fraction <= 1, "a fraction in (0, 1]"),
            ("nodule_percentile", 0 <= self.nodule_percentile <= 100, "a percentile from 0 to 100"),
            ("search_scale", self.search_scale > 0, "a positive factor"),
            ("margin_mm", self.margin_mm >= 0, "mm >= 0"),
            ("background_mm", self.background_mm > 0, "mm > 0"),
            ("ray_rows", isinstance(self.ray_rows, int) and self.ray_rows >= 4, "an integer >= 4"),
            ("max_radius_ratio", self.max_radius_ratio >= 1, "a factor >= 1"),
            ("edge_tolerance_mm", self.edge_tolerance_mm >= 0, "mm >= 0"),
            ("min_free_fraction", 0 <= self.min_free_fraction <= 1, "a fraction from 0 to 1"),
            ("min_threshold_hu", self.min_threshold_hu <= self.max_threshold_hu, "at most max_threshold_hu"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"mask setting {name}={getattr(self, name)!r}: expected {expected}")

    def as_dict(self) -> dict:
        """The settings with the rule's version, for cache keys and run records."""
        return {"mask_version": MASK_VERSION, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class _Box:
    """A nodule's box: `region` (slices of the volume), `lo` (3,) its first voxel, `dist` mm from the centre."""

    region: tuple[slice, slice, slice]
    lo: np.ndarray
    dist: np.ndarray  # (i, r, c) float32 mm
    center_irc: np.ndarray  # (3,) continuous voxel coordinates in the volume
    spacing: np.ndarray  # (3,) mm per voxel


def _box(shape_irc: Sequence[int], center_irc: np.ndarray, reach_mm: float, spacing: np.ndarray) -> _Box:
    half = reach_mm / spacing
    lo = np.maximum(np.floor(center_irc - half).astype(np.int64), 0)
    hi = np.minimum(np.ceil(center_irc + half).astype(np.int64) + 1, np.asarray(shape_irc))
    offsets = [((np.arange(lo[a], hi[a]) - center_irc[a]) * spacing[a]).astype(np.float32) for a in range(3)]
    dist = np.sqrt(offsets[0][:, None, None] ** 2 + offsets[1][None, :, None] ** 2 + offsets[2][None, None, :] ** 2)
    return _Box((slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])), lo, dist, center_irc, spacing)


def _threshold(crop: np.ndarray, dist: np.ndarray, radius_mm: float, reach_mm: float, rule: MaskRule) -> float:
    """The HU threshold for one nodule: fixed, or half-way between its density and the lung's."""
    if rule.threshold_hu is not None:
        return float(rule.threshold_hu)
    inner = dist <= rule.inner_fraction * radius_mm
    # A nodule within a voxel of its centre: read the voxel nearest to the centre.
    values = crop[inner] if inner.any() else crop.ravel()[[int(np.argmin(dist))]]
    nodule_hu = float(np.percentile(values, rule.nodule_percentile))
    shell = (dist > reach_mm) & (dist <= reach_mm + rule.background_mm) & (crop < rule.lung_max_hu)
    lung_hu = float(np.median(crop[shell])) if np.count_nonzero(shell) >= _MIN_LUNG_VOXELS else rule.lung_hu
    threshold = lung_hu + rule.level * (nodule_hu - lung_hu)
    return float(np.clip(threshold, rule.min_threshold_hu, rule.max_threshold_hu))


def _component_at_centre(foreground: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """The face-connected component of `foreground` nearest to the centre (holding it, when it is inside)."""
    labels, count = ndimage.label(foreground, structure=_FACES)
    if count == 0:
        return foreground
    # The nearest foreground voxel (the centre's own when it is foreground); ties go to the first in C order.
    nearest = np.argmin(np.where(foreground, dist, np.inf))
    return labels == labels.ravel()[nearest]


@functools.cache
def _ray_directions(rows: int) -> np.ndarray:
    """(rows, 2·rows, 3) unit vectors (index, row, col): cell centres of a polar grid about the index axis."""
    theta = (np.arange(rows) + 0.5) * np.pi / rows
    phi = (np.arange(2 * rows) + 0.5) * np.pi / rows
    axes = (np.cos(theta)[:, None], np.sin(theta)[:, None] * np.cos(phi), np.sin(theta)[:, None] * np.sin(phi))
    return np.stack(np.broadcast_arrays(*axes), axis=-1)


def _ray_cell(offsets_mm: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The polar-grid cell (θ row, φ column) of each offset (K, 3) mm from the centre: two (K,) int arrays."""
    dist = np.maximum(np.linalg.norm(offsets_mm, axis=1), 1e-9)
    theta = np.arccos(np.clip(offsets_mm[:, 0] / dist, -1.0, 1.0))
    phi = np.mod(np.arctan2(offsets_mm[:, 2], offsets_mm[:, 1]), 2 * np.pi)
    step = np.pi / rows
    return np.minimum((theta / step).astype(int), rows - 1), np.minimum((phi / step).astype(int), 2 * rows - 1)


def _ray_edges(crop: np.ndarray, origin: np.ndarray, threshold: float, reach_mm: float, spacing, rows: int):
    """Where each ray from the centre first falls below the threshold, after rising above it.

    crop: (i, r, c) float32 HU; origin: (3,) the centre in crop voxels. Returns (radius_mm, fell):
    (rows, 2·rows) float64 mm, interpolated between samples, and bool, False for a ray that never
    falls within `reach_mm` (blocked, or never above the threshold).
    """
    step = float(np.min(spacing)) / 4
    t = np.arange(0.0, reach_mm + step, step)
    coords = origin + _ray_directions(rows)[:, :, None, :] * (t[:, None] / spacing)  # (rows, 2·rows, T, 3)
    samples = ndimage.map_coordinates(crop, coords.reshape(-1, 3).T, order=1, mode="nearest").reshape(coords.shape[:3])
    above = samples > threshold
    fallen = np.maximum.accumulate(above, axis=2) & ~above
    first = np.argmax(fallen, axis=2)[..., None]
    outside = np.take_along_axis(samples, first, axis=2)[..., 0]
    inside = np.take_along_axis(samples, np.maximum(first - 1, 0), axis=2)[..., 0]
    fraction = np.clip((inside - threshold) / np.maximum(inside - outside, 1e-6), 0.0, 1.0)
    return (np.maximum(first[..., 0] - 1, 0) + fraction) * step, fallen.any(axis=2)


def _cut_along_rays(mask: np.ndarray, crop: np.ndarray, box: _Box, threshold: float, reach_mm: float, radius_mm, rule):
    """Step 4: keep each voxel of `mask` up to the edge its ray saw, else up to the median edge radius."""
    origin = box.center_irc - box.lo
    radii, fell = _ray_edges(crop, origin, threshold, reach_mm, box.spacing, rule.ray_rows)
    typical = float(np.median(radii[fell])) if fell.mean() >= rule.min_free_fraction else radius_mm
    edge = fell & (radii <= rule.max_radius_ratio * typical)
    limit = np.where(edge, radii + rule.edge_tolerance_mm, typical)
    voxels = np.argwhere(mask)
    offsets = (voxels - origin) * box.spacing
    row, column = _ray_cell(offsets, rule.ray_rows)
    cut = np.linalg.norm(offsets, axis=1) >= limit[row, column]
    out = mask.copy()
    out[tuple(voxels[cut].T)] = False
    return out


def _one_pass(hu: np.ndarray, center_irc: np.ndarray, radius_mm: float, spacing: np.ndarray, rule: MaskRule):
    """Steps 1-5 around `center_irc`: (box, (i, r, c) bool mask, whether anything was above the threshold)."""
    reach_mm = rule.search_scale * radius_mm + rule.margin_mm
    box = _box(hu.shape, center_irc, reach_mm + rule.background_mm, spacing)
    crop = hu[box.region].astype(np.float32)
    threshold = _threshold(crop, box.dist, radius_mm, reach_mm, rule)
    foreground = (crop > threshold) & (box.dist <= reach_mm)
    if not foreground.any():
        return box, box.dist < radius_mm, False
    mask = _component_at_centre(foreground, box.dist)
    if rule.rays:
        cut = _cut_along_rays(mask, crop, box, threshold, reach_mm, radius_mm, rule)
        if cut.any():
            mask = _component_at_centre(cut, box.dist)
    return box, ndimage.binary_fill_holes(mask), True


def _nodule_mask(hu: np.ndarray, center_irc: np.ndarray, radius_mm: float, spacing: np.ndarray, rule: MaskRule):
    """One nodule's mask: (box, (i, r, c) bool in the box)."""
    box, mask, found = _one_pass(hu, center_irc, radius_mm, spacing, rule)
    if rule.recentre and found:
        box, mask, _ = _one_pass(hu, box.lo + np.argwhere(mask).mean(axis=0), radius_mm, spacing, rule)
    return box, mask


def _check_inputs(hu, centers_irc, diameters_mm, voxel_size_irc) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """centers (N, 3) float64, diameters (N,) float64, spacing (3,) float64; DataFormatError naming a bad nodule."""
    if np.ndim(hu) != 3:
        raise ValueError(f"hu: expected an (I, R, C) volume, got shape {np.shape(hu)}")
    centers = np.asarray(centers_irc, dtype=np.float64)
    diameters = np.asarray(diameters_mm, dtype=np.float64)
    if centers.size == 0 and diameters.size == 0:
        centers, diameters = centers.reshape(0, 3), diameters.reshape(0)
    if centers.ndim != 2 or centers.shape[1] != 3 or diameters.shape != (len(centers),):
        raise ValueError(
            f"centers_irc {centers.shape}, diameters_mm {diameters.shape}: expected (N, 3) and (N,) for N nodules"
        )
    spacing = np.asarray(voxel_size_irc, dtype=np.float64)
    if spacing.shape != (3,) or not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise DataFormatError(f"voxel_size_irc {tuple(np.ravel(spacing))}: expected 3 positive mm (index, row, col)")
    inside = inside_volume(np.rint(np.nan_to_num(centers, nan=-1.0, posinf=-1.0, neginf=-1.0)), np.shape(hu))
    for k, (center, diameter) in enumerate(zip(centers, diameters, strict=True)):
        where = f"nodule {k} (centre irc ({center[0]:.1f}, {center[1]:.1f}, {center[2]:.1f}), diameter {diameter:g} mm)"
        if not inside[k]:
            size = "×".join(map(str, np.shape(hu)))
            raise DataFormatError(
                f"{where}: the centre lies outside the CT's {size} voxels; check the annotation's coordinates"
            )
        if not (np.isfinite(diameter) and diameter > 0):
            raise DataFormatError(f"{where}: expected a diameter > 0 mm, as annotations.csv lists for nodules")
    return centers, diameters, spacing


def nodule_masks(
    hu: np.ndarray, centers_irc: np.ndarray, diameters_mm: np.ndarray, voxel_size_irc: Sequence[float], **settings
) -> np.ndarray:
    """Per-nodule labels: (I, R, C) int32, k + 1 on nodule k's voxels, 0 elsewhere.

    hu: (I, R, C) int16 HU (clipped to [-1000, 1000], as `Ct.hu`). centers_irc: (N, 3) float,
    continuous voxel coordinates (index, row, col). diameters_mm: (N,) float > 0. voxel_size_irc:
    (3,) mm per voxel along index, row, col. settings: `MaskRule`'s fields (ConfigError for an
    unusable value, TypeError for an unknown name). Where two nodules' masks overlap, a voxel goes
    to the nearer annotation centre (in mm; a tie to the earlier nodule). Raises DataFormatError
    naming the nodule (index, centre, diameter) for a centre outside the volume or a diameter ≤ 0;
    the caller adds the series uid.
    """
    rule = MaskRule(**settings)
    centers, diameters, spacing = _check_inputs(hu, centers_irc, diameters_mm, voxel_size_irc)
    labels = np.zeros(np.shape(hu), dtype=np.int32)
    for k, (center, diameter) in enumerate(zip(centers, diameters, strict=True)):
        box, mask = _nodule_mask(hu, center, diameter / 2, spacing, rule)
        sub = labels[box.region]
        taken = mask & (sub > 0)
        if taken.any():
            voxels = np.argwhere(taken) + box.lo
            mine = np.linalg.norm((voxels - center) * spacing, axis=1)
            theirs = np.linalg.norm((voxels - centers[sub[taken] - 1]) * spacing, axis=1)
            mask = mask & ~taken
            mask[taken] = mine < theirs
        sub[mask] = k + 1
    return labels


def build_mask(
    hu: np.ndarray, centers_irc: np.ndarray, diameters_mm: np.ndarray, voxel_size_irc: Sequence[float], **settings
) -> np.ndarray:
    """The union of the nodules' masks: (I, R, C) bool. Arguments and errors as `nodule_masks`."""
    return nodule_masks(hu, centers_irc, diameters_mm, voxel_size_irc, **settings) > 0


def ct_mask(ct: Ct, centers_xyz: np.ndarray, diameters_mm: np.ndarray, *, labels: bool = False, **settings):
    """`build_mask` on a `Ct` with centres in world mm; with labels=True, `nodule_masks`' labels.

    centers_xyz: (N, 3) float mm (x, y, z); diameters_mm: (N,) float. Centres go to voxels through
    the CT's direction matrix (`geometry.xyz2irc`, continuous); distances then use the spacing along
    (index, row, col), exact for any orthonormal direction matrix (LUNA16's are all the identity),
    which turns the voxel grid without stretching it. Returns (I, R, C) bool, or int32 labels.
    DataFormatError messages start with the series uid.
    """
    centers_irc = xyz2irc(
        np.asarray(centers_xyz, dtype=np.float64).reshape(-1, 3),
        ct.origin_xyz,
        ct.voxel_size_xyz,
        ct.direction,
        rounded=False,
    )
    spacing_irc = tuple(ct.voxel_size_xyz)[::-1]
    make = nodule_masks if labels else build_mask
    try:
        return make(ct.hu, centers_irc, diameters_mm, spacing_irc, **settings)
    except DataFormatError as exc:
        raise DataFormatError(f"{ct.series_uid}: {exc}") from None


def book_mask(
    hu: np.ndarray,
    centers_irc: np.ndarray,
    diameters_mm: np.ndarray,
    voxel_size_irc: Sequence[float],
    threshold_hu: float = -700.0,
) -> np.ndarray:
    """The book's rule, for comparison: (I, R, C) bool. Arguments and errors as `nodule_masks`.

    From each annotation's centre voxel, a box grows along each axis (index, row, col) while the
    voxels at ± the radius on the axis line through the centre both stay above `threshold_hu`
    (starting at 2 voxels; the first radius where either is not, or leaves the volume, is the
    box's), and the mask is every voxel above `threshold_hu` in the box. The diameter and the
    spacing play no part.
    """
    centers, _, _ = _check_inputs(hu, centers_irc, diameters_mm, voxel_size_irc)
    shape = np.shape(hu)
    mask = np.zeros(shape, dtype=bool)
    for center in np.rint(centers).astype(np.int64):
        region = []
        for axis in range(3):
            radius = 2
            while True:
                ahead, behind = center.copy(), center.copy()
                ahead[axis] += radius
                behind[axis] -= radius
                if not inside_volume(np.stack([ahead, behind]), shape).all():
                    break
                if hu[tuple(ahead)] <= threshold_hu or hu[tuple(behind)] <= threshold_hu:
                    break
                radius += 1
            region.append(slice(max(center[axis] - radius, 0), center[axis] + radius + 1))
        box = tuple(region)
        mask[box] |= hu[box] > threshold_hu
    return mask
