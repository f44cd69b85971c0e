"""`TrainingRun`: what every training app shares, written once.

Device, DDP and mixed-precision set-up; the model on the device (memory format, initial weights,
DDP and torch.compile wrapping); the optimizer, its lr schedule (stepped per optimizer step) and the
GradScaler; checkpoints with exact resume (model, optimizer, lr schedule, scaler, RNG, counters, the
best-checkpoint policy, the run's settings);
TensorBoard writers in the run's own folders; and the epoch schedule (`run`: train, validate every
`val_every` epochs and after the last, save last.pt and best.pt, end every DDP rank together).

An app (`p2ch.training.LunaTrainingApp`, `p2ch.seg_training.SegmentationTrainingApp`) subclasses it
and supplies what differs: `build_data`, `make_model`, `make_best`, `train_epoch`,
`log_training` and `run_validation` — a recipe over `p2ch.loop.run_epoch` and `p2ch.tblog`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from p2ch.checkpoint import BEST_NAME, LAST_NAME, check_task, load_checkpoint, load_weights, save_checkpoint
from p2ch.cli import configure_logging, run_cli
from p2ch.config import (
    DEFAULT_WARMUP_FRACTION,
    RunConfig,
    absolute_paths,
    check_output_dir,
    config_from_args,
    display_path,
    explicit_settings,
    resume_config,
)
from p2ch.errors import ConfigError, DataFormatError
from p2ch.fileio import remove_stale_temporaries
from p2ch.loop import BestCheckpoint, EpochResult, NonFiniteLossError
from p2ch.runtime import (
    barrier,
    close_distributed,
    init_distributed,
    local_rank,
    resolve_amp,
    resolve_device,
)
from p2ch.tblog import RunWriters

log = logging.getLogger(__name__)

# What a checkpoint must hold for --resume (older checkpoints lack only best_loss/best_epoch/best_key).
RESUME_KEYS = ("model", "optimizer", "epoch", "samples_seen", "config", "run_time", "rng")


def load_resume_state(path: str, arch: str | None = None) -> dict[str, Any]:
    """The checkpoint to resume, refused with one line when it is missing, of another model (`arch`,
    when known before the settings are merged), or lacks run state."""
    if not Path(path).is_file():
        raise ConfigError(f"--resume {path}: no such checkpoint file")
    state = load_checkpoint(path, arch=arch)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise DataFormatError(
            f"--resume {path}: the checkpoint lacks {', '.join(missing)}, so the run cannot continue from it; "
            "pass a last.pt written by the same training command, or start a new run with --init-weights"
        )
    return state


def make_optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """--optimizer adam or sgd (with --momentum), --lr and --weight-decay, over the parameters that train
    (a fine-tuning run freezes some: `requires_grad=False`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


MIN_ONECYCLE_STEPS = 3  # torch's OneCycleLR: a rise of 2 steps or more, then at least one step down


@dataclasses.dataclass(frozen=True)
class LrPlan:
    """A run's lr schedule in optimizer steps; saved in every checkpoint ("schedule") and kept on resume.

    kind: --lr-schedule. total_steps: where a onecycle or cosine schedule ends (its horizon; None for
    constant, which has no end). warmup_steps: the linear warm-up (onecycle: its rise from lr/25).
    """

    kind: str
    total_steps: int | None
    warmup_steps: int


def plan_schedule(config: RunConfig, steps_per_epoch: int, samples_per_step: int) -> LrPlan:
    """The steps of the schedule `config` asks for: samples (--warmup-samples, --schedule-samples) become
    optimizer steps of `samples_per_step` (the batch over all ranks); the horizon defaults to the whole run."""
    kind = config.lr_schedule
    if kind == "constant":
        total = None
    elif config.schedule_samples is not None:
        total = math.ceil(config.schedule_samples / samples_per_step)
    else:
        total = config.epochs * steps_per_epoch
    if config.warmup_samples is not None:
        warmup = math.ceil(config.warmup_samples / samples_per_step)
    else:  # the default warm-up: a fraction of the horizon, shortened to fit a short run
        warmup = round(DEFAULT_WARMUP_FRACTION[kind] * total) if total else 0
        if kind == "onecycle" and total < MIN_ONECYCLE_STEPS:
            log.warning(
                "--lr-schedule onecycle: this run has %d optimizer steps, too few for a one-cycle schedule "
                "(%d at least); the lr stays at --lr %g", total, MIN_ONECYCLE_STEPS, config.lr
            )  # fmt: skip
            return LrPlan("constant", None, 0)
        if kind == "onecycle":
            warmup = min(warmup, total - 1)
    if kind == "onecycle":
        warmup = max(warmup, 2)  # torch's OneCycleLR divides by the length of its rise minus 1
    if total is not None and warmup >= total:
        raise ConfigError(
            f"--lr-schedule {kind}: its warm-up of {warmup} steps does not fit in the schedule of {total} steps "
            f"({samples_per_step} samples each); lower --warmup-samples, or raise --schedule-samples or --epochs"
        )
    return LrPlan(kind, total, warmup)


def make_scheduler(optimizer: torch.optim.Optimizer, plan: LrPlan) -> torch.optim.lr_scheduler.LRScheduler | None:
    """torch's schedulers for `plan` over the optimizer's lr (its peak); None for a constant lr without warm-up.

    onecycle: OneCycleLR (cosine annealing, momentum not cycled, so --momentum and Adam's betas hold).
    cosine: LinearLR warm-up from lr/warmup_steps, then CosineAnnealingLR from lr to 0 at total_steps.
    constant: LinearLR warm-up, then the lr as given.
    """
    if plan.kind == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peaks, total_steps=plan.total_steps, pct_start=plan.warmup_steps / plan.total_steps,
            anneal_strategy="cos", cycle_momentum=False,
        )  # fmt: skip
    steps = plan.warmup_steps if plan.warmup_steps > 1 else 0  # a warm-up of 1 step starts at lr / 1
    warmup = None
    if steps:  # step k of the warm-up at lr (k + 1) / steps: the peak at its last step
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0 / steps, end_factor=1.0, total_iters=steps - 1
        )
    if plan.kind == "constant":
        return warmup
    assert plan.total_steps is not None
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=plan.total_steps - steps)
    if warmup is None:
        return cosine
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[steps])


