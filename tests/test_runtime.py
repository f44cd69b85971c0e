"""The command wrapper (p2ch.cli) and the device and AMP spellings (p2ch.runtime)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from p2ch.cli import run_cli
from p2ch.config import check_output_dir, check_output_file
from p2ch.errors import CandidateOutsideCtError, ConfigError, DataNotFoundError
from p2ch.runtime import resolve_amp, resolve_device


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
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="is not a device"):
        resolve_device("tpu:x")
