"""Slices for the 2D segmentation model (chapter 13): the book's datasets, a collate and a loader.

Dtype contract (as for the classifier, see `p2ch.datasets`): images travel as **int16 HU** and
masks as **bool**; float32 is made on the training device.

    Luna2dSegmentationDataset[k]           image (2c+1, R, C) int16 HU   mask (1, R, C) bool
    TrainingLuna2dSegmentationDataset[k]   image (2c+1, 96, 96) int16 HU mask (1, 96, 96) bool
    loader batch (collate_seg)             image (N, 2c+1, H, W) int16   mask (N, 1, H, W) bool

The channels are slice k and its c neighbours on each side (`context_slices`, the book's 3);
slices beyond the CT's ends repeat its first or last slice (`p2ch.slices`). The mask is that of
the middle slice, True on any nodule's voxels (per-nodule labels: `SliceCache.mask`).

- `Luna2dSegmentationDataset`: validation, whole slices of the given CTs: every slice
  (`full_ct=True`, as the book validates) or the slices that hold nodule voxels plus a fixed
  sample of `negative_fraction` of the others (drawn from the series uid alone, so the same in
  every run and process).
- `TrainingLuna2dSegmentationDataset`: one item per annotated nodule of the training CTs, a
  96 x 96 crop centred on it (moved inside the CT at its edges); the random 64 x 64 crop the
  book takes from it is cut on the device (`p2ch.augment.random_crop_2d`). How often each
  nodule is drawn is the sampler's business (`p2ch.datasets.ShuffleSampler` with an
  `epoch_size`).

All randomness lives in the samplers and on the device; items are pure functions of their
index. Per-item data is a few numpy arrays (no Python object per slice), so forked workers share
it. Constructing a dataset reads each CT's `SliceInfo`, filling CTs that are not in the cache
yet (fill them first, in parallel: `p2ch.prefill.fill_slices`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from p2ch.candidates import read_candidates
from p2ch.datasets import LunaDataLoader, create_loader, series_fraction
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError
from p2ch.geometry import xyz2irc
from p2ch.luna import LOCATION_COLUMNS, find_candidates_file
from p2ch.slices import DEFAULT_CONTEXT_SLICES, DEFAULT_CROP_SIZE, SliceCache, SliceInfo

_NEGATIVE_STREAM = 7  # keeps the negative-slice sample apart from other draws seeded by a series


class SegSample(NamedTuple):
    """One item: image (2c+1, H, W) int16 HU; mask (1, H, W) bool (any nodule) of the middle slice;
    series_uid; slice_index, the middle slice's index in its CT.
    """

    image: torch.Tensor
    mask: torch.Tensor
    series_uid: str
    slice_index: int


class SegBatch(NamedTuple):
    """A collated batch: image (N, 2c+1, H, W) int16 HU, mask (N, 1, H, W) bool, series_uid list of
    N str, slice_index (N,) int64.
    """

    image: torch.Tensor
    mask: torch.Tensor
    series_uid: list[str]
    slice_index: torch.Tensor


def _check_source(slices: Any) -> SliceCache:
    if not all(callable(getattr(slices, name, None)) for name in ("info", "slab", "mask", "crop")):
        raise ConfigError(
            f"slices: expected a p2ch.slices.SliceCache (info, slab, mask, crop), got {type(slices).__name__}"
        )
    return slices


def _check_series(series_uids: Any) -> np.ndarray:
    """Distinct series uids, sorted: (S,) str."""
    uids = np.unique(np.asarray(series_uids, dtype=str).reshape(-1))
    if len(uids) == 0:
        raise ConfigError("series_uids is empty; pass the series of one part of split_series(...)")
    return uids


def _check_context(context_slices: Any) -> int:
    if isinstance(context_slices, bool) or not isinstance(context_slices, (int, np.integer)) or context_slices < 0:
        raise ConfigError(f"context_slices is {context_slices!r}; expected an integer >= 0 (the book's: 3)")
    return int(context_slices)


def _negative_sample(info: SliceInfo, fraction: float) -> np.ndarray:
    """(I,) bool: a fixed sample of about `fraction` of a CT's slices, drawn from its uid alone."""
    seed = int(series_fraction(info.series_uid) * 2.0**53)
    return np.random.default_rng([seed, _NEGATIVE_STREAM]).random(info.shape_irc.index) < fraction


