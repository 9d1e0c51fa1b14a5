"""Pipeline throughput: a burst of pod creations through the real services, on real NATS, tracing on.

Run: `.venv/bin/python -m benchmarks.pipeline_throughput [--pods 5000] [--nodes 50] [--rounds 3]`.

Each round starts the demo's cluster (`simulation.demo.start_cluster`: a nats-server with
authentication, the API emulator with the admission webhook registered, and the pod watcher, the
planner, the config publisher and the webhook as their own processes, each writing its spans to a
traces directory), with `--nodes` opted-in nodes of two 80 GiB GPUs whose GPU reports the benchmark
publishes itself, as their agents would (no agent runs: the burst is about the control plane).
Then it creates `--pods` slice pods in a burst, from one of two sources (`--source`, both by
default, each on a cluster of its own):

- `api`: through the API, as fast as the emulator takes them, each through the webhook, which
  gates it. This one process serves every request and runs the webhook's calls, so the creation
  rate it reaches bounds everything after it: a real API server, on machines of its own, takes
  thousands a second.
- `watch`: stored at once in the emulator (`ApiServer.store_admitted`), gated as the webhook would
  have, so the watch hands the pod watcher the whole burst as fast as it reads: the capacity of
  the pod watcher to planner path, with the API's creation rate out of the way.

and follows them:

- `created`: pods created per second (for `api`: the client, the emulator and the webhook together);
- `pod watcher`: `PodObserved` events published per second, from its first to its last, and how
  long after the last creation it published the last one;
- `planner`: events folded per second while it had a backlog (its durable consumer's acks), and
  the time from the last observation to a plan that counts every pod (its `mpsflow_pods` gauge);
- `cpu`: seconds of CPU each service process spent during the burst (user + system);
- `peak RSS`: each service process's peak resident memory by the end (its `VmHWM`);
- `spans`: where the time went, by service and span name (count, total and mean ms), from the
  span files.

Figures are printed, never asserted (the machine decides them); `--rounds` repeats the whole run
and prints min / median / max of each rate. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from kubernetes_asyncio import client

from events import subjects
from events.envelope import decode
from events.nodes import GpuReport, NodeGpusReported
from events.pods import PodObserved
from events.vocabulary import DEFAULT_OPT_IN, SLICE_GATE
from services.traceview import TRACES_DIR_ENV, read_spans
from simulation.demo import Cluster, start_cluster
from simulation.scenario import Scenario, ScenarioGpu, ScenarioNode, Timing

A100 = "NVIDIA-A100-SXM4-80GB"
NAMESPACE = "burst"
SOURCES = ("api", "watch")
READY_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 300.0


@dataclass
class Round:
    """What one burst measured."""

    pods: int
    source: str
    created_first: float = 0.0
    created_last: float = 0.0
    observed_at: dict[str, float] = field(default_factory=dict)
    planner_caught_up: float | None = None
    planned_all: float | None = None
    planner_events: int = 0
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    spans: list[tuple[str, str, int, float]] = field(default_factory=list)

    @property
    def created_rate(self) -> float:
        return self.pods / max(1e-9, self.created_last - self.created_first)

    @property
    def watcher_rate(self) -> float:
        times = sorted(self.observed_at.values())
        return len(times) / max(1e-9, times[-1] - times[0]) if len(times) > 1 else 0.0

    @property
    def watcher_lag(self) -> float:
        return max(self.observed_at.values()) - self.created_last if self.observed_at else float("nan")

    @property
    def planner_rate(self) -> float:
        if self.planner_caught_up is None or not self.observed_at:
            return 0.0
        return self.planner_events / max(1e-9, self.planner_caught_up - min(self.observed_at.values()))

    @property
    def plan_after_last_observation(self) -> float:
        if self.planned_all is None or not self.observed_at:
            return float("nan")
        return self.planned_all - max(self.observed_at.values())


def scenario(nodes: int) -> Scenario:
    gpus = [ScenarioGpu(model=A100, memory_mib=81920), ScenarioGpu(model=A100, memory_mib=81920)]
    return Scenario(
        nodes=[
            ScenarioNode(name=f"n{i:04d}", labels={DEFAULT_OPT_IN.key: DEFAULT_OPT_IN.value}, gpus=gpus)
            for i in range(nodes)
        ],
        timing=Timing(),
    )


def report_of(node: ScenarioNode) -> NodeGpusReported:
    """What the node's agent would report before any slice: its GPUs, empty, daemons answering."""
    return NodeGpusReported(
        node=node.name,
        gpus=tuple(
            GpuReport(
                index=index,
                uuid=f"GPU-{node.name}-{index}",
                model=gpu.model,
                memory_mib=gpu.memory_mib,
                compute_capability=gpu.compute_capability,
            )
            for index, gpu in enumerate(node.gpus)
        ),
    )


