"""End to end: `mpsflow demo` with every service as its own process on a real nats-server.

The built-in scenario has 3 nodes, 6 GPUs of 2 models and 20 valid pods of 4 sizes (plus 4
invalid ones). Every valid pod must end Running or Succeeded on a slice of its size, with the
environment the node agent's device plugin gave it; every invalid pod must be rejected with the
rule it broke; and the final layouts must keep the plan contract's invariants.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from simulation.scenario import load_scenario

pytestmark = pytest.mark.e2e

MEMORY_MIB = {"NVIDIA-A100-SXM4-80GB": 81920, "NVIDIA-L4": 23034}


def run_demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def summary(demo_summary: dict[str, Any]) -> dict[str, Any]:
    """The summary of the session's one demo run (tests/e2e/conftest.py)."""
    return demo_summary


def test_the_built_in_scenario_is_as_big_as_promised() -> None:
    scenario = load_scenario(None)
    gpus = [gpu for node in scenario.nodes for gpu in node.gpus]
    assert len(scenario.nodes) >= 3 and len(gpus) >= 6 and len({g.model for g in gpus}) >= 2
    sizes = [
        resource
        for item in scenario.workload
        for c in item.pod["spec"]["containers"]
        for resource in c["resources"]["limits"]
    ]
    valid = [
        s
        for s in sizes
        if s in {"nvidia.com/gpu-5gb", "nvidia.com/gpu-10gb", "nvidia.com/gpu-20gb", "nvidia.com/gpu-40gb"}
    ]
    assert len(valid) >= 20 and len(set(valid)) == 4


def test_every_valid_pod_runs_on_a_slice_of_its_size(summary: dict[str, Any]) -> None:
    assert len(summary["pods"]) == 20
    for key, pod in summary["pods"].items():
        assert pod["phase"] in ("Running", "Succeeded"), key
        assert pod["node"] is not None and pod["gpu"] is not None, key
        assert pod["env"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={pod['size_gb'] * 1024}M", key
        # The agent's default device list strategy, cdi-cri: the GPU comes as a CDI device, not an env.
        [gpu] = pod["cdi_devices"]
        assert gpu.startswith("nvidia.com/gpu=GPU-") and "NVIDIA_VISIBLE_DEVICES" not in pod["env"], key
        assert pod["pending_seconds"] is not None and pod["pending_seconds"] >= 0, key


def test_no_pod_fails_no_config_is_refused_and_nothing_is_planned_while_idle(summary: dict[str, Any]) -> None:
    counters = summary["counters"]
    assert counters["admission_failures"] == 0
    assert counters["plans_while_idle"] == 0
    assert counters["service_errors"] == 0, summary["service_error_lines"]
    assert counters["configs_refused"] == 0
    assert 0 < counters["plans"] <= 3 * len(summary["pods"])
    assert all("reason" not in pod for pod in summary["pods"].values())


def test_latency_is_reported_whole_and_what_mpsflow_adds_apart(summary: dict[str, Any]) -> None:
    latency = summary["latency"]
    assert 0 < latency["pending_p50"] <= latency["pending_p99"]
    assert 0 <= latency["mpsflow_p50"] <= latency["mpsflow_p99"] <= latency["pending_p99"]
    for key, pod in summary["pods"].items():
        assert pod["mpsflow_seconds"] is not None and pod["mpsflow_seconds"] <= pod["pending_seconds"], key


def test_invalid_pods_are_rejected_with_the_rule_they_broke(summary: dict[str, Any]) -> None:
    reasons = {key: reason.split(":")[0] for key, reason in summary["rejected"].items()}
    assert reasons == {
        "research/bad-name": "MpsSliceResourceMalformed",
        "research/bad-zero": "MpsSliceSizeZero",
        "research/bad-huge": "MpsSliceLargerThanAnyGpu",
        "research/bad-two": "MpsSeveralSlicesInContainer",
    }
    assert "200 GiB" in summary["rejected"]["research/bad-huge"]


def test_final_layouts_keep_the_plan_invariants(summary: dict[str, Any]) -> None:
    scenario = load_scenario(None)
    models = {node.name: [gpu.model for gpu in node.gpus] for node in scenario.nodes}
    assert set(summary["nodes"]) == set(models)
    running: Counter[tuple[str, int, int]] = Counter(
        (p["node"], p["gpu"], p["size_gb"]) for p in summary["pods"].values() if p["phase"] == "Running"
    )
    for node, layout in summary["nodes"].items():
        assert sorted(int(i) for i in layout["gpus"]) == list(range(len(models[node])))
        for index, slices in layout["gpus"].items():
            memory = MEMORY_MIB[models[node][int(index)]]
            assert sum(s["size_gb"] for s in slices) * 1024 <= memory, (node, index)
            assert len(slices) <= 48
            used = Counter(s["size_gb"] for s in slices if s["used"])
            for (pod_node, gpu, size), count in running.items():
                if (pod_node, str(gpu)) == (node, index):
                    assert used[size] >= count, (node, index, size)
    assert summary["events_published"] > 0


def test_an_invalid_scenario_is_refused_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - name: n1\n    gpus:\n      - {model: X, memory_mib: -5}\n")
    finished = run_demo("--scenario", str(bad), timeout=30)
    assert finished.returncode == 2
    assert (
        finished.stderr.strip() == "mpsflow demo: nodes[0].gpus[0].memory_mib: Input should be greater than 0"
    )
    assert finished.stdout == ""


# What each process's /metrics must serve once the built-in workload ran (a family only appears
# once set: every metric has labels).
SERVED_METRICS = {
    "pod-watcher": {"mpsflow_leader", "mpsflow_consumer_pending_messages", "mpsflow_pods_rejected"},
    "planner": {
        "mpsflow_leader",
        "mpsflow_consumer_deliveries",
        "mpsflow_planner_decision_seconds",
        "mpsflow_pods",
        "mpsflow_pods_unplaced",
        "mpsflow_gpu_memory_free_gib",
        "mpsflow_gpu_memory_stranded_gib",
        "mpsflow_nodes",
    },
    "config-publisher": {"mpsflow_leader", "mpsflow_node_configs_written", "mpsflow_consumer_deliveries"},
    "node-agent-a100-1": {"mpsflow_node_reconfigure_seconds"},
    "admission-webhook": set(),
    "mps-daemons-a100-1": set(),
}


def test_every_process_serves_its_status_and_metrics(summary: dict[str, Any]) -> None:
    status = summary["status"]
    assert set(SERVED_METRICS) <= set(status), sorted(status)
    for name, seen in status.items():
        assert seen.get("ready", "").startswith("200 "), (name, seen)
    for name, families in SERVED_METRICS.items():
        assert families <= set(status[name]["metrics"]), (name, sorted(status[name]["metrics"]))
    # The planner's own figures, not another process's: only the planner plans.
    assert not {"mpsflow_pods", "mpsflow_planner_decision_seconds"} & set(status["pod-watcher"]["metrics"])
    assert status["planner"]["ready"] == "200 active"
