"""`mpsflow demo --chaos SPEC`, read and checked (simulation/chaos.py): what is accepted, and the one
message that names what is not."""

from __future__ import annotations

import pytest

from simulation.chaos import ChaosError, Kill, check_chaos, parse_chaos
from simulation.scenario import parse_scenario

SCENARIO = parse_scenario(
    """
nodes:
  - name: a100-1
    labels: {nos.nebuly.com/gpu-partitioning: mps}
  - name: h100-1            # opts in at 5 s
  - name: cpu-1             # never opts in
node_changes:
  - {at: 5, node: h100-1, labels: {nos.nebuly.com/gpu-partitioning: mps}}
timeout: 30
"""
)


def test_a_spec_lists_kills_in_its_order() -> None:
    kills = parse_chaos("kill:node-agent/a100-1@3.5,kill:planner@2, kill:nats@.5,kill:node-agent/h100-1@7")
    assert kills == (
        Kill("node-agent/a100-1", 3.5, "kill:node-agent/a100-1@3.5"),
        Kill("planner", 2.0, "kill:planner@2"),
        Kill("nats", 0.5, "kill:nats@.5"),
        Kill("node-agent/h100-1", 7.0, "kill:node-agent/h100-1@7"),
    )
    assert [kill.node for kill in kills] == ["a100-1", None, None, "h100-1"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "--chaos: '': must be kill:TARGET@SECONDS"),
        ("stop:planner@2", "--chaos: 'stop:planner@2': must be kill:TARGET@SECONDS"),
        ("kill:planner", "--chaos: 'kill:planner': must be kill:TARGET@SECONDS"),
        ("kill:@2", "--chaos: 'kill:@2': must be kill:TARGET@SECONDS"),
        ("kill:planner@2,,kill:nats@3", "--chaos: '': must be kill:TARGET@SECONDS"),
        (
            "kill:scheduler@2",
            "--chaos: 'kill:scheduler@2': TARGET must be one of pod-watcher, planner, config-publisher, "
            "nats, node-agent/NODE, got 'scheduler'",
        ),
        ("kill:node-agent/@2", "--chaos: 'kill:node-agent/@2': TARGET must be one of"),
        (
            "kill:planner@-1",
            "--chaos: 'kill:planner@-1': SECONDS must be a number of seconds, 0 or more, got '-1'",
        ),
        ("kill:planner@nan", "--chaos: 'kill:planner@nan': SECONDS must be a number"),
        ("kill:planner@1e3", "--chaos: 'kill:planner@1e3': SECONDS must be a number"),
        ("kill:planner@", "--chaos: 'kill:planner@': SECONDS must be a number"),
    ],
)
def test_a_malformed_spec_is_refused_naming_its_part(spec: str, message: str) -> None:
    with pytest.raises(ChaosError) as refused:
        parse_chaos(spec)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "kill:node-agent/a100-1@2,kill:planner@30",
            "--chaos: 'kill:planner@30': the run ends at the scenario's timeout, 30s, before it",
        ),
        ("kill:nats@1,kill:nats@1.5", "--chaos: 'kill:nats@1.5': nats is killed at 1s and started again"),
        (
            "kill:node-agent/gpu-9@1",
            "--chaos: 'kill:node-agent/gpu-9@1': 'gpu-9' is not one of the scenario's nodes",
        ),
        (
            "kill:node-agent/cpu-1@1",
            "--chaos: 'kill:node-agent/cpu-1@1': cpu-1 never opts in, so no node agent runs",
        ),
        (
            "kill:node-agent/a100-1@30",
            "--chaos: 'kill:node-agent/a100-1@30': the run ends at the scenario's timeout, 30s, before it",
        ),
        (
            "kill:node-agent/a100-1@4,kill:node-agent/a100-1@3",
            "--chaos: 'kill:node-agent/a100-1@4': node-agent/a100-1 is killed at 3s and started again "
            "only at 4s",
        ),
    ],
)
def test_a_kill_the_demo_cannot_play_is_refused_naming_it(spec: str, message: str) -> None:
    with pytest.raises(ChaosError) as refused:
        check_chaos(parse_chaos(spec), SCENARIO)
    assert str(refused.value).startswith(message)


def test_kills_of_agents_that_run_at_some_point_are_accepted() -> None:
    check_chaos(
        parse_chaos("kill:node-agent/a100-1@0,kill:node-agent/a100-1@1.5,kill:node-agent/h100-1@2"), SCENARIO
    )
