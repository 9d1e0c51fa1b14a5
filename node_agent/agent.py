"""The node agent's shell: makes the planned slices real on one node and reports them.

It reads the GPUs through the NVML port, runs one MPS control daemon per GPU through the MPS
port, watches its node's key in the node-config KV bucket, applies each desired config with the
pure `reconcile`, offers the resulting slices to the kubelet through its own device plugin, and
publishes applied/failed events and GPU reports (on change and on a heartbeat). A config it
cannot apply is refused with a reason and the node keeps its last good slices. It watches each
GPU's health (its daemon answers, no critical Xid error) and tells the kubelet and the planner
when it changes (`node_agent.health`). It never decides what the slices should be, and never
talks to the Kubernetes API.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import grpc.aio
from opentelemetry import trace

from events import subjects
from events.bus import Bus
from events.envelope import content_id
from events.metrics import CONFIG_REFUSALS, RECONFIGURE_SECONDS, SLICE_OVERUSE
from events.nodes import SliceOverused
from events.plans import NodeConfigApplied, NodeConfigFailed, NodeMpsConfig
from events.tracing import extract, tracer
from events.vocabulary import DEFAULT_MPS_IPC, MIB_PER_GIB, MpsIpcMode
from node_agent.daemons import DaemonKeeper
from node_agent.device_plugin import SliceServer
from node_agent.gpus import GpuReading
from node_agent.health import APPLICATION_ERRORS_ONLY, GpuHealth, XidPolicy, gpu_health, with_health
from node_agent.link import SliceServerUnavailable
from node_agent.mps import (
    DaemonSpec,
    MpsCommandError,
    MpsControl,
    apply_gpu_defaults,
    format_mem_limit,
    parse_server_list,
)
from node_agent.nvml import GpuInventory
from node_agent.overuse import Overuse, overused
from node_agent.pod_resources import PodResourcesClient
from node_agent.processes import ProcessSlices
from node_agent.reconcile import Refused, SliceUsage, adopted_devices, gpu_report, observed_usage, reconcile
from node_agent.slices import SliceDevice

if TYPE_CHECKING:
    from services.kit.status import Status

log = logging.getLogger(__name__)

WITHDRAW_TIMEOUT = 3.0  # seconds a stopping agent spends telling the planner its slices are going


DAEMON_POLL_SECONDS = 0.2
XID_WAIT_SECONDS = 1.0  # how long one wait for NVML events blocks a worker thread
NVML_RETRY_SECONDS = 10.0


@dataclass(frozen=True)
class AgentSettings:
    node: str
    mps_root: Path
    pod_resources_socket: Path | None = None
    heartbeat_seconds: float = 10.0
    usage_poll_seconds: float = 0.2
    allocation_grace_seconds: float = 30.0
    listing_grace_seconds: float = 2.0
    own_daemons: bool = False
    """Start and restart the MPS daemons here; by default `mpsflow run mps-daemons` owns them."""
    daemon_wait_seconds: float = 15.0
    """How long a starting agent waits for the daemons to answer before it reports them down."""
    alive_file: Path | None = None
    """Touched after every heartbeat's report: its age is what the liveness probe checks."""
    daemon_check_seconds: float = 5.0
    """How often the agent asks each GPU's MPS daemon whether it answers."""
    xid_policy: XidPolicy = APPLICATION_ERRORS_ONLY
    """Which critical Xid errors make a GPU unhealthy."""
    memory_reserve_mib: int = 0
    """Memory kept back on every GPU for the MPS server's and its clients' own contexts."""
    mps_ipc: MpsIpcMode = DEFAULT_MPS_IPC
    """How this node's MPS clients share /dev/shm with their server; reported, so that a pod without
    hostIPC is placed only where it can reach its server."""


