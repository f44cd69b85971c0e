"""benchmarks/time_to_cpm.py works: recipes parse, fixed flags are refused, --smoke reports every recipe and target."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "time_to_cpm.py"


def load_tool():
    return load_script("benchmarks/time_to_cpm.py")


def test_built_in_recipes_are_the_default_and_the_books():
    recipes = load_tool().parse_recipes(None)
    assert [r.name for r in recipes] == ["default", "book"]
    assert recipes[0].flags == ["--balanced", "--augmented"]
    book = recipes[1].flags
    assert book[book.index("--optimizer") + 1] == "sgd"
    assert book[book.index("--lr") + 1] == "0.001"
    assert book[book.index("--momentum") + 1] == "0.99"
    assert book[book.index("--batch-size") + 1] == "32"
    assert book[book.index("--lr-schedule") + 1] == "constant" and book[book.index("--model-width") + 1] == "8"
    assert {"--balanced", "--augmented"} <= set(book)


def test_a_schedule_with_an_end_gets_the_budget_as_its_horizon():
    args = load_tool().parse_args(["--max-samples", "8192", "--epoch-size", "1024"])
    default, book = args.recipes  # the default recipe's one-cycle lr, as one run of 8,192 samples would have it
    assert default.flags == ["--balanced", "--augmented", "--schedule-samples", "8192"]
    assert "--schedule-samples" not in book.flags  # a constant lr has no end
    own = ["--lr-schedule", "cosine", "--schedule-samples", "4096"]
    args = load_tool().parse_args(["--recipe", f"own={' '.join(own)}", "--recipe", "flat=--lr-schedule constant"])
    assert [r.flags for r in args.recipes] == [own, ["--lr-schedule", "constant"]]  # given, or no end: unchanged


def test_recipe_flags_pass_through_unchanged():
    recipes = load_tool().parse_recipes(["plain=", "adam=--optimizer adam --lr 3e-4 --label-smoothing 0.1"])
    assert [(r.name, r.flags) for r in recipes] == [
        ("plain", []),
        ("adam", ["--optimizer", "adam", "--lr", "3e-4", "--label-smoothing", "0.1"]),
    ]


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("a=--seed 3", "seed"),
        ("a=--epoch-size=64", "epoch_size"),
        ("a=--val-fraction 0.5 --balanced", "val_fraction"),
        ("a=--resume x.pt", "resume"),
        ("a=--no-such-flag", "refuses"),
        ("a b=--balanced", "NAME=FLAGS"),
        ("--balanced", "NAME=FLAGS"),
    ],
)
def test_recipes_that_would_not_compare_are_refused(spec, named):
    with pytest.raises(ValueError, match=named):
        load_tool().parse_recipes([spec])


def test_a_recipe_name_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        load_tool().parse_recipes(["a=--balanced", "a=--augmented"])


def test_a_synthetic_set_made_with_other_settings_is_not_reused(tmp_path):
    tool = load_tool()
    args = tool.parse_args(["--smoke", "--work", str(tmp_path)])
    (tmp_path / "luna").mkdir()
    (tmp_path / "luna.json").write_text(json.dumps({"num_cts": 99}), encoding="utf-8")
    with pytest.raises(SystemExit, match="not made with these settings"):
        tool.prepare_data(args, tmp_path)


def _check_point(point: dict, epoch_size: int, max_samples: int) -> None:
    assert point["samples"] > 0 and point["samples"] % epoch_size == 0 and point["samples"] <= max_samples
    assert point["samples"] == point["epoch"] * epoch_size
    assert 0 < point["train_seconds"] < point["wall_seconds"]
    # The tool's CPM (training's validation, from TensorBoard) and p2ch.evaluate's agree.
    assert point["eval_cpm"] == pytest.approx(point["cpm"], abs=1e-4)
    low, high = point["cpm_ci"]
    assert 0 <= low <= high <= 1
    assert point["scans"] >= 1 and point["nodules"] >= 1


@pytest.mark.slow
def test_smoke_run_reports_every_recipe_and_target(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["bench"] == "time_to_cpm"
    settings = summary["settings"]
    assert settings["smoke"] is True
    targets = [f"{t:g}" for t in settings["targets"]]
    epoch_size, max_samples = settings["epoch_size"], settings["max_samples"]
    assert [r["name"] for r in summary["recipes"]] == ["default", "book"]
    for recipe in summary["recipes"]:
        assert sorted(recipe["targets"]) == sorted(targets)
        curve = recipe["curve"]
        assert [p["samples"] for p in curve] == [epoch_size * (i + 1) for i in range(len(curve))]
        assert all(math.isfinite(p["cpm"]) for p in curve)
        for target, reached in recipe["targets"].items():
            if reached == "not reached":
                assert all(p["cpm"] < float(target) for p in curve)
                continue
            _check_point(reached, epoch_size, max_samples)
            first = next(p for p in curve if p["cpm"] >= float(target))
            assert (reached["samples"], reached["cpm"]) == (first["samples"], first["cpm"])
        _check_point(recipe["final"], epoch_size, max_samples)
        assert recipe["final"]["samples"] == curve[-1]["samples"]
        if "not reached" in recipe["targets"].values():
            assert recipe["final"]["samples"] == max_samples and recipe["stopped_by"] == f"--max-samples {max_samples}"
    assert set(summary["ratios"]) == {"book/default"}
    assert sorted(summary["ratios"]["book/default"]) == sorted(targets)
    # The table: a row per recipe and target before the JSON line.
    rows = [line.split() for line in lines[:-1]]
    assert sorted((r[0], r[1]) for r in rows if r and r[0] in ("default", "book")) == sorted(
        (name, f"{t:.2f}") for name in ("default", "book") for t in settings["targets"]
    )