def check_horizon(plan: LrPlan, steps_done: int, steps_per_epoch: int, config: RunConfig, epoch: int) -> None:
    """ConfigError when the epochs still to run (up to --epochs, `steps_per_epoch` each) would step a
    onecycle or cosine schedule past its end: torch's OneCycleLR cannot, and a cosine would sit at 0."""
    if plan.total_steps is None or steps_done + (config.epochs - epoch) * steps_per_epoch <= plan.total_steps:
        return
    if not config.resume:
        raise ConfigError(
            f"--schedule-samples {config.schedule_samples}: the {plan.kind} lr schedule would end after "
            f"{plan.total_steps} steps, before this run's {config.epochs} epochs of {steps_per_epoch} steps; "
            "raise it, or leave it out (default: the whole run)"
        )
    last = epoch + (plan.total_steps - steps_done) // steps_per_epoch
    raise ConfigError(
        f"--epochs {config.epochs} with --resume: this run's {plan.kind} lr schedule ends after {plan.total_steps} "
        f"optimizer steps ({steps_done} done; at {steps_per_epoch} steps an epoch that is epoch {last}) and cannot "
        f"be extended; pass --epochs {last} or less, or start a new run from its weights with --init-weights "
        f"{config.resume} (to continue a run in parts, give its whole length with --schedule-samples at its start)"
    )


