"""The control daemon's replies mpsflow relies on, one row each, with where each format comes from.

Every row's `source` reads `verified: <public source>` or `unverified: <why>`; docs/mps.md §3 is the same
table for people. Two suites hold code to these rows: the contract suite
(`test_mps_control_contract.py`) holds the fake daemon and, with `-m gpu`, the real one to each reply and
failure, so the first GPU run settles the unverified rows; `tests/unit/test_mps_replies.py` holds
`node_agent.mps`'s parsers to each documented reply and the fake's command semantics to each row, without
a process. When the real daemon contradicts a row, change the row, the fake
(`simulation/fake_mps_commands.py`) and docs/mps.md §3 to what it said, and mark the row verified with the
driver version.

Sources, cited by the rows:

* OPERATOR_DOCS: NVIDIA GPU Operator documentation, "Multi-Process Service in Kubernetes", section
  "Verifying the MPS Configuration" (docs.nvidia.com/datacenter/cloud-native/gpu-operator/latest/
  gpu-sharing-mps.html; source NVIDIA/cloud-native-docs `gpu-operator/gpu-sharing-mps.rst`): a daemon of
  NVIDIA's device plugin with 4 replicas answers `get_default_active_thread_percentage` with `25.0` and
  `get_default_device_pinned_mem_limit` with `3G`.
* PLUGIN_SOURCE: NVIDIA/k8s-device-plugin `cmd/mps-control-daemon/mps/daemon.go`: sets the limit as
  `set_default_device_pinned_mem_limit <index> <total/replicas>M` and the threads as an integer, reads only
  the exit status of every command, and uses `get_default_active_thread_percentage` as its health probe.
* CAPTURE: a public operator's script that pins the replies of a GPU Operator MPS daemon on 40 GiB GPUs
  with 8 replicas (`get_server_list` `3166883`, `get_server_status` `ACTIVE`, limits `5G` where the
  plugin set `5120M`, threads `12.0`); the code index does not name its repository.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from node_agent.mps import parse_mem_limit, parse_server_list, parse_thread_percentage

OPERATOR_DOCS = "NVIDIA GPU Operator docs, 'Multi-Process Service in Kubernetes' (gpu-sharing-mps.rst)"
PLUGIN_SOURCE = "NVIDIA/k8s-device-plugin cmd/mps-control-daemon/mps/daemon.go"
CAPTURE = "a public capture of a GPU Operator MPS daemon's replies (repository unnamed in the index)"
NO_DAEMON_MESSAGE = "Cannot find MPS control daemon process"


@dataclass(frozen=True)
class Reply:
    """A command the daemon accepts, and what it prints on stdout (stripped)."""

    id: str
    command: str
    example: str
    """The reply as the source shows it (for an unverified row, the fake's)."""
    source: str
    setup: tuple[str, ...] = ()
    """Commands sent first; `{uid}` stands for the test's own user id."""
    pattern: str = ""
    """A regular expression the daemon's reply must match whole; empty: exactly `example`."""
    parser: Callable[[str], object] | None = None
    """How `node_agent.mps` reads this reply; None where mpsflow ignores the text."""
    parsed: object = field(default=None)
    """What `parser` makes of `example`."""

    def matches(self, reply: str) -> bool:
        return re.fullmatch(self.pattern or re.escape(self.example), reply) is not None


@dataclass(frozen=True)
class Failure:
    """A command that must fail: the control client exits non-zero."""

    id: str
    command: str
    source: str
    daemon_running: bool = True
    exit_status: int | None = None
    """The exact status where known; None: any non-zero status."""
    output: str = ""
    """Text the client's output (stdout and stderr together) must contain; empty where unknown."""


REPLIES = (
    Reply(
        "threads-fresh-default",
        "get_default_active_thread_percentage",
        "100.0",
        "unverified: the one-decimal format is verified (rows below) and 100 is the documented default "
        "(MPS docs, set_default_active_thread_percentage); a fresh daemon's exact text is not shown",
        parser=parse_thread_percentage,
        parsed=100.0,
    ),
    Reply(
        "threads-set-25",
        "get_default_active_thread_percentage",
        "25.0",
        f"verified: {OPERATOR_DOCS}, after {PLUGIN_SOURCE} set 25",
        setup=("set_default_active_thread_percentage 25",),
        parser=parse_thread_percentage,
        parsed=25.0,
    ),
    Reply(
        "threads-set-50",
        "get_default_active_thread_percentage",
        "50.0",
        "verified: openshift/origin test/extended/dra/mps_spec.go expects exactly the line 50.0 from a "
        "daemon that NVIDIA's DRA driver set to 50; 12.0 in " + CAPTURE,
        setup=("set_default_active_thread_percentage 50",),
        parser=parse_thread_percentage,
        parsed=50.0,
    ),
    Reply(
        "limit-set-in-mib-read-in-gib",
        "get_default_device_pinned_mem_limit 0",
        "5G",
        f"verified: {OPERATOR_DOCS} shows 3G for a limit {PLUGIN_SOURCE} sets in M; 5G for 5120M in "
        + CAPTURE,
        setup=("set_default_device_pinned_mem_limit 0 5120M",),
        parser=parse_mem_limit,
        parsed=5120,
    ),
    Reply(
        "limit-set-in-gib",
        "get_default_device_pinned_mem_limit 0",
        "10G",
        f"verified: a whole number of GiB reads back in G ({OPERATOR_DOCS}; {CAPTURE})",
        setup=("set_default_device_pinned_mem_limit 0 10G",),
        parser=parse_mem_limit,
        parsed=10240,
    ),
    Reply(
        "limit-not-a-whole-gib",
        "get_default_device_pinned_mem_limit 0",
        "1536M",
        "unverified: no public source shows such a limit read back; the real daemon may round it down to "
        "GiB (the docs' 3G would be 3840M on the 15360 MiB T4 their node listing shows). mpsflow sets "
        "whole GiB only",
        setup=("set_default_device_pinned_mem_limit 0 1536M",),
        parser=parse_mem_limit,
        parsed=1536,
    ),
    Reply(
        "limit-unset",
        "get_default_device_pinned_mem_limit 0",
        "N/A",
        "unverified: no public source shows the reply for an unset limit (the fake's choice); the agent "
        "never reads an unset limit",
        parser=parse_mem_limit,
        parsed=None,
    ),
    Reply(
        "server-list-empty",
        "get_server_list",
        "",
        "verified: NVIDIA/k8s-device-plugin#1595 (a fresh daemon answers get_server_list with nothing)",
        parser=parse_server_list,
        parsed=[],
    ),
    Reply(
        "server-list-one",
        "get_server_list",
        "3166883",
        "verified: MPS docs (get_server_list prints the PIDs of the servers); 3166883 in " + CAPTURE,
        setup=("start_server -uid {uid}",),
        pattern=r"[1-9][0-9]*",
        parser=parse_server_list,
        parsed=[3166883],
    ),
    Reply(
        "set-says-nothing",
        "set_default_active_thread_percentage 50",
        "",
        f"unverified: {PLUGIN_SOURCE} and mpsflow read only the exit status of a set command",
    ),
    Reply(
        "quit-says-nothing",
        "quit",
        "",
        "unverified: mpsflow reads only the exit status of quit (and sends it only from doctor and tests)",
    ),
)

FAILURES = (
    Failure(
        "no-daemon",
        "get_server_list",
        "verified: public MPS scripts expect this text and status 1 from the client when no daemon runs; "
        f"{PLUGIN_SOURCE}'s health probe relies on the non-zero status",
        daemon_running=False,
        exit_status=1,
        output=NO_DAEMON_MESSAGE,
    ),
    Failure(
        "threads-out-of-range",
        "set_default_active_thread_percentage 250",
        "unverified: no public source shows a refusal; mpsflow relies on a non-zero exit status",
    ),
    Failure(
        "unknown-command",
        "get_default_thread_percentage",
        "unverified: no public source shows the reply to an unknown command",
    ),
)
