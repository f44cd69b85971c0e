"""Default paths and their overrides: explicit argument, then environment variable, then default.

Nothing here runs at import time; every path is resolved when a command asks for it, so
`P2CH_DATA_ROOT=/big/disk/luna python -m p2ch.training` and `--data-root` both work.
Relative defaults are taken from the current working directory (run commands from the
repository root, as the README does).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from p2ch.errors import ConfigError

DATA_ROOT_ENV = "P2CH_DATA_ROOT"
CACHE_DIR_ENV = "P2CH_CACHE_DIR"
RUNS_DIR_ENV = "P2CH_RUNS_DIR"
MODELS_DIR_ENV = "P2CH_MODELS_DIR"

DEFAULT_DATA_ROOT = Path("data-unversioned/part2/luna")
DEFAULT_CACHE_DIR = Path("data-unversioned/cache")
DEFAULT_RUNS_DIR = Path("runs")
DEFAULT_MODELS_DIR = Path("data-unversioned/models")

AMP_MODES = ("auto", "off", "bf16", "fp16")  # --amp of training, evaluation and prediction
DEFAULT_BATCH_SIZE = 64  # candidates per forward pass in evaluation and prediction, on the CPU
# On CUDA, batches of 32 (training) or 64 (evaluation) leave the GPU waiting on kernel launches, so
# --batch-size defaults larger there: chosen from LunaModel's ~7,600 samples/s at batch 1024 on an
# H100, measured outside p2ch; to be measured by benchmarks/gpu_suite.sh. The book's 32 is one flag
# away (--batch-size 32). The learning rate is not scaled with the batch: Adam's step does not grow
# with the batch size as plain SGD's effective step does.
DEFAULT_CUDA_BATCH_SIZE = 512  # evaluation and prediction on CUDA
CUDNN_BENCHMARK_HELP = (
    "cuDNN autotuning: time the convolution algorithms for each new input shape and keep the fastest (CUDA only; "
    "off: cuDNN's heuristic choice, the same in every run, for reproducibility)"
)
BATCH_BUFFERS = ("reuse", "fresh")  # see TrainingConfig.batch_buffers
MAX_MODEL_WIDTH = 256  # --model-width: 256 channels in block1 make 2,048 in block4, far past any use
BOOK_MODEL_WIDTH = 8  # the book's LunaModel: 8 conv channels in block1
# Settings added after checkpoints were first written, with the value such older checkpoints were trained
# with: `from_dict` fills them in where a stored config lacks them, whatever the default is today.
PREDATING_VALUES: dict[str, Any] = {"model_width": BOOK_MODEL_WIDTH, "lr_schedule": "constant", "bce_weight": 0.0}
# See p2ch.datasets.split_candidates; "series-stride" is the book's chapter-14 split (every 10th series in sorted
# order), which models imported from the book (p2ch.import_book_models) carry, so they are scored on series they
# never trained on.
SPLIT_MODES = ("series", "subset", "stride", "series-stride")
SELECT_BY = ("cpm", "f1", "auc")  # the validation metric that picks best.pt
# What a classifier run learns: nodule vs non-nodule candidates (chapters 11-12), or benign vs
# malignant annotated nodules (chapter 14). The book's --dataset names map onto them.
TASKS = ("nodule", "malignancy")
TASK_OF_DATASET = {"LunaDataset": "nodule", "MalignantLunaDataset": "malignancy"}
DEFAULT_SELECT_BY = {"nodule": "cpm", "malignancy": "auc"}
OPTIMIZERS = ("sgd", "adam")
# --lr-schedule: the lr held (after an optional warm-up), or over the run's horizon a one-cycle
# (rise to --lr, cosine down to ~0) or a linear warm-up and cosine decay to 0; see p2ch.trainer.
LR_SCHEDULES = ("constant", "onecycle", "cosine")
# The warm-up when --warmup-samples is not given, as a fraction of the schedule's horizon:
# none for constant, 5 % for cosine, and torch's OneCycleLR default (pct_start 0.3) for onecycle.
DEFAULT_WARMUP_FRACTION = {"constant": 0.0, "onecycle": 0.3, "cosine": 0.05}
DEFAULT_EVAL_DIR = Path("data-unversioned/eval")


def _resolve(value: str | os.PathLike[str] | None, env: str, default: Path) -> Path:
    if value is not None and str(value) != "":
        return Path(value).expanduser()
    from_env = os.environ.get(env, "")
    if from_env:
        return Path(from_env).expanduser()
    return default


def resolve_data_root(value: str | os.PathLike[str] | None = None) -> Path:
    """LUNA16 root holding `subset0..9/` and the CSVs: `value`, else $P2CH_DATA_ROOT, else default."""
    return _resolve(value, DATA_ROOT_ENV, DEFAULT_DATA_ROOT)


def resolve_cache_dir(value: str | os.PathLike[str] | None = None) -> Path:
    """Chunk cache folder: `value`, else $P2CH_CACHE_DIR, else `data-unversioned/cache`."""
    return _resolve(value, CACHE_DIR_ENV, DEFAULT_CACHE_DIR)


def resolve_runs_dir(value: str | os.PathLike[str] | None = None) -> Path:
    """TensorBoard runs folder: `value`, else $P2CH_RUNS_DIR, else `runs`."""
    return _resolve(value, RUNS_DIR_ENV, DEFAULT_RUNS_DIR)


def resolve_models_dir(value: str | os.PathLike[str] | None = None) -> Path:
    """Checkpoint folder: `value`, else $P2CH_MODELS_DIR, else `data-unversioned/models`."""
    return _resolve(value, MODELS_DIR_ENV, DEFAULT_MODELS_DIR)


def check_output_dir(path: str | os.PathLike[str], flag: str, named: str | os.PathLike[str] | None = None) -> Path:
    """`path` as a Path when it is a folder this process can write in, or one it can create; else ConfigError.

    Nothing is created: the nearest part of `path` that exists must be a folder (not a file) that is
    writable. Commands call this for every output location before they read the first sample, so a
    run cannot fail after hours of work at its first save. flag: the option that named `path`; named:
    what it named, when that is not `path` itself (a file in the folder).
    """
    path = Path(path).expanduser()
    shown = named if named is not None else path
    existing = next((p for p in (path, *path.absolute().parents) if os.path.lexists(p)), None)
    if existing is None:  # nothing exists, not even the root: nothing to check
        return path
    fix = f"pass another {flag}" if flag.startswith("-") else f"choose another {flag}"
    if not existing.is_dir():
        what = "a broken symbolic link" if existing.is_symlink() and not existing.exists() else "a file"
        raise ConfigError(f"{flag} {shown}: {existing} is {what}, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f"; it would be created in {existing}"
        raise ConfigError(f"{flag} {shown}: the folder {existing} is not writable (permission denied){where}; {fix}")
    return path


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """`path` as a Path when a file can be written there (not a folder; its folder writable or creatable)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: this is a folder; name a file (in it, or elsewhere)")
    check_output_dir(path.parent, flag, named=path)
    return path


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to an option's help unless the text already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower():
            return text
        return super()._get_help_string(action)


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--checkpoint and --models-dir (a "model" group), as p2ch.predict and p2ch.evaluate spell them."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="checkpoint file, or a run folder (its newest best.pt) (default: the newest best.pt of a model of "
        "the right kind under --models-dir)",
    )
    g.add_argument(
        "--models-dir",
        default=None,
        help="where to look for the newest best.pt (default: $P2CH_MODELS_DIR or data-unversioned/models)",
    )
    return g


