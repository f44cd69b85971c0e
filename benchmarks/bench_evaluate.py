"""Inference throughput of `p2ch.evaluate` (from a warm chunk cache) and `p2ch.predict` (straight from the CTs).

On a synthetic LUNA16-format set made in a temporary folder (or --data-root), with a LunaModel
checkpoint of fresh weights (speed does not depend on the weights), it measures:

- evaluate: candidates/s of `score_from_cache` (cache → DataLoader → model) over every candidate,
  after the cache has been filled, for each --batch-sizes × --workers × --channels-last;
- predict: candidates/s of `predict_locations` (load each CT once, crop in memory, model; no cache)
  over the same candidates, and the share of its time spent reading CTs;
- end to end: seconds of one `python -m p2ch.evaluate --split all` (warm cache, 1,000 bootstraps,
  metrics, plot, files), for the first setting.

Each setting runs once untimed (warm-up: worker start, allocator, oneDNN/cuDNN kernels) and
--repeats times timed; the best rate is printed. A JSON line per figure goes to stderr.

Examples:
    python benchmarks/bench_evaluate.py --device cpu
    python benchmarks/bench_evaluate.py --device cuda --batch-sizes 64 256 1024 --workers 4 8 16 --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2ch.cache import ChunkCache
from p2ch.candidates import CandidateArrays, get_candidate_arrays, submission_frame
from p2ch.checkpoint import load_model, save_checkpoint
from p2ch.config import TrainingConfig
from p2ch.ct import Ct
from p2ch.evaluate import main as evaluate_main
from p2ch.inference import Scorer, make_scorer, predict_locations, score_from_cache
from p2ch.model import LunaModel, arch_signature
from p2ch.prefill import fill_missing
from p2ch.synth import generate

WIDTH_IRC = (32, 48, 48)


def make_checkpoint(path: Path, data_root: Path, cache_dir: Path) -> Path:
    torch.manual_seed(0)
    model = LunaModel()  # the book's width 8, as this benchmark's earlier figures (p2ch.training's default is 16)
    config = TrainingConfig(
        data_root=str(data_root), cache_dir=str(cache_dir), val_fraction=0.3, model_width=model.conv_channels
    )
    save_checkpoint(
        {
            "arch": arch_signature(model),
            "model": model.state_dict(),
            "epoch": 1,
            "config": config.to_dict(),
            "run_time": "bench",
        },
        path,
    )
    return path


def best_rate(fn, count: int, repeats: int) -> tuple[float, float]:
    """(best candidates/s, its seconds) over `repeats` timed calls of fn() after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best, best


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers (evaluate)")
    parser.add_argument("--channels-last", nargs="+", default=["on", "off"], choices=("on", "off"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-root", default=None, help="existing data set (default: a synthetic one)")
    parser.add_argument("--synth-cts", type=int, default=6)
    parser.add_argument("--synth-size", type=int, default=256, help="rows = columns of each synthetic CT")
    parser.add_argument("--synth-slices", type=int, default=128)
    parser.add_argument("--synth-candidates", type=int, default=300, help="candidates per synthetic CT")
    return parser


@dataclasses.dataclass(frozen=True)
class Setup:
    """The data set, warm cache and model every measurement shares.

    indices: (n,) int64 every candidate row, grouped by series. machine: the JSON fields of every figure.
    """

    args: argparse.Namespace
    tmp: Path
    data: Path
    checkpoint: Path
    candidates: CandidateArrays
    indices: np.ndarray
    cache: ChunkCache
    model: torch.nn.Module
    machine: dict[str, Any]


def make_setup(args: argparse.Namespace, tmp: Path) -> Setup:
    """Data (synthetic unless --data-root), a checkpoint, a filled cache; prints the header line."""
    if args.data_root:
        data = Path(args.data_root)
        described = str(data)
    else:
        data = tmp / "luna"
        generate(
            data,
            num_cts=args.synth_cts,
            size=args.synth_size,
            slices=args.synth_slices,
            candidates_per_ct=args.synth_candidates,
            nodules_per_ct=2,
            seed=0,
        )
        described = f"synthetic {args.synth_cts} CTs of {args.synth_slices}x{args.synth_size}x{args.synth_size}"
    checkpoint = make_checkpoint(tmp / "models" / "run" / "best.pt", data, tmp / "cache")
    candidates = get_candidate_arrays(data)
    indices = np.argsort(candidates.series_index, kind="stable").astype(np.int64)
    cache = ChunkCache(tmp / "cache", data)
    started = time.perf_counter()
    fill_missing(cache, candidates, indices, WIDTH_IRC, progress=False)
    prefill_seconds = time.perf_counter() - started
    model, _ = load_model(checkpoint)
    machine = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "data": described,
        "candidates": len(indices),
    }
    print(
        f"# {described}, {len(indices):,} candidates, {machine['cpus']} CPUs, torch {torch.__version__} "
        f"({machine['torch_threads']} threads); cache filled in {prefill_seconds:.1f} s"
    )
    return Setup(args, tmp, data, checkpoint, candidates, indices, cache, model, machine)


def _amp_name(scorer: Scorer) -> str:
    return str(scorer.amp_dtype).replace("torch.", "") if scorer.amp_dtype else "off"


def bench_evaluate(setup: Setup) -> None:
    """candidates/s of score_from_cache (warm cache) for each batch size × workers × channels_last."""
    args, count = setup.args, len(setup.indices)
    for batch, workers, cl in itertools.product(args.batch_sizes, args.workers, args.channels_last):
        scorer = make_scorer(setup.model, args.device, args.amp, cl)

        def run_eval(scorer=scorer, batch=batch, workers=workers):
            return score_from_cache(
                scorer,
                setup.candidates,
                setup.indices,
                setup.cache,
                width_irc=WIDTH_IRC,
                batch_size=batch,
                num_workers=workers,
                progress=False,
            )

        rate, seconds = best_rate(run_eval, count, args.repeats)
        amp = _amp_name(scorer)
        row = {
            "bench": "evaluate_warm_cache",
            **setup.machine,
            "device": str(scorer.device),
            "amp": amp,
            "batch_size": batch,
            "num_workers": workers,
            "channels_last": cl,
            "candidates_per_sec": round(rate, 1),
            "seconds": round(seconds, 3),
        }
        print(
            f"{'evaluate':>9} {row['device']:>7} {amp:>5} {batch:>7} {workers:>7} {cl:>7} {rate:>9.1f} {seconds:>8.2f}"
        )
        print(json.dumps(row), file=sys.stderr)


def bench_predict(setup: Setup) -> None:
    """candidates/s of predict_locations (straight from the CTs) for each batch size × channels_last."""
    args, count = setup.args, len(setup.indices)
    locations = submission_frame(setup.candidates, setup.indices, np.zeros(count))
    for batch, cl in itertools.product(args.batch_sizes, args.channels_last):
        scorer = make_scorer(setup.model, args.device, args.amp, cl)

        def run_predict(scorer=scorer, batch=batch):
            return predict_locations(scorer, setup.data, locations, batch_size=batch, progress=False)

        rate, seconds = best_rate(run_predict, count, args.repeats)
        load_start = time.perf_counter()
        for uid in np.unique(locations["seriesuid"]):
            Ct(str(uid), setup.data)
        load_seconds = time.perf_counter() - load_start
        amp = _amp_name(scorer)
        row = {
            "bench": "predict_no_cache",
            **setup.machine,
            "device": str(scorer.device),
            "amp": amp,
            "batch_size": batch,
            "channels_last": cl,
            "candidates_per_sec": round(rate, 1),
            "seconds": round(seconds, 3),
            "ct_read_seconds_sequential": round(load_seconds, 3),
        }
        print(
            f"{'predict':>9} {row['device']:>7} {amp:>5} {batch:>7} {'-':>7} {cl:>7} {rate:>9.1f} "
            f"{seconds:>8.2f}   (reading the CTs alone: {load_seconds:.2f} s)"
        )
        print(json.dumps(row), file=sys.stderr)


def bench_end_to_end(setup: Setup) -> None:
    """Seconds of one `python -m p2ch.evaluate --split all` (warm cache, 1,000 bootstraps), first setting."""
    args, out = setup.args, setup.tmp / "eval"
    argv_eval = [
        *("--checkpoint", str(setup.checkpoint), "--split", "all", "--out", str(out)),
        *("--device", args.device, "--amp", args.amp, "--batch-size", str(args.batch_sizes[0])),
        *("--num-workers", str(args.workers[0]), "--channels-last", args.channels_last[0]),
        *("--log-level", "WARNING", "--no-progress"),
    ]
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        rc = evaluate_main(argv_eval)
    seconds = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"evaluate failed ({rc})")
    scoring_seconds = json.loads((out / "metrics.json").read_text())["timing"]["scoring_seconds"]
    row = {
        "bench": "evaluate_end_to_end",
        **setup.machine,
        "seconds": round(seconds, 3),
        "scoring_seconds": scoring_seconds,
        "bootstrap": 1000,
    }
    print(
        f"end to end: python -m p2ch.evaluate --split all ({len(setup.indices):,} candidates, 1,000 bootstraps, "
        f"warm cache): {seconds:.2f} s, of which scoring {scoring_seconds:.2f} s"
    )
    print(json.dumps(row), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if torch.cuda.is_available():  # the same switch every command sets (p2ch.runtime)
        from p2ch.runtime import configure_backends

        configure_backends(torch.device("cuda"), cudnn_benchmark=True)
    with tempfile.TemporaryDirectory(prefix="p2ch-bench-evaluate-") as tmp_name:
        setup = make_setup(args, Path(tmp_name))
        print(
            f"{'what':>9} {'device':>7} {'amp':>5} {'batch':>6} {'workers':>7} {'ch-last':>7} {'cand/s':>9} "
            f"{'seconds':>8}"
        )
        bench_evaluate(setup)
        bench_predict(setup)
        bench_end_to_end(setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
