"""`bash benchmarks/gpu_suite.sh --smoke` on the CPU: every step runs, and lands in the JSON and the table."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
STEPS = [
    "env", "synth", "prefill", "loader", "cuda_tests", "training", "augment", "evaluate", "nodule_analysis",
    "time_to_cpm", "training_compile",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)


def run_suite(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, P2CH_PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(SUITE), *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600, check=False
    )


def figures(report: dict, step: str, unit: str) -> list:
    (entry,) = [s for s in report["steps"] if s["step"] == step]
    return [f["figure"] for f in entry["figures"] if f["unit"] == unit]


@pytest.mark.slow
def test_smoke_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    result = run_suite("--smoke", "--out", str(out), "--work", str(tmp_path / "work"))
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])

    report = json.loads((out / "gpu_suite.json").read_text(encoding="utf-8"))
    status = {s["step"]: s["status"] for s in report["steps"]}
    assert list(status) == STEPS
    present = (REPO / "benchmarks" / "time_to_cpm.py").is_file()
    expected = {step: "ok" for step in STEPS} | {"time_to_cpm": "ok" if present else "skipped: not present"}
    assert status == expected
    assert report["header"]["mode"] == "smoke" and report["header"]["device"] == "cpu"
    for step in STEPS:
        if status[step] == "ok":
            assert (out / "logs" / f"{step}.log").is_file()
            assert report["steps"][STEPS.index(step)]["commands"], step  # the log names what ran

    # the figures each step is there for were found in its output
    assert figures(report, "prefill", "chunks/s")[0] > 0
    assert len(figures(report, "loader", "samples/s")) == 3  # per-item, batched, reused; 1 worker
    assert figures(report, "cuda_tests", "tests")[0] >= 5  # the CUDA tests are still selected
    assert len(figures(report, "training", "samples/s")) == 1 and figures(report, "training", "samples/s")[0] > 0
    assert len(figures(report, "training_compile", "samples/s")) == 1
    assert len(figures(report, "augment", "samples/s")) == 2  # the book's config and flips only, batch 8
    assert len(figures(report, "evaluate", "candidates/s")) == 2  # warm cache and from the CTs
    assert len(figures(report, "nodule_analysis", "slices/s")) == 3  # lungs' box, whole CT, bf16 (CPU only)
    assert 0 <= figures(report, "nodule_analysis", "CPM")[0] <= 1
    if present:
        assert figures(report, "time_to_cpm", "samples") or figures(report, "time_to_cpm", "")

    table = (out / "gpu_suite.md").read_text(encoding="utf-8")
    assert "| step | settings | figure | unit | note |" in table
    for step in STEPS:
        assert f"| {step} |" in table
    assert (out / "gpu_suite.log").is_file()
    assert not list((tmp_path / "work").iterdir())  # the scratch run folder is removed


def test_bad_usage_exits_2_and_a_failed_step_is_recorded(tmp_path):
    assert run_suite("--smoke").returncode == 2  # --out missing
    assert run_suite("--out", str(tmp_path / "x"), "--steps", "nope").returncode == 2

    # CUDA asked for where there is none: the step fails, the suite goes on and says so
    out = tmp_path / "out"
    if torch.cuda.is_available():
        pytest.skip("checks a failing step: CUDA asked for where there is none")
    result = run_suite("--smoke", "--device", "cuda", "--steps", "augment", "--out", str(out), "--work", str(tmp_path))
    assert result.returncode == 1
    report = json.loads((out / "gpu_suite.json").read_text(encoding="utf-8"))
    status = {s["step"]: s["status"] for s in report["steps"]}
    assert status["env"] == "ok" and status["augment"] == "failed"
    assert {status[s] for s in STEPS if s not in ("env", "augment")} == {"skipped: not selected"}
    (augment,) = [s for s in report["steps"] if s["step"] == "augment"]
    assert any("CUDA is not available" in line for line in augment["log_tail"])
    assert "## augment: failed" in (out / "gpu_suite.md").read_text(encoding="utf-8")