def add_inference_arguments(group: argparse._ArgumentGroup, *, cpu_bf16: bool = False) -> None:
    """--batch-size, --device, --amp and --channels-last into `group` (the inference settings of make_scorer;
    cpu_bf16: the command passes make_scorer's cpu_bf16, and --amp's help says so)."""
    group.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"candidates per forward pass (default: {DEFAULT_BATCH_SIZE} on the CPU, {DEFAULT_CUDA_BATCH_SIZE} on "
        "CUDA)",
    )
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="mixed precision: auto = bf16 on CUDA (fp16 if unsupported), "
        + (
            "and on a CPU with native bf16 (lscpu lists avx512_bf16 or amx_bf16; 1.8x faster per CT and the same "
            "CPM as float32 in BENCHMARKS.md), else off"
            if cpu_bf16
            else "off on the CPU"
        ),
    )
    group.add_argument(
        "--channels-last",
        choices=("on", "off"),
        default="on",
        help="channels_last_3d memory format for the model and batches",
    )
    group.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on", help=CUDNN_BENCHMARK_HELP)


def resolve_batch_size(value: int | None, device: str, cpu: int, cuda: int | None) -> int:
    """--batch-size: `value` when given, else `cpu` or `cuda` (`cpu` when None) by what --device `device` means."""
    if value is not None:
        return value
    from p2ch.runtime import device_type_of  # torch only here: p2ch.synth imports this module without it

    return cuda if cuda is not None and device_type_of(device) == "cuda" else cpu


