"""Whoever serves the slices to the kubelet (the MPS daemon keeper, or an agent with `--mps-daemons own`)
refuses to start beside another GPU device plugin that serves the node's GPUs."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.device_plugin import foreign_gpu_plugins


@pytest.fixture
def plugin_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dp-", dir="/tmp") as root:  # socket paths stay short
        yield Path(root)


def serve_on(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    return listener


def test_only_a_serving_nvidia_plugin_counts(plugin_dir: Path) -> None:
    with serve_on(plugin_dir / "nvidia-gpu.sock"), serve_on(plugin_dir / "mpsflow-gpu-10gb.sock"):
        stale = serve_on(plugin_dir / "nvidia-mig-1g.10gb.sock")
        stale.close()  # the file stays; nothing answers on it
        assert foreign_gpu_plugins(plugin_dir) == ["nvidia-gpu.sock"]
    assert foreign_gpu_plugins(plugin_dir) == []


@pytest.mark.parametrize(
    "command",
    [
        ["run", "mps-daemons", "--node", "gpu-1"],  # it serves the slices to the kubelet
        ["run", "node-agent", "--node", "gpu-1", "--mps-daemons", "own"],  # so does the agent, then
    ],
    ids=["keeper", "agent-serving-its-own-slices"],
)
def test_whoever_serves_the_slices_refuses_to_start_and_says_which_label_turns_the_other_off(
    plugin_dir: Path, command: list[str]
) -> None:
    with serve_on(plugin_dir / "nvidia-gpu.sock"):
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", *command, "--plugin-dir", str(plugin_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 3, result.stderr
    assert (
        f"mpsflow run {command[1]}: another GPU device plugin serves this node (nvidia-gpu.sock"
        in result.stderr
    )
    assert "nvidia.com/gpu.deploy.device-plugin=false" in result.stderr
