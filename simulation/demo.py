"""`mpsflow demo`: the whole system on one machine, around a simulated cluster.

It starts a local nats-server with JetStream, the Kubernetes API emulator, a simulated kubelet
per node (with the device-plugin API over gRPC), a simulated scheduler, and every mpsflow
service as its own process (one node agent per node, over simulated GPUs and a fake MPS control
daemon). Then it plays the scenario's workload, shows progress, prints the pods and GPU layouts,
and writes the run's summary (docs/formats.md); every process writes its spans for `mpsflow trace`
(`--traces`). With `--chaos` it also kills node agents with SIGKILL
mid-workload and starts them again, as a kubelet restarts a crashed container, and measures how long
each takes to serve its node again; it never kills a node's MPS daemon keeper or daemons, which
outlive the agent by design. Everything it started is stopped when it ends, on failure and on Ctrl-C
too. The same machinery backs the end-to-end tests.

Large clusters: two Python processes per node (agent and keeper) and one per GPU (the fake daemon)
are what a real node runs, but 200 nodes of 8 GPUs of them do not start on two cores within the
30 s the demo gives the cluster. Above `HOSTED_ABOVE` nodes (or with `--nodes-per-host`), the nodes'
kubelets, keepers and agents run in node hosts (`simulation.node_host`): the same production
wiring and identities, many nodes to a process, their MPS daemons in that process
(`simulation.fake_mps_inprocess`). Where `--chaos` kills node agents, every node keeps processes of
its own, since a killed host would take its nodes' daemons with it. Every service of the control
plane stays a process of its own either way. What the demo polls while it plays reads its own
informer (`ClusterView`), and it creates pods without waiting for each answer, so that neither it
nor its API emulator is what a large run measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import aiohttp
import anyio
import anyio.to_thread
import nats.errors
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from events import access, subjects
from events.bootstrap import BusLimits, bootstrap
from events.envelope import UndecodableMessageError, decode
from events.jetstream import EventBus
from events.nodes import NodeGpusReported, NodeObserved, NodeOptedOut
from events.plans import NodeConfigFailed, PlanComputed
from events.pods import PodRejected
from events.vocabulary import (
    DEVICE_PLUGIN_CONFIG_LABEL,
    NOS_DEVICE_PLUGIN_CONFIGMAP,
    WEBHOOK_HEALTH_PATH,
    WEBHOOK_PATH,
    asks_for_a_slice,
    is_opted_in,
    slice_size,
)
from node_agent.mps import DaemonSpec
from services.kit.kube import api_client
from services.kit.lease import LeaseRecord
from services.kit.watching import Listing, list_and_watch
from services.traceview import SERVICE_PREFIX, TRACES_DIR_ENV, default_traces_dir
from simulation.apiserver import AdmissionWebhook, ApiServer
from simulation.chaos import RESTART_DELAY_S, ChaosError, Kill, check_chaos, parse_chaos
from simulation.kubelet import RUNS_FOR_ANNOTATION, Kubelet, pod_resources_socket
from simulation.kubelet import plugin_dir as kubelet_plugin_dir
from simulation.nats_server import LocalNatsServer
from simulation.node_host import (
    KUBELET_STATES,
    HostedNode,
    HostSpec,
    KubeletState,
    client_as,
    kubelet_connections,
    register_nodes,
)
from simulation.node_host import ask as ask_host
from simulation.scenario import (
    NodeChange,
    Scenario,
    ScenarioError,
    ScenarioNode,
    WorkloadItem,
    load_scenario,
    simulated_gpus_file,
)
from simulation.scheduler import Scheduler

SERVICES = ("pod-watcher", "planner", "config-publisher", "admission-webhook")
READY_TIMEOUT = 30.0
HOSTED_ABOVE = 10
"""A scenario with more nodes than this runs their services in node hosts (`nodes_per_host`)."""
NODES_PER_HOST = 25
HOST_REQUEST_TIMEOUT_S = 15.0  # a stop waits for the agent to stop, 5 s at most
COLLECT_TIMEOUT_S = 60.0
CREATING_AT_ONCE = 64
LARGE_WORKLOAD = 100
"""Pod creations the demo keeps in flight while it plays a workload."""
HOSTED_USAGE_POLL_S = 1.0
"""How often an agent in a node host looks at its kubelet's pod resources and its keeper's slices:
every second, where production looks five times a second. Two cores cannot look 1,000 times a
second for 200 nodes (each look costs a few milliseconds of Python, server side included); looking
less often only makes mpsflow later to see a slice taken or freed, never earlier."""
FAKE_MPS_CONTROL = f"{sys.executable} -m simulation.fake_mps_control"
COMPAT_CONFIGMAP = NOS_DEVICE_PLUGIN_CONFIGMAP  # where `--compat-configmap` without a value writes
COMPAT_SETTLE_TIMEOUT = 5.0
AGENT_STOP_GRACE = 5.0
GATE_WEBHOOK = "gate.mpsflow.dev"
RECOVERY_POLL_S = 0.05


@dataclass
class Observed:
    """What the demo learned from the bus."""

    reports: dict[str, NodeGpusReported] = field(default_factory=dict)
    report_log: list[tuple[float, NodeGpusReported]] = field(default_factory=list)  # (received, report)
    watched: set[str] = field(default_factory=set)  # opted-in nodes, as the pod watcher says
    rejected: dict[str, str] = field(default_factory=dict)
    plans: int = 0
    plan_data: bytes | None = None
    """The last plan as published: a plan of 200 nodes is decoded only when it is looked at."""
    configs_refused: int = 0
    _plan: tuple[bytes, PlanComputed] | None = None

    @property
    def last_plan(self) -> PlanComputed | None:
        """The last plan published (None before the first)."""
        if self.plan_data is not None and (self._plan is None or self._plan[0] is not self.plan_data):
            event = decode(self.plan_data).event
            if isinstance(event, PlanComputed):
                self._plan = (self.plan_data, event)
        return None if self._plan is None else self._plan[1]


@dataclass
class ChaosRecord:
    """One kill of `--chaos` as it played: what its node looked like at the kill and once the agent
    served it again, when it was started again and when it recovered (monotonic times), or why
    nothing was killed or measured (`note`)."""

    kill: Kill
    at_kill: dict[str, Any] = field(default_factory=dict)
    on_recovery: dict[str, Any] = field(default_factory=dict)
    killed_at: float | None = None
    restarted_at: float | None = None
    recovered_at: float | None = None
    note: str | None = None
    killed: str | None = None
    """The process killed (of a service with replicas: the one that held its lease)."""

    @property
    def done(self) -> bool:
        return self.recovered_at is not None or self.note is not None

    def summary(self) -> dict[str, Any]:
        recovered = (
            round(max(0.0, self.recovered_at - self.restarted_at), 3)
            if self.recovered_at is not None and self.restarted_at is not None
            else None
        )
        entry: dict[str, Any] = {
            "target": self.kill.target,
            "at": self.kill.at,
            "recovered_seconds": recovered,
        }
        if self.kill.node is None and self.killed_at is not None and self.recovered_at is not None:
            # From the kill until the target served again: a standby may take over before the restart.
            entry["takeover_seconds"] = round(self.recovered_at - self.killed_at, 3)
        if self.killed is not None:
            entry["killed"] = self.killed
        if self.note is not None:
            entry["note"] = self.note
        if self.at_kill:
            entry["at_kill"] = self.at_kill
        if self.on_recovery:
            entry["on_recovery"] = self.on_recovery
        return entry


@dataclass
class ClusterView:
    """The demo's own informer: pods and nodes as its watches of the API last showed them. What it
    polls while the workload plays (progress, whether everything settled) reads this rather than
    copying every object out of the API emulator ten times a second, which at 2,000 pods would
    take a core; the summary reads the API itself, once."""

    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods_synced: bool = False
    nodes_synced: bool = False
    ungated_at: dict[str, float] = field(default_factory=dict)
    """When the watch first showed each pod without a scheduling gate (mpsflow released it)."""


@dataclass
class Cluster:
    """The running pieces of one demo, for the driver and for end-to-end tests."""

    scenario: Scenario
    base: Path
    nats: LocalNatsServer
    api: ApiServer
    bus: EventBus
    admin: client.ApiClient
    kubelets: dict[str, Kubelet]
    webhook_url: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    launches: dict[str, tuple[list[str], str]] = field(default_factory=dict)  # name -> (command, token)
    environment: dict[str, str] = field(default_factory=dict)  # set for every process it starts (tracing)
    status_ports: dict[str, int] = field(default_factory=dict)  # name -> its /healthz, /readyz, /metrics
    listeners: dict[str, list[socket.socket]] = field(default_factory=dict)
    """Process name -> the listening sockets the demo holds for it and hands to each of its starts."""
    crashed: set[str] = field(default_factory=set)  # killed by chaos, to be started again by it
    chaos: list[ChaosRecord] = field(default_factory=list)
    observed: Observed = field(default_factory=Observed)
    requested_at: dict[str, float] = field(default_factory=dict)
    """Pod key -> `time.monotonic()` when the demo sent its create request."""
    played: int = 0  # workload items and node changes played so far
    view: ClusterView = field(default_factory=ClusterView)
    hosts: dict[str, Path] = field(default_factory=dict)
    """Node host processes (`simulation.node_host`) by name, each with its control socket."""
    host_of: dict[str, str] = field(default_factory=dict)
    """Node -> the host that runs its keeper and agent; a node not here has processes of its own."""
    hosted_agents: set[str] = field(default_factory=set)
    """Nodes whose agent runs in their host now."""
    hosted_kubelets: dict[str, KubeletState] = field(default_factory=dict)
    """What the kubelets of the node hosts did, as last collected (`collect_hosted_kubelets`)."""
    _workload: dict[str, WorkloadItem] | None = None

    def pods(self, *, fresh: bool = False) -> dict[str, dict[str, Any]]:
        """The pods by namespace/name: as the demo's informer last saw them, or `fresh` from the API
        (a copy of every pod: for the summary, not for polling). Not to be modified."""
        if not fresh:
            return self.view.pods
        return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in self.api.objects("pods")}

    def opted_in(self) -> set[str]:
        """Nodes whose labels opt them in, as the demo's informer last saw them."""
        return {
            name
            for name, node in self.view.nodes.items()
            if is_opted_in(node["metadata"].get("labels") or {})
        }

    def ready(self) -> bool:
        """Every node is registered, and every opted-in node has an agent that reported and is
        watched by the pod watcher."""
        if not (self.view.nodes_synced and self.view.pods_synced):
            return False
        if not {node.name for node in self.scenario.nodes} <= set(self.view.nodes):
            return False
        opted_in = self.opted_in()
        return opted_in <= set(self.observed.reports) and opted_in <= self.observed.watched

    def valid_pods(self) -> dict[str, WorkloadItem]:
        """The workload's pods the pod watcher has not rejected."""
        if self._workload is None:
            self._workload = {item.key: item for item in self.scenario.workload}
        rejected = self.observed.rejected
        return {key: item for key, item in self._workload.items() if key not in rejected}

    def finished(self) -> bool:
        """Nothing is left to happen: everything was played, every killed agent serves its node
        again, every valid pod runs or has ended (a pod with a run time only once it ended), and
        every other pod was rejected."""
        if self.played < len(self.scenario.workload) + len(self.scenario.node_changes):
            return False
        if not all(record.done for record in self.chaos):
            return False
        pods = self.pods()
        for key, item in self.valid_pods().items():
            phase = (pods.get(key, {}).get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed") or (phase == "Running" and item.runs_for is None):
                continue
            return False
        return True

    def at_rest(self) -> bool:
        """Nothing is left to happen and its effects have gone round: every opted-in node reports
        as many used slices as it runs pods, and the last plan describes exactly those reports.
        From here on, nothing mpsflow does is a response to something that happened."""
        if not self.finished() or self.observed.last_plan is None:
            return False
        running: dict[str, int] = {}
        pods = self.pods()
        for key in self.valid_pods():
            pod = pods.get(key, {})
            node = (pod.get("spec") or {}).get("nodeName")
            if node and (pod.get("status") or {}).get("phase") == "Running":
                running[node] = running.get(node, 0) + 1
        planned = self.observed.last_plan.nodes
        for name in self.opted_in():
            report = self.observed.reports.get(name)
            layout = planned.get(name)
            if report is None or layout is None:
                return False
            if sum(s.used for g in report.gpus for s in g.slices) != running.get(name, 0):
                return False
            reported = {g.index: sorted((s.size_gb, s.used) for s in g.slices) for g in report.gpus}
            wanted = {i: sorted((s.size_gb, s.used) for s in slices) for i, slices in layout.gpus.items()}
            if any(reported.get(index) != slices for index, slices in wanted.items()):
                return False
        return True

    def failed(self) -> dict[str, str]:
        """Valid pods that ended Failed, with the reason the kubelet gave."""
        pods = self.pods(fresh=True)
        failed = {}
        for key in self.valid_pods():
            status = pods.get(key, {}).get("status") or {}
            if status.get("phase") == "Failed":
                failed[key] = f"{status.get('reason', 'Failed')}: {status.get('message', '')}".rstrip(": ")
        return failed


def _service_command(service: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "run", service, *extra]


def _loopback_listener() -> socket.socket:
    """A socket listening on a free loopback port, to hand to a process as `fd:N`
    (`services.kit.listen`): it listens before anyone is told its port, so no other process can
    take the port in between, and it outlives the restarts of the process it is handed to."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def _close_listeners(cluster: Cluster) -> None:
    for listener in (held for sockets in cluster.listeners.values() for held in sockets):
        listener.close()


def _start_process(cluster: Cluster, name: str, command: list[str], token: str) -> None:
    logs = cluster.base / "logs"
    if "--status-address" not in command:  # each process its own port, kept across its restarts
        listener = _loopback_listener()
        cluster.listeners.setdefault(name, []).append(listener)
        cluster.status_ports[name] = listener.getsockname()[1]
        command = [*command, "--status-address", f"fd:{listener.fileno()}"]
    environment = {
        **os.environ,
        "MPSFLOW_NATS_URL": cluster.nats.url,
        "MPSFLOW_KUBE_URL": cluster.api.url,
        "MPSFLOW_KUBE_TOKEN": token,
        "PYTHONUNBUFFERED": "1",
        "POD_NAME": name,  # a replica's name, as the downward API would give it
        **cluster.environment,
    }
    with (logs / f"{name}.log").open("ab") as log_file:
        cluster.processes[name] = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
            pass_fds=[listener.fileno() for listener in cluster.listeners.get(name, [])],
        )
    cluster.launches[name] = (command, token)


def _stop_processes(cluster: Cluster) -> None:
    """Stop every process the demo started, and every fake MPS daemon they started (the daemons
    detach from their agent, as real MPS control daemons do)."""
    for process in cluster.processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for process in cluster.processes.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid_file in cluster.base.glob("nodes/*/mps/*/pipe/nvidia-cuda-mps-control.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


def _agent_name(node: str) -> str:
    return f"node-agent-{node}"


@dataclass(frozen=True)
class NodeServices:
    """How one node's MPS daemon keeper and agent are run: their GPU file and the options of
    `mpsflow run mps-daemons` and `mpsflow run node-agent`, the same in a process of their own and
    in a node host."""

    gpus_file: Path
    keeper: list[str]
    agent: list[str]


def _node_services(cluster: Cluster, node: ScenarioNode, *, hosted: bool) -> NodeServices:
    """Per-node processes run the keeper's checks and the agent's heartbeat faster than production
    (2 s and 5 s) to keep the small demos short; node hosts, for large clusters, run them at the
    production defaults (5 s and 10 s), and the agent's look at its kubelet slower than production
    (`HOSTED_USAGE_POLL_S`): what 200 nodes do is CPU the other nodes wait for, which a real node
    would not take from any other."""
    node_dir = cluster.base / "nodes" / node.name
    node_dir.mkdir(parents=True, exist_ok=True)
    gpus_file = node_dir / "gpus.json"
    gpus_file.write_text(simulated_gpus_file(node))
    mps = [
        "--mps-root",
        str(node_dir / "mps"),
        "--mps-control",
        FAKE_MPS_CONTROL,
        "--link-socket",
        str(node_dir / "link.sock"),
    ]
    keeper = ["--node", node.name, *mps, "--plugin-dir", str(kubelet_plugin_dir(node_dir))]
    agent = ["--node", node.name, "--pod-resources-socket", str(pod_resources_socket(node_dir)), *mps]
    if hosted:
        agent += ["--usage-poll", str(HOSTED_USAGE_POLL_S)]
    else:
        keeper += ["--check-seconds", "2"]
        agent += ["--heartbeat", "5"]
    agent += _credentials_flag(cluster, access.node_agent_role(node.name))
    return NodeServices(gpus_file, keeper, agent)


def _start_agent(cluster: Cluster, node: ScenarioNode) -> None:
    """The node's MPS daemon keeper (once: its DaemonSet is updated only on delete, and a node opted
    out keeps its daemons for the pods still running there), then its node agent, each a process."""
    services = _node_services(cluster, node, hosted=False)
    simulated = [
        sys.executable,
        "-m",
        "simulation.simulated_agent",
        "--simulated-gpus",
        str(services.gpus_file),
    ]
    keeper = cluster.processes.get(_keeper_name(node.name))
    if keeper is None or keeper.poll() is not None:
        _start_process(
            cluster,
            _keeper_name(node.name),
            [*simulated, "mps-daemons", *services.keeper],
            f"mpsflow-mps-daemons-{node.name}",
        )
    _start_process(
        cluster,
        _agent_name(node.name),
        [*simulated, "node-agent", *services.agent],
        f"mpsflow-node-agent-{node.name}",
    )


async def _ask_host(cluster: Cluster, node: str, op: str) -> None:
    """Ask the node's host to start or stop its agent, waiting for the host to take requests (it
    may still be starting: its requests are retried until `READY_TIMEOUT`)."""
    socket_path = cluster.hosts[cluster.host_of[node]]
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            with anyio.fail_after(HOST_REQUEST_TIMEOUT_S):
                reply = await ask_host(socket_path, {"op": op, "node": node})
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(0.1)
    if not reply.get("ok"):
        raise RuntimeError(f"node host {cluster.host_of[node]}: {op} {node}: {reply.get('error')}")


def _agent_running(cluster: Cluster, node: str) -> bool:
    if node in cluster.host_of:
        return node in cluster.hosted_agents
    process = cluster.processes.get(_agent_name(node))
    return process is not None and process.poll() is None


async def _stop_agent(cluster: Cluster, node: str) -> None:
    """Stop the node's agent process as its DaemonSet would (SIGTERM, then SIGKILL after a grace)."""
    process = cluster.processes[_agent_name(node)]
    process.send_signal(signal.SIGTERM)
    try:
        await anyio.to_thread.run_sync(process.wait, AGENT_STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()


def _credentials_flag(cluster: Cluster, role: access.Role) -> list[str]:
    """The credentials of the process's own identity, which grant its role and nothing more."""
    return ["--nats-creds", str(cluster.nats.options_as(role).credentials)]


def _keeper_name(node: str) -> str:
    return f"mps-daemons-{node}"


async def run_agents_where_opted_in(cluster: Cluster, api: client.ApiClient) -> None:
    """The node agent's DaemonSet: an agent runs on every node whose labels opt it in, and only
    there; a node opted out loses its agent (its running pods keep their slices), one opted in
    gets one. It decides from its own watch of the nodes, as the DaemonSet controller does. Agents
    in node hosts are started and stopped concurrently (one request at a time per node), as the
    controller creates and deletes pods in batches; agents of their own, one by one."""
    nodes = {node.name: node for node in cluster.scenario.nodes}
    locks: dict[str, anyio.Lock] = {}

    async def hosted(name: str, op: str) -> None:
        async with locks.setdefault(name, anyio.Lock()):
            await _ask_host(cluster, name, op)
            if op == "stop":
                cluster.observed.reports.pop(name, None)

    async with anyio.create_task_group() as group:

        async def sync(change: str, node: dict[str, Any]) -> None:
            name = node["metadata"]["name"]
            if _agent_name(name) in cluster.crashed:  # its pod still exists: the kubelet starts it again
                return
            wanted = change != "DELETED" and is_opted_in(node["metadata"].get("labels") or {})
            running = _agent_running(cluster, name)
            if wanted and not running and name in nodes:
                if name in cluster.host_of:
                    cluster.hosted_agents.add(name)
                    group.start_soon(hosted, name, "start")
                else:
                    _start_agent(cluster, nodes[name])
            elif not wanted and running:
                if name in cluster.host_of:
                    cluster.hosted_agents.discard(name)
                    group.start_soon(hosted, name, "stop")
                else:
                    await _stop_agent(cluster, name)
                    cluster.observed.reports.pop(name, None)

        async def relist(items: Listing) -> None:
            async for item in items:
                await sync("MODIFIED", item)

        await list_and_watch(api, client.CoreV1Api(api).list_node, relist, sync)


async def _inform(cluster: Cluster) -> None:
    """Keep `cluster.view` as the demo's watches of pods and nodes show them."""
    core = client.CoreV1Api(cluster.admin)
    view = cluster.view

    def key(pod: dict[str, Any]) -> str:
        return f"{pod['metadata'].get('namespace', '')}/{pod['metadata']['name']}"

    async def pods_listed(items: Listing) -> None:
        view.pods = {key(pod): pod async for pod in items}
        view.pods_synced = True

    async def pod_changed(change: str, pod: dict[str, Any]) -> None:
        if change == "DELETED":
            view.pods.pop(key(pod), None)
        else:
            view.pods[key(pod)] = pod
            if key(pod) not in view.ungated_at and not (pod.get("spec") or {}).get("schedulingGates"):
                view.ungated_at[key(pod)] = time.monotonic()

    async def nodes_listed(items: Listing) -> None:
        view.nodes = {node["metadata"]["name"]: node async for node in items}
        view.nodes_synced = True

    async def node_changed(change: str, node: dict[str, Any]) -> None:
        if change == "DELETED":
            view.nodes.pop(node["metadata"]["name"], None)
        else:
            view.nodes[node["metadata"]["name"]] = node

    async with anyio.create_task_group() as group:
        group.start_soon(
            functools.partial(
                list_and_watch, cluster.admin, core.list_pod_for_all_namespaces, pods_listed, pod_changed
            )
        )
        group.start_soon(
            functools.partial(list_and_watch, cluster.admin, core.list_node, nodes_listed, node_changed)
        )


UNWATCHED = tuple(
    prefix.removesuffix(">")
    for prefix in (subjects.PLANNED_EVENTS, subjects.RELEASE_EVENTS, subjects.UNPLACED_EVENTS)
)
"""Subjects whose events the demo does not look at: it skips decoding them."""


async def _observe(cluster: Cluster) -> None:
    plan_subject = subjects.plan_subject()
    subscription = await cluster.bus.js.subscribe(subjects.ALL_EVENTS, ordered_consumer=True)
    try:
        while True:
            try:
                message = await subscription.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                continue
            if message.subject == plan_subject:  # counted here, decoded only when looked at
                cluster.observed.plans += 1
                cluster.observed.plan_data = message.data
                continue
            if message.subject.startswith(UNWATCHED):
                continue
            try:
                event = decode(message.data).event
            except UndecodableMessageError:
                continue
            if isinstance(event, NodeGpusReported):
                cluster.observed.reports[event.node] = event
                cluster.observed.report_log.append((time.monotonic(), event))
            elif isinstance(event, NodeObserved):
                cluster.observed.watched.add(event.name)
            elif isinstance(event, NodeOptedOut):
                cluster.observed.watched.discard(event.name)
            elif isinstance(event, PodRejected):
                cluster.observed.rejected[event.key] = f"{event.reason}: {event.message}"
            elif isinstance(event, NodeConfigFailed):
                cluster.observed.configs_refused += 1
    finally:
        with anyio.CancelScope(shield=True):
            await subscription.unsubscribe()


def log_tail(path: Path, lines: int = 8) -> list[str]:
    """The last `lines` lines of a process's log (the logs go when the demo ends: a process that died
    before the cluster was ready must say why on the demo's own output)."""
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as error:
        return [f"(no log: {error})"]


async def _play(cluster: Cluster, core: client.CoreV1Api, start: float) -> None:
    """Create the workload's pods and make its node changes, each at its time after `start`.

    A pod's creation does not wait for the one before it to be answered (a burst of 500 pods in
    2 s must arrive in 2 s, whatever each takes the API and the webhook), but at most
    `CREATING_AT_ONCE` are in flight, and a node change waits for every creation before it."""
    steps: list[tuple[float, WorkloadItem | NodeChange]] = [
        *((item.at, item) for item in cluster.scenario.workload),
        *((change.at, change) for change in cluster.scenario.node_changes),
    ]
    creating = anyio.CapacityLimiter(CREATING_AT_ONCE)
    in_flight: set[anyio.Event] = set()

    async def create(item: WorkloadItem, done: anyio.Event) -> None:
        manifest = json.loads(json.dumps(item.pod))
        manifest.setdefault("apiVersion", "v1")
        manifest.setdefault("kind", "Pod")
        manifest["metadata"].setdefault("namespace", item.namespace)
        if item.runs_for is not None:
            manifest["metadata"].setdefault("annotations", {})[RUNS_FOR_ANNOTATION] = str(item.runs_for)
        try:
            cluster.requested_at[item.key] = time.monotonic()
            # The answer is not made into a model (a millisecond of CPU a pod, which a burst's
            # pods would take from the services): only its status is read.
            response = cast(
                aiohttp.ClientResponse,
                await core.create_namespaced_pod(
                    item.namespace, manifest, _request_timeout=10, _preload_content=False
                ),
            )
            async with response:
                answer = await response.text()
                if not 200 <= response.status <= 299:
                    raise ApiException(status=response.status, reason=f"creating {item.key}: {answer}")
        finally:
            creating.release_on_behalf_of(item.key)
            in_flight.discard(done)
            done.set()
        cluster.played += 1

    async with anyio.create_task_group() as group:
        for at, step in sorted(steps, key=lambda s: s[0]):
            await anyio.sleep(max(0.0, start + at - time.monotonic()))
            if isinstance(step, NodeChange):
                for done in list(in_flight):  # the pods created before it come first
                    await done.wait()
                await core.patch_node(
                    step.node,
                    {"metadata": {"labels": step.labels}},
                    _content_type="application/merge-patch+json",  # type: ignore[call-arg]
                    _request_timeout=10,
                )
                cluster.played += 1
            else:
                await creating.acquire_on_behalf_of(step.key)
                done = anyio.Event()
                in_flight.add(done)
                group.start_soon(create, step, done)


async def _play_chaos(cluster: Cluster, start: float, say: Callable[[str], None]) -> None:
    """Play every kill of `cluster.chaos`, each at its time after `start`."""
    async with anyio.create_task_group() as group:
        for record in cluster.chaos:
            if record.kill.node is not None:
                group.start_soon(_kill_node_agent, cluster, record, start, say)
            elif record.kill.target == "nats":
                group.start_soon(_kill_nats, cluster, record, start, say)
            else:
                group.start_soon(_kill_service, cluster, record, start, say)


async def _kill_service(
    cluster: Cluster, record: ChaosRecord, start: float, say: Callable[[str], None]
) -> None:
    """Kill the replica of a service that holds its lease (the active one), start it again one second
    later, and measure when a replica serves again: its ready file says `active`, written once it
    holds the lease and has caught up with the stream (`services.cli._one_active`)."""
    service = record.kill.target

    def tell(what: str) -> None:
        say(f"  {time.monotonic() - start:5.1f}s  chaos: {what}")

    await anyio.sleep(max(0.0, start + record.kill.at - time.monotonic()))
    replicas = _replicas(cluster, service)
    lease = await (await cluster.bus.leases()).get(service)
    holder = LeaseRecord.decode(lease.value) if lease is not None else None
    name = holder.holder if holder is not None and holder.holder in replicas else replicas[0]
    process = cluster.processes[name]
    record.killed = name
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await anyio.to_thread.run_sync(process.wait)
    record.killed_at = time.monotonic()
    killed_wall = time.time()
    tell(f"{name} (pid {process.pid}, {'active' if holder else 'no lease seen'}) killed with SIGKILL")

    async def restart() -> None:
        await anyio.sleep(RESTART_DELAY_S)
        command, token = cluster.launches[name]
        _start_process(cluster, name, command, token)
        record.restarted_at = time.monotonic()
        tell(f"{name} started again (pid {cluster.processes[name].pid})")

    async with anyio.create_task_group() as group:
        group.start_soon(restart)
        while True:
            serving = [r for r in replicas if _ready_since(cluster, r, killed_wall)]
            if serving:
                record.recovered_at = time.monotonic()
                tell(
                    f"{service} served again by {serving[0]}, "
                    f"{record.recovered_at - record.killed_at:.2f}s after the kill"
                )
                break
            await anyio.sleep(RECOVERY_POLL_S)


def _replicas(cluster: Cluster, service: str) -> list[str]:
    """The process names of `service`'s replicas."""
    return sorted(name for name in cluster.launches if name == service or name.startswith(f"{service}-"))


def _ready_since(cluster: Cluster, name: str, since: float) -> bool:
    """The replica's ready file says `active`, written after `since` (wall-clock seconds)."""
    path = cluster.base / "logs" / f"{name}.ready"
    try:
        return path.stat().st_mtime > since and path.read_text().strip() == "active"
    except OSError:
        return False


async def _kill_nats(cluster: Cluster, record: ChaosRecord, start: float, say: Callable[[str], None]) -> None:
    """Kill the NATS server, start it again one second later on the same port and store, and measure
    when events flow again: the first event stored after the restart."""

    def tell(what: str) -> None:
        say(f"  {time.monotonic() - start:5.1f}s  chaos: {what}")

    await anyio.sleep(max(0.0, start + record.kill.at - time.monotonic()))
    await anyio.to_thread.run_sync(cluster.nats.kill)
    record.killed_at = time.monotonic()
    record.killed = "nats-server"
    tell("nats-server killed with SIGKILL (its store stays)")
    await anyio.sleep(RESTART_DELAY_S)
    await anyio.to_thread.run_sync(cluster.nats.start)
    record.restarted_at = time.monotonic()
    tell("nats-server started again")
    first: int | None = None
    while True:
        try:
            last = (await cluster.bus.js.stream_info(subjects.STREAM)).state.last_seq
        except Exception:  # the observer's connection is still coming back
            last = None
        if last is not None:
            if first is None:
                first = last
            elif last > first:
                record.recovered_at = time.monotonic()
                tell(f"events flow again, {record.recovered_at - record.restarted_at:.2f}s after the restart")
                return
        await anyio.sleep(RECOVERY_POLL_S)


async def _kill_node_agent(
    cluster: Cluster, record: ChaosRecord, start: float, say: Callable[[str], None]
) -> None:
    """Kill a node's agent as a crash would, start it again as its kubelet would, and measure when it
    serves the node again.

    SIGKILL goes to the agent's whole process group (its own session: the MPS control commands it
    may be running die with it, as in a killed container). The node's MPS daemon keeper and the
    daemons are processes of their own sessions, so they live on, as they must. The agent is
    started again `RESTART_DELAY_S` later with the same command line (unless its node opted out
    meanwhile); until then the DaemonSet controller leaves it alone. Recovery is measured from
    the restart until the restarted agent's first GPU report that shows it serving its node again
    (`_serves_again`), or until the next kill of it, whichever comes first.
    """
    node = record.kill.node
    if node is None:  # check_chaos lets only node agents through
        raise ValueError(f"{record.kill.target} is not a node agent")
    name = _agent_name(node)

    def tell(what: str) -> None:
        say(f"  {time.monotonic() - start:5.1f}s  chaos: {what}")

    await anyio.sleep(max(0.0, start + record.kill.at - time.monotonic()))
    process = cluster.processes.get(name)
    if process is None or process.poll() is not None:
        record.note = f"no node agent ran on {node} at that moment: nothing was killed"
        tell(f"{record.kill.spec}: {record.note}")
        return
    record.at_kill = _node_at_kill(cluster, node)
    cluster.crashed.add(name)
    with contextlib.suppress(ProcessLookupError):  # it died by itself a moment ago
        os.killpg(process.pid, signal.SIGKILL)
    await anyio.to_thread.run_sync(process.wait)
    tell(f"{record.kill.target} (pid {process.pid}) killed with SIGKILL; its MPS daemons run on")
    await anyio.sleep(RESTART_DELAY_S)
    cluster.crashed.discard(name)
    if node not in cluster.opted_in():
        cluster.observed.reports.pop(node, None)
        record.note = f"{node} opted out before its agent was started again"
        tell(f"{record.kill.spec}: {record.note}")
        return
    seen = len(cluster.observed.report_log)
    command, token = cluster.launches[name]
    _start_process(cluster, name, command, token)
    record.restarted_at = time.monotonic()
    tell(f"{record.kill.target} started again (pid {cluster.processes[name].pid})")
    had_config = record.at_kill["applied_plan_id"] is not None
    later_kills = [
        other.kill.at
        for other in cluster.chaos
        if other.kill.target == record.kill.target and other.kill.at > record.kill.at
    ]
    deadline = start + min(later_kills) if later_kills else float("inf")
    while time.monotonic() < deadline:
        reports, seen = cluster.observed.report_log[seen:], len(cluster.observed.report_log)
        for received_at, report in reports:
            if report.node == node and _serves_again(report, had_config):
                record.recovered_at = received_at
                record.on_recovery = {
                    **_node_state(cluster, node),
                    "reported_holders": {
                        holder: sorted(s.id for g in report.gpus for s in g.slices if s.holder == holder)
                        for holder in sorted({s.holder for g in report.gpus for s in g.slices if s.holder})
                    },
                }
                tell(
                    f"{record.kill.target} serves {node} again, "
                    f"{received_at - record.restarted_at:.2f}s after its restart"
                )
                return
        await anyio.sleep(RECOVERY_POLL_S)
    record.note = "killed again before it served its node again"


def _serves_again(report: NodeGpusReported, had_config: bool) -> bool:
    """A restarted agent's report shows it serving its node again: it has applied the node's config
    (when the node had one at the kill) and the kubelet lists every slice it reports, those that
    running pods hold included, so the planner may release pods to the node and the kubelet can
    admit them."""
    applied = report.applied_plan_id is not None or not had_config
    return applied and all(s.listed_by_kubelet for g in report.gpus for s in g.slices)


def _node_at_kill(cluster: Cluster, node: str) -> dict[str, Any]:
    """The node as a kill finds it: `_node_state`, the config its agent had applied, and the valid
    pods created and not yet started anywhere (in flight: one may be on its way to this node)."""
    report = cluster.observed.reports.get(node)
    pods = cluster.pods()
    valid = cluster.valid_pods()
    return {
        **_node_state(cluster, node),
        "applied_plan_id": report.applied_plan_id if report is not None else None,
        "waiting": sorted(
            key
            for key in cluster.requested_at
            if key in valid
            and (pods.get(key, {}).get("status") or {}).get("phase") not in ("Running", "Succeeded", "Failed")
        ),
    }


def _node_state(cluster: Cluster, node: str) -> dict[str, Any]:
    """What an agent restart must not disturb on `node`: each GPU's MPS control daemon pid (its pid
    file; null when none), and each running pod's devices as the kubelet's device manager holds
    them now, with the environment the device plugin gave it at admission."""
    report = cluster.observed.reports.get(node)
    mps_root = cluster.base / "nodes" / node / "mps"
    daemon_pids: dict[str, int | None] = {}
    for gpu in report.gpus if report is not None else ():
        pid_file = DaemonSpec.under(mps_root, gpu.index, gpu.uuid).pid_file
        try:
            daemon_pids[str(gpu.index)] = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            daemon_pids[str(gpu.index)] = None
    kubelet = cluster.kubelets[node]
    held = kubelet.devices.assignments()
    running: dict[str, Any] = {}
    for key, pod in sorted(cluster.pods().items()):
        started = kubelet.started.get(key)
        if started is None or (pod.get("spec") or {}).get("nodeName") != node:
            continue
        if (pod.get("status") or {}).get("phase") != "Running":
            continue
        containers = held.get(pod["metadata"]["uid"], {})
        running[key] = {
            "device_ids": sorted(device for devices in containers.values() for device in devices),
            "env": dict(sorted(started.envs.items())),
        }
    return {"daemon_pids": daemon_pids, "running": running}


async def _webhook_answers(url: str) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(1)) as r,
        ):
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def start_cluster(
    scenario: Scenario,
    stack: AsyncExitStack,
    say: Callable[[str], None],
    *,
    compat: bool = False,
    replicas: int = 1,
    environment: dict[str, str] | None = None,
    nodes_per_host: int = 0,
) -> Cluster:
    """Start the cluster and every service; the agents start with `run_agents_where_opted_in`.

    `compat` makes the config publisher also write nebuly's device-plugin ConfigMap
    (`COMPAT_CONFIGMAP`) and point each node's `nvidia.com/device-plugin.config` label at it.
    `replicas` of each of the pod watcher, the planner and the config publisher run (`<service>-<n>`
    when more than one), one of them active by the service's lease. `environment` is set for every
    process it starts (where to export spans). `nodes_per_host`: 0 runs each node's keeper and agent
    as processes of their own (over fake MPS daemons of their own), N runs them in node hosts of N
    nodes each (`simulation.node_host`)."""
    base = Path(tempfile.mkdtemp(prefix="mpsflow-", dir="/tmp"))
    stack.callback(shutil.rmtree, base, True)
    (base / "logs").mkdir()
    # The simulated cluster's own log (API emulator, kubelets, scheduler) goes beside the services'.
    cluster_log = logging.FileHandler(base / "logs" / "cluster.log")
    cluster_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(cluster_log)
    logging.getLogger().setLevel(logging.INFO)
    stack.callback(logging.getLogger().removeHandler, cluster_log)
    stack.callback(cluster_log.close)
    # Authentication on, as in production (docs/security.md): every process its own identity.
    nats_server = LocalNatsServer(base / "nats", secured=True).start()
    stack.callback(nats_server.stop)
    webhook_listener = _loopback_listener()
    stack.callback(webhook_listener.close)
    webhook_url = f"http://127.0.0.1:{webhook_listener.getsockname()[1]}"
    api = ApiServer(
        watch_delay=scenario.timing.watch_delay_s,
        faults=scenario.api_faults.emulator_faults() if scenario.api_faults else None,
        admission_webhooks=[
            AdmissionWebhook(GATE_WEBHOOK, webhook_url + WEBHOOK_PATH, "Fail", 10.0, matches=asks_for_a_slice)
        ],
    )
    await api.start()
    stack.push_async_callback(api.stop)
    await bootstrap(nats_server.options_as_admin(), BusLimits())
    bus = await EventBus.connect(nats_server.options_as_admin(), source="demo")
    stack.push_async_callback(bus.close)
    admin = await api_client(api.url, "demo")
    stack.push_async_callback(admin.close)
    # With node hosts, each node's kubelet runs in its host, beside the node's keeper and agent.
    connections = kubelet_connections(api.url)
    stack.push_async_callback(connections.close)
    kubelets = {
        node.name: Kubelet(
            client_as(connections, f"kubelet-{node.name}"),
            node,
            base / "nodes" / node.name,
            scenario.timing.node_status_period_s,
        )
        for node in (scenario.nodes if nodes_per_host == 0 else [])
    }
    await register_nodes(kubelets.values())
    cluster = Cluster(scenario, base, nats_server, api, bus, admin, kubelets, webhook_url)
    cluster.environment.update(environment or {})
    cluster.listeners["admission-webhook"] = [webhook_listener]
    stack.callback(_close_listeners, cluster)
    stack.callback(_stop_processes, cluster)
    say(
        f"started nats-server on {nats_server.url} (authentication on: one identity per process) "
        f"and the API emulator on {api.url}"
    )
    for service in SERVICES:
        extra: tuple[str, ...] = ()
        if service == "config-publisher" and compat:
            extra = ("--compat-configmap",)  # nos's default, COMPAT_CONFIGMAP
        elif service == "admission-webhook":
            extra = ("--listen", f"fd:{webhook_listener.fileno()}")
        if service not in access.SERVICE_ROLES:
            _start_process(cluster, service, _service_command(service, *extra), f"mpsflow-{service}")
            continue
        extra += tuple(_credentials_flag(cluster, access.SERVICE_ROLES[service]))
        names = [service] if replicas == 1 else [f"{service}-{n}" for n in range(1, replicas + 1)]
        for name in names:
            ready = ("--ready-file", str(base / "logs" / f"{name}.ready"))
            _start_process(cluster, name, _service_command(service, *extra, *ready), f"mpsflow-{service}")
    shown = f"{len(SERVICES)} services" + (
        f", {replicas} replicas of each with a lease" if replicas > 1 else ""
    )
    say(f"started {shown} (logs in {base / 'logs'})")
    if nodes_per_host > 0:
        _start_node_hosts(cluster, nodes_per_host)
        say(
            f"started {len(cluster.hosts)} node hosts of up to {nodes_per_host} nodes each "
            "(each node's MPS daemon keeper and agent in its host, with its own identity)"
        )
    return cluster


