"""Each identity's credentials allow its job and nothing more, on a real nats-server in operator mode.

The server is `LocalNatsServer(secured=True)`, as the demo runs it: it trusts only the authority of
`events.credentials`, which signs every identity with the grants of `events.access` (docs/security.md
explains them, and the side doors they close). A refusal is the server's own: a publish (a JetStream
API request is one) or a subscription it refuses comes back on the connection as a permissions
violation, and where the refused request could have had an effect, the admin's view shows it did not.
Each identity also runs its real code path on the bus (the services' own classes where they run
without more than the bus and the API emulator), which fails if a grant it needs is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import nats
import nats.errors
import nats.js.errors
import pytest
from kubernetes_asyncio import client
from nats.aio.client import Client as NatsClient
from nats.js import api

from events import access, subjects
from events.bootstrap import MIB, BusLimits, bootstrap
from events.bus import BusUnavailableError
from events.jetstream import EventBus, NatsOptions, NotBootstrappedError
from events.nodes import GpuReport, NodeGpusReported, NodeObserved, SliceOverused
from events.plans import NodeConfigApplied, NodeLayout, NodeMpsConfig, NodePlanned, PlanComputed, SliceSpec
from events.pods import PodObserved
from services.config_publisher.service import ConfigPublisherService
from services.kit.kube import api_client
from services.kit.lease import Lease
from services.planner.service import PlannerService
from services.pod_watcher.service import UNPLACED_DURABLE, PodWatcherService
from simulation.apiserver import ApiServer
from simulation.nats_server import LocalNatsServer
from tests.support import eventually

pytestmark = pytest.mark.anyio

NODE_A = "gpu-a"
NODE_B = "gpu-b.example.com"  # a dot in a node's name: its token is escaped
KEY_A, KEY_B = subjects.node_config_key(NODE_A), subjects.node_config_key(NODE_B)
AGENT_A, AGENT_B = access.node_agent_role(NODE_A), access.node_agent_role(NODE_B)
KV = access.KV_STREAM
API = access.JS_API
WAIT = 5.0


@pytest.fixture(scope="module")
def server() -> Iterator[LocalNatsServer]:
    """One secured server for the module, bootstrapped by the admin; each test leaves it as it found it."""
    with LocalNatsServer(secured=True) as running:
        anyio.run(bootstrap, running.options_as_admin(), BusLimits(), backend="asyncio")
        yield running


@dataclass
class Connection:
    """A bare connection as one identity (its credentials, its inbox prefix), keeping every error the
    server sent it."""

    nc: NatsClient
    identity: str
    errors: list[str] = field(default_factory=list)

    def refusal_of(self, what: str, subject: str) -> bool:
        return f'permissions violation for {what} to "{subject.lower()}"' in self.errors

    async def publish_is_refused(self, subject: str, payload: bytes = b"") -> None:
        await self.nc.publish(subject, payload, reply=f"{access.inbox_prefix(self.identity)}.probe")
        await self.nc.flush()
        await eventually(lambda: self.refusal_of("publish", subject), f"publishing to {subject} refused")

    async def subscription_is_refused(self, subject: str) -> None:
        await self.nc.subscribe(subject)
        await self.nc.flush()
        await eventually(
            lambda: self.refusal_of("subscription", subject), f"subscribing to {subject} refused"
        )


@asynccontextmanager
async def connected(options: NatsOptions) -> AsyncIterator[Connection]:
    connection = Connection(NatsClient(), options.identity)

    async def keep(error: Exception) -> None:
        connection.errors.append(str(error).removeprefix("nats: ").lower())

    await connection.nc.connect(
        servers=[options.url],
        user_credentials=str(options.credentials),
        inbox_prefix=access.inbox_prefix(options.identity),
        error_cb=keep,
        allow_reconnect=False,
    )
    try:
        yield connection
    finally:
        await connection.nc.close()


@asynccontextmanager
async def bus_as(server: LocalNatsServer, role: access.Role) -> AsyncIterator[EventBus]:
    bus = await EventBus.connect(server.options_as(role), source=role.identity)
    try:
        yield bus
    finally:
        await bus.close()


@asynccontextmanager
async def admin_bus(server: LocalNatsServer) -> AsyncIterator[EventBus]:
    bus = await EventBus.connect(server.options_as_admin(), source="admin")
    try:
        yield bus
    finally:
        await bus.close()


async def stored_on(bus: EventBus, subject: str) -> int:
    """How many messages the event stream holds on exactly `subject` (the admin's view)."""
    info = await bus.js.stream_info(subjects.STREAM, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


def report(node: str) -> NodeGpusReported:
    gpu = GpuReport(index=0, uuid="GPU-0", model="A100", memory_mib=81920, compute_capability=(8, 0))
    return NodeGpusReported(node=node, gpus=(gpu,))


def desired(node: str, plan_id: str) -> bytes:
    return (
        NodeMpsConfig(node=node, plan_id=plan_id, plan_sequence=1, gpus={0: (10,)}).model_dump_json().encode()
    )


# --- a node agent cannot reach another node ------------------------------------------------------


@pytest.mark.parametrize(
    "request_subject",
    [
        f"{API}.STREAM.MSG.GET.{KV}",  # message get: the client's KV get without direct gets
        f"{API}.DIRECT.GET.{KV}.{access.kv_subject(KEY_B)}",  # direct get of B's key
        f"{API}.DIRECT.GET.{KV}",  # direct get by sequence or subject in the request
        f"{API}.STREAM.INFO.{KV}",  # with a subjects filter, it lists the keys
        f"{API}.CONSUMER.CREATE.{KV}",  # an ephemeral consumer with any filter (the client's KV watch)
        f"{API}.CONSUMER.CREATE.{KV}.{access.key_watcher(KEY_A)}",  # its own name, filter only in the body
        f"{API}.CONSUMER.CREATE.{KV}.{access.key_watcher(KEY_A)}.{access.kv_subject(KEY_B)}",
        f"{API}.CONSUMER.CREATE.{KV}.{access.key_watcher(KEY_B)}.{access.kv_subject(KEY_B)}",
        f"{API}.CONSUMER.CREATE.{KV}.{access.key_watcher(KEY_A)}.{access.KV_SUBJECT_PREFIX}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{KV}.{access.key_watcher(KEY_A)}",  # the legacy durable create
        f"{API}.CONSUMER.MSG.NEXT.{KV}.{access.key_watcher(KEY_B)}",  # pulling from B's watcher
        f"{API}.CONSUMER.INFO.{KV}.{access.key_watcher(KEY_B)}",
        f"{API}.CONSUMER.LIST.{KV}",
        f"{API}.CONSUMER.NAMES.{KV}",
    ],
)
async def test_a_node_agent_cannot_read_another_nodes_key(
    server: LocalNatsServer, request_subject: str
) -> None:
    async with connected(server.options_as(AGENT_A)) as agent_a:
        await agent_a.publish_is_refused(
            request_subject, json.dumps({"last_by_subj": access.kv_subject(KEY_B)}).encode()
        )


async def test_a_node_agents_own_key_store_cannot_get_another_nodes_key(server: LocalNatsServer) -> None:
    async with admin_bus(server) as admin:
        await (await admin.node_configs()).create(KEY_B, desired(NODE_B, "p-b"))
    async with connected(server.options_as(AGENT_A)) as agent_a, bus_as(server, AGENT_A) as bus_a:
        store = await bus_a.node_configs()
        with pytest.raises(BusUnavailableError) as refused:  # the refused request is never answered
            await store.get(KEY_B)
        assert isinstance(refused.value.__cause__, nats.errors.TimeoutError)
        # The same request, on a connection that sees the server's answer: refused.
        await agent_a.publish_is_refused(f"{API}.DIRECT.GET.{KV}.{access.kv_subject(KEY_B)}")


async def test_the_filter_named_in_the_create_subject_is_the_only_one_the_server_accepts(
    server: LocalNatsServer,
) -> None:
    """A's own grant names its watcher and its key; the server refuses a request under that subject
    whose filter is B's key, or several filters."""
    create = f"{API}.CONSUMER.CREATE.{KV}.{access.key_watcher(KEY_A)}.{access.kv_subject(KEY_A)}"
    async with connected(server.options_as(AGENT_A)) as agent_a:
        for config in (
            {"filter_subject": access.kv_subject(KEY_B)},
            {"filter_subjects": [access.kv_subject(KEY_A), access.kv_subject(KEY_B)]},
            {},
        ):
            request = {
                "stream_name": KV,
                "config": {"name": access.key_watcher(KEY_A), "ack_policy": "none", **config},
            }
            reply = await agent_a.nc.request(create, json.dumps(request).encode(), timeout=WAIT)
            answer = json.loads(reply.data)
            assert answer["error"]["err_code"] in (10131, 10137), answer  # filter mismatch / several filters


@pytest.mark.parametrize(
    "subject",
    [
        access.kv_subject(KEY_B),  # the bucket's writes to B's key, as they happen
        f"{access.KV_SUBJECT_PREFIX}.>",
        "_INBOX.>",  # everyone's replies
        f"{access.inbox_prefix(AGENT_B.identity)}.>",  # B's replies: B's config, as its watcher pulls it
        f"{access.inbox_prefix(access.PLANNER)}.>",
        subjects.ALL_EVENTS,
        subjects.planned_subject(NODE_B),  # B's layout, as the planner publishes it
        "$JS.EVENT.>",  # advisories name every consumer
        ">",
    ],
)
async def test_a_node_agent_cannot_subscribe_outside_its_own_inbox(
    server: LocalNatsServer, subject: str
) -> None:
    async with connected(server.options_as(AGENT_A)) as agent_a:
        await agent_a.subscription_is_refused(subject)


@pytest.mark.parametrize(
    "subject",
    [
        subjects.plan_subject(),
        subjects.planned_subject(NODE_A),  # not even its own layout
        subjects.gpus_subject(NODE_B),
        subjects.config_subject(NODE_B),
        subjects.overuse_subject(NODE_B, "default", "pod"),
        subjects.pod_subject("default", "pod"),
        subjects.node_subject(NODE_A),
        subjects.release_subject("default", "pod"),
        subjects.unplaced_subject("default", "pod"),
        access.kv_subject(KEY_A),  # not even its own desired config
        access.kv_subject(KEY_B),
        f"{access.inbox_prefix(AGENT_B.identity)}.forged",  # a forged reply into B's inbox
        subjects.dead_letter_subject("planner"),
    ],
)
async def test_a_node_agent_cannot_publish_what_is_not_its_own(server: LocalNatsServer, subject: str) -> None:
    async with connected(server.options_as(AGENT_A)) as agent_a:
        await agent_a.publish_is_refused(subject, b"{}")
    if subject.startswith(f"{subjects.PREFIX}."):
        async with admin_bus(server) as admin:
            assert await stored_on(admin, subject) == 0


async def test_a_push_consumer_aimed_at_another_nodes_subject_delivers_nothing_there(
    server: LocalNatsServer,
) -> None:
    """The one field of A's own watcher that no grant can check is a push consumer's deliver subject;
    aimed at B's report subject it could only carry A's own config, and the server delivers nothing
    where nobody subscribes, so no stream stores it."""
    async with admin_bus(server) as admin:
        await (await admin.node_configs()).create(KEY_A, desired(NODE_A, "p-a"))
    create = f"{API}.CONSUMER.CREATE.{KV}.{access.key_watcher(KEY_A)}.{access.kv_subject(KEY_A)}"
    config = {
        "name": access.key_watcher(KEY_A),
        "filter_subject": access.kv_subject(KEY_A),
        "deliver_subject": subjects.gpus_subject(NODE_B),
        "ack_policy": "none",
        "inactive_threshold": 5_000_000_000,
    }
    async with connected(server.options_as(AGENT_A)) as agent_a:
        reply = await agent_a.nc.request(
            create, json.dumps({"stream_name": KV, "config": config}).encode(), timeout=WAIT
        )
        assert "error" not in json.loads(reply.data)
        await anyio.sleep(0.5)
    async with admin_bus(server) as admin:
        assert await stored_on(admin, subjects.gpus_subject(NODE_B)) == 0
        await admin.js.delete_consumer(KV, access.key_watcher(KEY_A))


# --- no service changes a stream, or does another's job ------------------------------------------

STREAM_CHANGES = [
    f"{API}.STREAM.DELETE.{subjects.STREAM}",
    f"{API}.STREAM.PURGE.{subjects.STREAM}",
    f"{API}.STREAM.UPDATE.{subjects.STREAM}",
    f"{API}.STREAM.MSG.DELETE.{subjects.STREAM}",
    f"{API}.STREAM.SNAPSHOT.{subjects.STREAM}",
    f"{API}.STREAM.DELETE.{KV}",
    f"{API}.STREAM.PURGE.{KV}",
    f"{API}.STREAM.DELETE.{subjects.DEAD_LETTER_STREAM}",
    f"{API}.STREAM.CREATE.ANOTHER",
]
EVERY_SERVICE_AND_AGENT = [*access.SERVICE_ROLES.values(), AGENT_A]


@pytest.mark.parametrize("role", EVERY_SERVICE_AND_AGENT, ids=lambda role: role.identity)
async def test_no_service_or_agent_can_create_change_purge_or_delete_a_stream(
    server: LocalNatsServer, role: access.Role
) -> None:
    async with connected(server.options_as(role)) as connection:
        for request_subject in STREAM_CHANGES:
            await connection.publish_is_refused(request_subject, b"{}")
    async with admin_bus(server) as admin:
        await admin.check_bootstrapped()  # every stream still there


@pytest.mark.parametrize(
    ("role", "subject"),
    [
        (access.PLANNER_ROLE, access.kv_subject(KEY_A)),  # only the config publisher writes configs
        (access.PLANNER_ROLE, f"{API}.DIRECT.GET.{KV}.{access.kv_subject(KEY_A)}"),
        (access.PLANNER_ROLE, subjects.gpus_subject(NODE_A)),  # no report in an agent's name
        (access.PLANNER_ROLE, subjects.pod_subject("default", "pod")),
        (access.PLANNER_ROLE, subjects.config_subject(NODE_A)),
        (access.PLANNER_ROLE, f"{API}.CONSUMER.MSG.NEXT.{subjects.STREAM}.pod-watcher-release"),
        (access.PLANNER_ROLE, f"{API}.CONSUMER.CREATE.{KV}"),
        (access.POD_WATCHER_ROLE, subjects.plan_subject()),
        (access.POD_WATCHER_ROLE, subjects.release_subject("default", "pod")),  # only the planner releases
        (access.POD_WATCHER_ROLE, subjects.gpus_subject(NODE_A)),
        (access.POD_WATCHER_ROLE, access.kv_subject(KEY_A)),
        (access.POD_WATCHER_ROLE, f"{API}.DIRECT.GET.{KV}.{access.kv_subject(KEY_A)}"),
        (access.POD_WATCHER_ROLE, f"{API}.CONSUMER.MSG.NEXT.{subjects.STREAM}.planner"),
        # its own durable, with another filter than the one it consumes
        (
            access.POD_WATCHER_ROLE,
            f"{API}.CONSUMER.CREATE.{subjects.STREAM}.pod-watcher-release.{subjects.GPU_EVENTS}",
        ),
        (access.CONFIG_PUBLISHER_ROLE, subjects.plan_subject()),
        (access.CONFIG_PUBLISHER_ROLE, subjects.planned_subject(NODE_A)),
        (access.CONFIG_PUBLISHER_ROLE, subjects.gpus_subject(NODE_A)),
        (access.CONFIG_PUBLISHER_ROLE, subjects.release_subject("default", "pod")),
        (access.CONFIG_PUBLISHER_ROLE, f"{API}.DIRECT.GET.{KV}"),  # by sequence: history and deleted keys
        (access.CONFIG_PUBLISHER_ROLE, f"{API}.CONSUMER.CREATE.{KV}"),
        (access.CONFIG_PUBLISHER_ROLE, f"{API}.CONSUMER.DELETE.{subjects.STREAM}.planner"),
    ],
    ids=lambda value: value.identity if isinstance(value, access.Role) else value,
)
async def test_a_service_cannot_publish_or_request_what_its_role_does_not_need(
    server: LocalNatsServer, role: access.Role, subject: str
) -> None:
    async with connected(server.options_as(role)) as connection:
        await connection.publish_is_refused(subject, b"{}")


@pytest.mark.parametrize("role", access.SERVICE_ROLES.values(), ids=lambda role: role.identity)
async def test_a_service_cannot_subscribe_to_events_or_another_inbox(
    server: LocalNatsServer, role: access.Role
) -> None:
    async with connected(server.options_as(role)) as connection:
        for subject in (
            "_INBOX.>",
            f"{access.inbox_prefix(AGENT_A.identity)}.>",
            subjects.ALL_EVENTS,
            f"{access.KV_SUBJECT_PREFIX}.>",
        ):
            await connection.subscription_is_refused(subject)


# --- each identity does its job with its own credentials ----------------------------------------


async def test_a_node_agent_reports_and_watches_its_own_key_with_its_credentials(
    server: LocalNatsServer,
) -> None:
    """What `node_agent.agent.NodeAgent` does on the bus: its key's value and its changes, as the config
    publisher writes them; its reports, config outcomes and overuse, under its own node."""
    async with bus_as(server, access.CONFIG_PUBLISHER_ROLE) as publisher:
        configs = await publisher.node_configs()
        existing = await configs.get(KEY_A)
        first = await (
            configs.create(KEY_A, desired(NODE_A, "p-1"))
            if existing is None
            else configs.update(KEY_A, desired(NODE_A, "p-1"), last=existing.revision)
        )
        async with bus_as(server, AGENT_A) as agent:
            seen = []
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    async for stored in (await agent.node_configs()).watch(KEY_A):
                        seen.append(NodeMpsConfig.model_validate_json(stored.value).plan_id)

                group.start_soon(watch)
                await eventually(lambda: seen == ["p-1"], "the current value")
                await configs.update(KEY_A, desired(NODE_A, "p-2"), last=first)
                await eventually(lambda: seen == ["p-1", "p-2"], "the change")
                group.cancel_scope.cancel()
            await agent.publish(subjects.gpus_subject(NODE_A), report(NODE_A))
            await agent.publish(
                subjects.config_subject(NODE_A), NodeConfigApplied(node=NODE_A, plan_id="p-2")
            )
            overused = SliceOverused(
                node=NODE_A,
                namespace="ml",
                name="train",
                slice_id="s",
                gpu_index=0,
                size_gb=10,
                used_mib=20000,
                pids=(1,),
            )
            await agent.publish(subjects.overuse_subject(NODE_A, "ml", "train"), overused)
            with pytest.raises(BusUnavailableError):  # the publish of another node's report is never stored
                await agent.publish(subjects.gpus_subject(NODE_B), report(NODE_B))


async def test_the_config_publisher_writes_the_configs_the_planner_asks_for(server: LocalNatsServer) -> None:
    node = "gpu-publisher"
    layout = NodeLayout(gpus={0: (SliceSpec(size_gb=10),)})
    async with admin_bus(server) as admin, bus_as(server, access.CONFIG_PUBLISHER_ROLE) as bus:
        await admin.publish(
            subjects.planned_subject(node), NodePlanned(node=node, plan_id="p-pub", layout=layout)
        )
        async with anyio.create_task_group() as group:
            group.start_soon(ConfigPublisherService(bus).consume)
            configs = await admin.node_configs()

            async def written() -> bool:
                return await configs.get(subjects.node_config_key(node)) is not None

            await eventually(written, "the node's config written", WAIT)
            group.cancel_scope.cancel()
        assert await stored_on(admin, subjects.config_subject(node)) == 1  # NodeConfigPublished
        # What the service reads on start when it also writes the Kubernetes side.
        levels = await bus.current_levels(subjects.PLANNED_EVENTS)
        assert any(isinstance(e.event, NodePlanned) and e.event.node == node for e in levels)


async def test_the_planner_plans_from_the_stream_with_its_credentials(server: LocalNatsServer) -> None:
    node = "gpu-planner"
    pod = PodObserved(
        namespace="ml",
        name="trainer",
        uid="uid-trainer",
        resource_version="1",
        size_gb=10,
        created=datetime(2026, 1, 1, tzinfo=UTC),
        phase="Pending",
        gated=True,
    )
    async with admin_bus(server) as admin, bus_as(server, access.PLANNER_ROLE) as bus:
        await admin.publish(subjects.node_subject(node), NodeObserved(name=node))
        await admin.publish(subjects.gpus_subject(node), report(node))
        await admin.publish(subjects.pod_subject(pod.namespace, pod.name), pod)
        planner = PlannerService(bus)
        async with anyio.create_task_group() as group:
            group.start_soon(planner.consume)
            group.start_soon(planner.decide_forever)

            async def planned() -> bool:
                plans = await admin.current_levels(subjects.plan_subject())
                return any(isinstance(e.event, PlanComputed) and node in e.event.nodes for e in plans)

            await eventually(planned, "a plan for the node", WAIT)
            group.cancel_scope.cancel()
        assert await stored_on(admin, subjects.planned_subject(node)) >= 1


async def test_the_pod_watcher_publishes_nodes_and_dead_letters_with_its_credentials(
    server: LocalNatsServer,
) -> None:
    node = "gpu-watched"
    async with (
        ApiServer() as apiserver,
        admin_bus(server) as admin,
        bus_as(server, access.POD_WATCHER_ROLE) as bus,
    ):
        kube = await api_client(apiserver.url, "pod-watcher")
        try:
            labels = {"nos.nebuly.com/gpu-partitioning": "mps"}
            await client.CoreV1Api(kube).create_node(
                client.V1Node(metadata=client.V1ObjectMeta(name=node, labels=labels))
            )
            await admin.publish_bytes(subjects.unplaced_subject("ml", "poison"), b"not an envelope")
            async with anyio.create_task_group() as group:
                group.start_soon(PodWatcherService(bus, kube).run)

                async def node_published() -> bool:
                    return await stored_on(admin, subjects.node_subject(node)) > 0

                async def poison_dead_lettered() -> bool:
                    return bool(await admin.dead_letters(UNPLACED_DURABLE))

                await eventually(node_published, "the node published", WAIT)
                await eventually(poison_dead_lettered, "the poison dead-lettered", WAIT)
                group.cancel_scope.cancel()
        finally:
            await kube.close()


async def test_the_bootstrap_applies_its_limits_again_and_the_admin_alone_manages_streams(
    server: LocalNatsServer,
) -> None:
    smaller = BusLimits(events_max_bytes=512 * MIB, node_configs_max_bytes=32 * MIB)
    assert await bootstrap(server.options_as_admin(), smaller) == [
        f"{name}: configuration applied" for name in access.STREAMS
    ]
    async with admin_bus(server) as admin:
        assert (await admin.js.stream_info(subjects.STREAM)).config.max_bytes == 512 * MIB
        assert (await admin.js.stream_info(access.KV_STREAM)).config.max_bytes == 32 * MIB
        await bootstrap(server.options_as_admin(), BusLimits())
        assert (await admin.js.stream_info(subjects.STREAM)).config.max_bytes == BusLimits().events_max_bytes
        await admin.js.add_stream(api.StreamConfig(name="SCRATCH", subjects=["scratch.>"]))
        await admin.js.delete_stream("SCRATCH")


async def test_a_service_stops_naming_the_bootstrap_when_the_streams_are_missing() -> None:
    with LocalNatsServer(secured=True) as bare:
        with pytest.raises(NotBootstrappedError, match="run `mpsflow bootstrap`"):
            await EventBus.connect(bare.options_as(AGENT_A), source="node-agent")
        with pytest.raises(NotBootstrappedError, match="run `mpsflow bootstrap`"):
            await EventBus.connect(bare.options_as(access.PLANNER_ROLE), source="planner")


# --- leases: each service's own key, nobody else's --------------------------------------------------


async def test_two_replicas_of_a_service_take_turns_by_its_lease_over_the_real_bucket() -> None:
    """The planner's identity holds the planner's lease, a second replica of it waits, then takes it
    over once the first gives it up; the lease loop runs on the real bucket and grants."""
    with LocalNatsServer(secured=True) as running:
        await bootstrap(running.options_as_admin(), BusLimits())
        async with (
            bus_as(running, access.PLANNER_ROLE) as bus_a,
            bus_as(running, access.PLANNER_ROLE) as bus_b,
        ):
            first = Lease(await bus_a.leases(), access.PLANNER, "planner-a", time.time)
            second = Lease(await bus_b.leases(), access.PLANNER, "planner-b", time.time)
            assert await first.try_hold() is None
            assert await second.try_hold() is not None  # held by planner-a
            assert await first.try_hold() is None  # renewed
            await first.give_up()
            assert await second.try_hold() is None


async def test_no_identity_can_touch_another_services_lease(server: LocalNatsServer) -> None:
    planner_lease = f"{access.LEASE_SUBJECT_PREFIX}.{access.PLANNER}"
    for role in (access.POD_WATCHER_ROLE, access.CONFIG_PUBLISHER_ROLE, AGENT_A):
        async with connected(server.options_as(role)) as connection:
            await connection.publish_is_refused(planner_lease, b'{"holder": "me", "expires": 1e12}')
            await connection.publish_is_refused(f"{API}.DIRECT.GET.{access.LEASE_STREAM}.{planner_lease}")
    async with connected(server.options_as(AGENT_A)) as agent:  # and an agent has no lease of its own
        await agent.publish_is_refused(f"{access.LEASE_SUBJECT_PREFIX}.{access.node_agent_identity(NODE_A)}")
