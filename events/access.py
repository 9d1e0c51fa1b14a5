"""Who may do what on the bus: one NATS identity per service and per node, and its permissions.

Every connection to NATS runs as one identity. This module names them, says which subjects each may
publish and subscribe to (the JetStream API included: a request to `$JS.API.…` is a publish), and
names the consumers they create, so that a grant can name exactly the consumer and the filter it
allows. `events.credentials` turns these grants into signed user credentials; `events.jetstream`
connects with the identity's inbox prefix and names its consumers as this module says; the
permission tests (tests/integration/test_nats_permissions.py) hold the server to them. Why each grant
is what it is, and which side doors they close: docs/security.md.

The node agent of node N may publish its own reports only, and read only its own key of the node-config
bucket, and only through one consumer whose filter is that key: NATS checks the filter named in the
consumer-create subject against the request, so that grant admits no other filter and no unfiltered
consumer. Nothing here grants a direct or message get on the bucket's stream to a node agent, or a
subscription outside its own inbox prefix.

This module is pure: it builds strings and never performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from events import subjects
from events.subjects import encode_token

JS_API = "$JS.API"
JS_ACK = "$JS.ACK"
KV_STREAM = f"KV_{subjects.NODE_CONFIG_BUCKET}"
"""The stream that holds the node-config bucket (JetStream names a bucket's stream so)."""
KV_SUBJECT_PREFIX = f"$KV.{subjects.NODE_CONFIG_BUCKET}"
LEASE_STREAM = f"KV_{subjects.LEASE_BUCKET}"
LEASE_SUBJECT_PREFIX = f"$KV.{subjects.LEASE_BUCKET}"
STREAMS = (subjects.STREAM, subjects.DEAD_LETTER_STREAM, KV_STREAM, LEASE_STREAM)
"""The streams `mpsflow bootstrap` makes: events, dead letters, the node-config and lease buckets'."""

ADMIN = "admin"
"""The identity with every right: it runs `mpsflow bootstrap` (streams, bucket, limits), and the demo's
own observer and `mpsflow record` use it. No service runs as it."""
POD_WATCHER = "pod-watcher"
PLANNER = "planner"
CONFIG_PUBLISHER = "config-publisher"
SERVICE_IDENTITIES = (POD_WATCHER, PLANNER, CONFIG_PUBLISHER)
"""The services that use the bus; the admission webhook and the MPS daemon keeper never connect to it."""
NODE_AGENT = "node-agent"


def node_agent_identity(node: str) -> str:
    """The identity of the node agent of `node`: one per node."""
    return f"{NODE_AGENT}.{encode_token(node)}"


def inbox_prefix(identity: str) -> str:
    """Where the replies to `identity`'s requests come: its own inbox subtree, which no other identity
    may subscribe to (a shared `_INBOX.>` would let one node read the replies sent to another)."""
    return f"_INBOX.{identity}"


def kv_subject(key: str) -> str:
    """The subject under which the node-config bucket stores `key`."""
    return f"{KV_SUBJECT_PREFIX}.{key}"


def key_watcher(key: str) -> str:
    """The consumer through which a node agent watches its key: one name per key, so that a grant can
    name it (a consumer's name cannot hold a dot, and a permission cannot match part of a token)."""
    return f"watch-{key}"


def reader(identity: str, filter_subject: str) -> str:
    """The consumer through which `identity` reads a stream to its end under `filter_subject` (the
    current levels a service rebuilds its state from); deleted after each read."""
    return f"{encode_token(identity)}-read-{encode_token(filter_subject)}"


@dataclass(frozen=True)
class Durable:
    """A durable consumer of the event stream that a service owns.

    `filter_subject`: its one filter, which then appears in the consumer-create subject, so that the
    grant admits no other; None for a consumer with several filters, whose create subject names none.
    `resets`: the service deletes and recreates it on start."""

    name: str
    filter_subject: str | None
    resets: bool = False


@dataclass(frozen=True)
class Role:
    """What one identity does on the bus, from which its grants follow."""

    identity: str
    publishes: tuple[str, ...]
    durables: tuple[Durable, ...] = ()
    reads: tuple[str, ...] = ()
    """Filters of the event stream it reads to the end (`Bus.current_levels`)."""
    writes_node_configs: bool = False
    """It reads and writes every key of the node-config bucket (the config publisher)."""
    watched_key: str | None = None
    """The one key of the node-config bucket it watches (a node agent's own)."""
    lease: str | None = None
    """Its key in the lease bucket: the service runs as replicas, one active at a time."""


@dataclass(frozen=True)
class Grants:
    """Subjects an identity may publish to and subscribe to; NATS refuses everything else."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


POD_WATCHER_ROLE = Role(
    POD_WATCHER,
    publishes=(subjects.POD_EVENTS, subjects.NODE_EVENTS),
    durables=(
        Durable("pod-watcher-unplaced", subjects.UNPLACED_EVENTS),
        Durable("pod-watcher-release", subjects.RELEASE_EVENTS),
        Durable("pod-watcher-overuse", subjects.OVERUSE_EVENTS),
    ),
    reads=(subjects.POD_EVENTS, subjects.NODE_EVENTS),
    lease=POD_WATCHER,
)
PLANNER_ROLE = Role(
    PLANNER,
    publishes=(
        subjects.plan_subject(),
        subjects.PLANNED_EVENTS,
        subjects.RELEASE_EVENTS,
        subjects.UNPLACED_EVENTS,
    ),
    durables=(Durable("planner", None, resets=True),),
    reads=(subjects.plan_subject(),),
    lease=PLANNER,
)
CONFIG_PUBLISHER_ROLE = Role(
    CONFIG_PUBLISHER,
    publishes=(subjects.CONFIG_EVENTS,),
    durables=(Durable("config-publisher", subjects.PLANNED_EVENTS),),
    reads=(subjects.PLANNED_EVENTS,),
    writes_node_configs=True,
    lease=CONFIG_PUBLISHER,
)
SERVICE_ROLES = {role.identity: role for role in (POD_WATCHER_ROLE, PLANNER_ROLE, CONFIG_PUBLISHER_ROLE)}


def node_agent_role(node: str) -> Role:
    """The node agent of `node`: its own reports, configs and overuse, and its own key, nothing more."""
    return Role(
        node_agent_identity(node),
        publishes=(
            subjects.gpus_subject(node),
            subjects.config_subject(node),
            f"{subjects.OVERUSE_EVENTS.removesuffix('>')}{encode_token(node)}.>",
        ),
        watched_key=subjects.node_config_key(node),
    )


def _consumer_api(action: str, stream: str, consumer: str) -> str:
    return f"{JS_API}.CONSUMER.{action}.{stream}.{consumer}"


def grants(role: Role) -> Grants:
    """The subjects `role` may publish to (its events and the JetStream API requests it makes) and
    subscribe to (its own inbox subtree: JetStream answers and delivers there)."""
    publish = [*role.publishes, f"{JS_API}.STREAM.NAMES"]  # the start-up check that the streams exist
    for durable in role.durables:
        create = _consumer_api("CREATE", subjects.STREAM, durable.name)
        publish += [
            f"{create}.{durable.filter_subject}" if durable.filter_subject else create,
            _consumer_api("MSG.NEXT", subjects.STREAM, durable.name),
            _consumer_api("INFO", subjects.STREAM, durable.name),
            f"{JS_ACK}.{subjects.STREAM}.{durable.name}.>",
            subjects.dead_letter_subject(durable.name),
        ]
        if durable.resets:
            publish.append(_consumer_api("DELETE", subjects.STREAM, durable.name))
    for filter_subject in role.reads:
        name = reader(role.identity, filter_subject)
        publish += [
            f"{_consumer_api('CREATE', subjects.STREAM, name)}.{filter_subject}",
            _consumer_api("MSG.NEXT", subjects.STREAM, name),
            _consumer_api("DELETE", subjects.STREAM, name),
        ]
    if role.writes_node_configs:
        publish += [f"{KV_SUBJECT_PREFIX}.>", f"{JS_API}.DIRECT.GET.{KV_STREAM}.{KV_SUBJECT_PREFIX}.>"]
    if role.watched_key is not None:
        name = key_watcher(role.watched_key)
        publish += [
            f"{_consumer_api('CREATE', KV_STREAM, name)}.{kv_subject(role.watched_key)}",
            _consumer_api("MSG.NEXT", KV_STREAM, name),
            _consumer_api("DELETE", KV_STREAM, name),
        ]
    if role.lease is not None:  # compare-and-set writes and direct gets of its own key only
        key = f"{LEASE_SUBJECT_PREFIX}.{encode_token(role.lease)}"
        publish += [key, f"{JS_API}.DIRECT.GET.{LEASE_STREAM}.{key}"]
    return Grants(publish=tuple(publish), subscribe=(f"{inbox_prefix(role.identity)}.>",))
