"""The GPU suite's bookkeeping: step records in, gpu_suite.json and gpu_suite.md out.

`benchmarks/gpu_suite.sh` calls it; it imports neither torch nor p2ch, so it works even when the
environment is broken (that is when its report matters most).

    python benchmarks/gpu_suite_report.py record LOGS STEP STATUS --rc N --seconds S --timeout T --settings TEXT
    python benchmarks/gpu_suite_report.py report OUT --mode full --device cuda --budget 480 --seconds 471
    python benchmarks/gpu_suite_report.py recipe benchmarks/time_to_cpm.py   # prints default=FLAGS

`record` appends one step (status ok / failed / timeout / skipped: why) to LOGS/steps.jsonl.
`report` reads that file and each step's log LOGS/STEP.log, takes every JSON line a benchmark
printed ({"bench": ...}) and the figures of the commands that print none (synth, prepcache,
pytest), and writes OUT/gpu_suite.json (everything), OUT/gpu_suite.md (the tables) and
OUT/gpu_suite.log (every step's log, end to end).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# The standing GPU targets, measured against the book's p2ch12 code on an H100.
BOOK_PREFILL_CHUNKS_PER_S = 4362
TARGET_PREFILL_CHUNKS_PER_S = 3 * BOOK_PREFILL_CHUNKS_PER_S
TARGET_TRAINING_SAMPLES_PER_S = 6000
FALLBACK_RECIPE = "default=--balanced --augmented"  # time_to_cpm.py's built-in "default"
TAIL_LINES = 25  # log lines kept in the report of a step that did not end well
LOG_LINES = 1000  # lines of each step's log copied into gpu_suite.log

Figure = dict  # {"settings": str, "figure": float | int | str, "unit": str, "note": str}


def figure(settings: str, value: float | int | str, unit: str, note: str = "") -> Figure:
    return {"settings": settings, "figure": value, "unit": unit, "note": note}


def json_records(text: str) -> list[dict]:
    """Every line of `text` that is a JSON object with a "bench" key, in order."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "bench" in value:
            records.append(value)
    return records


def _number(text: str) -> float:
    return float(text.replace(",", ""))


# --- figures of each step -------------------------------------------------------------------------


def env_figures(text: str, records: list[dict]) -> list[Figure]:
    out = []
    for r in records:
        if r["bench"] == "env":
            gpu = r.get("gpu") or "no CUDA GPU"
            settings = f"Python {r.get('python')}, torch {r.get('torch')}, CUDA {r.get('cuda')}, {gpu}"
            out.append(figure(settings, r.get("cpus", "?"), "CPUs", f"SimpleITK {r.get('simpleitk')}"))
    return out


def synth_figures(text: str, records: list[dict]) -> list[Figure]:
    match = re.search(r"written:\s+([\d,.]+) MB in ([\d.]+) s with (\d+) worker", text)
    cts = re.search(r"CTs:\s+(\d+) of (\S+)", text)
    if not match:
        return []
    mb, seconds = _number(match[1]), _number(match[2])
    settings = f"{cts[1]} CTs of {cts[2]}, {match[3]} workers" if cts else f"{match[3]} workers"
    return [figure(settings, round(mb / seconds, 1) if seconds else mb, "MB/s written", f"{mb:,.0f} MB in {seconds} s")]


def prefill_figures(text: str, records: list[dict]) -> list[Figure]:
    done = re.search(r"prefill done: (\d+) CTs, ([\d,]+) chunks written.*?; ([\d.]+) s, ([\d.,]+) MB/s of CT read, "
                     r"([\d.,]+) chunks/s", text)  # fmt: skip
    workers = re.search(r"--num-workers (\d+)", text)
    if not done:
        return []
    settings = f"{done[1]} CTs, {done[2]} chunks, {workers[1] if workers else '?'} workers, empty cache"
    return [
        figure(settings, _number(done[5]), "chunks/s", f"target ≥ {TARGET_PREFILL_CHUNKS_PER_S:,} (3× the book)"),
        figure(settings, _number(done[4]), "MB/s of CT read", f"{done[3]} s"),
    ]


