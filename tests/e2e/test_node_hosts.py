"""End to end: a demo large enough that its nodes' services run in node hosts.

`mpsflow demo` on 30 nodes of 2 GPUs runs every node's MPS daemon keeper, node agent and kubelet in
one of two node hosts (`simulation.node_host`, 25 nodes each at most, here 15) rather than in
processes of their own, with the production wiring and each node's own identity. 100 pods of 1 to 10 GiB come
within 5 s, a third of them finishing after a few seconds; one node opts in mid-run (its host starts
its agent) and another, without pods, opts out (its host stops its agent). Everything must run as in
the small demos: every pod on a slice of its size with its environment, nothing Failed, refused,
planned while idle or logged as an error; the hosts serve their status; and once the demo has ended,
none of its processes is left. The kubelets sync their node status every second to keep it short.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_demo_interrupt import processes_mentioning

pytestmark = pytest.mark.e2e

NODES = 30
PODS = 100
OPT_IN = {"nos.nebuly.com/gpu-partitioning": "mps"}
LATE = "node-030"  # opts in at 2 s
LEAVING = "node-029"  # opts out at 1 s, before any pod could be placed there
A100 = {"model": "NVIDIA-A100-SXM4-80GB", "memory_mib": 81920}
LOGS_IN = re.compile(r"logs in (/tmp/mpsflow-[^/]+)/logs")


def _scenario() -> dict[str, Any]:
    draw = random.Random(30)
    nodes = [
        {
            "name": f"node-{index:03d}",
            "labels": {} if f"node-{index:03d}" == LATE else OPT_IN,
            "gpus": [A100] * 2,
        }
        for index in range(1, NODES + 1)
    ]
    workload = []
    for index in range(PODS):
        size = draw.randint(1, 10)
        item: dict[str, Any] = {
            "at": round(draw.uniform(0, 5), 3),
            "pod": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"pod-{index:03d}", "namespace": "hosted"},
                "spec": {
                    "hostIPC": True,
                    "securityContext": {"runAsUser": 1000},
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox",
                            "resources": {"limits": {f"nvidia.com/gpu-{size}gb": 1}},
                        }
                    ],
                },
            },
        }
        if index % 3 == 0:
            item["runs_for"] = 4.0
        workload.append(item)
    return {
        "nodes": nodes,
        "workload": workload,
        "node_changes": [
            {"at": 1.0, "node": LEAVING, "labels": {"nos.nebuly.com/gpu-partitioning": None}},
            {"at": 2.0, "node": LATE, "labels": OPT_IN},
        ],
        "timing": {"node_status_period_s": 1.0, "watch_delay_s": 0.05},
        "timeout": 90,
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path_factory.mktemp("node-hosts")
    (out / "scenario.json").write_text(json.dumps(_scenario()))
    finished = subprocess.run(
        [
            *(sys.executable, "-m", "services.cli", "demo"),
            *("--scenario", str(out / "scenario.json"), "--json", str(out / "summary.json")),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout[-5000:] + finished.stderr[-3000:]
    return finished, json.loads((out / "summary.json").read_text())


def test_the_nodes_run_in_two_hosts_and_the_cluster_is_ready_in_time(
    run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    finished, summary = run
    assert "started 2 node hosts of up to 25 nodes each" in finished.stdout
    assert "cluster ready: 30 nodes (29 opted in), 60 GPUs" in finished.stdout
    hosts = {name for name in summary["status"] if name.startswith("node-host-")}
    assert hosts == {"node-host-1", "node-host-2"}
    assert not [name for name in summary["status"] if name.startswith(("node-agent-", "mps-daemons-"))]
    for name in hosts:  # 30 nodes dealt round to two hosts
        assert summary["status"][name]["ready"] == "200 hosting 15 nodes"


def test_every_pod_runs_on_a_slice_of_its_size_and_nothing_went_wrong(
    run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, summary = run
    assert len(summary["pods"]) == PODS
    for key, pod in summary["pods"].items():
        assert pod["phase"] in ("Running", "Succeeded"), (key, pod)
        assert pod["device_ids"] and f"-{pod['size_gb']}gb-" in pod["device_ids"][0], (key, pod)
        assert pod["env"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={pod['size_gb'] * 1024}M", (key, pod)
        assert pod["mpsflow_seconds"] is not None and pod["mpsflow_seconds"] <= pod["pending_seconds"], key
        assert pod["released_seconds"] is not None and pod["released_seconds"] <= pod["pending_seconds"], key
    assert summary["counters"] == summary["counters"] | {
        "configs_refused": 0,
        "admission_failures": 0,
        "plans_while_idle": 0,
        "service_errors": 0,
    }, summary["service_error_lines"]
    latency = summary["latency"]
    assert 0 <= latency["mpsflow_p50"] <= latency["mpsflow_p99"] <= latency["pending_p99"]


def test_the_agents_follow_the_nodes_opting_in_and_out(
    run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, summary = run
    assert LATE in summary["nodes"]
    assert LEAVING not in summary["nodes"]
    assert len(summary["nodes"]) == NODES - 1


def test_nothing_the_demo_started_is_left(
    run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    finished, _ = run
    [base] = set(LOGS_IN.findall(finished.stdout))
    assert not processes_mentioning(base)
    assert not Path(base).exists()
