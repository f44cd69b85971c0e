import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from processes import children, wait_until_gone

from p2ch import ct as ct_module
from p2ch import prefill, prepcache
from p2ch.cache import CacheFullError, ChunkCache, decode_chunk
from p2ch.candidates import clear_candidate_cache, get_candidate_arrays, read_annotations
from p2ch.ct import Ct
from p2ch.errors import CandidateOutsideCtError, ConfigError
from p2ch.luna import find_mhd, series_index, subset_of
from p2ch.masks import ct_mask
from p2ch.slices import SliceCache

from conftest import ANNOTATIONS_HEADER, CANDIDATES_HEADER, make_uid, write_csv, write_ct

REPO = Path(__file__).resolve().parents[1]
UID_A, UID_B = make_uid(1), make_uid(2)
N_CTS, PER_CT = 4, 15


@pytest.fixture(autouse=True)
def _fresh_state():
    ct_module.clear_caches()
    clear_candidate_cache()
    yield
    ct_module.clear_caches()
    clear_candidate_cache()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """4 CTs of random voxels (subset0 and subset1), 15 candidates each: 60 distinct chunks."""
    root = tmp_path_factory.mktemp("luna")
    rng = np.random.default_rng(3)
    rows = []
    for k in range(N_CTS):
        uid = make_uid(10 + k)
        shape = (40, 56, 60)
        write_ct(
            root,
            uid,
            rng.integers(-1000, 1001, shape, dtype=np.int16),
            subset=k % 2,
            spacing_xyz=(0.8, 0.8, 1.5),
            origin_xyz=(-100.0, -90.0, 200.0),
        )
        for i, r, c in rng.permutation(np.indices(shape).reshape(3, -1).T)[:PER_CT]:
            rows.append((uid, -100.0 + 0.8 * c, -90.0 + 0.8 * r, 200.0 + 1.5 * i, int(rng.random() < 0.2)))
    write_csv(root / "candidates.csv", CANDIDATES_HEADER, rows)
    write_csv(root / "annotations.csv", ANNOTATIONS_HEADER, [(make_uid(10), *rows[0][1:4], 5.0)])
    return root


def snapshot(cache_dir: Path, root: Path) -> dict:
    cache = ChunkCache(cache_dir, root)
    if not cache.exists():
        return {}
    dc = cache.diskcache
    return {key: dc.get(key, retry=True) for key in dc}


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> dict:
    """{key: value bytes} of a complete, uninterrupted in-process prefill."""
    cache_dir = tmp_path_factory.mktemp("reference") / "cache"
    assert (
        prepcache.main(
            [
                "--data-root",
                str(data_root),
                "--cache-dir",
                str(cache_dir),
                "--num-workers",
                "0",
                "--log-level",
                "WARNING",
            ]
        )
        == 0
    )
    ct_module.clear_caches()
    clear_candidate_cache()
    return snapshot(cache_dir, data_root)


def args(root, cache_dir, *more):
    return ["--data-root", str(root), "--cache-dir", str(cache_dir), "--log-level", "WARNING", *more]


def value_files(cache_dir: Path) -> list[Path]:
    return sorted(Path(cache_dir).rglob("*.val"))


# A sitecustomize that slows every value write (in the command and in its worker processes) and
# pauses halfway through each value file, so a kill lands mid-write.
SLOW_SITE = textwrap.dedent("""
    import os, signal, time
    # A shell starts background jobs with SIGINT ignored, and Python keeps it so; the Ctrl-C test
    # needs the normal handler even when pytest itself runs in the background.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    delay = float(os.environ.get("P2CH_TEST_WRITE_DELAY", "0"))
    if delay:
        import p2ch.cache as _cache
        _write = _cache.ChunkDisk._write

        def _slow_write(self, full_path, iterator, mode, encoding=None):
            data = b"".join(bytes(part) for part in iterator)

            def halves():
                yield data[: len(data) // 2]
                time.sleep(delay)
                yield data[len(data) // 2 :]

            return _write(self, full_path, halves(), mode, encoding)

        _cache.ChunkDisk._write = _slow_write
""")


