"""`python -m p2ch.training`: train LunaModel on LUNA16 candidates, log to TensorBoard.

The book's LunaTrainingApp, with what a long GPU job needs: leak-free splits, balanced
sampling with a real epoch length, batched augmentation on the training device, mixed
precision, channels-last, torch.compile, DistributedDataParallel under torchrun, atomic
checkpoints with exact resume, and LUNA16's CPM on the validation set.

Multi-GPU: `torchrun --nproc-per-node=N -m p2ch.training …` (NCCL on GPUs, gloo on CPUs).
Each rank reads a disjoint shard of every epoch; per-sample outputs are gathered for metrics;
only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from p2ch.checkpoint import BEST_NAME, LAST_NAME, load_checkpoint, save_checkpoint
from p2ch.config import (
    AMP_MODES,
    SELECT_BY,
    SPLIT_MODES,
    DefaultsHelpFormatter,
    TrainingConfig,
    resolve_cache_dir,
    resolve_data_root,
    resolve_models_dir,
    resolve_runs_dir,
)
from p2ch.datasets import BOOK_EPOCH_SIZE, to_device_batch
from p2ch.errors import ConfigError, P2chError
from p2ch.runtime import configure_logging, gather_cat, init_distributed, resolve_amp, resolve_device

log = logging.getLogger("p2ch.training")

LUNG_WINDOW_HU = (-1000.0, 400.0)


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

    g = parser.add_argument_group("data")
    g.add_argument(
        "--data-root",
        default=None,
        help="LUNA16 root with subset*/ and the CSVs (default: $P2CH_DATA_ROOT or data-unversioned/part2/luna)",
    )
    g.add_argument("--cache-dir", default=None, help="chunk cache (default: $P2CH_CACHE_DIR or data-unversioned/cache)")

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

    g = parser.add_argument_group("augmentation (batched, on the training device)")
    g.add_argument("--augmented", action="store_true", help="all of the augmentations below")
    g.add_argument("--augment-flip", action="store_true", help="random flip per axis")
    g.add_argument("--augment-offset", action="store_true", help="random offset ±10%%")
    g.add_argument("--augment-scale", action="store_true", help="random scale ±20%%")
    g.add_argument("--augment-rotate", action="store_true", help="random rotation about the head-foot axis")
    g.add_argument("--augment-noise", action="store_true", help="Gaussian noise, σ = 25 HU")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per batch (per GPU)")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader worker processes (per GPU)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs to train (in total, when resuming)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer, help="optimizer")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing")

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

    g = parser.add_argument_group("output")
    g.add_argument("--tb-prefix", default=d.tb_prefix, help="runs/<tb-prefix>/ groups related runs")
    g.add_argument("--runs-dir", default=None, help="TensorBoard root (default: $P2CH_RUNS_DIR or runs)")
    g.add_argument(
        "--checkpoint-dir", default=None, help="checkpoint root (default: $P2CH_MODELS_DIR or data-unversioned/models)"
    )
    g.add_argument("--resume", default=None, metavar="PATH", help="continue the run saved in this checkpoint")
    g.add_argument(
        "--init-weights", default=None, metavar="PATH", help="start a new run from this checkpoint's model weights"
    )
    g.add_argument(
        "--log-level", default=d.log_level, choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig) if hasattr(args, f.name)}
    for key in ("val_subsets", "test_subsets"):
        values[key] = tuple(values[key])
    if values.get("balance_ratio") is not None:
        values["balanced"] = True
    config = TrainingConfig(**values)
    config.validate()
    return config


@dataclasses.dataclass
class EpochOutputs:
    """Per-sample results of one epoch, on the device, gathered over ranks."""

    labels: torch.Tensor  # (N,) bool
    prob_pos: torch.Tensor  # (N,) float32
    losses: torch.Tensor  # (N,) float32
    positions: torch.Tensor  # (N,) int64, positions in the dataset
    seconds: float
    data_wait_seconds: float

    @property
    def count(self) -> int:
        return int(self.labels.shape[0])


class LunaTrainingApp:
    """The training run: data, model, optimizer, logging and checkpoints (the book's LunaTrainingApp)."""

    def __init__(self, config: TrainingConfig):
        from p2ch.augment import AugmentConfig
        from p2ch.model import LunaModel, arch_signature

        self.config = config
        self.device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
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
        self.augment = AugmentConfig.from_flags(
            augmented=config.augmented,
            flip=config.augment_flip,
            offset=config.augment_offset,
            scale=config.augment_scale,
            rotate=config.augment_rotate,
            noise=config.augment_noise,
        )
        self.epoch = 0
        self.samples_seen = 0
        self.best_metric = -math.inf
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_by = config.select_by
        self.run_time = datetime.datetime.now().strftime("%Y-%m-%d_%H.%M.%S")

        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        model = LunaModel()
        # 'LunaModel-v1:<hash of state-dict keys and shapes>': a checkpoint of any other
        # architecture is refused by load_checkpoint with a message naming both.
        self.arch = arch_signature(model)
        resume_state = load_checkpoint(config.resume, arch=self.arch) if config.resume else None
        if resume_state is not None:
            self.run_time = resume_state["run_time"]
        self._init_data()
        self.model = model.to(self.device)
        if config.init_weights:
            init_state = load_checkpoint(config.init_weights, arch=self.arch)
            self.model.load_state_dict(init_state["model"])
            log.info("initial weights from %s (epoch %s)", config.init_weights, init_state.get("epoch"))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # Reseeded from (seed, epoch, rank) at every epoch, so a resumed run augments exactly as
        # an uninterrupted one and ranks never share random transforms.
        self.aug_generator = torch.Generator(device=self.device)
        if resume_state is not None:
            self._restore(resume_state)

        self.train_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if config.sync_bn:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if config.compile:
            self.train_model = torch.compile(self.train_model)

        self.writers: dict[str, Any] = {}
        self._fallback_warned: set[str] = set()
        if config.resume:  # a resumed run keeps writing next to the checkpoint it came from
            self.checkpoint_dir = Path(config.resume).resolve().parent
        else:
            self.checkpoint_dir = (
                resolve_models_dir(config.checkpoint_dir) / config.tb_prefix / f"{self.run_time}-{config.comment}"
            )

    # -- set-up ------------------------------------------------------------------------------

    def _init_data(self) -> None:
        from p2ch.cache import ChunkCache
        from p2ch.candidates import get_candidate_arrays
        from p2ch.datasets import (
            BalancedSampler,
            EvalSampler,
            LunaDataset,
            ShuffleSampler,
            create_loader,
            split_candidates,
        )

        config = self.config
        self.data_root = resolve_data_root(config.data_root)
        self.candidates = get_candidate_arrays(self.data_root)
        self.split = split_candidates(
            self.candidates,
            config.split,
            val_fraction=config.val_fraction,
            val_stride=config.val_stride,
            val_subsets=config.val_subsets,
            test_fraction=config.test_fraction,
            test_subsets=config.test_subsets,
            data_root=self.data_root,
        )
        self.source = ChunkCache(resolve_cache_dir(config.cache_dir), self.data_root)
        self.train_ds = LunaDataset(self.candidates, self.split.train, self.source, config.width_irc)
        self.val_ds = LunaDataset(self.candidates, self.split.val, self.source, config.width_irc)
        rank, world = self.dist.rank, self.dist.world_size
        if config.balanced:
            self.train_sampler = BalancedSampler(
                self.train_ds.labels,
                ratio=config.balance_ratio or 1,
                epoch_size=config.epoch_size,
                seed=config.seed,
                rank=rank,
                world_size=world,
            )
        else:
            self.train_sampler = ShuffleSampler(
                len(self.train_ds), seed=config.seed, rank=rank, world_size=world, epoch_size=config.epoch_size
            )
        self.val_sampler = EvalSampler(len(self.val_ds), rank=rank, world_size=world)
        pin = self.device.type == "cuda"
        self.train_loader = create_loader(
            self.train_ds,
            self.train_sampler,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            pin_memory=pin,
        )
        self.val_loader = create_loader(
            self.val_ds, self.val_sampler, batch_size=config.batch_size, num_workers=config.num_workers, pin_memory=pin
        )

    def _make_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        return torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.samples_seen = int(state["samples_seen"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state.get("best_epoch", 0))
        self.best_loss = float(state.get("best_loss", math.inf))
        self.best_by = str(state.get("selected_by", self.config.select_by))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        log.info("resuming %s after epoch %d (%d samples seen)", self.config.resume, self.epoch, self.samples_seen)

    def _open_writers(self) -> None:
        if not self.dist.is_main or self.writers:
            return
        from torch.utils.tensorboard import SummaryWriter

        runs = resolve_runs_dir(self.config.runs_dir) / self.config.tb_prefix
        purge = self.samples_seen + 1 if self.config.resume else None
        for mode in ("trn", "val"):
            path = runs / f"{self.run_time}-{mode}_cls-{self.config.comment}"
            self.writers[mode] = SummaryWriter(log_dir=str(path), purge_step=purge)
        if not self.config.resume:
            self._log_hparams()

    def _log_hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = {
            k: (str(v) if not isinstance(v, (int, float, str, bool)) or v is None else v)
            for k, v in self.config.to_dict().items()
        }
        metrics = {"hparam/val_f1": float("nan"), "hparam/val_auc": float("nan"), "hparam/val_cpm": float("nan")}
        exp, ssi, sei = hparams(flat, metrics)
        writer = self.writers["val"].file_writer
        for summary in (exp, ssi, sei):
            writer.add_summary(summary)

    # -- the loop ------------------------------------------------------------------------------

    def _to_model_input(self, chunks: torch.Tensor) -> torch.Tensor:
        # Chunks arrive as int16 HU (half the bytes of float32 through workers and pinned memory).
        x = to_device_batch(chunks, self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_epoch(self, epoch: int) -> EpochOutputs:
        from p2ch.augment import augment_batch
        from p2ch.progress import Progress

        self.train_model.train()
        self.train_sampler.set_epoch(epoch)
        self.aug_generator.manual_seed((self.config.seed * 1_000_003 + epoch) * 1009 + self.dist.rank)
        sampler_order = self.train_sampler.indices()
        labels, probs, losses = [], [], []
        batches = len(self.train_loader)
        if self.config.max_train_batches:
            batches = min(batches, self.config.max_train_batches)
        wait = 0.0
        start = time.perf_counter()
        seen = 0
        with Progress(
            min(batches * self.config.batch_size, len(sampler_order)),
            f"epoch {epoch} train",
            "samples",
            enabled=self.dist.is_main,
        ) as progress:
            fetch_start = time.perf_counter()
            for batch_index, (chunks, label, _uids, _irc) in enumerate(self.train_loader):
                wait += time.perf_counter() - fetch_start
                x = self._to_model_input(chunks)  # float32 HU on the device
                y = label.to(self.device, non_blocking=True)
                if self.augment.enabled:
                    x = augment_batch(x, self.augment, generator=self.aug_generator)
                with self._autocast():
                    logits, prob = self.train_model(x)
                loss = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=self.config.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss.mean()).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                labels.append(y.detach().bool())
                probs.append(prob.detach()[:, 1].float())
                losses.append(loss.detach())
                seen += len(label)
                progress.update(len(label))
                if batch_index + 1 >= batches:
                    break
                fetch_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        positions = torch.as_tensor(sampler_order[:seen], device=self.device)
        return self._gathered(labels, probs, losses, positions, seconds, wait)

    @torch.inference_mode()
    def validate(self, epoch: int) -> EpochOutputs:
        from p2ch.progress import Progress

        self.train_model.eval()
        order = np.fromiter(iter(self.val_sampler), dtype=np.int64)
        labels, probs, losses = [], [], []
        batches = len(self.val_loader)
        if self.config.max_val_batches:
            batches = min(batches, self.config.max_val_batches)
        wait = 0.0
        seen = 0
        start = time.perf_counter()
        with Progress(
            min(batches * self.config.batch_size, len(order)),
            f"epoch {epoch} validation",
            "samples",
            enabled=self.dist.is_main,
        ) as progress:
            fetch_start = time.perf_counter()
            for batch_index, (chunks, label, _uids, _irc) in enumerate(self.val_loader):
                wait += time.perf_counter() - fetch_start
                x = self._to_model_input(chunks)
                y = label.to(self.device, non_blocking=True)
                with self._autocast():
                    logits, prob = self.model(x)
                loss = F.cross_entropy(logits.float(), y, reduction="none")
                labels.append(y.bool())
                probs.append(prob[:, 1].float())
                losses.append(loss)
                seen += len(label)
                progress.update(len(label))
                if batch_index + 1 >= batches:
                    break
                fetch_start = time.perf_counter()
        seconds = time.perf_counter() - start
        positions = torch.as_tensor(order[:seen], device=self.device)
        return self._gathered(labels, probs, losses, positions, seconds, wait)

    def _gathered(self, labels, probs, losses, positions, seconds, wait) -> EpochOutputs:
        def cat(parts, dtype):
            return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=self.device)

        return EpochOutputs(
            labels=gather_cat(cat(labels, torch.bool), self.dist),
            prob_pos=gather_cat(cat(probs, torch.float32), self.dist),
            losses=gather_cat(cat(losses, torch.float32), self.dist),
            positions=gather_cat(positions, self.dist),
            seconds=seconds,
            data_wait_seconds=wait,
        )

    # -- metrics -------------------------------------------------------------------------------

    def _cpm(self, outputs: EpochOutputs) -> float:
        """LUNA16's CPM over the validation candidates scored this epoch (nan without nodules)."""
        from p2ch.candidates import ANNOTATIONS_FILE, EXCLUDED_FILE, read_annotations, read_excluded
        from p2ch.metrics import froc

        if not hasattr(self, "_val_annotations"):
            val_series = set(self.split.val_series)
            annotations = read_annotations(self.data_root / ANNOTATIONS_FILE)
            self._val_annotations = annotations[annotations["seriesuid"].isin(val_series)]
            excluded_path = self.data_root / EXCLUDED_FILE
            excluded = read_excluded(excluded_path) if excluded_path.is_file() else None
            if excluded is not None:
                excluded = excluded[excluded["seriesuid"].isin(val_series)]
            self._val_excluded = excluded
        if self._val_annotations.empty or outputs.count == 0:
            return float("nan")
        predictions = predictions_frame(
            self.candidates, self.split.val[outputs.positions.cpu().numpy()], outputs.prob_pos.cpu().numpy()
        )
        result = froc(
            predictions,
            self._val_annotations,
            self._val_excluded,
            series_uids=sorted(set(self.split.val_series)),
            bootstrap=0,
        )
        return float(result.cpm)

    def log_epoch(self, mode: str, epoch: int, outputs: EpochOutputs, extra: dict[str, float]) -> dict[str, float]:
        from p2ch.metrics import classification_summary

        summary = classification_summary(outputs.labels, outputs.prob_pos, outputs.losses)
        summary.update(extra)
        summary["perf/samples_per_sec"] = outputs.count / outputs.seconds if outputs.seconds > 0 else float("nan")
        summary["perf/data_wait_fraction"] = (
            outputs.data_wait_seconds / outputs.seconds if outputs.seconds > 0 else float("nan")
        )
        if not self.dist.is_main:
            return summary
        writer = self.writers[mode]
        for key, value in summary.items():
            if isinstance(value, (int, float)):
                writer.add_scalar(key, value, self.samples_seen)
        if outputs.count:
            labels = outputs.labels.cpu()
            probs = outputs.prob_pos.cpu()
            writer.add_pr_curve("pr", labels, probs, self.samples_seen)
            bins = np.linspace(0.0, 1.0, 51)
            if (~labels).any():
                writer.add_histogram("is_neg", probs[~labels], self.samples_seen, bins=bins)
            if labels.any():
                writer.add_histogram("is_pos", probs[labels], self.samples_seen, bins=bins)
        writer.flush()
        log.info(
            "E%d %s %s samples: loss %.4f, correct %.1f%% (neg %.1f%%, pos %.1f%%), precision %.3f, "
            "recall %.3f, F1 %.3f, AUC %.3f%s, %.0f samples/s, data wait %.0f%%",
            epoch,
            mode,
            f"{outputs.count:,}",
            summary["loss/all"],
            summary["correct/all"],
            summary["correct/neg"],
            summary["correct/pos"],
            summary["pr/precision"],
            summary["pr/recall"],
            summary["pr/f1_score"],
            summary["pr/auc"],
            f", CPM {summary['froc/cpm']:.3f}" if "froc/cpm" in summary else "",
            summary["perf/samples_per_sec"],
            100 * summary["perf/data_wait_fraction"],
        )
        return summary

    def log_images(self, outputs: EpochOutputs, count: int = 8) -> None:
        """Centre slices of the highest-scoring negatives and the lowest-scoring positives."""
        if not self.dist.is_main or outputs.count == 0:
            return
        labels = outputs.labels.cpu().numpy()
        probs = outputs.prob_pos.cpu().numpy()
        positions = outputs.positions.cpu().numpy()
        low, high = LUNG_WINDOW_HU
        for tag, mask, descending in (
            ("val/hardest_negatives", ~labels, True),
            ("val/hardest_positives", labels, False),
        ):
            idx = np.flatnonzero(mask)
            if len(idx) == 0:
                continue
            order = idx[np.argsort(probs[idx])]
            chosen = (order[::-1] if descending else order)[:count]
            slices = []
            for k in chosen:
                chunk = self.val_ds[int(positions[k])][0]  # (1, I, R, C) int16
                centre = chunk[:, chunk.shape[1] // 2].float()
                slices.append(((centre - low) / (high - low)).clamp(0, 1))
            self.writers["val"].add_images(tag, torch.stack(slices), self.samples_seen)

    def _selection_value(self, summary: dict[str, float]) -> tuple[str, float]:
        """(metric name, value) that picks best.pt: --select-by, falling back to F1, then -loss.

        CPM is nan when validation has no annotated nodules, F1 when it has no positives (or the
        model predicts none); the fallback keeps best.pt meaningful in both cases.
        """
        candidates = [("cpm", summary.get("froc/cpm", math.nan))] if self.config.select_by == "cpm" else []
        candidates += [("f1", summary["pr/f1_score"]), ("loss", -summary["loss/all"])]
        name, value = next(((n, v) for n, v in candidates if not math.isnan(v)), candidates[-1])
        if name != self.config.select_by and name not in self._fallback_warned:
            self._fallback_warned.add(name)
            log.warning(
                "validation %s is undefined (no nodules or no positives); selecting best.pt by %s",
                self.config.select_by,
                "F1" if name == "f1" else "lowest loss",
            )
        return name, value

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
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_loss": self.best_loss,
            "selected_by": self.best_by,
            "config": self.config.to_dict(),
            "run_time": self.run_time,
            "rng": rng,
        }

    def save(self, is_best: bool) -> None:
        if not self.dist.is_main:
            return
        state = self._state()
        sha1 = save_checkpoint(state, self.checkpoint_dir / LAST_NAME)
        log.info("saved %s (epoch %d, sha1 %s)", self.checkpoint_dir / LAST_NAME, self.epoch, sha1)
        if is_best:
            sha1 = save_checkpoint(state, self.checkpoint_dir / BEST_NAME)
            log.info(
                "saved %s (%s %.4f, sha1 %s)", self.checkpoint_dir / BEST_NAME, self.best_by, self.best_metric, sha1
            )

    # -- main ----------------------------------------------------------------------------------

    def describe(self) -> None:
        split = self.split
        log.info("config: %s", json.dumps(self.config.to_dict(), sort_keys=True))
        log.info(
            "device %s, AMP %s, channels-last %s, compile %s, world size %d; data %s: %d candidates; "
            "split %s: train %d candidates (%d series, %d positive), val %d (%d series, %d positive), test %d",
            self.device,
            self.amp_dtype or "off",
            self.channels_last,
            self.config.compile,
            self.dist.world_size,
            self.data_root,
            len(self.candidates),
            split.mode,
            len(split.train),
            len(split.train_series),
            int(self.train_ds.labels.sum()),
            len(split.val),
            len(split.val_series),
            int(self.val_ds.labels.sum()),
            len(split.test),
        )

    def run(self) -> dict[str, float]:
        """Train for the configured epochs; return the last validation summary."""
        config = self.config
        if self.dist.is_main:
            self.describe()
        self._open_writers()
        last_val: dict[str, float] = {}
        try:
            for epoch in range(self.epoch + 1, config.epochs + 1):
                entries_before = len(self.source)
                trn = self.train_epoch(epoch)
                self.samples_seen += trn.count
                lr = self.optimizer.param_groups[0]["lr"]
                # Every miss writes one entry (in whichever worker process met it), so the growth of
                # the cache over the epoch counts the misses of all workers and ranks.
                new_entries = len(self.source) - entries_before
                extra = {"lr": lr, "cache/hit_rate": max(0.0, 1.0 - new_entries / max(trn.count, 1))}
                self.log_epoch("trn", epoch, trn, extra)
                self.epoch = epoch
                is_best = False
                if epoch % config.val_every == 0 or epoch == config.epochs:
                    val = self.validate(epoch)
                    extra = {}
                    if val.count:
                        extra["froc/cpm"] = self._cpm(val)
                    last_val = self.log_epoch("val", epoch, val, extra)
                    if self.dist.is_main:
                        w = self.writers["val"]
                        w.add_scalar("hparam/val_f1", last_val["pr/f1_score"], self.samples_seen)
                        w.add_scalar("hparam/val_auc", last_val["pr/auc"], self.samples_seen)
                        w.add_scalar("hparam/val_cpm", last_val.get("froc/cpm", float("nan")), self.samples_seen)
                        if config.images_every and (epoch % config.images_every == 0 or epoch == config.epochs):
                            self.log_images(val)
                    selected, value = self._selection_value(last_val)
                    loss = last_val["loss/all"]
                    if is_improvement(selected, value, loss, self.best_by, self.best_metric, self.best_loss):
                        self.best_metric, self.best_loss, self.best_epoch, self.best_by = value, loss, epoch, selected
                        is_best = True
                self.save(is_best)
        finally:
            for writer in self.writers.values():
                writer.close()
        return last_val

    def close(self) -> None:
        if self.dist.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def is_improvement(name: str, value: float, loss: float, best_name: str, best_value: float, best_loss: float) -> bool:
    """Whether a validation result (selection metric `name` = `value`, loss `loss`) beats the best so far.

    A higher value wins; an equal value wins with a lower loss (CPM and F1 sit on plateaus early in
    training: CPM stays 0 until the first nodule outranks every false positive, and without the
    tie-break best.pt would stay at epoch 1). A switch of metric (CPM became undefined) restarts
    the comparison; a nan value never wins.
    """
    if math.isnan(value):
        return False
    if name != best_name:
        return True
    return value > best_value or (value == best_value and loss < best_loss)


def predictions_frame(candidates, indices: np.ndarray, prob_pos: np.ndarray):
    """LUNA16 submission rows (seriesuid, coordX, coordY, coordZ, probability) for candidates[indices]."""
    import pandas as pd

    xyz = candidates.center_xyz[indices]
    return pd.DataFrame(
        {
            "seriesuid": candidates.series_uids[candidates.series_index[indices]],
            "coordX": xyz[:, 0],
            "coordY": xyz[:, 1],
            "coordZ": xyz[:, 2],
            "probability": np.asarray(prob_pos, dtype=np.float64),
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    app = None
    try:
        config = config_from_args(args)
        if config.resume and not Path(config.resume).is_file():
            raise ConfigError(f"--resume {config.resume}: no such checkpoint file")
        app = LunaTrainingApp(config)
        app.run()
        if app.dist.is_main:
            runs = resolve_runs_dir(config.runs_dir) / config.tb_prefix
            print(f"checkpoints: {app.checkpoint_dir}\nTensorBoard: tensorboard --logdir {runs}", file=sys.stderr)
        return 0
    except P2chError as exc:
        print(f"p2ch.training: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = app.checkpoint_dir / LAST_NAME if app is not None else None
        print(
            f"p2ch.training: interrupted; resume with --resume {where}"
            if where and where.exists()
            else "p2ch.training: interrupted before the first checkpoint",
            file=sys.stderr,
        )
        return 130
    finally:
        if app is not None:
            app.close()


if __name__ == "__main__":
    sys.exit(main())