def pytest_figures(text: str, records: list[dict]) -> list[Figure]:
    """Counts from pytest's last summary line (a run) or its `N/M tests collected` line (--collect-only)."""
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    if collected and "--collect-only" in text:
        return [figure("selected, --collect-only (smoke)", int(collected[1]), "tests")]
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b.* in ", line)]
    if not summary:
        return []
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary[-1])
    return [figure(kind, int(n), "tests") for n, kind in counts]


def training_figures(text: str, records: list[dict]) -> list[Figure]:
    compiled = "compile on" if "--compile on" in text else "compile off"
    out = []
    for r in records:
        if r["bench"] != "training":
            continue
        settings = (f"{r['device']}, amp {r['amp']}, ch-last {r['channels_last']}, batch {r['batch_size']}, "
                    f"workers {r['num_workers']}, {compiled}")  # fmt: skip
        note = f"data wait {100 * r['data_wait_fraction']:.0f} %, {r['samples']:,} samples in {r['seconds']} s"
        out.append(figure(settings, r["samples_per_sec"], "samples/s", note))
    return out


def augment_figures(text: str, records: list[dict]) -> list[Figure]:
    out = []
    for r in records:
        if r["bench"] != "augment":
            continue
        for row in r["results"]:
            settings = f"{r['device']}, {row['config']}, batch {row['batch_size']}, {r['dtype']}"
            speedup = row.get("speedup_vs_per_sample")
            note = f"{speedup}× a 1-thread per-sample CPU loop" if speedup else ""
            out.append(figure(settings, row["samples_per_s"], "samples/s", note))
    return out


def evaluate_figures(text: str, records: list[dict]) -> list[Figure]:
    out = []
    for r in records:
        if r["bench"] == "evaluate_warm_cache":
            settings = (f"warm cache, {r['device']}, amp {r['amp']}, batch {r['batch_size']}, "
                        f"workers {r['num_workers']}, ch-last {r['channels_last']}")  # fmt: skip
            out.append(figure(settings, r["candidates_per_sec"], "candidates/s", f"{r['candidates']:,} candidates"))
        elif r["bench"] == "predict_no_cache":
            settings = f"from the CTs, {r['device']}, amp {r['amp']}, batch {r['batch_size']}"
            out.append(figure(settings, r["candidates_per_sec"], "candidates/s", f"{r['candidates']:,} candidates"))
        elif r["bench"] == "evaluate_end_to_end":
            note = f"scoring {r['scoring_seconds']} s, {r['bootstrap']} bootstraps"
            out.append(figure("python -m p2ch.evaluate --split all", r["seconds"], "s", note))
    return out


def time_to_cpm_figures(text: str, records: list[dict]) -> list[Figure]:
    out = []
    for r in records:
        if r["bench"] != "time_to_cpm":
            continue
        for recipe in r.get("recipes", []):
            for target, reached in recipe.get("targets", {}).items():
                settings = f"recipe {recipe['name']} ({recipe['flags']}), CPM ≥ {target}"
                if not isinstance(reached, dict):
                    out.append(figure(settings, str(reached), "", recipe.get("stopped_by", "")))
                    continue
                cpm = reached.get("eval_cpm", reached.get("cpm"))
                ci = reached.get("cpm_ci") or []
                note = f"{reached.get('wall_seconds')} s wall" + (f", CPM {cpm:.3f}" if cpm is not None else "")
                note += f" [{ci[0]:.3f}, {ci[1]:.3f}]" if len(ci) == 2 else ""
                out.append(figure(settings, reached.get("samples"), "samples", note))
    return out


def nodule_analysis_figures(text: str, records: list[dict]) -> list[Figure]:
    out = []
    for r in records:
        if r["bench"] != "nodule_analysis":
            continue
        for label, timed in r.get("one_ct", {}).items():
            shape = "x".join(str(n) for n in timed.get("shape_irc", []))
            names = ("lungs", "segmentation", "grouping", "classification", "malignancy")
            steps = sum(timed.get(k, 0.0) for k in names)
            note = f"{steps:.2f} s per CT in its steps, {timed['total_command']:.1f} s the whole command"
            out.append(figure(f"segmentation, one {shape} CT, {label}", round(timed["segmentation_slices_per_s"], 1),
                              "slices/s", note))  # fmt: skip
        for variant in r.get("ablation", [])[:1]:
            froc = variant["froc"]
            note = "tiny smoke models: checks the pipeline, not its quality"
            out.append(figure(f"detection CPM, {variant['name']}", round(froc["cpm"], 3), "CPM", note))
    return out


