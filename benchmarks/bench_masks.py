"""Nodule masks against synthetic truth: `p2ch.masks` (per-nodule labels) and the book's box rule.

Generates a synthetic set with true nodule masks (`p2ch.synth --masks`) in a temporary folder
(removed afterwards; or reads one made earlier with `--data-root`, same settings), builds each
annotation's mask with both rules, and prints per-nodule Dice (median, 10th percentile) and false
voxels per true voxel (false: in the built mask, in no true mask; summed over the nodules of a
group), for all nodules and split by kind (solid, part-solid, ground-glass) and size (< 5 mm,
>= 5 mm), then one JSON line.

    .venv/bin/python benchmarks/bench_masks.py
    .venv/bin/python benchmarks/bench_masks.py --jitter 0.3 --diameter-error 0.25
    .venv/bin/python benchmarks/bench_masks.py --setting rays=false --setting threshold_hu=-600

Ours: `p2ch.masks.ct_mask(..., labels=True)` with all of a CT's annotations at once (nodule k is
label k + 1). The book's rule has no labels, so it runs once per annotation. --jitter and
--diameter-error move the annotations as a reader's click and ruler might, to see how the rules
bear imprecise annotations (the truth stays where the nodules are).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from p2ch import synth
from p2ch.ct import Ct
from p2ch.errors import ConfigError
from p2ch.geometry import xyz2irc
from p2ch.masks import MASK_VERSION, MaskRule, book_mask, ct_mask

KINDS = ("solid", "part-solid", "ground-glass")
SMALL_MM = 5.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-cts", type=int, default=30)
    parser.add_argument("--size", type=int, default=synth.DEFAULT_SIZE)
    parser.add_argument("--slices", type=int, default=synth.DEFAULT_SLICES)
    parser.add_argument(
        "--nodules-per-ct", type=float, default=4.0, help="more than LUNA16's 1.3, for more nodules per second"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--direction", choices=tuple(synth.DIRECTIONS), default="identity")
    parser.add_argument("--workers", type=int, default=None, help="processes generating the set (default: all cores)")
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="move each annotation's centre by up to this fraction of its radius (a random direction)",
    )
    parser.add_argument(
        "--diameter-error",
        type=float,
        default=0.0,
        help="scale each annotation's diameter by a random factor in [1 - e, 1 + e]",
    )
    parser.add_argument(
        "--data-root", help="a set written by p2ch.synth --masks with these settings (default: make one)"
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a MaskRule setting for p2ch.masks (repeatable), e.g. rays=false or threshold_hu=-600",
    )
    return parser


def parse_settings(pairs: Sequence[str]) -> dict:
    """NAME=VALUE pairs → MaskRule keyword arguments, typed like the defaults ("none" for None)."""
    defaults = dataclasses.asdict(MaskRule())
    settings = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in defaults:
            raise SystemExit(f"--setting {pair!r}: expected NAME=VALUE, NAME one of {', '.join(defaults)}")
        default = defaults[name]
        if value.lower() == "none":
            settings[name] = None
        elif isinstance(default, bool):
            settings[name] = value.lower() in ("1", "true", "yes", "on")
        else:
            settings[name] = int(value) if isinstance(default, int) else float(value)
    try:
        MaskRule(**settings)
    except ConfigError as exc:
        raise SystemExit(f"--setting: {exc}") from None
    return settings


def perturb(found, rng: np.random.Generator, jitter: float, diameter_error: float):
    """Annotations as a reader might give them: centres moved up to jitter × radius, diameters scaled."""
    out = []
    for center, diameter in found:
        v = rng.normal(size=3)
        shift = v / np.linalg.norm(v) * jitter * diameter / 2 * rng.random() ** (1 / 3)
        out.append((center + shift, diameter * rng.uniform(1 - diameter_error, 1 + diameter_error)))
    return out


def read_annotations(root: Path) -> dict[str, list[tuple[np.ndarray, float]]]:
    """Per series uid, its annotations in file order: (centre xyz mm (3,), diameter mm)."""
    found: dict[str, list[tuple[np.ndarray, float]]] = {}
    with open(root / "annotations.csv", newline="") as f:
        for uid, x, y, z, diameter in list(csv.reader(f))[1:]:
            found.setdefault(uid, []).append((np.array([float(x), float(y), float(z)]), float(diameter)))
    return found


def measure_ct(ct: Ct, truth: np.ndarray, annotations, settings: dict) -> tuple[list[dict], dict[str, float]]:
    """Per nodule: true voxels, and Dice and false voxels for both rules; and seconds per rule.

    truth: (I, R, C) uint8 true labels; annotations: [(centre xyz mm (3,), diameter mm)] in file order.
    """
    centers_xyz = np.array([c for c, _ in annotations])
    centers_irc = xyz2irc(centers_xyz, ct.origin_xyz, ct.voxel_size_xyz, ct.direction, rounded=False)
    diameters = np.array([d for _, d in annotations])
    spacing_irc = tuple(ct.voxel_size_xyz)[::-1]
    rows = [{"true": int(np.count_nonzero(truth == k + 1))} for k in range(len(annotations))]
    seconds = {}
    started = time.perf_counter()
    ours = ct_mask(ct, centers_xyz, diameters, labels=True, **settings)
    seconds["ours"] = time.perf_counter() - started
    seconds["book"] = 0.0
    for k in range(len(annotations)):
        started = time.perf_counter()
        book = book_mask(ct.hu, centers_irc[k : k + 1], diameters[k : k + 1], spacing_irc)
        seconds["book"] += time.perf_counter() - started
        for rule, built in (("ours", ours == k + 1), ("book", book)):
            true = truth == k + 1
            both = int(np.count_nonzero(built & true))
            size = int(np.count_nonzero(built))
            rows[k][rule] = {
                "dice": 2 * both / (size + rows[k]["true"]),
                "false": int(np.count_nonzero(built & (truth == 0))),
            }
    return rows, seconds


def summarize(rows: list[dict], rule: str) -> dict:
    dice = np.array([r[rule]["dice"] for r in rows])
    false = sum(r[rule]["false"] for r in rows)
    true = sum(r["true"] for r in rows)
    return {
        "nodules": len(rows),
        "dice_median": round(float(np.median(dice)), 3) if len(rows) else None,
        "dice_p10": round(float(np.percentile(dice, 10)), 3) if len(rows) else None,
        "false_per_true": round(false / true, 3) if true else None,
    }


def groups(rows: list[dict]) -> dict[str, list[dict]]:
    out = {"all": rows}
    for kind in KINDS:
        out[kind] = [r for r in rows if r["kind"] == kind]
    out[f"< {SMALL_MM:g} mm"] = [r for r in rows if r["diameter_mm"] < SMALL_MM]
    out[f">= {SMALL_MM:g} mm"] = [r for r in rows if r["diameter_mm"] >= SMALL_MM]
    return out


def measure_set(
    root: Path, plans, settings: dict, jitter: float = 0.0, diameter_error: float = 0.0, seed: int = 0
) -> tuple[list[dict], dict[str, float]]:
    annotations = read_annotations(root)
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    seconds = {"ours": 0.0, "book": 0.0}
    for plan in plans:
        if not plan.nodules:
            continue
        found = perturb(annotations[plan.series_uid], rng, jitter, diameter_error)
        assert len(found) == len(plan.nodules), plan.series_uid
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(root / plan.mask_name)))
        ct_rows, ct_seconds = measure_ct(Ct(plan.series_uid, root), truth, found, settings)
        for row, nodule in zip(ct_rows, plan.nodules, strict=True):
            rows.append({**row, "kind": nodule.kind, "diameter_mm": nodule.diameter_mm})
        for rule in seconds:
            seconds[rule] += ct_seconds[rule]
    return rows, seconds


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    settings = parse_settings(args.setting)
    set_settings = dict(
        num_cts=args.num_cts,
        size=args.size,
        slices=args.slices,
        nodules_per_ct=args.nodules_per_ct,
        seed=args.seed,
        direction=args.direction,
        candidates_per_ct=20,
    )
    plans = synth.plan_dataset(**set_settings)
    work = None if args.data_root else Path(tempfile.mkdtemp(prefix="bench-masks-"))
    try:
        if work is not None:
            root = work / "luna"
            started = time.perf_counter()
            synth.generate(root, workers=args.workers, masks=True, **set_settings)
            print(f"generated {args.num_cts} CTs in {time.perf_counter() - started:.1f} s")
        else:
            root = Path(args.data_root)
        rows, seconds = measure_set(root, plans, settings, args.jitter, args.diameter_error, args.seed)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    results = {
        "bench": "masks",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "set": set_settings,
        "jitter": args.jitter,
        "diameter_error": args.diameter_error,
        "mask_version": MASK_VERSION,
        "rule": MaskRule(**settings).as_dict(),
        "seconds": {rule: round(value, 2) for rule, value in seconds.items()},
        "groups": {},
    }
    print(
        f"{len(rows)} nodules in {sum(bool(p.nodules) for p in plans)} CTs; mask rule v{MASK_VERSION} {settings or ''}"
    )
    print(
        f"{'group':<14} {'n':>4}   {'ours: Dice med':>14} {'p10':>6} {'false/true':>10}   {'book: Dice med':>14} "
        f"{'p10':>6} {'false/true':>10}"
    )
    for name, members in groups(rows).items():
        ours, book = summarize(members, "ours"), summarize(members, "book")
        results["groups"][name] = {"ours": ours, "book": book}
        if not members:
            continue
        print(
            f"{name:<14} {len(members):>4}   {ours['dice_median']:>14.3f} {ours['dice_p10']:>6.3f} "
            f"{ours['false_per_true']:>10.3f}   {book['dice_median']:>14.3f} {book['dice_p10']:>6.3f} "
            f"{book['false_per_true']:>10.3f}"
        )
    print(f"seconds building masks: ours {seconds['ours']:.2f}, book {seconds['book']:.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
