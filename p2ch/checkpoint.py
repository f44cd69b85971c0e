"""Checkpoints: plain dicts of tensors and plain values, written atomically, loaded weights-only.

Writing and reading (`save_checkpoint`, `load_checkpoint`, `find_latest`) serve training;
finding and loading a trained model (`resolve_checkpoint`, `load_model`, `CheckpointInfo`;
`load_segmentation_model` for the UNet) serve evaluation and prediction.

A checkpoint is what `torch.load(path, weights_only=True)` can read without executing code:
model and optimizer state dicts, GradScaler state, RNG states as tensors, counters, the run's
config as a dict of str/int/float/bool/list, and library versions. It is written to a temporary
file in the same folder, flushed to disk, then renamed over the target, so a crash (or SIGKILL)
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy
import torch

from p2ch import __version__
from p2ch.config import (
    BOOK_MODEL_WIDTH,
    PREDATING_VALUES,
    TASKS,
    SegTrainingConfig,
    TrainingConfig,
    resolve_models_dir,
)
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError
from p2ch.fileio import atomic_writer
from p2ch.model import MODEL_ARCH, LunaModel, arch_signature
from p2ch.unet import UNET_ARCH, UNetWrapper, unet_signature

CHECKPOINT_FORMAT = "p2ch-checkpoint-v1"
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
# What each task's model is, and the command that trains it (for messages).
TASK_TRAINED_BY = {
    "nodule": "python -m p2ch.training",
    "malignancy": "python -m p2ch.training --malignant",
    "segmentation": "python -m p2ch.seg_training",
}


def versions() -> dict[str, str]:
    """Versions of p2ch, torch, numpy and Python, as saved in checkpoints and metrics.json."""
    return {
        "p2ch": str(__version__),
        "torch": str(torch.__version__),
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
    }


def sha1_of(path: str | os.PathLike[str]) -> str:
    """SHA1 of a file's bytes (40 hex digits), read in 1 MiB blocks."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Write `state` (plus format tag and versions) to `path` atomically; return its SHA1."""
    payload = {"format": CHECKPOINT_FORMAT, "versions": versions(), **state}
    with atomic_writer(path) as handle:
        torch.save(payload, handle)
    return sha1_of(path)