def _start_node_hosts(cluster: Cluster, nodes_per_host: int) -> None:
    """One `simulation.node_host` process per `nodes_per_host` nodes, dealt round: the scenario's
    first nodes go to different hosts, so that the nodes a planner fills first (it packs) do not
    all wait for the same core."""
    hosts_dir = cluster.base / "hosts"
    hosts_dir.mkdir()
    nodes = cluster.scenario.nodes
    count = -(-len(nodes) // nodes_per_host)
    for index in range(count):
        name = f"node-host-{index + 1}"
        group = nodes[index::count]
        spec = HostSpec(
            control_socket=hosts_dir / f"{name}.sock",
            kube_url=cluster.api.url,
            node_status_period_s=cluster.scenario.timing.node_status_period_s,
            nodes=tuple(
                HostedNode(
                    node=node,
                    root=cluster.base / "nodes" / node.name,
                    gpus_file=services.gpus_file,
                    keeper=tuple(services.keeper),
                    agent=tuple(services.agent),
                )
                for node in group
                for services in [_node_services(cluster, node, hosted=True)]
            ),
        )
        spec_file = hosts_dir / f"{name}.json"
        spec_file.write_text(spec.model_dump_json(indent=1))
        _start_process(
            cluster,
            name,
            [sys.executable, "-m", "simulation.node_host", "--spec", str(spec_file)],
            "mpsflow-node-host",
        )
        cluster.hosts[name] = spec.control_socket
        cluster.host_of.update((node.name, name) for node in group)


def nodes_per_host(scenario: Scenario, chaos: tuple[Kill, ...], asked: int | None) -> int:
    """How many nodes share a node host (0: none, each node's services are processes of their own).

    `asked` None decides: processes of their own for a scenario of up to `HOSTED_ABOVE` nodes, so
    that every small demo, test and chaos run has nodes as real as they get, and wherever `--chaos`
    kills a node agent (in a host, a node's keeper and daemons could not outlive its agent); node
    hosts of `NODES_PER_HOST` above. `ChaosError` when `asked` hosts nodes and a kill needs them not to."""
    kills_agents = any(kill.node is not None for kill in chaos)
    if asked is None:
        return 0 if kills_agents or len(scenario.nodes) <= HOSTED_ABOVE else NODES_PER_HOST
    if asked > 0 and kills_agents:
        raise ChaosError(
            "--chaos: killing a node agent needs its node's services in processes of their own "
            f"(--nodes-per-host 0), not in node hosts of {asked}"
        )
    return asked


def _quantiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 of `values` (0, 0 when empty)."""
    if not values:
        return 0.0, 0.0
    p99 = statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]
    return round(statistics.median(values), 3), round(p99, 3)


def _kubelet_states(cluster: Cluster) -> dict[str, KubeletState]:
    """What every kubelet did: the demo's own, and those of the node hosts as last collected."""
    return {
        **cluster.hosted_kubelets,
        **{name: KubeletState(started=k.started, failed=k.failed) for name, k in cluster.kubelets.items()},
    }


async def collect_hosted_kubelets(cluster: Cluster) -> None:
    """Ask every node host what its kubelets did (`cluster.hosted_kubelets`), for the summary."""
    for name, socket_path in cluster.hosts.items():
        with anyio.fail_after(COLLECT_TIMEOUT_S):
            reply = await ask_host(socket_path, {"op": "kubelets"})
        if not reply.get("ok"):
            raise RuntimeError(f"node host {name}: {reply.get('error')}")
        cluster.hosted_kubelets.update(KUBELET_STATES.validate_python(reply["kubelets"]))


def summary(cluster: Cluster, plans_while_idle: int) -> dict[str, Any]:
    """The run's summary (docs/formats.md §2.2); with node hosts, after `collect_hosted_kubelets`."""
    pods_out: dict[str, Any] = {}
    api_pods = cluster.pods(fresh=True)
    failed = cluster.failed()
    kubelets = _kubelet_states(cluster)
    error_lines = service_error_lines(cluster.base / "logs")
    for key, item in cluster.valid_pods().items():
        pod = api_pods.get(key, {})
        node = (pod.get("spec") or {}).get("nodeName")
        started = kubelets[node].started.get(key) if node in kubelets else None
        size = next(
            (
                slice_size(r)
                for c in item.pod["spec"]["containers"]
                for r in (c.get("resources") or {}).get("limits", {})
                | (c.get("resources") or {}).get("requests", {})
                if slice_size(r) is not None
            ),
            None,
        )
        # From the pod's creation: when the API stored it, its webhooks done (the time the request
        # waited in the one-process emulator before is the simulation's, and is `api_seconds`).
        created = cluster.api.pods_created_at.get(key)
        requested = cluster.requested_at.get(key)
        entry: dict[str, Any] = {
            "phase": (pod.get("status") or {}).get("phase", "Pending"),
            "node": node,
            "gpu": started.gpu if started else None,
            "size_gb": size,
            "device_ids": list(started.device_ids) if started else [],
            "env": dict(sorted(started.envs.items())) if started else {},
            "cdi_devices": started.cdi_devices if started else [],
            "pending_seconds": round(started.started_at - created, 3) if started and created else None,
            "mpsflow_seconds": (
                round(max(0.0, started.slice_listed_at - created), 3)
                if started and created and started.slice_listed_at is not None
                else None
            ),
            "released_seconds": (
                round(max(0.0, cluster.view.ungated_at[key] - created), 3)
                if created and key in cluster.view.ungated_at
                else None
            ),
            "api_seconds": round(created - requested, 3) if created and requested else None,
        }
        # A slice listed after the pod was created, carved where a free slice was withdrawn from its
        # GPU in the same change: the pod waited for that reclaim.
        waited = started is not None and bool(entry["mpsflow_seconds"])
        entry["reclaimed"] = list(started.reclaimed) if started is not None and waited else []
        if key in failed:
            entry["reason"] = failed[key]
        pods_out[key] = entry
    opted_in = cluster.opted_in()
    nodes_out = {
        name: {
            "gpus": {
                str(g.index): [{"size_gb": s.size_gb, "used": s.used} for s in g.slices] for g in report.gpus
            }
        }
        for name, report in sorted(cluster.observed.reports.items())
        if name in opted_in
    }
    pending = [p["pending_seconds"] for p in pods_out.values() if p["pending_seconds"] is not None]
    mpsflow = [p["mpsflow_seconds"] for p in pods_out.values() if p["mpsflow_seconds"] is not None]
    reclaim = [p["mpsflow_seconds"] for p in pods_out.values() if p["reclaimed"]]
    released = [p["released_seconds"] for p in pods_out.values() if p["released_seconds"] is not None]
    api = [p["api_seconds"] for p in pods_out.values() if p["api_seconds"] is not None]
    api_p50, api_p99 = _quantiles(api)
    released_p50, released_p99 = _quantiles(released)
    pending_p50, pending_p99 = _quantiles(pending)
    mpsflow_p50, mpsflow_p99 = _quantiles(mpsflow)
    reclaim_p50, reclaim_p99 = _quantiles(reclaim)
    return {
        "pods": pods_out,
        "rejected": dict(sorted(cluster.observed.rejected.items())),
        "nodes": nodes_out,
        "events_published": 0,
        "counters": {
            "plans": cluster.observed.plans,
            "configs_refused": cluster.observed.configs_refused,
            "admission_failures": sum(len(kubelet.failed) for kubelet in kubelets.values()),
            "plans_while_idle": plans_while_idle,
            "service_errors": len(error_lines),
        },
        "service_error_lines": error_lines[:SHOWN_ERROR_LINES],
        "latency": {
            "pending_p50": pending_p50,
            "pending_p99": pending_p99,
            "mpsflow_p50": mpsflow_p50,
            "mpsflow_p99": mpsflow_p99,
            "released_p50": released_p50,
            "released_p99": released_p99,
            "reclaim_pods": len(reclaim),
            "reclaim_mpsflow_p50": reclaim_p50,
            "reclaim_mpsflow_p99": reclaim_p99,
            "api_p50": api_p50,
            "api_p99": api_p99,
        },
        "chaos": [record.summary() for record in cluster.chaos],
    }


_METRIC_SUFFIX = re.compile(r"_(total|created|bucket|sum|count)$")


async def scrape_status(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """What each running process's status endpoint says: its /readyz answer, and the mpsflow
    metric families its /metrics serves with how many samples each."""
    scraped: dict[str, dict[str, Any]] = {}
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for name, port in sorted(cluster.status_ports.items()):
            process = cluster.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            base = f"http://127.0.0.1:{port}"
            try:
                async with session.get(f"{base}/readyz") as ready:
                    readiness = f"{ready.status} {(await ready.text()).strip()}"
                async with session.get(f"{base}/metrics") as metrics:
                    text = await metrics.text()
            except (aiohttp.ClientError, TimeoutError) as error:
                scraped[name] = {"url": base, "error": str(error) or type(error).__name__}
                continue
            families = Counter(
                _METRIC_SUFFIX.sub("", line.split("{")[0].split(" ")[0])
                for line in text.splitlines()
                if line.startswith("mpsflow_")
            )
            scraped[name] = {"url": base, "ready": readiness, "metrics": dict(sorted(families.items()))}
    return scraped


_ERROR_MARKS = (" ERROR ", " CRITICAL ", "Traceback (most recent call last)", "was never awaited")


SHOWN_ERROR_LINES = 20


def service_error_lines(logs: Path) -> list[str]:
    """Errors the services logged so far, and tracebacks or warnings Python printed for them (an
    exception in a destructor, a coroutine never awaited), each after its log's name: a healthy run
    has none. The cluster's own log is not counted: the simulation logs what a real kubelet would."""
    return [
        f"{log.stem}: {line}"
        for log in sorted(logs.glob("*.log"))
        if log.name != "cluster.log"
        for line in log.read_text(errors="replace").splitlines()
        if any(mark in line for mark in _ERROR_MARKS)
    ]


def _table(result: dict[str, Any], out: TextIO) -> None:
    print(
        f"\n{'POD':32} {'PHASE':10} {'NODE':10} {'GPU':>3} {'SIZE':>5} {'PENDING':>8} {'MPSFLOW':>8}",
        file=out,
    )
    for key, pod in sorted(result["pods"].items()):
        pending = f"{pod['pending_seconds']:.2f}s" if pod["pending_seconds"] is not None else "-"
        mpsflow = f"{pod['mpsflow_seconds']:.2f}s" if pod["mpsflow_seconds"] is not None else "-"
        gpu = "-" if pod["gpu"] is None else str(pod["gpu"])
        print(
            f"{key:32} {pod['phase']:10} {pod['node'] or '-':10} {gpu:>3} "
            f"{pod['size_gb'] or '-':>4}G {pending:>8} {mpsflow:>8}"
            + (f"  {pod['reason']}" if "reason" in pod else ""),
            file=out,
        )
    for key, reason in result["rejected"].items():
        print(f"{key:32} {'Rejected':10} {reason}", file=out)
    print("\nGPU layouts (GiB; * = used):", file=out)
    for node, layout in result["nodes"].items():
        for index, slices in layout["gpus"].items():
            shown = " ".join(f"{s['size_gb']}{'*' if s['used'] else ''}" for s in slices) or "(no slices)"
            print(f"  {node:10} GPU {index}: {shown}", file=out)
    latency, counters = result["latency"], result["counters"]
    print(
        f"\npending-to-running: p50 {latency['pending_p50']:.2f}s, p99 {latency['pending_p99']:.2f}s; "
        f"of which mpsflow (until the slice was listed to the kubelet): p50 {latency['mpsflow_p50']:.2f}s, "
        f"p99 {latency['mpsflow_p99']:.2f}s; released (gate lifted): p50 {latency['released_p50']:.2f}s, "
        f"p99 {latency['released_p99']:.2f}s; all from the pod's creation in the API, whose create requests "
        f"took p50 {latency['api_p50']:.2f}s, p99 {latency['api_p99']:.2f}s here (webhook included)",
        file=out,
    )
    if latency["reclaim_pods"]:
        print(
            f"{latency['reclaim_pods']} pods waited for a free slice of their GPU to be reclaimed: mpsflow "
            f"p50 {latency['reclaim_mpsflow_p50']:.2f}s, p99 {latency['reclaim_mpsflow_p99']:.2f}s",
            file=out,
        )
    print(
        f"{counters['plans']} plans, {counters['configs_refused']} configs refused, "
        f"{counters['admission_failures']} admission failures, "
        f"{counters['plans_while_idle']} plans while idle, {counters['service_errors']} errors in the "
        "services' logs",
        file=out,
    )


def _write_request_log(api: ApiServer, path: Path) -> None:
    """Every request the API emulator recorded, one JSON object a line (for the RBAC audit)."""
    path.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in api.request_log))


