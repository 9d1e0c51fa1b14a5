"""The node agent and the daemon keeper refuse to start while another MPS control daemon answers."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import build_parser, refuses_for_foreign_mps_daemon


@pytest.fixture
def root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fmps-", dir="/tmp") as directory:  # socket paths stay short
        yield Path(directory)


def listen_on(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    return listener


def mpsflow(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "service",
    [
        pytest.param(["node-agent", "--plugin-dir", "{root}/device-plugins"], id="node-agent"),
        pytest.param(["mps-daemons"], id="mps-daemons"),
    ],
)
def test_each_service_refuses_and_says_how_to_turn_the_other_daemon_off(
    root: Path, service: list[str]
) -> None:
    plugin_pipe = root / "nvidia-mps-root" / "nvidia.com" / "gpu" / "pipe"
    (root / "device-plugins").mkdir()
    with listen_on(plugin_pipe / "control"):
        result = mpsflow(
            "run",
            *(argument.format(root=root) for argument in service),
            "--node",
            "gpu-1",
            "--foreign-mps-dirs",
            str(root / "cuda-default"),
            str(root / "nvidia-mps-root"),
        )

    assert result.returncode == 3, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"mpsflow run {service[0]}: another MPS control daemon answers on this node")
    assert str(plugin_pipe / "control") in line
    assert "nvidia.com/gpu.deploy.device-plugin=false" in line
    assert f"echo quit | CUDA_MPS_PIPE_DIRECTORY={plugin_pipe} nvidia-cuda-mps-control" in line


@pytest.mark.parametrize("service", ["node-agent", "mps-daemons"])
def test_a_socket_a_dead_daemon_left_blocks_nothing(root: Path, service: str) -> None:
    listen_on(root / "control").close()
    args = build_parser().parse_args(["run", service, "--node", "gpu-1", "--foreign-mps-dirs", str(root)])

    assert not refuses_for_foreign_mps_daemon(args)


def test_the_check_can_be_skipped(root: Path) -> None:
    with listen_on(root / "control"):
        checked = build_parser().parse_args(
            ["run", "node-agent", "--node", "n", "--foreign-mps-dirs", str(root)]
        )
        skipped = build_parser().parse_args(["run", "node-agent", "--node", "n", "--foreign-mps-dirs"])

        assert refuses_for_foreign_mps_daemon(checked)
        assert not refuses_for_foreign_mps_daemon(skipped)
