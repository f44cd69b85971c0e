"""`python -m p2ch.training`: train LunaModel on LUNA16 candidates, log to TensorBoard.

The book's LunaTrainingApp, with what a long GPU job needs: leak-free splits, balanced
sampling with a real epoch length, batched augmentation on the training device, mixed
precision, channels-last, torch.compile, DistributedDataParallel under torchrun, atomic
checkpoints with exact resume, and LUNA16's CPM on the validation set.

Two tasks share the app (the book's chapter 14 `--dataset`): `nodule` (default; candidates of
candidates.csv, nodule vs non-nodule, best.pt by CPM) and `malignancy` (`--malignant`: annotated
nodules of annotations_with_malignancy.csv, benign vs malignant, always balanced 1:1, a ROC curve in
TensorBoard, best.pt by AUC). `--finetune PATH` starts from a nodule classifier's weights except
its head, and `--finetune-depth N` trains only the last N weight blocks (1: the head alone); frozen
blocks stay in eval mode, so their batch-norm statistics stay those of the nodule model.

Before the first batch the chunks the run reads (the training epochs left, as the seeded sampler
draws them, and the validation set) are looked up in the cache's index and the missing ones are
cropped CT by CT (`p2ch.prefill.warm_chunk_cache`), so a cold cache costs one load per CT instead of
one per missing chunk in a DataLoader worker; `--no-prefill` only warns.

The app is a recipe over the library: data from `p2ch.datasets`, the epoch loop and the
best-checkpoint policy from `p2ch.loop`, TensorBoard from `p2ch.tblog`, checkpoints from
`p2ch.checkpoint`, device/AMP/DDP from `p2ch.runtime`.

Recipe: Adam at lr 1e-3 by default (measured to learn where the book's SGD lr 1e-3 momentum 0.99
barely moves; `--optimizer sgd --lr 0.001 --momentum 0.99` is the book's), `--lr-schedule
constant|onecycle|cosine` with `--warmup-samples` (p2ch.trainer), `--label-smoothing`, `--weight-decay`
and `--mixup ALPHA`: each training batch, after augmentation and on the device, mixed with a
permutation of itself (`mix_batch`); the targets become soft labels. Validation never mixes.

Multi-GPU: `torchrun --nproc-per-node=N -m p2ch.training …` (NCCL on GPUs, gloo on CPUs).
Each rank reads a disjoint shard of every epoch; per-sample outputs are gathered for metrics;
only rank 0 computes CPM, logs and writes checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from p2ch.augment import AugmentConfig, augment_batch
from p2ch.cache import ChunkCache
from p2ch.candidates import (
    CandidateArrays,
    get_task_arrays,
    read_reference,
    submission_frame,
)
from p2ch.checkpoint import load_finetune_weights, source_model_width
from p2ch.config import (
    BATCH_BUFFERS,
    SELECT_BY,
    TASK_OF_DATASET,
    DefaultsHelpFormatter,
    TrainingConfig,
    add_augmentation_arguments,
    add_data_arguments,
    add_optimisation_arguments,
    add_output_arguments,
    add_run_control_arguments,
    add_speed_arguments,
    add_split_arguments,
    display_path,
)
from p2ch.datasets import (
    BOOK_EPOCH_SIZE,
    BalancedSampler,
    DevicePrefetcher,
    EvalSampler,
    LunaDataset,
    MalignantLunaDataset,
    ShuffleSampler,
    Split,
    create_loader,
    shard_bounds,
    split_candidates,
    to_device_batch,
)
from p2ch.errors import ConfigError
from p2ch.geometry import DEFAULT_WIDTH_IRC
from p2ch.loop import BestCheckpoint, EpochResult, Metric, run_epoch
from p2ch.metrics import classification_summary, froc
from p2ch.model import LunaModel, arch_signature, freeze_for_finetune, set_train_mode
from p2ch.prefill import warm_chunk_cache
from p2ch.runtime import DistInfo, autocast, barrier, check_loader_shared_memory, configure_backends
from p2ch.trainer import TrainingRun, batches_of, training_main
from p2ch.vis import LUNG_WINDOW_HU

log = logging.getLogger("p2ch.training")

PROG = "p2ch.training"  # as errors are prefixed
# The ladder that picks best.pt: --select-by first, then F1, then the lowest loss (p2ch.loop).
SELECTION_METRICS = {
    "cpm": Metric("cpm", "froc/cpm"),
    "f1": Metric("f1", "pr/f1_score"),
    "auc": Metric("auc", "pr/auc"),
}
HPARAM_TAGS = {
    "nodule": ("hparam/val_f1", "hparam/val_auc", "hparam/val_cpm"),
    "malignancy": ("hparam/val_auc", "hparam/val_f1"),
}
# What label 0 and label 1 are called in logs and image tags, per task.
CLASS_NAMES = {"nodule": ("neg", "pos"), "malignancy": ("benign", "malignant")}


def get_args_parser() -> argparse.ArgumentParser:
    d = TrainingConfig()
    parser = argparse.ArgumentParser(
        prog="python -m p2ch.training",
        description="Train the LUNA16 nodule/non-nodule classifier (LunaModel) and log to TensorBoard.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Examples: python -m p2ch.training --epochs 10 --balanced --augmented --batch-size 256 "
        "--num-workers 16 first-run; then: tensorboard --logdir runs. Malignancy, fine-tuned from a nodule "
        "model: python -m p2ch.training --malignant --finetune data-unversioned/models/p2ch/<run>/best.pt "
        "--finetune-depth 2 --augmented --epochs 10 mal",
    )
    parser.add_argument("comment", nargs="?", default=d.comment, help="suffix for the run directories")
    _add_task_arguments(parser)
    add_data_arguments(parser)
    add_split_arguments(parser, d)
    _add_sampling_arguments(parser, d)
    add_augmentation_arguments(parser, rotate_help="random rotation about the head-foot axis")
    _add_model_arguments(parser, d)
    optimisation = add_optimisation_arguments(parser, d)
    optimisation.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing")
    optimisation.add_argument(
        "--mixup",
        type=float,
        default=d.mixup,
        metavar="ALPHA",
        help="mixup: blend each training sample with another of its batch, x = λ x_i + (1 - λ) x_j, targets "
        "likewise, λ ~ Beta(ALPHA, ALPHA) per sample (taken ≥ 0.5, so a sample stays mostly itself); e.g. 0.2; "
        "0: off. Training metrics then judge each sample by its own (dominant) label; the loss is the mixed one",
    )
    speed = add_speed_arguments(
        parser, d, "channels_last_3d memory format for the model and batches (2.2x faster training on a 2-core CPU, "
        "see BENCHMARKS.md)",
    )  # fmt: skip
    speed.add_argument(
        "--batch-buffers",
        choices=BATCH_BUFFERS,
        default=d.batch_buffers,
        help="reuse: each DataLoader worker writes batches into the batch buffers the main process has let go of "
        "(2x samples/s per worker on a 2-core CPU, BENCHMARKS.md), keeping prefetch + 2 of them in shared memory "
        "per worker and loader; fresh: a new buffer per batch (less shared memory: for a small /dev/shm)",
    )
    images = "log hardest negatives/positives as images every N epochs (0: never)"
    control = add_run_control_arguments(parser, d, images)
    control.add_argument(
        "--select-by",
        choices=SELECT_BY,
        default=None,
        help="validation metric that picks best.pt (default: cpm for nodules, falling back to f1 when validation "
        "has no nodules; auc for malignancy)",
    )
    add_output_arguments(parser, d)
    return parser


def _dataset_task(name: str) -> str:
    """--dataset NAME (the book's class names) → the task it trains."""
    if name not in TASK_OF_DATASET:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(TASK_OF_DATASET)}")
    return TASK_OF_DATASET[name]


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """--malignant / --dataset, --finetune, --finetune-depth."""
    g = parser.add_argument_group("task (the book's chapter 14)")
    g.add_argument(
        "--malignant",
        dest="task",
        action="store_const",
        const="malignancy",
        default="nodule",
        help="train benign vs malignant on the annotated nodules of annotations_with_malignancy.csv "
        "(balanced 1:1; best.pt by validation AUC) instead of nodule vs non-nodule candidates",
    )
    g.add_argument(
        "--dataset",
        dest="task",
        type=_dataset_task,
        metavar="{LunaDataset,MalignantLunaDataset}",
        help="the book's spelling: MalignantLunaDataset is --malignant, LunaDataset the default",
    )
    g.add_argument(
        "--finetune",
        default=None,
        metavar="PATH",
        help="start from this nodule classifier checkpoint: every weight but the head (which starts fresh)",
    )
    g.add_argument(
        "--finetune-depth",
        type=int,
        default=None,
        metavar="N",
        help="with --finetune: train only the last N weight blocks of tail_batchnorm, block1-4, head_linear "
        "(default 1: only the head; 2: block4 and the head)",
    )


