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

Units: `irc` = (index, row, col) voxel positions (continuous for centres), `xyz` = patient mm
(`p2ch.geometry`); volumes in mm³, diameters in mm.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import scipy.ndimage
import torch

from p2ch.ct import HU_MIN
from p2ch.errors import ConfigError, DataFormatError
from p2ch.geometry import irc2xyz
from p2ch.progress import Progress
from p2ch.runtime import autocast
from p2ch.segmetrics import component_structure

# LUNA16 annotates nodules of 3 to 30 mm. Keep a margin on both sides: a segmented nodule can be a
# little smaller or larger than its annotated diameter, and the classifier judges what is kept.
DEFAULT_MIN_DIAMETER_MM = 2.0
DEFAULT_MAX_DIAMETER_MM = 40.0
DEFAULT_MIN_VOXELS = 2
# The book weights a component's centre of mass by HU + 1001: air (-1000 HU) weighs 1, never 0,
# and denser tissue (the nodule's core rather than its fuzzy rim) pulls the centre towards itself.
DENSITY_OFFSET_HU = 1001
REASONS = ("", "too_small", "too_large")  # Components.reason: kept, or why not


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


def _padded_size(model: torch.nn.Module, rows: int, cols: int) -> tuple[int, int]:
    """(R', C') ≥ (R, C): the next multiples of 2**(depth-1) a padded UNet takes (R, C when it has no settings)."""
    settings = getattr(model, "settings", None)
    if not isinstance(settings, dict) or "depth" not in settings:
        return rows, cols
    if settings.get("padding") is False:
        raise ConfigError("segment_ct needs a UNet with padded convolutions (padding=True), as seg_training builds")
    step = 2 ** (int(settings["depth"]) - 1)
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
) -> np.ndarray:
    """P(nodule) of every voxel of `ct`: the segmentation model on each slice, `batch_size` slices at a time.

    model: a `UNetWrapper` (e.g. from `p2ch.checkpoint.load_segmentation_model`); it is moved to
        `device` and set to eval mode in place (and to channels_last memory format with `channels_last`).
    ct: a `p2ch.ct.Ct` (anything with `hu`: (I, R, C) int16 HU). context_slices: c, the model's
        2c + 1 input channels (the checkpoint's `context_slices`). amp_dtype: autocast dtype or None.
    Input per slice: `slab_batch`. Rows and columns that are not a multiple of 2**(depth-1) are
    padded with air (-1000 HU) at the far end and the padding is cut from the output (a CT that the
    training app could validate is never padded).
    Returns (I, R, C) float16 probabilities in [0, 1] (channel 0 of the model's sigmoid output).
    Memory: the output, and per batch the int16 band, its float32 slab and the model's activations.
    """
    hu = _check_hu(ct)
    c = _check_int("context_slices", context_slices, 0)
    step = _check_int("batch_size", batch_size, 1)
    device = torch.device(device)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_slices, rows, cols = hu.shape
    padded_rows, padded_cols = _padded_size(model, rows, cols)
    out = torch.empty(hu.shape, dtype=torch.float16, device=device)
    with torch.inference_mode(), Progress(n_slices, "segmenting", "slices", enabled=progress) as bar:
        for start in range(0, n_slices, step):
            stop = min(start + step, n_slices)
            x = slab_batch(hu, start, stop, c, device)
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
            out[start:stop] = prob[:, 0, :rows, :cols].to(torch.float16)
            bar.update(stop - start)
    return out.cpu().numpy()


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
    kept: (n,) bool, a candidate by the size rule. reason: (n,) str, "" when kept, else "too_small"
        or "too_large".
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
    boxes = scipy.ndimage.find_objects(labels, max_label=count)
    start = np.array([[s.start for s in box] for box in boxes], dtype=np.int64).reshape(count, 3)
    stop = np.array([[s.stop for s in box] for box in boxes], dtype=np.int64).reshape(count, 3)
    volume = voxels * float(np.prod(np.asarray(ct.voxel_size_xyz, dtype=np.float64)))
    diameter = np.cbrt(6.0 * volume / np.pi)
    small = (voxels < min_voxels) | (diameter < min_diameter_mm)
    large = ~small & (diameter > max_diameter_mm)
    reason = np.where(small, REASONS[1], np.where(large, REASONS[2], REASONS[0])).astype("<U9")
    center_xyz = np.asarray(irc2xyz(center_irc, ct.origin_xyz, ct.voxel_size_xyz, ct.direction), dtype=np.float64)
    components = Components(
        center_irc=center_irc,
        center_xyz=center_xyz.reshape(count, 3),
        voxels=voxels,
        volume_mm3=volume,
        diameter_mm=diameter,
        bbox_start_irc=start,
        bbox_stop_irc=stop,
        kept=~(small | large),
        reason=reason,
    )
    return (components, labels.astype(np.int32, copy=False)) if return_labels else components
