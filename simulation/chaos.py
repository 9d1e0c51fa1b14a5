"""What `mpsflow demo --chaos SPEC` kills, and when: the spec, read and checked before anything starts.

Where it sits: the demo's command reads SPEC with `parse_chaos` and checks the kills against the
scenario with `check_chaos`; `simulation.demo` then plays them (SIGKILL to the target's process group,
the same command line started again `RESTART_DELAY_S` later) and measures each recovery. This module is
pure: it never starts, signals or measures anything.

SPEC is a comma-separated list of `kill:TARGET@SECONDS`, SECONDS (a plain decimal number, ≥ 0) counted
from the start of the workload. The targets are the contract's: `pod-watcher`, `planner` and
`config-publisher` (the replica holding the service's lease, the active one, when the demo runs two),
`nats` (the server; its store is kept) and `node-agent/NODE`. Refused: a node the scenario lacks or
never opts in, a kill at or after the scenario's timeout, and a second kill of one target before the
first one's restart. Every refusal is a `ChaosError` whose message starts with the offending part of
SPEC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from events.vocabulary import is_opted_in
from simulation.scenario import Scenario, ScenarioNode

RESTART_DELAY_S = 1.0
"""A killed process is started again this long after the kill, as the contract says."""

NODE_AGENT_PREFIX = "node-agent/"
SERVICE_TARGETS = ("pod-watcher", "planner", "config-publisher", "nats")

_SECONDS = re.compile(r"\d+(\.\d*)?|\.\d+")


class ChaosError(ValueError):
    """A --chaos SPEC the demo cannot play; the message starts with the offending part."""


@dataclass(frozen=True)
class Kill:
    """SIGKILL to `target` at `at` seconds into the workload; `spec` is how SPEC wrote it."""

    target: str
    at: float
    spec: str

    @property
    def node(self) -> str | None:
        """The node whose agent this kills, or None for another target."""
        if not self.target.startswith(NODE_AGENT_PREFIX):
            return None
        return self.target.removeprefix(NODE_AGENT_PREFIX)


def parse_chaos(spec: str) -> tuple[Kill, ...]:
    """The kills SPEC lists, in SPEC's order; `ChaosError` for the first part that is not
    `kill:TARGET@SECONDS` with one of the contract's targets."""
    kills = []
    for part in (written.strip() for written in spec.split(",")):
        where = f"--chaos: {part!r}"
        action, colon, rest = part.partition(":")
        if action != "kill" or not colon:
            raise ChaosError(f"{where}: must be kill:TARGET@SECONDS")
        target, at_sign, seconds = rest.rpartition("@")
        if not at_sign or not target:
            raise ChaosError(f"{where}: must be kill:TARGET@SECONDS")
        if target not in SERVICE_TARGETS and not (
            target.startswith(NODE_AGENT_PREFIX) and target != NODE_AGENT_PREFIX
        ):
            targets = ", ".join((*SERVICE_TARGETS, "node-agent/NODE"))
            raise ChaosError(f"{where}: TARGET must be one of {targets}, got {target!r}")
        if not _SECONDS.fullmatch(seconds):
            raise ChaosError(f"{where}: SECONDS must be a number of seconds, 0 or more, got {seconds!r}")
        kills.append(Kill(target, float(seconds), part))
    return tuple(kills)


def check_chaos(kills: tuple[Kill, ...], scenario: Scenario) -> None:
    """`ChaosError` for the first kill this demo cannot play on `scenario`: a node the scenario lacks
    or never opts in, a kill the scenario's timeout cuts off, or a kill of a target that the previous
    kill of it has not let start again yet."""
    nodes = {node.name: node for node in scenario.nodes}
    for kill in kills:
        where = f"--chaos: {kill.spec!r}"
        if kill.node is None:
            if kill.at >= scenario.timeout:
                raise ChaosError(
                    f"{where}: the run ends at the scenario's timeout, {scenario.timeout:g}s, before it"
                )
            continue
        if kill.node not in nodes:
            raise ChaosError(f"{where}: {kill.node!r} is not one of the scenario's nodes")
        if not _ever_opted_in(nodes[kill.node], scenario):
            raise ChaosError(f"{where}: {kill.node} never opts in, so no node agent runs there")
        if kill.at >= scenario.timeout:
            raise ChaosError(
                f"{where}: the run ends at the scenario's timeout, {scenario.timeout:g}s, before it"
            )
    last_kill: dict[str, Kill] = {}
    for kill in sorted(kills, key=lambda k: k.at):
        previous = last_kill.get(kill.target)
        if previous is not None and kill.at <= previous.at + RESTART_DELAY_S:
            raise ChaosError(
                f"--chaos: {kill.spec!r}: {kill.target} is killed at {previous.at:g}s and started again "
                f"only at {previous.at + RESTART_DELAY_S:g}s"
            )
        last_kill[kill.target] = kill


def _ever_opted_in(node: ScenarioNode, scenario: Scenario) -> bool:
    """Whether the node's labels opt it in at the start or after one of its label changes."""
    labels = node.all_labels()
    if is_opted_in(labels):
        return True
    for change in sorted(scenario.node_changes, key=lambda c: c.at):
        if change.node != node.name:
            continue
        for key, value in change.labels.items():
            if value is None:
                labels.pop(key, None)
            else:
                labels[key] = value
        if is_opted_in(labels):
            return True
    return False
