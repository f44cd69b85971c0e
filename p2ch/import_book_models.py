"""`python -m p2ch.import_book_models`: the book's trained models as p2ch checkpoints, ready to analyse CTs.

    python -m p2ch.import_book_models ../dlwpt-code/data/part2/models/      # every model file of the folder
    python -m p2ch.import_book_models cls_2020-02-06_14.16.55_final-nodule-nonnodule.best.state --out my.pt
    python -m p2ch.nodule_analysis scan.mhd --models-dir data-unversioned/models/book

Each file the book's training apps saved (`torch.save` of a dict with `model_state`, `model_name`, …; its
repository's data/part2/models/ holds the final segmentation model and nodule classifier, trained on the whole
LUNA16) is read without running code, recognised by its tensors (`p2ch.bookmodels`), and written as
`<--out>/<name>/best.pt` (default `<models dir>/book/<name>/best.pt`, name = the file name without
`.best.state`): a weights-only p2ch checkpoint of task nodule, malignancy or segmentation, carrying the settings
the book's inference used (segmentation threshold 0.5, 7 input slices, (32, 48, 48) chunks, its split by series)
and where it came from (file name, SHA1, epoch, training samples, command line). `nodule_analysis`, `evaluate`
and `predict` then find them as the newest best.pt of each kind, or take them by path; `seg_training
--init-weights` continues training the book's UNet.

Every input and output is checked before anything is written: a file that is not the book's (not a torch file,
a pickle that would run code, no model_state, an unknown model_name, tensors that fit no known layout) is one
line naming it, and an existing output is refused unless --force. Files found in a folder that are not models
p2ch can rebuild (the book's folder also holds older experiments) are skipped, each with a line saying why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from p2ch.bookmodels import BOOK_SUBDIR, BookModel, find_book_files, model_file_name, recognise
from p2ch.checkpoint import BEST_NAME, save_checkpoint
from p2ch.cli import configure_logging, run_cli
from p2ch.config import DefaultsHelpFormatter, check_output_file, display_path, resolve_models_dir
from p2ch.errors import ConfigError, DataFormatError, DataNotFoundError

PROG = "python -m p2ch.import_book_models"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Import the trained models of Deep Learning with PyTorch (its data/part2/models/*.state: the "
        "segmentation UNet and the nodule classifier trained on LUNA16) as p2ch checkpoints that nodule_analysis, "
        "evaluate and predict use like their own.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Example: python -m p2ch.import_book_models ../dlwpt-code/data/part2/models/; then: "
        "python -m p2ch.nodule_analysis scan.mhd --models-dir data-unversioned/models/book",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="the book's model files, or folders holding them (their *.state files; others are skipped with a reason)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default=None, metavar="DIR|FILE.pt",
        help="folder to write <name>/best.pt into, or one .pt file when importing one file (default: "
        f"<--models-dir>/{BOOK_SUBDIR})",
    )  # fmt: skip
    parser.add_argument(
        "--models-dir", default=None, help="models folder (default: $P2CH_MODELS_DIR or data-unversioned/models)"
    )
    parser.add_argument(
        "--task", choices=("nodule", "malignancy"), default=None,
        help="what the classifier files (LunaModel) classify (default: malignancy when the file's recorded command "
        "line has --malignant, else nodule); segmentation files are always segmentation",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="overwrite outputs that exist")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def input_files(paths: Sequence[str]) -> list[tuple[Path, bool]]:
    """(file, named): each file given, and the *.state files of each folder given (named False: skippable)."""
    files = []
    for spec in paths:
        path = Path(spec).expanduser()
        if path.is_dir():
            files += [(found, False) for found in find_book_files(path)]
        elif path.is_file():
            files.append((path, True))
        else:
            raise DataNotFoundError(
                f"{path}: no such file or folder; pass the book's model files or its data/part2/models folder"
            )
    return files


def output_paths(files: Sequence[Path], out: str | None, models_dir: str | None, force: bool) -> list[Path]:
    """Where each file's checkpoint goes, every one checked writable (and new, unless `force`) before any is read."""
    if out is not None and out.endswith(".pt"):
        if len(files) != 1:
            raise ConfigError(
                f"--out {out} names one file, but {len(files)} model files were given; give a folder for --out"
            )
        targets = [Path(out).expanduser()]
    else:
        root = Path(out).expanduser() if out is not None else resolve_models_dir(models_dir) / BOOK_SUBDIR
        targets = [root / model_file_name(path) / BEST_NAME for path in files]
    seen: dict[Path, Path] = {}
    for source, target in zip(files, targets, strict=True):
        if target in seen:
            raise ConfigError(f"{seen[target]} and {source} would both be imported to {target}; import them apart")
        seen[target] = source
        check_output_file(target, "--out")
        if target.exists() and not force:
            raise ConfigError(f"--out {target} exists; pass --force to overwrite it, or choose another --out")
    return targets


def recognise_all(files: Sequence[tuple[Path, bool]], task: str | None) -> tuple[list[BookModel | None], list[str]]:
    """(each file recognised, why files were skipped): a file found in a folder that is not a model p2ch can
    rebuild is None, with its reason; a file named on the command line must be one."""
    books: list[BookModel | None] = []
    skipped = []
    for path, named in files:
        try:
            books.append(recognise(path, task=task))
        except DataFormatError as exc:
            if named:
                raise
            books.append(None)
            skipped.append(str(exc))
    if not any(books):
        raise DataFormatError(
            f"none of the {len(files)} files is a model p2ch can rebuild (first: {skipped[0]}); expected the book's "
            "LunaModel or UNetWrapper files"
        )
    return books, skipped


def run(args: argparse.Namespace) -> int:
    """Import every model given; print one line per model and how to use them."""
    files = input_files(args.paths)
    targets = output_paths([path for path, _ in files], args.out, args.models_dir, args.force)
    books, skipped = recognise_all(files, args.task)
    lines = [f"skipped {reason}" for reason in skipped]
    for book, target in zip(books, targets, strict=True):
        if book is None:
            continue
        sha1 = save_checkpoint(book.checkpoint_state(), target)
        lines.append(
            f"{book.source.name} (sha1 {book.sha1[:12]}) → {display_path(target)}: {book.describe()}; sha1 {sha1[:12]}"
        )
    lines.append(usage_line(books, targets, args.out is not None and args.out.endswith(".pt")))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


ANALYSIS_FLAGS = {
    "segmentation": "--segmentation-path",
    "nodule": "--classification-path",
    "malignancy": "--malignancy-path",
}


def usage_line(books: Sequence[BookModel | None], targets: Sequence[Path], one_file: bool) -> str:
    """How to analyse a CT with what was imported: by its models folder, or (one file) by the model's flag."""
    command = "python -m p2ch.nodule_analysis <series uid | scan.mhd | DICOM folder>"
    if one_file:
        book = next(b for b in books if b is not None)
        return f"use it by path: {command} {ANALYSIS_FLAGS[book.task]} {display_path(targets[0])}"
    folders = sorted({display_path(t.parent.parent) for b, t in zip(books, targets, strict=True) if b is not None})
    return f"analyse a CT with them: {command} --models-dir {folders[0] if len(folders) == 1 else '<folder>'}"


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(args.log_level)
    return run_cli(PROG, lambda: run(args), "interrupted; the models imported so far are complete files")


if __name__ == "__main__":
    sys.exit(main())