def inference_batch_size(value: int | None, device: str) -> int:
    """--batch-size of evaluation and prediction (`add_inference_arguments`): `value`, else by device."""
    return resolve_batch_size(value, device, DEFAULT_BATCH_SIZE, DEFAULT_CUDA_BATCH_SIZE)


_Config = TypeVar("_Config", bound="RunConfig")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_finite_settings(config: Any) -> None:
    """ConfigError naming the first setting of `config` (a dataclass) that is a float but nan or infinite.

    argparse's `type=float` takes "inf" and "nan", and both pass range checks written as `x > 0`.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The settings every training app has (data, split, augmentation, optimisation, speed, output).

    Each app's config adds its own (`TrainingConfig` for the classifier, `SegTrainingConfig` for the
    UNet); saved with each checkpoint as a plain dict and logged once.
    """

    comment: str = "dwlpt"
    # data
    data_root: str | None = None
    cache_dir: str | None = None
    prefill: bool = True  # fill what the cache lacks CT by CT before the first batch (--no-prefill: don't)
    # split
    split: str = "series"
    val_fraction: float = 0.1
    val_stride: int | None = None
    val_subsets: tuple[int, ...] = (9,)
    test_fraction: float = 0.0
    test_subsets: tuple[int, ...] = ()
    # sampling
    epoch_size: int | None = None
    # augmentation
    augmented: bool = False
    augment_flip: bool = False
    augment_offset: bool = False
    augment_scale: bool = False
    augment_rotate: bool = False
    augment_noise: bool = False
    # optimisation
    batch_size: int = 32
    num_workers: int = 8
    epochs: int = 1
    # Adam is the default because it is what learns: on the quickstart's synthetic set Adam (lr 1e-3) reached
    # CPM 0.62 in 10,240 samples, the book's SGD (lr 1e-3, momentum 0.99) 0.006 (BENCHMARKS.md). The classifier
    # (TrainingConfig) has its own lr and schedule defaults.
    optimizer: str = "adam"
    lr: float = 0.001
    momentum: float = 0.99  # SGD only (the book's)
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_samples: int | None = None  # None: DEFAULT_WARMUP_FRACTION of the schedule's horizon
    schedule_samples: int | None = None  # the horizon of onecycle/cosine; None: the whole run at its start
    # speed
    amp: str = "auto"
    channels_last: str = "on"
    compile: bool = False
    device: str = "auto"
    sync_bn: bool = False
    cudnn_benchmark: str = "on"
    # run control
    seed: int = 0
    val_every: int = 1
    max_train_batches: int | None = None
    max_val_batches: int | None = None
    images_every: int = 5
    # output
    tb_prefix: str = "p2ch"
    runs_dir: str | None = None
    checkpoint_dir: str | None = None
    resume: str | None = None
    init_weights: str | None = None
    log_level: str = "INFO"
    # --batch-size when none is given on CUDA (None: `batch_size` there too); see DEFAULT_CUDA_BATCH_SIZE.
    cuda_batch_size: ClassVar[int | None] = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists) for checkpoints and hparams."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[_Config], values: dict[str, Any]) -> _Config:
        fields = {f.name for f in dataclasses.fields(cls)}
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
        older = {k: v for k, v in PREDATING_VALUES.items() if k in fields and k not in clean}
        return cls(**older, **clean)

    def split_settings(self) -> dict[str, Any]:
        """The keyword arguments of `split_candidates` / `split_series` besides the mode and data root."""
        return {
            "val_fraction": self.val_fraction,
            "val_stride": self.val_stride,
            "val_subsets": self.val_subsets,
            "test_fraction": self.test_fraction,
            "test_subsets": self.test_subsets,
        }

    def validate(self) -> None:
        """Raise ConfigError naming the flag for any unusable value (every number finite, in its range)."""
        check_finite_settings(self)
        _need(self.split in SPLIT_MODES, f"--split {self.split!r}: expected one of {', '.join(SPLIT_MODES)}")
        _need(self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        _need(self.amp in AMP_MODES, f"--amp {self.amp!r}: expected one of {', '.join(AMP_MODES)}")
        _need(self.cudnn_benchmark in ("on", "off"), f"--cudnn-benchmark {self.cudnn_benchmark!r}: expected on or off")
        _need(self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}")
        _need(self.num_workers >= 0, f"--num-workers must be ≥ 0, got {self.num_workers}")
        _need(self.epochs >= 1, f"--epochs must be ≥ 1, got {self.epochs}")
        _need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        _need(self.weight_decay >= 0, f"--weight-decay must be ≥ 0, got {self.weight_decay}")
        _need(
            self.lr_schedule in LR_SCHEDULES,
            f"--lr-schedule {self.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}",
        )
        _need(
            self.warmup_samples is None or self.warmup_samples >= 0,
            f"--warmup-samples must be ≥ 0 training samples, got {self.warmup_samples}",
        )
        _need(
            self.schedule_samples is None or self.schedule_samples >= 1,
            f"--schedule-samples must be ≥ 1 training samples, got {self.schedule_samples}",
        )
        _need(
            self.schedule_samples is None or self.lr_schedule != "constant",
            "--schedule-samples sets how long a onecycle or cosine schedule runs; a constant lr has no end: "
            "add --lr-schedule onecycle|cosine or drop --schedule-samples",
        )
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _need(0 <= value < 1, f"--{name.replace('_', '-')} must be a fraction in [0, 1), got {value}")
        _need(self.val_every >= 1, f"--val-every must be ≥ 1, got {self.val_every}")
        _need(self.images_every >= 0, f"--images-every must be ≥ 0, got {self.images_every}")
        _need(self.epoch_size is None or self.epoch_size >= 1, f"--epoch-size must be ≥ 1, got {self.epoch_size}")
        for name in ("max_train_batches", "max_val_batches"):
            value = getattr(self, name)
            _need(value is None or value >= 1, f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
        _need(not (self.resume and self.init_weights), "use either --resume or --init-weights, not both")


@dataclasses.dataclass(frozen=True)
class TrainingConfig(RunConfig):
    """Every setting of a classification run (python -m p2ch.training)."""

    task: str = "nodule"
    width_irc: tuple[int, int, int] = (32, 48, 48)
    # The classifier's default recipe is what reached CPM 0.9 soonest on time_to_cpm's 48-CT set (BENCHMARKS.md,
    # "CPM 0.9"): Adam, a one-cycle lr peaking at 0.003 over the run, LunaModel twice the book's width: 0.9 after
    # 16,384 samples. A constant Adam lr 0.001 at width 16 had 0.65 after 14,336, the one-cycle at width 8 levelled
    # off at 0.875; the book's recipe (SGD, constant lr 0.001, width 8) reached 0.724 in 81,920 samples.
    lr: float = 0.003
    lr_schedule: str = "onecycle"
    model_width: int = 16  # LunaModel's conv channels in block1 (doubled per block); 8: the book's
    balanced: bool = False
    balance_ratio: int | None = None
    label_smoothing: float = 0.0
    mixup: float = 0.0  # alpha of Beta(alpha, alpha), one λ per sample; 0: off
    select_by: str | None = None  # None: the task's default (DEFAULT_SELECT_BY)
    finetune: str | None = None
    finetune_depth: int | None = None  # None: 1 with --finetune (the book's default)
    batch_buffers: str = "reuse"  # DataLoader workers reuse released batch buffers (p2ch.batchbuffers), or "fresh"
    cuda_batch_size: ClassVar[int | None] = 256

    @property
    def best_by(self) -> str:
        """The metric that picks best.pt: --select-by, else cpm for nodules and auc for malignancy."""
        return self.select_by or DEFAULT_SELECT_BY[self.task]

    def validate(self) -> None:
        super().validate()
        _need(self.task in TASKS, f"task {self.task!r}: expected one of {', '.join(TASKS)}")
        _need(
            self.batch_buffers in BATCH_BUFFERS,
            f"--batch-buffers {self.batch_buffers!r}: expected one of {', '.join(BATCH_BUFFERS)}",
        )
        _need(
            self.select_by is None or self.select_by in SELECT_BY,
            f"--select-by {self.select_by!r}: expected one of {', '.join(SELECT_BY)}",
        )
        _need(
            not (self.task == "malignancy" and self.select_by == "cpm"),
            "--select-by cpm: CPM scores nodule detection; a malignancy run picks best.pt by auc (default) or f1",
        )
        _need(
            self.finetune_depth is None or self.finetune,
            "--finetune-depth applies to --finetune PATH (which blocks of the loaded model keep training); "
            "add --finetune or drop --finetune-depth",
        )
        _need(
            self.finetune_depth is None or self.finetune_depth >= 1,
            f"--finetune-depth must be ≥ 1 (1: only the head trains), got {self.finetune_depth}",
        )
        _need(
            not (self.finetune and self.init_weights),
            "--finetune starts from a nodule model's weights but its head; --init-weights loads all weights: "
            "use one of them",
        )
        _need(
            1 <= self.model_width <= MAX_MODEL_WIDTH,
            f"--model-width must be in 1..{MAX_MODEL_WIDTH} (conv channels of the first block), got {self.model_width}",
        )
        _need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        _need(self.mixup >= 0, f"--mixup must be ≥ 0 (the alpha of Beta(alpha, alpha); 0: off), got {self.mixup}")
        _need(
            self.balance_ratio is None or self.balance_ratio >= 1,
            f"--balance-ratio must be ≥ 1 negatives per positive, got {self.balance_ratio}",
        )


VAL_SLICES = ("all", "nodules")  # segmentation validation: every slice, or nodule slices plus a sample
UP_MODES = ("upconv", "upsample")  # the UNet's up path: learned transposed convolutions or bilinear + 1x1
# The UNet's conv blocks: p2ch's Conv2d (no bias) → BatchNorm2d → ReLU with max-pooling between levels, or the
# book's (util/unet.py) Conv2d with bias → ReLU → BatchNorm2d with average pooling, which its trained weights need.
BLOCK_ORDERS = ("p2ch", "book")
BOOK_SEG_EPOCH_SIZE = 300_000  # the book's segmentation epoch (samples)


@dataclasses.dataclass(frozen=True)
class SegTrainingConfig(RunConfig):
    """Every setting of a segmentation run (python -m p2ch.seg_training); the book's defaults.

    context_slices: slices on each side of the centre slice given as channels (3: 7 channels).
    crop_size: the random training crop (the dataset hands out crops 1.5x as large around a nodule).
    depth, wf, up_mode, block_order: the UNet (depth levels, 2**wf filters at the first; its blocks in
    p2ch's or the book's order, `BLOCK_ORDERS`). fn_weight: weight of the false-negative Dice term of the
    loss. background_crops: fixed positions per training CT away from the nodules, sampled
    `background_ratio` per nodule crop (0: only nodule crops, as the book).
    val_slices: validate on every slice of the validation CTs (needed for per-nodule metrics) or on
    the nodule slices plus `val_negative_fraction` of the rest.
    threshold: probability above which a pixel counts as nodule.
    """

    comment: str = "seg"
    batch_size: int = 16
    optimizer: str = "adam"
    # The detector's recipe (BENCHMARKS.md, issue 22): a one-cycle lr peaking at 0.003 over the run, hard
    # negatives (candidates.csv's class-0 rows: vessels, scars) beside the nodule crops and a pixel
    # cross-entropy beside the Dice loss. The book's (nodule crops only, Dice, constant lr 0.001) paints vessels
    # and tissue around nodules: components merge, and small nodules get no candidate of their own.
    lr: float = 0.003
    lr_schedule: str = "onecycle"
    context_slices: int = 3
    crop_size: int = 64
    depth: int = 3
    wf: int = 4
    up_mode: str = "upconv"
    block_order: str = "p2ch"
    fn_weight: float = 8.0
    bce_weight: float = 1.0
    background_crops: int = 100
    background_ratio: int = 1
    val_slices: str = "all"
    val_negative_fraction: float = 0.1
    threshold: float = 0.5

    def validate(self) -> None:
        super().validate()
        _need(
            self.split != "stride", "--split stride is candidate-level; segmentation splits whole CTs (series, subset)"
        )
        _need(0 <= self.context_slices <= 32, f"--context-slices must be in 0…32, got {self.context_slices}")
        _need(1 <= self.depth <= 8, f"--depth must be in 1…8, got {self.depth}")
        _need(1 <= self.wf <= 10, f"--wf must be in 1…10, got {self.wf}")
        _need(self.up_mode in UP_MODES, f"--up-mode {self.up_mode!r}: expected one of {', '.join(UP_MODES)}")
        _need(
            self.block_order in BLOCK_ORDERS,
            f"--block-order {self.block_order!r}: expected one of {', '.join(BLOCK_ORDERS)}",
        )
        _need(self.fn_weight >= 0, f"--fn-weight must be ≥ 0, got {self.fn_weight}")
        _need(self.bce_weight >= 0, f"--bce-weight must be ≥ 0, got {self.bce_weight}")
        _need(self.background_crops >= 0, f"--background-crops must be ≥ 0, got {self.background_crops}")
        _need(self.background_ratio >= 1, f"--background-ratio must be ≥ 1, got {self.background_ratio}")
        _need(
            self.val_slices in VAL_SLICES, f"--val-slices {self.val_slices!r}: expected one of {', '.join(VAL_SLICES)}"
        )
        _need(
            0.0 <= self.val_negative_fraction <= 1.0,
            f"--val-negative-fraction must be in [0, 1], got {self.val_negative_fraction}",
        )
        _need(0.0 < self.threshold < 1.0, f"--threshold must be in (0, 1), got {self.threshold}")
        step = 2 ** (self.depth - 1)
        _need(
            self.crop_size >= step and self.crop_size % step == 0,
            f"--crop-size {self.crop_size}: a UNet of depth {self.depth} needs a multiple of {step} "
            f"(halved {self.depth - 1} times); e.g. 64",
        )


# ---------------------------------------------------------------------------------------------
# the command-line spelling of RunConfig, shared by the training apps


PREFILL_HELP = {
    "chunk cache": "before the first batch, the chunks the run reads that the cache lacks (a key check) are "
    "cropped CT by CT, one load per CT, in up to --num-workers processes (at most 8; this one for less than a GiB "
    "of CT), with a progress bar and ETA; with --no-prefill a warning says what is missing, and DataLoader workers "
    "crop each missing chunk after loading its whole CT (about 20x fewer samples/s on a cold cache, BENCHMARKS.md)",
    "slice cache": "before the first batch, the CTs of the run that the slice cache lacks are written CT by CT in "
    "--num-workers processes (at most 8, with a progress bar and ETA); with --no-prefill a warning says how many "
    "are missing, and the datasets write each one in the main process when they first read it",
}


def add_data_arguments(
    parser: argparse.ArgumentParser, cache_help: str = "chunk cache", cache_kind: str = "chunk cache"
) -> argparse._ArgumentGroup:
    """--data-root, --cache-dir and --no-prefill (group "data"); cache_kind: "chunk cache" or "slice cache"."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data-root",
        default=None,
        help="LUNA16 root with subset*/ and the CSVs (default: $P2CH_DATA_ROOT or data-unversioned/part2/luna)",
    )
    g.add_argument(
        "--cache-dir", default=None, help=f"{cache_help} (default: $P2CH_CACHE_DIR or data-unversioned/cache)"
    )
    g.add_argument("--no-prefill", dest="prefill", action="store_false", help=PREFILL_HELP[cache_kind])
    return g


def add_split_arguments(
    parser: argparse.ArgumentParser, d: RunConfig, modes: tuple[str, ...] = SPLIT_MODES
) -> argparse._ArgumentGroup:
    """--split and its fractions, strides and subsets (the same leak-free split for every model)."""
    g = parser.add_argument_group("split (every CT entirely in one part unless --split stride)")
    g.add_argument(
        "--split",
        choices=modes,
        default=d.split,
        help="series: by a stable hash of series_uid; subset: LUNA16 folds (--val-subsets); "
        "stride: the book's every-Nth-candidate split (leaky, for comparison only); series-stride: every Nth "
        "series in sorted order (the book's chapter-14 split, that of models imported from the book)",
    )
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="fraction of series for validation")
    g.add_argument(
        "--val-stride",
        type=int,
        default=None,
        help="every Nth series (series split: by hash; series-stride: in sorted order) or candidate (stride split) "
        "to validation",
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
    return g


def add_augmentation_arguments(parser: argparse.ArgumentParser, rotate_help: str) -> argparse._ArgumentGroup:
    """--augmented and --augment-flip|offset|scale|rotate|noise (the book's flags)."""
    g = parser.add_argument_group("augmentation (batched, on the training device)")
    g.add_argument("--augmented", action="store_true", help="all of the augmentations below")
    g.add_argument("--augment-flip", action="store_true", help="random flip per axis")
    g.add_argument("--augment-offset", action="store_true", help="random offset ±10%%")
    g.add_argument("--augment-scale", action="store_true", help="random scale ±20%%")
    g.add_argument("--augment-rotate", action="store_true", help=rotate_help)
    g.add_argument("--augment-noise", action="store_true", help="Gaussian noise, σ = 25 HU")
    return g


def add_optimisation_arguments(parser: argparse.ArgumentParser, d: RunConfig) -> argparse._ArgumentGroup:
    """--batch-size, --num-workers, --epochs, --optimizer, --lr, --momentum, --weight-decay, --lr-schedule,
    --warmup-samples, --schedule-samples."""
    g = parser.add_argument_group("optimisation")
    cuda = type(d).cuda_batch_size
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"samples per batch (per GPU{f'; {cuda} on CUDA' if cuda else ''}) (default: {d.batch_size})",
    )
    g.add_argument(
        "--num-workers",
        type=int,
        default=d.num_workers,
        help="DataLoader worker processes (per GPU); each keeps 2 batches in shared memory (/dev/shm), and with "
        "reused batch buffers 4 per loader: in a container, start it with docker's --ipc=host or --shm-size, or "
        "workers die with 'Bus error'",
    )
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs to train (in total, when resuming)")
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.optimizer,
        help="optimizer (the book's: sgd, with --lr 0.001 --momentum 0.99 --lr-schedule constant)",
    )
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate (the peak of a schedule)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (Adam ignores it)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=d.lr_schedule,
        help="the lr per optimizer step: constant: --lr (after --warmup-samples, if any); onecycle: up from "
        "--lr/25 to --lr over the warm-up, then a cosine down to ~0; cosine: a linear warm-up to --lr, then a "
        "cosine down to 0 at the schedule's end",
    )
    g.add_argument(
        "--warmup-samples",
        type=int,
        default=None,
        metavar="N",
        help="training samples of linear warm-up (default: 0 for constant; cosine: 5%%, onecycle: 30%% of the "
        "schedule)",
    )
    g.add_argument(
        "--schedule-samples",
        type=int,
        default=None,
        metavar="N",
        help="training samples over which a onecycle or cosine schedule runs (default: the whole run as started, "
        "--epochs x the epoch size); a resumed run cannot train past its end",
    )
    return g


