"""End to end: a node agent killed with SIGKILL mid-workload disturbs nothing.

`mpsflow demo --scenario simulation/scenarios/agent-restart.yaml --chaos kill:node-agent/a100-1@8`:
four pods start on a100-1 at once, its agent is killed at 8 s and started again one second later with
the same command line (as a kubelet restarts a crashed container), and two more pods come at 14 s. The
node's MPS daemons and their keeper must live on untouched, the running pods must keep their slices
(device IDs) and environment, the restarted agent must adopt those slices and serve the node again,
and the later pods must run there.

While the demo runs, the test also watches the node from outside, as someone on the node would: the
MPS control daemons' pid files and the commands each daemon was sent, and which agent and daemon
keeper processes the demo runs.

What this test leaves to another: the agent is killed when the first pods have long been running and
nothing is in flight to the node (the test checks from the summary that this held rather than assuming
it), and the next pods come only after the agent serves the node again. Pods in flight around the kill
are `tests/e2e/test_agent_kill_in_flight.py`'s.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from simulation.fake_mps_control import PID_FILE_NAME, read_logged_commands
from simulation.scenario import load_scenario

pytestmark = pytest.mark.e2e

SCENARIO = Path(__file__).resolve().parents[2] / "simulation" / "scenarios" / "agent-restart.yaml"
NODE = "a100-1"
KILL_AT = 8.0
CHAOS = f"kill:node-agent/{NODE}@{KILL_AT:g}"
POLL_S = 0.1
RUN_LIMIT_S = 150.0  # the scenario's 60 s timeout, the cluster's start and the quiet period, with room
STOPPING_COMMANDS = ("quit", "shutdown_server")
LOGS_IN = re.compile(r"logs in (/tmp/mpsflow-[^/]+)/logs")  # where the demo's work directory is


@dataclass
class Run:
    """One demo run, and what the test saw on the node while it ran."""

    returncode: int
    output: str
    summary: dict[str, Any]
    daemon_pids: dict[str, set[int]] = field(default_factory=dict)  # GPU UUID -> every pid its pid file held
    daemon_commands: dict[str, list[str]] = field(default_factory=dict)  # GPU UUID -> commands, oldest first
    agent_pids: set[int] = field(default_factory=set)
    keeper_pids: set[int] = field(default_factory=set)


def _children_running(parent: int, base: str, service: str) -> set[int]:
    """Children of `parent` whose command line runs `service` with files under `base` (grandchildren,
    such as an MPS control command an agent runs, are not counted: they may show their parent's
    command line between fork and exec)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            arguments = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and service.encode() in arguments and any(base.encode() in a for a in arguments):
            found.add(int(proc.name))
    return found


def _watch_node(run: Run, demo: subprocess.Popen[str], lines: list[str]) -> None:
    """Until the demo ends (or `RUN_LIMIT_S`): every pid file of the node's MPS daemons, the commands
    they logged, and the node's agent and daemon keeper processes."""
    base: str | None = None
    deadline = time.monotonic() + RUN_LIMIT_S
    while demo.poll() is None and time.monotonic() < deadline:
        if base is None:
            found = [match.group(1) for line in lines if (match := LOGS_IN.search(line))]
            base = found[0] if found else None
        if base is not None:
            mps = Path(base) / "nodes" / NODE / "mps"
            for pid_file in mps.glob(f"*/pipe/{PID_FILE_NAME}"):
                uuid = pid_file.parent.parent.name
                try:
                    run.daemon_pids.setdefault(uuid, set()).add(int(pid_file.read_text().strip()))
                    run.daemon_commands[uuid] = read_logged_commands(mps / uuid / "log")
                except (OSError, ValueError):  # being written, or removed as the demo ends
                    continue
            run.agent_pids |= _children_running(demo.pid, base, "node-agent")
            run.keeper_pids |= _children_running(demo.pid, base, "mps-daemons")
        time.sleep(POLL_S)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("agent-restart") / "summary.json"
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "demo",
            "--scenario",
            str(SCENARIO),
            "--chaos",
            CHAOS,
            "--json",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout or ()), daemon=True)
    reader.start()
    observed = Run(returncode=-1, output="", summary={})
    try:
        _watch_node(observed, demo, lines)
    finally:
        if demo.poll() is None:  # stopped as Ctrl-C would stop it, so that it stops what it started
            demo.terminate()
            demo.wait(timeout=30)
    reader.join(timeout=10)
    observed.returncode = demo.returncode
    observed.output = "".join(lines)
    assert observed.returncode == 0, observed.output[-5000:]
    observed.summary = json.loads(out.read_text())
    return observed