def _add_model_arguments(parser: argparse.ArgumentParser, d: TrainingConfig) -> None:
    """--model-width."""
    parser.add_argument_group("model").add_argument(
        "--model-width",
        type=int,
        default=None,
        metavar="N",
        help="conv channels of LunaModel's first block, doubled in each of the next three (8: the book's model, "
        "222k weights; 16: 883k weights, 2.1x the CPU time per training sample, and the width that reached CPM 0.9 in "
        f"BENCHMARKS.md). Default: {d.model_width}, or with --finetune/--init-weights PATH the width PATH was "
        "trained with; evaluate, predict and nodule_analysis read it from the checkpoint",
    )


def complete_model_width(args: argparse.Namespace) -> None:
    """--model-width left out of a new run that loads weights (--finetune, --init-weights): the width of
    the model it loads, so that a wide nodule model fine-tunes without repeating its width."""
    source = args.finetune or args.init_weights
    if args.model_width is None and source and not args.resume:
        args.model_width = source_model_width(source)


def _add_sampling_arguments(parser: argparse.ArgumentParser, d: TrainingConfig) -> None:
    """--balanced, --balance-ratio, --epoch-size."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--balanced", action="store_true", help="1 negative per positive, as the book")
    g.add_argument(
        "--balance-ratio", type=int, default=None, help="N negatives per positive (implies balanced sampling)"
    )
    g.add_argument(
        "--epoch-size",
        type=int,
        default=None,
        help=f"training samples per epoch (default: min({BOOK_EPOCH_SIZE:,}, training candidates) "
        "when balanced, as the book on LUNA16; else every training candidate once)",
    )


@dataclasses.dataclass
class LunaData:
    """What a classification run trains and validates on: candidates, split, datasets, samplers, loaders."""

    data_root: Path
    candidates: CandidateArrays
    split: Split
    source: ChunkCache
    train_ds: LunaDataset
    val_ds: LunaDataset
    train_sampler: BalancedSampler | ShuffleSampler
    val_sampler: EvalSampler
    train_loader: Any
    val_loader: Any


def check_malignancy_split(train_ds: LunaDataset, val_ds: LunaDataset, split: Split) -> None:
    """ConfigError unless training and validation each hold benign and malignant nodules (AUC needs both)."""
    for name, ds, series in (("training", train_ds, split.train_series), ("validation", val_ds, split.val_series)):
        malignant = int(ds.labels.sum())
        benign = len(ds) - malignant
        if malignant == 0 or benign == 0:
            raise ConfigError(
                f"malignancy split: {name} has {malignant} malignant and {benign} benign nodules ({len(series)} "
                "series); it needs both (AUC and balanced sampling compare the two); raise --val-fraction, use "
                "another --split, or add CTs"
            )


def build_data(config: TrainingConfig, dist: DistInfo, device: torch.device) -> LunaData:
    """Rows of the task, the leak-free split, datasets over the chunk cache, this rank's samplers and loaders."""
    data_root = Path(config.data_root)
    candidates = get_task_arrays(data_root, config.task)
    dataset_class = MalignantLunaDataset if config.task == "malignancy" else LunaDataset
    split = split_candidates(candidates, config.split, **config.split_settings(), data_root=data_root)
    source = ChunkCache(config.cache_dir, data_root)
    train_ds = dataset_class(candidates, split.train, source, config.width_irc)
    val_ds = dataset_class(candidates, split.val, source, config.width_irc)
    if config.task == "malignancy":
        check_malignancy_split(train_ds, val_ds, split)
    rank, world = dist.rank, dist.world_size
    if config.balanced or config.task == "malignancy":  # malignancy: always benign:malignant 1:1 (the book)
        train_sampler = BalancedSampler(
            train_ds.labels,
            ratio=config.balance_ratio or 1,
            epoch_size=config.epoch_size,
            seed=config.seed,
            rank=rank,
            world_size=world,
        )
    else:
        train_sampler = ShuffleSampler(
            len(train_ds), seed=config.seed, rank=rank, world_size=world, epoch_size=config.epoch_size
        )
    val_sampler = EvalSampler(len(val_ds), rank=rank, world_size=world)
    configure_backends(device, config.cudnn_benchmark == "on")
    pin = device.type == "cuda"
    # Training drops a last partial batch, so every step has one shape (no recompile under --compile, no
    # cuDNN re-tuning): an epoch is then this rank's samples rounded down to whole batches (samples_seen
    # counts what ran). An epoch shorter than one batch keeps its single partial batch. Validation sees all.
    drop_last = len(train_sampler) >= config.batch_size
    reuse = config.batch_buffers == "reuse"
    loader_settings = {
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "pin_memory": pin,
        "reuse_buffers": reuse,
    }
    train_loader = create_loader(train_ds, train_sampler, drop_last=drop_last, **loader_settings)
    val_loader = create_loader(val_ds, val_sampler, **loader_settings)
    # A sample hands over its int16 chunk, label and centre (int64) through shared memory.
    sample_bytes = math.prod(config.width_irc) * 2 + 32
    check_loader_shared_memory([sample_bytes] * 2, config.batch_size, config.num_workers, reuse=reuse)
    return LunaData(
        data_root, candidates, split, source, train_ds, val_ds, train_sampler, val_sampler, train_loader, val_loader
    )