class Luna2dSegmentationDataset(Dataset):
    """Validation slices of whole CTs: item k is slice `slice_index[k]` of CT `series_uid(k)`.

    slices: the `SliceCache`. series_uids: the CTs (e.g. `split_series(...).val`; duplicates
    count once, order does not matter). context_slices: c neighbours on each side. full_ct:
    every slice (the book's validation; `negative_fraction` is then not used); False: the slices
    holding nodule voxels, plus a fixed sample of `negative_fraction` (in [0, 1]) of the others.
    Items: `SegSample`, mask bool.

    Items run CT by CT (in `series_uids` order), slices ascending within a CT (`series_bounds()`).
    Attributes (numpy, one entry per item): `slice_index` (M,) int32; `has_nodule` (M,) bool, the
    slice holds nodule voxels; `series_uids` (S,) str and `series_index` (M,) int32 into it.
    """

    def __init__(
        self,
        slices: SliceCache,
        series_uids: Sequence[str] | np.ndarray,
        context_slices: int = DEFAULT_CONTEXT_SLICES,
        full_ct: bool = True,
        negative_fraction: float = 0.0,
    ):
        self.slices = _check_source(slices)
        self.context_slices = _check_context(context_slices)
        fraction_ok = isinstance(negative_fraction, (int, float)) and not isinstance(negative_fraction, bool)
        if not fraction_ok or not 0.0 <= negative_fraction <= 1.0:
            raise ConfigError(f"negative_fraction is {negative_fraction!r}; expected a fraction in [0, 1]")
        self.full_ct = bool(full_ct)
        self.series_uids = _check_series(series_uids)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._shapes: list[tuple[int, int]] = []
        for info in (self.slices.info(str(uid)) for uid in self.series_uids):
            self._shapes.append((info.shape_irc.row, info.shape_irc.col))
            has_nodule = np.zeros(info.shape_irc.index, dtype=bool)
            has_nodule[info.nodule_slices] = True
            keep = np.ones_like(has_nodule) if full_ct else has_nodule | _negative_sample(info, negative_fraction)
            parts.append((np.flatnonzero(keep).astype(np.int32), has_nodule[keep]))
        self.series_index = np.repeat(np.arange(len(parts), dtype=np.int32), [len(k) for k, _ in parts])
        self.slice_index = np.concatenate([k for k, _ in parts])
        self.has_nodule = np.concatenate([h for _, h in parts])

    def series_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of each CT's items, in `series_uids` order: items [start, stop) are its slices."""
        edges = np.searchsorted(self.series_index, np.arange(len(self.series_uids) + 1))
        return list(itertools.pairwise(edges.tolist()))

    def nodule_positions(self) -> np.ndarray:
        """Item positions of the slices that hold nodule voxels, in item order: (n,) int64."""
        return np.flatnonzero(self.has_nodule)

    def slice_shape(self) -> tuple[int, int]:
        """(R, C) of every slice; DataFormatError when the CTs differ in in-plane size (naming two)."""
        shapes = sorted(set(self._shapes))
        if len(shapes) > 1:
            first = {shape: str(uid) for uid, shape in zip(self.series_uids, self._shapes, strict=True)}
            raise DataFormatError(
                f"the validation CTs have slices of {len(shapes)} sizes (e.g. {first[shapes[0]]}: {shapes[0]}, "
                f"{first[shapes[-1]]}: {shapes[-1]}); validate them in separate runs or with batch_size 1"
            )
        return shapes[0]

    def __len__(self) -> int:
        return len(self.slice_index)

    def series_uid(self, k: int) -> str:
        """The series_uid of item k."""
        return str(self.series_uids[self.series_index[k]])

    def __getitem__(self, k: int) -> SegSample:
        series_uid, slice_index = self.series_uid(k), int(self.slice_index[k])
        image = self.slices.slab(series_uid, slice_index, self.context_slices)
        mask = self.slices.mask(series_uid, slice_index) > 0
        return SegSample(torch.from_numpy(image), torch.from_numpy(mask[None]), series_uid, slice_index)

    def __repr__(self) -> str:
        return (
            f"Luna2dSegmentationDataset({len(self)} slices of {len(self.series_uids)} CTs, "
            f"{int(self.has_nodule.sum())} with nodules, context_slices={self.context_slices})"
        )


