"""The pod watcher: the planner's eyes on the cluster, and the voice that tells users why.

It lists and watches nodes and the pods not finished (`UNFINISHED_PODS`), publishes the level of
every opted-in node and of every pod that asks for a slice, the deletion of one that is deleted or
finishes, and after a relist the deletion of what vanished meanwhile. A pod that breaks a rule gets
one Warning Event naming the rule; a pod the planner cannot place yet gets one Event with the
planner's reason. Events have names derived from the pod and the reason, so a restart or a
redelivery never posts the same Event twice. A gated pod the planner released gets its gate lifted
and is pinned to its node in one patch (`gate.py`), and an Event that says so. A pod whose processes
a node agent found using more GPU memory than its slice gets a Warning Event with the figures. What
opts a node in and what an MPS client pod needs come from `WatcherSettings` (`mpsflow run
pod-watcher` flags). Its Kubernetes API use is exactly what `k8s/base/pod-watcher.yaml` grants: list
and watch of pods and nodes, get and patch of pods, create of events (audited by
tests/e2e/test_rbac.py).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from events import subjects
from events.bus import Bus, Delivery, Publishing, TransientError
from events.envelope import Event, content_id
from events.metrics import PODS_REJECTED, PODS_RELEASED
from events.nodes import NodeObserved, NodeOptedOut, SliceOverused
from events.pods import PodDeleted, PodObserved, PodRejected, PodReleased, PodUnplaced
from events.vocabulary import (
    DEFAULT_OPT_IN,
    MIB_PER_GIB,
    RELEASED_TO_ANNOTATION,
    SLICE_GATE,
    OptInLabel,
    PodEventReason,
    RejectionRule,
)
from services.kit.retry import CONFLICT, KUBERNETES_EVENT, retrying
from services.kit.watching import Listing, as_json, list_and_watch, refused
from services.pod_watcher.gate import release_patch
from services.pod_watcher.translate import (
    DEFAULT_CLIENT_RULES,
    MpsClientRules,
    UnreadablePodError,
    is_gated,
    translate_node,
    translate_pod,
)

log = logging.getLogger(__name__)

COMPONENT = "mpsflow-pod-watcher"
UNPLACED_DURABLE = "pod-watcher-unplaced"
RELEASE_DURABLE = "pod-watcher-release"
OVERUSE_DURABLE = "pod-watcher-overuse"
UNFINISHED_PODS = "status.phase!=Succeeded,status.phase!=Failed"
IN_FLIGHT = 256
"""Pod events sent and not yet known to be stored: a burst goes out at the pace of the connection,
not one acknowledgement at a time."""
CONFIRM_PERIOD_S = 0.1
"""How often the watcher makes sure what it sent was stored, while no burst fills `IN_FLIGHT`."""
"""The pods it lists and watches: a pod that finished holds no slice, and is never seen again (the
API serves the selection, so that no finished pod of a large cluster is read or kept)."""
RELEASE_MAX_DELIVER = 300
"""Deliveries of a release before it is dead-lettered: with the bus's 15 s between late tries (or a
429's Retry-After), over an hour of an API that refuses."""


@dataclass(frozen=True)
class WatcherSettings:
    """The node label that opts a node in, and what a pod needs to be an MPS client."""

    opt_in: OptInLabel = DEFAULT_OPT_IN
    client_rules: MpsClientRules = DEFAULT_CLIENT_RULES


DEFAULT_SETTINGS = WatcherSettings()


class _PodChangedError(Exception):
    """A release patch lost its compare-and-set (409): the pod changed since it was read."""


