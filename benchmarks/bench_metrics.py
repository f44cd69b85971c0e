"""Metrics: LUNA16 FROC/CPM (matching, curve, bootstrap) and the per-epoch classification summary.

Builds a synthetic LUNA16-sized evaluation (scans, nodules, excluded findings, scored
predictions, a few percent of them hits) and times, on this machine:

- `match_predictions` (hit rule against annotations and excluded findings);
- `froc(bootstrap=0)` (matching + curve + CPM) and `froc(bootstrap=N)` (the confidence interval);
- `classification_summary` on N samples, on the CPU and, where present, on CUDA.

    .venv/bin/python benchmarks/bench_metrics.py
    .venv/bin/python benchmarks/bench_metrics.py --predictions 551065 --scans 888 --bootstrap 1000

Prints figures and one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from p2ch.errors import P2chError
from p2ch.metrics import classification_summary, froc, match_predictions


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=888, help="scans evaluated (LUNA16: 888)")
    parser.add_argument("--nodules", type=int, default=1186, help="annotated nodules (LUNA16: 1,186)")
    parser.add_argument(
        "--excluded",
        type=int,
        default=3000,
        help="excluded findings (a third with diameter -1), one prediction near each",
    )
    parser.add_argument("--predictions", type=int, default=100_000, help="scored predictions")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--samples", type=int, default=1_000_000, help="samples for classification_summary")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def synthetic_evaluation(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list]:
    rng = np.random.default_rng(args.seed)
    uids = np.array([f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{100000000000 + k}" for k in range(args.scans)])
    nodule_scan = rng.integers(0, args.scans, args.nodules)
    nodule_xyz = rng.uniform(-150, 150, (args.nodules, 3))
    diameter = rng.uniform(3.25, 32.3, args.nodules)
    annotations = pd.DataFrame(
        {
            "seriesuid": uids[nodule_scan],
            "coordX": nodule_xyz[:, 0],
            "coordY": nodule_xyz[:, 1],
            "coordZ": nodule_xyz[:, 2],
            "diameter_mm": diameter,
        }
    )
    excluded_scan = rng.integers(0, args.scans, args.excluded)
    excluded_xyz = rng.uniform(-150, 150, (args.excluded, 3))
    excluded_diameter = np.where(rng.random(args.excluded) < 1 / 3, -1.0, rng.uniform(1, 10, args.excluded))
    excluded = pd.DataFrame(
        {
            "seriesuid": uids[excluded_scan],
            "coordX": excluded_xyz[:, 0],
            "coordY": excluded_xyz[:, 1],
            "coordZ": excluded_xyz[:, 2],
            "diameter_mm": excluded_diameter,
        }
    )
    hits = min(args.predictions, 3 * args.nodules)
    hit_nodule = rng.integers(0, args.nodules, hits)
    hit_xyz = nodule_xyz[hit_nodule] + rng.normal(0, 1, (hits, 3)) * (diameter[hit_nodule, None] / 6)
    near = min(args.predictions - hits, args.excluded)
    near_xyz = excluded_xyz[:near] + rng.normal(0, 1, (near, 3))
    rest = args.predictions - hits - near
    xyz = np.concatenate([hit_xyz, near_xyz, rng.uniform(-150, 150, (rest, 3))])
    scan = np.concatenate([nodule_scan[hit_nodule], excluded_scan[:near], rng.integers(0, args.scans, rest)])
    # rounded to 4 decimals: ties, as a half-precision model output has
    probability = np.concatenate([rng.beta(5, 2, hits), rng.beta(2, 5, near), rng.beta(1, 8, rest)]).round(4)
    predictions = pd.DataFrame(
        {
            "seriesuid": uids[scan],
            "coordX": xyz[:, 0],
            "coordY": xyz[:, 1],
            "coordZ": xyz[:, 2],
            "probability": probability,
        }
    )
    return predictions, annotations, excluded, list(uids)


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        predictions, annotations, excluded, uids = synthetic_evaluation(args)
        figures: dict[str, object] = {
            "benchmark": "metrics",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "scans": args.scans,
            "nodules": args.nodules,
            "excluded": args.excluded,
            "predictions": args.predictions,
            "bootstrap": args.bootstrap,
        }
        figures["match_s"] = best_seconds(lambda: match_predictions(predictions, annotations, excluded), args.repeat)
        result = froc(predictions, annotations, excluded, uids, bootstrap=0)
        figures["froc_s"] = best_seconds(
            lambda: froc(predictions, annotations, excluded, uids, bootstrap=0), args.repeat
        )
        start = time.perf_counter()
        with_ci = froc(predictions, annotations, excluded, uids, bootstrap=args.bootstrap, seed=args.seed)
        figures["froc_bootstrap_s"] = time.perf_counter() - start
        figures["cpm"] = result.cpm
        figures["cpm_ci"] = list(with_ci.cpm_ci)
        figures["curve_points"] = len(result.fps_per_scan)
        print(
            f"{args.predictions:,} predictions on {args.scans} scans, {result.num_nodules} nodules, "
            f"{args.excluded} excluded findings: {result.num_hits:,} hits, "
            f"{result.num_excluded_predictions:,} excluded, {result.num_false_positives:,} FPs"
        )
        print(f"match_predictions        {figures['match_s'] * 1e3:9.1f} ms")
        print(f"froc, no bootstrap       {figures['froc_s'] * 1e3:9.1f} ms   CPM {result.cpm:.4f}")
        print(
            f"froc, {args.bootstrap:,} bootstraps  {figures['froc_bootstrap_s']:9.2f} s    "
            f"95% CI {with_ci.cpm_ci[0]:.4f}-{with_ci.cpm_ci[1]:.4f}"
        )

        gen = torch.Generator().manual_seed(args.seed)
        labels = torch.rand(args.samples, generator=gen) < 0.01
        probs = torch.rand(args.samples, generator=gen)
        losses = torch.rand(args.samples, generator=gen)
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            tensors = [t.to(device) for t in (labels, probs, losses)]

            def summary(tensors=tensors, device=device):
                classification_summary(*tensors)
                if device == "cuda":
                    torch.cuda.synchronize()

            summary()  # warm-up (CUDA context, kernels)
            seconds = best_seconds(summary, args.repeat)
            figures[f"summary_{device}_ms"] = seconds * 1e3
            print(f"classification_summary   {seconds * 1e3:9.1f} ms   ({args.samples:,} samples, {device})")
        print(json.dumps(figures))
        return 0
    except P2chError as exc:
        print(f"bench_metrics: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