def rescale_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, ratio: float) -> None:
    """Scale the lr now and every lr the schedule derives later ones from by `ratio` (a resume with a new --lr:
    the schedule goes on from where it was, with --lr as its new peak)."""
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):  # OneCycleLR keeps its lrs in the groups
            if key in group:
                group[key] *= ratio
    # SequentialLR's parts keep their own base lrs (private to torch, stable since 1.10).
    for part in (scheduler, *getattr(scheduler, "_schedulers", ())):
        part.base_lrs = [lr * ratio for lr in part.base_lrs]
        part._last_lr = [lr * ratio for lr in part._last_lr]


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    config: RunConfig,
    saved_lr: float,
) -> None:
    """This run's --lr, --weight-decay (and SGD's --momentum) over those a restored optimizer state carries.

    Equal for a plain resume; a resume with a lower --lr (e.g. after the loss became nan) takes effect: the
    lr becomes --lr, or, under a schedule, every lr of the schedule is scaled by --lr / the checkpoint's --lr.
    """
    if scheduler is not None and config.lr != saved_lr:
        rescale_lr(optimizer, scheduler, config.lr / saved_lr)
    for group in optimizer.param_groups:
        if scheduler is None:
            group["lr"] = config.lr
        group["weight_decay"] = config.weight_decay
        if "momentum" in group:
            group["momentum"] = config.momentum


def clear_cut_off_saves(checkpoint_dir: Path) -> None:
    """Remove what a kill mid-save (SIGKILL, power loss) left of last.pt and best.pt in `checkpoint_dir`."""
    for stale in remove_stale_temporaries(checkpoint_dir, (LAST_NAME, BEST_NAME)):
        log.info("removed %s, left by a save that was cut off", display_path(stale))


def non_finite_advice(config: RunConfig, amp_dtype: torch.dtype | None, checkpoint_dir: Path, epoch: int) -> str:
    """The likely causes of a non-finite training loss and where to go on from."""
    causes = f"a learning rate too high (--lr {config.lr:g}; try it 10x lower)"
    if amp_dtype == torch.float16:
        causes += " or fp16 mixed precision overflowing (try --amp bf16 or --amp off)"
    else:
        causes += f" (mixed precision is {'bf16' if amp_dtype else 'off'}, so not an fp16 overflow)"
    last = checkpoint_dir / LAST_NAME
    if epoch > 0 and last.is_file():
        where = (
            f"the last good checkpoint is {display_path(last)} (epoch {epoch}): continue with "
            f"--resume {display_path(last)} and a lower --lr"
        )
    else:
        where = "no checkpoint was written yet: start again with a lower --lr"
    return f"likely causes: {causes}; the broken weights were not saved; {where}"


def batches_of(loader: Any, limit: int | None) -> int:
    """How many batches of `loader` an epoch runs (all, or at most --max-*-batches)."""
    return min(len(loader), limit) if limit else len(loader)