@pytest.fixture(scope="module")
def kill(run: Run) -> dict[str, Any]:
    entries: list[dict[str, Any]] = run.summary["chaos"]
    [entry] = entries
    assert entry["target"] == f"node-agent/{NODE}" and entry["at"] == KILL_AT
    return entry


def test_the_kill_found_pods_running_and_none_in_flight(kill: dict[str, Any]) -> None:
    """The premise of this test (see the module docstring), checked rather than assumed."""
    assert kill["at_kill"]["waiting"] == [], "a pod was in flight at the kill: the test's premise broke"
    started_at_zero = {item.key for item in load_scenario(SCENARIO).workload if item.at == 0}
    assert set(kill["at_kill"]["running"]) == started_at_zero


def test_the_agent_serves_the_node_again_before_the_next_pods_come(kill: dict[str, Any]) -> None:
    recovered = kill["recovered_seconds"]
    assert isinstance(recovered, float) and recovered > 0
    next_pods = min(item.at for item in load_scenario(SCENARIO).workload if item.at > KILL_AT)
    assert KILL_AT + 1 + recovered < next_pods, "the agent came back too late for the test's premise"


def test_the_agent_was_killed_and_started_again_and_its_daemon_keeper_was_not(run: Run) -> None:
    assert len(run.agent_pids) == 2, run.agent_pids
    assert len(run.keeper_pids) == 1, run.keeper_pids


def test_the_mps_daemons_live_on_untouched(run: Run, kill: dict[str, Any]) -> None:
    at_kill = kill["at_kill"]["daemon_pids"]
    assert len(at_kill) == 2 and None not in at_kill.values()
    assert kill["on_recovery"]["daemon_pids"] == at_kill
    # Seen from outside the whole run long: one daemon per GPU, never replaced, never told to stop.
    assert sorted(pid for pids in run.daemon_pids.values() for pid in pids) == sorted(at_kill.values())
    assert len(run.daemon_commands) == 2
    for uuid, commands in run.daemon_commands.items():
        assert not [c for c in commands if c.startswith(STOPPING_COMMANDS)], (uuid, commands)


def test_running_pods_keep_their_slices_and_environment(run: Run, kill: dict[str, Any]) -> None:
    running = kill["at_kill"]["running"]
    assert kill["on_recovery"]["running"] == running
    # The restarted agent adopted the slices the pods hold: its report names them, held by the same pods.
    assert kill["on_recovery"]["reported_holders"] == {key: pod["device_ids"] for key, pod in running.items()}
    for key, pod in running.items():
        final = run.summary["pods"][key]
        assert (final["device_ids"], final["env"]) == (pod["device_ids"], pod["env"]), key


def test_every_pod_runs_or_succeeds_and_nothing_went_wrong(run: Run) -> None:
    pods = run.summary["pods"]
    assert set(pods) == {item.key for item in load_scenario(SCENARIO).workload}
    for key, pod in pods.items():
        assert pod["phase"] in ("Running", "Succeeded"), (key, pod)
        assert pod["node"] == NODE, key
        assert pod["env"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={pod['size_gb'] * 1024}M", key
    assert pods["ml/batch-10"]["phase"] == "Succeeded"  # it ended after the restart
    counters = run.summary["counters"]
    assert {name: counters[name] for name in counters if name != "plans"} == {
        "configs_refused": 0,
        "admission_failures": 0,
        "plans_while_idle": 0,
        "service_errors": 0,
    }, run.summary["service_error_lines"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kill:node-agent/a100-1@soon", "--chaos: 'kill:node-agent/a100-1@soon': SECONDS must be a number"),
        (
            "kill:node-agent/gpu-9@3",
            "--chaos: 'kill:node-agent/gpu-9@3': 'gpu-9' is not one of the scenario's nodes",
        ),
        ("kill:scheduler@2", "--chaos: 'kill:scheduler@2': TARGET must be one of"),
    ],
    ids=["bad-seconds", "unknown-node", "unknown-target"],
)
def test_a_chaos_spec_the_demo_cannot_play_is_refused_naming_the_part(spec: str, message: str) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--scenario", str(SCENARIO), "--chaos", spec],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert finished.returncode == 2
    assert finished.stderr.startswith(f"mpsflow demo: {message}"), finished.stderr
    assert finished.stderr.count("\n") == 1 and finished.stdout == ""