def load_checkpoint(path: str | os.PathLike[str], *, arch: str | None = None) -> dict[str, Any]:
    """Load a p2ch checkpoint with `weights_only=True` (no code runs) onto the CPU.

    With `arch`, refuse a checkpoint of another model architecture with a clear message.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        first_line = (str(exc).strip().splitlines() or [""])[0]  # torch's messages run to a page
        raise DataFormatError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first_line})") from None
    if isinstance(state, dict) and "model_state" in state and "format" not in state:
        raise DataFormatError(
            f"{path}: a model file of the book's code (model_state, model_name {state.get('model_name')!r}), not a "
            f"p2ch checkpoint; import it first: python -m p2ch.import_book_models {path}"
        )
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise DataFormatError(f"{path}: not a p2ch checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    if arch is not None and state.get("arch") != arch:
        raise ConfigError(
            f"{path}: checkpoint is for model architecture {state.get('arch')!r}{trained_width_note(state)}, this "
            f"model is {arch!r}; start a new run instead of --resume/--init-weights with it"
        )
    return state


def saved_model_width(state: dict[str, Any]) -> int | None:
    """The --model-width a LunaModel checkpoint was trained with (8, the book's, when it predates the flag);
    None for other architectures."""
    if not str(state.get("arch", "")).startswith(MODEL_ARCH):
        return None
    config = state.get("config")
    return (config if isinstance(config, dict) else {}).get("model_width", PREDATING_VALUES["model_width"])


def source_model_width(path: str | os.PathLike[str]) -> int | None:
    """The --model-width of the LunaModel checkpoint at `path` (one that --finetune or --init-weights will
    load); None where it is missing, unreadable or another architecture: loading it later, after the
    run's flags are checked, says what is wrong."""
    try:
        return saved_model_width(load_checkpoint(path))
    except (DataNotFoundError, DataFormatError):
        return None


def saved_block_order(state: dict[str, Any]) -> str | None:
    """The UNet block order ("p2ch" or "book") a segmentation checkpoint's config records ("p2ch" when it predates
    the setting); None for other architectures."""
    if not str(state.get("arch", "")).startswith(UNET_ARCH):
        return None
    config = state.get("config")
    return (config if isinstance(config, dict) else {}).get("block_order", "p2ch")


def source_block_order(path: str | os.PathLike[str]) -> str | None:
    """The block order of the UNet checkpoint at `path` (one that seg_training's --init-weights will load, e.g. one
    imported from the book); None where it is missing, unreadable or another architecture: loading it later, after
    the run's flags are checked, says what is wrong."""
    try:
        return saved_block_order(load_checkpoint(path))
    except (DataNotFoundError, DataFormatError):
        return None


def _width_note(width: int | None, how: str = "") -> str:
    """' (<how>--model-width N)', or '' where there is no width (not a LunaModel): says why architectures differ."""
    return "" if width is None else f" ({how}--model-width {width})"


def trained_width_note(state: dict[str, Any]) -> str:
    """' (trained with --model-width N)' for a LunaModel checkpoint, '' for others."""
    return _width_note(saved_model_width(state), "trained with ")


def find_latest(checkpoint_dir: str | os.PathLike[str], name: str = BEST_NAME, task: str | None = None) -> Path:
    """The most recently written `name` (best.pt or last.pt) anywhere under `checkpoint_dir`.

    task: only checkpoints of that task ("nodule", "malignancy", "segmentation"; see `task_of`), so
    that the newest model of each kind can be found in one models folder; None: any.
    """
    root = Path(checkpoint_dir)
    found = sorted(root.rglob(name), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    for path in reversed(found):
        if task is None:
            return path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged or foreign file is not a model of this kind; keep looking
            continue
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT and task_of(state) == task:
            return path
    kind = f" of a {task} model" if task else ""
    trained_by = TASK_TRAINED_BY.get(task or "nodule", "python -m p2ch.training")
    raise DataNotFoundError(
        f"no {name}{kind} under {root}; train first ({trained_by}), import the book's trained models "
        "(python -m p2ch.import_book_models), or pass the checkpoint's path"
    )


# ---------------------------------------------------------------------------------------------
# finding and loading a trained model (evaluation, prediction)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a loaded checkpoint says about itself (for reports and metrics.json).

    path: absolute path; sha1: of the file; config: the training run's settings. imported_from: for a model
    imported from the book's files (`p2ch.bookmodels`), the source file's name, SHA1, epoch, samples; else None.
    """

    path: Path
    sha1: str
    arch: str
    task: str
    epoch: int | None
    samples_seen: int | None
    run_time: str | None
    selected_by: str | None
    best_metric: float | None
    config: TrainingConfig
    versions: dict[str, str]
    imported_from: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no config; a non-finite best_metric becomes None)."""
        best = self.best_metric
        return {
            "path": str(self.path),
            "sha1": self.sha1,
            "arch": self.arch,
            "task": self.task,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "run_time": self.run_time,
            "selected_by": self.selected_by,
            "best_metric": best if best is not None and math.isfinite(best) else None,
            "versions": dict(self.versions),
            "imported_from": self.imported_from,
        }


def resolve_checkpoint(
    checkpoint: str | os.PathLike[str] | None, models_dir: str | os.PathLike[str] | None, task: str | None = None
) -> Path:
    """The checkpoint file to use.

    checkpoint: a .pt file, or a folder (then the newest best.pt under it); None: the newest
    best.pt under `models_dir` (argument, else $P2CH_MODELS_DIR, else data-unversioned/models).
    task: when searching, only checkpoints of this task (see `find_latest`); a file given by path is
    returned as it is (the loader then refuses a wrong kind with a message).
    Raises DataNotFoundError naming the path and how to get a checkpoint.
    """
    if checkpoint is not None and str(checkpoint) != "":
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            return find_latest(path, task=task).absolute()
        if not path.is_file():
            raise DataNotFoundError(
                f"--checkpoint {path}: no such file or folder; pass a best.pt or last.pt written by "
                "python -m p2ch.training (or its run folder), or leave --checkpoint out to use the newest "
                "best.pt under --models-dir"
            )
        return path.absolute()
    return find_latest(resolve_models_dir(models_dir), task=task).absolute()


def task_of(state: dict[str, Any]) -> str:
    """What a checkpoint's model does: "nodule", "malignancy" or "segmentation".

    The checkpoint's `task` entry; checkpoints written before tasks existed are told apart by their
    architecture (a UNet segments, a LunaModel classifies nodules).
    """
    task = state.get("task")
    if isinstance(task, str) and task:
        return task
    config = state.get("config")
    if isinstance(config, dict) and isinstance(config.get("task"), str):
        return config["task"]
    return "segmentation" if str(state.get("arch", "")).startswith(UNET_ARCH) else "nodule"


def check_task(path: str | os.PathLike[str], state: dict[str, Any], expected: str, use: str) -> None:
    """ConfigError unless the checkpoint's model does `expected`; `use` names what wanted it (e.g. "--finetune")."""
    found = task_of(state)
    if found != expected:
        raise ConfigError(
            f"{path}: this is a {found} model (trained by {TASK_TRAINED_BY.get(found, 'another command')}); "
            f"{use} needs a {expected} model (trained by {TASK_TRAINED_BY[expected]})"
        )


def load_model(
    path: str | os.PathLike[str], task: str | None = "nodule", use: str = "this command"
) -> tuple[LunaModel, CheckpointInfo]:
    """A `LunaModel` (CPU, eval mode) with the checkpoint's weights, and what the checkpoint says.

    task: the job the caller needs done ("nodule" or "malignancy"; None accepts either); `use` names the
    caller in the refusal (e.g. "python -m p2ch.predict"). Refuses
    (ConfigError) a checkpoint of another task or architecture (a segmentation model, say), and
    (DataFormatError) files that are not p2ch training checkpoints or whose weights or config do not load.
    """
    if task is not None and task not in TASKS:
        raise ConfigError(f"load_model: task {task!r}; expected one of {', '.join(TASKS)}")
    path = Path(path).absolute()
    state = _load_training_checkpoint(path)
    if task is not None or task_of(state) == "segmentation":
        check_task(path, state, task or "nodule", use)
    width = saved_model_width(state)
    try:
        model = LunaModel(conv_channels=BOOK_MODEL_WIDTH if width is None else width)
    except ConfigError as exc:
        raise DataFormatError(f"{path}: the checkpoint's model width is unusable ({exc})") from None
    found = state.get("arch")
    versions_found = {str(k): str(v) for k, v in (state.get("versions") or {}).items()}
    expected = arch_signature(model)
    if found != expected:
        raise ConfigError(
            f"{path}: checkpoint is for model architecture {found!r}, but this p2ch's LunaModel is {expected!r}; "
            f"score it with the p2ch version that trained it (p2ch {versions_found.get('p2ch', '?')}), or train anew"
        )
    missing = [key for key in ("model", "config") if not isinstance(state.get(key), dict)]
    if missing:
        raise DataFormatError(
            f"{path}: checkpoint has no {' or '.join(missing)} entry; expected a checkpoint written by "
            "python -m p2ch.training (best.pt or last.pt)"
        )
    load_weights(model, state["model"], path)
    try:
        config = TrainingConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"{path}: the training config stored in the checkpoint is unusable ({exc})") from None
    model.eval()
    return model, _checkpoint_info(path, state, config, versions_found)


def load_segmentation_model(
    path: str | os.PathLike[str], use: str = "this command"
) -> tuple[UNetWrapper, dict[str, Any]]:
    """A `UNetWrapper` (CPU, eval mode) rebuilt from a `python -m p2ch.seg_training` checkpoint, and its settings.

    Returns `(model, settings)`; settings: `context_slices` (int: the model takes 2c + 1 slices),
    `threshold` (float: the probability that counts as nodule in its validation; for a model imported from
    the book, the book's 0.5), `config` (the run's `SegTrainingConfig`; its `block_order` builds the book's
    UNet for imported weights) and `info` (a JSON-able dict like `CheckpointInfo.to_dict()`: path, sha1, arch,
    task, epoch, samples_seen, run_time, selected_by, best_metric, versions, imported_from). Refuses (ConfigError, one
    line) a checkpoint of another task (a nodule or malignancy classifier) or architecture, and
    (DataFormatError) files that are not p2ch checkpoints or whose config or weights do not fit. `use`
    names the caller in refusals.
    """
    path = Path(path).absolute()
    state = _load_training_checkpoint(path)
    check_task(path, state, "segmentation", use)
    missing = [key for key in ("model", "config") if not isinstance(state.get(key), dict)]
    if missing:
        raise DataFormatError(
            f"{path}: checkpoint has no {' or '.join(missing)} entry; expected a checkpoint written by "
            "python -m p2ch.seg_training (best.pt or last.pt)"
        )
    try:
        config = SegTrainingConfig.from_dict(state["config"])
        config.validate()
        model = UNetWrapper(
            in_channels=2 * config.context_slices + 1, n_classes=1, depth=config.depth, wf=config.wf,
            up_mode=config.up_mode, block_order=config.block_order,
        )  # fmt: skip
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise DataFormatError(f"{path}: the segmentation config stored in the checkpoint is unusable ({exc})") from None
    versions_found = {str(k): str(v) for k, v in (state.get("versions") or {}).items()}
    if state.get("arch") != unet_signature(model):
        raise ConfigError(
            f"{path}: checkpoint is for model architecture {state.get('arch')!r}, but its config builds "
            f"{unet_signature(model)!r}; use the p2ch version that trained it (p2ch {versions_found.get('p2ch', '?')})"
        )
    load_weights(model, state["model"], path)
    model.eval()
    info = {
        "path": str(path),
        "sha1": sha1_of(path),
        "arch": str(state.get("arch")),
        "task": task_of(state),
        **{key: _optional(state, key, int) for key in ("epoch", "samples_seen")},
        **{key: _optional(state, key, str) for key in ("run_time", "selected_by")},
        "best_metric": _optional(state, "best_metric", float),
        "versions": versions_found,
        "imported_from": _imported_from(state),
    }
    if info["best_metric"] is not None and not math.isfinite(info["best_metric"]):
        info["best_metric"] = None
    settings = {"context_slices": config.context_slices, "threshold": config.threshold, "config": config}
    return model, {**settings, "info": info}


def load_finetune_weights(
    model: torch.nn.Module, path: str | os.PathLike[str], width_irc: tuple[int, ...], head: str = "head_linear"
) -> dict[str, Any]:
    """Load a nodule classifier's weights into `model`, all but its head (the book's --finetune).

    The checkpoint must be a nodule-task LunaModel of this architecture, trained on chunks of
    `width_irc`; anything else (a segmentation model, a malignancy model, another width) is a
    ConfigError in one line. The head (`head`.*) keeps its fresh initialisation. Returns the checkpoint.
    """
    state = load_checkpoint(path)
    check_task(path, state, "nodule", "--finetune")
    if not str(state.get("arch", "")).startswith(MODEL_ARCH) or state.get("arch") != arch_signature(model):
        raise ConfigError(
            f"--finetune {path}: checkpoint is for model architecture {state.get('arch')!r}"
            f"{trained_width_note(state)}, this model is {arch_signature(model)!r}"
            f"{_width_note(getattr(model, 'conv_channels', None))}; fine-tune from a LunaModel trained by "
            "python -m p2ch.training with the same --model-width"
        )
    trained_width = tuple((state.get("config") or {}).get("width_irc") or ())
    if trained_width != tuple(width_irc):
        raise ConfigError(
            f"--finetune {path}: that model saw chunks of {list(trained_width)} voxels (index, row, col), this run "
            f"crops {list(width_irc)}; its features would not fit: train with the same --width-irc"
        )
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise DataFormatError(f"--finetune {path}: checkpoint has no model weights")
    body = {k: v for k, v in weights.items() if k.split(".", 1)[0] != head}
    try:
        missing, unexpected = model.load_state_dict(body, strict=False)
    except RuntimeError as exc:
        reason = ([line.strip() for line in str(exc).splitlines() if line.strip()] + [""])[1][:300]
        raise DataFormatError(f"--finetune {path}: the weights do not load ({reason})") from None
    stray = [k for k in missing if k.split(".", 1)[0] != head] + list(unexpected)
    if stray:
        raise DataFormatError(f"--finetune {path}: weights missing or unexpected: {', '.join(stray[:3])}")
    return state


def load_weights(model: torch.nn.Module, weights: Any, path: str | os.PathLike[str]) -> None:
    """Load a checkpoint's state dict into `model`, or DataFormatError naming the file and the first mismatch."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        # torch lists every mismatch on its own line after a header line: keep the first mismatch.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:300]
        raise DataFormatError(f"{path}: the model weights do not load into {type(model).__name__} ({reason})") from None


def _load_training_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return load_checkpoint(path)
    except DataFormatError as exc:
        if "not a readable checkpoint" not in str(exc):
            raise
        # torch's own message here is long and suggests weights_only=False, which would run code from the file.
        raise DataFormatError(
            f"{path}: not a checkpoint that torch.load(weights_only=True) can read; expected a best.pt or last.pt "
            "written by python -m p2ch.training"
        ) from None


def _imported_from(state: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's `imported_from` record (a plain dict; see `p2ch.bookmodels`), None for trained ones."""
    record = state.get("imported_from")
    return dict(record) if isinstance(record, dict) else None


def _optional(state: dict[str, Any], key: str, kind: type) -> Any:
    """state[key] as `kind` when it is a plain number or string (not a bool), else None."""
    value = state.get(key)
    return kind(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None


def _checkpoint_info(
    path: Path, state: dict[str, Any], config: TrainingConfig, versions_found: dict[str, str]
) -> CheckpointInfo:
    return CheckpointInfo(
        path=path,
        sha1=sha1_of(path),
        arch=str(state.get("arch")),
        task=task_of(state),
        epoch=_optional(state, "epoch", int),
        samples_seen=_optional(state, "samples_seen", int),
        run_time=_optional(state, "run_time", str),
        selected_by=_optional(state, "selected_by", str),
        best_metric=_optional(state, "best_metric", float),
        config=config,
        versions=versions_found,
        imported_from=_imported_from(state),
    )
