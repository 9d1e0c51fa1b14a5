"""Golden replay: recorded event streams must still give exactly the recorded decisions.

A change to the planner that changes a decision fails here; if the change is intended, run
`make golden` and review the diff of the `*.plans.jsonl` files like code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from events.envelope import decode
from events.plans import PlanComputed
from services.planner.replay import replay
from tests.golden.regenerate import GOLDEN, expected_plans

STREAMS = sorted(GOLDEN.glob("*.events.jsonl"))


@pytest.mark.parametrize("events_file", STREAMS, ids=lambda p: p.name)
def test_replay_gives_the_golden_plans(events_file: Path) -> None:
    golden = events_file.with_name(events_file.name.replace(".events.", ".plans."))
    assert expected_plans(events_file) == golden.read_text()


def test_replay_ends_on_the_plan_the_live_planner_ended_on() -> None:
    """The live planner decides at wall-clock moments, so it may fold a few more or fewer events
    before a decision than the replay, which decides exactly when each batch window closes; with
    node agents answering each layout, the plans on the way may differ, but once every event is
    folded in both end on the same plan."""
    envelopes = [decode(line.encode()) for line in (GOLDEN / "demo.events.jsonl").read_text().splitlines()]
    live = [e.event.plan_id for e in envelopes if isinstance(e.event, PlanComputed)]
    replayed = [r.plan.plan_id for r in replay(envelopes)]
    assert live and replayed
    assert live[-1] == replayed[-1]


def test_replay_is_deterministic_and_ignores_non_planner_events() -> None:
    lines = (GOLDEN / "demo.events.jsonl").read_text().splitlines()
    envelopes = [decode(line.encode()) for line in lines]
    planner_only = [
        e
        for e in envelopes
        if e.kind not in ("PlanComputed", "NodePlanned", "PodReleased", "NodeConfigPublished", "PodUnplaced")
    ]
    first = [json.dumps(r.summary()) for r in replay(envelopes)]
    assert first == [json.dumps(r.summary()) for r in replay(envelopes)]
    assert first == [json.dumps(r.summary()) for r in replay(planner_only)]