class TrainingRun:
    """One training run of some model: the shared set-up, checkpoints and schedule (see the module doc).

    config: the run's settings (paths made absolute here). resume_state: the checkpoint to continue
    (loaded from `config.resume` when not given); main() first merges its settings (`resume_config`).
    Subclasses set `tb_kind` (TensorBoard folder kind, e.g. "cls"), `memory_format` and `task` (what
    the model does, saved in every checkpoint so that other commands can refuse the wrong kind).
    """

    tb_kind = "cls"
    memory_format = torch.channels_last_3d
    task = "nodule"

    def __init__(self, config: RunConfig, resume_state: dict[str, Any] | None = None):
        self.config = config = absolute_paths(config)
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
        self.epoch = 0
        self.samples_seen = 0
        self.best = self.make_best()
        torch.manual_seed(config.seed)
        model = self.make_model()  # before the data: its weights must not depend on data set-up
        self.arch = self.arch_of(model)
        if config.resume and resume_state is None:  # used as a library: load what main() would
            resume_state = load_resume_state(config.resume, self.arch)
        if resume_state is not None and resume_state.get("arch") != self.arch:
            raise ConfigError(
                f"{config.resume}: checkpoint is for model architecture {resume_state.get('arch')!r}, this model is "
                f"{self.arch!r}; start a new run instead of --resume with it"
            )
        self.run_time = (
            resume_state["run_time"] if resume_state else datetime.datetime.now().strftime("%Y-%m-%d_%H.%M.%S")
        )
        if config.resume:  # a resumed run keeps writing next to the checkpoint it came from
            self.checkpoint_dir = Path(config.resume).parent
        else:
            self.checkpoint_dir = Path(config.checkpoint_dir) / config.tb_prefix / f"{self.run_time}-{config.comment}"
        self._check_outputs()
        if config.resume and self.dist.is_main:  # a resumed run owns its checkpoint folder
            clear_cut_off_saves(self.checkpoint_dir)
        self.build_data()
        self._init_model(model, resume_state)
        purge = self.samples_seen + 1 if config.resume else None  # drop events after the resumed step
        self.writers = RunWriters(
            config.runs_dir, config.tb_prefix, self.run_time, config.comment, kind=self.tb_kind, purge_step=purge
        )
        self.writers.enabled = self.dist.is_main

    def _check_outputs(self) -> None:
        """Every folder the run writes in, checked before the first sample is read (`check_output_dir`)."""
        config = self.config
        if config.resume:
            check_output_dir(self.checkpoint_dir, "--resume", named=config.resume)
        else:
            check_output_dir(self.checkpoint_dir, "--checkpoint-dir", named=config.checkpoint_dir)
        check_output_dir(Path(config.runs_dir) / config.tb_prefix, "--runs-dir", named=config.runs_dir)
        check_output_dir(config.cache_dir, "--cache-dir")

    # -- what an app supplies --------------------------------------------------------------------

    def make_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def arch_of(self, model: torch.nn.Module) -> str:
        """The architecture tag checkpoints carry (load_checkpoint refuses another)."""
        raise NotImplementedError

    def make_best(self) -> BestCheckpoint:
        raise NotImplementedError

    def build_data(self) -> None:
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module, resume_state: dict[str, Any] | None) -> None:
        """Change the model before the optimizer sees it (e.g. load and freeze for fine-tuning); default none."""

    def train_epoch(self, epoch: int) -> EpochResult:
        raise NotImplementedError

    def log_training(self, epoch: int, result: EpochResult) -> None:
        raise NotImplementedError

    def run_validation(self, epoch: int) -> bool:
        """Validate, log, and say whether this epoch is the best so far."""
        raise NotImplementedError

    # -- model, optimizer, resume ------------------------------------------------------------------

    def _init_model(self, model: torch.nn.Module, resume_state: dict[str, Any] | None) -> None:
        config = self.config
        self.model = model.to(self.device)
        if config.init_weights:
            init_state = load_checkpoint(config.init_weights, arch=self.arch)
            check_task(config.init_weights, init_state, self.task, "--init-weights")
            load_weights(self.model, init_state["model"], config.init_weights)
            log.info("initial weights from %s (epoch %s)", config.init_weights, init_state.get("epoch"))
        self.prepare_model(self.model, resume_state)
        if self.channels_last:
            self.model = self.model.to(memory_format=self.memory_format)
        self.optimizer = make_optimizer(self.model, config)
        steps_per_epoch = self.steps_per_epoch()
        saved_plan = resume_state.get("schedule") if resume_state is not None else None
        self.lr_plan = (
            LrPlan(**saved_plan) if saved_plan else plan_schedule(config, steps_per_epoch, self.samples_per_step)
        )
        self.scheduler = make_scheduler(self.optimizer, self.lr_plan)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # Reseeded from (seed, epoch, rank) at every epoch, so a resumed run augments exactly as
        # an uninterrupted one and ranks never share random transforms.
        self.aug_generator = torch.Generator(device=self.device)
        if resume_state is not None:
            self._restore(resume_state)
        steps_done = self.scheduler.last_epoch if self.scheduler is not None else 0
        check_horizon(self.lr_plan, steps_done, steps_per_epoch, config, self.epoch)
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
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            apply_optimizer_settings(self.optimizer, self.scheduler, self.config, float(state["config"]["lr"]))
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

    @property
    def samples_per_step(self) -> int:
        """Training samples of one optimizer step: the batch of every rank."""
        return self.config.batch_size * self.dist.world_size

    def steps_per_epoch(self) -> int:
        """Optimizer steps of one training epoch on this rank (every rank runs as many)."""
        return batches_of(self.data.train_loader, self.config.max_train_batches)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward of `loss` (a scalar), the optimizer's step through the GradScaler, then the lr schedule's."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()

    def seed_augmentation(self, epoch: int) -> None:
        """Reseed the device generator from (seed, epoch, rank): resumed runs augment as uninterrupted ones."""
        self.aug_generator.manual_seed((self.config.seed * 1_000_003 + epoch) * 1009 + self.dist.rank)

    # -- checkpoints -------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "arch": self.arch,
            "task": self.task,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "schedule": dataclasses.asdict(self.lr_plan),
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

    # -- the schedule ------------------------------------------------------------------------------

    def hparam_tags(self) -> tuple[str, ...]:
        """The metrics TensorBoard's HPARAMS tab lists for this app."""
        return ()

    def run(self) -> None:
        """Train until epoch `config.epochs`, validating every `val_every` epochs and after the last."""
        config = self.config
        if self.dist.is_main:
            log.info("config: %s", json.dumps(config.to_dict(), sort_keys=True))
            log.info("lr schedule: %s", self.lr_plan)
            if not config.resume:
                self.writers.hparams(config.to_dict(), self.hparam_tags())
        try:
            for epoch in range(self.epoch + 1, config.epochs + 1):
                trn = self._train_epoch_checked(epoch)
                self.samples_seen += trn.count
                self.log_training(epoch, trn)
                self.epoch = epoch
                is_best = False
                if epoch % config.val_every == 0 or epoch == config.epochs:
                    is_best = self.run_validation(epoch)
                self.save(is_best)
            barrier(self.dist)  # every rank ends together (only rank 0 computes some metrics and writes)
        finally:
            self.writers.close()

    def _train_epoch_checked(self, epoch: int) -> EpochResult:
        """`train_epoch`; a loss that turned nan or infinite stops the run before anything is saved."""
        try:
            return self.train_epoch(epoch)
        except NonFiniteLossError as exc:
            advice = non_finite_advice(self.config, self.amp_dtype, self.checkpoint_dir, self.epoch)
            raise NonFiniteLossError(f"{exc}; {advice}") from None

    def close(self) -> None:
        close_distributed(self.dist)


