"""Values in the node-config KV bucket: arbitrary bytes where a node's `NodeMpsConfig` belongs.

Two services read a node's key: its node agent (the desired config it applies) and the config
publisher (what the key holds before it writes an ask over it, by compare-and-set). A value is a
valid config mutated (wrong field types, negative, zero and huge sizes and GPU indexes, unknown
fields, odd unicode), its bytes damaged, JSON of the wrong shape, or arbitrary bytes. What must
hold:

- the node agent (a real one, on a simulated node: fake NVML, fake MPS daemons, the simulated
  kubelet over gRPC, as tests/integration/test_node_agent.py runs it) logs a value it cannot read
  and skips it, answers every readable one (applied or refused, never a crash), and applies the
  next valid config written after them (no lost config);
- the config publisher replaces an unreadable value with the ask's config (or, when the value is
  a readable config from a later ask, leaves it), answers the ask at its first delivery, and
  records no dead letter.

The agent runs once for the whole module (starting one takes seconds); each example writes its
values and a valid config with a new plan id, and waits for the agent's answers.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import example, given
from hypothesis import strategies as st

from events import subjects
from events.memory import MemoryBroker
from events.plans import (
    NodeConfigApplied,
    NodeConfigFailed,
    NodeConfigPublished,
    NodeLayout,
    NodeMpsConfig,
    NodePlanned,
    SliceSpec,
)
from services.config_publisher.decide import key_action
from services.config_publisher.service import DURABLE, ConfigPublisherService
from tests.fuzz.garbage import damaged_bytes, json_values, mutated_json, to_json
from tests.fuzz.profile import fuzz, tally, tried
from tests.fuzz.test_bus import in_virtual_time
from tests.integration.test_node_agent import (
    A100,
    NODE,
    REPO_ROOT,
    Node,
    running_agent,
    simulated_node,
    started,
)
from tests.memorybus import advance, virtual_broker

SEED = NodeMpsConfig(
    node=NODE, plan_id="p-seed", plan_sequence=7, gpus={0: (10, 20), 1: (5,)}, traceparent=None
)
WORDS = (
    "node",
    "plan_id",
    "plan_sequence",
    "gpus",
    "traceparent",
    NODE,
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
)
HOW = ("mutated", "mutated", "mutated", "damaged", "mutated_and_damaged", "wrong_shape", "arbitrary", "empty")


@st.composite
def hostile_values(draw: st.DrawFn) -> bytes:
    """The seed config made hostile, as the bytes of a KV value."""
    how = draw(st.sampled_from(HOW))
    if how == "empty":
        return b""
    if how == "wrong_shape":
        return to_json(draw(json_values())).encode("utf-8", "surrogatepass")
    if how == "arbitrary":
        return draw(st.binary(max_size=128))
    data = SEED.model_dump_json().encode()
    if how in ("mutated", "mutated_and_damaged"):
        document = draw(mutated_json(json.loads(data), words=WORDS, max_mutations=3))
        data = to_json(document, ascii_only=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if how in ("damaged", "mutated_and_damaged"):
        data = draw(damaged_bytes(data))
    return data


def readable(value: bytes) -> NodeMpsConfig | None:
    """The config in `value`, or None when it is none (what both readers decide for themselves)."""
    try:
        return NodeMpsConfig.model_validate_json(value)
    except ValueError:
        return None


# --- the node agent ------------------------------------------------------------------------------------


class UnreadableLog(logging.Handler):
    """Counts the agent's "unreadable config" errors."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("node config revision") and "is unreadable" in record.getMessage():
            self.count += 1


@dataclass
class AgentHarness:
    """One node agent running on a simulated node, driven from the test's thread through `portal`."""

    portal: BlockingPortal
    node: Node
    unreadable: UnreadableLog
    plan_ids: Iterator[int] = field(default_factory=itertools.count)


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentHarness]:
    unreadable = UnreadableLog()
    logger = logging.getLogger("node_agent.agent")
    logger.addHandler(unreadable)
    with pytest.MonkeyPatch.context() as environment:
        # The fake MPS daemons run as `python -m simulation...`: from any directory pytest runs in.
        environment.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        )
        with start_blocking_portal() as portal:
            broker = portal.call(make_broker)
            with (
                portal.wrap_async_context_manager(simulated_node(broker, [A100])) as node,
                portal.wrap_async_context_manager(running_agent(node)),
            ):
                portal.call(started, node)
                yield AgentHarness(portal, node, unreadable)
    logger.removeHandler(unreadable)


