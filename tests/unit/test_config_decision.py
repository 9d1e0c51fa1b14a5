"""The config publisher's decision for a node's key, as a table."""

from __future__ import annotations

import pytest

from events.plans import NodeMpsConfig
from services.config_publisher.decide import KeyAction, key_action


def config(plan_id: str, plan_sequence: int, *sizes: int) -> NodeMpsConfig:
    return NodeMpsConfig(node="gpu-1", plan_id=plan_id, plan_sequence=plan_sequence, gpus={0: sizes})


DESIRED = config("plan-7", 70, 10, 20)


@pytest.mark.parametrize(
    ("current", "action"),
    [
        (None, "write"),  # a missing key, or one whose bytes do not read as a config
        (config("plan-5", 50, 40), "write"),  # an older ask's layout
        (config("plan-5", 50, 10, 20), "write"),  # the same layout asked again after a refusal
        (config("plan-7", 70, 10, 20), "holds it"),  # this very ask, redelivered
        (config("plan-9", 90, 40), "superseded"),  # a later ask: never replaced by an older one
        (config("plan-9", 90, 10, 20), "superseded"),
        (config("foreign", 0, 10, 20), "write"),  # written by someone else before any ask
    ],
)
def test_what_to_do_with_a_nodes_key(current: NodeMpsConfig | None, action: KeyAction) -> None:
    assert key_action(current, DESIRED) == action
