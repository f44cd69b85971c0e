import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(*args, env=None):
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_answer_help(script):
    assert run("-n", script).returncode == 0
    result = run(script, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout


def _value(output: str, prefix: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    assert lines, f"no line starting with {prefix!r}"
    return lines[0][len(prefix) :].strip()


def test_explore_counts(tiny_root):
    result = run(REPO / "scripts/explore_data.sh", tiny_root)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert _value(out, "total CTs:") == "2"
    assert _value(out, "positive (class 1):") == "3"
    assert _value(out, "negative (class 0):") == "4"
    assert _value(out, "series with candidates:") == "2"
    assert _value(out, "count").split()[:6] == ["2", "min", "5.00", "median", "7.50", "max"]
    assert _value(out, "named in CSVs:").split() == ["2", "on", "disk:", "2", "missing", "on", "disk:", "0"]
    top = [line.split() for line in out.split("== candidates per series (top 10)")[1].splitlines()[1:3]]
    assert [int(n) for n, _ in top] == [5, 2]


def test_explore_reports_missing_series_and_crlf(tiny_root):
    for path in (tiny_root / "subset1").iterdir():
        path.unlink()
    csv = tiny_root / "candidates.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes().replace(b"\n", b"\r\n"))
    result = run(REPO / "scripts/explore_data.sh", tiny_root)
    assert result.returncode == 0, result.stderr
    assert _value(result.stdout, "positive (class 1):") == "3"
    assert _value(result.stdout, "named in CSVs:").split()[-1] == "1"


def _quote_fields(line: str) -> str:
    """A CSV line with every field quoted, a quote inside doubled (as csv.QUOTE_ALL writes it)."""
    return ",".join('"' + field.replace('"', '""') + '"' for field in line.split(","))


def test_explore_reads_quoted_fields_and_crlf(tiny_root):
    """Quoted fields (which p2ch reads fine) gave 0 positives and every series missing on disk."""
    csv = tiny_root / "candidates.csv"
    header, *rows = csv.read_text().splitlines()
    # Columns in another order, a quoted header, quoted fields, spaces after a closing quote, CRLF.
    order = [4, 0, 1, 2, 3]
    lines = [",".join(line.split(",")[k] for k in order) for line in [header, *rows]]
    lines = [_quote_fields(lines[0])] + [_quote_fields(line).replace(",", "  ,", 1) for line in lines[1:]]
    csv.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    annotations = tiny_root / "annotations.csv"
    header, *rows = annotations.read_text().splitlines()
    annotations.write_text("\n".join([header, *(_quote_fields(row) for row in rows)]) + "\n")
    result = run(REPO / "scripts/explore_data.sh", tiny_root)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert _value(out, "positive (class 1):") == "3"
    assert _value(out, "negative (class 0):") == "4"
    assert _value(out, "series with candidates:") == "2"
    assert _value(out, "count").split()[:6] == ["2", "min", "5.00", "median", "7.50", "max"]
    assert _value(out, "series with nodules:") == "1"
    assert _value(out, "named in CSVs:").split() == ["2", "on", "disk:", "2", "missing", "on", "disk:", "0"]
    top = [line.split() for line in out.split("== candidates per series (top 10)")[1].splitlines()[1:3]]
    assert [int(n) for n, _ in top] == [5, 2]
    assert result.stderr == ""


def test_explore_quoted_commas_and_unsupported_quoting(tiny_root):
    csv = tiny_root / "candidates.csv"
    header, *rows = csv.read_text().splitlines()
    uid = rows[0].split(",")[0]
    # A quoted field holding a comma and a doubled quote is one field; the class column stays 5th.
    extra = "seriesuid,coordX,coordY,coordZ,class,note\n" + "\n".join(f'{row},"a, ""b"""' for row in rows)
    csv.write_text(extra + "\n")
    result = run(REPO / "scripts/explore_data.sh", tiny_root)
    assert result.returncode == 0, result.stderr
    assert _value(result.stdout, "positive (class 1):") == "3"
    assert _value(result.stdout, "named in CSVs:").split()[-1] == "0"
    # A quoted field running past its line (p2ch would read a field with a line break): say so.
    csv.write_text(f'{header}\n"{uid},1,2,3,1\n{uid}",1,2,3,0\n')
    result = run(REPO / "scripts/explore_data.sh", tiny_root)
    assert result.returncode == 0, result.stderr
    assert "quoted field runs past the end of the line; counts may be wrong" in result.stderr


def test_explore_empty_or_missing_root(tmp_path):
    result = run(REPO / "scripts/explore_data.sh", tmp_path)
    assert result.returncode == 1
    assert "no .mhd files under" in result.stderr and "p2ch.synth" in result.stderr
    result = run(REPO / "scripts/explore_data.sh", tmp_path / "nope")
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert run(REPO / "scripts/explore_data.sh", "a", "b").returncode == 2


def test_explore_large_csv_no_sigpipe(tiny_root):
    """`head` on a large CSV under pipefail killed the writer with SIGPIPE (exit 141)."""
    csv = tiny_root / "candidates.csv"
    header, *rows = csv.read_text().splitlines()
    csv.write_text("\n".join([header, *(rows * 8000)]) + "\n")  # about 56,000 rows, several MB
    result = run(REPO / "scripts/explore_data.sh", tiny_root)
    assert result.returncode == 0, result.stderr
    assert _value(result.stdout, "positive (class 1):") == str(3 * 8000)


def test_quickstart_tiny(tmp_path):
    """The README's first command, minus set-up, on a tiny synthetic set: every stage runs."""
    import os
    import sys

    env = dict(os.environ, P2CH_VENV=str(Path(sys.executable).parents[1]), P2CH_RUNS_DIR=str(tmp_path / "runs"))
    result = run(
        REPO / "scripts/quickstart.sh",
        "--tiny",
        "--no-setup",
        "--device",
        "cpu",
        "--num-workers",
        "1",
        "--work",
        tmp_path / "work",
        env=env,
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    work = tmp_path / "work"
    assert len(list((work / "luna").glob("subset*/*.mhd"))) == 4
    assert list((work / "models" / "quickstart").glob("*/best.pt"))
    assert (work / "eval" / "metrics.json").is_file() and (work / "eval" / "froc.png").is_file()
    # the segmentation and malignancy models, and the end-to-end analysis of the validation CTs
    kinds = {p.parent.name.rsplit("-", 1)[-1] for p in (work / "models" / "quickstart").glob("*/best.pt")}
    assert {"seg", "mal", "quickstart"} <= kinds, kinds
    assert (work / "analysis" / "validation" / "metrics.json").is_file()
    assert list((work / "analysis" / "validation").glob("*/nodules.csv"))
    assert "complete miss" in result.stdout
    assert list((tmp_path / "runs" / "quickstart").iterdir())
    assert f"tensorboard --logdir {tmp_path / 'runs'}/quickstart" in result.stdout