def pod_manifest(index: int, *, gated: bool = False) -> Any:
    """Slice pod `index` of 1-10 GiB; `gated`: with mpsflow's gate, as the webhook would make it."""
    size = 1 + index % 10
    manifest: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"p{index:05d}", "namespace": NAMESPACE},
        "spec": {
            "hostIPC": True,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "resources": {"limits": {f"nvidia.com/gpu-{size}gb": "1"}},
                }
            ],
        },
    }
    if gated:
        manifest["spec"]["schedulingGates"] = [{"name": SLICE_GATE}]
    return manifest


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory so far (`VmHWM` of /proc/PID/status), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def planner_pods(session: aiohttp.ClientSession, port: int) -> int:
    """The planner's `mpsflow_pods{state="pending"}` (0 before its first plan)."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith('mpsflow_pods{state="pending"}'):
                return int(float(line.split()[-1]))
    return 0


async def poll(condition: Callable[[], bool], period: float) -> None:
    """Return once `condition()` holds, looking every `period` seconds (files and counters of other
    processes and tasks, which signal nothing)."""
    while True:
        if condition():
            return
        await anyio.sleep(period)


def active(cluster: Cluster, name: str) -> bool:
    ready = cluster.base / "logs" / f"{name}.ready"
    return ready.exists() and ready.read_text().strip() == "active"


async def wait_ready(cluster: Cluster) -> None:
    """Every leased service says `active` in its ready file."""
    with anyio.fail_after(READY_TIMEOUT_S):
        await poll(
            lambda: all(active(cluster, n) for n in ("pod-watcher", "planner", "config-publisher")), 0.1
        )


async def one_round(pods: int, nodes: int, concurrency: int, source: str) -> Round:
    measured = Round(pods, source)
    traces = Path(tempfile.mkdtemp(prefix="mpsflow-throughput-traces-"))
    the_scenario = scenario(nodes)
    async with AsyncExitStack() as stack:
        cluster = await start_cluster(
            the_scenario,
            stack,
            lambda line: print(f"  {line}", file=sys.stderr),
            environment={TRACES_DIR_ENV: str(traces)},
        )
        await wait_ready(cluster)
        for node in the_scenario.nodes:
            await cluster.bus.publish(subjects.gpus_subject(node.name), report_of(node))
        core = client.CoreV1Api(cluster.admin)
        observed = await cluster.bus.js.subscribe(subjects.POD_EVENTS, ordered_consumer=True)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        planner_port = cluster.status_ports["planner"]
        services = {
            name: process.pid
            for name, process in cluster.processes.items()
            if name in ("pod-watcher", "planner", "config-publisher", "admission-webhook")
        }
        cpu_before = {name: cpu_seconds(pid) for name, pid in services.items()}
        planner_before = (
            await cluster.bus.js.consumer_info(subjects.STREAM, "planner")
        ).delivered.consumer_seq

        async def collect() -> None:
            async for message in observed.messages:
                event = decode(message.data).event
                if isinstance(event, PodObserved) and event.namespace == NAMESPACE:
                    measured.observed_at.setdefault(event.key, time.monotonic())

        async def create(indexes: range) -> None:
            for index in indexes:
                await core.create_namespaced_pod(NAMESPACE, pod_manifest(index))

        async with anyio.create_task_group() as group:
            group.start_soon(collect)
            measured.created_first = time.monotonic()
            if source == "api":
                async with anyio.create_task_group() as creators:
                    share = -(-pods // concurrency)
                    for start in range(0, pods, share):
                        creators.start_soon(create, range(start, min(pods, start + share)))
            else:
                for index in range(pods):
                    cluster.api.store_admitted(NAMESPACE, pod_manifest(index, gated=True))
            measured.created_last = time.monotonic()
            with anyio.fail_after(SETTLE_TIMEOUT_S):
                await poll(lambda: len(measured.observed_at) >= pods, 0.05)
                while measured.planned_all is None or measured.planner_caught_up is None:
                    info = await cluster.bus.js.consumer_info(subjects.STREAM, "planner")
                    if measured.planner_caught_up is None and not (info.num_pending or info.num_ack_pending):
                        measured.planner_caught_up = time.monotonic()
                        measured.planner_events = info.delivered.consumer_seq - planner_before
                    if measured.planned_all is None and await planner_pods(session, planner_port) >= pods:
                        measured.planned_all = time.monotonic()
                    await anyio.sleep(0.05)
            group.cancel_scope.cancel()
        measured.cpu_seconds = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in services.items()}
        measured.peak_rss_mib = {name: peak_rss_mib(pid) for name, pid in services.items()}
    await anyio.sleep(1)  # the processes flush their last spans as they stop
    spans, _ = read_spans(traces)
    totals: dict[tuple[str, str], list[int]] = defaultdict(list)
    for span in spans:
        totals[(span.service.removeprefix("mpsflow-"), span.name)].append(span.duration_ns)
    measured.spans = sorted(
        ((service, name, len(d), sum(d) / 1e6) for (service, name), d in totals.items()),
        key=lambda row: -row[3],
    )
    return measured


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f} / {statistics.median(values):,.0f} / {max(values):,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_throughput", description=__doc__)
    parser.add_argument("--pods", type=int, default=5000, help="pods created in the burst")
    parser.add_argument("--nodes", type=int, default=50, help="opted-in nodes of two 80 GiB GPUs")
    parser.add_argument("--concurrency", type=int, default=32, help="pods created at once")
    parser.add_argument("--rounds", type=int, default=1, help="whole runs, for min / median / max")
    parser.add_argument(
        "--source", choices=(*SOURCES, "both"), default="both", help="where the burst comes from (above)"
    )
    args = parser.parse_args(argv)
    sources = SOURCES if args.source == "both" else (args.source,)
    rounds = []
    for number, source in ((n, s) for n in range(1, args.rounds + 1) for s in sources):
        print(f"round {number}, {source}: {args.pods} pods on {args.nodes} nodes", flush=True)
        measured = asyncio.run(one_round(args.pods, args.nodes, args.concurrency, source))
        rounds.append(measured)
        print(
            f"  created {measured.created_rate:,.0f} pods/s; "
            f"pod watcher {measured.watcher_rate:,.0f} events/s, "
            f"its last {measured.watcher_lag:.2f} s after the last creation; planner "
            f"{measured.planner_rate:,.0f} events/s ({measured.planner_events} folded), a plan of every pod "
            f"{measured.plan_after_last_observation:.2f} s after the last observation",
            flush=True,
        )
        cpu = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in sorted(measured.cpu_seconds.items()))
        print(f"  cpu during the burst: {cpu}")
        peaks = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in sorted(measured.peak_rss_mib.items()))
        print(f"  peak RSS: {peaks}")
        print("  where the time went (spans, by total):")
        print(f"    {'SERVICE':20} {'SPAN':32} {'COUNT':>7} {'TOTAL MS':>10} {'MEAN MS':>8}")
        for service, name, count, total in measured.spans[:12]:
            print(f"    {service[:20]:20} {name[:32]:32} {count:>7} {total:>10,.0f} {total / count:>8.2f}")
    for source in sources:
        of_source = [r for r in rounds if r.source == source]
        if len(of_source) > 1:
            print(f"{source}, over {len(of_source)} rounds, min / median / max:")
            print(f"  created pods/s {spread([r.created_rate for r in of_source])}")
            print(f"  pod watcher events/s {spread([r.watcher_rate for r in of_source])}")
            print(f"  planner events/s {spread([r.planner_rate for r in of_source])}")
    counts = Counter(len(r.observed_at) == r.pods for r in rounds)
    return 0 if counts[False] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
