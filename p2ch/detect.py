"""Nodule candidates of a whole CT from the segmentation model (the book's chapter 14, first steps).

- `segment_ct`: the 2D UNet (`p2ch.unet.UNetWrapper`) on every slice of a `p2ch.ct.Ct`, in
  batches. Its input for slice k is exactly what `python -m p2ch.seg_training` trained and
  validated on (`p2ch.slices.SliceCache.slab` → `p2ch.segdatasets` → `.float()` on the device):
  slices k - c … k + c of `ct.hu` as channels in ascending slice order, those beyond the CT's ends
  repeating its first or last slice, int16 HU converted to float32 unscaled (the model's input
  batch norm does the scaling). Returns (I, R, C) float16 probabilities.
- `mask_from_probability`: probabilities → nodule mask (prob > threshold, as validation counts).
- `find_components`: a mask → its 3D connected components (`Components`): density-weighted
  centres (voxel index and world mm), voxel counts, volumes, equivalent diameters, bounding boxes,
  and which are kept as candidates (and why not).
- `find_candidates`: the detector's rule (`CandidateRule`) from a probability map to candidates:
  components split at their probability peaks, the size, lung and `max_candidates` rules, then the
  nodules on the lungs' surface that the segmentation missed (`p2ch.lungs.surface_bumps`), a few on
  top; `Components.source` says which found each.

Units: `irc` = (index, row, col) voxel positions (continuous for centres), `xyz` = patient mm
(`p2ch.geometry`); volumes in mm³, diameters in mm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import scipy.ndimage
import torch

from p2ch.ct import HU_MIN
from p2ch.errors import ConfigError, DataFormatError
from p2ch.geometry import irc2xyz
from p2ch.lungs import DEFAULT_BOX_MARGIN_MM, lung_mask, surface_bumps
from p2ch.progress import Progress
from p2ch.runtime import autocast
from p2ch.segmetrics import component_structure
from p2ch.unet import receptive_radius

# LUNA16 annotates nodules of 3 to 30 mm. Keep a margin on both sides: a segmented nodule can be a
# little smaller or larger than its annotated diameter, and the classifier judges what is kept.
DEFAULT_MIN_DIAMETER_MM = 2.0
DEFAULT_MAX_DIAMETER_MM = 40.0
DEFAULT_MIN_VOXELS = 2
# The book weights a component's centre of mass by HU + 1001: air (-1000 HU) weighs 1, never 0,
# and denser tissue (the nodule's core rather than its fuzzy rim) pulls the centre towards itself.
DENSITY_OFFSET_HU = 1001


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} is {value!r}; expected an integer >= {minimum}")
    return int(value)


def _check_hu(ct: Any) -> np.ndarray:
    hu = getattr(ct, "hu", None)
    if not isinstance(hu, np.ndarray) or hu.ndim != 3 or hu.dtype != np.int16:
        found = (hu.shape, hu.dtype) if isinstance(hu, np.ndarray) else type(hu).__name__
        raise DataFormatError(f"ct.hu is {found}; expected an (I, R, C) int16 HU array (a p2ch.ct.Ct)")
    return hu


def slab_batch(hu: np.ndarray, start: int, stop: int, context_slices: int, device: torch.device) -> torch.Tensor:
    """The segmentation model's input for slices start … stop - 1: (stop - start, 2c + 1, R, C) float32 HU.

    hu: (I, R, C) int16 HU. Channel j of slice k is slice clip(k - c + j, 0, I - 1) (edge slices
    repeated), as `SliceCache.slab` gives it; HU are converted to float32 unscaled, as the training
    app's `.float()` does. Only the int16 band of slices start - c … stop - 1 + c is copied to
    `device`; the channels are gathered there.
    """
    n_slices = hu.shape[0]
    low, high = max(start - context_slices, 0), min(stop + context_slices, n_slices)
    band = hu[low:high]
    if not band.flags.writeable:  # torch.from_numpy warns about read-only arrays (e.g. a memmap)
        band = band.copy()
    wanted = np.arange(start, stop)[:, None] + np.arange(-context_slices, context_slices + 1)[None, :]
    index = torch.from_numpy(np.clip(wanted, 0, n_slices - 1) - low).to(device)
    return torch.from_numpy(band).to(device)[index].to(torch.float32)


def segmentation_margin_mm(model: torch.nn.Module, ct: Any, near_mm: float) -> float:
    """How far around the lungs `segment_ct` must run so that everything within `near_mm` of them gets the
    probabilities it would get from the whole slices: `near_mm` plus the UNet's reach (`unet.receptive_radius`)
    at the coarser in-plane spacing, and at least `lungs.DEFAULT_BOX_MARGIN_MM`."""
    settings = getattr(model, "settings", None)
    settings = settings if isinstance(settings, dict) else {}
    reach = receptive_radius(int(settings.get("depth", 3)), settings.get("up_mode", "upconv"))
    reach_mm = reach * max(float(ct.voxel_size_xyz[0]), float(ct.voxel_size_xyz[1]))
    return max(DEFAULT_BOX_MARGIN_MM, near_mm + reach_mm)


def _pooling_step(model: torch.nn.Module) -> int:
    """2**(depth-1): the UNet's coarsest pooling step in pixels (1 for a model without settings)."""
    settings = getattr(model, "settings", None)
    if not isinstance(settings, dict) or "depth" not in settings:
        return 1
    if settings.get("padding") is False:
        raise ConfigError("segment_ct needs a UNet with padded convolutions (padding=True), as seg_training builds")
    return 2 ** (int(settings["depth"]) - 1)