def add_speed_arguments(
    parser: argparse.ArgumentParser, d: RunConfig, channels_last_help: str
) -> argparse._ArgumentGroup:
    """--amp, --channels-last, --compile, --device, --sync-bn."""
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
        help=channels_last_help,
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (under torchrun: per rank)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (DDP only)")
    g.add_argument("--cudnn-benchmark", choices=("on", "off"), default=d.cudnn_benchmark, help=CUDNN_BENCHMARK_HELP)
    return g


def add_run_control_arguments(
    parser: argparse.ArgumentParser, d: RunConfig, images_help: str
) -> argparse._ArgumentGroup:
    """--seed, --val-every, --max-train-batches, --max-val-batches, --images-every."""
    g = parser.add_argument_group("run control")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for init, sampling and augmentation")
    g.add_argument("--val-every", type=int, default=d.val_every, help="validate every N epochs (and after the last)")
    g.add_argument("--max-train-batches", type=int, default=None, help="stop each training epoch after N batches")
    g.add_argument("--max-val-batches", type=int, default=None, help="stop each validation after N batches")
    g.add_argument(
        "--images-every",
        type=int,
        default=d.images_every,
        help=images_help,
    )
    return g


def add_output_arguments(parser: argparse.ArgumentParser, d: RunConfig) -> None:
    """--tb-prefix, --runs-dir, --checkpoint-dir, --resume, --init-weights, --log-level, --allow-config-change."""
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
        help="with --resume: accept a changed data root, input size, split or run folder (metrics no longer compare)",
    )


