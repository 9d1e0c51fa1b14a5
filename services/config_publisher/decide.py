"""The config publisher's one decision: what to do with a node's key, given what it holds.

Pure: the service reads the key, asks `key_action`, and writes (compare-and-set) or not. Nothing
here reads the bucket, the bus or a clock.
"""

from __future__ import annotations

from typing import Literal

from events.plans import NodeMpsConfig

KeyAction = Literal["write", "holds it", "superseded"]


def key_action(current: NodeMpsConfig | None, desired: NodeMpsConfig) -> KeyAction:
    """`superseded` when the key holds a config from a later ask (a higher `plan_sequence`): the
    desired one is older and must never replace it. `holds it` when the key holds this very ask (the
    same layout from the same plan: a redelivery). Otherwise `write`, a missing or unreadable key
    (`current` None) included, and the same layout from another plan too: the planner asks a layout
    again after a refusal, and the agent must answer that ask."""
    if current is None:
        return "write"
    if current.plan_sequence > desired.plan_sequence:
        return "superseded"
    if current.same_layout(desired) and current.plan_id == desired.plan_id:
        return "holds it"
    return "write"
