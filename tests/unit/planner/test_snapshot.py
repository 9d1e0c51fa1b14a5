"""The `mpsflow plan` contract (docs/formats.md §1): snapshot parsing, its errors, and the rendered plan."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from services.planner.core.model import Gpu, Node, PendingPod, PlanSettings, Slice
from services.planner.core.run import plan_cluster
from services.planner.snapshot import SnapshotError, parse_snapshot, plan_document, render_plan
from tests.unit.planner.invariants import assert_plan_invariants
from tests.unit.planner.test_planning import Cluster, clusters

# The example of docs/formats.md §1.2-1.3, whose snapshot also lists `huge-1` (`with_huge_pod` adds it).
CONTRACT_SNAPSHOT = """
{
  "nodes": [
    {
      "name": "a100-1",
      "labels": {"nos.nebuly.com/gpu-partitioning": "mps"},
      "gpus": [
        {"index": 0, "model": "NVIDIA-A100-SXM4-80GB", "memory_mib": 81920,
         "slices": [{"size_gb": 10, "used": true}, {"size_gb": 20, "used": false}]}
      ]
    }
  ],
  "pending_pods": [
    {"namespace": "default", "name": "train-1", "size_gb": 10, "priority": 0,
     "created": "2026-11-22T10:00:00Z"}
  ]
}
"""
CONTRACT_PLAN = """
{
  "nodes": {
    "a100-1": {"gpus": {"0": [{"size_gb": 10, "used": true},
                              {"size_gb": 20, "used": false},
                              {"size_gb": 10, "used": false}]}}
  },
  "placed": {"default/train-1": {"node": "a100-1", "gpu": 0, "size_gb": 10}},
  "unplaced": {"default/huge-1": "needs 200 GiB; the largest opted-in GPU has 80 GiB"}
}
"""
OPT_IN = {"nos.nebuly.com/gpu-partitioning": "mps"}


def run_plan(text: str, plan_settings: PlanSettings | None = None) -> str:
    """What `mpsflow plan` writes for a snapshot: parse, plan, render."""
    nodes, pods = parse_snapshot(text)
    return render_plan(plan_cluster(nodes, pods, plan_settings or PlanSettings()))


def with_huge_pod(snapshot: str) -> str:
    document = json.loads(snapshot)
    document["pending_pods"].append({"namespace": "default", "name": "huge-1", "size_gb": 200})
    return json.dumps(document)


# --- the contract example ---------------------------------------------------------------------------------


def test_contract_example_gives_the_contract_plan() -> None:
    assert json.loads(run_plan(with_huge_pod(CONTRACT_SNAPSHOT))) == json.loads(CONTRACT_PLAN)


def test_contract_example_as_written() -> None:
    expected = json.loads(CONTRACT_PLAN)
    expected["unplaced"] = {}
    output = run_plan(CONTRACT_SNAPSHOT)
    assert json.loads(output) == expected
    assert "excluded_nodes" not in json.loads(output)


def test_output_is_canonical_and_byte_identical_on_repeated_runs() -> None:
    outputs = {run_plan(with_huge_pod(CONTRACT_SNAPSHOT)) for _ in range(3)}
    assert len(outputs) == 1
    (output,) = outputs
    assert output.endswith("}\n")
    assert list(json.loads(output)) == ["nodes", "placed", "unplaced"]


def test_output_does_not_depend_on_the_order_of_nodes_pods_or_gpus() -> None:
    document = json.loads(with_huge_pod(CONTRACT_SNAPSHOT))
    document["nodes"].append(
        {
            "name": "h100-0",
            "labels": OPT_IN,
            "gpus": [
                {"index": 10, "model": "NVIDIA-H100-80GB-HBM3", "memory_mib": 81559},
                {"index": 2, "model": "NVIDIA-H100-80GB-HBM3", "memory_mib": 81559, "slices": []},
            ],
        }
    )
    document["pending_pods"] += [
        {"namespace": "ml", "name": f"job-{i}", "size_gb": size, "priority": i % 2}
        for i, size in enumerate([20, 40, 70, 5, 10])
    ]
    reordered = copy.deepcopy(document)
    reordered["nodes"].reverse()
    reordered["nodes"][0]["gpus"].reverse()
    reordered["pending_pods"].reverse()
    output = run_plan(json.dumps(document))
    assert run_plan(json.dumps(reordered)) == output
    assert list(json.loads(output)["nodes"]["h100-0"]["gpus"]) == ["2", "10"]


def test_nodes_not_opted_in_are_ignored_and_absent_from_the_plan() -> None:
    document = json.loads(CONTRACT_SNAPSHOT)
    gpus = [{"index": 0, "model": "NVIDIA-A100-SXM4-80GB", "memory_mib": 81920}]
    document["nodes"] += [
        {"name": "no-labels", "gpus": gpus},
        {"name": "mig", "labels": {"nos.nebuly.com/gpu-partitioning": "mig"}, "gpus": gpus},
        {"name": "other-label", "labels": {"mps": "nos.nebuly.com/gpu-partitioning"}, "gpus": gpus},
        {"name": "upper", "labels": {"nos.nebuly.com/gpu-partitioning": "MPS"}, "gpus": gpus},
    ]
    nodes, _ = parse_snapshot(json.dumps(document))
    assert [n.name for n in nodes] == ["a100-1"]
    plan = json.loads(run_plan(json.dumps(document)))
    assert list(plan["nodes"]) == ["a100-1"]
    assert "excluded_nodes" not in plan


def test_only_non_opted_in_nodes_leave_pods_unplaced_with_a_reason() -> None:
    document = json.loads(CONTRACT_SNAPSHOT)
    document["nodes"][0]["labels"] = {}
    plan = json.loads(run_plan(json.dumps(document)))
    assert plan == {
        "nodes": {},
        "placed": {},
        "unplaced": {
            "default/train-1": "no opted-in node can be planned on "
            "(label nos.nebuly.com/gpu-partitioning=mps)"
        },
    }


def test_impossible_node_is_listed_under_excluded_nodes() -> None:
    document = json.loads(CONTRACT_SNAPSHOT)
    document["nodes"].append(
        {
            "name": "broken",
            "labels": OPT_IN,
            "gpus": [
                {
                    "index": 0,
                    "model": "Tesla-T4",
                    "memory_mib": 15360,
                    "slices": [{"size_gb": 16, "used": True}],
                }
            ],
        }
    )
    plan = json.loads(run_plan(json.dumps(document)))
    assert plan["excluded_nodes"] == {"broken": "GPU 0: used slices hold 16 GiB but the GPU has 15 GiB"}
    assert list(plan) == ["nodes", "placed", "unplaced", "excluded_nodes"]
    assert plan["placed"] == {"default/train-1": {"node": "a100-1", "gpu": 0, "size_gb": 10}}


def test_parsed_values() -> None:
    nodes, pods = parse_snapshot(CONTRACT_SNAPSHOT)
    assert nodes == [
        Node(
            name="a100-1",
            gpus=(
                Gpu(
                    index=0,
                    model="NVIDIA-A100-SXM4-80GB",
                    memory_mib=81920,
                    slices=(Slice(10, used=True), Slice(20, used=False)),
                    max_slices=48,
                ),
            ),
        )
    ]
    (pod,) = pods
    assert (pod.key, pod.size_gb, pod.priority) == ("default/train-1", 10, 0)
    assert pod.created is not None and pod.created.isoformat() == "2026-11-22T10:00:00+00:00"


def test_optional_fields_take_their_defaults() -> None:
    text = json.dumps(
        {
            "nodes": [
                {
                    "name": "p",
                    "labels": OPT_IN,
                    "gpus": [{"index": 0, "model": "Tesla-P100-PCIE-16GB", "memory_mib": 16384}],
                }
            ],
            "pending_pods": [{"namespace": "a", "name": "b", "size_gb": 0, "created": None}],
        }
    )
    nodes, pods = parse_snapshot(text)
    assert nodes[0].gpus[0].slices == () and nodes[0].gpus[0].max_slices == 16
    assert pods == [PendingPod("a", "b", 0, 0, None)]
    assert parse_snapshot('{"nodes": []}') == ([], [])


def test_offset_times_order_pods_by_the_instant() -> None:
    document = json.loads(CONTRACT_SNAPSHOT)
    document["nodes"][0]["gpus"][0]["memory_mib"] = 30 * 1024
    document["pending_pods"] = [
        {"namespace": "d", "name": "a-later", "size_gb": 20, "created": "2026-11-22T10:30:00Z"},
        {"namespace": "d", "name": "b-earlier", "size_gb": 20, "created": "2026-11-22T11:00:00+02:00"},
    ]
    plan = json.loads(run_plan(json.dumps(document)))
    assert list(plan["placed"]) == ["d/b-earlier"]


# --- malformed snapshots ----------------------------------------------------------------------------------


def valid_document() -> dict[str, Any]:
    gpu: dict[str, Any] = {"index": 0, "model": "NVIDIA-A100-SXM4-80GB", "memory_mib": 81920, "slices": []}
    return {
        "nodes": [{"name": f"n{i}", "labels": OPT_IN, "gpus": [copy.deepcopy(gpu)]} for i in range(4)],
        "pending_pods": [
            {
                "namespace": "default",
                "name": "p",
                "size_gb": 10,
                "priority": 0,
                "created": "2026-11-22T10:00:00Z",
            }
        ],
    }


DELETE = object()


def mutated(*changes: tuple[tuple[str | int, ...], object]) -> str:
    document = valid_document()
    for path, value in changes:
        target: Any = document
        for step in path[:-1]:
            target = target[step]
        if value is DELETE:
            del target[path[-1]]
        elif isinstance(target, list) and path[-1] == len(target):
            target.append(value)
        else:
            target[path[-1]] = value
    return json.dumps(document)


MEMORY = ("nodes", 3, "gpus", 0, "memory_mib")
SIZE = ("pending_pods", 0, "size_gb")
CREATED = ("pending_pods", 0, "created")
SLICE = ("nodes", 0, "gpus", 0, "slices")

ERRORS: dict[str, tuple[str, str]] = {
    "not JSON": (
        "{nodes: []}",
        "snapshot: not JSON (Expecting property name enclosed in double quotes at line 1 column 2)",
    ),
    "empty input": ("", "snapshot: not JSON (Expecting value at line 1 column 1)"),
    "not an object": ("[]", "snapshot: must be an object"),
    "missing nodes": ('{"pending_pods": []}', "nodes: is required"),
    "nodes not a list": ('{"nodes": {}}', "nodes: must be a list"),
    "node not an object": ('{"nodes": [1]}', "nodes[0]: must be an object"),
    "missing node name": (mutated((("nodes", 1, "name"), DELETE)), "nodes[1].name: is required"),
    "empty node name": (mutated((("nodes", 1, "name"), "")), "nodes[1].name: must be a non-empty string"),
    "node twice": (mutated((("nodes", 2, "name"), "n0")), "nodes[2].name: node 'n0' appears twice"),
    "labels not an object": (mutated((("nodes", 0, "labels"), [])), "nodes[0].labels: must be an object"),
    "missing gpus": (mutated((("nodes", 0, "gpus"), DELETE)), "nodes[0].gpus: is required"),
    "memory negative": (mutated((MEMORY, -1)), "nodes[3].gpus[0].memory_mib: must be a positive integer"),
    "memory zero": (mutated((MEMORY, 0)), "nodes[3].gpus[0].memory_mib: must be a positive integer"),
    "memory string": (mutated((MEMORY, "81920")), "nodes[3].gpus[0].memory_mib: must be a positive integer"),
    "memory fraction": (
        mutated((MEMORY, 81920.5)),
        "nodes[3].gpus[0].memory_mib: must be a positive integer",
    ),
    "memory boolean": (mutated((MEMORY, True)), "nodes[3].gpus[0].memory_mib: must be a positive integer"),
    "memory null": (mutated((MEMORY, None)), "nodes[3].gpus[0].memory_mib: must be a positive integer"),
    "memory missing": (mutated((MEMORY, DELETE)), "nodes[3].gpus[0].memory_mib: is required"),
    "GPU index twice": (
        mutated(
            (("nodes", 1, "gpus", 1), {"index": 0, "model": "NVIDIA-A100-SXM4-80GB", "memory_mib": 81920}),
        ),
        "nodes[1].gpus[1].index: GPU index 0 appears twice in this node",
    ),
    "GPU index negative": (
        mutated((("nodes", 0, "gpus", 0, "index"), -1)),
        "nodes[0].gpus[0].index: must be an integer of 0 or more",
    ),
    "GPU model missing": (
        mutated((("nodes", 0, "gpus", 0, "model"), DELETE)),
        "nodes[0].gpus[0].model: is required",
    ),
    "slices not a list": (mutated((SLICE, {})), "nodes[0].gpus[0].slices: must be a list"),
    "slice size zero": (
        mutated((SLICE, [{"size_gb": 0, "used": False}])),
        "nodes[0].gpus[0].slices[0].size_gb: must be a positive integer",
    ),
    "slice used missing": (
        mutated((SLICE, [{"size_gb": 5}])),
        "nodes[0].gpus[0].slices[0].used: is required",
    ),
    "slice used not boolean": (
        mutated((SLICE, [{"size_gb": 5, "used": "yes"}])),
        "nodes[0].gpus[0].slices[0].used: must be true or false",
    ),
    "pending_pods not a list": (mutated((("pending_pods",), {})), "pending_pods: must be a list"),
    "size -1": (mutated((SIZE, -1)), "pending_pods[0].size_gb: must be a whole number of zero or more"),
    "size 1.5": (mutated((SIZE, 1.5)), "pending_pods[0].size_gb: must be a whole number of zero or more"),
    "size 10.0": (mutated((SIZE, 10.0)), "pending_pods[0].size_gb: must be a whole number of zero or more"),
    'size "10"': (mutated((SIZE, "10")), "pending_pods[0].size_gb: must be a whole number of zero or more"),
    "size true": (mutated((SIZE, True)), "pending_pods[0].size_gb: must be a whole number of zero or more"),
    "size missing": (mutated((SIZE, DELETE)), "pending_pods[0].size_gb: is required"),
    "namespace missing": (
        mutated((("pending_pods", 0, "namespace"), DELETE)),
        "pending_pods[0].namespace: is required",
    ),
    "priority string": (
        mutated((("pending_pods", 0, "priority"), "high")),
        "pending_pods[0].priority: must be an integer",
    ),
    "priority fraction": (
        mutated((("pending_pods", 0, "priority"), 0.5)),
        "pending_pods[0].priority: must be an integer",
    ),
    "created not a time": (
        mutated((CREATED, "yesterday")),
        "pending_pods[0].created: must be an RFC 3339 time such as 2026-11-22T10:00:00Z",
    ),
    "created a number": (
        mutated((CREATED, 1700000000)),
        "pending_pods[0].created: must be an RFC 3339 time such as 2026-11-22T10:00:00Z",
    ),
    "created month 13": (
        mutated((CREATED, "2026-13-22T10:00:00Z")),
        "pending_pods[0].created: must be an RFC 3339 time such as 2026-11-22T10:00:00Z",
    ),
    "created without zone": (
        mutated((CREATED, "2026-11-22T10:00:00")),
        "pending_pods[0].created: must carry a time zone (e.g. a trailing Z)",
    ),
    "gated not boolean": (
        mutated((("pending_pods", 0, "gated"), "no")),
        "pending_pods[0].gated: must be true or false",
    ),
    "pod twice": (
        mutated((("pending_pods", 1), {"namespace": "default", "name": "p", "size_gb": 1})),
        "pending_pods[1]: pod default/p appears twice",
    ),
}


@pytest.mark.parametrize(("text", "message"), ERRORS.values(), ids=ERRORS.keys())
def test_malformed_snapshot_names_the_offending_field(text: str, message: str) -> None:
    with pytest.raises(SnapshotError) as raised:
        parse_snapshot(text)
    assert str(raised.value) == message
    assert "\n" not in str(raised.value)


def test_a_pod_outside_the_gate_protects_free_slices_of_its_size() -> None:
    snapshot: dict[str, Any] = {
        "nodes": [
            {
                "name": "n",
                "labels": {"nos.nebuly.com/gpu-partitioning": "mps"},
                "gpus": [
                    {
                        "index": 0,
                        "model": "NVIDIA-A100-SXM4-80GB",
                        "memory_mib": 20480,
                        "slices": [{"size_gb": 10, "used": False}],
                    }
                ],
            }
        ],
        "pending_pods": [
            {"namespace": "default", "name": "high", "size_gb": 20, "priority": 10},
            {"namespace": "default", "name": "outside", "size_gb": 10, "gated": False},
        ],
    }
    nodes, pods = parse_snapshot(json.dumps(snapshot))
    assert [node.protected for node in nodes] == [frozenset({10})]
    assert set(plan_cluster(nodes, pods, PlanSettings()).placed) == {"default/outside"}
    del snapshot["pending_pods"][1]["gated"]  # gated, as pods are by default: the slice may go
    nodes, pods = parse_snapshot(json.dumps(snapshot))
    assert [node.protected for node in nodes] == [frozenset()]
    assert set(plan_cluster(nodes, pods, PlanSettings()).placed) == {"default/high"}


def test_snapshot_error_is_a_value_error() -> None:
    assert issubclass(SnapshotError, ValueError)


def test_the_valid_base_document_parses() -> None:
    nodes, pods = parse_snapshot(mutated())
    assert len(nodes) == 4 and len(pods) == 1


@pytest.mark.parametrize("size", [0, 1, 80, 200, 10**6])
def test_any_whole_size_of_zero_or_more_is_valid_input(size: int) -> None:
    output = json.loads(run_plan(mutated((SIZE, size))))
    assert ("default/p" in output["placed"]) is (1 <= size <= 80)
    assert ("default/p" in output["unplaced"]) is not (1 <= size <= 80)


# --- random snapshots -------------------------------------------------------------------------------------


def to_snapshot(nodes: list[Node], pods: list[PendingPod]) -> str:
    return json.dumps(
        {
            "nodes": [
                {
                    "name": n.name,
                    "labels": OPT_IN,
                    "gpus": [
                        {
                            "index": g.index,
                            "model": g.model,
                            "memory_mib": g.memory_mib,
                            "slices": [{"size_gb": s.size_gb, "used": s.used} for s in g.slices],
                        }
                        for g in n.gpus
                    ],
                }
                for n in nodes
            ],
            "pending_pods": [
                {
                    "namespace": p.namespace,
                    "name": p.name,
                    "size_gb": p.size_gb,
                    "priority": p.priority,
                    "created": None if p.created is None else p.created.isoformat().replace("+00:00", "Z"),
                }
                for p in pods
            ],
        }
    )


@settings(
    max_examples=int(os.environ.get("MPSFLOW_PROPERTY_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(clusters())
def test_random_snapshots_round_trip_and_plan_within_the_contract(cluster: Cluster) -> None:
    nodes, pods, plan_settings = cluster
    nodes = [replace(n, can_carve=True, can_host=True) for n in nodes]
    pods = [replace(p, overdue=False) for p in pods]  # a snapshot holds no planner's clock
    text = to_snapshot(nodes, pods)
    parsed_nodes, parsed_pods = parse_snapshot(text)
    assert (parsed_nodes, parsed_pods) == (nodes, pods)
    result = plan_cluster(parsed_nodes, parsed_pods, plan_settings)
    assert_plan_invariants(parsed_nodes, parsed_pods, result, plan_settings)
    output = run_plan(text, plan_settings)
    assert output == run_plan(text, plan_settings) == render_plan(result)
    assert json.loads(output) == plan_document(result)