def start_prefill(tmp_path, root, cache_dir, delay, *more):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SLOW_SITE)
    env = dict(
        os.environ,
        P2CH_TEST_WRITE_DELAY=str(delay),
        PYTHONPATH=os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "p2ch.prepcache", *args(root, cache_dir, *more)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for_entries(cache_dir, root, proc, count, timeout=60.0) -> None:
    reader = ChunkCache(cache_dir, root)
    deadline = time.monotonic() + timeout
    while len(reader) < count:
        assert proc.poll() is None, f"prefill ended early: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "prefill made no progress"
        time.sleep(0.01)
    assert proc.poll() is None, "prefill finished before it could be interrupted (machine too busy?)"


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepcache.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--num-workers",
        "--data-root",
        "--cache-dir",
        "--subsets",
        "--width-irc",
        "--clear",
        "--dry-run",
        "--force",
        "--prune",
        "--log-level",
    ):
        assert flag in out


def test_reference_holds_every_chunk_cropped_correctly(data_root, reference):
    arrays = get_candidate_arrays(data_root)
    cache = ChunkCache(Path("unused"), data_root)
    assert len(reference) == len(arrays) == N_CTS * PER_CT
    for k in range(len(arrays)):
        uid, xyz = arrays.series_uid(k), arrays.center_xyz[k]
        chunk, center_irc = decode_chunk(reference[cache.key(uid, xyz)], (32, 48, 48))
        expected, expected_irc = Ct(uid, data_root).get_raw_candidate(xyz)
        np.testing.assert_array_equal(chunk, expected)
        assert center_irc == expected_irc


def test_rerun_writes_nothing(data_root, reference, tmp_path):
    cache_dir = tmp_path / "cache"
    assert prepcache.main(args(data_root, cache_dir, "--num-workers", "0")) == 0
    files = {p: p.stat().st_mtime_ns for p in value_files(cache_dir)}
    assert prepcache.main(args(data_root, cache_dir, "--num-workers", "0")) == 0
    assert {p: p.stat().st_mtime_ns for p in value_files(cache_dir)} == files
    assert snapshot(cache_dir, data_root) == reference
    plan = prefill.make_plan(ChunkCache(cache_dir, data_root))
    assert (plan.chunks, plan.cached, plan.to_write, plan.cts_to_load) == (60, 60, 0, 0)


def test_worker_processes_build_the_same_cache(data_root, reference, tmp_path):
    cache_dir = tmp_path / "cache"
    assert prepcache.main(args(data_root, cache_dir, "--num-workers", "2")) == 0
    assert snapshot(cache_dir, data_root) == reference


def test_dry_run_writes_nothing_and_counts(tiny_root, tmp_path):
    cache_dir = tmp_path / "cache"
    assert prepcache.main(args(tiny_root, cache_dir, "--dry-run")) == 0
    assert not cache_dir.exists()
    plan = prefill.make_plan(ChunkCache(cache_dir, tiny_root))
    per_chunk = 36 * 4096 + 300  # 32*48*48 int16 = exactly 36 blocks, plus the SQLite row
    assert (plan.cts, plan.chunks, plan.cached, plan.to_write) == (2, 7, 0, 7)
    assert plan.bytes_per_chunk == per_chunk and plan.bytes_to_write == 7 * per_chunk
    assert plan.bytes_to_write < 7 * 32 * 48 * 48 * 4 * 0.52  # about half the book's float32
    assert not cache_dir.exists()
    assert prepcache.main(args(tiny_root, cache_dir, "--subsets", "1", "--num-workers", "0")) == 0
    files = value_files(cache_dir)
    assert prepcache.main(args(tiny_root, cache_dir, "--dry-run")) == 0
    assert value_files(cache_dir) == files
    plan = prefill.make_plan(ChunkCache(cache_dir, tiny_root))
    assert (plan.cts, plan.cts_to_load, plan.chunks, plan.cached, plan.to_write) == (2, 1, 7, 2, 5)
    assert plan.bytes_to_write == 5 * per_chunk
    assert plan.free_bytes is not None and plan.free_bytes > 0


def test_full_luna16_estimate():
    # 551,065 candidates.csv rows as int16 32x48x48 chunks: about 81 GB (the book's float32: 162 GB).
    assert 80e9 < 551_065 * prefill.chunk_disk_bytes((32, 48, 48)) < 84e9