def _compat_view(cluster: Cluster) -> tuple[list[str], dict[str, str | None]]:
    """The compatibility ConfigMap's keys, and each node's `nvidia.com/device-plugin.config` label."""
    namespace, name = COMPAT_CONFIGMAP
    configmaps = [c for c in cluster.api.objects("configmaps", namespace) if c["metadata"]["name"] == name]
    keys = sorted(configmaps[0].get("data") or {}) if configmaps else []
    labels = {
        node["metadata"]["name"]: (node["metadata"].get("labels") or {}).get(DEVICE_PLUGIN_CONFIG_LABEL)
        for node in cluster.api.objects("nodes")
    }
    return keys, labels


async def _show_compat(cluster: Cluster, say: Callable[[str], None]) -> None:
    """Prints the compatibility ConfigMap's keys and the node labels that select them, once every
    node's label names a key of the ConfigMap and no node has a key left over (or after a while)."""
    with anyio.move_on_after(COMPAT_SETTLE_TIMEOUT):
        while True:
            keys, labels = _compat_view(cluster)
            if all(label in keys for label in labels.values()) and len(keys) == len(labels):
                break
            await anyio.sleep(0.1)
    keys, labels = _compat_view(cluster)
    say(f"\ndevice-plugin ConfigMap {'/'.join(COMPAT_CONFIGMAP)}: {len(keys)} keys")
    for key in keys:
        say(f"  {key}")
    for node, label in sorted(labels.items()):
        shown = label if label in keys else f"{label} (NOT in the ConfigMap)"
        say(f"  {node:10} {DEVICE_PLUGIN_CONFIG_LABEL}={shown}")


