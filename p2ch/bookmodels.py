"""The book's trained model files (*Deep Learning with PyTorch*, part 2) read, recognised and turned into p2ch models.

The book's training apps save each model with `torch.save` as a plain dict: `model_state` (the state dict),
`model_name` ("LunaModel" or "UNetWrapper"), `optimizer_name`, `optimizer_state`, `epoch`,
`totalTrainingSamples_count`, and in later chapters `sys_argv` (the training command line) and `time`. Its
repository ships the final ones in `data/part2/models/`. `read_book_file` loads such a file with
`torch.load(weights_only=True, map_location="cpu")`, so no code in it runs and tensors saved on a GPU load
on any machine; `recognise` maps its weights onto p2ch's model of the same network, checking every tensor's
name and shape, and gives a `BookModel`, whose `checkpoint_state` is a p2ch checkpoint (weights only, no
optimizer state) that `p2ch.checkpoint.load_model` / `load_segmentation_model` load like a trained one.

Layouts (the book's code, read for these facts: util/unet.py, p2ch11-p2ch14 model.py, p2ch13/p2ch14 dsets.py
and training.py, p2ch14/nodule_analysis.py):

- LunaModel, chapter 12-14 names (`tail_batchnorm`, `block1..4.conv1/conv2`, `head_linear`): exactly p2ch's
  `LunaModel`; the width (conv channels of block1, 8 in the book) is read from the weights.
- LunaModel, chapter 11 names (`input_batchnorm`, `convAndPool_seq.N`, `fullyConnected_layer`): the same
  network (batch norm, four times conv-ReLU-conv-ReLU-max-pool, linear) under other names; mapped when every
  shape fits p2ch's model on (32, 48, 48) chunks, else refused naming the first tensor that does not.
- UNetWrapper (`input_batchnorm`, `unet.down_path.N.block.K`, `unet.up_path.N.up`, `…conv_block.block.K`,
  `unet.last`): the book's UNet, whose blocks are Conv2d with bias → ReLU → BatchNorm2d and whose levels are
  joined by average pooling: p2ch's `UNetWrapper(block_order="book")` with padding and batch norm; the
  input slices, depth, wf and up-sampling mode are read from the weights.

What the imported models need from the pipeline, as the book's inference did it, travels in the checkpoint's
config: the segmentation threshold (0.5: p2ch14/nodule_analysis.py keeps voxels with P > 0.5), the context
slices (3 either side: 7 input channels), the classifier's chunk (32, 48, 48) of HU clipped to [-1000, 1000],
and the book's split by series (every 10th series in sorted order validates; `--split series-stride`), so that
`evaluate` and `nodule_analysis --run-validation` score them on series they never trained on.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2ch.checkpoint import sha1_of
from p2ch.config import MAX_MODEL_WIDTH, SegTrainingConfig, TrainingConfig
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError
from p2ch.model import INPUT_SHAPE_IRC, LunaModel, arch_signature
from p2ch.unet import UNetWrapper, unet_signature

MODEL_NAMES = {"LunaModel": "nodule or malignancy classifier", "UNetWrapper": "segmentation model"}
BOOK_FILE_SUFFIX = ".state"  # the book's model files: <kind>_<time>_<comment>.<samples or best>.state
BOOK_SUBDIR = "book"  # imported models go to <models dir>/book/<name>/best.pt
BOOK_SEGMENTATION_THRESHOLD = 0.5  # p2ch14/nodule_analysis.py: mask = output > 0.5
BOOK_VAL_STRIDE = 10  # p2ch13/p2ch14 training: every 10th series (sorted) validates
IMPORTER = "python -m p2ch.import_book_models"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel, torch.compile
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_START = b"\x80"  # torch's legacy format (torch < 1.6, the book's era) starts with a pickle
_TIME_IN_NAME = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}\.\d{2}\.\d{2}")
# chapter 11's LunaModel: convAndPool_seq = 4 × (conv, ReLU, conv, ReLU, max-pool)
_OLD_LUNA_LAYERS = {
    f"convAndPool_seq.{5 * b + k}.": f"block{b + 1}.conv{k // 2 + 1}." for b in range(4) for k in (0, 2)
}
_OLD_LUNA_LAYERS.update({"input_batchnorm.": "tail_batchnorm.", "fullyConnected_layer.": "head_linear."})


@dataclasses.dataclass(frozen=True, eq=False)
class BookModel:
    """One recognised book file and the p2ch model it became.

    source: the file; sha1: of its bytes. model_name: the book's class name; layout: which naming (see the
    module docstring). task: "nodule", "malignancy" or "segmentation". model: the p2ch model (CPU, eval mode)
    holding the file's weights. config: the settings p2ch's loaders rebuild it from (`TrainingConfig` or
    `SegTrainingConfig`). record: the provenance saved as the checkpoint's `imported_from` (plain values).
    """

    source: Path
    sha1: str
    model_name: str
    layout: str
    task: str
    model: nn.Module
    config: TrainingConfig | SegTrainingConfig
    record: dict[str, Any]

    @property
    def arch(self) -> str:
        """The architecture signature p2ch's loaders check (`arch_signature` / `unet_signature`)."""
        if isinstance(self.model, UNetWrapper):
            return unet_signature(self.model)
        return arch_signature(self.model)

    def describe(self) -> str:
        """One line: what the model is, e.g. 'nodule classifier (LunaModel, width 8), epoch 20, 1,000,000 samples'."""
        if isinstance(self.model, UNetWrapper):
            s = self.model.settings
            what = (
                f"segmentation model (UNetWrapper, book block order, {s['in_channels']} input slices, depth "
                f"{s['depth']}, wf {s['wf']}, {s['up_mode']})"
            )
        else:
            what = f"{self.task} classifier (LunaModel, width {self.model.conv_channels})"
        epoch, samples = self.record.get("epoch"), self.record.get("samples_seen")
        return f"{what}, epoch {epoch if epoch is not None else '?'}, " + (
            f"{samples:,} training samples" if samples is not None else "training samples unknown"
        )

    def checkpoint_state(self) -> dict[str, Any]:
        """The p2ch checkpoint (for `p2ch.checkpoint.save_checkpoint`): weights, config, provenance; no optimizer
        state, so `--resume` refuses it and `--init-weights` takes it."""
        return {
            "arch": self.arch,
            "task": self.task,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "config": self.config.to_dict(),
            "epoch": self.record.get("epoch"),
            "samples_seen": self.record.get("samples_seen"),
            "run_time": self.record.get("run_time"),
            "selected_by": None,
            "best_metric": None,
            "imported_from": dict(self.record),
        }