def training_main(
    prog: str,
    get_args_parser: Callable[[], argparse.ArgumentParser],
    config_class: type[RunConfig],
    app_class: type[TrainingRun],
    argv: Sequence[str] | None,
    after_run: Callable[[TrainingRun, argparse.Namespace], None] | None = None,
    prepare_args: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """The `main` of a training command: parse, merge the settings of a resumed run, run, report.

    Expected failures end as one line (`run_cli`); Ctrl-C and SIGTERM say how to resume. `after_run(app,
    args)` runs on rank 0 after a finished run (e.g. to write a report); `prepare_args(args)` first of all,
    to check or complete the parsed flags (e.g. that the report's location is writable, the width of the
    model that --finetune loads).
    """
    args = get_args_parser().parse_args(argv)
    configure_logging(args.log_level)
    holder: dict[str, TrainingRun] = {}

    def body() -> int:
        if prepare_args is not None:
            prepare_args(args)
        config = config_from_args(args, config_class)
        resume_state = None
        if config.resume:
            resume_state = load_resume_state(config.resume)  # its architecture is checked by the app
            given = explicit_settings(get_args_parser(), argv)
            allow = args.allow_config_change
            config = resume_config(resume_state["config"], given, config.resume, allow, config_class=config_class)
        app = holder["app"] = app_class(config, resume_state=resume_state)
        app.run()
        if app.dist.is_main:
            if after_run is not None:
                after_run(app, args)
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
        return run_cli(prog, body, interrupted)
    finally:
        if "app" in holder:
            holder["app"].close()