MAX_PREFILL_WORKERS = 8  # each holds one CT (0.2-1 GB on LUNA16)


def sampler_reads(sampler: Any, epoch: int, batch_size: int, max_batches: int | None) -> np.ndarray:
    """(n,) int64 dataset positions one epoch reads over every rank (a rank stops after `max_batches`).

    sampler: a `BalancedSampler`/`ShuffleSampler` (rank r reads the contiguous shard r of
    `global_indices(epoch)`) or an `EvalSampler` (rank r reads `shard_bounds(...)[r]`, in order).
    """
    per_rank = len(sampler) if max_batches is None else min(len(sampler), max_batches * batch_size)
    if isinstance(sampler, EvalSampler):
        bounds = shard_bounds(sampler.length, sampler.world_size)
        parts = [np.arange(start, min(stop, start + per_rank), dtype=np.int64) for start, stop in bounds]
    else:
        order, size = sampler.global_indices(epoch), sampler.num_samples
        parts = [order[r * size : r * size + per_rank] for r in range(sampler.world_size)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def rows_to_read(data: LunaData, config: TrainingConfig, first_epoch: int) -> np.ndarray:
    """(n,) int64 rows of `data.candidates` a run reads from epoch `first_epoch` to `config.epochs`: what the
    (seeded) training sampler draws in those epochs and the validation set (empty when no epoch is left)."""
    if first_epoch > config.epochs:
        return np.zeros(0, dtype=np.int64)
    parts = [
        data.train_ds.indices[sampler_reads(data.train_sampler, epoch, config.batch_size, config.max_train_batches)]
        for epoch in range(first_epoch, config.epochs + 1)
    ]
    parts.append(data.val_ds.indices[sampler_reads(data.val_sampler, 0, config.batch_size, config.max_val_batches)])
    return np.unique(np.concatenate(parts))


def prepcache_command(config: TrainingConfig) -> str:
    """The prepcache line that fills the chunk cache for this run's data (`display_path`s)."""
    command = f"python -m p2ch.prepcache --data-root {display_path(config.data_root)}"
    command += f" --cache-dir {display_path(config.cache_dir)}" if config.cache_dir else ""
    if tuple(config.width_irc) != DEFAULT_WIDTH_IRC:
        command += " --width-irc " + " ".join(str(v) for v in config.width_irc)
    return command + (" --malignant" if config.task == "malignancy" else "")


def augment_config(config: TrainingConfig) -> AugmentConfig:
    """The batched augmentation the flags ask for (--augmented: all of them)."""
    return AugmentConfig.from_flags(
        augmented=config.augmented, flip=config.augment_flip, offset=config.augment_offset,
        scale=config.augment_scale, rotate=config.augment_rotate, noise=config.augment_noise,
    )  # fmt: skip


MIXUP_ROUNDS = 8  # candidate draws per Gamma sample (Marsaglia-Tsang accepts each with p > 0.95)


def sample_log_gamma(alpha: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """log of `count` draws of Gamma(alpha, 1): (count,) float32 on the generator's device, from `generator` only.

    torch's own Gamma sampler takes no generator; this is Marsaglia and Tsang's method (2000), with
    MIXUP_ROUNDS candidates drawn at once so that no round trip to the host is needed (all rejected:
    p < 1e-10, then the first candidate is kept), and for alpha < 1 Gamma(alpha + 1) * U^(1/alpha),
    in logs so that small alphas do not underflow to 0.
    """
    device = generator.device
    a = alpha + 1.0 if alpha < 1.0 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    x = torch.randn((MIXUP_ROUNDS, count), generator=generator, device=device)
    u = 1.0 - torch.rand((MIXUP_ROUNDS, count), generator=generator, device=device)  # (0, 1]
    v = (1.0 + c * x) ** 3
    safe_v = v.clamp_min(1e-30)
    accept = (v > 0) & (u.log() < 0.5 * x * x + d - d * safe_v + d * safe_v.log())
    first = accept.to(torch.uint8).argmax(dim=0)  # the first accepted round (0 when none was)
    log_gamma = (d * safe_v).log().gather(0, first[None])[0]
    if alpha < 1.0:
        boost = 1.0 - torch.rand(count, generator=generator, device=device)
        log_gamma = log_gamma + boost.log() / alpha
    return log_gamma


def sample_beta(alpha: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` draws of Beta(alpha, alpha): (count,) float32 in [0, 1] on the generator's device."""
    return torch.sigmoid(sample_log_gamma(alpha, count, generator) - sample_log_gamma(alpha, count, generator))


def mix_batch(
    x: torch.Tensor, labels: torch.Tensor, alpha: float, generator: torch.Generator, num_classes: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixup of a batch with a permutation of itself: (mixed x, soft targets, λ).

    x: (N, ...) float32 (the augmented batch, on the device); labels: (N,) int64. Sample i becomes
    λ_i x_i + (1 - λ_i) x_perm(i) with λ_i ~ Beta(alpha, alpha) drawn per sample and taken as
    max(λ, 1 - λ) (the same mixes, with the larger share on sample i, so its own label is its dominant
    one); targets: (N, num_classes) float32 rows λ_i onehot(y_i) + (1 - λ_i) onehot(y_perm(i)); λ: (N,).
    """
    count = x.shape[0]
    lam = sample_beta(alpha, count, generator)
    lam = torch.maximum(lam, 1.0 - lam)
    perm = torch.randperm(count, generator=generator, device=generator.device).to(x.device)
    lam = lam.to(x.device)
    shape = (count,) + (1,) * (x.dim() - 1)
    mixed = torch.lerp(x[perm], x, lam.view(shape).to(x.dtype))  # x[perm] + λ (x - x[perm])
    onehot = F.one_hot(labels, num_classes).float()
    targets = torch.lerp(onehot[perm], onehot, lam[:, None])
    return mixed, targets, lam


def hardest_examples(
    val: EpochResult, dataset: LunaDataset, count: int = 8, names: tuple[str, str] = ("negatives", "positives")
) -> dict[str, torch.Tensor]:
    """Centre slices (lung window, (n, 1, R, C) float in [0, 1]) of the highest-scoring label-0 samples
    (`val/hardest_<names[0]>`) and the lowest-scoring label-1 samples (`val/hardest_<names[1]>`)."""
    labels = val.outputs["labels"].cpu().numpy()
    probs = val.outputs["prob_pos"].cpu().numpy()
    positions = val.outputs["positions"].cpu().numpy()
    low, high = LUNG_WINDOW_HU
    found = {}
    tags = (f"val/hardest_{names[0]}", f"val/hardest_{names[1]}")
    for tag, mask, descending in ((tags[0], ~labels, True), (tags[1], labels, False)):
        idx = np.flatnonzero(mask)
        order = idx[np.argsort(probs[idx])]
        chosen = (order[::-1] if descending else order)[:count]
        slices = []
        for k in chosen:
            chunk = dataset[int(positions[k])][0]  # (1, I, R, C) int16
            centre = chunk[:, chunk.shape[1] // 2].float()
            slices.append(((centre - low) / (high - low)).clamp(0, 1))
        if slices:
            found[tag] = torch.stack(slices)
    return found


def log_run_description(app: LunaTrainingApp) -> None:
    """Log what the run trains on, once, at the start (TrainingRun.run logs the settings)."""
    split, data = app.data.split, app.data
    rows, positive = ("annotated nodules", "malignant") if app.task == "malignancy" else ("candidates", "positive")
    log.info(
        "device %s, AMP %s, channels-last %s, compile %s, world size %d; task %s; data %s: %d %s; "
        "split %s: train %d (%d series, %d %s), val %d (%d series, %d %s), test %d",
        app.device, app.amp_dtype or "off", app.channels_last, app.config.compile, app.dist.world_size, app.task,
        display_path(data.data_root), len(data.candidates), rows, split.mode, len(split.train),
        len(split.train_series), int(data.train_ds.labels.sum()), positive, len(split.val), len(split.val_series),
        int(data.val_ds.labels.sum()), positive, len(split.test),
    )  # fmt: skip


class LunaTrainingApp(TrainingRun):
    """The classification run (the book's LunaTrainingApp): a recipe over `TrainingRun`.

    Per epoch: train on balanced, augmented chunks; validate; log loss, accuracy, precision/recall/F1,
    AUC and LUNA16's CPM (nodule task) or a ROC curve (malignancy task); save last.pt and best.pt (by
    `config.best_by`, then F1, then loss).
    """

    tb_kind = "cls"
    memory_format = torch.channels_last_3d

    def __init__(self, config: TrainingConfig, resume_state: dict[str, Any] | None = None):
        self.config: TrainingConfig
        self.task = config.task
        self.tb_kind = "mal" if config.task == "malignancy" else "cls"
        self.class_names = CLASS_NAMES[config.task]
        self.augment = augment_config(config)
        self._reference = None  # validation annotations for CPM, read on first use
        self._hit_rate = math.nan
        super().__init__(config, resume_state)

    # -- what TrainingRun asks for ---------------------------------------------------------------

    def make_model(self) -> torch.nn.Module:
        return LunaModel(conv_channels=self.config.model_width)

    def arch_of(self, model: torch.nn.Module) -> str:
        # 'LunaModel-v1:<hash of state-dict keys and shapes>': load_checkpoint refuses any other.
        return arch_signature(model)

    def make_best(self) -> BestCheckpoint:
        return BestCheckpoint([SELECTION_METRICS[self.config.best_by], SELECTION_METRICS["f1"]])

    def build_data(self) -> None:
        self.data = build_data(self.config, self.dist, self.device)

    def warm_cache(self) -> None:
        """Before the first batch: the chunks this run reads (training epochs left, validation) checked in the cache
        (keys only) and filled CT by CT where it lacks them; with --no-prefill, one warning says what is missing."""
        config = self.config
        warm_chunk_cache(
            self.data.source, self.data.candidates, rows_to_read(self.data, config, self.epoch + 1), config.width_irc,
            fill=config.prefill, num_workers=min(config.num_workers, MAX_PREFILL_WORKERS),
            prepcache_command=prepcache_command(config),
        )  # fmt: skip

    def prepare_model(self, model: torch.nn.Module, resume_state: dict[str, Any] | None) -> None:
        """--finetune: a nodule model's weights but the head (new runs only), then freeze all but the last
        --finetune-depth blocks (also when resuming, so the same parameters train)."""
        config = self.config
        if not config.finetune:
            return
        if resume_state is None:
            source = load_finetune_weights(model, config.finetune, config.width_irc)
            log.info("fine-tuning from %s (epoch %s), head re-initialised", config.finetune, source.get("epoch"))
        trained = freeze_for_finetune(model, config.finetune_depth or 1)
        log.info("training %s; the other blocks are frozen", ", ".join(trained))

    def hparam_tags(self) -> tuple[str, ...]:
        return HPARAM_TAGS[self.task]

    # -- one epoch -----------------------------------------------------------------------------

    def _to_model_input(self, chunks: torch.Tensor) -> torch.Tensor:
        # Chunks arrive as int16 HU (half the bytes of float32 through workers and pinned memory).
        x = to_device_batch(chunks, self.device)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def _train_step(self, batch) -> dict[str, torch.Tensor]:
        x = self._to_model_input(batch.chunk)  # float32 HU on the device
        y = batch.label.to(self.device, non_blocking=True)
        if self.augment.enabled:
            x = augment_batch(x, self.augment, generator=self.aug_generator)
        target: torch.Tensor = y
        if self.config.mixup > 0:  # off: not a single draw, so the run is the one without mixup bit for bit
            x, target, _ = mix_batch(x, y, self.config.mixup, self.aug_generator)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
        with autocast(self.device, self.amp_dtype):
            logits, prob = self.train_model(x)
        # Soft targets (mixup) are smoothed as hard ones: (1 - ε) target + ε / 2.
        loss = F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=self.config.label_smoothing)
        self.optimizer_step(loss.mean())
        return {"labels": y.detach().bool(), "prob_pos": prob.detach()[:, 1].float(), "losses": loss.detach()}

    @torch.inference_mode()
    def _val_step(self, batch) -> dict[str, torch.Tensor]:
        x = self._to_model_input(batch.chunk)
        y = batch.label.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            logits, prob = self.train_model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        return {"labels": y.bool(), "prob_pos": prob[:, 1].float(), "losses": loss}

    def train_epoch(self, epoch: int) -> EpochResult:
        self.train_model.train()
        set_train_mode(self.model)  # frozen (fine-tuning) blocks stay in eval mode
        self.data.train_sampler.set_epoch(epoch)
        self.seed_augmentation(epoch)
        order = self.data.train_sampler.indices()
        batches = batches_of(self.data.train_loader, self.config.max_train_batches)
        entries_before = len(self.data.source)
        result = run_epoch(
            DevicePrefetcher(self.data.train_loader, self.device), self._train_step, device=self.device, dist=self.dist,
            desc=f"epoch {epoch} train", total_samples=min(batches * self.config.batch_size, len(order)),
            batches=batches, positions=order, finite="losses",
        )  # fmt: skip
        # Every miss writes one entry (in whichever worker process met it), so the growth of the
        # cache over the epoch counts the misses of all workers and ranks.
        self._hit_rate = max(0.0, 1.0 - (len(self.data.source) - entries_before) / max(result.count, 1))
        return result

    def validate(self, epoch: int) -> EpochResult:
        self.train_model.eval()
        order = np.fromiter(iter(self.data.val_sampler), dtype=np.int64)
        batches = batches_of(self.data.val_loader, self.config.max_val_batches)
        return run_epoch(
            DevicePrefetcher(self.data.val_loader, self.device), self._val_step, device=self.device, dist=self.dist,
            desc=f"epoch {epoch} validation", total_samples=min(batches * self.config.batch_size, len(order)),
            batches=batches, positions=order,
        )  # fmt: skip

    # -- logging -------------------------------------------------------------------------------

    def log_epoch(self, mode: str, epoch: int, result: EpochResult, extra: dict[str, float]) -> dict[str, float]:
        summary = epoch_summary(result, extra)
        if self.dist.is_main:
            self.writers.scalars(mode, summary, self.samples_seen)
            out = result.outputs
            self.writers.score_distribution(mode, out["labels"], out["prob_pos"], self.samples_seen)
            if self.task == "malignancy" and mode == "val":
                self.writers.roc_curve(mode, out["labels"], out["prob_pos"], self.samples_seen)
            self.writers.flush()
            partial_of = None if result.complete or mode != "val" else len(self.data.val_ds)
            log.info("%s", format_epoch(epoch, mode, result.count, summary, partial_of, self.class_names))
        return summary

    def log_training(self, epoch: int, result: EpochResult) -> None:
        extra = {"lr": self.optimizer.param_groups[0]["lr"], "cache/hit_rate": self._hit_rate}
        self.log_epoch("trn", epoch, result, extra)

    def _validation_extra(self, val: EpochResult) -> dict[str, float]:
        """CPM of the validation pass (rank 0 only, nodule task), tagged partial when --max-val-batches cut it."""
        if not self.dist.is_main or val.count == 0 or self.task != "nodule":
            return {}
        if self._reference is None:
            self._reference = read_reference(self.data.data_root, self.data.split.val_series)
        cpm = cpm_of(self.data.candidates, self.data.split, self.data.data_root, val, self._reference)
        return {"froc/cpm" if val.complete else "froc/cpm_partial": cpm}

    def run_validation(self, epoch: int) -> bool:
        val = self.validate(epoch)
        summary = self.log_epoch("val", epoch, val, self._validation_extra(val))
        cpm = summary.get("froc/cpm", summary.get("froc/cpm_partial", math.nan))
        if self.dist.is_main:
            hparams = {"hparam/val_f1": summary["pr/f1_score"], "hparam/val_auc": summary["pr/auc"]}
            if self.task == "nodule":
                hparams["hparam/val_cpm"] = cpm
            self.writers.scalars("val", hparams, self.samples_seen)
            every = self.config.images_every
            if every and (epoch % every == 0 or epoch == self.config.epochs):
                names = ("negatives", "positives") if self.task == "nodule" else self.class_names
                for tag, images in hardest_examples(val, self.data.val_ds, names=names).items():
                    self.writers.images("val", tag, images, self.samples_seen)
        return self.best.update({**summary, "froc/cpm": cpm}, epoch)

    def run(self) -> None:
        try:
            if self.dist.is_main:
                log_run_description(self)
                self.warm_cache()
            barrier(self.dist)  # the other ranks read what rank 0 cached
        except BaseException:
            self.writers.close()
            raise
        super().run()


def cpm_of(candidates: CandidateArrays, split: Split, data_root: Path, val: EpochResult, reference=None) -> float:
    """LUNA16's CPM over the validation candidates scored in `val` (nan without nodules)."""
    annotations, excluded = reference if reference is not None else read_reference(data_root, split.val_series)
    if annotations.empty or val.count == 0:
        return math.nan
    predictions = submission_frame(
        candidates,
        split.val[val.outputs["positions"].cpu().numpy()],
        val.outputs["prob_pos"].cpu().numpy(),
    )
    return float(froc(predictions, annotations, excluded, series_uids=sorted(set(split.val_series)), bootstrap=0).cpm)


def epoch_summary(result: EpochResult, extra: dict[str, float]) -> dict[str, float]:
    """Classification metrics of an epoch (keyed by TensorBoard tag), with `extra` and the speed."""
    out = result.outputs
    summary = classification_summary(out["labels"], out["prob_pos"], out["losses"])
    summary.update(extra)
    summary["perf/samples_per_sec"] = result.samples_per_sec
    summary["perf/data_wait_fraction"] = result.data_wait_fraction
    return summary


def format_epoch(
    epoch: int,
    mode: str,
    count: int,
    summary: dict[str, float],
    partial_of: int | None,
    class_names: tuple[str, str] = CLASS_NAMES["nodule"],
) -> str:
    """The one log line of an epoch; `class_names` name labels 0 and 1 (neg/pos, benign/malignant)."""
    cpm = summary.get("froc/cpm", summary.get("froc/cpm_partial"))
    cpm_text = "" if cpm is None else f", CPM {cpm:.3f}"
    lr_text = f", lr {summary['lr']:.3g}" if "lr" in summary else ""
    if partial_of is not None and cpm is not None:
        cpm_text += f" (partial: {count:,} of {partial_of:,} validation candidates, --max-val-batches)"
    return (
        f"E{epoch} {mode} {count:,} samples: loss {summary['loss/all']:.4f}, correct {summary['correct/all']:.1f}% "
        f"({class_names[0]} {summary['correct/neg']:.1f}%, {class_names[1]} {summary['correct/pos']:.1f}%), precision "
        f"{summary['pr/precision']:.3f}, recall {summary['pr/recall']:.3f}, F1 {summary['pr/f1_score']:.3f}, "
        f"AUC {summary['pr/auc']:.3f}{cpm_text}{lr_text}, {summary['perf/samples_per_sec']:.0f} samples/s, "
        f"data wait {100 * summary['perf/data_wait_fraction']:.0f}%"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return training_main(
        PROG, get_args_parser, TrainingConfig, LunaTrainingApp, argv, prepare_args=complete_model_width
    )


if __name__ == "__main__":
    sys.exit(main())
