"""The scenario's optional `api_faults` section: absent means no faults, given fields reach the API
emulator unchanged, the defaults aim at the mpsflow services only, and a bad field is refused by name."""

from __future__ import annotations

import pytest

from simulation.apiserver import Faults
from simulation.scenario import ScenarioError, parse_scenario

NODES = "nodes: [{name: a}]\n"


def test_without_the_section_there_are_no_faults() -> None:
    assert parse_scenario(NODES).api_faults is None


def test_the_defaults_inject_nothing_and_aim_at_the_mpsflow_services() -> None:
    faults = parse_scenario(NODES + "api_faults: {}").api_faults
    assert faults is not None
    assert faults.emulator_faults() == Faults(identities=("mpsflow-*",))


def test_every_field_reaches_the_emulator() -> None:
    faults = parse_scenario(
        NODES + "api_faults:\n"
        "  {seed: 4, identities: [mpsflow-pod-watcher], resources: [pods, nodes], error_rate: 0.1,\n"
        "   throttle_rate: 0.2, retry_after_s: 2, slow_rate: 0.3, slow_s: 0.5, gone_rate: 0.4,\n"
        "   drop_watch_every_s: 1.5}"
    ).api_faults
    assert faults is not None
    assert faults.emulator_faults() == Faults(
        seed=4,
        identities=("mpsflow-pod-watcher",),
        resources=("pods", "nodes"),
        error_rate=0.1,
        throttle_rate=0.2,
        retry_after_s=2,
        slow_rate=0.3,
        slow_s=0.5,
        gone_rate=0.4,
        drop_watch_every_s=1.5,
    )


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{error_rate: 1.5}", "api_faults.error_rate: Input should be less than or equal to 1"),
        ("{throttle_rate: -0.1}", "api_faults.throttle_rate: Input should be greater than or equal to 0"),
        (
            "{error_rate: 0.5, throttle_rate: 0.5}",
            "api_faults: error_rate + throttle_rate must be below 1: otherwise no request ever gets through",
        ),
        ("{gone_rate: 1}", "api_faults.gone_rate: Input should be less than 1"),
        ("{retry_after_s: 0}", "api_faults.retry_after_s: Input should be greater than or equal to 1"),
        ("{retry_after_s: 1.5}", "api_faults.retry_after_s: Input should be a valid integer"),
        ("{slow_s: -1}", "api_faults.slow_s: Input should be greater than or equal to 0"),
        ("{drop_watch_every_s: 0}", "api_faults.drop_watch_every_s: Input should be greater than 0"),
        ("{identities: []}", "api_faults.identities: Tuple should have at least 1 item"),
        ("{identities: ['']}", "api_faults.identities: an identity pattern must not be empty"),
        (
            "{resources: [deployments]}",
            "api_faults.resources[0]: Input should be 'pods', 'nodes', 'configmaps'",
        ),
        ("{resources: []}", "api_faults.resources: Tuple should have at least 1 item"),
        ("{drop_watches: 1}", "api_faults.drop_watches: Extra inputs are not permitted"),
    ],
)
def test_a_bad_field_is_refused_by_name(section: str, message: str) -> None:
    with pytest.raises(ScenarioError) as refused:
        parse_scenario(f"{NODES}api_faults: {section}")
    assert str(refused.value).startswith(message)
