"""The command wrapper (p2ch.cli) and the device and AMP spellings (p2ch.runtime)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from p2ch import runtime
from p2ch.cli import run_cli
from p2ch.config import check_output_dir, check_output_file
from p2ch.errors import CandidateOutsideCtError, ConfigError, DataNotFoundError
from p2ch.fileio import atomic_writer, remove_stale_temporaries
from p2ch.runtime import (
    DistInfo,
    SharedMemoryError,
    bf16_supported,
    check_loader_shared_memory,
    check_shared_memory,
    configure_backends,
    cpu_bf16_native,
    loader_shm_bytes,
    resolve_amp,
    resolve_device,
    shared_memory_errors,
)


def test_user_errors_become_one_line_and_exit_2(capsys):
    def body():
        raise DataNotFoundError("no such\nfile   here")

    assert run_cli("p2ch.x", body) == 2
    assert capsys.readouterr().err == "p2ch.x: error: no such file here\n"


def test_bugs_keep_their_traceback():
    def body():
        raise TypeError("a bug in p2ch")

    with pytest.raises(TypeError, match="a bug in p2ch"):
        run_cli("p2ch.x", body)


def test_ctrl_c_exits_130_with_the_note(capsys):
    def body():
        raise KeyboardInterrupt

    assert run_cli("p2ch.x", body, lambda: "interrupted; resume with --resume a.pt") == 130
    assert capsys.readouterr().err == "p2ch.x: interrupted; resume with --resume a.pt\n"
    assert run_cli("p2ch.x", lambda: 0) == 0


OUTSIDE = "candidate centre (1.0, 2.0, 5000.0) mm lies outside CT 1.2.3 (voxel (4000, 2, 1))\nsee line 2"


class _OutsideCt(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, k):
        raise CandidateOutsideCtError(OUTSIDE)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_error_in_a_dataloader_worker_is_the_same_one_line(num_workers, capsys):
    """torch re-raises a worker's error with its traceback as the message; the user sees only the message."""

    def body():
        for _ in DataLoader(_OutsideCt(), num_workers=num_workers):
            pass
        return 0

    assert run_cli("p2ch.x", body) == 2
    assert capsys.readouterr().err == f"p2ch.x: error: {' '.join(OUTSIDE.split())}\n"


def _terminate_self():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the signal arrives first
    return 0