def model_file_name(path: str | Path) -> str:
    """The name of an imported model: the file name without `.state` and a final `.best`
    ('cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state' → 'cls_2020-02-06_14.16.55_final-nodule-nonnodule')."""
    name = Path(path).name
    for suffix in (BOOK_FILE_SUFFIX, ".best"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def find_book_files(folder: str | Path) -> list[Path]:
    """The book's model files (`*.state`) directly in `folder`, sorted by name; DataNotFoundError when none."""
    folder = Path(folder)
    found = sorted(p for p in folder.glob(f"*{BOOK_FILE_SUFFIX}") if p.is_file())
    if not found:
        raise DataNotFoundError(
            f"{folder}: no *{BOOK_FILE_SUFFIX} files in this folder; pass the book's data/part2/models folder "
            "(in a clone of its repository) or the model files themselves"
        )
    return found


def read_book_file(path: str | Path) -> dict[str, Any]:
    """The dict a book model file holds, loaded with `weights_only=True` onto the CPU (no code runs).

    Refuses (DataFormatError, one line naming the file) what is not a torch file, a file whose loading would
    run code (never unpickled), a damaged one, and one that is not the book's dict with a `model_state`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{path}: no such file; pass the book's model files (its data/part2/models/*.state)")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise DataFormatError(
            f"{path}: a Git LFS pointer (a small text file), not the model itself; fetch the file (git lfs pull in "
            "the book's clone) and import it again"
        )
    head = head[:8]
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_START)):
        found = "it is empty" if not head else f"it starts with {head!r}"
        raise DataFormatError(
            f"{path}: not a file written by torch.save ({found}; expected a zip archive or torch's legacy pickle); "
            "pass the book's model files (data/part2/models/*.state)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign, damaged or code-carrying files
        raise DataFormatError(_load_failure(path, exc)) from None
    return _check_book_dict(path, state)


def _load_failure(path: Path, exc: Exception) -> str:
    """The one line for a file torch.load(weights_only=True) refused."""
    text = str(exc)
    needs = re.search(r"GLOBAL ([\w.]+)", text)
    if needs:
        return (
            f"{path}: loading it would run code (it refers to {needs.group(1)}), so it is refused and was not "
            "unpickled; the book's model files hold only tensors and plain values"
        )
    if "Unsupported operand" in text or "magic number" in text.lower():
        return (
            f"{path}: a pickle, but not one torch.save wrote; pass the book's model files (data/part2/models/*.state)"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")[:160]
    return f"{path}: torch cannot read it ({type(exc).__name__}: {first}); the file may be truncated: fetch it again"


def _check_book_dict(path: Path, state: Any) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise DataFormatError(
            f"{path}: holds a {type(state).__name__}; expected the dict the book's training apps save "
            "(model_state, model_name, epoch, …)"
        )
    if "model_state" not in state:
        keys = ", ".join(sorted(str(k) for k in state)[:6]) or "none"
        hint = "; it is a p2ch checkpoint already, load it directly" if "format" in state else ""
        raise DataFormatError(
            f"{path}: has no model_state entry (keys: {keys}); expected a model file saved by the book's "
            f"training apps{hint}"
        )
    weights = state["model_state"]
    if not isinstance(weights, Mapping) or not weights:
        found = "an empty state dict" if isinstance(weights, Mapping) else f"a {type(weights).__name__}"
        raise DataFormatError(f"{path}: model_state is {found}; expected a state dict of tensors")
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise DataFormatError(
                f"{path}: model_state entry {key!r} is a {type(value).__name__}; expected a state dict of tensors"
            )
    return state


def recognise(path: str | Path, *, task: str | None = None) -> BookModel:
    """Read a book model file and map it onto p2ch's model (see the module docstring).

    task: for a LunaModel, "nodule" or "malignancy"; None: "malignancy" when the file's `sys_argv` says
    `--malignant` (or MalignantLunaDataset), else "nodule". Ignored for a UNetWrapper (segmentation).
    Raises DataFormatError (one line naming the file) for an unknown model_name, non-finite weights, and
    weights that fit no known layout (naming the first tensor missing, extra or of the wrong shape).
    """
    path = Path(path)
    state = read_book_file(path)
    weights = _strip_prefixes(state["model_state"])
    model_name = _model_name(path, state, weights)
    _check_finite(path, weights)
    record = _record(path, state, model_name)
    settings = _training_settings(record, state.get("optimizer_state"))
    if model_name == "UNetWrapper":
        model, config, layout = _segmentation_model(path, weights, settings)
        task = "segmentation"
    else:
        if task is None:
            task = _task_from_argv(state.get("sys_argv"))
        elif task not in ("nodule", "malignancy"):
            raise ConfigError(f"task {task!r}: a LunaModel is a nodule or malignancy classifier")
        model, config, layout = _classifier_model(path, weights, settings, task)
    record["layout"] = layout
    return BookModel(path, record["sha1"], model_name, layout, task, model.eval(), config, record)


def _strip_prefixes(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in weights.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        stripped[name] = value
    return stripped


def _model_name(path: Path, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> str:
    """The file's model_name, checked; inferred from the tensor names when the file has none."""
    name = state.get("model_name")
    if name is None:
        if any(k.startswith("unet.") for k in weights):
            return "UNetWrapper"
        if any(k.startswith(("tail_batchnorm.", "block1.", "convAndPool_seq.")) for k in weights):
            return "LunaModel"
        raise DataFormatError(
            f"{path}: no model_name, and its tensors ({next(iter(weights))}, …) are neither a LunaModel's nor a "
            f"UNetWrapper's; p2ch can import {_known_names()}"
        )
    if name not in MODEL_NAMES:
        raise DataFormatError(f"{path}: model_name {name!r} is not a model p2ch can rebuild; expected {_known_names()}")
    return str(name)


def _known_names() -> str:
    return " or ".join(f"{name} ({what})" for name, what in MODEL_NAMES.items())


def _check_finite(path: Path, weights: dict[str, torch.Tensor]) -> None:
    for key, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise DataFormatError(f"{path}: tensor {key} holds nan or infinite values; the model is unusable")


def _plain(value: Any, kind: type) -> Any:
    """`value` as `kind` when it is a plain number or string of that kind (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def _record(path: Path, state: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Where an imported model came from (plain values only: the checkpoint stays weights-only loadable)."""
    argv = state.get("sys_argv")
    argv = [str(a) for a in argv] if isinstance(argv, (list, tuple)) else None
    run_time = _TIME_IN_NAME.search(path.name)
    return {
        "importer": IMPORTER,
        "file": path.name,
        "path": str(path.absolute()),
        "sha1": sha1_of(path),
        "bytes": path.stat().st_size,
        "model_name": model_name,
        "model_name_in_file": state.get("model_name") is not None,
        "epoch": _plain(state.get("epoch"), int),
        "samples_seen": _plain(state.get("totalTrainingSamples_count"), int),
        "optimizer_name": _plain(state.get("optimizer_name"), str),
        "sys_argv": argv,
        "time": _plain(state.get("time"), str),
        "run_time": run_time.group(0) if run_time else None,
    }


def _task_from_argv(argv: Any) -> str:
    words = [str(a) for a in argv] if isinstance(argv, (list, tuple)) else []
    malignant = any(w == "--malignant" or "MalignantLunaDataset" in w for w in words)
    return "malignancy" if malignant else "nodule"


def _training_settings(record: dict[str, Any], optimizer_state: Any) -> dict[str, Any]:
    """The recorded optimizer (name, lr, momentum, weight decay), augmentation flags and epochs, as config fields."""
    settings: dict[str, Any] = {"lr_schedule": "constant", "split": "series-stride", "val_stride": BOOK_VAL_STRIDE}
    name = (record.get("optimizer_name") or "").lower()
    if name in ("sgd", "adam"):
        settings["optimizer"] = name
    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
    group = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else {}
    checks = {"lr": lambda v: v > 0, "weight_decay": lambda v: v >= 0, "momentum": lambda v: 0 <= v < 1}
    for key, ok in checks.items():
        value = _plain(group.get(key), float)
        if value is not None and math.isfinite(value) and ok(value) and (key != "momentum" or name == "sgd"):
            settings[key] = value
    argv = record.get("sys_argv") or []
    for flag in ("augmented", "augment_flip", "augment_offset", "augment_scale", "augment_rotate", "augment_noise"):
        if "--" + flag.replace("_", "-") in argv:
            settings[flag] = True
    if record.get("epoch") is not None and record["epoch"] >= 1:
        settings["epochs"] = record["epoch"]
    return settings


def _renamed(key: str, renames: dict[str, str]) -> str:
    """`key` with the first of `renames`' prefixes it starts with replaced ('' prefixes never match)."""
    prefix = next((p for p in renames if key.startswith(p)), None)
    return renames[prefix] + key[len(prefix) :] if prefix else key


def _mapped_classifier_weights(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(weights under p2ch's names, p2ch name → the file's name for every p2ch name, layout) of a LunaModel."""
    expected = LunaModel().state_dict()  # the names only (width-independent)
    if not any(k.startswith("convAndPool_seq.") for k in weights):
        return dict(weights), {k: k for k in [*expected, *weights]}, "LunaModel (chapters 12-14 names)"
    back = {new: old for old, new in _OLD_LUNA_LAYERS.items()}
    mapped = {_renamed(key, _OLD_LUNA_LAYERS): value for key, value in weights.items()}
    names = {_renamed(key, _OLD_LUNA_LAYERS): key for key in weights}
    names.update({key: _renamed(key, back) for key in expected})
    return mapped, names, "LunaModel (chapter 11 names, mapped)"


def _classifier_model(
    path: Path, weights: dict[str, torch.Tensor], settings: dict[str, Any], task: str
) -> tuple[LunaModel, TrainingConfig, str]:
    mapped, names, layout = _mapped_classifier_weights(weights)
    first = mapped.get("block1.conv1.weight")
    if first is None or first.ndim != 5:
        found = "missing" if first is None else f"of shape {tuple(first.shape)}"
        raise DataFormatError(
            f"{path}: {names.get('block1.conv1.weight', 'block1.conv1.weight')} is {found}; a LunaModel's first "
            "convolution is a (width, 1, 3, 3, 3) tensor"
        )
    width = int(first.shape[0])
    if not 1 <= width <= MAX_MODEL_WIDTH:
        raise DataFormatError(f"{path}: LunaModel width {width}; p2ch builds widths 1…{MAX_MODEL_WIDTH}")
    model = LunaModel(conv_channels=width)
    mapped = _fill_batch_counts(mapped, model)
    what = f"LunaModel at width {width} on {INPUT_SHAPE_IRC} chunks"
    _check_layout(path, mapped, model.state_dict(), names, what)
    model.load_state_dict(mapped)
    config = TrainingConfig(
        comment=model_file_name(path),
        task=task,
        model_width=width,
        width_irc=INPUT_SHAPE_IRC,
        balanced=True,
        **settings,
    )
    config.validate()
    return model, config, layout


def _segmentation_model(
    path: Path, weights: dict[str, torch.Tensor], settings: dict[str, Any]
) -> tuple[UNetWrapper, SegTrainingConfig, str]:
    shape = _unet_shape(path, weights)
    step = 2 ** (shape["depth"] - 1)
    try:
        config = SegTrainingConfig(
            comment=model_file_name(path), context_slices=(shape["in_channels"] - 1) // 2, depth=shape["depth"],
            wf=shape["wf"], up_mode=shape["up_mode"], block_order="book", threshold=BOOK_SEGMENTATION_THRESHOLD,
            crop_size=max(64, step), **settings,
        )  # fmt: skip
        config.validate()
    except ConfigError as exc:
        raise DataFormatError(f"{path}: a UNetWrapper p2ch cannot rebuild ({exc})") from None
    model = UNetWrapper(
        in_channels=shape["in_channels"], n_classes=1, depth=config.depth, wf=config.wf, padding=True,
        batch_norm=True, up_mode=config.up_mode, block_order="book",
    )  # fmt: skip
    mapped = _fill_batch_counts(weights, model)
    what = f"the book's UNetWrapper (depth {config.depth}, wf {config.wf}, {config.up_mode}, batch norm, 1 class)"
    _check_layout(path, mapped, model.state_dict(), {k: k for k in mapped}, what)
    model.load_state_dict(mapped)
    return model, config, "UNetWrapper (the book's block order: conv+bias, ReLU, batch norm; average pooling)"


def _unet_shape(path: Path, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """in_channels, depth, wf and up_mode of a book UNetWrapper state dict, read from its tensors."""
    norm, first = weights.get("input_batchnorm.weight"), weights.get("unet.down_path.0.block.0.weight")
    for name, tensor, ndim in (("input_batchnorm.weight", norm, 1), ("unet.down_path.0.block.0.weight", first, 4)):
        if tensor is None or tensor.ndim != ndim:
            found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
            raise DataFormatError(f"{path}: {name} is {found}; expected the book's UNetWrapper layout")
    in_channels, filters = int(norm.shape[0]), int(first.shape[0])
    if in_channels % 2 == 0:
        raise DataFormatError(
            f"{path}: input_batchnorm.weight has {in_channels} channels; p2ch's segmentation takes 2c + 1 slices "
            "(the slice and c either side; the book's 7)"
        )
    if filters < 2 or filters & (filters - 1):
        raise DataFormatError(
            f"{path}: unet.down_path.0.block.0.weight has {filters} filters; expected 2**wf (the book's 16)"
        )
    levels = {int(m.group(1)) for k in weights if (m := re.match(r"unet\.down_path\.(\d+)\.", k))}
    upsample = any(k.startswith("unet.up_path.0.up.1.") for k in weights)
    return {
        "in_channels": in_channels,
        "wf": filters.bit_length() - 1,
        "depth": max(levels) + 1,
        "up_mode": "upsample" if upsample else "upconv",
    }


def _fill_batch_counts(weights: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`weights` with each batch norm's `num_batches_tracked` added where missing (torch < 0.4.1 had none; it is
    unused in evaluation)."""
    filled = dict(weights)
    for key in model.state_dict():
        if (
            key.endswith(".num_batches_tracked")
            and key not in filled
            and key.replace("num_batches_tracked", "weight") in filled
        ):
            filled[key] = torch.tensor(0, dtype=torch.long)
    return filled


def _check_layout(
    path: Path,
    found: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    names: dict[str, str],
    what: str,
) -> None:
    """DataFormatError naming the first tensor (in the model's order, by the file's name) that is missing, of
    another shape, or extra."""
    for key, tensor in expected.items():
        name = names.get(key, key)
        if key not in found:
            raise DataFormatError(
                f"{path}: no tensor {name} {tuple(tensor.shape)}; its weights fit no layout p2ch knows "
                f"(expected {what})"
            )
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise DataFormatError(
                f"{path}: tensor {name} has shape {tuple(found[key].shape)}, expected {tuple(tensor.shape)} for {what}"
            )
    extra = [k for k in found if k not in expected]
    if extra:
        raise DataFormatError(
            f"{path}: tensor {names.get(extra[0], extra[0])} {tuple(found[extra[0]].shape)} belongs to no layer of "
            f"{what}; its weights fit no layout p2ch knows"
        )