# Settings that decide which data a run trains and validates on, and where it writes: a resumed
# run must keep them, or its metrics and best.pt no longer compare with the epochs before.
RESUME_GUARDED = (
    "task",
    "finetune_depth",
    "data_root",
    "width_irc",
    "context_slices",
    "split",
    "val_fraction",
    "val_stride",
    "val_subsets",
    "test_fraction",
    "test_subsets",
    "tb_prefix",
    "runs_dir",
    "comment",
)
# Settings a resumed run cannot change (not even with --allow-config-change): the optimizer's and
# the lr schedule's state continue from the checkpoint and fit only the optimizer and schedule
# that wrote them.
RESUME_FIXED = ("optimizer", "lr_schedule", "warmup_samples", "schedule_samples")
PATH_SETTINGS = ("data_root", "cache_dir", "runs_dir", "checkpoint_dir", "resume", "init_weights", "finetune")


def absolute_paths(config: _Config) -> _Config:
    """`config` with every path setting absolute (defaults and environment variables resolved).

    Checkpoints and metrics store these, so that evaluate/predict run from another working
    directory find the same files. Symbolic links are kept as given.
    """
    resolved = {
        "data_root": resolve_data_root(config.data_root),
        "cache_dir": resolve_cache_dir(config.cache_dir),
        "runs_dir": resolve_runs_dir(config.runs_dir),
        "checkpoint_dir": resolve_models_dir(config.checkpoint_dir),
        "resume": Path(config.resume).expanduser() if config.resume else None,
        "init_weights": Path(config.init_weights).expanduser() if config.init_weights else None,
    }
    if getattr(config, "finetune", None):  # the classifier's --finetune
        resolved["finetune"] = Path(config.finetune).expanduser()
    return dataclasses.replace(config, **{k: str(v.absolute()) if v else None for k, v in resolved.items()})


