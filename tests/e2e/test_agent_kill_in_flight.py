"""End to end: pods in flight to a node when its agent is killed with SIGKILL all run.

`mpsflow demo --scenario simulation/scenarios/agent-kill-in-flight.yaml --chaos kill:node-agent/a100-1@8`:
six pods arrive from 7.7 s onto free slices of a100-1, so some are released, bound or being admitted
when the agent dies at 8 s, and others are released while it is away. The node's slices are served to
the kubelet by its mps-daemons keeper, which the kill leaves alone (`node_agent.link`), so the
kubelet never loses a device: every pod must be admitted and run. Before the keeper served the
slices, five of these six pods failed admission (`UnexpectedAdmissionError`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

SCENARIO = Path(__file__).resolve().parents[2] / "simulation" / "scenarios" / "agent-kill-in-flight.yaml"
KILL = "kill:node-agent/a100-1@8"


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("agent-kill") / "summary.json"
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "demo",
            "--scenario",
            str(SCENARIO),
            "--chaos",
            KILL,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout[-5000:] + finished.stderr[-2000:]
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def test_pods_were_in_flight_to_the_node_when_its_agent_died(summary: dict[str, Any]) -> None:
    """The premise, checked: some late pods had not started when the agent was killed."""
    [kill] = summary["chaos"]
    assert kill["at_kill"]["waiting"], "no pod was in flight at the kill: the test's premise broke"
    assert kill["recovered_seconds"] > 0


def test_every_pod_in_flight_is_admitted_and_runs(summary: dict[str, Any]) -> None:
    pods = summary["pods"]
    assert {key for key, pod in pods.items() if pod["phase"] == "Running"} == {
        f"ml/late-{i}" for i in range(6)
    }
    assert all(pod["phase"] == "Succeeded" for key, pod in pods.items() if key.startswith("ml/warm-"))
    counters = summary["counters"]
    errors = summary["service_error_lines"]
    assert (counters["admission_failures"], counters["configs_refused"], counters["service_errors"]) == (
        0,
        0,
        0,
    ), errors