async def run_demo(
    scenario: Scenario,
    out: TextIO,
    json_out: Path | None = None,
    record: Path | None = None,
    audit_log: Path | None = None,
    compat: bool = False,
    chaos: tuple[Kill, ...] = (),
    replicas: int = 1,
    traces: Path | None = None,
    otlp_endpoint: str | None = None,
    nodes_per_host: int = 0,
) -> int:
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    environment = {TRACES_DIR_ENV: str(traces)} if traces is not None else {}
    if otlp_endpoint is not None:
        environment["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
    async with AsyncExitStack() as stack:
        cluster = await start_cluster(
            scenario,
            stack,
            say,
            compat=compat,
            replicas=replicas,
            environment=environment,
            nodes_per_host=nodes_per_host,
        )
        cluster.chaos = [ChaosRecord(kill) for kill in chaos]
        if audit_log is not None:
            stack.callback(_write_request_log, cluster.api, audit_log)
        async with anyio.create_task_group() as group:
            group.start_soon(_inform, cluster)
            for kubelet in cluster.kubelets.values():
                group.start_soon(kubelet.run)
            for identity, role in (("scheduler", Scheduler), ("daemonset-controller", None)):
                role_api = await api_client(cluster.api.url, identity)
                stack.push_async_callback(role_api.close)
                if role is not None:
                    group.start_soon(role(role_api).run)
                else:
                    group.start_soon(run_agents_where_opted_in, cluster, role_api)
            group.start_soon(_observe, cluster)
            webhook_ready = False
            with anyio.move_on_after(READY_TIMEOUT):
                while not (webhook_ready and cluster.ready()):
                    webhook_ready = webhook_ready or await _webhook_answers(
                        cluster.webhook_url + WEBHOOK_HEALTH_PATH
                    )
                    await anyio.sleep(0.1)
            if not (webhook_ready and cluster.ready()):
                opted_in = cluster.opted_in()
                missing = sorted(
                    (opted_in - set(cluster.observed.reports)) | (opted_in - cluster.observed.watched)
                )
                say(
                    f"not ready within {READY_TIMEOUT:.0f}s: no GPU report or pod-watcher view of "
                    f"{', '.join(missing) or '-'}; admission webhook {'up' if webhook_ready else 'down'}"
                )
                for name, process in cluster.processes.items():
                    if process.poll() is not None:
                        say(f"  {name} exited with status {process.returncode}; the end of its log:")
                        for line in log_tail(cluster.base / "logs" / f"{name}.log"):
                            say(f"    {line}")
                group.cancel_scope.cancel()
                return 1
            _exempt_from_collection()
            say(
                f"cluster ready: {len(scenario.nodes)} nodes ({len(cluster.opted_in())} opted in), "
                f"{sum(len(n.gpus) for n in scenario.nodes)} GPUs, node status every "
                f"{scenario.timing.node_status_period_s:g}s, watch delay {scenario.timing.watch_delay_s:g}s; "
                f"playing {len(scenario.workload)} pods"
            )
            started = time.monotonic()
            group.start_soon(_play, cluster, client.CoreV1Api(cluster.admin), started)
            group.start_soon(_play_chaos, cluster, started, say)
            finished = await _follow(cluster, say, started)
            plans_while_idle = 0
            quiet = 2 * scenario.timing.node_status_period_s
            if finished:
                say(f"  the workload settled; watching {quiet:g}s of quiet for plans")
                plans_before = cluster.observed.plans
                await anyio.sleep(quiet)
                plans_while_idle = cluster.observed.plans - plans_before
            await collect_hosted_kubelets(cluster)
            result = summary(cluster, plans_while_idle)
            for line in result["service_error_lines"]:  # the logs go with the demo
                say(f"  service error: {line}")
            result["status"] = await scrape_status(cluster)
            ready = [
                name for name, seen in result["status"].items() if seen.get("ready", "").startswith("200")
            ]
            say(f"  status endpoints: {len(ready)} of {len(result['status'])} processes ready (/readyz 200)")
            info = await cluster.bus.js.stream_info(subjects.STREAM)
            result["events_published"] = info.state.last_seq
            if record is not None:
                recorded = await cluster.bus.everything(subjects.ALL_EVENTS)
                await anyio.Path(record).write_text("".join(e.model_dump_json() + "\n" for e in recorded))
            group.cancel_scope.cancel()
        _table(result, out)
        if compat:
            await _show_compat(cluster, say)
        if json_out is not None:
            await anyio.Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
            say(f"\nsummary written to {json_out}")
        if traces is not None:
            pod = min(result["pods"], default="NAMESPACE/POD")
            say(f"\ntraces in {traces}; one pod's path: mpsflow trace {pod} --traces {traces}")
        problems = []
        if not finished:
            problems.append(f"the workload did not settle within {scenario.timeout:g}s")
        if cluster.failed():
            problems.append(f"{len(cluster.failed())} valid pod(s) ended Failed")
        if plans_while_idle:
            problems.append(f"{plans_while_idle} plan(s) were published while nothing changed")
        unrecovered = [c.kill for c in cluster.chaos if c.restarted_at is not None and c.recovered_at is None]
        problems += [
            f"{kill.target}, killed at {kill.at:g}s, did not serve its node again" for kill in unrecovered
        ]
        for problem in problems:
            say(f"\n{problem}")
        if not finished:
            for log in sorted((cluster.base / "logs").glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-5:]
                say(f"--- {log.name}\n" + "\n".join(tail))
        return 1 if problems else 0
    return 1


def _exempt_from_collection() -> None:
    """Collect once, then exempt what the demo's process holds from Python's cyclic collector
    (`gc.freeze`), before the workload plays: the API emulator's objects, its watches, informers and
    kubelets. The collector goes through every object in the process whenever enough new ones have
    survived; in a burst of 500 pods that stalled the emulator, its watches and creates with it,
    for 150 ms at a time, where a real API server pauses for well under a millisecond. A frozen
    object is still freed by reference counting when it is replaced."""
    gc.collect()
    gc.freeze()


async def _follow(cluster: Cluster, say: Callable[[str], None], started: float) -> bool:
    """Show progress until nothing is left to happen (True) or the scenario's timeout (False)."""
    last_line, said_at = "", 0.0
    # A large workload is followed less often, and its progress shown once a second at most.
    large = len(cluster.scenario.workload) > LARGE_WORKLOAD
    with anyio.move_on_after(cluster.scenario.timeout):
        while True:
            line = _progress(cluster)
            if line != last_line and (not large or time.monotonic() - said_at >= 1.0):
                say(f"  {time.monotonic() - started:5.1f}s  {line}")
                last_line, said_at = line, time.monotonic()
            if cluster.at_rest():
                return True
            await anyio.sleep(0.5 if large else 0.1)
    return False


def _progress(cluster: Cluster) -> str:
    phases: dict[str, int] = {}
    for key, pod in cluster.pods().items():
        if key in cluster.observed.rejected:
            continue
        phase = (pod.get("status") or {}).get("phase", "Pending")
        spec = pod.get("spec") or {}
        if phase == "Pending":
            # gated: waiting for a slice; released: waiting for the scheduler to see the slice in
            # the node's allocatable; bound: waiting for the kubelet to admit it
            phase = (
                "gated" if spec.get("schedulingGates") else "bound" if spec.get("nodeName") else "released"
            )
        phases[phase] = phases.get(phase, 0) + 1
    counts = ", ".join(f"{count} {phase.lower()}" for phase, count in sorted(phases.items()))
    return (
        f"{len(cluster.requested_at)}/{len(cluster.scenario.workload)} created: {counts or 'none yet'}; "
        f"{len(cluster.observed.rejected)} rejected; {cluster.observed.plans} plans"
    )


def demo_command(
    scenario_path: Path | None,
    json_out: Path | None,
    record: Path | None = None,
    audit_log: Path | None = None,
    compat: bool = False,
    chaos_spec: str | None = None,
    replicas: int = 1,
    traces: Path | None = None,
    otlp_endpoint: str | None = None,
    nodes_per_host_asked: int | None = None,
) -> int:
    """`traces`: where every process writes its spans (default: `$MPSFLOW_TRACES_DIR`, else
    mpsflow-traces in the temporary directory), the span files of an earlier run removed first.
    `nodes_per_host_asked`: `--nodes-per-host`, None to let the scenario decide (`nodes_per_host`)."""
    try:
        scenario = load_scenario(scenario_path)
        chaos = parse_chaos(chaos_spec) if chaos_spec is not None else ()
        check_chaos(chaos, scenario)
        hosted = nodes_per_host(scenario, chaos, nodes_per_host_asked)
    except (ScenarioError, ChaosError) as error:
        print(f"mpsflow demo: {error}", file=sys.stderr)
        return 2
    traces = (traces or default_traces_dir(os.environ, tempfile.gettempdir())).absolute()
    try:
        traces.mkdir(parents=True, exist_ok=True)
        for old in traces.glob(f"{SERVICE_PREFIX}*.jsonl"):
            old.unlink()
    except OSError as error:
        print(f"mpsflow demo: --traces {traces}: {error.strerror or error}", file=sys.stderr)
        return 2
    try:
        return anyio.run(
            _until_signalled,
            scenario,
            json_out,
            record,
            audit_log,
            compat,
            chaos,
            replicas,
            traces,
            otlp_endpoint,
            hosted,
            backend="asyncio",
        )
    except KeyboardInterrupt:
        print("\ninterrupted; everything the demo started has been stopped", file=sys.stderr)
        return 130


async def _until_signalled(
    scenario: Scenario,
    json_out: Path | None,
    record: Path | None,
    audit_log: Path | None,
    compat: bool,
    chaos: tuple[Kill, ...],
    replicas: int,
    traces: Path | None = None,
    otlp_endpoint: str | None = None,
    hosted: int = 0,
) -> int:
    """`run_demo`, stopped cleanly by Ctrl-C (SIGINT, exit status 130) and SIGTERM (143): a demo
    never leaves a process, a daemon or a file behind, however it ends, but the spans its processes
    wrote to `traces`. Both signals reach the event loop as messages: a `KeyboardInterrupt` raised
    wherever the process happens to be could land in a finalizer that the garbage collector runs,
    where Python reports it and goes on."""
    result = 143
    async with anyio.create_task_group() as group:

        async def stop_on_signal() -> None:
            nonlocal result
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for received in signals:
                    result, said = (130, "interrupted") if received == signal.SIGINT else (143, "terminated")
                    print(f"\n{said}; stopping everything the demo started", file=sys.stderr)
                    group.cancel_scope.cancel()
                    return

        async def demo() -> None:
            nonlocal result
            result = await run_demo(
                scenario,
                sys.stdout,
                json_out,
                record,
                audit_log,
                compat,
                chaos,
                replicas,
                traces=traces,
                otlp_endpoint=otlp_endpoint,
                nodes_per_host=hosted,
            )
            group.cancel_scope.cancel()

        group.start_soon(stop_on_signal)
        group.start_soon(demo)
    return result