def resume_config(
    saved: dict[str, Any],
    given: dict[str, Any],
    resume: str,
    allow_changes: bool = False,
    config_class: type[_Config] = TrainingConfig,  # type: ignore[assignment]
) -> _Config:
    """The settings of a resumed run: the checkpoint's, updated by the flags given on the command line.

    saved: the checkpoint's config dict. given: only the settings set explicitly now (flag → value,
    field names). A given value of a `RESUME_GUARDED` setting that differs from the checkpoint's
    raises ConfigError naming each change, unless `allow_changes`. Paths compare as absolute.
    """
    try:
        base = absolute_paths(config_class.from_dict(saved))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--resume {resume}: the settings stored in the checkpoint are unusable ({exc})") from None
    fields = {f.name for f in dataclasses.fields(config_class)}
    if given.get("finetune"):
        raise ConfigError(
            f"--resume {resume} continues a run whose weights already hold what --finetune loaded at its start; "
            "drop --finetune (or start a new run with it)"
        )
    updates = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in given.items()
        if k in fields and k not in ("resume", "init_weights", "finetune")
    }
    candidate = absolute_paths(dataclasses.replace(base, **updates, resume=resume, init_weights=None))
    candidate.validate()
    if "model_width" in updates and candidate.model_width != base.model_width:
        raise ConfigError(
            f"--resume {resume}: --model-width {base.model_width} → {candidate.model_width}: the checkpoint's weights "
            f"fit a model of width {base.model_width} only; leave --model-width out to continue it, or start a new run"
        )
    fixed = [
        f"--{name.replace('_', '-')} {getattr(base, name)} → {getattr(candidate, name)}"
        for name in RESUME_FIXED
        if name in updates and getattr(candidate, name) != getattr(base, name)
    ]
    if fixed:
        raise ConfigError(
            f"--resume {resume}: {'; '.join(fixed)}: a resumed run continues its optimizer and lr schedule from "
            f"the checkpoint, so they cannot change; leave those flags out, or start a new run with "
            f"--init-weights {resume} (its weights only)"
        )
    changed = [
        f"--{name.replace('_', '-')} {_show(getattr(base, name))} → {_show(getattr(candidate, name))}"
        for name in RESUME_GUARDED
        if name in updates and name in fields and getattr(candidate, name) != getattr(base, name)
    ]
    if changed and not allow_changes:
        raise ConfigError(
            f"--resume {resume}: this run was trained with other settings ({'; '.join(changed)}); "
            "leave those flags out to continue it as it was, start a new run, or pass --allow-config-change"
        )
    return candidate


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value) or "(none)"
    return display_path(value) if isinstance(value, str) and os.sep in value else str(value)


