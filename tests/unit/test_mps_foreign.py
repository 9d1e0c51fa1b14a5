"""Finding another MPS control daemon on the node: real unix sockets in temporary pipe directories.

A socket something listens on is a live daemon; a socket file whose listener is gone (what a daemon that
died leaves) is not. The layouts are the real ones: CUDA's default pipe directory holds `control`
directly, NVIDIA's device plugin keeps it in `<root>/<resource name>/pipe/control`.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from node_agent.foreign import (
    DEFAULT_FOREIGN_MPS_DIRS,
    SEARCH_DEPTH,
    accepts_connection,
    foreign_mps_daemons,
    refusal,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
OWN_ROOT = Path("/run/mpsflow/mps")


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


def leave_stale(path: Path) -> None:
    """A socket file nobody listens on any more, as a daemon killed without cleaning up leaves it."""
    listen_on(path).close()


def test_a_daemon_on_cudas_default_layout_is_found(root: Path) -> None:
    with listen_on(root / "control"):
        assert foreign_mps_daemons([root], own_root=OWN_ROOT) == [root / "control"]


def test_a_daemon_of_nvidias_device_plugin_is_found(root: Path) -> None:
    control = root / "nvidia.com" / "gpu" / "pipe" / "control"
    with listen_on(control):
        assert foreign_mps_daemons([root], own_root=OWN_ROOT) == [control]


def test_a_socket_left_by_a_dead_daemon_does_not_count(root: Path) -> None:
    leave_stale(root / "control")
    leave_stale(root / "nvidia.com" / "gpu.shared" / "pipe" / "control")

    assert (root / "control").is_socket()
    assert not accepts_connection(root / "control")
    assert foreign_mps_daemons([root], own_root=OWN_ROOT) == []


def test_only_live_control_sockets_count(root: Path) -> None:
    live = root / "nvidia.com" / "gpu" / "pipe" / "control"
    (root / "other" / "pipe").mkdir(parents=True)
    (root / "other" / "pipe" / "control").write_text("not a socket")
    leave_stale(root / "control")
    with listen_on(live), listen_on(root / "nvidia.com" / "gpu" / "pipe" / "control_privileged"):
        assert foreign_mps_daemons([root], own_root=OWN_ROOT) == [live]
    assert foreign_mps_daemons([root], own_root=OWN_ROOT) == []


def test_every_directory_is_searched_and_a_missing_one_finds_nothing(root: Path) -> None:
    cuda, plugin = root / "cuda", root / "plugin"
    with listen_on(cuda / "control"), listen_on(plugin / "nvidia.com" / "gpu" / "pipe" / "control"):
        found = foreign_mps_daemons([root / "missing", plugin, cuda], own_root=OWN_ROOT)

    assert found == sorted([cuda / "control", plugin / "nvidia.com" / "gpu" / "pipe" / "control"])


def test_mpsflows_own_daemons_are_not_foreign(root: Path) -> None:
    own = root / "mpsflow"
    with listen_on(own / "GPU-1" / "pipe" / "control"), listen_on(root / "control"):
        assert foreign_mps_daemons([root], own_root=own) == [root / "control"]


def test_symbolic_links_are_not_followed(root: Path) -> None:
    elsewhere = root / "elsewhere"
    searched = root / "searched"
    searched.mkdir()
    with listen_on(elsewhere / "pipe" / "control"):
        (searched / "linked-directory").symlink_to(elsewhere, target_is_directory=True)
        (searched / "control").symlink_to(elsewhere / "pipe" / "control")
        assert foreign_mps_daemons([searched], own_root=OWN_ROOT) == []


def test_the_search_stops_at_its_depth(root: Path) -> None:
    within = root.joinpath(*["d"] * SEARCH_DEPTH) / "control"
    beyond = root.joinpath(*["e"] * (SEARCH_DEPTH + 1)) / "control"
    with listen_on(within), listen_on(beyond):
        assert foreign_mps_daemons([root], own_root=OWN_ROOT) == [within]


def test_the_refusal_says_what_it_found_and_how_to_turn_it_off() -> None:
    control = Path("/run/nvidia/mps/nvidia.com/gpu/pipe/control")

    line = refusal("node-agent", [control])

    assert "\n" not in line
    assert line.startswith("mpsflow run node-agent: another MPS control daemon answers on this node")
    assert str(control) in line
    assert "nvidia.com/gpu.deploy.device-plugin=false" in line
    assert (
        "echo quit | CUDA_MPS_PIPE_DIRECTORY=/run/nvidia/mps/nvidia.com/gpu/pipe nvidia-cuda-mps-control"
        in line
    )


def _daemon_set(name: str) -> dict[str, Any]:
    for document in yaml.safe_load_all((REPO_ROOT / "k8s" / "base" / f"{name}.yaml").read_text()):
        if document and document["kind"] == "DaemonSet":
            return dict(document)
    raise AssertionError(f"no DaemonSet in k8s/base/{name}.yaml")


@pytest.mark.parametrize("name", ["node-agent", "mps-daemons"])
def test_both_daemon_sets_see_the_foreign_directories_read_only_where_the_defaults_look(name: str) -> None:
    spec = _daemon_set(name)["spec"]["template"]["spec"]
    host = {volume["name"]: volume["hostPath"]["path"] for volume in spec["volumes"] if "hostPath" in volume}
    [container] = spec["containers"]
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}

    for directory in map(str, DEFAULT_FOREIGN_MPS_DIRS):
        assert host[mounts[directory]["name"]] == directory
        assert mounts[directory].get("readOnly") is True
    assert "--foreign-mps-dirs" not in container["args"]
