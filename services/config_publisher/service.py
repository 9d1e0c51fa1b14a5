"""The config publisher: writes each layout the planner asks of a node into that node's KV key.

Desired state has one form and one path: the planner asks a node for a layout with `NodePlanned`
(on the node's own subject), this service writes it as the node's `NodeMpsConfig` in the
node-config bucket, and the node's agent watches that key. The whole `PlanComputed` is for people
and tools, never read here. A key is written with compare-and-set on its revision (retrying on a
conflict) and never replaced by a config from an older ask (`plan_sequence` is the ask's stream
sequence), so a redelivered old ask is harmless. Each node's asks are written in order, and
different nodes' at once: a plan that asks many nodes does not queue them behind each other's
round trips. It never talks to a GPU.

With a `CompatibilityWriter` it also writes, after the KV bucket (which stays the main path),
the Kubernetes view of every node whose KV config is the asked layout: the device-plugin ConfigMap
key and label of nebuly's fork, the node's sharing labels (mpsflow's own; GFD's only when asked)
and nos status annotations, and nothing else on the node (docs/nos-compatibility.md §1.1). The
writer costs no request for a node whose rendering it already applied, so only nodes whose
layout (or, for the status annotations, slice usage) changed are touched. That write runs
beside the KV path, so a slow or unreachable API server never delays the node agents; a node
whose Kubernetes write failed is written again on the `KUBERNETES_API` schedule (sooner when a
new ask arrives), and after a restart the latest plan is written again. Retries follow
services/kit/retry.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from events import subjects
from events.bus import Bus, ConfigStore, Delivery, RevisionConflictError, TransientError
from events.envelope import content_id
from events.metrics import NODE_CONFIGS_WRITTEN
from events.plans import NodeConfigPublished, NodeLayout, NodeMpsConfig, NodePlanned
from events.tracing import current_traceparent
from services.config_publisher.decide import key_action
from services.config_publisher.kube_writer import CompatibilityWriter
from services.kit.retry import CONFLICT, KUBERNETES_API, retrying
from services.kit.signal import Wakeup

log = logging.getLogger(__name__)

DURABLE = "config-publisher"


def desired_config(plan_id: str, layout: NodeLayout, plan_sequence: int, node: str) -> NodeMpsConfig:
    return NodeMpsConfig(
        node=node,
        plan_id=plan_id,
        plan_sequence=plan_sequence,
        gpus=layout.sizes(),
        traceparent=current_traceparent(),
    )


class ConfigPublisherService:
    def __init__(self, bus: Bus, writer: CompatibilityWriter | None = None) -> None:
        self.bus = bus
        self.writer = writer
        self._kv: ConfigStore | None = None
        self._written: dict[str, tuple[int, NodeMpsConfig]] = {}
        """Per node, the revision and config this publisher last wrote to its key: a write that
        follows starts from it, with no read of the key (one round trip of two)."""
        self._kubernetes_due: dict[str, tuple[NodeLayout, int]] = {}
        self._kubernetes_wakeup = Wakeup()

    async def kv(self) -> ConfigStore:
        if self._kv is None:
            self._kv = await self.bus.node_configs()
        return self._kv

    async def consume(self, ready: Callable[[], None] | None = None) -> None:
        """Write what is asked until cancelled; `ready` once its consumer is set up and serving."""
        async with anyio.create_task_group() as group:
            if self.writer is not None:
                await self._recall_latest_plan()
                group.start_soon(self._keep_kubernetes_written)
            await self.bus.consume(
                durable=DURABLE,
                filter_subjects=[subjects.PLANNED_EVENTS],
                handle=self.handle,
                deliver_from="last_per_subject",
                batch=16,
                ready=ready,
                subjects_apart=True,
            )

    async def _recall_latest_plan(self) -> None:
        """After a restart, the Kubernetes side is brought to the latest layouts even if they were acked."""
        for envelope in await self.bus.current_levels(subjects.PLANNED_EVENTS):
            if isinstance(envelope.event, NodePlanned):
                self._kubernetes_due[envelope.event.node] = (envelope.event.layout, 0)
        if self._kubernetes_due:
            self._kubernetes_wakeup.set()

    async def _keep_kubernetes_written(self) -> None:
        """Write node labels (and the compatibility ConfigMap) for the latest plans, retrying with backoff.

        It runs beside the KV path so that a slow or unreachable API server never delays the node
        agents, which read the KV. It waits by itself rather than through stamina, because a new
        ask cuts the wait short (and the nodes that failed are written again with it).
        """
        failed_passes = 0
        while True:
            retry_in = KUBERNETES_API.delay(failed_passes) if failed_passes else None
            await self._kubernetes_wakeup.wait(retry_in if self._kubernetes_due else None)
            failed_passes = failed_passes + 1 if await self.write_kubernetes() else 0

    async def write_kubernetes(self) -> dict[str, str]:
        """One pass over the nodes whose Kubernetes side is due; returns the failures (kept due)."""
        due, self._kubernetes_due = self._kubernetes_due, {}
        if self.writer is None or not due:
            return {}
        version = max(sequence for _, sequence in due.values())
        failures = await self.writer.write({node: layout for node, (layout, _) in due.items()}, version)
        for node in failures:
            self._kubernetes_due.setdefault(node, due[node])
        return failures

    async def handle(self, delivery: Delivery) -> None:
        asked = delivery.envelope.event
        if not isinstance(asked, NodePlanned):
            return
        desired = desired_config(asked.plan_id, asked.layout, delivery.stream_sequence, asked.node)
        if await self.publish_node(desired) and self.writer is not None:
            self._kubernetes_due[asked.node] = (asked.layout, delivery.stream_sequence)
            self._kubernetes_wakeup.set()

    async def publish_node(self, desired: NodeMpsConfig) -> bool:
        """Writes the node's config unless `key_action` says otherwise; True when the key now holds
        the desired config, False when it holds a later ask's. Where the last config this publisher
        wrote to the key calls for a write, it writes without reading the key first (its
        compare-and-set still fails if anything else wrote the key since); every other outcome is
        decided from the key as read."""
        kv = await self.kv()
        key = subjects.node_config_key(desired.node)

        async def write() -> bool:
            """One compare-and-set; RevisionConflictError when the key changed since it was read, or
            since this publisher wrote it when it starts from what it wrote."""
            written = self._written.pop(desired.node, None)
            if written is not None and key_action(written[1], desired) == "write":
                # The key as this publisher left it calls for a write: no read first. Had anything
                # written the key since, the compare-and-set fails and the next attempt reads it.
                revision = await kv.update(key, desired.model_dump_json().encode(), last=written[0])
            else:
                entry = await kv.get(key)
                current = None
                if entry is not None and entry.value:
                    try:
                        current = NodeMpsConfig.model_validate_json(entry.value)
                    except ValueError as error:  # written by another version, or damaged: replace it
                        log.warning(
                            "node %s: unreadable config at revision %d is replaced (%s)",
                            desired.node,
                            entry.revision,
                            str(error).splitlines()[0],
                        )
                action = key_action(current, desired)
                if action != "write":
                    return action == "holds it"
                if entry is None:
                    revision = await kv.create(key, desired.model_dump_json().encode())
                else:
                    revision = await kv.update(key, desired.model_dump_json().encode(), last=entry.revision)
            self._written[desired.node] = (revision, desired)
            NODE_CONFIGS_WRITTEN.labels(desired.node).inc()
            await self.bus.publish(
                subjects.config_subject(desired.node),
                NodeConfigPublished(node=desired.node, plan_id=desired.plan_id, revision=revision),
                message_id=content_id("published", desired.node, str(revision)),
            )
            log.info(
                "node %s: config of plan %s published (revision %d)", desired.node, desired.plan_id, revision
            )
            return True

        try:
            return await retrying(
                write,
                on=RevisionConflictError,
                backoff=CONFLICT,
                what=f"node {desired.node}: writing the config key",
                level=logging.INFO,
            )
        except RevisionConflictError:
            raise TransientError(
                f"node {desired.node}: the config key kept changing under {CONFLICT.attempts} attempts"
            ) from None