def test_sigterm_is_handled_like_ctrl_c_and_exits_143(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli("p2ch.x", _terminate_self, lambda: "interrupted; resume with --resume a.pt") == 143
    assert capsys.readouterr().err == "p2ch.x: terminated (SIGTERM); resume with --resume a.pt\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the command's only


def test_an_error_caused_by_sigterm_counts_as_the_termination(capsys):
    """SIGTERM sent to a whole process group also kills the workers; the error that follows is not the news."""

    def body():
        try:
            _terminate_self()
        finally:
            raise DataNotFoundError("a worker process died")

    assert run_cli("p2ch.x", body, "interrupted; rerun to resume") == 143
    assert capsys.readouterr().err == "p2ch.x: terminated (SIGTERM); rerun to resume\n"


def test_any_error_raised_after_sigterm_counts_as_the_termination(capsys, caplog):
    """A library cut off by the signal raises its own error on the way out (torch.save's zip writer:
    "unexpected pos"); the user sees the termination note, not that traceback."""

    def body():
        try:
            _terminate_self()
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2225024 vs 2224912")

    with caplog.at_level(logging.DEBUG, logger="p2ch.cli"):
        assert run_cli("p2ch.x", body, "interrupted; rerun to resume") == 143
    assert capsys.readouterr().err == "p2ch.x: terminated (SIGTERM); rerun to resume\n"
    assert "unexpected pos" in caplog.text  # kept for --log-level DEBUG


@pytest.fixture
def usual_ctrl_c():
    """Ctrl-C raising KeyboardInterrupt, as in a terminal. Python leaves SIGINT ignored when it was started so
    (under nohup, as a background job of a script: how some CI runners start the suite); put back after."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_file_being_written_is_finished_before_the_signal_acts(sig, tmp_path, capsys, usual_ctrl_c):
    """Ctrl-C or SIGTERM during an atomic write waits until the file is whole, then acts as usual."""
    target = tmp_path / "last.pt"
    written = []

    def body():
        with atomic_writer(target) as handle:
            handle.write(b"first half ")
            os.kill(os.getpid(), sig)
            time.sleep(0.2)  # without the deferral the signal would act here
            handle.write(b"second half")
        written.append(target.read_bytes())
        time.sleep(30)  # the signal acts at the end of the write, before this ends
        return 0

    expected = 143 if sig == signal.SIGTERM else 130
    assert run_cli("p2ch.x", body, "interrupted; rerun to resume") == expected
    assert target.read_bytes() == b"first half second half" and written == []
    assert "rerun to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the deferral's handlers are gone


def test_check_output_dir_accepts_a_creatable_folder_and_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_dir(target, "--out") == target and not (tmp_path / "a").exists()
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="is a broken symbolic link, not a folder; pass another --runs-dir"):
        check_output_dir(tmp_path / "link" / "runs", "--runs-dir")
    with pytest.raises(ConfigError, match="this is a folder; name a file"):
        check_output_file(tmp_path, "--report")
    assert check_output_file(tmp_path / "new" / "report.json", "--report") == tmp_path / "new" / "report.json"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any folder")
def test_check_output_dir_refuses_a_read_only_folder(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=f"the folder {tmp_path} is not writable"):
            check_output_dir(tmp_path / "models", "--checkpoint-dir")
    finally:
        tmp_path.chmod(0o755)


def test_device_and_amp_spellings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_amp("auto", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_amp("off", torch.device("cpu"), cpu_bf16=True) is None
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="is not a device"):
        resolve_device("tpu:x")


# --- bf16 detection, backend switches, device-dependent batch sizes ---------------------------


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_on_the_cpu_is_bf16_only_for_commands_that_ask_and_cpus_that_compute_it(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: native)
    assert resolve_amp("auto", torch.device("cpu")) is None  # training keeps float32 on every CPU
    assert resolve_amp("auto", torch.device("cpu"), cpu_bf16=True) is (torch.bfloat16 if native else None)


def test_cpu_bf16_native_follows_torchs_instruction_checks(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_bf16_native()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not cpu_bf16_native()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert not cpu_bf16_native()  # a torch without the checks: no


def _fake_gpu(monkeypatch, major: int, emulates_bf16: bool = True) -> list[dict]:
    """A CUDA device of compute capability `major`.x, seen through torch.cuda's queries; returns the
    keyword arguments each is_bf16_supported call got."""
    calls: list[dict] = []

    def is_bf16_supported(including_emulation: bool = True):
        calls.append({"including_emulation": including_emulation})
        return major >= 8 or (including_emulation and emulates_bf16)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    return calls


@pytest.mark.parametrize(("major", "expected"), [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_amp_auto_takes_fp16_where_bf16_is_only_emulated(monkeypatch, major, expected):
    """V100/T4 (7.x) emulate bf16, slower than their fp16: auto must not count emulation as support."""
    calls = _fake_gpu(monkeypatch, major)
    assert resolve_amp("auto", torch.device("cuda", 0)) is expected
    assert calls == [{"including_emulation": False}]


def test_bf16_check_on_a_torch_without_the_emulation_switch(monkeypatch):
    """torch versions before `including_emulation`: the compute capability decides."""
    for major, native in ((7, False), (8, True)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # emulation counted, no switch
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        monkeypatch.setattr(torch.version, "hip", None)
        assert bf16_supported(torch.device("cuda", 0)) is native


def test_configure_backends_sets_cudnn_benchmark_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(torch.device("cpu"), True)
    assert torch.backends.cudnn.benchmark is False  # nothing global changes for a CPU run
    configure_backends(torch.device("cuda", 0), True)
    assert torch.backends.cudnn.benchmark is True
    configure_backends(torch.device("cuda", 0), False)
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize(
    ("cuda", "device", "train", "evaluate"),
    [(False, "auto", 32, 64), (True, "auto", 256, 512), (True, "cpu", 32, 64), (True, "cuda:0", 256, 512)],
)
def test_batch_size_default_follows_the_device(monkeypatch, cuda, device, train, evaluate):
    from p2ch.config import TrainingConfig, config_from_args, inference_batch_size
    from p2ch.training import get_args_parser

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    config = config_from_args(get_args_parser().parse_args(["--device", device]), TrainingConfig)
    assert config.batch_size == train  # resolved, so the checkpoint's settings hold the number itself
    assert config.to_dict()["batch_size"] == train
    assert inference_batch_size(None, device) == evaluate
    given = config_from_args(get_args_parser().parse_args(["--device", device, "--batch-size", "32"]), TrainingConfig)
    assert given.batch_size == 32 and inference_batch_size(7, device) == 7


def test_segmentation_batch_size_stays_16_on_cuda(monkeypatch):
    from p2ch.config import SegTrainingConfig, config_from_args
    from p2ch.seg_training import get_args_parser

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config_from_args(get_args_parser().parse_args([]), SegTrainingConfig).batch_size == 16


def test_resume_keeps_the_saved_batch_size_whatever_the_device_now(monkeypatch):
    from p2ch.config import TrainingConfig, explicit_settings, resume_config
    from p2ch.training import get_args_parser

    saved = TrainingConfig(batch_size=256, device="auto").to_dict()  # resolved on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--resume", "last.pt"]
    config = resume_config(saved, explicit_settings(get_args_parser(), argv), "last.pt")
    assert config.batch_size == 256


def test_bad_cudnn_benchmark_setting_is_one_clear_error():
    from p2ch.config import TrainingConfig

    with pytest.raises(ConfigError, match=r"--cudnn-benchmark 'yes': expected on or off"):
        TrainingConfig(cudnn_benchmark="yes").validate()


# --- shared memory for DataLoader workers -----------------------------------------------------


def test_loader_shm_estimate():
    chunk = 32 * 48 * 48 * 2  # one int16 chunk
    assert loader_shm_bytes(chunk * 1024, 16) == chunk * 1024 * 16 * 2  # the issue's ~5 GB
    assert 4.5e9 < loader_shm_bytes(chunk * 1024, 16) < 5e9
    assert loader_shm_bytes(chunk * 1024, 16, prefetch_factor=4) == chunk * 1024 * 16 * 4
    assert loader_shm_bytes(chunk * 1024, 0) == 0  # no workers: nothing goes through /dev/shm


class _Statvfs:
    def __init__(self, free_bytes: int):
        self.f_frsize = 4096
        self.f_bavail = free_bytes // 4096


def test_shm_check_warns_when_batches_in_flight_do_not_fit(monkeypatch, caplog):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "statvfs", lambda path: _Statvfs(64 * 2**20))  # docker's default /dev/shm
    with caplog.at_level("WARNING", logger="p2ch.runtime"):
        message = check_shared_memory(5 * 2**30, "--batch-size 1024, --num-workers 16")
    assert message is not None and "5,120 MiB" in message and "64 MiB free" in message
    assert "--num-workers" in message and "--ipc=host" in message and "--shm-size" in message
    assert [r.getMessage() for r in caplog.records] == [message]
    assert "\n" not in message
    assert check_shared_memory(32 * 2**20, "small") is None  # fits
    monkeypatch.setattr(os, "statvfs", lambda path: (_ for _ in ()).throw(FileNotFoundError(path)))
    assert check_shared_memory(5 * 2**30, "no /dev/shm") is None  # nothing to compare with


def test_loader_check_counts_the_largest_loader_and_every_local_process(monkeypatch):
    seen = []
    monkeypatch.setattr(runtime, "check_shared_memory", lambda needed, what, path: seen.append((needed, what)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    check_loader_shared_memory([100, 300], batch_size=10, num_workers=2)
    assert seen == [(300 * 10 * 2 * 2 * 4, "--batch-size 10, --num-workers 2, prefetch 2 batches per worker, "
                     "4 processes on this machine")]  # fmt: skip
    monkeypatch.setenv("LOCAL_RANK", "1")  # one warning per machine
    check_loader_shared_memory([100, 300], batch_size=10, num_workers=2)
    assert len(seen) == 1


BUS_ERROR = (
    "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's workers are "
    "out of shared memory. Please try to raise your shared memory limit."
)


def test_a_bus_error_of_a_worker_becomes_one_line_of_advice(capsys):
    def body():
        with shared_memory_errors("--batch-size 1024, --num-workers 16"):
            raise RuntimeError(BUS_ERROR)

    assert run_cli("p2ch.x", body) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("p2ch.x: error: a DataLoader worker was killed by a bus error")
    assert "--batch-size 1024, --num-workers 16" in err and "--ipc=host" in err and "--shm-size" in err


def test_other_runtime_errors_pass_through_shared_memory_errors():
    with pytest.raises(RuntimeError, match="CUDA out of memory"), shared_memory_errors():
        raise RuntimeError("CUDA out of memory")
    with pytest.raises(SharedMemoryError), shared_memory_errors():
        raise RuntimeError(BUS_ERROR)


def test_run_epoch_turns_a_bus_error_into_shared_memory_error():
    from p2ch.loop import run_epoch

    def loader():
        yield torch.zeros(2)
        raise RuntimeError(BUS_ERROR)

    with pytest.raises(SharedMemoryError, match="bus error"):
        run_epoch(
            loader(), lambda b: {"x": b}, device=torch.device("cpu"), dist=DistInfo(), desc="t",
            total_samples=4, batches=2, show_progress=False,
        )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_real_gpu_amp_auto_follows_the_compute_capability_and_logits_are_float32():
    from p2ch.model import LunaModel

    device = torch.device("cuda", 0)
    native = torch.cuda.get_device_capability(device)[0] >= 8
    assert resolve_amp("auto", device) is (torch.bfloat16 if native else torch.float16)
    model = LunaModel().to(device).eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=resolve_amp("auto", device)):
        logits, prob = model(torch.randn(4, 1, 32, 48, 48, device=device))
    assert logits.dtype == torch.float32 and prob.dtype == torch.float32


def test_remove_stale_temporaries_takes_only_what_a_cut_off_write_of_those_names_left(tmp_path):
    for name in (".last.pt.a1b2.tmp", ".best.pt.zz.tmp", ".other.pt.x.tmp", "last.pt", ".last.pt.keep", "x.tmp"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path, ("last.pt", "best.pt"))
    assert sorted(p.name for p in removed) == [".best.pt.zz.tmp", ".last.pt.a1b2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.pt.keep", ".other.pt.x.tmp", "last.pt", "x.tmp"]