class TrainingLuna2dSegmentationDataset(Dataset):
    """Training crops: item k is a `crop_size` crop around annotated nodule k of the training CTs.

    slices: the `SliceCache`. series_uids: the training CTs (CTs without annotations add no
    item). context_slices: c neighbours on each side. crop_size: side of the square crop (the
    book's 96; the model then sees a random 64 x 64 part of it, cut on the device). Items:
    `SegSample` with image (2c+1, S, S) int16 HU, mask (1, S, S) bool of the nodule's centre
    slice, slice_index that slice.

    background_per_ct: also this many fixed positions per CT without a nodule, so the model sees
    vessels and tissue that it must not segment; their mask is whatever the CT holds there
    (usually empty). They are taken from `hard_negatives` first: per series uid, (n, 3) voxel
    positions of places that look like nodules but are not (LUNA16's candidates.csv class-0 rows:
    vessels, scars, airway walls — where detectors fire); a seeded sample of up to
    background_per_ct of them, topped up with positions uniform in the central 50 % of rows and
    cols (seeded by the series uid). A sampler then decides the mix (e.g.
    `BalancedSampler(dataset.is_nodule, ratio=...)`).

    Attributes (numpy, one row per item, nodules first): `center_irc` (M, 3) int64,
    `diameter_mm` (M,) float64 (0 for background positions), `is_nodule` (M,) bool,
    `series_uids` (S,) str and `series_index` (M,) int32 into it.
    """

    def __init__(
        self,
        slices: SliceCache,
        series_uids: Sequence[str] | np.ndarray,
        context_slices: int = DEFAULT_CONTEXT_SLICES,
        crop_size: int = DEFAULT_CROP_SIZE,
        background_per_ct: int = 0,
        hard_negatives: dict[str, np.ndarray] | None = None,
    ):
        self.slices = _check_source(slices)
        self.context_slices = _check_context(context_slices)
        if isinstance(background_per_ct, bool) or not isinstance(background_per_ct, (int, np.integer)):
            raise ConfigError(f"background_per_ct is {background_per_ct!r}; expected an integer ≥ 0")
        if background_per_ct < 0:
            raise ConfigError(f"background_per_ct is {background_per_ct!r}; expected an integer ≥ 0")
        if isinstance(crop_size, bool) or not isinstance(crop_size, (int, np.integer)) or crop_size < 1:
            raise ConfigError(f"crop_size is {crop_size!r}; expected a positive integer (the book's: 96)")
        self.crop_size = int(crop_size)
        self.series_uids = _check_series(series_uids)
        infos = [self.slices.info(str(uid)) for uid in self.series_uids]
        counts = [len(info.nodule_rows) for info in infos]
        if sum(counts) == 0:
            raise ConfigError(
                f"the {len(infos)} training CTs have no annotated nodule, so there is nothing to train the "
                "segmentation model on; use more CTs (another split) or check annotations.csv"
            )
        negatives = hard_negatives or {}
        background = [
            _background_positions(info, int(background_per_ct), negatives.get(info.series_uid)) for info in infos
        ]
        self.series_index = np.concatenate(
            [np.repeat(np.arange(len(infos), dtype=np.int32), counts)]
            + [np.full(len(b), n, dtype=np.int32) for n, b in enumerate(background)]
        )
        nodules = [info.nodule_center_irc.reshape(-1, 3) for info in infos]
        self.center_irc = np.concatenate(nodules + background).astype(np.int64)
        self.diameter_mm = np.concatenate(
            [info.nodule_diameter_mm for info in infos] + [np.zeros(len(b)) for b in background]
        ).astype(np.float64)
        self.is_nodule = np.arange(len(self.center_irc)) < sum(counts)

    def __len__(self) -> int:
        return len(self.center_irc)

    def series_uid(self, k: int) -> str:
        """The series_uid of item k."""
        return str(self.series_uids[self.series_index[k]])

    def __getitem__(self, k: int) -> SegSample:
        series_uid = self.series_uid(k)
        center_irc = self.center_irc[k].tolist()
        image, mask = self.slices.crop(series_uid, center_irc, self.crop_size, self.context_slices)
        return SegSample(torch.from_numpy(image), torch.from_numpy(mask[None] > 0), series_uid, int(center_irc[0]))

    def __repr__(self) -> str:
        return (
            f"TrainingLuna2dSegmentationDataset({int(self.is_nodule.sum())} nodules and "
            f"{int((~self.is_nodule).sum())} background positions in {len(self.series_uids)} CTs, "
            f"crop_size={self.crop_size}, context_slices={self.context_slices})"
        )


