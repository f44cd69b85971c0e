"""The command wrapper (p2ch.cli) and the device and AMP spellings (p2ch.runtime)."""

from __future__ import annotations

import pytest
import torch

from p2ch.cli import run_cli
from p2ch.errors import ConfigError, DataNotFoundError
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


def test_device_and_amp_spellings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_amp("auto", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="is not a device"):
        resolve_device("tpu:x")
