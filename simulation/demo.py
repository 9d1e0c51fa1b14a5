"""`mpsflow demo`: the whole system on one machine, around a simulated cluster.

It starts a local nats-server with JetStream, the Kubernetes API emulator, a simulated kubelet
per node (with the device-plugin API over gRPC), a simulated scheduler, and every mpsflow
service as its own process (one node agent per node, over simulated GPUs and a fake MPS control
daemon). Then it plays the scenario's workload, shows progress, prints the pods and GPU layouts,
and writes the summary of contracts/scenario.md. Everything it started is stopped when it ends,
on failure and on Ctrl-C too. The same machinery backs the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
import nats.errors
from kubernetes_asyncio import client

from events import subjects
from events.envelope import UndecodableMessageError, decode
from events.jetstream import EventBus
from events.nodes import NodeGpusReported, NodeObserved
from events.plans import PlanComputed
from events.pods import PodRejected
from node_agent.slices import parse_resource_name
from services.config_publisher.render import DEVICE_PLUGIN_CONFIG_LABEL
from services.kit.kube import api_client
from simulation.apiserver import ApiServer
from simulation.kubelet import RUNS_FOR_ANNOTATION, Kubelet
from simulation.nats_server import LocalNatsServer
from simulation.scenario import Scenario, ScenarioError, load_scenario, simulated_gpus_file
from simulation.scheduler import Scheduler

SERVICES = ("pod-watcher", "planner", "config-publisher")
READY_TIMEOUT = 30.0
FAKE_MPS_CONTROL = f"{sys.executable} -m simulation.fake_mps_control"
COMPAT_CONFIGMAP = ("mpsflow", "nos-device-plugin-configs")
COMPAT_SETTLE_TIMEOUT = 5.0


@dataclass
class Observed:
    """What the demo learned from the bus."""

    reports: dict[str, NodeGpusReported] = field(default_factory=dict)
    watched: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)
    plans: int = 0
    ready: anyio.Event = field(default_factory=anyio.Event)


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
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    observed: Observed = field(default_factory=Observed)
    created_at: dict[str, float] = field(default_factory=dict)

    def pods(self) -> dict[str, dict[str, Any]]:
        return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in self.api.objects("pods")}

    def settled(self) -> bool:
        pods = self.pods()
        for item in self.scenario.workload:
            if item.key in self.observed.rejected:
                continue
            phase = (pods.get(item.key, {}).get("status") or {}).get("phase")
            if phase not in ("Running", "Succeeded"):
                return False
        return len(self.created_at) == len(self.scenario.workload)


def _service_command(service: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "run", service, *extra]


def _start_process(cluster: Cluster, name: str, command: list[str], token: str) -> None:
    logs = cluster.base / "logs"
    logs.mkdir(exist_ok=True)
    environment = {
        **os.environ,
        "MPSFLOW_NATS_URL": cluster.nats.url,
        "MPSFLOW_KUBE_URL": cluster.api.url,
        "MPSFLOW_KUBE_TOKEN": token,
        "PYTHONUNBUFFERED": "1",
    }
    with (logs / f"{name}.log").open("wb") as log_file:
        cluster.processes[name] = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )


def _stop_processes(cluster: Cluster) -> None:
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


async def _observe(cluster: Cluster) -> None:
    subscription = await cluster.bus.js.subscribe(subjects.ALL_EVENTS, ordered_consumer=True)
    try:
        while True:
            try:
                message = await subscription.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                continue
            try:
                event = decode(message.data).event
            except UndecodableMessageError:
                continue
            if isinstance(event, NodeGpusReported):
                cluster.observed.reports[event.node] = event
            elif isinstance(event, NodeObserved):
                cluster.observed.watched.add(event.name)
            elif isinstance(event, PodRejected):
                cluster.observed.rejected[event.key] = f"{event.reason}: {event.message}"
            elif isinstance(event, PlanComputed):
                cluster.observed.plans += 1
            nodes = {node.name for node in cluster.scenario.nodes}
            if set(cluster.observed.reports) >= nodes and cluster.observed.watched >= nodes:
                cluster.observed.ready.set()  # every node agent reported and the pod watcher is watching
    finally:
        with anyio.CancelScope(shield=True):
            await subscription.unsubscribe()


async def _play(cluster: Cluster, core: client.CoreV1Api) -> None:
    start = time.monotonic()
    for item in sorted(cluster.scenario.workload, key=lambda w: w.at):
        await anyio.sleep(max(0.0, start + item.at - time.monotonic()))
        manifest = json.loads(json.dumps(item.pod))
        manifest.setdefault("apiVersion", "v1")
        manifest.setdefault("kind", "Pod")
        manifest["metadata"].setdefault("namespace", item.namespace)
        if item.runs_for is not None:
            manifest["metadata"].setdefault("annotations", {})[RUNS_FOR_ANNOTATION] = str(item.runs_for)
        cluster.created_at[item.key] = time.monotonic()
        await core.create_namespaced_pod(item.namespace, manifest, _request_timeout=10)


async def start_cluster(
    scenario: Scenario, stack: AsyncExitStack, say: Callable[[str], None], *, compat: bool = False
) -> Cluster:
    """Start everything but the workload; returns once every node agent has reported.

    `compat` makes the config publisher also write nebuly's device-plugin ConfigMap
    (`COMPAT_CONFIGMAP`) and point each node's `nvidia.com/device-plugin.config` label at it."""
    base = Path(tempfile.mkdtemp(prefix="mpsflow-", dir="/tmp"))
    stack.callback(shutil.rmtree, base, True)
    nats_server = LocalNatsServer(base / "nats").start()
    stack.callback(nats_server.stop)
    api = ApiServer()
    await api.start()
    stack.push_async_callback(api.stop)
    bus = await EventBus.connect(nats_server.url, source="demo")
    stack.push_async_callback(bus.close)
    admin = await api_client(api.url, "demo")
    stack.push_async_callback(admin.close)
    kubelets: dict[str, Kubelet] = {}
    for node in scenario.nodes:
        kubelet_api = await api_client(api.url, f"kubelet-{node.name}")
        stack.push_async_callback(kubelet_api.close)
        kubelets[node.name] = Kubelet(kubelet_api, node, base / "nodes" / node.name)
        await kubelets[node.name].register_node()
    cluster = Cluster(scenario, base, nats_server, api, bus, admin, kubelets)
    stack.callback(_stop_processes, cluster)
    say(f"started nats-server on {nats_server.url} and the API emulator on {api.url}")
    for service in SERVICES:
        extra = ("--compat-configmap", "/".join(COMPAT_CONFIGMAP)) if compat else ()
        command = _service_command(service, *(extra if service == "config-publisher" else ()))
        _start_process(cluster, service, command, f"mpsflow-{service}")
    for node in scenario.nodes:
        node_dir = base / "nodes" / node.name
        gpus_file = node_dir / "gpus.json"
        gpus_file.write_text(simulated_gpus_file(node))
        kubelet = kubelets[node.name]
        _start_process(
            cluster,
            f"node-agent-{node.name}",
            _service_command(
                "node-agent",
                "--node",
                node.name,
                "--plugin-dir",
                str(kubelet.plugin_dir),
                "--pod-resources-socket",
                str(kubelet.pod_resources_socket),
                "--mps-root",
                str(node_dir / "mps"),
                "--mps-control",
                FAKE_MPS_CONTROL,
                "--simulated-gpus",
                str(gpus_file),
                "--heartbeat",
                "5",
            ),
            f"mpsflow-node-agent-{node.name}",
        )
    say(f"started {len(SERVICES)} services and {len(scenario.nodes)} node agents (logs in {base / 'logs'})")
    return cluster


