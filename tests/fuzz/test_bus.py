"""Events on the bus: hostile messages to every consuming service, through the real delivery policy.

Each example publishes a few hostile messages to one service's subjects, with valid messages (the
sentinels) among them, and runs the real service on the in-memory bus in virtual time (the same
`events.bus.deliver` settles its messages as on JetStream): the planner (consumer and decision
loop), the config publisher, and the pod watcher's three consumers (unplaced reasons, releases,
overuse), the watcher's Kubernetes API answered by a stand-in. A hostile message is a valid
envelope mutated (wrong field types, negative, zero and huge numbers, odd unicode, unknown fields,
duplicated entries, another event's kind), its bytes damaged (cut short, flipped, thousands of
digits, nested thousands deep, invalid UTF-8), JSON of the wrong shape, or arbitrary bytes.

What must hold, for every example:

- the service never raises out of its loops (a crash would end the task group, and the example);
- every message is settled (acked or terminated) within the redelivery schedule: nothing comes
  back forever;
- a message that does not decode becomes exactly one dead letter, at its first delivery, with
  the reason (`undecodable: <field>: <problem>`) and its bytes; one that decodes is handled, never
  dead-lettered (the handler raising on it would be a bug the policy only contains);
- every sentinel has its effect (no lost event): the planner folds it in and plans for it, the
  config publisher writes its node's key, the pod watcher tells or releases its pod.

`test_decode_refuses_with_a_reason_or_round_trips` holds the codec itself to the same words:
`decode` raises nothing but `UndecodableMessageError` (one line, naming the field), and what it
accepts encodes and decodes again to the same envelope.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast
from unittest import mock

import anyio
from hypothesis import example, given
from hypothesis import strategies as st
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from events import subjects
from events.envelope import Envelope, Event, UndecodableMessageError, decode, encode
from events.memory import MemoryBroker, MemoryBus
from events.nodes import (
    GfdFacts,
    GpuProcessReport,
    GpuReport,
    NodeGpusReported,
    NodeObserved,
    NodeOptedOut,
    SliceOverused,
    SliceState,
    Taint,
)
from events.plans import (
    NodeConfigApplied,
    NodeConfigFailed,
    NodeConfigPublished,
    NodeLayout,
    NodeMpsConfig,
    NodePlanned,
    PlanComputed,
    SliceSpec,
)
from events.pods import (
    NodeRules,
    NodeSelectorTerm,
    PodDeleted,
    PodObserved,
    PodRejected,
    PodReleased,
    PodUnplaced,
    Requirement,
    Toleration,
)
from events.vocabulary import SLICE_GATE, PodEventReason
from services.config_publisher.service import DURABLE as CONFIG_PUBLISHER
from services.config_publisher.service import ConfigPublisherService
from services.planner.service import DURABLE as PLANNER
from services.planner.service import PlannerService
from services.pod_watcher import service as pod_watcher
from services.pod_watcher.service import OVERUSE_DURABLE, RELEASE_DURABLE, UNPLACED_DURABLE, PodWatcherService
from tests.fuzz.garbage import EDGE_TIMES, damaged_bytes, json_values, mutated_json, to_json
from tests.fuzz.profile import fuzz, tally, tried
from tests.memorybus import advance, loop_clock, virtual_broker, virtual_time

T = TypeVar("T")

CREATED = datetime(2026, 11, 22, 10, tzinfo=UTC)
SETTLE = 120.0
"""Virtual seconds after the last publish: every redelivery of the schedule (0.2, 1, 5, 15 s, up to
`max_deliver` 5) has happened by then."""
START = 1.0
"""Virtual seconds for a service to create its consumers before anything is published."""

# --- valid events, as each service's producers publish them ------------------------------------------

RULES = NodeRules(
    node_selector={"zone": "a"},
    required_terms=(
        NodeSelectorTerm(
            expressions=(Requirement(key="gpu", operator="In", values=("a100", "h100")),),
            fields=(Requirement(key="metadata.name", operator="NotIn", values=("n9",)),),
        ),
    ),
    tolerations=(Toleration(key="dedicated", operator="Exists", effect="NoSchedule"),),
)
GPU = GpuReport(
    index=0,
    uuid="GPU-0",
    model="NVIDIA-A100-SXM4-80GB",
    memory_mib=81920,
    memory_used_mib=2048,
    processes=(GpuProcessReport(pid=41, used_memory_mib=1024, slice_id="mps-g0-10gb-0"),),
    compute_capability=(8, 0),
    slices=(
        SliceState(id="mps-g0-10gb-0", size_gb=10, used=True, holder="ml/train"),
        SliceState(id="mps-g0-20gb-0", size_gb=20, used=False),
    ),
)
LAYOUT = NodeLayout(gpus={0: (SliceSpec(size_gb=10, used=True), SliceSpec(size_gb=20))})

PLANNER_SEEDS: tuple[tuple[str, Event], ...] = (
    (
        subjects.pod_subject("ml", "train"),
        PodObserved(
            namespace="ml",
            name="train",
            uid="u-train",
            resource_version="7",
            size_gb=10,
            priority=5,
            created=CREATED,
            phase="Pending",
            gated=True,
            rules=RULES,
        ),
    ),
    (
        subjects.pod_subject("ml", "bound"),
        PodObserved(
            namespace="ml",
            name="bound",
            uid="u-bound",
            resource_version="8",
            size_gb=20,
            created=CREATED,
            phase="Running",
            node="n1",
        ),
    ),
    (
        subjects.pod_subject("ml", "bad"),
        PodRejected(
            namespace="ml",
            name="bad",
            uid="u-bad",
            resource_version="1",
            reason="MpsSliceSizeZero",
            message="0",
        ),
    ),
    (subjects.pod_subject("ml", "gone"), PodDeleted(namespace="ml", name="gone", uid="u-gone")),
    (
        subjects.release_subject("ml", "train"),
        PodReleased(namespace="ml", name="train", uid="u-train", node="n1", size_gb=10, plan_id="p1"),
    ),
    (
        subjects.node_subject("n1"),
        NodeObserved(
            name="n1",
            gfd=GfdFacts(product="NVIDIA-A100-SXM4-80GB", count=1, memory_mib=81920),
            allocatable={10: 1, 20: 1},
            labels={"nos.nebuly.com/gpu-partitioning": "mps", "zone": "a", "gpu": "a100"},
            taints=(Taint(key="dedicated", value="ml", effect="NoSchedule"),),
        ),
    ),
    (subjects.node_subject("n2"), NodeOptedOut(name="n2", reason="opt-in label removed")),
    (subjects.gpus_subject("n1"), NodeGpusReported(node="n1", gpus=(GPU,), applied_plan_id="p1")),
    (subjects.planned_subject("n1"), NodePlanned(node="n1", plan_id="p1", layout=LAYOUT)),
    (subjects.config_subject("n1"), NodeConfigPublished(node="n1", plan_id="p1", revision=3)),
    (subjects.config_subject("n1"), NodeConfigApplied(node="n1", plan_id="p1", gpus={0: (10, 20)})),
    (
        subjects.config_subject("n1"),
        NodeConfigFailed(node="n1", plan_id="p1", reason="GPU 0: too small", gpus={0: (90,)}),
    ),
)
CONFIG_PUBLISHER_SEEDS: tuple[tuple[str, Event], ...] = (
    (subjects.planned_subject("n1"), NodePlanned(node="n1", plan_id="p1", layout=LAYOUT)),
    (
        subjects.planned_subject("n1.example.com"),
        NodePlanned(node="n1.example.com", plan_id="p2", layout=LAYOUT),
    ),
    (subjects.planned_subject("n1"), PlanComputed(plan_id="p1", nodes={"n1": LAYOUT})),
)
WATCHER_SEEDS: tuple[tuple[str, Event], ...] = (
    (
        subjects.unplaced_subject("ml", "train"),
        PodUnplaced(
            namespace="ml", name="train", uid="u-train", reason="needs 200 GiB; the largest GPU has 80"
        ),
    ),
    (
        subjects.release_subject("ml", "train"),
        PodReleased(namespace="ml", name="train", uid="u-train", node="n1", size_gb=10, plan_id="p1"),
    ),
    (
        subjects.overuse_subject("n1", "ml", "train"),
        SliceOverused(
            node="n1",
            namespace="ml",
            name="train",
            slice_id="mps-g0-10gb-0",
            gpu_index=0,
            size_gb=10,
            used_mib=12000,
            pids=(41, 42),
        ),
    ),
)
KINDS = (
    "PodObserved",
    "PodRejected",
    "PodDeleted",
    "PodUnplaced",
    "PodReleased",
    "NodeObserved",
    "NodeOptedOut",
    "NodeGpusReported",
    "SliceOverused",
    "PlanComputed",
    "NodePlanned",
    "NodeConfigPublished",
    "NodeConfigApplied",
    "NodeConfigFailed",
    "NodeMpsConfig",
)
WORDS = (
    *KINDS,
    "Pending",
    "Running",
    "Succeeded",
    "Failed",
    "Unknown",
    "In",
    "NotIn",
    "Exists",
    "Gt",
    "Lt",
    "Equal",
    "NoSchedule",
    *EDGE_TIMES,
    "n1",
    "ml",
    "train",
    "u-train",
    "p1",
    "event",
    "kind",
    "schema_version",
)


def envelope(event: Event, time: datetime = CREATED) -> Envelope:
    return Envelope(id=f"seed-{event.kind}", time=time, source="fuzz", event=event)


# --- hostile messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One message to publish: where, the bytes, and which durable consumer of the service reads it."""

    subject: str
    data: bytes
    durable: str

    @property
    def decodes(self) -> bool:
        try:
            decode(self.data)
        except UndecodableMessageError:
            return False
        return True


