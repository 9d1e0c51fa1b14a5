"""Replaying recorded events through the planner's core, exactly as the service would decide.

`replay` drives the same machine as the planner service (`Planner` in
`services/planner/core/step.py`): it observes envelopes in order and steps at every event time and
whenever the machine asked to be woken before the next event, so a recorded stream gives back
every message the planner published (or would publish now). It is what `mpsflow replay` prints
and what the golden tests compare. Pure: the clock is the events' own time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from events.envelope import Envelope
from events.plans import PlanComputed
from services.planner.core.state import PlannerSettings
from services.planner.core.step import Outgoing, Planner, Step

# What the planner reads from others. Its own words (node layouts, releases) are not read back:
# the replay's own decisions stand for them.
PLANNER_KINDS = frozenset(
    {
        "PodObserved",
        "PodRejected",
        "PodDeleted",
        "NodeObserved",
        "NodeOptedOut",
        "NodeGpusReported",
        "NodeConfigApplied",
        "NodeConfigFailed",
    }
)


@dataclass(frozen=True)
class ReplayedStep:
    """One step that published something: the plan in force then, and every message, in order."""

    at: datetime
    plan: PlanComputed
    messages: tuple[Outgoing, ...]

    def summary(self) -> dict[str, object]:
        """A compact, stable line for people and golden files: the plan, and what each message said
        (the plan's own message is named, not repeated)."""
        return {
            "at": self.at.isoformat(),
            "plan_id": self.plan.plan_id,
            "nodes": {
                name: {
                    str(i): [f"{s.size_gb}{'u' if s.used else ''}" for s in slices]
                    for i, slices in sorted(layout.gpus.items())
                }
                for name, layout in sorted(self.plan.nodes.items())
            },
            "placed": {key: f"{p.node}/{p.gpu}" for key, p in sorted(self.plan.placed.items())},
            "unplaced": dict(sorted(self.plan.unplaced.items())),
            "excluded_nodes": dict(sorted(self.plan.excluded_nodes.items())),
            "messages": [_message_summary(m) for m in self.messages],
        }


def _message_summary(message: Outgoing) -> dict[str, Any]:
    said: dict[str, Any] = {"subject": message.subject, "id": message.message_id, "kind": message.event.kind}
    if not isinstance(message.event, PlanComputed):
        said["event"] = message.event.model_dump(mode="json", exclude={"kind"})
    return said


def replay(envelopes: Iterable[Envelope], settings: PlannerSettings | None = None) -> Iterator[ReplayedStep]:
    planner = Planner(settings)
    wake: datetime | None = None

    def step_at(now: datetime) -> Iterator[ReplayedStep]:
        """Step at `now`, and again at once after each step that published (as the service does)."""
        nonlocal wake
        while True:
            step: Step = planner.step(now)
            if step.decision is None:
                wake = step.wake_at
                return
            planner.published(step)
            yield ReplayedStep(now, step.decision.plan, step.messages)

    for envelope in envelopes:
        if envelope.kind not in PLANNER_KINDS:
            continue
        while wake is not None and wake <= envelope.time:
            yield from step_at(wake)
        planner.observe(envelope)
        yield from step_at(envelope.time)
    # The last batch window closes; the recording says nothing of the silence after it (no report
    # goes stale once nothing is left to plan).
    while wake is not None and planner.state.first_unplanned_change is not None:
        yield from step_at(wake)
