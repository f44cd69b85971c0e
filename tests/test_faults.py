"""Faults of worker processes: DataLoader workers do not outlive a killed parent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from processes import wait_for_children, wait_until_gone

REPO = Path(__file__).resolve().parents[1]

# Two DataLoader workers, each stuck in __getitem__ (as in a long CT load), while the parent waits.
BUSY_LOADER = textwrap.dedent("""
    import sys, time
    import torch
    from torch.utils.data import Dataset
    from p2ch.datasets import EvalSampler, create_loader

    class Busy(Dataset):
        def __len__(self):
            return 1000

        def __getitem__(self, k):
            time.sleep(0 if k == 0 else 600)
            return torch.zeros(1)

    loader = create_loader(Busy(), EvalSampler(1000), batch_size=1, num_workers=2, collate_fn=list)
    for batch in loader:
        print("first batch", flush=True)
""")


def test_dataloader_workers_busy_in_getitem_exit_when_the_parent_is_killed(tmp_path):
    """torch's watchdog ends only idle workers (after ~5 s); one busy reading must end too, at once."""
    script = tmp_path / "busy_loader.py"
    script.write_text(BUSY_LOADER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline() == b"first batch\n"
        workers = wait_for_children(proc.pid, 2, 30)
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert not wait_until_gone(workers, 5), "DataLoader workers outlived their parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
