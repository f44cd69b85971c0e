"""`python -m p2ch.training`: train LunaModel on LUNA16 candidates, log to TensorBoard.

The book's LunaTrainingApp, with what a long GPU job needs: leak-free splits, balanced
sampling with a real epoch length, batched augmentation on the training device, mixed
precision, channels-last, torch.compile, DistributedDataParallel under torchrun, atomic
checkpoints with exact resume, and LUNA16's CPM on the validation set.

The app is a recipe over the library: data from `p2ch.datasets`, the epoch loop and the
best-checkpoint policy from `p2ch.loop`, TensorBoard from `p2ch.tblog`, checkpoints from
`p2ch.checkpoint`, device/AMP/DDP from `p2ch.runtime`.

Multi-GPU: `torchrun --nproc-per-node=N -m p2ch.training …` (NCCL on GPUs, gloo on CPUs).
Each rank reads a disjoint shard of every epoch; per-sample outputs are gathered for metrics;
only rank 0 computes CPM, logs and writes checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from p2ch.augment import AugmentConfig, augment_batch
from p2ch.cache import ChunkCache
from p2ch.candidates import CandidateArrays, get_candidate_arrays, read_reference, submission_frame
from p2ch.checkpoint import BEST_NAME, LAST_NAME, load_checkpoint, load_weights, save_checkpoint
from p2ch.cli import configure_logging, run_cli
from p2ch.config import (
    AMP_MODES,
    OPTIMIZERS,
    SELECT_BY,
    SPLIT_MODES,
    DefaultsHelpFormatter,
    TrainingConfig,
    absolute_paths,
    display_path,
    resume_config,
)
from p2ch.datasets import (
    BOOK_EPOCH_SIZE,
    BalancedSampler,
    EvalSampler,
    LunaDataset,
    ShuffleSampler,
    Split,
    create_loader,
    split_candidates,
    to_device_batch,
)
from p2ch.errors import ConfigError, DataFormatError
from p2ch.loop import BestCheckpoint, EpochResult, Metric, run_epoch
from p2ch.metrics import classification_summary, froc
from p2ch.model import LunaModel, arch_signature
from p2ch.runtime import (
    DistInfo,
    autocast,
    barrier,
    close_distributed,
    init_distributed,
    local_rank,
    resolve_amp,
    resolve_device,
)
from p2ch.tblog import RunWriters
from p2ch.vis import LUNG_WINDOW_HU

log = logging.getLogger("p2ch.training")

PROG = "p2ch.training"  # as errors are prefixed
# The ladder that picks best.pt: --select-by first, then F1, then the lowest loss (p2ch.loop).
SELECTION_METRICS = {"cpm": Metric("cpm", "froc/cpm"), "f1": Metric("f1", "pr/f1_score")}
HPARAM_TAGS = ("hparam/val_f1", "hparam/val_auc", "hparam/val_cpm")
# What a checkpoint must hold for --resume (older checkpoints lack only best_loss/best_epoch/best_key).
RESUME_KEYS = ("model", "optimizer", "epoch", "samples_seen", "config", "run_time", "rng")


def get_args_parser() -> argparse.ArgumentParser:
    d = TrainingConfig()
    parser = argparse.ArgumentParser(
        prog="python -m p2ch.training",
        description="Train the LUNA16 nodule/non-nodule classifier (LunaModel) and log to TensorBoard.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Example: python -m p2ch.training --epochs 10 --balanced --augmented --batch-size 256 "
        "--num-workers 16 first-run; then: tensorboard --logdir runs",
    )
    parser.add_argument("comment", nargs="?", default=d.comment, help="suffix for the run directories")
    _add_data_arguments(parser, d)
    _add_split_arguments(parser, d)
    _add_sampling_arguments(parser, d)
    _add_augmentation_arguments(parser, d)
    _add_optimisation_arguments(parser, d)
    _add_speed_arguments(parser, d)
    _add_run_control_arguments(parser, d)
    _add_output_arguments(parser, d)
    return parser


def _add_data_arguments(parser: argparse.ArgumentParser, d: TrainingConfig) -> None:
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data-root",
        default=None,
        help="LUNA16 root with subset*/ and the CSVs (default: $P2CH_DATA_ROOT or data-unversioned/part2/luna)",
    )
    g.add_argument("--cache-dir", default=None, help="chunk cache (default: $P2CH_CACHE_DIR or data-unversioned/cache)")


def _add_split_arguments(parser: argparse.ArgumentParser, d: TrainingConfig) -> None:
    g = parser.add_argument_group("split (every CT entirely in one part unless --split stride)")
    g.add_argument(
        "--split",
        choices=SPLIT_MODES,
        default=d.split,
        help="series: by a stable hash of series_uid; subset: LUNA16 folds (--val-subsets); "
        "stride: the book's every-Nth-candidate split (leaky, for comparison only)",
    )
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="fraction of series for validation")
    g.add_argument(
        "--val-stride",
        type=int,
        default=None,
        help="every Nth series (series split) or candidate (stride split) to validation",
    )
    g.add_argument(
        "--val-subsets",
        type=int,
        nargs="+",
        default=list(d.val_subsets),
        help="subset folders used for validation with --split subset",
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        default=d.test_fraction,
        help="fraction of series held out as a test part that training never sees",
    )
    g.add_argument(
        "--test-subsets",
        type=int,
        nargs="*",
        default=list(d.test_subsets),
        help="subset folders held out as test with --split subset",
    )


def _add_sampling_arguments(parser: argparse.ArgumentParser, d: TrainingConfig) -> None:
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


def _add_augmentation_arguments(parser: argparse.ArgumentParser, d: TrainingConfig) -> None:
    g = parser.add_argument_group("augmentation (batched, on the training device)")
    g.add_argument("--augmented", action="store_true", help="all of the augmentations below")
    g.add_argument("--augment-flip", action="store_true", help="random flip per axis")
    g.add_argument("--augment-offset", action="store_true", help="random offset ±10%%")
    g.add_argument("--augment-scale", action="store_true", help="random scale ±20%%")
    g.add_argument("--augment-rotate", action="store_true", help="random rotation about the head-foot axis")
    g.add_argument("--augment-noise", action="store_true", help="Gaussian noise, σ = 25 HU")


def _add_optimisation_arguments(parser: argparse.ArgumentParser, d: TrainingConfig) -> None:
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per batch (per GPU)")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader worker processes (per GPU)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs to train (in total, when resuming)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimizer")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing")


def _add_speed_arguments(parser: argparse.ArgumentParser, d: TrainingConfig) -> None:
    g = parser.add_argument_group("speed")
    g.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=d.amp,
        help="mixed precision: auto = bf16 on CUDA (fp16 if bf16 is unsupported), off on CPU",
    )
    g.add_argument(
        "--channels-last",
        choices=("on", "off"),
        default=d.channels_last,
        help="channels_last_3d memory format for the model and batches (2.2x faster training "
        "on a 2-core CPU, see BENCHMARKS.md)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (under torchrun: per rank)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (DDP only)")


def _add_run_control_arguments(parser: argparse.ArgumentParser, d: TrainingConfig) -> None:
    g = parser.add_argument_group("run control")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for init, sampling and augmentation")
    g.add_argument("--val-every", type=int, default=d.val_every, help="validate every N epochs (and after the last)")
    g.add_argument("--max-train-batches", type=int, default=None, help="stop each training epoch after N batches")
    g.add_argument("--max-val-batches", type=int, default=None, help="stop each validation after N batches")
    g.add_argument(
        "--select-by",
        choices=SELECT_BY,
        default=d.select_by,
        help="validation metric that picks best.pt (cpm falls back to f1 when validation has no nodules)",
    )
    g.add_argument(
        "--images-every",
        type=int,
        default=d.images_every,
        help="log hardest negatives/positives as images every N epochs (0: never)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser, d: TrainingConfig) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--tb-prefix", default=d.tb_prefix, help="runs/<tb-prefix>/ groups related runs")
    g.add_argument("--runs-dir", default=None, help="TensorBoard root (default: $P2CH_RUNS_DIR or runs)")
    g.add_argument(
        "--checkpoint-dir", default=None, help="checkpoint root (default: $P2CH_MODELS_DIR or data-unversioned/models)"
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="continue the run saved in this checkpoint, with its settings (flags given now override)",
    )
    g.add_argument(
        "--init-weights", default=None, metavar="PATH", help="start a new run from this checkpoint's model weights"
    )
    g.add_argument(
        "--log-level", default=d.log_level, choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level"
    )
    g.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: accept a changed data root, width, split or run folder (metrics no longer compare)",
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


def build_data(config: TrainingConfig, dist: DistInfo, device: torch.device) -> LunaData:
    """Candidates, the leak-free split, datasets over the chunk cache, this rank's samplers and loaders."""
    data_root = Path(config.data_root)
    candidates = get_candidate_arrays(data_root)
    split = split_candidates(
        candidates,
        config.split,
        val_fraction=config.val_fraction,
        val_stride=config.val_stride,
        val_subsets=config.val_subsets,
        test_fraction=config.test_fraction,
        test_subsets=config.test_subsets,
        data_root=data_root,
    )
    source = ChunkCache(config.cache_dir, data_root)
    train_ds = LunaDataset(candidates, split.train, source, config.width_irc)
    val_ds = LunaDataset(candidates, split.val, source, config.width_irc)
    rank, world = dist.rank, dist.world_size
    if config.balanced:
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
    pin = device.type == "cuda"
    train_loader, val_loader = (
        create_loader(ds, sampler, batch_size=config.batch_size, num_workers=config.num_workers, pin_memory=pin)
        for ds, sampler in ((train_ds, train_sampler), (val_ds, val_sampler))
    )
    return LunaData(
        data_root, candidates, split, source, train_ds, val_ds, train_sampler, val_sampler, train_loader, val_loader
    )