class NodeAgent:
    def __init__(
        self,
        settings: AgentSettings,
        bus: Bus,
        inventory: GpuInventory,
        mps: MpsControl,
        plugin: SliceServer,
        *,
        processes: ProcessSlices | None = None,
        status: Status | None = None,
    ) -> None:
        """`processes`: where the agent learns which slice a GPU process belongs to; without it,
        nothing watches for containers that use more memory than their slice. `status`: told when
        the agent serves and at every heartbeat (its /readyz and /healthz)."""
        self.settings = settings
        self.status = status
        self.processes = processes
        self.slice_of: dict[int, str] = {}  # host PID of a GPU process -> its slice, at the last look
        self._overuse_told: dict[str, tuple[str, tuple[int, ...]]] = {}  # slice -> (holder, pids) told
        self.bus = bus
        self.inventory = inventory
        self.mps = mps
        self.plugin = plugin
        self.gpus: list[GpuReading] = []
        self.devices: tuple[SliceDevice, ...] = ()
        self.usage = SliceUsage()
        self._offered_at: dict[str, float] = {}
        self._seen_held_at: dict[
            str, float
        ] = {}  # device -> when a kubelet answer that listed it held was asked
        self.daemon_health: dict[int, bool] = {}
        self.faults: dict[int, str] = {}  # GPU index -> the critical Xid error that took it out
        self._avoided_gpus: frozenset[int] = frozenset()  # the kubelet is asked to give these out last
        self._seen_allocations: int | None = None  # the plugin's allocation count at the last look
        self.applied_plan_id: str | None = None
        # Applied/failed events name this run of the agent: a restarted agent applying the same
        # config again says so, while a retried publish within one run is stored once.
        self._incarnation = str(time.time_ns())
        self.keeper = DaemonKeeper(inventory, mps, settings.mps_root)
        self._daemon_pids: dict[int, str | None] = {}
        self._daemon_limits: dict[int, int] = {}
        self._last_report: str | None = None
        socket = settings.pod_resources_socket
        self._kubelet = PodResourcesClient(socket) if socket is not None else None

    async def run(self) -> None:
        """Start the daemons, take up the slices served (the keeper's, after a restart) and those
        containers still hold, report, and serve until cancelled. On the way out, when the slices
        go with the agent, say that the kubelet lists none of them any more, so that no pod is
        released here while the agent is gone; when the keeper serves them, they stay."""
        self.gpus = await self.inventory.read()
        await self.start_daemons()
        self.devices, self._avoided_gpus = await self.served_slices()
        self.usage = await self.current_usage()
        adopted = adopted_devices(self.gpus, self.devices, self.usage.in_use)
        if adopted:
            await self.offer_if_served((*self.devices, *adopted))
        await self.report(force=True)
        if self.status is not None:
            self.status.watch("heartbeat", within=max(60.0, 6 * self.settings.heartbeat_seconds))
            self.status.ready("serving")
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self.plugin.run)
                group.start_soon(self.watch_config)
                group.start_soon(self.watch_usage)
                group.start_soon(self.watch_daemons)
                group.start_soon(self.watch_xid_errors)
                group.start_soon(self.heartbeat)
        finally:
            if not self.plugin.outlives_agent:
                with anyio.CancelScope(shield=True), anyio.move_on_after(WITHDRAW_TIMEOUT):
                    self.usage = replace(self.usage, listed=frozenset())
                    await self.report(force=True)
            if self._kubelet is not None:
                with anyio.CancelScope(shield=True):
                    await self._kubelet.close()

    async def served_slices(self) -> tuple[tuple[SliceDevice, ...], frozenset[int]]:
        """What the slice server serves now, waiting for it as long as for the daemons (the keeper
        may be starting too); nothing when it does not answer by then."""
        with anyio.move_on_after(self.settings.daemon_wait_seconds):
            while True:
                try:
                    return await self.plugin.served()
                except SliceServerUnavailable as error:
                    log.info("%s; asking again", error)
                    await anyio.sleep(DAEMON_POLL_SECONDS)
        log.error(
            "the slice server did not answer within %.0fs: starting with no slices",
            self.settings.daemon_wait_seconds,
        )
        return (), frozenset()

    def daemon(self, gpu: GpuReading) -> DaemonSpec:
        return DaemonSpec.under(self.settings.mps_root, gpu.index, gpu.uuid)

    async def start_daemons(self) -> None:
        """Own daemons: start them. External ones (`mpsflow run mps-daemons`): only see which answer."""
        for gpu in self.gpus:
            if gpu.mig_enabled:
                log.info("GPU %d is in MIG mode: left alone", gpu.index)
        self.daemon_health = await self._daemons_answering()
        with anyio.move_on_after(self.settings.daemon_wait_seconds):
            while not all(self.daemon_health.values()):  # the keeper may be starting them right now
                await anyio.sleep(DAEMON_POLL_SECONDS)
                self.daemon_health = await self._daemons_answering()

    async def _daemons_answering(self) -> dict[int, bool]:
        if self.settings.own_daemons:
            return await self.keeper.keep_all(self.gpus)
        return {
            gpu.index: await self.mps.is_alive(self.daemon(gpu)) for gpu in self.gpus if not gpu.mig_enabled
        }

    async def watch_config(self) -> None:
        configs = await self.bus.node_configs()
        async for stored in configs.watch(subjects.node_config_key(self.settings.node)):
            try:
                desired = NodeMpsConfig.model_validate_json(stored.value)
            except ValueError as error:
                log.error("node config revision %d is unreadable: %s", stored.revision, error)
                continue
            await self.apply(desired, stored.revision)

    async def apply(self, desired: NodeMpsConfig, revision: int) -> None:
        """Apply the config found at KV `revision`, and say whether it was applied or refused."""
        context = extract({"traceparent": desired.traceparent} if desired.traceparent else None)
        with tracer().start_as_current_span(
            "apply node config",
            context=context,
            kind=trace.SpanKind.CONSUMER,
            attributes={"mpsflow.node": self.settings.node, "mpsflow.plan_id": desired.plan_id},
        ):
            started = time.monotonic()
            # Usage right now, not as of the last poll: a slice allocated since must not be dropped.
            freed = await self.observe_usage()
            outcome = reconcile(
                self.gpus,
                self.devices,
                self.usage.in_use,
                desired,
                reserve_mib=self.settings.memory_reserve_mib,
            )
            subject = subjects.config_subject(self.settings.node)
            if not isinstance(outcome, Refused):
                try:
                    await self.offer(outcome.devices, freed)
                except SliceServerUnavailable as error:
                    outcome = Refused(f"its slices could not be served: {error}")
            if isinstance(outcome, Refused):
                log.warning("config of plan %s refused: %s", desired.plan_id, outcome.reason)
                with contextlib.suppress(SliceServerUnavailable):
                    await self.offer(self.devices, freed)
                # The report first: the planner then plans from what made the node refuse.
                await self.report()
                await self.bus.publish(
                    subject,
                    NodeConfigFailed(
                        node=self.settings.node,
                        plan_id=desired.plan_id,
                        reason=outcome.reason,
                        gpus=desired.gpus,
                    ),
                    message_id=content_id(
                        "failed", self.settings.node, desired.plan_id, str(revision), self._incarnation
                    ),
                )
                CONFIG_REFUSALS.labels(self.settings.node).inc()
                RECONFIGURE_SECONDS.labels(self.settings.node, "refused").observe(time.monotonic() - started)
                return
            offered = anyio.current_time()
            self._offered_at = {d.id: self._offered_at.get(d.id, offered) for d in self.devices}
            self.applied_plan_id = desired.plan_id
            await self.apply_daemon_limits()
            with contextlib.suppress(SliceServerUnavailable):  # applied; the next look marks health
                await self.offer(self.devices, await self.observe_usage())
            await self.report()
            await self.bus.publish(
                subject,
                NodeConfigApplied(node=self.settings.node, plan_id=desired.plan_id, gpus=desired.gpus),
                message_id=content_id(
                    "applied", self.settings.node, desired.plan_id, str(revision), self._incarnation
                ),
            )
            RECONFIGURE_SECONDS.labels(self.settings.node, "applied").observe(time.monotonic() - started)

    async def observe_usage(self) -> frozenset[str]:
        """Take in the node's usage now; the slices whose containers ended since the last look."""
        usage = await self.current_usage()
        freed = self.usage.in_use - usage.in_use
        self.usage = usage
        return freed

    async def current_usage(self) -> SliceUsage:
        """Slices containers hold (the kubelet's word, with the pod it names, plus allocations the
        kubelet has not listed since they were made, for `allocation_grace_seconds` at most), and
        the slices the kubelet lists as its devices.

        Without a kubelet to ask, every allocation counts and every slice counts as listed; when the
        kubelet cannot list its devices (older than 1.23), a slice counts as listed once it has been
        offered for `listing_grace_seconds`.
        """
        try:
            handed_out = await self.plugin.allocations()
        except SliceServerUnavailable as error:
            log.warning("%s; keeping the last known usage", error)
            return self.usage
        self._seen_allocations = handed_out.count
        allocations = handed_out.at
        offered = frozenset(device.id for device in self.devices)
        if self._kubelet is None:
            return SliceUsage(frozenset(allocations), {}, offered)
        asked = anyio.current_time()
        try:
            view = await self._kubelet.view()
        except grpc.aio.AioRpcError as error:
            log.debug("pod-resources unavailable (%s); keeping the last known usage", error.code())
            return SliceUsage(
                self.usage.in_use | frozenset(allocations), self.usage.holders, self.usage.listed & offered
            )
        for device in view.held:
            self._seen_held_at[device] = asked
        return observed_usage(
            allocations=allocations,
            offered=offered,
            held=view.held,
            listed=view.listed,
            seen_held_at=self._seen_held_at,
            offered_at=self._offered_at,
            now=anyio.current_time(),
            allocation_grace=self.settings.allocation_grace_seconds,
            listing_grace=self.settings.listing_grace_seconds,
        )

    async def offer(self, devices: tuple[SliceDevice, ...], freed: frozenset[str] = frozenset()) -> None:
        """Offer `devices` to the kubelet, each with the health its GPU gives it now (`freed`: the
        slices whose containers ended since the last look)."""
        health = self.health()
        marked = with_health(devices, freed, health)
        avoided = frozenset(index for index, gpu in health.items() if not gpu.healthy)
        if marked != self.devices or avoided != self._avoided_gpus:
            self.devices = await self.plugin.set_devices(
                marked, avoided_gpus=avoided, seen_allocations=self._seen_allocations
            )
            self._avoided_gpus = avoided

    async def offer_if_served(
        self, devices: tuple[SliceDevice, ...], freed: frozenset[str] = frozenset()
    ) -> None:
        """`offer`, where a slice server that does not answer now only delays it to the next look."""
        try:
            await self.offer(devices, freed)
        except SliceServerUnavailable as error:
            log.warning("%s; offering again at the next look", error)

    def health(self) -> dict[int, GpuHealth]:
        return gpu_health((gpu.index for gpu in self.gpus), self.daemon_health, self.faults)

    async def watch_usage(self) -> None:
        while True:
            before = self.usage
            freed = await self.observe_usage()
            if self.usage != before:
                await self.offer_if_served(self.devices, freed)
                await self.report()
            await anyio.sleep(self.settings.usage_poll_seconds)

    async def watch_daemons(self) -> None:
        while True:
            await anyio.sleep(self.settings.daemon_check_seconds)
            await self.check_daemons()
            await self.offer_if_served(self.devices)
            await self.report()

    async def watch_xid_errors(self) -> None:
        """Take a GPU out for good (until the agent restarts) on a critical Xid error that is not an
        application's."""
        while True:
            try:
                errors = await self.inventory.xid_errors(XID_WAIT_SECONDS)
            except Exception as failure:  # NVML failing here must not stop the agent; try again later
                log.warning("waiting for NVML events failed: %s", failure)
                await anyio.sleep(NVML_RETRY_SECONDS)
                continue
            by_uuid = {gpu.uuid: gpu.index for gpu in self.gpus}
            new_faults = False
            for xid_error in errors:
                index = by_uuid.get(xid_error.gpu_uuid)
                fault = self.settings.xid_policy.fault(xid_error.xid)
                if index is None or fault is None:
                    log.info("Xid %d on GPU %s leaves it healthy", xid_error.xid, xid_error.gpu_uuid)
                    continue
                if index not in self.faults:
                    log.error("GPU %d is out of service: %s", index, fault)
                    self.faults[index] = fault
                    new_faults = True
            if new_faults:
                await self.offer_if_served(self.devices)
                await self.report()

    async def heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_seconds)
            try:
                self.gpus = await self.inventory.read()
            except Exception as error:  # keep the last readings; the report still tells daemon health
                log.warning("NVML read failed: %s", error)
            await self.check_overuse()
            await self.report(force=True)
            if self.settings.alive_file is not None:
                await anyio.to_thread.run_sync(self.settings.alive_file.touch)
            if self.status is not None:
                self.status.beat("heartbeat")

    async def check_overuse(self) -> None:
        """Tell of every slice whose container now uses more GPU memory than the slice holds, once
        per holder and set of processes (docs/mps.md §7: MPS does not stop it)."""
        if self.processes is None:
            return
        pids = [process.pid for gpu in self.gpus for process in gpu.processes]
        self.slice_of = await self.processes.slices_of(pids) if pids else {}
        still_over = set()
        for found in overused(self.gpus, self.devices, self.slice_of):
            holder = self.usage.holders.get(found.device.id)
            if holder is None:  # the kubelet names no pod for it (yet): nobody to tell
                continue
            still_over.add(found.device.id)
            if self._overuse_told.get(found.device.id) == (holder, found.pids):
                continue
            await self._tell_overuse(found, holder)
            self._overuse_told[found.device.id] = (holder, found.pids)
        for device_id in set(self._overuse_told) - still_over:
            del self._overuse_told[device_id]

    async def _tell_overuse(self, found: Overuse, holder: str) -> None:
        namespace, name = holder.split("/", 1)
        log.warning(
            "%s: processes %s use %d MiB of GPU %d, more than their %d GiB slice %s",
            holder,
            ", ".join(str(pid) for pid in found.pids),
            found.used_mib,
            found.device.gpu_index,
            found.device.size_gb,
            found.device.id,
        )
        SLICE_OVERUSE.labels(self.settings.node).inc()
        event = SliceOverused(
            node=self.settings.node,
            namespace=namespace,
            name=name,
            slice_id=found.device.id,
            gpu_index=found.device.gpu_index,
            size_gb=found.device.size_gb,
            used_mib=found.used_mib,
            pids=found.pids,
        )
        await self.bus.publish(
            subjects.overuse_subject(self.settings.node, namespace, name),
            event,
            message_id=content_id("overuse", self.settings.node, found.device.id, holder, str(found.pids)),
        )

    async def check_daemons(self) -> None:
        """Which GPUs' daemons answer now; one that answers again after it did not (restarted, by this
        agent or by the mps-daemons service) gets this GPU's defaults again."""
        answering = await self._daemons_answering()
        for gpu in self.gpus:
            if gpu.index not in answering:
                continue
            pid = _daemon_pid(self.daemon(gpu))
            if answering[gpu.index] and pid != self._daemon_pids.get(gpu.index):
                self._daemon_limits.pop(gpu.index, None)  # a new daemon: it has none of the defaults
                self._daemon_pids[gpu.index] = pid
            if not answering[gpu.index] and self.daemon_health.get(gpu.index, True):
                log.warning("GPU %d: MPS daemon does not answer", gpu.index)
        self.daemon_health = answering
        await self.apply_daemon_limits()

    async def apply_daemon_limits(self) -> None:
        """Cap each GPU's MPS clients at its largest slice (a client's own limit can only go lower).

        A container's pinned limit comes from the environment the device plugin gives it; this cap
        also binds a client that would come without it. It is the default for servers started
        later and is set on servers already running too, since a client can only lower the limit
        of the server it joins: a server started under a smaller cap would hold a bigger slice's
        new client to it. Clients already connected keep what they have (docs/mps.md §5).
        """
        for gpu in self.gpus:
            sizes = [d.size_gb for d in self.devices if d.gpu_index == gpu.index]
            if not sizes or gpu.mig_enabled or not self.daemon_health.get(gpu.index):
                continue
            limit = max(sizes) * MIB_PER_GIB
            if self._daemon_limits.get(gpu.index) == limit:
                continue
            daemon = self.daemon(gpu)
            try:
                await apply_gpu_defaults(
                    self.mps, daemon, pinned_mem_limit_mib=limit, active_thread_percentage=None
                )
                for server in parse_server_list(await self.mps.send(daemon, "get_server_list")):
                    await self.mps.send(
                        daemon, f"set_device_pinned_mem_limit {server} 0 {format_mem_limit(limit)}"
                    )
            except MpsCommandError as error:
                log.warning("GPU %d: MPS default memory limit not set: %s", gpu.index, error)
                continue
            self._daemon_limits[gpu.index] = limit

    async def report(self, *, force: bool = False) -> None:
        report = gpu_report(
            self.settings.node,
            self.gpus,
            self.devices,
            self.usage,
            self.daemon_health,
            self.applied_plan_id,
            faults=self.faults,
            reserve_mib=self.settings.memory_reserve_mib,
            slice_of=self.slice_of,
            mps_ipc=self.settings.mps_ipc,
        )
        body = report.model_dump_json()
        if body == self._last_report and not force:
            return
        self._last_report = body
        await self.bus.publish(subjects.gpus_subject(self.settings.node), report)


def _daemon_pid(daemon: DaemonSpec) -> str | None:
    """Which daemon answers on this pipe (its pid file), to tell a restarted one from the last."""
    try:
        return daemon.pid_file.read_text().strip()
    except OSError:
        return None