HOW = (
    "mutated",
    "mutated",
    "mutated",
    "retimed",
    "damaged",
    "mutated_and_damaged",
    "wrong_shape",
    "arbitrary",
    "valid",
)


@st.composite
def hostile_data(draw: st.DrawFn, seeds: Sequence[tuple[str, Event]]) -> bytes:
    """A seed's envelope made hostile (or, now and then, left valid: of a kind the subject does not carry)."""
    _, event = draw(st.sampled_from(seeds))
    valid = encode(envelope(event))
    how = draw(st.sampled_from(HOW))
    if how == "valid":
        return valid
    if how == "wrong_shape":
        return to_json(draw(json_values())).encode("utf-8", "surrogatepass")
    if how == "arbitrary":
        return draw(st.binary(max_size=256))
    data = valid
    if how == "retimed":  # the envelope's time (and a pod's creation time) at the edges of the calendar
        document = json.loads(valid)
        document["time"] = draw(st.sampled_from(EDGE_TIMES))
        if "created" in document["event"]:
            document["event"]["created"] = draw(st.sampled_from(EDGE_TIMES))
        return to_json(document).encode()
    if how in ("mutated", "mutated_and_damaged"):
        document = draw(mutated_json(json.loads(valid), words=WORDS))
        data = to_json(document, ascii_only=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if how in ("damaged", "mutated_and_damaged"):
        data = draw(damaged_bytes(data))
    return data


def hostile_messages(
    seeds: Sequence[tuple[str, Event]], durables: dict[str, str], max_size: int = 6
) -> st.SearchStrategy[list[Message]]:
    """Lists of hostile messages on the subjects of `seeds` (any seed's subject: a kind may arrive
    where it does not belong); `durables` maps a subject prefix to the consumer that reads it."""

    def durable_of(subject: str) -> str:
        return next(durable for prefix, durable in durables.items() if subject.startswith(prefix))

    message = st.builds(
        lambda subject, data: Message(subject, data, durable_of(subject)),
        st.sampled_from(sorted({subject for subject, _ in seeds})),
        hostile_data(seeds),
    )
    return st.lists(message, min_size=1, max_size=max_size)


# --- running a service in virtual time, and what must hold afterwards ------------------------------------


def in_virtual_time(main: Callable[[], Awaitable[T]]) -> T:
    backend, options = virtual_time()
    return anyio.run(main, backend=backend, backend_options=options)


@dataclass
class Sent:
    """A published message with its stream sequence."""

    message: Message
    sequence: int


@dataclass
class Run:
    """What one example published: hostile messages and sentinels, in stream order."""

    hostile: list[Sent] = field(default_factory=list)
    sentinels: list[int] = field(default_factory=list)

    @property
    def last(self) -> int:
        return max([sent.sequence for sent in self.hostile] + self.sentinels)


async def publish_interleaved(
    bus: MemoryBus,
    hostile: Sequence[Message],
    sentinels: Sequence[tuple[str, Event]],
    positions: Sequence[int],
) -> Run:
    """Publish `hostile` in order with each sentinel before the hostile message at its position."""
    run = Run()
    at: dict[int, list[tuple[str, Event]]] = {}
    for position, sentinel in zip(positions, sentinels, strict=True):
        at.setdefault(min(position, len(hostile)), []).append(sentinel)
    for index in range(len(hostile) + 1):
        for subject, event in at.get(index, []):
            run.sentinels.append(await bus.publish(subject, event))
        if index < len(hostile):
            message = hostile[index]
            run.hostile.append(Sent(message, await bus.publish_bytes(message.subject, message.data)))
    return run


def mix(hostile: Sequence[Message]) -> str:
    """What an example's hostile messages were, as one label: whether any decoded, whether any did not."""
    decoding = {message.decodes for message in hostile}
    return {
        frozenset({False}): "none decodes",
        frozenset({True}): "all decode",
        frozenset({False, True}): "some decode",
    }[frozenset(decoding)]


def assert_settled_and_dead_lettered(broker: MemoryBroker, run: Run, boundary: str) -> None:
    """Every message settled; exactly the undecodable ones dead-lettered, at once, with the reason."""
    for durable in sorted({sent.message.durable for sent in run.hostile}):
        assert broker.settled(durable, run.last), (
            f"{durable}: a message is still waiting to be delivered again"
        )
    letters = {(letter.consumer, letter.stream_sequence): letter for letter in broker.dead}
    for sent in run.hostile:
        letter = letters.pop((sent.message.durable, sent.sequence), None)
        if sent.message.decodes:
            tally(boundary, "messages decoded and handled")
            assert letter is None, f"a message that decodes was dead-lettered: {letter}"
            continue
        tally(boundary, "messages dead-lettered")
        assert letter is not None, f"an undecodable message on {sent.message.subject} left no dead letter"
        assert letter.error.startswith("undecodable: "), letter.error
        assert "\n" not in letter.error, letter.error
        assert (letter.deliveries, letter.subject, letter.data()) == (
            1,
            sent.message.subject,
            sent.message.data,
        )
    assert not letters, f"dead letters of messages that were not hostile: {list(letters.values())}"


# --- the codec ----------------------------------------------------------------------------------------

EVERY_SEED = PLANNER_SEEDS + CONFIG_PUBLISHER_SEEDS + WATCHER_SEEDS


def retimed(event: Event, time: str) -> bytes:
    """`event`'s envelope with its time replaced by `time` (which a datetime may not hold in UTC)."""
    document = json.loads(encode(envelope(event)))
    document["time"] = time
    return json.dumps(document).encode()


@fuzz(bounded=300)
@given(hostile_data(EVERY_SEED))
@example(retimed(PLANNER_SEEDS[3][1], "9999-12-31T23:59:59-01:00")).via(
    "decode raised OverflowError for a time beyond what a datetime holds once in UTC"
)
@example(encode(envelope(PLANNER_SEEDS[3][1]))[:-1] + b',"\\n":null}').via(
    "an unknown field named by a newline put the newline into the dead letter's reason and the log"
)
def test_decode_refuses_with_a_reason_or_round_trips(data: bytes) -> None:
    try:
        decoded = decode(data)
    except UndecodableMessageError as error:
        tried("codec", "refused")
        where, _, problem = str(error).partition(": ")
        assert where and problem and "\n" not in str(error), str(error)
        return
    tried("codec", "decoded")
    assert decode(encode(decoded)) == decoded


# --- the planner ------------------------------------------------------------------------------------------

PLANNER_DURABLES = {subjects.PREFIX + ".": PLANNER}
SENTINEL_POD = PodObserved(
    namespace="fuzz",
    name="sentinel",
    uid="u-sentinel",
    resource_version="1",
    size_gb=10,
    created=CREATED,
    phase="Pending",
    gated=True,
)


@fuzz(bounded=100)
@given(hostile=hostile_messages(PLANNER_SEEDS, PLANNER_DURABLES), position=st.integers(0, 6))
@example(
    hostile=[Message(PLANNER_SEEDS[0][0], retimed(PLANNER_SEEDS[0][1], "9999-12-31T23:59:59.999Z"), PLANNER)],
    position=0,
).via("the batch window overflowed the calendar: OverflowError out of the planner's decision loop")
def test_the_planner_dead_letters_garbage_and_still_plans_for_a_valid_pod(
    hostile: list[Message], position: int
) -> None:
    async def example() -> tuple[MemoryBroker, Run, PlannerService]:
        broker = virtual_broker()
        bus = broker.bus("fuzz")
        service = PlannerService(bus, clock=loop_clock)
        async with anyio.create_task_group() as group:
            group.start_soon(service.consume)
            group.start_soon(service.decide_forever)
            await advance(START)
            run = await publish_interleaved(
                bus, hostile, [(subjects.pod_subject("fuzz", "sentinel"), SENTINEL_POD)], [position]
            )
            await advance(SETTLE)
            group.cancel_scope.cancel()
        return broker, run, service

    broker, run, service = in_virtual_time(example)
    tried("bus: planner", mix(hostile))
    tally("bus: planner", "messages", len(hostile) + 1)
    assert_settled_and_dead_lettered(broker, run, "bus: planner")
    assert service.core.state.pods.get(SENTINEL_POD.key) == SENTINEL_POD, "the valid pod was lost"
    plans = [m for m in broker.stored(subjects.plan_subject()) if m.sequence > run.sentinels[0]]
    assert plans, "no plan after the valid pod arrived"
    last = decode(plans[-1].data).event
    assert isinstance(last, PlanComputed)
    released = [
        envelope.event
        for message in broker.stored(subjects.RELEASE_EVENTS)
        if (envelope := message.envelope()) is not None
        and isinstance(envelope.event, PodReleased)
        and envelope.event.uid == SENTINEL_POD.uid
    ]
    whole = bool(last.nodes or last.placed or last.unplaced)
    assert released or not whole or SENTINEL_POD.key in {*last.placed, *last.unplaced}, last


# --- the config publisher -------------------------------------------------------------------------------

CONFIG_PUBLISHER_DURABLES = {subjects.PREFIX + ".": CONFIG_PUBLISHER}
SENTINEL_PLANNED = NodePlanned(
    node="fuzz-sentinel", plan_id="p-sentinel", layout=NodeLayout(gpus={0: (SliceSpec(size_gb=10),)})
)


@fuzz(bounded=100)
@given(
    hostile=hostile_messages(CONFIG_PUBLISHER_SEEDS, CONFIG_PUBLISHER_DURABLES), position=st.integers(0, 6)
)
def test_the_config_publisher_dead_letters_garbage_and_still_writes_a_valid_layout(
    hostile: list[Message], position: int
) -> None:
    async def example() -> tuple[MemoryBroker, Run]:
        broker = virtual_broker()
        bus = broker.bus("fuzz")
        service = ConfigPublisherService(bus)
        async with anyio.create_task_group() as group:
            group.start_soon(service.consume)
            await advance(START)
            run = await publish_interleaved(
                bus,
                hostile,
                [(subjects.planned_subject(SENTINEL_PLANNED.node), SENTINEL_PLANNED)],
                [position],
            )
            await advance(SETTLE)
            group.cancel_scope.cancel()
        return broker, run

    broker, run = in_virtual_time(example)
    tried("bus: config publisher", mix(hostile))
    tally("bus: config publisher", "messages", len(hostile) + 1)
    assert_settled_and_dead_lettered(broker, run, "bus: config publisher")
    stored = broker.configs.values.get(subjects.node_config_key(SENTINEL_PLANNED.node))
    assert stored is not None, "the valid layout was lost"
    config = NodeMpsConfig.model_validate_json(stored.value)
    assert (config.plan_id, config.gpus, config.plan_sequence) == ("p-sentinel", {0: (10,)}, run.sentinels[0])


# --- the pod watcher's consumers ------------------------------------------------------------------------


class KubernetesStandIn:
    """The pod watcher's `CoreV1Api`, answering as an API server would: the pods it holds can be read
    and patched, any other is 404; every Event is accepted, and recorded."""

    def __init__(self, pods: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.pods = pods
        self.events: list[client.CoreV1Event] = []
        self.patches: list[tuple[str, str, dict[str, Any]]] = []

    async def read_namespaced_pod(self, name: str, namespace: str, **_: object) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        pod = self.pods.get((namespace, name))
        if pod is None:
            raise ApiException(status=404, reason="Not Found")
        return pod

    async def patch_namespaced_pod(
        self, name: str, namespace: str, body: dict[str, Any], **_: object
    ) -> None:
        await anyio.lowlevel.checkpoint()
        if (namespace, name) not in self.pods:
            raise ApiException(status=404, reason="Not Found")
        self.patches.append((namespace, name, body))

    async def create_namespaced_event(self, namespace: str, body: client.CoreV1Event, **_: object) -> None:
        await anyio.lowlevel.checkpoint()
        self.events.append(body)

    async def list_node(self, **_: object) -> None:
        raise AssertionError("the watch is replaced by no_kubernetes_watch")

    async def list_pod_for_all_namespaces(self, **_: object) -> None:
        raise AssertionError("the watch is replaced by no_kubernetes_watch")

    def told(self, name: str, reason: str) -> bool:
        return any(e.involved_object.name == name and e.reason == reason for e in self.events)


async def no_kubernetes_watch(
    api: object, list_function: object, on_relist: Any, on_event: object, **selectors: str
) -> None:
    """`list_and_watch` for a cluster with no nodes and no pods: one empty list, then nothing."""

    async def nothing() -> AsyncIterator[dict[str, Any]]:
        return
        yield

    await on_relist(nothing())
    await anyio.sleep_forever()


WATCHER_DURABLES = {
    subjects.UNPLACED_EVENTS.removesuffix(">"): UNPLACED_DURABLE,
    subjects.RELEASE_EVENTS.removesuffix(">"): RELEASE_DURABLE,
    subjects.OVERUSE_EVENTS.removesuffix(">"): OVERUSE_DURABLE,
}
SENTINEL_UNPLACED = PodUnplaced(namespace="fuzz", name="sentinel-unplaced", uid="u-unplaced", reason="waits")
SENTINEL_RELEASED = PodReleased(
    namespace="fuzz", name="sentinel-released", uid="u-released", node="n1", size_gb=10, plan_id="p1"
)
SENTINEL_OVERUSED = SliceOverused(
    node="n1",
    namespace="fuzz",
    name="sentinel-overused",
    slice_id="mps-g0-10gb-0",
    gpu_index=0,
    size_gb=10,
    used_mib=20000,
    pids=(7,),
)
WATCHER_SENTINELS: list[tuple[str, Event]] = [
    (subjects.unplaced_subject("fuzz", SENTINEL_UNPLACED.name), SENTINEL_UNPLACED),
    (subjects.release_subject("fuzz", SENTINEL_RELEASED.name), SENTINEL_RELEASED),
    (subjects.overuse_subject("n1", "fuzz", SENTINEL_OVERUSED.name), SENTINEL_OVERUSED),
]


@fuzz(bounded=100)
@given(
    hostile=hostile_messages(WATCHER_SEEDS, WATCHER_DURABLES),
    positions=st.lists(st.integers(0, 6), min_size=3, max_size=3),
)
def test_the_pod_watcher_dead_letters_garbage_and_still_tells_and_releases_valid_pods(
    hostile: list[Message], positions: list[int]
) -> None:
    released_pod = {
        "metadata": {"namespace": "fuzz", "name": SENTINEL_RELEASED.name, "uid": SENTINEL_RELEASED.uid},
        "spec": {"schedulingGates": [{"name": SLICE_GATE}], "containers": [{"name": "main"}]},
    }
    kubernetes = KubernetesStandIn({("fuzz", SENTINEL_RELEASED.name): released_pod})

    async def example() -> tuple[MemoryBroker, Run]:
        broker = virtual_broker()
        bus = broker.bus("fuzz")
        service = PodWatcherService(bus, cast(client.ApiClient, object()))
        service.core = cast(client.CoreV1Api, kubernetes)
        with mock.patch.object(pod_watcher, "list_and_watch", no_kubernetes_watch):
            async with anyio.create_task_group() as group:
                group.start_soon(service.run)
                await advance(START)
                service.pods[SENTINEL_OVERUSED.key] = "u-overused"  # as if it had listed that pod
                run = await publish_interleaved(bus, hostile, WATCHER_SENTINELS, positions)
                await advance(SETTLE)
                group.cancel_scope.cancel()
        return broker, run

    broker, run = in_virtual_time(example)
    tried("bus: pod watcher", mix(hostile))
    tally("bus: pod watcher", "messages", len(hostile) + len(WATCHER_SENTINELS))
    assert_settled_and_dead_lettered(broker, run, "bus: pod watcher")
    assert kubernetes.told(SENTINEL_UNPLACED.name, PodEventReason.NOT_PLACED), "the unplaced reason was lost"
    assert kubernetes.told(SENTINEL_OVERUSED.name, PodEventReason.OVERUSED), "the overuse was lost"
    assert kubernetes.told(SENTINEL_RELEASED.name, PodEventReason.READY), "the release was lost"
    assert [(ns, name) for ns, name, _ in kubernetes.patches] == [("fuzz", SENTINEL_RELEASED.name)]
