"""A node host: the kubelets and node services of many simulated nodes in one process.

`python -m simulation.node_host --spec FILE [--status-address HOST:PORT]` runs, in one asyncio loop,
the simulated kubelet (`simulation.kubelet`), the MPS daemon keeper (`mpsflow run mps-daemons`) and
the node agent (`mpsflow run node-agent`) of every node FILE lists (`HostSpec`). The keeper and the
agent are the production services: their options are parsed by the production CLI's parser from
the command line the demo would give their own processes, and they run through
`services.cli.serve_mps_daemons` / `serve_node_agent`, the very wiring of `mpsflow run`:
`DaemonKeeper`, `SliceDevicePlugin` serving the node's kubelet over gRPC on its device-plugin
socket, `LinkServer` on the node's link socket, and `NodeAgent` reaching it through `RemotePlugin`
and the kubelet through its pod-resources socket, with the node's own NATS identity and
credentials. Only the GPUs are simulated (`FakeNvml`, one per node, from the node's GPU file) and
the MPS control daemons (`simulation.fake_mps_inprocess`: the subprocess fake's command semantics,
in this process).

Why: the demo gives each simulated node two Python processes (agent and keeper) and each GPU one
more (the fake daemon, and one per control command), which is what a real node has but what two
cores cannot run for 200 nodes of 8 GPUs: the interpreters alone take more memory and start-up CPU
than the machine has, and the agents do not report within the demo's 30 s. Nor do 200 kubelets fit
in the demo's own process beside the API emulator: answering every agent's look at its kubelet
(two gRPC calls on a fresh channel) took most of its core. So each node's kubelet lives in its
node's host, as a real kubelet lives on its node, and the host's agents talk to it over the same
unix sockets as before. Every node keeps its own kubelet, agent, keeper, sockets, files, bus
connection and identity; the nodes of a host share the interpreter, the event loop, its worker
threads and, for their kubelets, the HTTP connections to the API (`kubelet_connections`; each
kubelet still authenticates as itself). Their gRPC servers are not shared: one `grpc.aio` server
can listen on many unix sockets, but a call does not say which socket it came on (its peer is
`unix:` whatever the socket), and a kubelet must answer for its own node.

What a real node has that a host does not: its own CPU (a host's nodes queue behind each other for
one core, so what a node does takes longer here, never shorter), and processes apart (a keeper
outlives its agent's crash on a real node; in a host both live as long as the host, so the demo
never kills agents in a host: `simulation.demo` runs one process per node wherever `--chaos` kills
a node agent).

The DaemonSet side is the demo's: the kubelets register their nodes and run from the host's start,
but a host starts no agent until told, over its control socket (one JSON request per connection,
one JSON reply: `{"op": "start", "node": N}` starts the node's keeper, if it is not running, then
its agent; `{"op": "stop", "node": N}` stops the agent, as SIGTERM stops its process, and answers
once it has stopped, leaving the keeper and its daemons; `{"op": "nodes"}` lists the nodes with an
agent running; `{"op": "kubelets"}` gives what every kubelet started and failed, for the demo's
summary). The keeper runs from the node's first start to the host's end, as `mps-daemons`, a
DaemonSet updated `OnDelete`, keeps running on a node that opted out.

An agent or keeper that fails is logged with its traceback (the demo counts it as a service error)
and leaves the other nodes running; the next start starts it again. Log lines carry the node they
come from (`[node]`).
"""

from __future__ import annotations

import argparse
import contextvars
import copy
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
from anyio import CancelScope
from anyio.abc import SocketStream, TaskGroup
from kubernetes_asyncio import client
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from node_agent.nvml import NvmlInventory
from services.cli import build_parser, serve_mps_daemons, serve_node_agent
from services.kit.kube import client_over
from services.kit.lifecycle import close_all, run_service
from services.kit.listen import ListenAddress
from services.kit.status import Status
from simulation.fake_mps_inprocess import InProcessDaemons
from simulation.fake_nvml import FakeNvml
from simulation.kubelet import Kubelet, StartedPod
from simulation.scenario import ScenarioNode

log = logging.getLogger(__name__)

SERVICE = "mpsflow-node-host"
TRACED_AS = "mpsflow-node-agent"
"""The service name of the host's spans: those of its agents (the keepers make none)."""
CONTROL_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0
THREADS_PER_NODE = 2
"""Worker threads a host adds per node to anyio's 40: each agent keeps one waiting for NVML's Xid
events (a second at a time), as its own process would, and the rest must not queue behind them."""
BASE_THREADS = 40