def _padded_size(model: torch.nn.Module, rows: int, cols: int) -> tuple[int, int]:
    """(R', C') ≥ (R, C): the next multiples of 2**(depth-1) a padded UNet takes (R, C when it has no settings)."""
    step = _pooling_step(model)
    return -(-rows // step) * step, -(-cols // step) * step


def segment_ct(
    model: torch.nn.Module,
    ct: Any,
    *,
    context_slices: int,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 16,
    channels_last: bool = True,
    progress: bool = False,
    region: np.ndarray | None = None,
) -> np.ndarray:
    """P(nodule) of every voxel of `ct`: the segmentation model on each slice, `batch_size` slices at a time.

    model: a `UNetWrapper` (e.g. from `p2ch.checkpoint.load_segmentation_model`); it is moved to
        `device` and set to eval mode in place (and to channels_last memory format with `channels_last`).
    ct: a `p2ch.ct.Ct` (anything with `hu`: (I, R, C) int16 HU). context_slices: c, the model's
        2c + 1 input channels (the checkpoint's `context_slices`). amp_dtype: autocast dtype or None.
    region: None (every voxel), or (I, 4) int per slice: row start, row stop, col start, col stop
        of the part to segment (`p2ch.lungs.LungMask.slice_boxes`: the lungs and a margin); a slice
        whose box is empty is not segmented. Each batch runs on the union of its slices' boxes, so
        the model sees whole neighbourhoods there; voxels outside get probability 0.
    Input per slice: `slab_batch`. Rows and columns that are not a multiple of 2**(depth-1) are
    padded with air (-1000 HU) at the far end and the padding is cut from the output (a CT that the
    training app could validate is never padded).
    Returns (I, R, C) float16 probabilities in [0, 1] (channel 0 of the model's sigmoid output).
    Memory: the output, and per batch the int16 band, its float32 slab and the model's activations.
    """
    hu = _check_hu(ct)
    c = _check_int("context_slices", context_slices, 0)
    step = _check_int("batch_size", batch_size, 1)
    boxes = _check_region(region, hu.shape)
    device = torch.device(device)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    out = torch.zeros(hu.shape, dtype=torch.float16, device=device)
    batches = list(_region_batches(boxes, step))
    grid = _pooling_step(model)
    with torch.inference_mode(), Progress(hu.shape[0], "segmenting", "slices", enabled=progress) as bar:
        for start, stop, (r0, r1, c0, c1) in batches:
            # A box starts on the pooling grid of the whole slice (a multiple of 2**(depth-1)): a UNet is not
            # shift-invariant, and a box shifted by one pixel against the grid gives other probabilities.
            r0, c0 = r0 // grid * grid, c0 // grid * grid
            if r1 > r0 and c1 > c0:
                prob = _segment_batch(model, hu[:, r0:r1, c0:c1], start, stop, c, device, amp_dtype, channels_last)
                out[start:stop, r0:r1, c0:c1] = prob
            bar.update(stop - start)
    return out.cpu().numpy()


def _check_region(region: Any, shape: tuple[int, ...]) -> np.ndarray:
    """(I, 4) int64 boxes (row start, row stop, col start, col stop), the whole slice for None."""
    n_slices, rows, cols = shape
    if region is None:
        return np.tile(np.array([0, rows, 0, cols], dtype=np.int64), (n_slices, 1))
    boxes = np.asarray(region)
    if boxes.shape != (n_slices, 4) or not np.issubdtype(boxes.dtype, np.integer):
        raise DataFormatError(f"segment_ct: region is {boxes.shape} {boxes.dtype}; expected ({n_slices}, 4) integers")
    limits = np.array([rows, rows, cols, cols])
    if (
        (boxes < 0).any()
        or (boxes > limits).any()
        or (boxes[:, 1] < boxes[:, 0]).any()
        or (boxes[:, 3] < boxes[:, 2]).any()
    ):
        raise DataFormatError(f"segment_ct: region holds boxes outside the slice (rows {rows}, cols {cols})")
    return boxes.astype(np.int64)


def _region_batches(boxes: np.ndarray, step: int) -> Iterator[tuple[int, int, tuple[int, int, int, int]]]:
    """(start, stop, union box) of runs of up to `step` consecutive slices with a box; slices without one
    come as runs of their own with an empty box."""
    n_slices = len(boxes)
    present = (boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2])
    start = 0
    while start < n_slices:
        stop = start + 1
        while stop < n_slices and stop - start < step and present[stop] == present[start]:
            stop += 1
        part = boxes[start:stop]
        if present[start]:
            union = (int(part[:, 0].min()), int(part[:, 1].max()), int(part[:, 2].min()), int(part[:, 3].max()))
        else:
            union = (0, 0, 0, 0)
        yield start, stop, union
        start = stop


