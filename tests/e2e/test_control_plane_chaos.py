"""End to end: the control plane killed under a workload, every part once, and nothing fails.

`mpsflow demo --scenario simulation/scenarios/control-plane-chaos.yaml --replicas 2 --chaos ...` runs
two replicas of the pod watcher, the planner and the config publisher (one active by its lease) and
SIGKILLs the active replica of each, then the NATS server (its store kept), while pods keep arriving
and finishing; each is started again one second later. Every valid pod must run or succeed, no
counter may move, and each target must serve again within 5 s of its kill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulation.scenario import load_scenario

pytestmark = pytest.mark.e2e

SCENARIO = Path(__file__).resolve().parents[2] / "simulation" / "scenarios" / "control-plane-chaos.yaml"
CHAOS = "kill:planner@3,kill:config-publisher@6,kill:pod-watcher@9,kill:nats@12"
TAKEOVER_LIMIT_S = 5.0


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("control-plane-chaos") / "summary.json"
    command = [sys.executable, "-m", "services.cli", "demo", "--scenario", str(SCENARIO)]
    command += ["--replicas", "2", "--chaos", CHAOS, "--json", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert finished.returncode == 0, finished.stdout[-5000:] + finished.stderr[-2000:]
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def test_every_target_was_killed_and_served_again_within_seconds(summary: dict[str, Any]) -> None:
    kills = {entry["target"]: entry for entry in summary["chaos"]}
    assert set(kills) == {"planner", "config-publisher", "pod-watcher", "nats"}
    for target, entry in kills.items():
        assert entry["takeover_seconds"] <= TAKEOVER_LIMIT_S, (target, entry)
        assert entry["recovered_seconds"] is not None, (target, entry)
    for service in ("planner", "config-publisher", "pod-watcher"):
        assert kills[service]["killed"] in {f"{service}-1", f"{service}-2"}  # the replica holding its lease


def test_no_pod_failed_and_nothing_went_wrong(summary: dict[str, Any]) -> None:
    pods = summary["pods"]
    assert set(pods) == {item.key for item in load_scenario(SCENARIO).workload}
    assert all(pod["phase"] in ("Running", "Succeeded") for pod in pods.values()), pods
    counters = summary["counters"]
    assert {name: counters[name] for name in counters if name != "plans"} == {
        "configs_refused": 0,
        "admission_failures": 0,
        "plans_while_idle": 0,
        "service_errors": 0,
    }, summary["service_error_lines"]