current_node: contextvars.ContextVar[str] = contextvars.ContextVar("current_node", default="-")
"""The node whose keeper or agent the running task belongs to (inherited by the tasks it starts)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostedNode(_Strict):
    """One node of a host: the node as the scenario has it (for its kubelet), where its kubelet's
    files are (`root`), its GPUs (a `FakeNvml` JSON file) and the options of its two services, as
    `mpsflow run mps-daemons` and `mpsflow run node-agent` would take them."""

    node: ScenarioNode
    root: Path
    gpus_file: Path
    keeper: tuple[str, ...]
    agent: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.node.name


class HostSpec(_Strict):
    control_socket: Path
    kube_url: str
    node_status_period_s: float
    nodes: tuple[HostedNode, ...]


class KubeletState(_Strict):
    """What one kubelet did, for the demo's summary: the pods it started and those it failed."""

    started: dict[str, StartedPod] = {}
    failed: dict[str, str] = {}


KUBELET_STATES = TypeAdapter(dict[str, KubeletState])


class ControlRequest(_Strict):
    op: Literal["start", "stop", "nodes", "kubelets"]
    node: str | None = None


class HostStatus(Status):
    """The host's `/healthz` and `/readyz`: ready once it takes requests, unhealthy while any of its
    nodes' services has a stale loop (each node's keeper and agent have a `Status` of their own)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: dict[str, Status] = {}

    def part(self, name: str) -> Status:
        status = self.parts[name] = Status()
        return status

    def stale(self) -> list[str]:
        return [*super().stale(), *(f"{name}: {s}" for name, p in self.parts.items() for s in p.stale())]


@dataclass
class _Node:
    spec: HostedNode
    nvml: FakeNvml
    kubelet: Kubelet
    keeper: CancelScope | None = None
    agent: CancelScope | None = None
    agent_stopped: anyio.Event = field(default_factory=anyio.Event)


class NodeHost:
    """Runs the keepers and agents of `spec`'s nodes, as the control socket asks."""

    def __init__(self, spec: HostSpec, status: HostStatus) -> None:
        self.spec = spec
        self.status = status
        self.daemons = InProcessDaemons()
        self.nodes: dict[str, _Node] = {}
        self._group: TaskGroup | None = None
        self._parser = build_parser()

    async def run(self) -> None:
        """Register the nodes and run their kubelets, then take requests until cancelled."""
        _log_node_names()
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(
            limiter.total_tokens, BASE_THREADS + THREADS_PER_NODE * len(self.spec.nodes)
        )
        socket_path = self.spec.control_socket
        socket_path.unlink(missing_ok=True)
        connections = kubelet_connections(self.spec.kube_url)
        self.nodes = {
            node.name: _Node(
                node,
                FakeNvml.from_json(node.gpus_file, node_name=node.name),
                Kubelet(
                    client_as(connections, f"kubelet-{node.name}"),
                    node.node,
                    node.root,
                    self.spec.node_status_period_s,
                ),
            )
            for node in self.spec.nodes
        }
        try:
            await register_nodes(node.kubelet for node in self.nodes.values())
            async with anyio.create_task_group() as group:
                self._group = group
                for node in self.nodes.values():
                    group.start_soon(self._run_kubelet, node)
                listener = await anyio.create_unix_listener(socket_path)
                group.start_soon(listener.serve, self._answer)
                self.status.ready(f"hosting {len(self.nodes)} nodes")
                log.info("node host of %d nodes takes requests on %s", len(self.nodes), socket_path)
        finally:
            self.daemons.close()
            socket_path.unlink(missing_ok=True)
            await close_all(connections.close)

    async def _run_kubelet(self, node: _Node) -> None:
        current_node.set(node.spec.name)
        await node.kubelet.run()

    async def start(self, name: str) -> None:
        """The node's keeper (once), then its agent (unless it runs)."""
        node = self.nodes[name]
        if node.keeper is None:
            node.keeper = CancelScope()
            self._spawn(node, node.keeper, "mps-daemons", serve_mps_daemons, node.spec.keeper)
        if node.agent is None:
            node.agent = CancelScope()
            node.agent_stopped = anyio.Event()
            self._spawn(node, node.agent, "node-agent", serve_node_agent, node.spec.agent)

    async def stop(self, name: str) -> None:
        """Stop the node's agent as SIGTERM stops its process, and wait until it has stopped."""
        node = self.nodes[name]
        if node.agent is None:
            return
        node.agent.cancel()
        with anyio.move_on_after(STOP_GRACE_S):
            await node.agent_stopped.wait()
        if not node.agent_stopped.is_set():
            log.warning("the agent of %s has not stopped within %.0fs", name, STOP_GRACE_S)
        node.agent = None

    def _spawn(
        self,
        node: _Node,
        scope: CancelScope,
        service: str,
        serve: Callable[..., Awaitable[None]],
        options: Sequence[str],
    ) -> None:
        assert self._group is not None
        args = self._parser.parse_args(["run", service, *options])
        status = self.status.part(f"{service}/{node.spec.name}")
        mps = self.daemons.control()

        async def run() -> None:
            current_node.set(node.spec.name)
            with scope:
                try:
                    await serve(args, NvmlInventory(node.nvml), status, mps)
                except Exception:
                    log.exception("%s of %s stopped with an error", service, node.spec.name)
            # Gone: the next start starts it again, as a DaemonSet's pod is started again.
            if service == "node-agent":
                node.agent_stopped.set()
                if node.agent is scope:
                    node.agent = None
            elif node.keeper is scope:
                node.keeper = None

        self._group.start_soon(run, name=f"{service} {node.spec.name}")

    async def _answer(self, stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(CONTROL_TIMEOUT_S):
                    request = ControlRequest.model_validate_json(await _read_line(stream))
                    reply = await self._reply(request)
            except (TimeoutError, ValidationError, ValueError, anyio.EndOfStream) as error:
                reply = {"ok": False, "error": str(error) or type(error).__name__}
            try:
                await stream.send(json.dumps(reply).encode() + b"\n")
            except (anyio.BrokenResourceError, OSError):
                log.warning("the control request's client went away before the reply")

    async def _reply(self, request: ControlRequest) -> dict[str, object]:
        if request.op == "nodes":
            return {"ok": True, "nodes": sorted(n for n, node in self.nodes.items() if node.agent)}
        if request.op == "kubelets":
            states = {
                name: KubeletState(started=node.kubelet.started, failed=node.kubelet.failed)
                for name, node in self.nodes.items()
            }
            return {"ok": True, "kubelets": KUBELET_STATES.dump_python(states, mode="json")}
        if request.node not in self.nodes:
            return {"ok": False, "error": f"this host runs no node {request.node!r}"}
        if request.op == "start":
            await self.start(request.node)
        else:
            await self.stop(request.node)
        return {"ok": True}


def kubelet_connections(url: str) -> client.ApiClient:
    """The HTTP connections simulated kubelets share (with no limit on how many: each kubelet keeps
    a watch open). A kubernetes-asyncio client makes an SSL context of its own, 40 ms of CPU loading
    the system's certificates even for plain http: 200 kubelets of their own took 8 s to make."""
    configuration = client.Configuration()
    configuration.host = url
    configuration.connection_pool_maxsize = 0  # aiohttp: no limit
    return client_over(configuration)


def client_as(connections: client.ApiClient, token: str) -> client.ApiClient:
    """A client that authenticates as `token` (its own identity in the API's request log and for
    its faults) over `connections`, whose owner closes them."""
    configuration = copy.copy(connections.configuration)
    configuration.api_key = {"BearerToken": token}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    own = copy.copy(connections)
    own.configuration = configuration
    own.default_headers = dict(connections.default_headers)
    return own


REGISTERING_AT_ONCE = 20
"""Kubelets registering their nodes at the same time, as a cluster's nodes boot."""


async def register_nodes(kubelets: Iterable[Kubelet]) -> None:
    """Each kubelet registers its node, `REGISTERING_AT_ONCE` at a time."""
    registering = anyio.Semaphore(REGISTERING_AT_ONCE)

    async def register(kubelet: Kubelet) -> None:
        async with registering:
            await kubelet.register_node()

    async with anyio.create_task_group() as group:
        for kubelet in kubelets:
            group.start_soon(register, kubelet)


async def _read_line(stream: SocketStream) -> bytes:
    received = bytearray()
    while not received.endswith(b"\n"):
        received += await stream.receive()
    return bytes(received)


class _NodeName(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.node = current_node.get()
        return True


def _log_node_names() -> None:
    """Every log line of the host names its node, after the logger's name."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NodeName())
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {SERVICE} %(levelname)s %(name)s [%(node)s]: %(message)s")
        )


async def ask(control_socket: Path, request: dict[str, str]) -> dict[str, Any]:
    """Send one request to a host's control socket and return its reply (the demo's side; it
    bounds the wait itself)."""
    async with await anyio.connect_unix(control_socket) as stream:
        await stream.send(json.dumps(request).encode() + b"\n")
        reply: dict[str, Any] = json.loads(await _read_line(stream))
        return reply


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.node_host")
    parser.add_argument("--spec", type=Path, required=True, help="the host's nodes (JSON, HostSpec)")
    parser.add_argument(
        "--status-address", type=ListenAddress.parse, help="HOST:PORT or fd:N: /healthz, /readyz, /metrics"
    )
    args = parser.parse_args(argv)
    try:
        spec = HostSpec.model_validate_json(args.spec.read_text())
    except (OSError, ValidationError) as error:
        print(f"node host: {args.spec}: {error}", file=sys.stderr)
        return 2
    status = HostStatus()
    run_service(TRACED_AS, NodeHost(spec, status).run, status=status, status_address=args.status_address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