def _segment_batch(
    model: torch.nn.Module, hu: np.ndarray, start: int, stop: int, context_slices: int, device: torch.device,
    amp_dtype: torch.dtype | None, channels_last: bool,
) -> torch.Tensor:  # fmt: skip
    """(stop - start, R, C) float16 probabilities of slices start … stop - 1 of `hu` (I, R, C) int16."""
    rows, cols = hu.shape[1:]
    padded_rows, padded_cols = _padded_size(model, rows, cols)
    x = slab_batch(hu, start, stop, context_slices, device)
    if (padded_rows, padded_cols) != (rows, cols):
        x = torch.nn.functional.pad(x, (0, padded_cols - cols, 0, padded_rows - rows), value=float(HU_MIN))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        prob = model(x)
    if prob.ndim != 4 or tuple(prob.shape[2:]) != (padded_rows, padded_cols):
        raise DataFormatError(
            f"segment_ct: the model gave {tuple(prob.shape)} for input {tuple(x.shape)}; expected "
            f"(N, 1, {padded_rows}, {padded_cols}) probabilities (a UNetWrapper with padding=True)"
        )
    return prob[:, 0, :rows, :cols].to(torch.float16)


def mask_from_probability(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Nodule mask: prob (I, R, C) float in [0, 1] → (I, R, C) bool, True where prob > threshold.

    Strictly greater, as `python -m p2ch.seg_training` counts a predicted pixel in validation.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold is {threshold!r}; expected a probability in (0, 1), e.g. the checkpoint's")
    return np.asarray(prob) > threshold


@dataclasses.dataclass(frozen=True, eq=False)
class Components:
    """The 3D connected components of a mask, one row per component (label order: raster order of first voxel).

    center_irc: (n, 3) float64 density-weighted centre of mass, continuous voxel index (index, row,
        col), weights HU + 1001 (`DENSITY_OFFSET_HU`). center_xyz: (n, 3) float64, the same in patient
        mm (`p2ch.geometry.irc2xyz`, any direction matrix).
    voxels: (n,) int64. volume_mm3: (n,) float64, voxels × voxel volume (product of the
        spacing). diameter_mm: (n,) float64, the diameter of the sphere of that volume, (6 V / π)^(1/3).
    bbox_start_irc, bbox_stop_irc: (n, 3) int64 bounding box, start inclusive, stop exclusive.
    kept: (n,) bool, a candidate. reason: (n,) str, "" when kept, else why not: "too_small",
        "too_large" (the size rule), "outside_lungs", "over_max_candidates" (`find_candidates`).
    score: (n,) float64, the segmentation's highest probability in the component (nan from
        `find_components`, which sees only the mask).
    source: (n,) str, where it comes from: "segmentation" (the model's mask) or "lung surface" (a bump on
        the lungs' surface, `p2ch.lungs.surface_bumps`, added by `find_candidates`).
    """

    center_irc: np.ndarray
    center_xyz: np.ndarray
    voxels: np.ndarray
    volume_mm3: np.ndarray
    diameter_mm: np.ndarray
    bbox_start_irc: np.ndarray
    bbox_stop_irc: np.ndarray
    kept: np.ndarray
    reason: np.ndarray
    score: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.voxels)

    def take(self, selection: np.ndarray) -> Components:
        """The rows `selection` picks: an (n,) bool mask (e.g. `kept`) or integer positions."""
        return Components(**{f.name: getattr(self, f.name)[selection] for f in dataclasses.fields(self)})


