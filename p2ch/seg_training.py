"""`python -m p2ch.seg_training`: train the nodule segmentation UNet (the book's chapter 13).

A 2D UNet (`p2ch.unet.UNetWrapper`) labels nodule voxels slice by slice; its input is a CT slice
with `--context-slices` slices on each side as channels (7 channels by default). Training samples
are crops around annotated nodules and, beside them (`--background-crops`, `--background-ratio`),
crops around hard negatives: the class-0 rows of the data root's candidates.csv (vessels, scars,
airway walls: where a detector fires), topped up with positions in the middle of the CT
(`TrainingLuna2dSegmentationDataset`, 96×96 from the cache, cut to a random `--crop-size` 64×64 on
the device and augmented there, image and mask alike); validation runs whole slices of the
validation CTs (`Luna2dSegmentationDataset`). The loss is soft Dice plus the book's
false-negative-weighted Dice term (`--fn-weight`, 8) plus a pixel cross-entropy (`--bce-weight`,
1), with a one-cycle lr peaking at 0.003; `--background-crops 0 --bce-weight 0 --lr-schedule
constant --lr 0.001` is the book's recipe, which paints vessels and the tissue around nodules.

What matters downstream is found nodules, not pixels: after each validation the probabilities of
every validation CT are stacked and turned into candidates exactly as `python -m
p2ch.nodule_analysis` does (`p2ch.detect.find_candidates`: lungs, components split at their peaks,
the size rule, at most 30 per CT, up to 5 from the lungs' surface on top), and a nodule is found
when a kept candidate's centre lies within its radius (LUNA16's hit rule,
`p2ch.segmetrics.candidate_hits`; a blob that only overlaps a nodule finds nothing). best.pt is the
epoch with the highest candidate recall, ties broken by fewer false positives per CT (with --val-slices
nodules: the highest pixel F1). TensorBoard:
`<time>-trn_seg-<comment>` and `…-val_seg-<comment>` with `loss/all`,
`pr/precision|recall|f1_score`, `percent_all/tp|fn|fp`, `nodule/recall`, `nodule/recall_5mm`,
`nodule/candidates_per_ct`, `nodule/fp_per_ct` and validation slices in three colours (true
positives green, false negatives yellow, false positives red). `--report PATH` writes the last
validation's metrics as JSON.

The machinery (device, AMP, DDP, checkpoints with exact resume, writers, the epoch schedule) is
`p2ch.trainer.TrainingRun`, shared with `p2ch.training`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from p2ch.augment import Augment2dConfig, augment_2d, random_crop_2d
from p2ch.checkpoint import source_block_order
from p2ch.config import (
    BLOCK_ORDERS,
    BOOK_SEG_EPOCH_SIZE,
    SPLIT_MODES,
    UP_MODES,
    VAL_SLICES,
    DefaultsHelpFormatter,
    SegTrainingConfig,
    add_augmentation_arguments,
    add_data_arguments,
    add_optimisation_arguments,
    add_output_arguments,
    add_run_control_arguments,
    add_speed_arguments,
    add_split_arguments,
    check_output_file,
    display_path,
)
from p2ch.datasets import BalancedSampler, ShuffleSampler, split_series
from p2ch.detect import CandidateRule, find_candidates
from p2ch.errors import ConfigError
from p2ch.fileio import write_text_atomic
from p2ch.loop import BestCheckpoint, EpochResult, Metric, run_epoch
from p2ch.luna import series_index
from p2ch.prefill import fill_slices, shape_irc_from_header
from p2ch.runtime import autocast, barrier, check_loader_shared_memory, configure_backends, gather_objects
from p2ch.segdatasets import (
    Luna2dSegmentationDataset,
    SeriesShardSampler,
    TrainingLuna2dSegmentationDataset,
    candidate_negatives_irc,
    create_seg_loader,
)
from p2ch.segmetrics import (
    NoduleHits,
    candidate_hits,
    pixel_counts,
    pixel_summary,
    segmentation_loss,
    summarize_nodules,
)
from p2ch.slices import SliceCache
from p2ch.trainer import TrainingRun, batches_of, training_main
from p2ch.unet import UNetWrapper, check_input_size, unet_signature
from p2ch.vis import LUNG_WINDOW_HU

log = logging.getLogger("p2ch.seg_training")

PROG = "p2ch.seg_training"
SEG_SPLIT_MODES = tuple(mode for mode in SPLIT_MODES if mode != "stride")
HPARAM_TAGS = ("hparam/val_nodule_recall", "hparam/val_fp_per_ct", "hparam/val_f1")
DATASET_CROP_FACTOR = 1.5  # the dataset's crop around a nodule, relative to --crop-size (book: 96 for 64)
IMAGE_SLICES = 6  # validation slices drawn in TensorBoard


def get_args_parser() -> argparse.ArgumentParser:
    d = SegTrainingConfig()
    parser = argparse.ArgumentParser(
        prog="python -m p2ch.seg_training",
        description="Train the nodule segmentation UNet (UNetWrapper, 2D slices with context) and log to TensorBoard.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Example: python -m p2ch.prepcache --segmentation; python -m p2ch.seg_training --epochs 10 "
        "--augmented --epoch-size 20000 seg-run; then: tensorboard --logdir runs",
    )
    parser.add_argument("comment", nargs="?", default=d.comment, help="suffix for the run directories")
    add_data_arguments(
        parser, cache_help="cache folder (slices and masks go to its segmentation/ folder)", cache_kind="slice cache"
    )
    add_split_arguments(parser, d, modes=SEG_SPLIT_MODES)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--epoch-size", type=int, default=None, help="training crops per epoch (default: 300,000, as the book)"
    )
    sampling.add_argument(
        "--background-crops", type=int, default=d.background_crops,
        help="fixed positions per training CT away from the nodules (0: nodule crops only, as the book)",
    )  # fmt: skip
    sampling.add_argument(
        "--background-ratio", type=int, default=d.background_ratio,
        help="background crops sampled per nodule crop (with --background-crops)",
    )  # fmt: skip
    add_augmentation_arguments(parser, rotate_help="random rotation in the slice plane")
    optimisation = add_optimisation_arguments(parser, d)
    optimisation.add_argument("--fn-weight", type=float, default=d.fn_weight, help="weight of the false-negative Dice")
    optimisation.add_argument(
        "--bce-weight", type=float, default=d.bce_weight,
        help="weight of a pixel cross-entropy added to the Dice loss (0: the book's loss)",
    )  # fmt: skip
    _add_model_arguments(parser, d)
    add_speed_arguments(parser, d, "channels_last memory format for the model and batches")
    control = add_run_control_arguments(parser, d, "log validation slices as images every N epochs (0: never)")
    control.add_argument(
        "--val-slices", choices=VAL_SLICES, default=d.val_slices,
        help="validate on every slice of the validation CTs (per-nodule metrics need it) or on the slices "
        "with nodules plus --val-negative-fraction of the others",
    )  # fmt: skip
    control.add_argument(
        "--val-negative-fraction", type=float, default=d.val_negative_fraction,
        help="with --val-slices nodules: the fraction of nodule-free slices validated too",
    )  # fmt: skip
    control.add_argument("--threshold", type=float, default=d.threshold, help="probability that counts as nodule")
    add_output_arguments(parser, d)
    parser.add_argument("--report", default=None, metavar="JSON", help="write the last validation's metrics here")
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser, d: SegTrainingConfig) -> None:
    g = parser.add_argument_group("model (UNetWrapper)")
    g.add_argument("--context-slices", type=int, default=d.context_slices, help="slices on each side as channels")
    g.add_argument("--crop-size", type=int, default=d.crop_size, help="training crop in pixels (square)")
    g.add_argument("--depth", type=int, default=d.depth, help="UNet levels")
    g.add_argument("--wf", type=int, default=d.wf, help="2**wf filters at the first level")
    g.add_argument("--up-mode", choices=UP_MODES, default=d.up_mode, help="learned up-convolutions or upsampling")
    g.add_argument(
        "--block-order", choices=BLOCK_ORDERS, default=None,
        help="p2ch: conv, batch norm, ReLU, max-pooling; book: the book's UNet (conv with bias, ReLU, batch norm, "
        f"average pooling), which its trained weights need. Default: {d.block_order}, or with --init-weights PATH "
        "the order PATH was built with (book for models imported by python -m p2ch.import_book_models)",
    )  # fmt: skip


def complete_block_order(args: argparse.Namespace) -> None:
    """--block-order left out of a new run that loads weights (--init-weights): the order of the UNet it loads,
    so that the book's imported UNet trains on without repeating its order."""
    if args.block_order is None and args.init_weights and not args.resume:
        args.block_order = source_block_order(args.init_weights)