def summary(cluster: Cluster) -> dict[str, Any]:
    pods_out: dict[str, Any] = {}
    api_pods = cluster.pods()
    for item in cluster.scenario.workload:
        if item.key in cluster.observed.rejected:
            continue
        pod = api_pods.get(item.key, {})
        node = (pod.get("spec") or {}).get("nodeName")
        started = cluster.kubelets[node].started.get(item.key) if node in cluster.kubelets else None
        size = next(
            (
                parse_resource_name(r)
                for c in item.pod["spec"]["containers"]
                for r in (c.get("resources") or {}).get("limits", {})
                | (c.get("resources") or {}).get("requests", {})
                if parse_resource_name(r) is not None
            ),
            None,
        )
        pods_out[item.key] = {
            "phase": (pod.get("status") or {}).get("phase", "Pending"),
            "node": node,
            "gpu": started.gpu if started else None,
            "size_gb": size,
            "env": dict(sorted(started.envs.items())) if started else {},
            "pending_seconds": round(started.started_at - cluster.created_at[item.key], 3)
            if started
            else None,
        }
    nodes_out = {
        name: {
            "gpus": {
                str(g.index): [{"size_gb": s.size_gb, "used": s.used} for s in g.slices] for g in report.gpus
            }
        }
        for name, report in sorted(cluster.observed.reports.items())
    }
    return {
        "pods": pods_out,
        "rejected": dict(sorted(cluster.observed.rejected.items())),
        "nodes": nodes_out,
        "events_published": 0,
    }