def test_subsets_restrict(tiny_root, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    assert prepcache.main(args(tiny_root, cache_dir, "--subsets", "1", "--num-workers", "0")) == 0
    keys = list(ChunkCache(cache_dir, tiny_root).diskcache)
    assert len(keys) == 2 and all(f"/{UID_B}/" in key for key in keys)
    assert prepcache.main(args(tiny_root, cache_dir, "--subsets", "1", "4")) == 2
    assert "subset4" in capsys.readouterr().err


def test_refuses_when_the_estimate_exceeds_free_space(tiny_root, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(prefill, "free_bytes", lambda path: 1_000_000)
    assert prepcache.main(args(tiny_root, cache_dir, "--num-workers", "0")) == 2
    assert len(ChunkCache(cache_dir, tiny_root)) == 0 and not cache_dir.exists()
    assert prepcache.main(args(tiny_root, cache_dir, "--num-workers", "0", "--force")) == 0
    assert len(ChunkCache(cache_dir, tiny_root)) == 7


def test_clear_and_prune_flags(tiny_root, tmp_path):
    cache_dir = tmp_path / "cache"
    cache = ChunkCache(cache_dir, tiny_root)
    assert prepcache.main(args(tiny_root, cache_dir, "--num-workers", "0")) == 0
    assert prepcache.main(args(tiny_root, cache_dir, "--clear", "--dry-run")) == 0
    assert len(cache) == 7
    assert prepcache.main(args(tiny_root, cache_dir, "--prune")) == 0
    assert len(cache) == 7
    raw = find_mhd(UID_B, tiny_root).with_suffix(".raw")
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    assert prepcache.main(args(tiny_root, cache_dir, "--prune", "--dry-run")) == 0
    assert len(cache) == 7
    assert prepcache.main(args(tiny_root, cache_dir, "--prune")) == 0
    assert len(cache) == 5
    assert prepcache.main(args(tiny_root, cache_dir, "--clear", "--num-workers", "0")) == 0
    assert len(cache) == 7 and len(value_files(cache_dir)) == 7


def test_bad_input_exits_2(tiny_root, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    assert prepcache.main(args(tiny_root, cache_dir, "--num-workers", "-1")) == 2
    assert prepcache.main(args(tiny_root, cache_dir, "--width-irc", "0", "48", "48")) == 2
    assert prepcache.main(args(tmp_path / "nowhere", cache_dir)) == 2
    err = capsys.readouterr().err
    assert "--num-workers" in err and "--width-irc" in err and "nowhere" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert prepcache.main(args(tiny_root, blocker / "cache", "--num-workers", "0")) == 2
    assert "a-file/cache" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["chunks", "segmentation"])
@pytest.mark.parametrize("problem", ["a file", "below a file", "unwritable"])
def test_a_cache_dir_that_cannot_be_written_fails_before_any_ct_is_read(
    tiny_root, tmp_path, capsys, monkeypatch, kind, problem
):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    cache_dir = {"a file": blocker, "below a file": blocker / "cache", "unwritable": tmp_path / "ro" / "cache"}[problem]
    (tmp_path / "ro").mkdir()
    real_access = os.access
    # Root may write anywhere, so the refusal of the file system is simulated for this folder.
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != tmp_path / "ro" and real_access(p, mode, **k))
    monkeypatch.setattr(ct_module.Ct, "__init__", lambda *a, **k: pytest.fail("a CT was read"))
    more = ["--segmentation"] if kind == "segmentation" else []
    assert prepcache.main(args(tiny_root, cache_dir, "--num-workers", "0", *more)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--cache-dir {cache_dir}: " in err
    assert ("not writable" if problem == "unwritable" else f"{blocker} is a file, not a folder") in err


def test_full_disk_stops_with_exit_2(tiny_root, tmp_path, monkeypatch, capsys):
    import diskcache

    def full(self, full_path, iterator, mode, encoding=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskcache.Disk, "_write", full)
    cache_dir = tmp_path / "cache"
    assert prepcache.main(args(tiny_root, cache_dir, "--num-workers", "0")) == 2
    assert "is full" in capsys.readouterr().err
    assert len(ChunkCache(cache_dir, tiny_root)) == 0


def test_unreadable_ct_is_reported_and_the_others_cached(tiny_root, tmp_path):
    raw = find_mhd(UID_B, tiny_root).with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:100])
    cache_dir = tmp_path / "cache"
    assert prepcache.main(args(tiny_root, cache_dir, "--num-workers", "0")) == 2
    keys = list(ChunkCache(cache_dir, tiny_root).diskcache)
    assert len(keys) == 5 and all(f"/{UID_A}/" in key for key in keys)


