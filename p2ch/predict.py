"""`python -m p2ch.predict`: score candidate locations of CTs with a trained checkpoint, no cache needed.

    python -m p2ch.predict --series 1.3.6.1.4.1.14519.5.2.1.6279.6001.1051... --out scores.csv
    python -m p2ch.predict --candidates detector.csv --out scores.csv     # every CT the CSV names
    python -m p2ch.predict > scores.csv                                   # all candidates under the root

Each CT is loaded once (the next one is read in a background thread while the model scores
the current one), its candidates are cropped in memory and scored in batches, and the CT is
dropped: memory is two CTs plus one batch, and nothing is written to the chunk cache.

Candidates come from a CSV with the columns seriesuid, coordX, coordY, coordZ (mm); other
columns (LUNA16's `class`, a detector's `probability`) are ignored, so a detector's output can
be fed in as it is. The default is the data root's candidates.csv (or candidates_V2.csv).
The output has LUNA16's submission columns seriesuid, coordX, coordY, coordZ, probability, one
row per input row in input order, on stdout unless --out names a file.

Rows skipped (each counted in a warning on stderr, and absent from the output):
- rows of series that have no .mhd under the data root, when scoring every CT the CSV names
  (many users download only some subsets; with --series an absent CT is an error);
- rows whose centre lies outside its CT volume (`--outside error` makes this an error).

The work is library code: `p2ch.checkpoint` finds and loads the model, `p2ch.inference` scores.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from p2ch.checkpoint import CheckpointInfo, load_model, resolve_checkpoint
from p2ch.cli import configure_logging, run_cli
from p2ch.config import (
    DefaultsHelpFormatter,
    add_inference_arguments,
    add_model_arguments,
    check_output_file,
    inference_batch_size,
    resolve_data_root,
)
from p2ch.errors import ConfigError, DataNotFoundError
from p2ch.fileio import write_text_atomic
from p2ch.inference import (
    OUTSIDE_MODES,
    OutsideReport,
    PredictStats,
    Scorer,
    make_scorer,
    predict_locations,
    read_locations,
)
from p2ch.luna import LOCATION_COLUMNS, check_series_uid, find_candidates_file, find_mhd
from p2ch.runtime import configure_backends

log = logging.getLogger("p2ch.predict")

PROG = "python -m p2ch.predict"


def write_csv(frame: pd.DataFrame, out: str | os.PathLike[str]) -> None:
    """Write `frame` as CSV to `out` ("-": stdout) atomically (temporary file, then rename)."""
    if str(out) == "-":
        frame.to_csv(sys.stdout, index=False)
        sys.stdout.flush()
        return
    write_text_atomic(Path(out), frame.to_csv(index=False))


# ---------------------------------------------------------------------------------------------
# command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score candidate locations of CTs with a trained LunaModel checkpoint and write "
        "seriesuid,coordX,coordY,coordZ,probability as CSV. Loads each CT once; needs no chunk cache.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Examples: python -m p2ch.predict --series 1.3.6.1.4.1.14519.5.2.1.6279.6001.1051... "
        "--out one_ct.csv; python -m p2ch.predict --candidates detector.csv --out scores.csv "
        "(a CSV without a class column is fine)",
    )
    add_model_arguments(parser)
    _add_input_arguments(parser.add_argument_group("input"))
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="-", metavar="CSV", help="output CSV file; - writes to stdout")
    add_inference_arguments(parser.add_argument_group("speed"))
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (logs and the progress bar go to stderr)",
    )
    return parser


def _add_input_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--data-root",
        default=None,
        help="LUNA16-layout root with subset*/<uid>.mhd (default: the checkpoint's training data "
        "root, else $P2CH_DATA_ROOT or data-unversioned/part2/luna)",
    )
    g.add_argument(
        "--series",
        nargs="+",
        default=None,
        metavar="UID",
        help="score only these CTs (default: every CT under the root that the candidates CSV names)",
    )
    g.add_argument(
        "--candidates",
        default=None,
        metavar="CSV",
        help="candidate locations, columns seriesuid,coordX,coordY,coordZ (mm), others ignored "
        "(default: candidates.csv or candidates_V2.csv in the data root)",
    )
    g.add_argument(
        "--outside",
        choices=OUTSIDE_MODES,
        default="skip",
        help="candidates whose centre lies outside their CT: skip them (counted in a warning) or stop",
    )


def select_series(
    locations: pd.DataFrame, series: Sequence[str], data_root: Path, candidates_path: Path
) -> pd.DataFrame:
    """The rows of `locations` that belong to `series` (--series), index reset.

    Raises DataFormatError for a malformed uid, DataNotFoundError for a series without a .mhd
    under `data_root` or without rows in the candidates CSV.
    """
    wanted = list(dict.fromkeys(check_series_uid(uid.strip()) for uid in series))
    for uid in wanted:
        find_mhd(uid, data_root)
    present = set(locations["seriesuid"])
    absent = [uid for uid in wanted if uid not in present]
    if absent:
        more = f"; {len(absent)} of the requested series have none" if len(absent) > 1 else ""
        raise DataNotFoundError(
            f"series {absent[0]}: no candidates in {candidates_path} ({locations['seriesuid'].nunique()} "
            f"series listed there{more}); pass --candidates with this CT's candidate locations"
        )
    return locations[locations["seriesuid"].isin(wanted)].reset_index(drop=True)


def _log_start(locations: pd.DataFrame, candidates_path: Path, info: CheckpointInfo, scorer: Scorer) -> None:
    log.info(
        "scoring %d candidate(s) of %d series from %s with %s (epoch %s, sha1 %s) on %s, AMP %s",
        len(locations),
        locations["seriesuid"].nunique(),
        candidates_path,
        info.path,
        info.epoch,
        info.sha1[:12],
        scorer.device,
        scorer.amp_dtype or "off",
    )


def _log_done(stats: PredictStats, out: str) -> None:
    log.info(
        "scored %d candidate(s) of %d CT(s) in %.1f s (%.0f candidates/s); skipped %d outside their CT, "
        "%d of series not on disk%s",
        stats.scored,
        stats.cts,
        stats.seconds,
        stats.candidates_per_sec,
        stats.outside,
        stats.not_on_disk,
        "" if out == "-" else f"; wrote {out}",
    )


def predict(args: argparse.Namespace) -> int:
    """The command's work for parsed arguments: score, write the CSV, log the counts; returns 0."""
    args.batch_size = inference_batch_size(args.batch_size, args.device)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.out != "-":  # before the first CT is read
        check_output_file(args.out, "--out")
    checkpoint = resolve_checkpoint(args.checkpoint, args.models_dir, task="nodule")
    model, info = load_model(checkpoint, task="nodule", use=f"{PROG} (nodule probabilities for a submission)")
    data_root = resolve_data_root(args.data_root or info.config.data_root)
    candidates_path = Path(args.candidates) if args.candidates else find_candidates_file(data_root)
    locations = read_locations(candidates_path)  # row k is line k + 2 of the file (the header is line 1)
    locations["line"] = np.arange(2, len(locations) + 2)
    if args.series:
        locations = select_series(locations, args.series, data_root, candidates_path)
    lines = locations["line"].to_numpy()
    scorer = make_scorer(model, args.device, args.amp, args.channels_last)
    configure_backends(scorer.device, args.cudnn_benchmark == "on")
    _log_start(locations, candidates_path, info, scorer)
    probability, stats = predict_locations(
        scorer,
        data_root,
        locations,
        width_irc=info.config.width_irc,
        batch_size=args.batch_size,
        outside=args.outside,
        skip_missing_series=not args.series,
        report=OutsideReport(where=lambda row: f"{candidates_path}: line {lines[row]}"),
    )
    if stats.scored == 0:
        raise DataNotFoundError(
            f"none of the {stats.rows} candidate rows of {candidates_path} could be scored ({stats.not_on_disk} "
            f"of series without a .mhd under {data_root}/subset*/, {stats.outside} outside their CT); "
            "check --data-root and --candidates"
        )
    result = locations[list(LOCATION_COLUMNS)].assign(probability=probability)
    write_csv(result[np.isfinite(probability)].reset_index(drop=True), args.out)
    _log_done(stats, args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    configure_logging(args.log_level)
    return run_cli(PROG, lambda: predict(args), "interrupted; nothing written")


if __name__ == "__main__":
    sys.exit(main())