async def make_broker() -> MemoryBroker:
    """A broker made on the portal's event loop (its events belong to that loop)."""
    return MemoryBroker()


async def write_and_wait(
    node: Node, values: list[bytes], sentinel: NodeMpsConfig
) -> list[NodeConfigApplied | NodeConfigFailed]:
    """Write `values` then `sentinel` to the node's key; the agent's answers once it answered the sentinel."""
    key = subjects.node_config_key(NODE)
    mark = node.events.mark()
    for value in values:
        await node.configs.put(key, value)
    await node.configs.put(key, sentinel.model_dump_json().encode())
    await node.events.outcome(sentinel.plan_id, mark)
    return node.events.outcomes(mark)


@fuzz(bounded=60)
@given(values=st.lists(hostile_values(), min_size=1, max_size=4))
@example(
    values=[b"{not json", b"\xff\xfe", b'{"node": "x", "plan_id": "p", "plan_sequence": -1, "gpus": {}}']
).via("the values tests/integration/test_node_agent.py writes")
def test_the_agent_skips_what_it_cannot_read_answers_the_rest_and_applies_the_next_valid_config(
    agent: AgentHarness, values: list[bytes]
) -> None:
    configs = [readable(value) for value in values]
    sentinel = NodeMpsConfig(
        node=NODE, plan_id=f"p-sentinel-{next(agent.plan_ids)}", plan_sequence=1, gpus={0: (10,)}
    )
    skipped_before = agent.unreadable.count
    outcomes = agent.portal.call(write_and_wait, agent.node, values, sentinel)
    answered = [config for config in configs if config is not None]
    tried("kv: node agent", "some readable" if answered else "none readable")
    tally("kv: node agent", "values", len(values) + 1)
    tally("kv: node agent", "values skipped as unreadable", len(values) - len(answered))
    tally("kv: node agent", "values readable and answered", len(answered))
    assert agent.unreadable.count - skipped_before == len(values) - len(answered), (
        "an unreadable value was not logged"
    )
    assert [outcome.plan_id for outcome in outcomes] == [*(c.plan_id for c in answered), sentinel.plan_id]
    assert all(outcome.node == NODE for outcome in outcomes)
    applied = NodeConfigApplied(node=NODE, plan_id=sentinel.plan_id, gpus={0: (10,)})
    assert outcomes[-1] == applied, f"the valid config was not applied: {outcomes[-1]}"


# --- the config publisher ---------------------------------------------------------------------------------

ASKED = NodePlanned(node="n1", plan_id="p-ask", layout=NodeLayout(gpus={0: (SliceSpec(size_gb=10),)}))


@fuzz(bounded=150)
@given(value=hostile_values())
def test_the_config_publisher_replaces_an_unreadable_value_and_answers_the_ask(value: bytes) -> None:
    key = subjects.node_config_key(ASKED.node)

    async def example() -> tuple[bytes, int, list[NodeConfigPublished], int]:
        broker = virtual_broker()
        bus = broker.bus("fuzz")
        await broker.configs.put(key, value)
        service = ConfigPublisherService(bus)
        async with anyio.create_task_group() as group:
            group.start_soon(service.consume)
            await advance(1.0)
            sequence = await bus.publish(subjects.planned_subject(ASKED.node), ASKED)
            await advance(120.0)
            group.cancel_scope.cancel()
        assert broker.settled(DURABLE, sequence), "the ask is still waiting to be delivered again"
        assert not broker.dead, broker.dead
        stored = broker.configs.values[key]
        published = []
        for message in broker.stored(subjects.CONFIG_EVENTS):
            envelope = message.envelope()
            if envelope is not None and isinstance(envelope.event, NodeConfigPublished):
                published.append(envelope.event)
        return stored.value, sequence, published, stored.revision

    stored, sequence, published, revision = in_virtual_time(example)
    current = readable(value)
    desired = NodeMpsConfig(node=ASKED.node, plan_id=ASKED.plan_id, plan_sequence=sequence, gpus={0: (10,)})
    action = key_action(current, desired)
    tried("kv: config publisher", ("readable, " if current else "unreadable, ") + action)
    if action == "write":
        assert NodeMpsConfig.model_validate_json(stored).model_copy(update={"traceparent": None}) == desired
        assert published == [NodeConfigPublished(node=ASKED.node, plan_id=ASKED.plan_id, revision=revision)]
    else:
        assert (stored, published) == (value, [])