def augment_2d_config(config: SegTrainingConfig) -> Augment2dConfig:
    """The batched 2D augmentation the flags ask for (--augmented: all of them)."""
    return Augment2dConfig.from_flags(
        augmented=config.augmented, flip=config.augment_flip, offset=config.augment_offset,
        scale=config.augment_scale, rotate=config.augment_rotate, noise=config.augment_noise,
    )  # fmt: skip


class VolumeAssembler:
    """Stacks predicted slices into per-CT volumes and scores each CT's candidates once it is complete.

    Validation visits every slice of each CT (`--val-slices all`); slices may arrive in any order.
    A complete CT's probabilities become candidates exactly as `python -m p2ch.nodule_analysis`
    makes them (`p2ch.detect.find_candidates` with `rule`: lungs, split, size rule, at most
    `rule.max_candidates`, the lungs' surface), and a nodule counts as found when a kept candidate's
    centre lies within its radius (`p2ch.segmetrics.candidate_hits`, LUNA16's rule). `hits` collects one `NoduleHits`
    per completed CT and `diameters` its nodule diameters.
    """

    def __init__(self, slices: SliceCache, rule: CandidateRule):
        self.slices = slices
        self.rule = rule
        self.pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.seen: dict[str, int] = {}
        self.hits: list[NoduleHits] = []
        self.diameters: list[np.ndarray] = []

    def add(self, series_uids: Sequence[str], slice_index: np.ndarray, prob: np.ndarray, hu: np.ndarray) -> None:
        """prob: (N, R, C) float probabilities and hu: (N, R, C) int16 HU of slice `slice_index[n]` of CT
        `series_uids[n]`."""
        for uid, k, plane, hu_plane in zip(series_uids, slice_index.tolist(), prob, hu, strict=True):
            info = self.slices.info(uid)
            volumes = self.pending.get(uid)
            if volumes is None:
                shape = tuple(info.shape_irc)
                volumes = self.pending[uid] = (np.zeros(shape, dtype=np.float16), np.zeros(shape, dtype=np.int16))
                self.seen[uid] = 0
            volumes[0][k] = plane
            volumes[1][k] = hu_plane
            self.seen[uid] += 1
            if self.seen[uid] == info.shape_irc[0]:
                self._score(uid, info)

    def _score(self, uid: str, info) -> None:
        prob, hu = self.pending.pop(uid)
        del self.seen[uid]
        ct = SimpleNamespace(
            hu=hu, voxel_size_xyz=info.voxel_size_xyz, origin_xyz=info.origin_xyz, direction=info.direction
        )
        components, _ = find_candidates(prob, ct, self.rule)
        kept = components.center_xyz[components.kept]
        self.hits.append(candidate_hits(kept, info.nodule_center_xyz, info.nodule_diameter_mm))
        self.diameters.append(np.asarray(info.nodule_diameter_mm, dtype=np.float64))


