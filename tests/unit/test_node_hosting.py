"""Which demos run their nodes' services in node hosts (`simulation.demo.nodes_per_host`), and the
large scenarios that do (`benchmarks/scale_scenarios.py` writes them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import scale_scenarios
from events.vocabulary import slice_size
from simulation.chaos import ChaosError, parse_chaos
from simulation.demo import HOSTED_ABOVE, NODES_PER_HOST, nodes_per_host
from simulation.scenario import Scenario, load_scenario, parse_scenario


def scenario(nodes: int) -> Scenario:
    names = ", ".join(
        f"{{name: n-{index}, labels: {{nos.nebuly.com/gpu-partitioning: mps}}}}" for index in range(nodes)
    )
    return parse_scenario(f"nodes: [{names}]")


def test_small_scenarios_keep_a_process_per_node_and_large_ones_share_hosts() -> None:
    assert nodes_per_host(scenario(3), (), None) == 0
    assert nodes_per_host(scenario(HOSTED_ABOVE), (), None) == 0
    assert nodes_per_host(scenario(HOSTED_ABOVE + 1), (), None) == NODES_PER_HOST


def test_killing_a_node_agent_keeps_a_process_per_node_whatever_the_size() -> None:
    kills = parse_chaos("kill:node-agent/n-1@5")
    assert nodes_per_host(scenario(50), kills, None) == 0
    assert nodes_per_host(scenario(50), parse_chaos("kill:planner@5"), None) == NODES_PER_HOST


def test_what_is_asked_is_done_unless_a_kill_needs_processes_of_their_own() -> None:
    assert nodes_per_host(scenario(3), (), 2) == 2
    assert nodes_per_host(scenario(50), (), 0) == 0
    assert nodes_per_host(scenario(50), parse_chaos("kill:node-agent/n-1@5"), 0) == 0
    with pytest.raises(ChaosError, match=r"--chaos: killing a node agent needs .*--nodes-per-host 0"):
        nodes_per_host(scenario(50), parse_chaos("kill:node-agent/n-1@5"), 10)


SCENARIOS = Path(__file__).resolve().parents[2] / "simulation" / "scenarios"


@pytest.mark.parametrize(
    ("name", "write"), [("scale-200", scale_scenarios.scale_200), ("burst-500", scale_scenarios.burst_500)]
)
def test_the_large_scenarios_are_what_their_generator_writes(name: str, write: Callable[[], str]) -> None:
    assert (SCENARIOS / f"{name}.yaml").read_text() == write() + "\n", (
        "run python -m benchmarks.scale_scenarios"
    )


def test_the_large_scenarios_are_as_large_as_promised() -> None:
    scale = load_scenario(SCENARIOS / "scale-200.yaml")
    assert len(scale.nodes) == 200 and {len(node.gpus) for node in scale.nodes} == {8}
    assert len(scale.workload) == 2000 and scale.timing.node_status_period_s == 10
    burst = load_scenario(SCENARIOS / "burst-500.yaml")
    assert len(burst.nodes) == 50 and {len(node.gpus) for node in burst.nodes} == {2}
    assert len(burst.workload) == 500 and max(item.at for item in burst.workload) < 2
    assert all(item.runs_for is None for item in burst.workload)
    for scenario in (scale, burst):
        sizes = {
            slice_size(r)
            for item in scenario.workload
            for r in item.pod["spec"]["containers"][0]["resources"]["limits"]
        }
        assert sizes == set(range(1, 11))
        assert nodes_per_host(scenario, (), None) == NODES_PER_HOST
