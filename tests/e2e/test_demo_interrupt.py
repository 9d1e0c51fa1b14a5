"""Ctrl-C or SIGTERM during `mpsflow demo` stops everything the demo started (fake MPS daemons too,
which detach from their agents as real ones do) and removes its files."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line or environment mentions `text` (zombies have neither)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        for part in ("cmdline", "environ"):
            try:
                if text.encode() in (proc / part).read_bytes():
                    found.append(int(proc.name))
                    break
            except OSError:
                continue
    return found


@pytest.mark.parametrize(
    ("stop", "status", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_a_stopped_demo_stops_every_process_and_removes_the_work_directory(
    stop: signal.Signals, status: int, said: str
) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert demo.stdout is not None
    base = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = demo.stdout.readline()
        match = re.search(r"logs in (/tmp/mpsflow-[^/]+)/logs", line)
        if match:
            base = match.group(1)
        if "playing" in line:
            break
    assert base is not None
    assert processes_mentioning(base), "the services should be running now"
    daemons = list(Path(base).glob("nodes/*/mps/*/pipe/nvidia-cuda-mps-control.pid"))
    assert daemons, "the node agents should have started their MPS daemons"
    demo.send_signal(stop)
    _, errors = demo.communicate(timeout=30)
    assert demo.returncode == status
    assert said in errors
    assert processes_mentioning(base) == []
    assert not Path(base).exists()