def candidate_rule(config: SegTrainingConfig) -> CandidateRule:
    """The candidate rule validation scores with: nodule_analysis's defaults at the run's --threshold."""
    return CandidateRule(threshold=config.threshold)


def best_checkpoint(config: SegTrainingConfig) -> BestCheckpoint:
    """How best.pt is chosen: candidate recall, then fewer false positives per CT, when every slice
    is validated; with --val-slices nodules there are no whole CTs to find candidates in, so pixel
    F1 ranks (and no epoch is reported as missing a recall it could never have)."""
    if config.val_slices == "all":
        ladder = [Metric("recall", "nodule/recall"), Metric("f1", "pr/f1_score")]
        return BestCheckpoint(ladder, loss_key="nodule/fp_per_ct", loss_name="fp_per_ct")
    return BestCheckpoint([Metric("f1", "pr/f1_score")])


def overlay(image: torch.Tensor, label: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """An RGB picture of one slice: CT in the lung window, TP green, FN yellow, FP red.

    image: (R, C) float HU; label, predicted: (R, C) bool. Returns (3, R, C) float in [0, 1].
    """
    low, high = LUNG_WINDOW_HU
    gray = ((image.float() - low) / (high - low)).clamp(0, 1)
    rgb = torch.stack([gray, gray, gray]) * 0.7
    tp, fn, fp = label & predicted, label & ~predicted, ~label & predicted
    for mask, colour in ((tp, (0.0, 1.0, 0.0)), (fn, (1.0, 1.0, 0.0)), (fp, (1.0, 0.0, 0.0))):
        for channel, value in enumerate(colour):
            rgb[channel][mask] = value
    return rgb


def seg_summary(result: EpochResult, extra: dict[str, float]) -> dict[str, float]:
    """Loss, pixel precision/recall/F1 and percentages of an epoch (TensorBoard tags), with `extra`."""
    out = result.outputs
    summary = {"loss/all": float(out["losses"].float().mean()) if result.count else math.nan}
    summary.update(pixel_summary(out["counts"]))
    summary.update(extra)
    summary["perf/samples_per_sec"] = result.samples_per_sec
    summary["perf/data_wait_fraction"] = result.data_wait_fraction
    return summary


def format_seg_epoch(epoch: int, mode: str, count: int, summary: dict[str, float]) -> str:
    """The one log line of an epoch (training counts crops, validation whole slices)."""
    unit = "crops" if mode == "trn" else "slices"
    nodules = ""
    if "nodule/recall" in summary:
        nodules = (
            f", candidate recall {summary['nodule/recall']:.3f} (≥ 5 mm {summary['nodule/recall_5mm']:.3f}), "
            f"{summary['nodule/candidates_per_ct']:.1f} candidates per CT "
            f"({summary['nodule/fp_per_ct']:.1f} on no nodule)"
        )
    return (
        f"E{epoch} {mode} {count:,} {unit}: loss {summary['loss/all']:.4f}, pixel precision "
        f"{summary['pr/precision']:.3f}, recall {summary['pr/recall']:.3f}, F1 {summary['pr/f1_score']:.3f}"
        f"{nodules}, {summary['perf/samples_per_sec']:.0f} {unit}/s"
    )


class SegmentationTrainingApp(TrainingRun):
    """The segmentation run (the book's SegmentationTrainingApp): a recipe over `TrainingRun`."""

    tb_kind = "seg"
    memory_format = torch.channels_last
    task = "segmentation"

    def __init__(self, config: SegTrainingConfig, resume_state: dict[str, Any] | None = None):
        self.config: SegTrainingConfig
        self.augment = augment_2d_config(config)
        self.last_summary: dict[str, float] = {}
        super().__init__(config, resume_state)

    # -- what TrainingRun asks for ---------------------------------------------------------------

    def make_model(self) -> torch.nn.Module:
        c = self.config
        return UNetWrapper(
            in_channels=2 * c.context_slices + 1, n_classes=1, depth=c.depth, wf=c.wf, up_mode=c.up_mode,
            block_order=c.block_order,
        )  # fmt: skip

    def arch_of(self, model: torch.nn.Module) -> str:
        return unet_signature(model)

    def make_best(self) -> BestCheckpoint:
        return best_checkpoint(self.config)

    def build_data(self) -> None:
        self.data = build_seg_data(self.config, self.dist, self.device)

    def hparam_tags(self) -> tuple[str, ...]:
        return HPARAM_TAGS

    # -- one epoch -----------------------------------------------------------------------------

    def _input(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(self.device, non_blocking=True).float()  # int16 HU through the loader
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _train_step(self, batch) -> dict[str, torch.Tensor]:
        x = batch.image.to(self.device, non_blocking=True).float()
        y = batch.mask.to(self.device, non_blocking=True).bool()
        x, y = random_crop_2d(x, y, self.config.crop_size, self.aug_generator)
        if self.augment.enabled:
            x, y = augment_2d(x, y, self.augment, self.aug_generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp_dtype):
            prob = self.train_model(x)
        loss = segmentation_loss(prob, y, self.config.fn_weight, self.config.bce_weight)  # float32 inside
        self.optimizer_step(loss.mean())  # and the lr schedule's step (--lr-schedule)
        return {"losses": loss.detach(), "counts": pixel_counts(prob.detach(), y, self.config.threshold)}

    @torch.inference_mode()
    def _val_step(self, batch) -> dict[str, torch.Tensor]:
        y = batch.mask.to(self.device, non_blocking=True).bool()
        with autocast(self.device, self.amp_dtype):
            prob = self.train_model(self._input(batch.image))
        prob = prob.float()
        if self._assembler is not None:
            centre = batch.image[:, self.config.context_slices].numpy()
            self._assembler.add(batch.series_uid, np.asarray(batch.slice_index), prob[:, 0].cpu().numpy(), centre)
        loss = segmentation_loss(prob, y, self.config.fn_weight, self.config.bce_weight)
        return {"losses": loss, "counts": pixel_counts(prob, y, self.config.threshold)}

    def train_epoch(self, epoch: int) -> EpochResult:
        self.train_model.train()
        self.data.train_sampler.set_epoch(epoch)
        self.seed_augmentation(epoch)
        batches = batches_of(self.data.train_loader, self.config.max_train_batches)
        total = min(batches * self.config.batch_size, len(self.data.train_sampler))
        return run_epoch(
            self.data.train_loader, self._train_step, device=self.device, dist=self.dist,
            desc=f"epoch {epoch} train", total_samples=total, batches=batches, finite="losses",
        )  # fmt: skip

    def validate(self, epoch: int) -> tuple[EpochResult, dict[str, float]]:
        """The validation pass and its per-nodule metrics (empty unless every slice was validated)."""
        self.train_model.eval()
        batches = batches_of(self.data.val_loader, self.config.max_val_batches)
        whole = self.config.val_slices == "all" and batches == len(self.data.val_loader)
        self._assembler = VolumeAssembler(self.data.slices, candidate_rule(self.config)) if whole else None
        total = min(batches * self.config.batch_size, len(self.data.val_sampler))
        result = run_epoch(
            self.data.val_loader, self._val_step, device=self.device, dist=self.dist,
            desc=f"epoch {epoch} validation", total_samples=total, batches=batches,
        )  # fmt: skip
        nodules: dict[str, float] = {}
        if self._assembler is not None:
            hits = gather_objects((self._assembler.hits, self._assembler.diameters), self.dist)
            nodules = summarize_nodules([h for part in hits for h in part[0]], [d for part in hits for d in part[1]])
        self._assembler = None
        return result, nodules

    # -- logging -------------------------------------------------------------------------------

    def log_epoch(self, mode: str, epoch: int, result: EpochResult, extra: dict[str, float]) -> dict[str, float]:
        summary = seg_summary(result, extra)
        if self.dist.is_main:
            self.writers.scalars(mode, summary, self.samples_seen)
            self.writers.flush()
            log.info("%s", format_seg_epoch(epoch, mode, result.count, summary))
        return summary

    def log_training(self, epoch: int, result: EpochResult) -> None:
        self.log_epoch("trn", epoch, result, {"lr": self.optimizer.param_groups[0]["lr"]})

    def run_validation(self, epoch: int) -> bool:
        result, nodules = self.validate(epoch)
        summary = self.last_summary = self.log_epoch("val", epoch, result, nodules)
        if self.dist.is_main:
            hparams = {
                "hparam/val_nodule_recall": summary.get("nodule/recall", math.nan),
                "hparam/val_fp_per_ct": summary.get("nodule/fp_per_ct", math.nan),
                "hparam/val_f1": summary["pr/f1_score"],
            }
            self.writers.scalars("val", hparams, self.samples_seen)
            every = self.config.images_every
            if every and (epoch % every == 0 or epoch == self.config.epochs):
                self.writers.images("val", "val/slices", self.validation_pictures(), self.samples_seen)
        return self.best.update(summary, epoch)

    @torch.inference_mode()
    def validation_pictures(self) -> torch.Tensor:
        """(n, 3, R, C) overlays of up to IMAGE_SLICES validation slices that hold nodules."""
        self.train_model.eval()
        pictures = []
        for position in self.data.val_ds.nodule_positions()[:IMAGE_SLICES]:
            sample = self.data.val_ds[int(position)]
            image = torch.as_tensor(np.asarray(sample.image))[None]
            with autocast(self.device, self.amp_dtype):
                prob = self.train_model(self._input(image)).float()[0, 0].cpu()
            label = torch.as_tensor(np.asarray(sample.mask))[0].bool()
            centre = image[0, self.config.context_slices]
            pictures.append(overlay(centre, label, prob > self.config.threshold))
        return torch.stack(pictures) if pictures else torch.zeros(0, 3, 1, 1)


class SegData:
    """What a segmentation run trains and validates on (built by `build_seg_data`)."""

    def __init__(self, **parts: Any):
        self.data_root: Path = parts["data_root"]
        self.slices: SliceCache = parts["slices"]
        self.split = parts["split"]
        self.train_ds: TrainingLuna2dSegmentationDataset = parts["train_ds"]
        self.val_ds: Luna2dSegmentationDataset = parts["val_ds"]
        self.train_sampler: ShuffleSampler | BalancedSampler = parts["train_sampler"]
        self.val_sampler = parts["val_sampler"]
        self.train_loader = parts["train_loader"]
        self.val_loader = parts["val_loader"]


def check_crop_size(config: SegTrainingConfig, shapes_irc: dict[str, tuple[int, int, int]]) -> None:
    """ConfigError when --crop-size is larger than the slices of a training CT (shapes_irc: (I, R, C) per
    series uid): its crops would be mostly padding (air, no nodule), so the model would learn from little."""
    if not shapes_irc:
        return
    uid, (_, rows, cols) = min(shapes_irc.items(), key=lambda item: (min(item[1][1:]), item[0]))
    crop = config.crop_size
    if crop <= min(rows, cols):
        return
    step = 2 ** (config.depth - 1)
    padding = 1.0 - min(rows, crop) * min(cols, crop) / crop**2
    largest = min(rows, cols) // step * step
    raise ConfigError(
        f"--crop-size {crop}: larger than the {rows} × {cols} slices of training CT {uid}, so every crop of it would "
        f"be at least {padding:.0%} padding (air, no nodule); pass --crop-size {largest} or less (a multiple of "
        f"{step} for --depth {config.depth}), e.g. 64, the book's"
    )


def build_seg_data(config: SegTrainingConfig, dist, device: torch.device) -> SegData:
    """The leak-free series split, slices and masks in the cache (filled where missing), datasets, loaders."""
    data_root = Path(config.data_root)
    slices = SliceCache(config.cache_dir, data_root)
    uids = sorted(series_index(data_root))
    split = split_series(uids, config.split, **config.split_settings(), data_root=data_root)
    check_crop_size(config, {uid: shape_irc_from_header(uid, data_root) for uid in split.train})
    if dist.is_main:  # one process fills; the others wait, then read
        command = f"python -m p2ch.prepcache --segmentation --data-root {display_path(data_root)}"
        command += f" --cache-dir {display_path(config.cache_dir)}" if config.cache_dir else ""
        fill_slices(
            slices, [*split.train, *split.val], num_workers=min(config.num_workers, 8), fill=config.prefill,
            prepcache_command=command,
        )  # fmt: skip
    barrier(dist)
    context, crop = config.context_slices, round(config.crop_size * DATASET_CROP_FACTOR)
    negatives = candidate_negatives_irc(data_root, slices, split.train) if config.background_crops else {}
    train_ds = TrainingLuna2dSegmentationDataset(
        slices, split.train, context_slices=context, crop_size=crop, background_per_ct=config.background_crops,
        hard_negatives=negatives,
    )  # fmt: skip
    full = config.val_slices == "all"
    val_ds = Luna2dSegmentationDataset(
        slices, split.val, context_slices=context, full_ct=full, negative_fraction=config.val_negative_fraction
    )
    check_input_size(*val_ds.slice_shape(), config.depth)
    epoch_size = config.epoch_size or BOOK_SEG_EPOCH_SIZE
    shard = {"seed": config.seed, "rank": dist.rank, "world_size": dist.world_size, "epoch_size": epoch_size}
    if config.background_crops:  # nodule crops and background crops in a fixed ratio
        train_sampler = BalancedSampler(train_ds.is_nodule, ratio=config.background_ratio, **shard)
    else:
        train_sampler = ShuffleSampler(len(train_ds), **shard)
    val_sampler = SeriesShardSampler(val_ds.series_bounds(), rank=dist.rank, world_size=dist.world_size)
    configure_backends(device, config.cudnn_benchmark == "on")
    pin = device.type == "cuda"
    # Training drops a last partial batch (one shape for every step: no recompile under --compile); an
    # epoch is then this rank's samples rounded down to whole batches. Validation sees every slice.
    drop_last = len(train_sampler) >= config.batch_size
    settings = {"batch_size": config.batch_size, "num_workers": config.num_workers, "pin_memory": pin}
    loaders = [
        create_seg_loader(train_ds, train_sampler, drop_last=drop_last, **settings),
        create_seg_loader(val_ds, val_sampler, **settings),
    ]
    # A sample hands over its int16 image ((2c+1) slices) and bool mask through shared memory.
    channels, (rows, cols) = 2 * context + 1, val_ds.slice_shape()
    sample_bytes = [(channels * 2 + 1) * crop * crop, (channels * 2 + 1) * rows * cols]
    check_loader_shared_memory(sample_bytes, config.batch_size, config.num_workers)
    return SegData(
        data_root=data_root, slices=slices, split=split, train_ds=train_ds, val_ds=val_ds,
        train_sampler=train_sampler, val_sampler=val_sampler, train_loader=loaders[0], val_loader=loaders[1],
    )  # fmt: skip


def _check_report(args: argparse.Namespace) -> None:
    if args.report:
        check_output_file(args.report, "--report")


def _prepare_args(args: argparse.Namespace) -> None:
    _check_report(args)
    complete_block_order(args)


def _write_report_if_asked(app: SegmentationTrainingApp, args: argparse.Namespace) -> None:
    if args.report:
        write_report(args.report, app)


def write_report(path: str, app: SegmentationTrainingApp) -> None:
    """The last validation's metrics (JSON null where undefined), the epoch and the checkpoint folder."""
    metrics = {
        k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in app.last_summary.items()
    }
    report = {
        "format": "p2ch-seg-report-v1",
        "epoch": app.epoch,
        "samples_seen": app.samples_seen,
        "checkpoint_dir": str(app.checkpoint_dir),
        "best": {"epoch": app.best.epoch, "by": app.best.name, "value": app.best.value},
        "validation": metrics,
        "settings": app.config.to_dict(),
    }
    write_text_atomic(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    return training_main(
        PROG,
        get_args_parser,
        SegTrainingConfig,
        SegmentationTrainingApp,
        argv,
        after_run=_write_report_if_asked,
        prepare_args=_prepare_args,
    )


if __name__ == "__main__":
    sys.exit(main())
