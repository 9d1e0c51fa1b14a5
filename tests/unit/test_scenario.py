"""Scenario files: the built-in one loads, and an invalid one is refused naming the offending field."""

from __future__ import annotations

import pytest

from simulation.scenario import ScenarioError, load_scenario, parse_scenario

POD = "{metadata: {name: p}, spec: {containers: [{name: c}]}}"


def test_the_built_in_scenario_loads_with_gfd_labels() -> None:
    scenario = load_scenario(None)
    labels = scenario.nodes[0].all_labels()
    assert labels["nvidia.com/gpu.memory"] == str(scenario.nodes[0].gpus[0].memory_mib)
    assert labels["nvidia.com/gpu.count"] == str(len(scenario.nodes[0].gpus))


def test_timing_takes_a_real_clusters_defaults_and_node_changes_may_remove_labels() -> None:
    scenario = parse_scenario(
        "nodes: [{name: a}]\n"
        "node_changes: [{at: 2.5, node: a, labels: {nos.nebuly.com/gpu-partitioning: null}}]"
    )
    assert (scenario.timing.node_status_period_s, scenario.timing.watch_delay_s) == (10.0, 0.05)
    assert scenario.node_changes[0].labels == {"nos.nebuly.com/gpu-partitioning": None}
    fast = parse_scenario("nodes: [{name: a}]\ntiming: {node_status_period_s: 0.5, watch_delay_s: 0}")
    assert (fast.timing.node_status_period_s, fast.timing.watch_delay_s) == (0.5, 0.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a list", "scenario: must be a mapping with nodes, workload and timeout"),
        ("nodes: [", "scenario: not valid YAML or JSON"),
        ("nodes: []", "nodes: List should have at least 1 item after validation, not 0"),
        ("nodes: [{name: a}, {name: a}]", "nodes: node 'a' appears twice"),
        ("nodes: [{name: Bad_Name}]", "nodes[0].name: String should match pattern"),
        (
            "nodes: [{name: a, gpus: [{model: X, memory_mib: 0}]}]",
            "nodes[0].gpus[0].memory_mib: Input should be greater than 0",
        ),
        (
            f"nodes: [{{name: a}}]\nworkload: [{{at: 0, pod: {POD}}}, {{at: 1, pod: {POD}}}]",
            "workload: pod default/p appears twice",
        ),
        (
            f"nodes: [{{name: a}}]\nworkload: [{{at: -1, pod: {POD}}}]",
            "workload[0].at: Input should be greater than or equal to 0",
        ),
        (
            "nodes: [{name: a}]\nworkload: [{at: 0, pod: {metadata: {name: p}}}]",
            "workload[0].pod: spec.containers must list at least one container",
        ),
        ("nodes: [{name: a}]\ntimeout: 0", "timeout: Input should be greater than 0"),
        (
            "nodes: [{name: a}]\ntiming: {node_status_period_s: 0}",
            "timing.node_status_period_s: Input should be greater than 0",
        ),
        (
            "nodes: [{name: a}]\ntiming: {watch_delay_s: -0.1}",
            "timing.watch_delay_s: Input should be greater than or equal to 0",
        ),
        (
            "nodes: [{name: a}]\ntiming: {node_status: 1}",
            "timing.node_status: Extra inputs are not permitted",
        ),
        (
            "nodes: [{name: a}]\nnode_changes: [{at: 1, node: b, labels: {x: y}}]",
            "node_changes[0].node: 'b' is not one of the nodes",
        ),
        (
            "nodes: [{name: a}]\nnode_changes: [{at: 1, node: a, labels: {}}]",
            "node_changes[0].labels: Dictionary should have at least 1 item after validation, not 0",
        ),
        ("nodes: [{name: a}]\nextra: 1", "extra: Extra inputs are not permitted"),
    ],
)
def test_an_invalid_scenario_is_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ScenarioError) as refused:
        parse_scenario(text)
    assert str(refused.value).startswith(message)
