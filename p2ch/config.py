"""Default paths and their overrides: explicit argument, then environment variable, then default.

Nothing here runs at import time; every path is resolved when a command asks for it, so
`P2CH_DATA_ROOT=/big/disk/luna python -m p2ch.training` and `--data-root` both work.
Relative defaults are taken from the current working directory (run commands from the
repository root, as the README does).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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