def _check_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.shape != shape:
        found = (mask.shape, mask.dtype) if isinstance(mask, np.ndarray) else type(mask).__name__
        raise DataFormatError(
            f"find_components: mask is {found}; expected an {shape} bool array like ct.hu "
            "(threshold probabilities with mask_from_probability)"
        )
    return mask


def _check_limits(min_voxels: Any, min_diameter_mm: Any, max_diameter_mm: Any) -> None:
    _check_int("min_voxels", min_voxels, 0)
    for name, value in (("min_diameter_mm", min_diameter_mm), ("max_diameter_mm", max_diameter_mm)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"{name} is {value!r}; expected a number of mm >= 0")
    if max_diameter_mm < min_diameter_mm:
        raise ConfigError(f"max_diameter_mm {max_diameter_mm} is below min_diameter_mm {min_diameter_mm}")


def _weighted_centres(hu: np.ndarray, labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(voxel counts (n,) int64, centres (n, 3) float64 irc): `ndimage.center_of_mass(hu + 1001, labels, 1…n)`.

    Computed from the labelled voxels alone (no float copy of the CT): per-label sums with bincount.
    """
    coords = np.nonzero(labels)
    which = labels[coords]
    weights = hu[coords].astype(np.float64) + DENSITY_OFFSET_HU
    voxels = np.bincount(which, minlength=count + 1)[1:].astype(np.int64)
    total = np.bincount(which, weights=weights, minlength=count + 1)[1:]
    centres = np.stack(
        [np.bincount(which, weights=weights * axis, minlength=count + 1)[1:] for axis in coords], axis=1
    ).reshape(count, 3)
    return voxels, centres / np.maximum(total, np.finfo(np.float64).tiny)[:, None]


def find_components(
    mask: np.ndarray,
    ct: Any,
    *,
    min_voxels: int = DEFAULT_MIN_VOXELS,
    min_diameter_mm: float = DEFAULT_MIN_DIAMETER_MM,
    max_diameter_mm: float = DEFAULT_MAX_DIAMETER_MM,
    connectivity: int = 26,
    return_labels: bool = False,
) -> Components | tuple[Components, np.ndarray]:
    """The 3D connected components of `mask` in `ct`, measured, and which of them are nodule candidates.

    mask: (I, R, C) bool, e.g. `mask_from_probability(segment_ct(...), threshold)`. ct: a `p2ch.ct.Ct`
    (hu, origin_xyz, voxel_size_xyz, direction). connectivity: 6 (faces) or 26 (also edges and
    corners, as `p2ch.segmetrics` counts nodules). A component is "too_small" below `min_voxels`
    voxels or `min_diameter_mm`, "too_large" above `max_diameter_mm` (equivalent diameters; the
    defaults bracket LUNA16's 3–30 mm nodules). See `Components` for the measures.
    With `return_labels`, returns `(components, labels)`: labels (I, R, C) int32, j + 1 on the voxels of
    row j of `components`, 0 elsewhere (what label maps on the CT's grid are written from).
    """
    hu = _check_hu(ct)
    mask = _check_mask(mask, hu.shape)
    _check_limits(min_voxels, min_diameter_mm, max_diameter_mm)
    labels, count = scipy.ndimage.label(mask, structure=component_structure(connectivity))
    voxels, center_irc = _weighted_centres(hu, labels, count)
    rule = {"min_voxels": min_voxels, "min_diameter_mm": min_diameter_mm, "max_diameter_mm": max_diameter_mm}
    reason = _size_reasons(voxels, _spacing_irc(ct), SimpleNamespace(**rule))
    components = _components(labels, count, ct, center_irc, voxels, reason, np.full(count, np.nan))
    return (components, labels.astype(np.int32, copy=False)) if return_labels else components


def _size_reasons(voxels: np.ndarray, spacing_irc: np.ndarray, rule: Any) -> np.ndarray:
    """(n,) str: "too_small" below min_voxels or min_diameter_mm, "too_large" above max_diameter_mm, else ""."""
    diameter = np.cbrt(6.0 * voxels * float(np.prod(spacing_irc)) / np.pi)
    small = (voxels < rule.min_voxels) | (diameter < rule.min_diameter_mm)
    large = ~small & (diameter > rule.max_diameter_mm)
    return np.where(small, "too_small", np.where(large, "too_large", "")).astype("<U19")


def _components(
    labels: np.ndarray, count: int, ct: Any, center_irc: np.ndarray, voxels: np.ndarray, reason: np.ndarray,
    score: np.ndarray, offset: Any = (0, 0, 0),
) -> Components:  # fmt: skip
    """The `Components` of labels 1…count (of a part of the CT starting at voxel `offset`): boxes, volumes,
    diameters and world centres added."""
    boxes = scipy.ndimage.find_objects(labels, max_label=count)
    shift = np.asarray(offset, dtype=np.int64)
    start = np.array([[s.start for s in box] for box in boxes], dtype=np.int64).reshape(count, 3) + shift
    stop = np.array([[s.stop for s in box] for box in boxes], dtype=np.int64).reshape(count, 3) + shift
    return _measured(ct, center_irc, voxels, start, stop, reason, score, "segmentation")


def _measured(
    ct: Any, center_irc: np.ndarray, voxels: np.ndarray, start: np.ndarray, stop: np.ndarray, reason: np.ndarray,
    score: np.ndarray, source: str,
) -> Components:  # fmt: skip
    """`Components` from centres, voxel counts and boxes: volumes, diameters and world centres added."""
    count = len(voxels)
    volume = voxels * float(np.prod(np.asarray(ct.voxel_size_xyz, dtype=np.float64)))
    center_xyz = np.asarray(irc2xyz(center_irc, ct.origin_xyz, ct.voxel_size_xyz, ct.direction), dtype=np.float64)
    return Components(
        center_irc=center_irc,
        center_xyz=center_xyz.reshape(count, 3),
        voxels=voxels,
        volume_mm3=volume,
        diameter_mm=np.cbrt(6.0 * volume / np.pi),
        bbox_start_irc=start,
        bbox_stop_irc=stop,
        kept=reason == "",
        reason=reason,
        score=np.asarray(score, dtype=np.float64),
        source=np.full(count, source, dtype=object),
    )


def _joined(first: Components, second: Components) -> Components:
    """The rows of `first`, then those of `second`."""
    return Components(
        **{f.name: np.concatenate([getattr(first, f.name), getattr(second, f.name)]) for f in dataclasses.fields(first)}
    )


# ---------------------------------------------------------------------------------------------
# candidates: components split at their probability peaks, kept in the lungs, ranked


@dataclasses.dataclass(frozen=True)
class CandidateRule:
    """How a probability map becomes nodule candidates (`find_candidates`; nodule_analysis and the
    segmentation's validation use the same rule, so validation measures what the detector will get).

    threshold: P(nodule voxel) above which a voxel is segmented. min_voxels, min_diameter_mm,
    max_diameter_mm: the size rule (equivalent-sphere diameter). lungs: drop candidates that do not touch
    the lungs (within `near_lungs_mm` of `p2ch.lungs.lung_mask`'s air; "outside_lungs"). split: split a
    component at its probability peaks (watershed), each peak at least `peak_distance_mm` from a higher one,
    so a small nodule that touches a vessel gets a candidate of its own. centre: "probability" (the region's
    probability-weighted centre, where the model is surest) or "density" (HU + 1001, the book's).
    max_candidates: keep at most this many of the segmentation's regions per CT, the highest segmentation
    scores (`score`: the region's highest probability, ties by voxel count); the rest are
    "over_max_candidates" (0: no limit). surface_candidates: with `lungs`, add at most this many bumps on
    the lungs' surface (`p2ch.lungs.surface_bumps`: nodules on the chest wall or the mediastinum, which a
    segmentation model trained on nodule crops is weakest at), thickest first, those not within
    `peak_distance_mm` of a kept candidate, on top of the `max_candidates` (so they never displace one of
    the segmentation's, and the segmentation's never displace them; 0: none).
    """

    threshold: float = 0.5
    min_voxels: int = DEFAULT_MIN_VOXELS
    min_diameter_mm: float = DEFAULT_MIN_DIAMETER_MM
    max_diameter_mm: float = DEFAULT_MAX_DIAMETER_MM
    lungs: bool = True
    near_lungs_mm: float = 4.0
    split: bool = True
    peak_distance_mm: float = 6.0
    centre: str = "probability"
    max_candidates: int = 30
    surface_candidates: int = 5

    def validate(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"segmentation threshold {self.threshold!r}: expected a probability in (0, 1)")
        _check_limits(self.min_voxels, self.min_diameter_mm, self.max_diameter_mm)
        if self.centre not in CENTRES:
            raise ConfigError(f"centre {self.centre!r}: expected one of {', '.join(CENTRES)}")
        if not self.near_lungs_mm >= 0 or not self.peak_distance_mm > 0:
            raise ConfigError(
                f"near_lungs_mm {self.near_lungs_mm!r} and peak_distance_mm {self.peak_distance_mm!r}: expected "
                "≥ 0 and > 0 mm"
            )
        _check_int("max_candidates", self.max_candidates, 0)
        _check_int("surface_candidates", self.surface_candidates, 0)


CENTRES = ("probability", "density")
CANDIDATE_REASONS = ("", "too_small", "too_large", "outside_lungs", "over_max_candidates")
PEAK_SMOOTHING_MM = 1.0  # the probabilities are smoothed this much (sigma) before their peaks are found


def _spacing_irc(ct: Any) -> np.ndarray:
    return np.asarray(ct.voxel_size_xyz, dtype=np.float64)[::-1]


def _split_component(prob: np.ndarray, inside: np.ndarray, size: tuple[int, ...], sigma: np.ndarray) -> np.ndarray:
    """Regions of one component: (box) int32, 0 outside, 1…k for the k peaks' watershed basins.

    prob: (box) float32 probabilities; inside: (box) bool, the component. A peak is a voxel of the
    smoothed probability that is the highest within a box of `size` voxels around it (plateaus count
    once)."""
    smooth = scipy.ndimage.gaussian_filter(np.where(inside, prob, 0.0).astype(np.float32), sigma, mode="constant")
    peaks = (smooth == scipy.ndimage.maximum_filter(smooth, size=size, mode="constant")) & inside
    markers, count = scipy.ndimage.label(peaks, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return inside.astype(np.int32)
    level = np.round((1.0 - smooth / max(float(smooth.max()), 1e-6)) * 65535).astype(np.uint16)
    # No background marker: it would flood into the component's rim. Outside voxels are the highest level,
    # so the basins meet inside the component before any flood goes round through them.
    regions = scipy.ndimage.watershed_ift(level, markers.astype(np.int32), structure=np.ones((3, 3, 3), dtype=bool))
    return np.where(inside, regions, 0).astype(np.int32)


def split_at_peaks(prob: np.ndarray, labels: np.ndarray, count: int, spacing_irc: np.ndarray, distance_mm: float):
    """Relabel `labels` (I, R, C) int32 (components 1…count of prob > threshold) so that each component
    is split into the watershed basins of its probability peaks; returns (labels, new count).

    A component too small to hold two peaks `distance_mm` apart stays whole (most of them: only those
    are looked at one by one). Components keep their order; the extra basins of a split one are
    numbered after all components."""
    reach = np.floor(distance_mm / spacing_irc).astype(int)
    size = tuple(int(2 * r + 1) for r in reach)
    # Two peaks that far apart hold at least two spheres of half that diameter between them.
    smallest = 2 * np.pi / 6 * (distance_mm / 2) ** 3 / float(np.prod(spacing_irc))
    sigma = PEAK_SMOOTHING_MM / spacing_irc
    voxels = np.bincount(labels.ravel(), minlength=count + 1)
    large = np.flatnonzero(voxels[1:] >= smallest) + 1
    out = labels.copy()
    next_label = count + 1
    boxes = scipy.ndimage.find_objects(labels, max_label=count)
    for k in large.tolist():
        box = boxes[k - 1]
        inside = labels[box] == k
        regions = _split_component(prob[box].astype(np.float32), inside, size, sigma)
        extra = regions > 1  # basin 1 keeps the component's label, the others get new ones
        if extra.any():
            target = out[box]
            target[extra] = regions[extra] + (next_label - 2)
            next_label += int(regions.max()) - 1
    return out, next_label - 1


def _region_measures(
    prob: np.ndarray, hu: np.ndarray, labels: np.ndarray, count: int, offset: np.ndarray
) -> dict[str, np.ndarray]:
    """Per label 1…count, from one pass over its voxels: voxels (n,) int64, score (max probability), mean
    probability, probability- and density-weighted centres (n, 3) float64 irc (offset added), and the
    voxels themselves (coords (m, 3) int64 irc with offset, which (m,) label)."""
    coords = np.nonzero(labels)
    which = labels[coords]
    p = prob[coords].astype(np.float64)
    density = hu[coords].astype(np.float64) + DENSITY_OFFSET_HU
    tiny = np.finfo(np.float64).tiny

    def centre(weights: np.ndarray) -> np.ndarray:
        total = np.bincount(which, weights=weights, minlength=count + 1)[1:]
        sums = [np.bincount(which, weights=weights * axis, minlength=count + 1)[1:] for axis in coords]
        return np.stack(sums, axis=1).reshape(count, 3) / np.maximum(total, tiny)[:, None] + offset

    voxels = np.bincount(which, minlength=count + 1)[1:].astype(np.int64)
    top = np.zeros(count + 1)
    np.maximum.at(top, which, p)
    mean = np.bincount(which, weights=p, minlength=count + 1)[1:] / np.maximum(voxels, 1)
    points = np.stack(coords, axis=1).astype(np.int64) + offset.astype(np.int64)
    return {"voxels": voxels, "score": top[1:], "mean": mean, "probability": centre(p), "density": centre(density),
            "coords": points, "which": which}  # fmt: skip


def _touching(coords: np.ndarray, which: np.ndarray, count: int, near: np.ndarray, lungs: Any) -> np.ndarray:
    """(count,) bool: which labels have a voxel (coords (m, 3) irc of label `which`) in `near` (the lungs'
    coarse mask, grown)."""
    hits = near[lungs.coarse_index(coords)]
    return np.bincount(which, weights=hits, minlength=count + 1)[1:] > 0


def _mask_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of `mask`'s True voxels (its first voxel when there are none)."""
    spans = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        spans.append(slice(int(hit[0]), int(hit[-1]) + 1) if len(hit) else slice(0, 1))
    return tuple(spans)


def find_candidates(
    prob: np.ndarray, ct: Any, rule: CandidateRule | None = None, *, lungs: Any = None
) -> tuple[Components, np.ndarray]:
    """The nodule candidates of a CT's probability map, and the label volume they come from.

    prob: (I, R, C) float probabilities (`segment_ct`). ct: a `p2ch.ct.Ct` (hu and geometry).
    rule: a `CandidateRule` (default: its defaults). lungs: a `p2ch.lungs.LungMask` of this CT, used
    when `rule.lungs` (None: computed here).
    Steps: voxels above the threshold → 26-connected components → (rule.split) each split into the
    basins of its probability peaks → per region: voxels, volume, equivalent diameter, centre
    (rule.centre), box and `score` (its highest probability) → the size rule, the lung rule, then the
    `max_candidates` best scores. Returns `(components, labels)`: labels (I, R, C) int32, where value
    j + 1 marks the voxels of row j of `components` (kept or not).
    """
    rule = rule or CandidateRule()
    rule.validate()
    hu = _check_hu(ct)
    prob = np.asarray(prob)
    if prob.shape != hu.shape:
        raise DataFormatError(f"find_candidates: prob is {prob.shape}; expected the CT's {hu.shape}")
    mask = prob > rule.threshold
    box = _mask_box(mask)  # everything below works on the segmented part of the CT only
    offset = np.array([part.start for part in box], dtype=np.float64)
    sub, count = scipy.ndimage.label(mask[box], structure=component_structure(26))
    sub = sub.astype(np.int32, copy=False)
    del mask
    spacing = _spacing_irc(ct)
    if rule.split and count:
        sub, count = split_at_peaks(prob[box], sub, count, spacing, rule.peak_distance_mm)
    measures = _region_measures(prob[box], hu[box], sub, count, offset)
    voxels, score = measures["voxels"], measures["score"]
    center_irc = measures[rule.centre]
    reason = _size_reasons(voxels, spacing, rule)
    if rule.lungs and (count or rule.surface_candidates):
        lungs = lung_mask(hu, ct.voxel_size_xyz) if lungs is None else lungs
    if rule.lungs and count and lungs.found:
        near = lungs.near(rule.near_lungs_mm)
        outside = ~_touching(measures["coords"], measures["which"], count, near, lungs)
        reason = np.where((reason == "") & outside, "outside_lungs", reason)
    if rule.max_candidates:
        ranked = np.lexsort((-voxels, -score))
        ranked = ranked[reason[ranked] == ""]
        reason[ranked[rule.max_candidates :]] = "over_max_candidates"
    labels = np.zeros(hu.shape, dtype=np.int32)
    labels[box] = sub
    components = _components(sub, count, ct, center_irc, voxels, reason, score, offset)
    if rule.lungs and rule.surface_candidates and lungs.found:
        components = _with_surface_candidates(components, labels, prob, hu, ct, lungs, rule)
    return components, labels


def _with_surface_candidates(
    components: Components, labels: np.ndarray, prob: np.ndarray, hu: np.ndarray, ct: Any, lungs: Any,
    rule: CandidateRule,
) -> Components:  # fmt: skip
    """`components` and the lungs' surface bumps that are not near a kept one (at most
    `CandidateRule.surface_candidates`), their voxels marked in `labels` (where no segmented region is)."""
    bumps = surface_bumps(hu, lungs)
    spacing = _spacing_irc(ct)
    taken = components.center_irc[components.kept]
    chosen = []
    for j in range(len(bumps)):
        if len(chosen) == rule.surface_candidates:
            break
        near = np.linalg.norm((taken - bumps.center_irc[j]) * spacing, axis=1) <= rule.peak_distance_mm
        if not near.any():
            chosen.append(j)
            taken = np.vstack([taken, bumps.center_irc[j]])
    if not chosen:
        return components
    first = len(components) + 1
    start, stop, score = [], [], []
    for k, j in enumerate(chosen):
        where = tuple(bumps.voxels_irc[j].T)
        free = labels[where] == 0
        labels[tuple(axis[free] for axis in where)] = first + k
        start.append(bumps.voxels_irc[j].min(axis=0))
        stop.append(bumps.voxels_irc[j].max(axis=0) + 1)
        score.append(float(np.asarray(prob[where], dtype=np.float64).max()))
    n = len(chosen)
    surface = _measured(
        ct, bumps.center_irc[chosen], np.array([len(bumps.voxels_irc[j]) for j in chosen], dtype=np.int64),
        np.array(start, dtype=np.int64).reshape(n, 3), np.array(stop, dtype=np.int64).reshape(n, 3),
        np.full(n, "", dtype=components.reason.dtype),
        np.array(score), "lung surface",
    )  # fmt: skip
    return _joined(components, surface)