class PodWatcherService:
    def __init__(self, bus: Bus, api: client.ApiClient, settings: WatcherSettings = DEFAULT_SETTINGS) -> None:
        self.bus = bus
        self.api = api
        self.settings = settings
        self.core = client.CoreV1Api(api)
        self.nodes: dict[str, NodeObserved] = {}  # changed only through _keep_node and _forget_node
        self._gpu_gib: Counter[int] = Counter()  # nodes by their GPUs' GiB (GFD's), for largest_gpu_gb
        self.pods: dict[str, str] = {}  # pod key -> uid, for pods we published
        self._in_flight: deque[Publishing] = deque()  # pod events sent, not yet known to be stored
        self.too_large: dict[str, dict[str, Any]] = {}  # rejected only for their size: checked again
        self.on_caught_up: Callable[[], None] = lambda: None
        """Called after the first complete list of pods has been published (it is ready)."""
        self._listed_pods = False

    @property
    def largest_gpu_gb(self) -> int | None:
        """The GiB of the largest GPU of any opted-in node: asked for every pod event, so kept by size
        rather than gone through node by node (2,000 nodes times every pod of a burst)."""
        return max((gib for gib, nodes in self._gpu_gib.items() if nodes > 0), default=None)

    def _keep_node(self, observed: NodeObserved) -> None:
        self._forget_node(observed.name)
        self.nodes[observed.name] = observed
        if observed.gfd is not None:
            self._gpu_gib[observed.gfd.memory_mib // MIB_PER_GIB] += 1

    def _forget_node(self, name: str) -> None:
        gone = self.nodes.pop(name, None)
        if gone is not None and gone.gfd is not None:
            self._gpu_gib[gone.gfd.memory_mib // MIB_PER_GIB] -= 1

    async def recall(self) -> None:
        """What this watcher published before a restart, so that a relist can tell what vanished."""
        for envelope in await self.bus.current_levels(subjects.POD_EVENTS):
            event = envelope.event
            if isinstance(event, PodObserved | PodRejected):
                self.pods[event.key] = event.uid
        for envelope in await self.bus.current_levels(subjects.NODE_EVENTS):
            if isinstance(envelope.event, NodeObserved):
                self._keep_node(envelope.event)

    async def run(self) -> None:
        await self.recall()
        first_list = anyio.Event()

        async def relist_nodes(items: Listing) -> None:
            seen = set()
            async for item in items:
                seen.add(item["metadata"]["name"])
                await self.node_changed("MODIFIED", item)
            for gone in sorted(set(self.nodes) - seen):
                await self._opt_out(gone, "the node is gone")
            first_list.set()

        async with anyio.create_task_group() as group:
            group.start_soon(self.confirm_forever)
            group.start_soon(
                lambda: list_and_watch(self.api, self.core.list_node, relist_nodes, self.node_changed)
            )
            await first_list.wait()
            group.start_soon(
                lambda: list_and_watch(
                    self.api,
                    self.core.list_pod_for_all_namespaces,
                    self.relist_pods,
                    self.pod_changed,
                    field_selector=UNFINISHED_PODS,
                )
            )
            group.start_soon(
                lambda: self.bus.consume(
                    durable=UNPLACED_DURABLE,
                    filter_subjects=[subjects.UNPLACED_EVENTS],
                    handle=self.unplaced,
                    deliver_from="last_per_subject",
                )
            )
            group.start_soon(
                lambda: self.bus.consume(
                    durable=RELEASE_DURABLE,
                    filter_subjects=[subjects.RELEASE_EVENTS],
                    handle=self.released,
                    deliver_from="last_per_subject",
                    # A release given up leaves its pod gated for good: an API that refuses for
                    # an hour (throttled, down) only delays it.
                    max_deliver=RELEASE_MAX_DELIVER,
                )
            )
            group.start_soon(
                lambda: self.bus.consume(
                    durable=OVERUSE_DURABLE,
                    filter_subjects=[subjects.OVERUSE_EVENTS],
                    handle=self.overused,
                    deliver_from="last_per_subject",
                )
            )

    async def node_changed(self, change: str, node: dict[str, Any]) -> None:
        name = node["metadata"]["name"]
        observed = None if change == "DELETED" else translate_node(node, self.settings.opt_in)
        if observed is None:
            if name in self.nodes:
                await self._opt_out(
                    name, "the node is gone" if change == "DELETED" else "opt-in label removed"
                )
            return
        if self.nodes.get(name) != observed:
            largest = self.largest_gpu_gb
            self._keep_node(observed)
            await self._send(
                subjects.node_subject(name),
                observed,
                # The node's resourceVersion too: a node that opts out and in again says the same
                # thing twice, and the second must not be dropped as a duplicate of the first.
                content_id("node", node["metadata"].get("resourceVersion", ""), observed.model_dump_json()),
            )
            if self.largest_gpu_gb != largest:
                for pod in list(self.too_large.values()):
                    await self.pod_changed("MODIFIED", pod)

    async def _opt_out(self, name: str, reason: str) -> None:
        self._forget_node(name)
        await self.bus.publish(subjects.node_subject(name), NodeOptedOut(name=name, reason=reason))

    async def relist_pods(self, items: Listing) -> None:
        present = set()
        async for item in items:
            present.add(_pod_key(item))
            await self.pod_changed("MODIFIED", item)
        for key in sorted(set(self.pods) - present):
            namespace, name = key.split("/", 1)
            await self._deleted(namespace, name, self.pods[key])
        await self.confirm()  # caught up means stored
        if not self._listed_pods:
            self._listed_pods = True
            self.on_caught_up()

    async def pod_changed(self, change: str, pod: dict[str, Any]) -> None:
        key = _pod_key(pod)
        self.too_large.pop(key, None)
        if change == "DELETED":
            # Deleted, or finished: the watch selects UNFINISHED_PODS, so a pod that turns Succeeded
            # or Failed arrives as DELETED, as it now is. PodDeleted is right for it too: a finished
            # pod holds no slice and waits for none (`PodObserved.holder_node`, `waits_for_slice`),
            # so the planner plans alike from both, and the slice is reused only once its node's
            # report says no container holds it (architecture §3.7), whichever the pod watcher said.
            if key in self.pods:
                namespace, name = key.split("/", 1)
                uid = (pod.get("metadata") or {}).get("uid")
                await self._deleted(namespace, name, uid if isinstance(uid, str) else self.pods[key])
            return
        try:
            event = translate_pod(pod, self.largest_gpu_gb, self.settings.client_rules)
        except UnreadablePodError as error:
            log.warning("pod %s not read (%s): %s", key, change, error)
            return
        if event is None:
            return
        self.pods[key] = event.uid
        await self._send(
            subjects.pod_subject(event.namespace, event.name),
            event,
            content_id(event.uid, event.resource_version, event.model_dump_json()),
        )
        if isinstance(event, PodRejected):
            PODS_REJECTED.labels(event.reason).inc()
            if event.reason == RejectionRule.TOO_LARGE:
                self.too_large[key] = pod
            await self._post_rejection(event)

    async def _post_rejection(self, event: PodRejected) -> None:
        """Post the rejection Event, retrying a little: the watch must go on even if the API refuses."""
        try:
            await retrying(
                lambda: self.post_event(event.namespace, event.name, event.uid, event.reason, event.message),
                on=TransientError,
                backoff=KUBERNETES_EVENT,
                what=f"the rejection Event of {event.key}",
            )
        except TransientError as error:
            log.error("giving up on the rejection Event of %s (%s): %s", event.key, event.reason, error)

    async def _deleted(self, namespace: str, name: str, uid: str) -> None:
        self.pods.pop(f"{namespace}/{name}", None)
        await self._send(
            subjects.pod_subject(namespace, name),
            PodDeleted(namespace=namespace, name=name, uid=uid),
            f"{uid}/deleted",
        )

    async def _send(self, subject: str, event: Event, message_id: str) -> None:
        """Send a pod's event without waiting for the stream to store it, up to `IN_FLIGHT` at once
        (one pod's events stay in order: they go out in order on one connection). `confirm_forever`
        waits for them; one that is not stored raises there and stops the watcher, whose next start
        lists every pod again, as a failed publish always did."""
        self._in_flight.append(await self.bus.publish_soon(subject, event, message_id=message_id))
        if len(self._in_flight) > IN_FLIGHT:
            await self._in_flight.popleft().stored()

    async def confirm(self) -> None:
        """Return once every pod event sent so far is stored (BusUnavailableError if one is not)."""
        while self._in_flight:
            await self._in_flight.popleft().stored()

    async def confirm_forever(self) -> None:
        while True:
            await self.confirm()
            await anyio.sleep(CONFIRM_PERIOD_S)

    async def unplaced(self, delivery: Delivery) -> None:
        event = delivery.envelope.event
        if isinstance(event, PodUnplaced):
            await self.post_event(
                event.namespace, event.name, event.uid, PodEventReason.NOT_PLACED, event.reason, kind="Normal"
            )

    async def overused(self, delivery: Delivery) -> None:
        """Tell a pod that its processes use more GPU memory than its slice (a pod this watcher does
        not know, or no longer, is told nothing)."""
        event = delivery.envelope.event
        if not isinstance(event, SliceOverused):
            return
        uid = self.pods.get(event.key)
        if uid is None:
            log.info("%s is not a slice pod this watcher knows; overuse not told", event.key)
            return
        processes = ", ".join(str(pid) for pid in event.pids)
        await self.post_event(
            event.namespace,
            event.name,
            uid,
            PodEventReason.OVERUSED,
            f"its processes ({processes}) use {event.used_mib} MiB of GPU {event.gpu_index} on node "
            f"{event.node}, more than its {event.size_gb} GiB slice ({event.size_gb * MIB_PER_GIB} MiB): "
            "MPS caps each process at CUDA_MPS_PINNED_DEVICE_MEM_LIMIT only as the container sets it, "
            "so the other pods on that GPU may run out of memory; keep the limit the device plugin "
            "gives, or ask for a larger slice",
        )

    async def released(self, delivery: Delivery) -> None:
        """Lift the gate of a pod the planner released and pin it to the node its slice is on.

        Idempotent: a pod that is gone, replaced (another uid), bound, or already released is left
        alone. The patch carries the pod's resourceVersion, so a pod that changed meanwhile is read
        and patched again.
        """
        event = delivery.envelope.event
        if not isinstance(event, PodReleased):
            return
        try:
            await retrying(
                lambda: self._release(event),
                on=_PodChangedError,
                backoff=CONFLICT,
                what=f"releasing {event.key}",
                level=logging.INFO,
            )
        except _PodChangedError:
            raise TransientError(
                f"releasing {event.key}: the pod kept changing under {CONFLICT.attempts} attempts"
            ) from None

    async def _release(self, event: PodReleased) -> None:
        """One read and patch of the released pod; _PodChangedError when it changed in between."""
        try:
            pod = as_json(
                self.api,
                await self.core.read_namespaced_pod(event.name, event.namespace, _request_timeout=10),
            )
        except ApiException as error:
            if error.status == 404:
                return
            raise refused(error, f"reading {event.key}") from error
        metadata, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        if metadata.get("uid") != event.uid:
            return
        released_here = (metadata.get("annotations") or {}).get(RELEASED_TO_ANNOTATION) == event.node
        if not is_gated(pod) and released_here:  # released before: its Event may be what failed then
            await self._tell_ready(event)
            return
        if spec.get("nodeName") or not is_gated(pod):
            return
        try:
            await self.core.patch_namespaced_pod(
                event.name,
                event.namespace,
                release_patch(pod, event.node),
                _content_type="application/merge-patch+json",
                _request_timeout=10,
            )  # type: ignore[call-arg]
        except ApiException as error:
            if error.status == 409:
                raise _PodChangedError from error
            if error.status == 404:
                return
            if error.status == 422:  # the API refuses this pin for this pod: retrying changes nothing
                log.error("%s: release to %s refused by the API: %s", event.key, event.node, error.body)
                await self.post_event(
                    event.namespace,
                    event.name,
                    event.uid,
                    PodEventReason.RELEASE_REFUSED,
                    f"the API refused to pin the pod to node {event.node} and lift its scheduling gate "
                    f"{SLICE_GATE}; delete the gate by hand to let any scheduler place it",
                )
                return
            raise refused(error, f"releasing {event.key}") from error
        PODS_RELEASED.labels(event.node).inc()
        log.info("%s released to node %s", event.key, event.node)
        await self._tell_ready(event)

    async def _tell_ready(self, event: PodReleased) -> None:
        await self.post_event(
            event.namespace,
            event.name,
            event.uid,
            PodEventReason.READY,
            f"a {event.size_gb} GiB MPS slice is ready on node {event.node}: the pod is pinned there "
            f"and its scheduling gate {SLICE_GATE} is lifted",
            kind="Normal",
        )

    async def post_event(
        self, namespace: str, name: str, uid: str, reason: str, message: str, kind: str = "Warning"
    ) -> None:
        """One Event per (pod, reason, message): its name is derived from them, so a repeat is a 409."""
        now = datetime.now(UTC).replace(microsecond=0)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{name}.{content_id(uid, reason, message)[:16]}", namespace=namespace
            ),
            involved_object=client.V1ObjectReference(
                api_version="v1", kind="Pod", namespace=namespace, name=name, uid=uid
            ),
            reason=reason,
            message=message,
            type=kind,
            source=client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            await self.core.create_namespaced_event(namespace, body, _request_timeout=10)
        except ApiException as error:
            if error.status == 409:
                return
            if error.status == 404:
                log.info("pod %s/%s is gone; no event", namespace, name)
                return
            raise refused(error, f"event for {namespace}/{name}") from error


def _pod_key(pod: dict[str, Any]) -> str:
    """NAMESPACE/NAME of a pod as the API serves it (a pod without a name: "NAMESPACE/None", which
    no slice pod has, as `translate_pod` refuses it)."""
    metadata = pod.get("metadata") or {}
    return f"{metadata.get('namespace', 'default')}/{metadata.get('name')}"
