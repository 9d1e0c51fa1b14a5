"""End to end under hostile timing: a real kubelet's 10 s node-status sync, 0.3 s on every watch
event, bursts of competing sizes, pods finishing mid-run, a node opting out while its pods run and
back in, a GPU node joining, a tainted GPU node, pods bound for one node, and nodes that never opt
in (simulation/scenarios/hostile.yaml).

No pod may fail, every valid pod must end Running or Succeeded, no node may refuse what it was
asked more than rarely, and nothing may be planned once the cluster is at rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulation.scenario import load_scenario

pytestmark = pytest.mark.e2e

HOSTILE = Path(__file__).resolve().parents[2] / "simulation" / "scenarios" / "hostile.yaml"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("hostile") / "summary.json"
    finished = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--scenario", str(HOSTILE), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-3000:]
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


def test_the_scenario_is_hostile_at_a_real_clusters_timing() -> None:
    scenario = load_scenario(HOSTILE)
    assert scenario.timing.node_status_period_s == 10 and scenario.timing.watch_delay_s >= 0.3
    assert {change.node for change in scenario.node_changes} == {"l4-1", "h100-1"}
    assert sum(item.runs_for is not None for item in scenario.workload) >= 8


def test_no_pod_fails_and_every_pod_runs_or_succeeds(hostile: dict[str, Any]) -> None:
    assert len(hostile["pods"]) == len(load_scenario(HOSTILE).workload)
    for key, pod in hostile["pods"].items():
        assert pod["phase"] in ("Running", "Succeeded"), (key, pod)
        assert pod["env"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={pod['size_gb'] * 1024}M", key
    assert hostile["counters"]["admission_failures"] == 0


def test_refusals_are_rare_and_the_plans_converge(hostile: dict[str, Any]) -> None:
    counters = hostile["counters"]
    assert counters["plans_while_idle"] == 0
    assert counters["service_errors"] == 0, hostile["service_error_lines"]
    assert counters["configs_refused"] <= 2
    assert counters["plans"] <= 3 * len(hostile["pods"])


def test_only_opted_in_nodes_are_planned_and_a_node_that_came_back_is_again(hostile: dict[str, Any]) -> None:
    assert set(hostile["nodes"]) == {"a100-1", "a100-2", "l4-1", "h100-1", "l40s-1"}
    on = {pod["node"] for pod in hostile["pods"].values()}
    assert "cpu-1" not in on and "h100-1" in on


def test_pods_run_only_where_their_selector_affinity_and_tolerations_allow(hostile: dict[str, Any]) -> None:
    pods = hostile["pods"]
    assert pods["research/h100-only"]["node"] == "h100-1"  # waited for the node to opt in
    assert pods["serving/a100-1-only"]["node"] == "a100-1"
    # The tainted node keeps its GPU for the one pod that tolerates the taint.
    assert {key for key, pod in pods.items() if pod["node"] == "l40s-1"} == {"serving/l40s-only"}
