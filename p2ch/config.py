"""Default paths and their overrides: explicit argument, then environment variable, then default.

Nothing here runs at import time; every path is resolved when a command asks for it, so
`P2CH_DATA_ROOT=/big/disk/luna python -m p2ch.training` and `--data-root` both work.
Relative defaults are taken from the current working directory (run commands from the
repository root, as the README does).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

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
DEFAULT_BATCH_SIZE = 64  # candidates per forward pass in evaluation and prediction
SPLIT_MODES = ("series", "subset", "stride")  # see p2ch.datasets.split_candidates
SELECT_BY = ("cpm", "f1")  # the validation metric that picks best.pt
OPTIMIZERS = ("sgd", "adam")
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


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to an option's help unless the text already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower():
            return text
        return super()._get_help_string(action)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and --models-dir (a "model" group), as p2ch.predict and p2ch.evaluate spell them."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="checkpoint file, or a run folder (its newest best.pt) (default: the newest best.pt under --models-dir)",
    )
    g.add_argument(
        "--models-dir",
        default=None,
        help="where to look for the newest best.pt (default: $P2CH_MODELS_DIR or data-unversioned/models)",
    )


def add_inference_arguments(group: argparse._ArgumentGroup) -> None:
    """--batch-size, --device, --amp and --channels-last into `group` (the inference settings of make_scorer)."""
    group.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="candidates per forward pass")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="mixed precision: auto = bf16 on CUDA (fp16 if unsupported), off on the CPU",
    )
    group.add_argument(
        "--channels-last",
        choices=("on", "off"),
        default="on",
        help="channels_last_3d memory format for the model and batches",
    )


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Every setting of a training run; saved with each checkpoint and logged once."""

    comment: str = "dwlpt"
    # data
    data_root: str | None = None
    cache_dir: str | None = None
    width_irc: tuple[int, int, int] = (32, 48, 48)
    # split
    split: str = "series"
    val_fraction: float = 0.1
    val_stride: int | None = None
    val_subsets: tuple[int, ...] = (9,)
    test_fraction: float = 0.0
    test_subsets: tuple[int, ...] = ()
    # sampling
    balanced: bool = False
    balance_ratio: int | None = None
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
    optimizer: str = "sgd"
    lr: float = 0.001
    momentum: float = 0.99
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    # speed
    amp: str = "auto"
    channels_last: str = "on"
    compile: bool = False
    device: str = "auto"
    sync_bn: bool = False
    # run control
    seed: int = 0
    val_every: int = 1
    max_train_batches: int | None = None
    max_val_batches: int | None = None
    select_by: str = "cpm"
    images_every: int = 5
    # output
    tb_prefix: str = "p2ch"
    runs_dir: str | None = None
    checkpoint_dir: str | None = None
    resume: str | None = None
    init_weights: str | None = None
    log_level: str = "INFO"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists) for checkpoints and hparams."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
        return cls(**clean)

    def validate(self) -> None:
        """Raise ConfigError naming the flag for any unusable value."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.split in SPLIT_MODES, f"--split {self.split!r}: expected one of {', '.join(SPLIT_MODES)}")
        need(self.select_by in SELECT_BY, f"--select-by {self.select_by!r}: expected one of {', '.join(SELECT_BY)}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        need(self.amp in AMP_MODES, f"--amp {self.amp!r}: expected one of {', '.join(AMP_MODES)}")
        need(self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}")
        need(self.num_workers >= 0, f"--num-workers must be ≥ 0, got {self.num_workers}")
        need(self.epochs >= 1, f"--epochs must be ≥ 1, got {self.epochs}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.weight_decay >= 0, f"--weight-decay must be ≥ 0, got {self.weight_decay}")
        need(self.val_every >= 1, f"--val-every must be ≥ 1, got {self.val_every}")
        need(self.images_every >= 0, f"--images-every must be ≥ 0, got {self.images_every}")
        need(
            self.balance_ratio is None or self.balance_ratio >= 1,
            f"--balance-ratio must be ≥ 1 negatives per positive, got {self.balance_ratio}",
        )
        need(self.epoch_size is None or self.epoch_size >= 1, f"--epoch-size must be ≥ 1, got {self.epoch_size}")
        for name in ("max_train_batches", "max_val_batches"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
        need(not (self.resume and self.init_weights), "use either --resume or --init-weights, not both")


# Settings that decide which data a run trains and validates on, and where it writes: a resumed
# run must keep them, or its metrics and best.pt no longer compare with the epochs before.
RESUME_GUARDED = (
    "data_root",
    "width_irc",
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
PATH_SETTINGS = ("data_root", "cache_dir", "runs_dir", "checkpoint_dir", "resume", "init_weights")


def absolute_paths(config: TrainingConfig) -> TrainingConfig:
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
    return dataclasses.replace(config, **{k: str(v.absolute()) if v else None for k, v in resolved.items()})


def resume_config(
    saved: dict[str, Any], given: dict[str, Any], resume: str, allow_changes: bool = False
) -> TrainingConfig:
    """The settings of a resumed run: the checkpoint's, updated by the flags given on the command line.

    saved: the checkpoint's config dict. given: only the settings set explicitly now (flag → value,
    field names). A given value of a `RESUME_GUARDED` setting that differs from the checkpoint's
    raises ConfigError naming each change, unless `allow_changes`. Paths compare as absolute.
    """
    try:
        base = absolute_paths(TrainingConfig.from_dict(saved))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--resume {resume}: the settings stored in the checkpoint are unusable ({exc})") from None
    fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    updates = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in given.items()
        if k in fields and k not in ("resume", "init_weights")
    }
    candidate = absolute_paths(dataclasses.replace(base, **updates, resume=resume, init_weights=None))
    candidate.validate()
    changed = [
        f"--{name.replace('_', '-')} {_show(getattr(base, name))} → {_show(getattr(candidate, name))}"
        for name in RESUME_GUARDED
        if name in updates and getattr(candidate, name) != getattr(base, name)
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
