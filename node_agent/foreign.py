"""Another MPS control daemon on this node: found before the node agent or the daemon keeper starts.

Where it sits: `mpsflow run node-agent` and `mpsflow run mps-daemons` (`services/cli.py`) call
`foreign_mps_daemons` once, before they start anything, and refuse to start (exit 3, with the one
line `refusal` composes) when it finds one, as they refuse beside another GPU device plugin
(`node_agent.device_plugin.foreign_gpu_plugins`). A control daemon that mpsflow does not own shares the
GPUs outside any slice: its servers hold memory and SMs the planner never counts, its clients are capped
by nobody's plan, and NVIDIA's device plugin sets the compute mode back to DEFAULT when it stops its
daemon. Where they live (docs/mps.md §8):

* `/tmp/nvidia-mps`: CUDA's default `CUDA_MPS_PIPE_DIRECTORY`, used by a daemon started by hand or by a
  host service without one (NVIDIA's MPS documentation, "CUDA_MPS_PIPE_DIRECTORY");
* `/run/nvidia/mps`: the host root of NVIDIA's device plugin and the GPU Operator, which keep one
  daemon per shared resource in `<root>/<resource name>/pipe`, e.g.
  `/run/nvidia/mps/nvidia.com/gpu/pipe/control` (NVIDIA/k8s-device-plugin
  `cmd/mps-control-daemon/mps/root.go`, the chart's `mps.root`; NVIDIA/gpu-operator
  `assets/state-mps-control-daemon/0400_daemonset.yaml`).

A daemon counts when its `control` socket (the one CUDA clients and `nvidia-cuda-mps-control` connect to)
accepts a connection: a socket file left by a daemon that died does not count, nor does one under
mpsflow's own pipe root.

This module only looks: it never sends a command, stops a daemon or removes a file. It never follows a
symbolic link and never opens a file (a pipe directory holds a FIFO, `log`, that an open would block on);
a probe connects and hangs up at once (the real daemon may log it as a connection that sent nothing).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from node_agent.mps import CONTROL_SOCKET_NAME

DEFAULT_FOREIGN_MPS_DIRS = (Path("/tmp/nvidia-mps"), Path("/run/nvidia/mps"))
"""CUDA's default pipe directory, and the MPS root of NVIDIA's device plugin and GPU Operator."""

SEARCH_DEPTH = 6
"""Directory levels searched below each directory: NVIDIA's device plugin puts its socket three levels
down (`nvidia.com/gpu/pipe/control`), and an MPS v3 daemon's namespaces add two more."""

_PROBE_TIMEOUT_S = 1.0


def foreign_mps_daemons(directories: Iterable[Path], *, own_root: Path) -> list[Path]:
    """The control sockets under `directories` (the directories themselves and `SEARCH_DEPTH` levels
    below) on which an MPS control daemon answers now, sorted; those under `own_root` are left out.
    A missing or unreadable directory finds nothing."""
    own = Path(os.path.realpath(own_root))
    found = set()
    for directory in directories:
        for candidate in _control_sockets(directory):
            if Path(os.path.realpath(candidate)).is_relative_to(own):
                continue
            if accepts_connection(candidate):
                found.add(candidate)
    return sorted(found)


def accepts_connection(path: Path) -> bool:
    """Whether something listens on the unix socket at `path` (connects, then hangs up at once)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT_S)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def refusal(service: str, sockets: Sequence[Path]) -> str:
    """The one line a service writes when it refuses to start beside the daemons on `sockets`: what it
    found, why that matters, and how to turn the other daemon off."""
    found = ", ".join(str(path) for path in sockets)
    pipe_dir = sockets[0].parent
    return (
        f"mpsflow run {service}: another MPS control daemon answers on this node ({found}); it would "
        "share the GPUs outside mpsflow's slices. Turn it off: for NVIDIA's device plugin or the GPU "
        "Operator, label the node nvidia.com/gpu.deploy.device-plugin=false (or take MPS sharing out of "
        "the plugin's config for this node); for a daemon started on the host, run "
        f"`echo quit | CUDA_MPS_PIPE_DIRECTORY={pipe_dir} nvidia-cuda-mps-control` there and disable "
        "what starts it"
    )


def _control_sockets(directory: Path) -> list[Path]:
    """Unix sockets named `control` in `directory` and below, without following symbolic links."""
    sockets = []
    base_depth = len(directory.parts)
    for parent, subdirectories, files in os.walk(directory):
        here = Path(parent)
        if len(here.parts) - base_depth >= SEARCH_DEPTH:
            subdirectories.clear()
        if CONTROL_SOCKET_NAME in files:
            candidate = here / CONTROL_SOCKET_NAME
            try:
                mode = candidate.lstat().st_mode
            except OSError:
                continue
            if stat.S_ISSOCK(mode):
                sockets.append(candidate)
    return sockets