def loader_figures(text: str, records: list[dict]) -> list[Figure]:
    out = []
    for r in records:
        if r["bench"] != "loader":
            continue
        for row in r["loader"]:
            settings = f"{row['path']}, batch {row['batch_size']}, workers {row['workers']}"
            note = f"{row['samples_per_s_per_worker']:,} per worker, {r['candidates']:,} candidates"
            out.append(figure(settings, row["samples_per_s"], "samples/s", note))
    return out


FIGURES: dict[str, Callable[[str, list[dict]], list[Figure]]] = {
    "env": env_figures,
    "synth": synth_figures,
    "prefill": prefill_figures,
    "loader": loader_figures,
    "cuda_tests": pytest_figures,
    "training": training_figures,
    "training_compile": training_figures,
    "augment": augment_figures,
    "evaluate": evaluate_figures,
    "nodule_analysis": nodule_analysis_figures,
    "time_to_cpm": time_to_cpm_figures,
}


# --- the report ----------------------------------------------------------------------------------


def read_steps(logs: Path) -> list[dict]:
    """The step records of LOGS/steps.jsonl, each with its log's commands, records, figures and tail."""
    steps_file = logs / "steps.jsonl"
    lines = steps_file.read_text(encoding="utf-8").splitlines() if steps_file.is_file() else []
    steps = []
    for line in lines:
        step = json.loads(line)
        log = logs / f"{step['step']}.log"
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        step["log"] = f"logs/{log.name}" if log.is_file() else None
        step["commands"] = [line[2:] for line in text.splitlines() if line.startswith("+ ")]
        step["records"] = json_records(text)
        try:
            step["figures"] = FIGURES.get(step["step"], lambda _t, _r: [])(text, step["records"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a benchmark changed its output
            step["figures"] = []
            step["figure_error"] = f"{type(exc).__name__}: {exc}"
        if step["status"] != "ok":
            step["log_tail"] = text.splitlines()[-TAIL_LINES:]
        steps.append(step)
    return steps


def targets(steps: list[dict], mode: str) -> list[dict]:
    """The issue's standing targets against the best figure measured for each."""

    def best(step_names: tuple[str, ...], unit: str, must: str = "") -> float | None:
        values = [
            f["figure"]
            for s in steps
            if s["step"] in step_names
            for f in s["figures"]
            if f["unit"] == unit and must in f["settings"] and isinstance(f["figure"], (int, float))
        ]
        return max(values) if values else None

    rows = [
        ("training, balanced + augmented, on CUDA", best(("training", "training_compile"), "samples/s", "cuda"),
         TARGET_TRAINING_SAMPLES_PER_S, "samples/s"),
        ("prefill, 16 workers (3× the book's 4,362)", best(("prefill",), "chunks/s"), TARGET_PREFILL_CHUNKS_PER_S,
         "chunks/s"),
    ]  # fmt: skip
    out = []
    for what, value, target, unit in rows:
        if mode == "smoke" or value is None:
            verdict = "not measured" + (" (smoke run)" if mode == "smoke" else "")
        else:
            verdict = "met" if value >= target else "not met"
        out.append({"what": what, "best": value, "target": target, "unit": unit, "verdict": verdict})
    return out


def fmt(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def cell(text: object) -> str:
    return fmt(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    head = report["header"]
    lines = [
        f"# p2ch GPU suite ({head['mode']}), {head['finished']}",
        "",
        f"Device {head['device']}; {head['seconds']} s of a {head['budget_s']} s budget; {head['machine']}.",
        "",
        "| step | status | seconds | timeout | settings |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    lines += [
        f"| {s['step']} | {cell(s['status'])} | {cell(s['seconds'])} | {cell(s['timeout_s'])} | {cell(s['settings'])} |"
        for s in report["steps"]
    ]
    lines += ["", "| step | settings | figure | unit | note |", "| --- | --- | ---: | --- | --- |"]
    for s in report["steps"]:
        if s["status"] == "skipped: not selected":
            continue
        rows = s["figures"] or [figure("–", s["status"], "", s.get("figure_error", ""))]
        lines += [
            f"| {s['step']} | {cell(f['settings'])} | {cell(f['figure'])} | {cell(f['unit'])} | {cell(f['note'])} |"
            for f in rows
        ]
    lines += ["", "| target | best | bar | verdict |", "| --- | ---: | ---: | --- |"]
    lines += [
        f"| {t['what']} | {fmt(t['best'])} {t['unit']} | ≥ {fmt(t['target'])} | {t['verdict']} |"
        for t in report["targets"]
    ]
    for s in report["steps"]:
        if s.get("log_tail") and s["status"] in ("failed", "timeout"):
            lines += ["", f"## {s['step']}: {s['status']} (last lines of {s['log']})", "", "```"]
            lines += [*s["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def machine_line(steps: list[dict]) -> str:
    for s in steps:
        for r in s["records"]:
            if r["bench"] == "env":
                return f"{r.get('gpu') or 'no CUDA GPU'}, {r.get('cpus')} CPUs, torch {r.get('torch')}"
    return "environment unknown (the env step did not report)"


def combined_log(steps: list[dict], logs: Path) -> str:
    parts = []
    for s in steps:
        log = logs / f"{s['step']}.log"
        text = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
        cut = f" (last {LOG_LINES} of {len(text)} lines)" if len(text) > LOG_LINES else ""
        parts += [f"===== {s['step']}: {s['status']}, {s['seconds']} s{cut}", *text[-LOG_LINES:], ""]
    return "\n".join(parts)


def write_report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    logs = out / "logs"
    steps = read_steps(logs)
    header = {
        "suite": "p2ch benchmarks/gpu_suite.sh",
        "mode": args.mode,
        "device": args.device,
        "budget_s": args.budget,
        "seconds": args.seconds,
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_line(steps),
    }
    report = {"header": header, "steps": steps, "targets": targets(steps, args.mode)}
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    text = markdown(report)
    (out / "gpu_suite.md").write_text(text, encoding="utf-8")
    (out / "gpu_suite.log").write_text(combined_log(steps, logs), encoding="utf-8")
    print(text)
    return 0


def record_step(args: argparse.Namespace) -> int:
    row = {
        "step": args.step,
        "status": args.status,
        "rc": args.rc,
        "seconds": args.seconds,
        "timeout_s": args.timeout,
        "settings": args.settings,
    }
    with open(Path(args.logs) / "steps.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return 0


def print_recipe(args: argparse.Namespace) -> int:
    """`default=FLAGS` of time_to_cpm.py's built-in default recipe (FALLBACK_RECIPE if it cannot say)."""
    try:
        spec = importlib.util.spec_from_file_location("time_to_cpm", args.script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)  # module level: the standard library only
        print(f"default={module.DEFAULT_RECIPES['default']}")
    except Exception as exc:  # any change there must not stop the suite
        print(f"gpu_suite_report: {args.script}: no DEFAULT_RECIPES['default'] ({exc}); using {FALLBACK_RECIPE!r}",
              file=sys.stderr)  # fmt: skip
        print(FALLBACK_RECIPE)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="append one step's outcome to LOGS/steps.jsonl")
    rec.add_argument("logs")
    rec.add_argument("step")
    rec.add_argument("status")
    rec.add_argument("--rc", type=int, default=None)
    rec.add_argument("--seconds", type=int, default=None)
    rec.add_argument("--timeout", type=int, default=None)
    rec.add_argument("--settings", default="")
    rec.set_defaults(run=record_step)
    rep = sub.add_parser("report", help="write OUT/gpu_suite.json, .md and .log")
    rep.add_argument("out")
    rep.add_argument("--mode", choices=("full", "smoke"), required=True)
    rep.add_argument("--device", default="?")
    rep.add_argument("--budget", type=int, default=None)
    rep.add_argument("--seconds", type=int, default=None)
    rep.set_defaults(run=write_report)
    rcp = sub.add_parser("recipe", help="print time_to_cpm.py's default recipe as NAME=FLAGS")
    rcp.add_argument("script")
    rcp.set_defaults(run=print_recipe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