def _table(result: dict[str, Any], out: TextIO) -> None:
    print(f"\n{'POD':32} {'PHASE':10} {'NODE':10} {'GPU':>3} {'SIZE':>5} {'PENDING':>8}", file=out)
    for key, pod in sorted(result["pods"].items()):
        pending = f"{pod['pending_seconds']:.2f}s" if pod["pending_seconds"] is not None else "-"
        gpu = "-" if pod["gpu"] is None else str(pod["gpu"])
        print(
            f"{key:32} {pod['phase']:10} {pod['node'] or '-':10} {gpu:>3} "
            f"{pod['size_gb'] or '-':>4}G {pending:>8}",
            file=out,
        )
    for key, reason in result["rejected"].items():
        print(f"{key:32} {'Rejected':10} {reason}", file=out)
    print("\nGPU layouts (GiB; * = used):", file=out)
    for node, layout in result["nodes"].items():
        for index, slices in layout["gpus"].items():
            shown = " ".join(f"{s['size_gb']}{'*' if s['used'] else ''}" for s in slices) or "(no slices)"
            print(f"  {node:10} GPU {index}: {shown}", file=out)
    waits = [p["pending_seconds"] for p in result["pods"].values() if p["pending_seconds"] is not None]
    if waits:
        p99 = statistics.quantiles(waits, n=100)[98] if len(waits) > 1 else waits[0]
        print(
            f"\npending-to-running: p50 {statistics.median(waits):.2f}s, p99 {p99:.2f}s "
            f"over {len(waits)} pods",
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
) -> int:
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    async with AsyncExitStack() as stack:
        cluster = await start_cluster(scenario, stack, say, compat=compat)
        if audit_log is not None:
            stack.callback(_write_request_log, cluster.api, audit_log)
        settled = False
        async with anyio.create_task_group() as group:
            for kubelet in cluster.kubelets.values():
                group.start_soon(kubelet.run)
            scheduler_api = await api_client(cluster.api.url, "scheduler")
            stack.push_async_callback(scheduler_api.close)
            group.start_soon(Scheduler(scheduler_api).run)
            group.start_soon(_observe, cluster)
            with anyio.move_on_after(READY_TIMEOUT):
                await cluster.observed.ready.wait()
            names = {n.name for n in scenario.nodes}
            missing = sorted((names - set(cluster.observed.reports)) | (names - cluster.observed.watched))
            if missing:
                say(f"no GPU report or pod-watcher view within {READY_TIMEOUT:.0f}s of: {', '.join(missing)}")
                for name, process in cluster.processes.items():
                    if process.poll() is not None:
                        say(f"  {name} exited with status {process.returncode}")
                group.cancel_scope.cancel()
                return 1
            say(
                f"cluster ready: {len(scenario.nodes)} nodes, "
                f"{sum(len(n.gpus) for n in scenario.nodes)} GPUs; "
                f"playing {len(scenario.workload)} pods"
            )
            group.start_soon(_play, cluster, client.CoreV1Api(cluster.admin))
            started = time.monotonic()
            last_line = ""
            with anyio.move_on_after(scenario.timeout):
                while True:
                    line = _progress(cluster)
                    if line != last_line:
                        say(f"  {time.monotonic() - started:5.1f}s  {line}")
                        last_line = line
                    if cluster.settled():
                        settled = True
                        break
                    await anyio.sleep(0.1)
            result = summary(cluster)
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
        if not settled:
            say(f"\nthe workload did not settle within {scenario.timeout:.0f}s")
            for log in sorted((cluster.base / "logs").glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-5:]
                say(f"--- {log.name}\n" + "\n".join(tail))
        return 0 if settled else 1
    return 1


def _progress(cluster: Cluster) -> str:
    phases: dict[str, int] = {}
    for key, pod in cluster.pods().items():
        if key in cluster.observed.rejected:
            continue
        phase = (pod.get("status") or {}).get("phase", "Pending")
        phases[phase] = phases.get(phase, 0) + 1
    counts = ", ".join(f"{count} {phase.lower()}" for phase, count in sorted(phases.items()))
    return (
        f"{len(cluster.created_at)}/{len(cluster.scenario.workload)} created: {counts or 'none yet'}; "
        f"{len(cluster.observed.rejected)} rejected; {cluster.observed.plans} plans"
    )


def demo_command(
    scenario_path: Path | None,
    json_out: Path | None,
    record: Path | None = None,
    audit_log: Path | None = None,
    compat: bool = False,
) -> int:
    try:
        scenario = load_scenario(scenario_path)
    except ScenarioError as error:
        print(f"mpsflow demo: {error}", file=sys.stderr)
        return 2
    try:
        return anyio.run(
            run_demo, scenario, sys.stdout, json_out, record, audit_log, compat, backend="asyncio"
        )
    except KeyboardInterrupt:
        print("\ninterrupted; everything the demo started has been stopped", file=sys.stderr)
        return 130
