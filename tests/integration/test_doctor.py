"""`mpsflow doctor`: what it reports where there is no GPU (here, and in CI), and how far it gets on
simulated GPUs with the fake MPS daemon, up to the CUDA client that only a real GPU can run.

On a GPU machine, `mpsflow doctor` itself is the check: its CUDA client allocates just under and just
over a pinned limit through libcuda.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node_agent.doctor import Check, DoctorSettings, examine, report
from simulation.fake_nvml import FakeNvml, SimulatedGpu

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_MPS_CONTROL = (sys.executable, "-m", "simulation.fake_mps_control")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def test_without_a_gpu_it_says_so_and_exits_non_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LD_LIBRARY_PATH": "/nonexistent"},
    )
    if "fail  nvml" not in result.stdout:
        pytest.skip("this machine has an NVIDIA driver: `mpsflow doctor` is the check here")
    assert result.returncode == 1
    assert "no NVIDIA driver here" in result.stdout
    assert "skip  cuda client  no NVML" in result.stdout
    assert result.stdout.rstrip().endswith("not ready: nvml, gpus, mps control, mps daemon, cuda client")


async def test_on_simulated_gpus_it_checks_nvml_and_a_daemon_and_stops_at_the_cuda_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the fake daemon runs as `python -m simulation...`
    nvml = FakeNvml(
        [
            SimulatedGpu("NVIDIA A100-SXM4-80GB", 81920, mig_enabled=True),
            SimulatedGpu("NVIDIA H100 80GB HBM3", 81559, compute_capability=(9, 0)),
        ],
        node_name="doctor",
    )
    settings = DoctorSettings(mps_control=FAKE_MPS_CONTROL, slice_gb=3, libcuda="/nonexistent/libcuda.so.1")

    checks = by_name(await examine(settings, nvml))

    assert [checks[name].status for name in ("nvml", "gpus", "mps control", "mps daemon")] == ["ok"] * 4
    assert "GPU 0 NVIDIA-A100-SXM4-80GB" in checks["gpus"].detail and "MIG on" in checks["gpus"].detail
    assert "compute capability 9.0, MIG off" in checks["gpus"].detail
    # The daemon runs on the first GPU not in MIG mode, with the limit set and read back.
    assert checks["mps daemon"].detail.startswith("GPU 1: started in /tmp/mpsdoc-")
    assert "pinned limit 3072 MiB read back as '3G'" in checks["mps daemon"].detail
    # Without libcuda nothing can be a CUDA client: the check fails, and the report says not ready.
    assert checks["cuda client"].status == "fail"
    assert report(list(checks.values())).endswith("not ready: cuda client")


async def test_a_missing_mps_command_stops_it_before_any_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([SimulatedGpu("NVIDIA L4", 23034, compute_capability=(8, 9))], node_name="doctor")
    checks = by_name(await examine(DoctorSettings(mps_control=("no-such-mps-control",)), nvml))

    assert checks["mps control"] == Check("mps control", "fail", "no-such-mps-control is not on the PATH")
    assert (checks["mps daemon"].status, checks["cuda client"].status) == ("skip", "skip")