def test_sigkill_midway_then_resume_gives_the_identical_cache(data_root, reference, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = start_prefill(tmp_path, data_root, cache_dir, 0.05, "--num-workers", "0")
    try:
        wait_for_entries(cache_dir, data_root, proc, 5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    partial = snapshot(cache_dir, data_root)
    assert 5 <= len(partial) < len(reference)
    assert all(reference[key] == value for key, value in partial.items())  # nothing half-written served
    assert prepcache.main(args(data_root, cache_dir, "--num-workers", "0")) == 0
    assert snapshot(cache_dir, data_root) == reference
    reader = ChunkCache(cache_dir, data_root)
    arrays = get_candidate_arrays(data_root)
    for k in range(len(arrays)):
        assert reader.get_cached(arrays.series_uid(k), arrays.center_xyz[k]) is not None
    assert reader.stats()["corrupt"] == 0
    # --prune frees any value file the killed writer left without an index row
    assert prepcache.main(args(data_root, cache_dir, "--prune")) == 0
    assert len(list(cache_dir.rglob("*.val"))) == len(reader) == len(reference)


def test_ctrl_c_stops_workers_and_a_rerun_resumes(data_root, reference, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = start_prefill(tmp_path, data_root, cache_dir, 0.05, "--num-workers", "1")
    try:
        wait_for_entries(cache_dir, data_root, proc, 3)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 130, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader = ChunkCache(cache_dir, data_root)
    count = len(reader)
    time.sleep(0.5)
    assert len(reader) == count < len(reference)  # the worker stopped too
    assert prepcache.main(args(data_root, cache_dir, "--num-workers", "0")) == 0
    assert snapshot(cache_dir, data_root) == reference


def test_sigterm_is_handled_like_ctrl_c_and_stops_the_workers(data_root, reference, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = start_prefill(tmp_path, data_root, cache_dir, 0.05, "--num-workers", "2")
    try:
        wait_for_entries(cache_dir, data_root, proc, 3)
        workers = children(proc.pid)
        assert len(workers) >= 2, workers  # the two workers (and the resource tracker)
        os.kill(proc.pid, signal.SIGTERM)  # only the parent, as a job scheduler's stop would
        assert proc.wait(timeout=30) == 143
        err = proc.stderr.read().decode()
        last = err.strip().splitlines()[-1]
        assert last.startswith("python -m p2ch.prepcache: terminated (SIGTERM) after ")
        assert "rerun the same command to resume" in last
        assert not wait_until_gone(workers, 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session
        proc.wait(timeout=30)
    assert len(ChunkCache(cache_dir, data_root)) < len(reference)
    assert prepcache.main(args(data_root, cache_dir, "--num-workers", "0")) == 0
    assert snapshot(cache_dir, data_root) == reference


def test_workers_exit_when_the_parent_is_killed(data_root, tmp_path):
    """SIGKILL of prepcache alone: its worker processes (and the resource tracker) do not outlive it."""
    cache_dir = tmp_path / "cache"
    proc = start_prefill(tmp_path, data_root, cache_dir, 0.05, "--num-workers", "2")
    try:
        wait_for_entries(cache_dir, data_root, proc, 3)
        workers = children(proc.pid)
        assert len(workers) >= 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert not wait_until_gone(workers, 10), "worker processes outlived their parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session
        proc.wait(timeout=30)


def test_two_prefills_at_once_agree(data_root, reference, tmp_path):
    cache_dir = tmp_path / "cache"
    procs = [start_prefill(tmp_path, data_root, cache_dir, 0.005, "--num-workers", "0") for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    assert snapshot(cache_dir, data_root) == reference


def test_reader_never_sees_a_wrong_chunk_while_a_prefill_writes(data_root, reference, tmp_path):
    cache_dir = tmp_path / "cache"
    arrays = get_candidate_arrays(data_root)
    reader = ChunkCache(cache_dir, data_root)
    expected = {}
    for k in range(len(arrays)):
        uid, xyz = arrays.series_uid(k), tuple(arrays.center_xyz[k])
        expected[(uid, xyz)] = decode_chunk(reference[reader.key(uid, xyz)])
    items = list(expected)
    proc = start_prefill(tmp_path, data_root, cache_dir, 0.01, "--num-workers", "0")
    rng = np.random.default_rng(0)
    seen = reads = 0
    try:
        wait_for_entries(cache_dir, data_root, proc, 1)
        while proc.poll() is None:
            uid, xyz = items[rng.integers(len(items))]
            found = reader.get_cached(uid, xyz)
            reads += 1
            if found is not None:
                seen += 1
                np.testing.assert_array_equal(found[0], expected[(uid, xyz)][0])
                assert found[1] == expected[(uid, xyz)][1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == 0
    assert seen > 0 and reads > seen  # read both before and after entries appeared
    assert reader.stats()["corrupt"] == 0


# --- p2ch.prefill.fill_missing: what evaluation calls to cache some candidates --------------------


def test_fill_missing_caches_only_the_selected_candidates(tiny_root, tmp_path, monkeypatch):
    arrays = get_candidate_arrays(tiny_root)
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    chosen = np.array([5, 0, 3, 0])  # both CTs, one row twice
    assert prefill.fill_missing(cache, arrays, chosen, (32, 48, 48), progress=False) == 3
    keys = {cache.key(arrays.series_uid(k), arrays.center_xyz[k]) for k in range(len(arrays))}
    wanted = {cache.key(arrays.series_uid(k), arrays.center_xyz[k]) for k in (0, 3, 5)}
    assert set(cache.diskcache) == wanted and wanted < keys
    for k in (0, 3, 5):
        uid, xyz = arrays.series_uid(k), arrays.center_xyz[k]
        np.testing.assert_array_equal(cache.get_cached(uid, xyz)[0], Ct(uid, tiny_root).get_raw_candidate(xyz)[0])
    # Nothing missing: no CT is loaded, nothing written.
    monkeypatch.setattr(ChunkCache, "fill_series", lambda *a, **k: pytest.fail("loaded a CT for cached chunks"))
    assert prefill.fill_missing(cache, arrays, chosen, (32, 48, 48), progress=False) == 0
    assert prefill.fill_missing(cache, arrays, np.array([], dtype=np.int64), (32, 48, 48), progress=False) == 0
    monkeypatch.undo()
    assert prefill.fill_missing(cache, arrays, np.arange(len(arrays)), (32, 48, 48), progress=False) == 4
    assert set(cache.diskcache) == keys
    assert prefill.fill_missing(cache, arrays, np.array([1]), (4, 6, 8), progress=False) == 1  # another width
    assert len(cache) == len(keys) + 1
    mask = np.zeros(len(arrays), dtype=bool)
    mask[[1, 2, 6]] = True  # a boolean mask selects rows too
    assert prefill.fill_missing(cache, arrays, mask, (4, 6, 8), progress=False) == 2
    assert cache.get_cached(arrays.series_uid(6), arrays.center_xyz[6], (4, 6, 8)) is not None


def test_fill_missing_in_worker_processes_builds_the_same_cache(data_root, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(prefill, "IN_PROCESS_CT_BYTES", 0)  # these CTs are small enough to fill in this process
    pools = []
    real_pool = prefill._run_pool
    monkeypatch.setattr(
        prefill, "_run_pool", lambda cache, tasks, *a: pools.append(len(tasks)) or real_pool(cache, tasks, *a)
    )
    arrays = get_candidate_arrays(data_root)
    cache = ChunkCache(tmp_path / "cache", data_root)
    first = np.arange(0, len(arrays), 3)
    assert prefill.fill_missing(cache, arrays, first, (32, 48, 48), num_workers=2, progress=False) == len(first)
    assert prefill.fill_missing(cache, arrays, np.arange(len(arrays)), (32, 48, 48), num_workers=2) == len(
        arrays
    ) - len(first)
    assert snapshot(cache.cache_dir, data_root) == reference
    assert pools == [N_CTS, N_CTS]


def test_a_small_fill_runs_in_this_process(data_root, tmp_path, monkeypatch):
    arrays = get_candidate_arrays(data_root)
    cache = ChunkCache(tmp_path / "cache", data_root)
    monkeypatch.setattr(prefill, "_run_pool", lambda *a, **k: pytest.fail("started worker processes"))
    assert prefill.IN_PROCESS_CT_BYTES > N_CTS * 2 * 40 * 56 * 60  # 4 CTs of 0.27 MB
    assert prefill.fill_missing(cache, arrays, np.arange(len(arrays)), (32, 48, 48), num_workers=2) == len(arrays)


def test_fill_missing_reports_unreadable_cts_after_caching_the_others(tiny_root, tmp_path):
    arrays = get_candidate_arrays(tiny_root)
    raw = find_mhd(UID_B, tiny_root).with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:100])
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    with pytest.raises(prefill.PrefillError, match=rf"1 of 2 CTs could not be cached \(first: {UID_B}"):
        prefill.fill_missing(cache, arrays, np.arange(len(arrays)), (32, 48, 48), progress=False)
    assert len(cache) == 5 and all(f"/{UID_A}/" in key for key in cache.diskcache)
    with pytest.raises(ConfigError, match="num_workers"):
        prefill.fill_missing(cache, arrays, np.arange(2), (32, 48, 48), num_workers=-1)
    with pytest.raises(ConfigError, match="width_irc"):
        prefill.fill_missing(cache, arrays, np.arange(2), (32, 48))


# --- chunk_coverage / warm_chunk_cache: what a training run checks and fills before its first batch ----


def test_coverage_is_a_key_check_that_names_the_missing_rows(tiny_root, tmp_path, monkeypatch):
    arrays = get_candidate_arrays(tiny_root)
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    rows = np.array([6, 0, 3, 0, 5])  # both CTs, one row twice
    cold = prefill.chunk_coverage(cache, arrays, rows, (32, 48, 48))
    assert (cold.chunks, cold.missing, cold.cts) == (4, 4, 2) and cold.missing_rows.tolist() == [0, 3, 5, 6]
    assert sorted(cold.ct_bytes.tolist()) == [2 * 30 * 50 * 60, 2 * 40 * 64 * 64]  # from the headers
    assert not cache.exists()  # asking created nothing
    prefill.fill_missing(cache, arrays, np.array([0, 6]), (32, 48, 48), progress=False)
    monkeypatch.setattr(ChunkCache, "get_cached", lambda *a, **k: pytest.fail("read a value"))
    warm = prefill.chunk_coverage(cache, arrays, rows, (32, 48, 48))
    assert (warm.missing, warm.cts, warm.missing_rows.tolist()) == (2, 2, [3, 5])
    assert [t.missing for t in sorted(warm.tasks, key=lambda t: t.series_uid)] == [1, 1]


def test_warm_fills_what_a_run_reads_or_with_no_prefill_only_counts_it(tiny_root, tmp_path, monkeypatch):
    arrays = get_candidate_arrays(tiny_root)
    cache = ChunkCache(tmp_path / "cache", tiny_root)
    rows = np.array([0, 3, 5, 6])
    told = prefill.warm_chunk_cache(cache, arrays, rows, (32, 48, 48), fill=False, progress=False)
    assert told.missing == 4 and len(cache) == 0  # --no-prefill: nothing written
    monkeypatch.setattr(prefill, "free_bytes", lambda path: 3 * prefill.chunk_disk_bytes((32, 48, 48)))
    with pytest.raises(CacheFullError, match=r"need about 0\.00 GB, but its disk has 0\.00 GB free"):
        prefill.warm_chunk_cache(cache, arrays, rows, (32, 48, 48), progress=False)
    assert len(cache) == 0  # refused before writing
    monkeypatch.undo()
    filled = prefill.warm_chunk_cache(cache, arrays, rows, (32, 48, 48), progress=False)
    assert filled.missing == 4 and len(cache) == 4
    assert prefill.chunk_coverage(cache, arrays, np.arange(len(arrays)), (32, 48, 48)).missing_rows.tolist() == [
        1,
        2,
        4,
    ]
    monkeypatch.setattr(ChunkCache, "fill_series", lambda *a, **k: pytest.fail("loaded a CT for cached chunks"))
    assert prefill.warm_chunk_cache(cache, arrays, rows, (32, 48, 48), progress=False).missing == 0


def test_warm_names_the_csv_line_of_a_candidate_outside_its_ct(tiny_root, tmp_path):
    root = tiny_root  # a fresh copy for each test
    lines = (root / "candidates.csv").read_text().splitlines()
    row = lines[4].split(",")
    row[3] = "5000.0"  # coordZ far above its CT
    lines[4] = ",".join(row)
    (root / "candidates.csv").write_text("\n".join(lines) + "\n")
    arrays = get_candidate_arrays(root)
    cache = ChunkCache(tmp_path / "cache", root)
    with pytest.raises(CandidateOutsideCtError) as info:
        prefill.warm_chunk_cache(cache, arrays, np.arange(len(arrays)), (32, 48, 48), progress=False)
    assert str(info.value).startswith(f"{root / 'candidates.csv'}: line 5: candidate centre (")
    assert "5000.0) mm lies outside CT" in str(info.value)
    assert len(cache) == len(arrays) - 1  # every other chunk was cached first


def test_an_unreadable_ct_is_reported_in_one_short_line_with_the_detail_in_the_log(tiny_root, tmp_path, capsys, caplog):
    root = tiny_root  # a fresh copy for each test
    mhd = find_mhd(UID_B, root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mhd.with_suffix(".raw").rename(elsewhere / f"{UID_B}.raw")
    header = mhd.read_text().replace(f"ElementDataFile = {UID_B}.raw", f"ElementDataFile = ../../elsewhere/{UID_B}.raw")
    mhd.write_text(header)
    cache_dir = tmp_path / "cache"
    for attempt, tried in (("cold", 2), ("with the other CT cached", 1)):
        assert prepcache.main(args(root, cache_dir, "--num-workers", "0")) == 2, attempt
        line = capsys.readouterr().err.splitlines()[-1]
        assert line.startswith(
            f"python -m p2ch.prepcache: error: 1 of {tried} CTs could not be cached (first: {UID_B}: "
        )
        assert "<uid>.mhd: header line 'ElementDataFile = ../../elsewhere/<uid>" in line and "points outside" in line
        assert str(tmp_path) not in line and len(line) < 320, attempt  # the paths and the advice are in the log
        logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and UID_B in r.getMessage()]
        assert logged and str(elsewhere / f"{UID_B}.raw") in logged[-1] and "P2CH_ALLOW_EXTERNAL_DATA" in logged[-1]
        caplog.clear()
    arrays = get_candidate_arrays(root)
    of_a = arrays.series_index == list(arrays.series_uids).index(UID_A)
    assert ChunkCache(cache_dir, root).missing(UID_A, arrays.center_xyz[of_a]).sum() == 0  # the other CT is cached


# --- --segmentation: the slice cache of the segmentation model ---------------------------------

SEG_SET = {"num_cts": 4, "size": 96, "slices": 48, "candidates_per_ct": 20, "nodules_per_ct": 2, "seed": 3}


def seg_args(root, cache_dir, *more):
    return args(root, cache_dir, "--segmentation", *more)


def completeness(cache: SliceCache, root: Path) -> dict[int, bool]:
    return {subset_of(path): cache.complete(uid) for uid, path in series_index(root).items()}


def test_segmentation_prefill_end_to_end_and_a_rerun_writes_nothing(synth_set, tmp_path):
    root = synth_set(**SEG_SET)
    cache_dir = tmp_path / "cache"
    assert prepcache.main(seg_args(root, cache_dir, "--dry-run")) == 0
    assert not cache_dir.exists()
    plan = prefill.make_slice_plan(SliceCache(cache_dir, root))
    assert (plan.cts, plan.cts_to_fill, plan.slices) == (4, 4, 4 * 48)
    assert plan.bytes_to_write == 4 * 48 * (5 * 4096 + 300)  # 96*96 int16 = 4.5 blocks of 4 KiB, plus the row
    assert prepcache.main(seg_args(root, cache_dir, "--num-workers", "2")) == 0
    cache = SliceCache(cache_dir, root)
    assert completeness(cache, root) == {0: True, 1: True, 2: True, 3: True}
    frame = read_annotations(root / "annotations.csv")
    for uid in series_index(root):
        ct = Ct(uid, root)
        rows = frame[frame["seriesuid"] == uid]
        labels = ct_mask(
            ct, rows[["coordX", "coordY", "coordZ"]].to_numpy(), rows["diameter_mm"].to_numpy(), labels=True
        )
        np.testing.assert_array_equal(cache.slab(uid, 47, 2), ct.hu[[45, 46, 47, 47, 47]])
        for k in range(48):
            np.testing.assert_array_equal(cache.mask(uid, k), labels[k])
    assert cache.stats()["filled"] == 0 and not ChunkCache(cache_dir, root).exists()
    files = {p: p.stat().st_mtime_ns for p in value_files(cache_dir)}
    assert prepcache.main(seg_args(root, cache_dir, "--num-workers", "2")) == 0
    assert {p: p.stat().st_mtime_ns for p in value_files(cache_dir)} == files
    assert prefill.make_slice_plan(SliceCache(cache_dir, root)).cts_to_fill == 0


def test_segmentation_subsets_clear_and_refusals(synth_set, tmp_path, capsys):
    root = synth_set(**SEG_SET)
    cache_dir = tmp_path / "cache"
    cache = SliceCache(cache_dir, root)
    assert prepcache.main(seg_args(root, cache_dir, "--subsets", "1", "3", "--num-workers", "0")) == 0
    assert completeness(cache, root) == {0: False, 1: True, 2: False, 3: True}
    records = len(cache)
    assert prepcache.main(seg_args(root, cache_dir, "--clear", "--dry-run")) == 0
    assert len(cache) == records
    assert prepcache.main(seg_args(root, cache_dir, "--clear", "--subsets", "0", "--num-workers", "0")) == 0
    assert completeness(cache, root) == {0: True, 1: False, 2: False, 3: False}
    capsys.readouterr()
    assert prepcache.main(seg_args(root, cache_dir, "--prune")) == 2
    assert prepcache.main(seg_args(root, cache_dir, "--width-irc", "8", "8", "8")) == 2
    assert prepcache.main(seg_args(root, cache_dir, "--subsets", "7")) == 2
    err = capsys.readouterr().err
    assert "--prune" in err and "--width-irc" in err and "subset7" in err


def test_segmentation_prefill_reports_a_bad_annotation_and_fills_the_others(synth_set, tmp_path):
    root = tmp_path / "luna"
    shutil.copytree(synth_set(**SEG_SET), root)
    frame = read_annotations(root / "annotations.csv")
    bad_uid = frame["seriesuid"].iloc[0]
    frame.loc[0, "coordZ"] += 5000.0
    frame.to_csv(root / "annotations.csv", index=False)
    cache_dir = tmp_path / "cache"
    assert prepcache.main(seg_args(root, cache_dir, "--num-workers", "0")) == 2
    cache = SliceCache(cache_dir, root)
    assert {uid: cache.complete(uid) for uid in series_index(root)} == {
        uid: uid != bad_uid for uid in series_index(root)
    }
    with pytest.raises(prefill.PrefillError, match=rf"1 of 1 CTs could not be cached \(first: {bad_uid}.*outside"):
        prefill.fill_slices(cache, list(series_index(root)), progress=False)


def test_fill_slices_with_no_prefill_fills_nothing(synth_set, tmp_path, monkeypatch):
    root = synth_set(**SEG_SET)
    uids = sorted(series_index(root))
    cache = SliceCache(tmp_path / "cache", root)
    monkeypatch.setattr(SliceCache, "fill_series", lambda *a, **k: pytest.fail("filled with --no-prefill"))
    assert prefill.fill_slices(cache, uids, fill=False, progress=False) == 0
    assert not any(cache.complete(uid) for uid in uids)


def test_fill_slices_fills_only_what_is_missing(synth_set, tmp_path, monkeypatch):
    root = synth_set(**SEG_SET)
    uids = sorted(series_index(root))
    cache = SliceCache(tmp_path / "cache", root)
    assert prefill.fill_slices(cache, uids[:2] + uids[:1], progress=False) == 2
    assert prefill.fill_slices(cache, uids, num_workers=2, progress=False) == 2
    monkeypatch.setattr(SliceCache, "fill_series", lambda *a, **k: pytest.fail("loaded a complete CT"))
    assert prefill.fill_slices(cache, uids, num_workers=2, progress=False) == 0
    assert all(cache.complete(uid) for uid in uids)
    with pytest.raises(ConfigError, match="num_workers"):
        prefill.fill_slices(cache, uids, num_workers=-1)