def display_path(path: str | os.PathLike[str]) -> str:
    """`path` relative to the working directory when that is shorter, else as given."""
    text = str(path)
    try:
        relative = os.path.relpath(text)
    except ValueError:  # another drive on Windows
        return text
    return relative if len(relative) < len(text) else text


def config_from_args(args: argparse.Namespace, config_class: type[_Config]) -> _Config:
    """A new run's settings from parsed flags (field names = flag names), validated, paths absolute."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    for key in ("val_subsets", "test_subsets"):
        if key in values:
            values[key] = tuple(values[key])
    if values.get("balance_ratio") is not None:
        values["balanced"] = True
    if "batch_size" in values:  # None: the default of the device (saved resolved, so a resume is exact)
        values["batch_size"] = resolve_batch_size(
            values["batch_size"], values.get("device", "auto"), config_class.batch_size, config_class.cuda_batch_size
        )
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    # a flag left at None whose setting has a value by default (e.g. --model-width, which a command may
    # complete from the checkpoint it loads first) takes that default
    values = {k: v for k, v in values.items() if v is not None or defaults[k] is None}
    config = config_class(**values)
    config.validate()
    return absolute_paths(config)


def explicit_settings(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """Only the settings given on the command line (flag dest → parsed value), defaults left out.

    parser: a fresh parser of the command (its defaults are overwritten here).
    """
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    if given.get("balance_ratio") is not None:
        given["balanced"] = True
    return given