def _background_positions(info: SliceInfo, count: int, hard_negatives: np.ndarray | None = None) -> np.ndarray:
    """`count` fixed voxel positions (count, 3) int64 of a CT: a sample of `hard_negatives` ((n, 3) voxel
    positions; those outside the CT are ignored), topped up with positions on any slice, rows and cols
    in the central half of the slice (where the lungs are). Seeded by the series uid (the same every run)."""
    if count == 0:
        return np.zeros((0, 3), dtype=np.int64)
    seed = int(series_fraction(info.series_uid) * 2**32)
    rng = np.random.default_rng(seed)
    i, r, c = (int(v) for v in info.shape_irc)
    chosen = np.zeros((0, 3), dtype=np.int64)
    if hard_negatives is not None and len(hard_negatives):
        hard = np.asarray(hard_negatives, dtype=np.int64).reshape(-1, 3)
        hard = hard[np.all((hard >= 0) & (hard < np.array([i, r, c])), axis=1)]
        chosen = hard[np.sort(rng.permutation(len(hard))[:count])]
    rest = count - len(chosen)
    uniform = np.stack(
        [rng.integers(0, i, rest), rng.integers(r // 4, max(r // 4 + 1, 3 * r // 4), rest),
         rng.integers(c // 4, max(c // 4 + 1, 3 * c // 4), rest)],
        axis=1,
    ).astype(np.int64)  # fmt: skip
    return np.concatenate([chosen, uniform]).astype(np.int64)


def candidate_negatives_irc(data_root: Path, slices: SliceCache, series_uids: Sequence[str]) -> dict[str, np.ndarray]:
    """The class-0 rows of the data root's candidates.csv (or candidates_V2.csv) as voxel positions, per CT:
    {series_uid: (n, 3) int64 (index, row, col)} for the CTs of `series_uids` (the hard negatives of
    `TrainingLuna2dSegmentationDataset`). {} when the data root has no candidates file."""
    try:
        path = find_candidates_file(Path(data_root))
    except DataNotFoundError:
        return {}
    frame = read_candidates(path)
    frame = frame[(frame["class"] == 0) & frame["seriesuid"].isin(set(map(str, series_uids)))]
    out = {}
    for uid, rows in frame.groupby("seriesuid", sort=True):
        info = slices.info(str(uid))
        centers_xyz = rows[list(LOCATION_COLUMNS[1:])].to_numpy(dtype=np.float64)
        out[str(uid)] = np.asarray(
            xyz2irc(centers_xyz, info.origin_xyz, info.voxel_size_xyz, info.direction), dtype=np.int64
        ).reshape(-1, 3)
    return out


def collate_seg(samples: Sequence[SegSample]) -> SegBatch:
    """Stack `SegSample`s into a `SegBatch` (in a DataLoader worker, straight into shared memory).

    Raises DataFormatError when the images differ in size (CTs of other in-plane sizes in one
    validation batch: use batch_size 1 for those).
    """
    images, masks, uids, indices = zip(*samples, strict=True)
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise DataFormatError(
            f"slices of different sizes in one batch ({', '.join(map(str, sorted(shapes)))}; series "
            f"{', '.join(sorted(set(uids)))}); validate CTs of other in-plane sizes with batch_size 1"
        )
    return SegBatch(
        image=default_collate(list(images)),
        mask=default_collate(list(masks)),
        series_uid=[str(u) for u in uids],
        slice_index=torch.tensor(indices, dtype=torch.int64),
    )


def create_seg_loader(dataset: Dataset, sampler: Sampler[int], **settings: Any) -> LunaDataLoader:
    """A DataLoader of `SegBatch`es: `p2ch.datasets.create_loader` (its defaults and checks) with `collate_seg`.

    settings: `create_loader`'s keywords (batch_size, num_workers, pin_memory, …; one signature to
    keep). Samplers: `ShuffleSampler(len(dataset), epoch_size=…)` for training,
    `EvalSampler(len(dataset))` for validation (both from `p2ch.datasets`).
    """
    return create_loader(dataset, sampler, **{"collate_fn": collate_seg, **settings})


class SeriesShardSampler(Sampler[int]):
    """Validation order for DDP that never splits a CT: rank r gets whole CTs, in order.

    bounds: each CT's (start, stop) item range (`Luna2dSegmentationDataset.series_bounds()`), in
    item order. CTs go to ranks as contiguous runs of about equal slice counts, so per-nodule
    metrics (3D components) can be computed on each rank from the CTs it saw in full. Every item is
    visited once over all ranks.
    """

    def __init__(self, bounds: Sequence[tuple[int, int]], *, rank: int = 0, world_size: int = 1):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is out of range for world_size {world_size}")
        sizes = np.array([stop - start for start, stop in bounds], dtype=np.int64)
        total = int(sizes.sum())
        # CT n goes to the rank whose equal share of the items holds the CT's first item.
        firsts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else np.zeros(0, dtype=np.int64)
        owner = (firsts * world_size) // max(total, 1)
        mine = [bounds[n] for n in np.flatnonzero(owner == rank).tolist()]
        self.indices_ = np.concatenate([np.arange(a, b) for a, b in mine]) if mine else np.zeros(0, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """No-op (the order never changes)."""

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices_.tolist())

    def __len__(self) -> int:
        return len(self.indices_)
