"""Time to CPM: training samples and wall seconds until the validation CPM reaches each target.

Samples/s alone hides what matters: how long until the model is good. For every recipe (a set of
`python -m p2ch.training` flags) this trains on one fixed synthetic set, validates every
--epoch-size samples, and records when the validation CPM (LUNA16's FROC score over the validation
CTs) first reaches each --target, or that the budget (--max-samples, --max-seconds) ran out first.
It prints, per recipe and target, the samples and wall seconds it took, the CPM's 95 % bootstrap
CI at that point (`p2ch.evaluate`, resampling the validation CTs), the ratio of every recipe to the
first one, and one JSON line last.

    python benchmarks/time_to_cpm.py                          # 48 CTs, targets 0.8 0.9, both built-in recipes
    python benchmarks/time_to_cpm.py --num-cts 24 --targets 0.5 0.7 --max-samples 8192   # ~10 min, 2 CPU cores
    python benchmarks/time_to_cpm.py --recipe "default=" --recipe "book=--optimizer sgd --lr 0.001 \\
        --momentum 0.99 --lr-schedule constant --batch-size 32 --model-width 8 --balanced --augmented"
    python benchmarks/time_to_cpm.py --max-samples 6144 --recipe "default=--balanced --augmented" \\
        --recipe "constant=--lr-schedule constant --lr 0.001 --balanced --augmented" \\
        --recipe "cosine=--lr-schedule cosine --balanced --augmented" \\
        --recipe "mixup=--mixup 0.2 --balanced --augmented"
    python benchmarks/time_to_cpm.py --smoke --work /tmp/ttc  # tiny, under a minute: does the tool work?

Built-in recipes (when no --recipe is given): "default" is p2ch's default flags (Adam, a one-cycle
lr peaking at 0.003, model width 16) plus --balanced --augmented; "book" is the book's recipe (SGD
lr 0.001 momentum 0.99, a constant lr, batch 32, the book's model width 8, balanced, all of the book's
augmentations). A recipe whose lr schedule ends (onecycle, the default, or cosine) and that leaves
out `--schedule-samples` gets `--schedule-samples` = this tool's --max-samples, the schedule of one
run of that length (the tool trains one epoch at a time, and a schedule's end is fixed when its run
starts); it may stop before the schedule ends, at its last target.
A recipe's flags go to `p2ch.training` unchanged but for that (flags a later version adds pass through); only
the flags that must be equal for every recipe (data, split, seed, epoch size, epochs, output
folders) are refused, since this tool sets them.

How: each recipe trains epoch by epoch in this process (`p2ch.training.main`: epoch 1 as a new
run, then `--resume last.pt --epochs E+1`, which continues exactly as one uninterrupted run
would), and after each epoch reads the validation CPM from the run's TensorBoard events
(`froc/cpm`). At a target (and at the end) it scores that epoch's last.pt with
`p2ch.evaluate --split val --bootstrap B` for the CI.

Measured ("wall s"): wall time of the `p2ch.training.main` calls only, so per epoch the run's set-up
(data index, model, DataLoader workers), the training pass and the validation pass. A single
uninterrupted run would set up once, so "train s" is also given: the training passes alone (their
samples / samples/s, from TensorBoard). Excluded from both: making the synthetic set, prefilling
the chunk cache (once, before the first recipe), reading events and checkpoints, and the
bootstrap evaluations (imports happen before any clock runs; the first recipe still pays the
one-off warm-ups of the first training call, about a second on a CPU). Samples are counted at the
validation where the target was first met, so their resolution is --epoch-size.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_RECIPES = {
    "default": "--balanced --augmented",
    "book": "--optimizer sgd --lr 0.001 --momentum 0.99 --lr-schedule constant --batch-size 32 --model-width 8 "
    "--balanced --augmented",
}
# Settings this tool fixes for every recipe (p2ch.training's argparse dests), so recipes compare.
FIXED_SETTINGS = {
    "data_root", "cache_dir", "split", "val_fraction", "val_stride", "val_subsets", "test_fraction",
    "test_subsets", "seed", "epoch_size", "epochs", "val_every", "runs_dir", "checkpoint_dir", "tb_prefix",
    "resume", "init_weights", "finetune", "malignant", "dataset", "max_train_batches", "max_val_batches",
    "comment",
}  # fmt: skip
SMOKE = {
    "num_cts": 4, "size": 96, "slices": 48, "nodules_per_ct": 3.0, "candidates_per_ct": 40,
    "epoch_size": 64, "max_samples": 128, "targets": [0.01, 0.99], "bootstrap": 100, "num_workers": 0,
}  # fmt: skip
# This tool's settings that the JSON line repeats.
REPORTED_SETTINGS = (
    "num_cts", "size", "slices", "nodules_per_ct", "candidates_per_ct", "data_seed", "val_fraction", "seed",
    "epoch_size", "max_samples", "max_seconds", "targets", "num_workers", "device", "bootstrap", "smoke",
)  # fmt: skip
CPM_TAG = "froc/cpm"
SPEED_TAG = "perf/samples_per_sec"


@dataclass
class Recipe:
    name: str
    flags: list[str]


@dataclass
class Point:
    """The state of a run after one epoch and its validation."""

    epoch: int
    samples: int
    wall_seconds: float  # training calls so far (set-up, training and validation passes)
    train_seconds: float  # training passes so far
    cpm: float


@dataclass
class RecipeResult:
    recipe: Recipe
    points: list[Point] = field(default_factory=list)
    reached: dict[float, dict] = field(default_factory=dict)  # target -> point + CI
    final: dict | None = None
    stopped_by: str = ""


# --- command line ------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--work", default="data-unversioned/time_to_cpm", help="folder for data, cache and runs")
    parser.add_argument("--data-root", default=None, help="an existing LUNA16-format set (default: <work>/luna)")
    parser.add_argument("--cache-dir", default=None, help="its chunk cache (default: <work>/cache)")
    synth = parser.add_argument_group(
        "synthetic set (made in <work>/luna when absent; the defaults are the set of BENCHMARKS.md's time-to-CPM "
        "figures: 34 training CTs with 212 nodules, 14 validation CTs with 98; with half the training CTs the CPM "
        "levelled off near 0.80, with twice as many it did not rise further)"
    )
    synth.add_argument("--num-cts", type=int, default=48)
    synth.add_argument("--size", type=int, default=256, help="rows and columns per slice")
    synth.add_argument("--slices", type=int, default=128)
    synth.add_argument("--nodules-per-ct", type=float, default=8.0)
    synth.add_argument("--candidates-per-ct", type=int, default=300)
    synth.add_argument("--data-seed", type=int, default=0)
    run = parser.add_argument_group("every recipe alike")
    run.add_argument(
        "--recipe",
        action="append",
        default=None,
        metavar="NAME=FLAGS",
        help="p2ch.training flags of a recipe, repeatable (default: the built-in 'default' and 'book')",
    )
    run.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9], help="validation CPMs to reach")
    run.add_argument("--epoch-size", type=int, default=1024, help="training samples between validations")
    run.add_argument("--max-samples", type=int, default=65536, help="budget per recipe: training samples")
    run.add_argument("--max-seconds", type=float, default=math.inf, help="budget per recipe: wall seconds")
    run.add_argument("--val-fraction", type=float, default=0.25, help="fraction of CTs in validation")
    run.add_argument("--seed", type=int, default=0, help="training seed (init, sampling, augmentation)")
    run.add_argument("--num-workers", type=int, default=min(os.cpu_count() or 1, 8), help="DataLoader workers")
    run.add_argument("--device", default="auto")
    run.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CPM's CI")
    parser.add_argument("--smoke", action="store_true", help="tiny set, 2 short epochs, low targets: < 1 minute")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if not args.targets or any(not 0 < t <= 1 for t in args.targets):
        parser.error(f"--targets {args.targets}: each must be a CPM in (0, 1]")
    args.targets = sorted(set(args.targets))
    if args.epoch_size < 1 or args.max_samples < args.epoch_size:
        parser.error(f"--epoch-size {args.epoch_size}, --max-samples {args.max_samples}: need 1 <= epoch size <= max")
    try:
        args.recipes = parse_recipes(args.recipe)
    except ValueError as exc:
        parser.error(str(exc))
    for recipe in args.recipes:
        complete_schedule(recipe, args.max_samples)
    return args


def complete_schedule(recipe: Recipe, max_samples: int) -> None:
    """A recipe whose lr schedule has an end (onecycle, cosine: p2ch's default is onecycle) and that does not
    set it gets `--schedule-samples max_samples`: the lr a single run of --max-samples would follow. (Each
    epoch here is its own resumed call, and a schedule's end is fixed by the call that starts the run.)"""
    from p2ch.training import get_args_parser as training_parser

    settings = training_parser().parse_args(recipe.flags)
    if settings.lr_schedule != "constant" and settings.schedule_samples is None:
        recipe.flags = [*recipe.flags, "--schedule-samples", str(max_samples)]


def parse_recipes(specs: list[str] | None) -> list[Recipe]:
    """`NAME=FLAGS` strings (shell-quoted flags) as recipes; ValueError for a bad name or a fixed flag."""
    if not specs:
        return [Recipe(name, shlex.split(flags)) for name, flags in DEFAULT_RECIPES.items()]
    recipes = []
    for spec in specs:
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise ValueError(f"--recipe {spec!r}: expected NAME=FLAGS with NAME of letters, digits, _ . + -")
        if name in {r.name for r in recipes}:
            raise ValueError(f"--recipe {spec!r}: recipe name {name!r} given twice")
        recipe = Recipe(name, shlex.split(flags))
        check_recipe_flags(recipe)
        recipes.append(recipe)
    return recipes


def check_recipe_flags(recipe: Recipe) -> None:
    """Refuse flags the training command does not know, and flags this tool fixes for every recipe."""
    from p2ch.config import explicit_settings  # imported here: keeps --help fast without torch
    from p2ch.training import get_args_parser as training_parser

    try:
        given = explicit_settings(training_parser(), recipe.flags)
    except SystemExit:  # argparse has printed why
        raise ValueError(f"--recipe {recipe.name}: p2ch.training refuses {shlex.join(recipe.flags)!r}") from None
    fixed = sorted(FIXED_SETTINGS & set(given))
    if fixed:
        raise ValueError(
            f"--recipe {recipe.name}: {', '.join(fixed)} must be the same for every recipe; set them with this "
            "tool's own flags (see --help) instead"
        )


# --- data --------------------------------------------------------------------------------------


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """(data root, cache dir): the synthetic set made when absent, the cache prefilled; both untimed."""
    from p2ch.prepcache import main as prepcache_main
    from p2ch.synth import generate

    cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
    if args.data_root:
        data = Path(args.data_root)
    else:
        data = work / "luna"
        settings = {k: getattr(args, k) for k in ("num_cts", "size", "slices", "nodules_per_ct", "candidates_per_ct")}
        settings["seed"] = args.data_seed
        stamp = work / "luna.json"
        if not data.exists():
            started = time.perf_counter()
            generate(data, **settings)
            stamp.write_text(json.dumps(settings, sort_keys=True) + "\n", encoding="utf-8")
            log(f"synthetic set {data}: {time.perf_counter() - started:.1f} s (not timed)")
        elif not stamp.is_file() or json.loads(stamp.read_text(encoding="utf-8")) != settings:
            raise SystemExit(
                f"error: {data} exists but was not made with these settings ({settings}); "
                "pass another --work, delete it, or pass --data-root"
            )
    started = time.perf_counter()
    argv = ["--data-root", str(data), "--cache-dir", str(cache), "--num-workers", str(max(args.num_workers, 1))]
    with contextlib.redirect_stdout(sys.stderr):
        rc = prepcache_main([*argv, "--log-level", "WARNING"])
    if rc != 0:
        raise SystemExit(f"error: prefilling the cache failed (exit {rc})")
    log(f"cache {cache} prefilled: {time.perf_counter() - started:.1f} s (not timed)")
    return data, cache


# --- one recipe --------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def read_events(runs_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """({step: validation CPM}, {step: training samples/s}) from a run's TensorBoard events; step = samples."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {"val": {}, "trn": {}}
    for mode, tag in (("val", CPM_TAG), ("trn", SPEED_TAG)):
        for folder in sorted(runs_dir.rglob(f"*-{mode}_*")):
            acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
            acc.Reload()
            if tag in acc.Tags().get("scalars", []):
                found[mode].update({e.step: e.value for e in acc.Scalars(tag)})
    return found["val"], found["trn"]


def score_with_ci(last_pt: Path, out: Path, args: argparse.Namespace) -> dict:
    """The CPM and its bootstrap CI of a checkpoint on its validation CTs (p2ch.evaluate; untimed)."""
    from p2ch.evaluate import main as evaluate_main

    argv = [
        "--checkpoint", str(last_pt), "--split", "val", "--bootstrap", str(args.bootstrap), "--out", str(out),
        "--num-workers", str(args.num_workers), "--device", args.device, "--no-progress", "--log-level", "WARNING",
    ]  # fmt: skip
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its report; stdout holds only this tool's table and JSON
        rc = evaluate_main(argv)
    if rc != 0:
        raise SystemExit(f"error: p2ch.evaluate {shlex.join(argv)} failed (exit {rc})")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    log(f"evaluated {last_pt} in {time.perf_counter() - started:.1f} s (not timed)")
    return {"eval_cpm": metrics["cpm"], "cpm_ci": metrics["cpm_ci"], "nodules": metrics["counts"]["nodules"],
            "scans": metrics["counts"]["scans"]}  # fmt: skip


def train_one_more_epoch(argv: list[str], models_dir: Path) -> tuple[float, Path]:
    """(wall seconds of the p2ch.training call, its last.pt)."""
    from p2ch.training import main as training_main

    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        rc = training_main(argv)
    seconds = time.perf_counter() - started
    if rc != 0:
        raise SystemExit(f"error: python -m p2ch.training {shlex.join(argv)} failed (exit {rc})")
    found = sorted(models_dir.rglob("last.pt"))
    if len(found) != 1:
        raise SystemExit(f"error: expected one last.pt under {models_dir}, found {len(found)}")
    return seconds, found[0]


def run_recipe(recipe: Recipe, args: argparse.Namespace, data: Path, cache: Path, out: Path) -> RecipeResult:
    """Train `recipe` epoch by epoch until every target is met or the budget is spent."""
    runs_dir, models_dir = out / "runs", out / "models"
    first = [
        "--data-root", str(data), "--cache-dir", str(cache), "--split", "series", "--val-fraction",
        str(args.val_fraction), "--seed", str(args.seed), "--epoch-size", str(args.epoch_size), "--val-every", "1",
        "--runs-dir", str(runs_dir), "--checkpoint-dir", str(models_dir), "--tb-prefix", "ttc",
        "--num-workers", str(args.num_workers), "--device", args.device, "--images-every", "0",
        "--log-level", "WARNING", recipe.name, *recipe.flags,
    ]  # fmt: skip
    result = RecipeResult(recipe)
    wall = train = 0.0
    max_epochs = args.max_samples // args.epoch_size
    for epoch in range(1, max_epochs + 1):
        resume = ["--resume", str(result.final["checkpoint"])] if result.final else first
        seconds, last_pt = train_one_more_epoch([*resume, "--epochs", str(epoch)], models_dir)
        wall += seconds
        cpms, speeds = read_events(runs_dir)
        samples = max(cpms, default=0)
        previous = result.points[-1].samples if result.points else 0
        train += (samples - previous) / speeds[samples] if speeds.get(samples) else math.nan
        point = Point(epoch, samples, round(wall, 2), round(train, 2), cpms.get(samples, math.nan))
        result.points.append(point)
        result.final = {**vars(point), "checkpoint": last_pt}
        log(f"{recipe.name}: epoch {epoch}, {samples:,} samples, {wall:.1f} s, CPM {point.cpm:.3f}")
        new = [t for t in args.targets if t not in result.reached and point.cpm >= t]
        if new:
            ci = score_with_ci(last_pt, out / "eval" / f"epoch{epoch}", args)
            result.reached.update({t: {**vars(point), **ci} for t in new})
        if len(result.reached) == len(args.targets):
            result.stopped_by = "all targets reached"
            break
        if wall >= args.max_seconds:
            result.stopped_by = f"--max-seconds {args.max_seconds:g}"
            break
    else:
        result.stopped_by = f"--max-samples {args.max_samples}"
    last = result.final
    assert last is not None  # max_epochs >= 1
    reached_now = next((r for r in result.reached.values() if r["epoch"] == last["epoch"]), None)
    ci = reached_now or score_with_ci(last["checkpoint"], out / "eval" / f"epoch{last['epoch']}", args)
    result.final = {**vars(result.points[-1]), **{k: ci[k] for k in ("eval_cpm", "cpm_ci", "nodules", "scans")}}
    return result


# --- report ------------------------------------------------------------------------------------


def finite(value):
    """`value` with every nan or infinite float as None (JSON has neither)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fmt_ci(ci: list) -> str:
    return "[" + ", ".join("nan" if v is None else f"{v:.3f}" for v in ci) + "]"


def ratios(results: list[RecipeResult], targets: list[float]) -> dict[str, dict[str, dict]]:
    """Each recipe against the first, per target: samples and seconds ratios (lower bounds when
    only the first recipe reached it: the other's budget is a floor), None when it cannot be said."""
    base, out = results[0], {}
    for other in results[1:]:
        per_target = {}
        for t in targets:
            a, b = base.reached.get(t), other.reached.get(t)
            if a is None:
                per_target[f"{t:g}"] = None
                continue
            ref = b or other.final
            per_target[f"{t:g}"] = {
                "samples": round(ref["samples"] / a["samples"], 2),
                "wall_seconds": round(ref["wall_seconds"] / a["wall_seconds"], 2),
                "train_seconds": round(ref["train_seconds"] / a["train_seconds"], 2),
                "lower_bound": b is None,
            }
        out[f"{other.recipe.name}/{base.recipe.name}"] = per_target
    return out


def print_report(results: list[RecipeResult], args: argparse.Namespace, ratio: dict) -> None:
    print(f"{'recipe':<12} {'target':>6} {'samples':>9} {'wall s':>8} {'train s':>8} {'CPM':>6}  95 % CI (val)")
    for res in results:
        for t in args.targets:
            r = res.reached.get(t)
            if r is None:
                f = res.final
                print(f"{res.recipe.name:<12} {t:>6.2f} {'not reached':>9} ({res.stopped_by}; at {f['samples']:,} "
                      f"samples, {f['wall_seconds']:.0f} s: CPM {f['cpm']:.3f} {fmt_ci(f['cpm_ci'])})")  # fmt: skip
            else:
                print(f"{res.recipe.name:<12} {t:>6.2f} {r['samples']:>9,} {r['wall_seconds']:>8.1f} "
                      f"{r['train_seconds']:>8.1f} {r['cpm']:>6.3f}  {fmt_ci(r['cpm_ci'])}")  # fmt: skip
    for res in results:
        curve = " ".join(f"{p.samples}:{p.cpm:.2f}" for p in res.points)
        print(f"CPM by samples, {res.recipe.name}: {curve}")
    for pair, per_target in ratio.items():
        parts = []
        for t, r in per_target.items():
            if r is None:
                parts.append(f"CPM {t}: n/a")
            else:
                ge = "≥" if r["lower_bound"] else ""
                parts.append(f"CPM {t}: {ge}{r['samples']:.2f}× samples, {ge}{r['wall_seconds']:.2f}× wall s")
        print(f"ratio {pair}: " + "; ".join(parts))


def summary_json(results: list[RecipeResult], args: argparse.Namespace, data: Path, ratio: dict) -> dict:
    def recipe_dict(res: RecipeResult) -> dict:
        return {
            "name": res.recipe.name,
            "flags": shlex.join(res.recipe.flags),
            "targets": {f"{t:g}": res.reached.get(t, "not reached") for t in args.targets},
            "final": res.final,
            "stopped_by": res.stopped_by,
            "curve": [vars(p) for p in res.points],
        }

    return {
        "bench": "time_to_cpm",
        "data_root": str(data),
        "settings": {k: getattr(args, k) for k in REPORTED_SETTINGS},
        "recipes": [recipe_dict(r) for r in results],
        "ratios": ratio,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for module in ("p2ch.training", "p2ch.evaluate"):  # imported before any clock runs (torch takes seconds)
        importlib.import_module(module)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, cache = prepare_data(args, work)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H.%M.%S")
    results = [run_recipe(r, args, data, cache, work / "runs" / stamp / r.name) for r in args.recipes]
    ratio = ratios(results, args.targets)
    print_report(results, args, ratio)
    print(json.dumps(finite(summary_json(results, args, data, ratio)), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