def augment_config(config: TrainingConfig) -> AugmentConfig:
    """The batched augmentation the flags ask for (--augmented: all of them)."""
    return AugmentConfig.from_flags(
        augmented=config.augmented, flip=config.augment_flip, offset=config.augment_offset,
        scale=config.augment_scale, rotate=config.augment_rotate, noise=config.augment_noise,
    )  # fmt: skip


def make_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """--optimizer adam or sgd (with --momentum), --lr and --weight-decay."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def hardest_examples(val: EpochResult, dataset: LunaDataset, count: int = 8) -> dict[str, torch.Tensor]:
    """Centre slices (lung window, (n, 1, R, C) float in [0, 1]) of the highest-scoring negatives
    (`val/hardest_negatives`) and the lowest-scoring positives (`val/hardest_positives`)."""
    labels = val.outputs["labels"].cpu().numpy()
    probs = val.outputs["prob_pos"].cpu().numpy()
    positions = val.outputs["positions"].cpu().numpy()
    low, high = LUNG_WINDOW_HU
    found = {}
    for tag, mask, descending in (("val/hardest_negatives", ~labels, True), ("val/hardest_positives", labels, False)):
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
    """Log the settings and what the run trains on, once, at the start."""
    split, data = app.data.split, app.data
    log.info("config: %s", json.dumps(app.config.to_dict(), sort_keys=True))
    log.info(
        "device %s, AMP %s, channels-last %s, compile %s, world size %d; data %s: %d candidates; "
        "split %s: train %d candidates (%d series, %d positive), val %d (%d series, %d positive), test %d",
        app.device, app.amp_dtype or "off", app.channels_last, app.config.compile, app.dist.world_size,
        display_path(data.data_root), len(data.candidates), split.mode, len(split.train), len(split.train_series),
        int(data.train_ds.labels.sum()), len(split.val), len(split.val_series), int(data.val_ds.labels.sum()),
        len(split.test),
    )  # fmt: skip


class LunaTrainingApp:
    """The training run (the book's LunaTrainingApp): set-up, then per epoch train, validate, log, save.

    config: the run's settings (paths made absolute here). resume_state: the checkpoint to continue
    (loaded from `config.resume` when not given); main() first merges its settings (`resume_config`).
    """

    def __init__(self, config: TrainingConfig, resume_state: dict[str, Any] | None = None):
        self.config = config = absolute_paths(config)
        if config.resume and resume_state is None:  # used as a library: load what main() would
            resume_state = load_resume_state(config.resume, arch_signature(LunaModel()))
        self.device = resolve_device(config.device, local_rank())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if config.sync_bn and self.device.type != "cuda":
            raise ConfigError(
                "--sync-bn needs CUDA devices (torch's SyncBatchNorm works only on GPUs); "
                f"drop it for --device {self.device.type}"
            )
        self.dist = init_distributed(self.device)
        self.amp_dtype = resolve_amp(config.amp, self.device)
        self.channels_last = config.channels_last == "on"
        self.augment = augment_config(config)
        self.epoch = 0
        self.samples_seen = 0
        self.best = BestCheckpoint([SELECTION_METRICS[config.select_by], SELECTION_METRICS["f1"]])
        self.run_time = (
            resume_state["run_time"] if resume_state else datetime.datetime.now().strftime("%Y-%m-%d_%H.%M.%S")
        )
        torch.manual_seed(config.seed)
        self.data = build_data(config, self.dist, self.device)
        self._init_model(resume_state)
        if config.resume:  # a resumed run keeps writing next to the checkpoint it came from
            self.checkpoint_dir = Path(config.resume).parent
        else:
            self.checkpoint_dir = Path(config.checkpoint_dir) / config.tb_prefix / f"{self.run_time}-{config.comment}"
        purge = self.samples_seen + 1 if config.resume else None  # drop events after the resumed step
        self.writers = RunWriters(config.runs_dir, config.tb_prefix, self.run_time, config.comment, purge_step=purge)
        self.writers.enabled = self.dist.is_main
        self._reference = None  # validation annotations for CPM, read on first use

    # -- set-up ------------------------------------------------------------------------------

    def _init_model(self, resume_state: dict[str, Any] | None) -> None:
        config = self.config
        model = LunaModel()
        # 'LunaModel-v1:<hash of state-dict keys and shapes>': load_checkpoint refuses any other.
        self.arch = arch_signature(model)
        self.model = model.to(self.device)
        if config.init_weights:
            init_state = load_checkpoint(config.init_weights, arch=self.arch)
            load_weights(self.model, init_state["model"], config.init_weights)
            log.info("initial weights from %s (epoch %s)", config.init_weights, init_state.get("epoch"))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.optimizer = make_optimizer(self.model, config)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # Reseeded from (seed, epoch, rank) at every epoch, so a resumed run augments exactly as
        # an uninterrupted one and ranks never share random transforms.
        self.aug_generator = torch.Generator(device=self.device)
        if resume_state is not None:
            self._restore(resume_state)
        self.train_model: torch.nn.Module = self.model
        if self.dist.enabled:
            if config.sync_bn:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.train_model = torch.compile(self.train_model)

    def _restore(self, state: dict[str, Any]) -> None:
        load_weights(self.model, state["model"], self.config.resume or "checkpoint")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["torch"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise DataFormatError(
                f"--resume {self.config.resume}: its optimizer or RNG state does not fit this run "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); start a new run "
                "with --init-weights to keep only the weights"
            ) from None
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch = int(state["epoch"])
        self.samples_seen = int(state["samples_seen"])
        self.best.load_state_dict(state)
        log.info("resuming %s after epoch %d (%d samples seen)", self.config.resume, self.epoch, self.samples_seen)

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
        with autocast(self.device, self.amp_dtype):
            logits, prob = self.train_model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss.mean()).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"labels": y.detach().bool(), "prob_pos": prob.detach()[:, 1].float(), "losses": loss.detach()}

    @torch.inference_mode()
    def _val_step(self, batch) -> dict[str, torch.Tensor]:
        x = self._to_model_input(batch.chunk)
        y = batch.label.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            logits, prob = self.train_model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        return {"labels": y.bool(), "prob_pos": prob[:, 1].float(), "losses": loss}

    def _batches(self, loader, limit: int | None) -> int:
        return min(len(loader), limit) if limit else len(loader)

    def train_epoch(self, epoch: int) -> EpochResult:
        self.train_model.train()
        self.data.train_sampler.set_epoch(epoch)
        self.aug_generator.manual_seed((self.config.seed * 1_000_003 + epoch) * 1009 + self.dist.rank)
        order = self.data.train_sampler.indices()
        batches = self._batches(self.data.train_loader, self.config.max_train_batches)
        total = min(batches * self.config.batch_size, len(order))
        return run_epoch(
            self.data.train_loader, self._train_step, device=self.device, dist=self.dist, desc=f"epoch {epoch} train",
            total_samples=total, batches=batches, positions=order,
        )  # fmt: skip

    def validate(self, epoch: int) -> EpochResult:
        self.train_model.eval()
        order = np.fromiter(iter(self.data.val_sampler), dtype=np.int64)
        batches = self._batches(self.data.val_loader, self.config.max_val_batches)
        total = min(batches * self.config.batch_size, len(order))
        return run_epoch(
            self.data.val_loader, self._val_step, device=self.device, dist=self.dist, desc=f"epoch {epoch} validation",
            total_samples=total, batches=batches, positions=order,
        )  # fmt: skip

    # -- logging -------------------------------------------------------------------------------

    def log_epoch(self, mode: str, epoch: int, result: EpochResult, extra: dict[str, float]) -> dict[str, float]:
        summary = epoch_summary(result, extra)
        if self.dist.is_main:
            self.writers.scalars(mode, summary, self.samples_seen)
            self.writers.score_distribution(
                mode, result.outputs["labels"], result.outputs["prob_pos"], self.samples_seen
            )
            self.writers.flush()
            partial_of = None if result.complete else len(self.data.val_ds)
            log.info("%s", format_epoch(epoch, mode, result.count, summary, partial_of if mode == "val" else None))
        return summary

    def _validation_extra(self, val: EpochResult) -> dict[str, float]:
        """CPM of the validation pass (rank 0 only), tagged partial when --max-val-batches cut it."""
        if not self.dist.is_main or val.count == 0:
            return {}
        if self._reference is None:
            self._reference = read_reference(self.data.data_root, self.data.split.val_series)
        cpm = cpm_of(self.data.candidates, self.data.split, self.data.data_root, val, self._reference)
        return {"froc/cpm" if val.complete else "froc/cpm_partial": cpm}

    def _log_hparams(self, summary: dict[str, float]) -> None:
        cpm = summary.get("froc/cpm", summary.get("froc/cpm_partial", math.nan))
        values = {"hparam/val_f1": summary["pr/f1_score"], "hparam/val_auc": summary["pr/auc"], "hparam/val_cpm": cpm}
        self.writers.scalars("val", values, self.samples_seen)

    # -- checkpoints ---------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "arch": self.arch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            **self.best.state_dict(),
            "config": self.config.to_dict(),
            "run_time": self.run_time,
            "rng": rng,
        }

    def save(self, is_best: bool) -> None:
        if not self.dist.is_main:
            return
        state = self._state()
        sha1 = save_checkpoint(state, self.checkpoint_dir / LAST_NAME)
        log.info("saved %s (epoch %d, sha1 %s)", display_path(self.checkpoint_dir / LAST_NAME), self.epoch, sha1)
        if is_best:
            sha1 = save_checkpoint(state, self.checkpoint_dir / BEST_NAME)
            log.info(
                "saved %s (%s %.4f, sha1 %s)", display_path(self.checkpoint_dir / BEST_NAME), self.best.name,
                self.best.value, sha1,
            )  # fmt: skip

    # -- the run -------------------------------------------------------------------------------

    def run_validation(self, epoch: int) -> bool:
        """Validate, log, and say whether this epoch is the best so far."""
        val = self.validate(epoch)
        summary = self.log_epoch("val", epoch, val, self._validation_extra(val))
        if self.dist.is_main:
            self._log_hparams(summary)
            every = self.config.images_every
            if every and (epoch % every == 0 or epoch == self.config.epochs):
                for tag, images in hardest_examples(val, self.data.val_ds).items():
                    self.writers.images("val", tag, images, self.samples_seen)
        ranked = {**summary, "froc/cpm": summary.get("froc/cpm", summary.get("froc/cpm_partial", math.nan))}
        return self.best.update(ranked, epoch)

    def run(self) -> None:
        """Train until epoch `config.epochs`, validating every `val_every` epochs and after the last."""
        config = self.config
        if self.dist.is_main:
            log_run_description(self)
            if not config.resume:
                self.writers.hparams(config.to_dict(), HPARAM_TAGS)
        try:
            for epoch in range(self.epoch + 1, config.epochs + 1):
                entries_before = len(self.data.source)
                trn = self.train_epoch(epoch)
                self.samples_seen += trn.count
                # Every miss writes one entry (in whichever worker process met it), so the growth of
                # the cache over the epoch counts the misses of all workers and ranks.
                hit_rate = max(0.0, 1.0 - (len(self.data.source) - entries_before) / max(trn.count, 1))
                self.log_epoch(
                    "trn", epoch, trn, {"lr": self.optimizer.param_groups[0]["lr"], "cache/hit_rate": hit_rate}
                )
                self.epoch = epoch
                is_best = False
                if epoch % config.val_every == 0 or epoch == config.epochs:
                    is_best = self.run_validation(epoch)
                self.save(is_best)
            barrier(self.dist)  # every rank ends together (only rank 0 computes CPM and writes)
        finally:
            self.writers.close()

    def close(self) -> None:
        close_distributed(self.dist)


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """A new run's settings from the parsed flags, paths made absolute."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig) if hasattr(args, f.name)}
    for key in ("val_subsets", "test_subsets"):
        values[key] = tuple(values[key])
    if values.get("balance_ratio") is not None:
        values["balanced"] = True
    config = TrainingConfig(**values)
    config.validate()
    return absolute_paths(config)


def explicit_settings(argv: Sequence[str] | None) -> dict[str, Any]:
    """Only the settings given on the command line (flag dest → parsed value), defaults left out."""
    probe = get_args_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given = vars(probe.parse_args(argv))
    if given.get("balance_ratio") is not None:
        given["balanced"] = True
    return given


def load_resume_state(path: str, arch: str) -> dict[str, Any]:
    """The checkpoint to resume, refused with one line when it lacks what a resume needs."""
    if not Path(path).is_file():
        raise ConfigError(f"--resume {path}: no such checkpoint file")
    state = load_checkpoint(path, arch=arch)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise DataFormatError(
            f"--resume {path}: the checkpoint lacks {', '.join(missing)}, so the run cannot continue from it; "
            "pass a last.pt written by python -m p2ch.training, or start a new run with --init-weights"
        )
    return state


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


def format_epoch(epoch: int, mode: str, count: int, summary: dict[str, float], partial_of: int | None) -> str:
    """The one log line of an epoch."""
    cpm = summary.get("froc/cpm", summary.get("froc/cpm_partial"))
    cpm_text = "" if cpm is None else f", CPM {cpm:.3f}"
    if partial_of is not None and cpm is not None:
        cpm_text += f" (partial: {count:,} of {partial_of:,} validation candidates, --max-val-batches)"
    return (
        f"E{epoch} {mode} {count:,} samples: loss {summary['loss/all']:.4f}, correct {summary['correct/all']:.1f}% "
        f"(neg {summary['correct/neg']:.1f}%, pos {summary['correct/pos']:.1f}%), precision "
        f"{summary['pr/precision']:.3f}, recall {summary['pr/recall']:.3f}, F1 {summary['pr/f1_score']:.3f}, "
        f"AUC {summary['pr/auc']:.3f}{cpm_text}, {summary['perf/samples_per_sec']:.0f} samples/s, "
        f"data wait {100 * summary['perf/data_wait_fraction']:.0f}%"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(args.log_level)
    holder: dict[str, LunaTrainingApp] = {}

    def body() -> int:
        config = config_from_args(args)
        resume_state = None
        if config.resume:
            resume_state = load_resume_state(config.resume, arch_signature(LunaModel()))
            config = resume_config(
                resume_state["config"], explicit_settings(argv), config.resume, args.allow_config_change
            )
        app = holder["app"] = LunaTrainingApp(config, resume_state=resume_state)
        app.run()
        if app.dist.is_main:
            print(
                f"checkpoints: {display_path(app.checkpoint_dir)}\n"
                f"TensorBoard: tensorboard --logdir {display_path(app.writers.root)}",
                file=sys.stderr,
            )
        return 0

    def interrupted() -> str:
        app = holder.get("app")
        where = app.checkpoint_dir / LAST_NAME if app is not None else None
        if where is not None and where.exists():
            return f"interrupted; resume with --resume {display_path(where)}"
        return "interrupted before the first checkpoint"

    try:
        return run_cli(PROG, body, interrupted)
    finally:
        if "app" in holder:
            holder["app"].close()


if __name__ == "__main__":
    sys.exit(main())
