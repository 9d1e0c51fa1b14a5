"""The pod watcher at cluster scale: time to its first complete view, and its memory.

Run: `.venv/bin/python -m benchmarks.pod_watcher_scale [--pods N]` (no extra dependencies).

Starts, as the demo does (`simulation.demo.start_cluster`), a local nats-server in operator mode,
bootstrapped, and the Kubernetes API emulator (`simulation.apiserver`) in this process, then writes
`--nodes` opted-in GPU nodes and `--pods` pods (each as a real API server serves a Job's pod,
about 4.5 KiB of JSON) through the emulator's HTTP API: a quarter of them plain pods (no slice),
the rest slice pods, of which 40 % wait gated, 50 % run bound to a node and 10 % have finished
(Succeeded, as completed Jobs leave them). Only then it starts
`mpsflow run pod-watcher` as a process of its own, with its own credentials and a `--ready-file`,
and prints:

- the seconds from the watcher's start to its first complete view: its ready file says `active`
  once it has listed every pod and published the level of every slice pod
  (`PodWatcherService.on_caught_up`, once JetStream acknowledged every publish);
- the CPU seconds (user + system) the watcher spent until then, and its peak resident memory
  (`VmHWM` of /proc/PID/status) then;
- the list requests it made for pods (pages) and the pod levels on the bus (last per subject);
- the watch path: `--changes` slice pods finish (their status patched to Succeeded) and the seconds
  until every one of them is told on the bus, then the watcher's peak memory and CPU at the end.

It asserts nothing about timing: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats

from events import access, subjects
from events.bootstrap import BusLimits, bootstrap
from events.jetstream import EventBus
from events.pods import PodObserved, PodRejected
from events.vocabulary import SLICE_GATE
from simulation.apiserver import ApiServer
from simulation.nats_server import LocalNatsServer

OPT_IN = ("nos.nebuly.com/gpu-partitioning", "mps")
NAMESPACES = 20
SIZES = (5, 10, 10, 20, 40)
WRITERS = 16
READY_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Usage:
    """What /proc says of a process: peak and current resident memory, CPU seconds."""

    peak_rss_bytes: int
    rss_bytes: int
    cpu_s: float


def usage(pid: int) -> Usage:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].split() for line in status if ":" in line}
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_name = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(after_name[11]) + int(after_name[12])) / ticks  # utime, stime: fields 14 and 15
    return Usage(int(fields["VmHWM"][0]) * 1024, int(fields["VmRSS"][0]) * 1024, cpu)


def node(index: int) -> dict[str, Any]:
    labels = {
        OPT_IN[0]: OPT_IN[1],
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
        "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.memory": "81920",
    }
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"gpu-{index:04d}", "labels": labels}}


def pod(index: int, nodes: int) -> tuple[str, dict[str, Any]]:
    """Pod `index` of the workload and its namespace: plain, or a slice pod gated, running or
    finished. Each carries what a real API server serves of a Job's pod (defaulted fields, the
    service account volume, managedFields, a running pod's status), about 4.5 KiB of JSON."""
    namespace = f"team-{index % NAMESPACES:02d}"
    name = f"pod-{index:06d}"
    job = f"job-{index // 4:06d}"
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/name": f"app-{index % 97}",
            "batch.kubernetes.io/job-name": job,
            "controller-uid": f"{index:08x}-1f0e-4c4e-9a55-5b3c3d7c2a10",
            "job-name": job,
        },
        "annotations": {
            "batch.kubernetes.io/job-tracking": "",
            "team.example.com/owner": f"owner-{index % 13}",
        },
        "ownerReferences": [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": job,
                "uid": f"{index // 4:08x}-6a1b-4a0e-8d3e-2f9c1c0b7d21",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
        "finalizers": ["batch.kubernetes.io/job-tracking"],
        "managedFields": [
            {
                "manager": "kube-controller-manager",
                "operation": "Update",
                "apiVersion": "v1",
                "time": "2025-01-01T00:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": {
                        "f:finalizers": {".": {}, 'v:"batch.kubernetes.io/job-tracking"': {}},
                        "f:labels": {".": {}, "f:controller-uid": {}, "f:job-name": {}},
                        "f:ownerReferences": {".": {}, 'k:{"uid":"0"}': {}},
                    },
                    "f:spec": {
                        "f:containers": {'k:{"name":"main"}': {".": {}, "f:env": {}, "f:image": {}}},
                        "f:dnsPolicy": {},
                        "f:restartPolicy": {},
                        "f:schedulerName": {},
                        "f:terminationGracePeriodSeconds": {},
                    },
                },
            },
            {
                "manager": "kubelet",
                "operation": "Update",
                "apiVersion": "v1",
                "time": "2025-01-01T00:00:05Z",
                "fieldsType": "FieldsV1",
                "subresource": "status",
                "fieldsV1": {
                    "f:status": {
                        "f:conditions": {'k:{"type":"Ready"}': {".": {}, "f:status": {}}},
                        "f:containerStatuses": {},
                        "f:hostIP": {},
                        "f:phase": {},
                        "f:podIP": {},
                        "f:startTime": {},
                    }
                },
            },
        ],
    }
    container: dict[str, Any] = {
        "name": "main",
        "image": "registry.example.com/team/train:1.4.2",
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "train"],
        "args": ["--epochs", "10", "--dataset", f"s3://data/{index}"],
        "env": [
            {"name": "EPOCHS", "value": "10"},
            {
                "name": "POD_NAME",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
            },
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "volumeMounts": [
            {
                "name": "kube-api-access-x7k2p",
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "readOnly": True,
            }
        ],
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "restartPolicy": "Never",
        "dnsPolicy": "ClusterFirst",
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
        "schedulerName": "default-scheduler",
        "securityContext": {},
        "serviceAccount": "default",
        "serviceAccountName": "default",
        "terminationGracePeriodSeconds": 30,
        "tolerations": [
            {
                "key": f"node.kubernetes.io/{taint}",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }
            for taint in ("not-ready", "unreachable")
        ],
        "volumes": [
            {
                "name": "kube-api-access-x7k2p",
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                                    }
                                ]
                            }
                        },
                    ],
                },
            }
        ],
    }
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    running = {"phase": "Running", **_status(index, nodes, ready=True)}
    if index % 4 == 3:
        spec["nodeName"] = f"cpu-{index % 50:02d}"
        body["status"] = running
        return namespace, body
    container["resources"]["limits"] = {f"nvidia.com/gpu-{SIZES[index % len(SIZES)]}gb": "1"}
    spec["hostIPC"] = True
    kind = index % 10
    if kind < 4:
        spec["schedulingGates"] = [{"name": SLICE_GATE}]
    else:
        spec["nodeName"] = f"gpu-{index % nodes:04d}"
        body["status"] = (
            {"phase": "Succeeded", **_status(index, nodes, ready=False)} if kind == 9 else running
        )
    return namespace, body


def _status(index: int, nodes: int, *, ready: bool) -> dict[str, Any]:
    at = "2025-01-01T00:00:05Z"
    flag = "True" if ready else "False"
    state = (
        {"running": {"startedAt": at}}
        if ready
        else {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": at, "finishedAt": at}}
    )
    return {
        "conditions": [
            {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": at}
            for kind, status in (
                ("PodReadyToStartContainers", flag),
                ("Initialized", "True"),
                ("Ready", flag),
                ("ContainersReady", flag),
                ("PodScheduled", "True"),
            )
        ],
        "hostIP": f"10.0.{index % nodes // 250}.{index % 250}",
        "hostIPs": [{"ip": f"10.0.{index % nodes // 250}.{index % 250}"}],
        "podIP": f"10.244.{index // 250 % 250}.{index % 250}",
        "podIPs": [{"ip": f"10.244.{index // 250 % 250}.{index % 250}"}],
        "qosClass": "Burstable",
        "startTime": at,
        "containerStatuses": [
            {
                "name": "main",
                "image": "registry.example.com/team/train:1.4.2",
                "imageID": "registry.example.com/team/train@sha256:" + "3f" * 32,
                "containerID": f"containerd://{index:064x}",
                "ready": ready,
                "restartCount": 0,
                "started": ready,
                "state": state,
                "lastState": {},
            }
        ],
    }


async def write_all(url: str, requests: list[tuple[str, dict[str, Any]]]) -> None:
    """POSTs every (path, body), `WRITERS` at a time; any refusal ends the benchmark."""
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)

    async def writer(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            path, body = queue.get_nowait()
            async with session.post(url + path, json=body) as response:
                if response.status != 201:
                    raise SystemExit(f"POST {path}: {response.status} {await response.text()}")

    headers = {"Authorization": "Bearer benchmark"}
    async with aiohttp.ClientSession(headers=headers) as session:
        await asyncio.gather(*(writer(session) for _ in range(WRITERS)))


async def patch_all(url: str, paths: list[str], patch: dict[str, Any]) -> None:
    headers = {"Authorization": "Bearer benchmark", "Content-Type": "application/merge-patch+json"}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)

    async def writer(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            path = queue.get_nowait()
            async with session.patch(url + path, data=json.dumps(patch)) as response:
                if response.status != 200:
                    raise SystemExit(f"PATCH {path}: {response.status} {await response.text()}")

    async with aiohttp.ClientSession(headers=headers) as session:
        await asyncio.gather(*(writer(session) for _ in range(WRITERS)))


def _said(ready_file: Path, process: subprocess.Popen[bytes], log: Path) -> bool:
    """True once the watcher's ready file says `active`; ends the benchmark if the watcher exited."""
    if process.poll() is not None:
        raise SystemExit(f"the pod watcher exited ({process.returncode}):\n{log.read_text()[-3000:]}")
    return ready_file.exists() and ready_file.read_text().strip() == "active"


async def wait_active(ready_file: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if _said(ready_file, process, log):
            return
        await asyncio.sleep(0.02)
    raise SystemExit(f"the pod watcher was not active within {READY_TIMEOUT_S:.0f} s")


def start_watcher(base: Path, nats_server: LocalNatsServer, api_url: str) -> subprocess.Popen[bytes]:
    """`mpsflow run pod-watcher` with its own credentials, its ready file and log in `base`."""
    credentials = nats_server.options_as(access.SERVICE_ROLES["pod-watcher"]).credentials
    command = [
        sys.executable, "-m", "services.cli", "run", "pod-watcher",
        "--nats-creds", str(credentials),
        "--ready-file", str(base / "pod-watcher.ready"),
        "--status-address", "127.0.0.1:0",  # not asked here: any free port the process binds
    ]  # fmt: skip
    environment = {
        **os.environ,
        "MPSFLOW_NATS_URL": nats_server.url,
        "MPSFLOW_KUBE_URL": api_url,
        "MPSFLOW_KUBE_TOKEN": "mpsflow-pod-watcher",
        "POD_NAME": "pod-watcher",
    }
    with (base / "pod-watcher.log").open("ab") as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)


def _mib(count: int) -> str:
    return f"{count / 2**20:.0f} MiB"


async def run(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="mpsflow-bench-watcher-", dir="/tmp"))
    nats_server = LocalNatsServer(base / "nats", secured=True).start()
    api = ApiServer(history_limit=args.pods + args.changes + args.nodes + 100)
    process: subprocess.Popen[bytes] | None = None
    try:
        await api.start()
        await bootstrap(nats_server.options_as_admin(), BusLimits())
        print(
            f"== the pod watcher against {args.pods} pods on {args.nodes} nodes "
            f"({os.cpu_count()} CPUs; other work on the machine shows in the figures) =="
        )
        started = time.perf_counter()
        await write_all(api.url, [("/api/v1/nodes", node(n)) for n in range(args.nodes)])
        workload = [pod(i, args.nodes) for i in range(args.pods)]
        await write_all(api.url, [(f"/api/v1/namespaces/{ns}/pods", body) for ns, body in workload])
        slice_pods = [body for _, body in workload if "hostIPC" in body["spec"]]
        finished = sum(1 for body in slice_pods if (body.get("status") or {}).get("phase") == "Succeeded")
        print(
            f"  written in {time.perf_counter() - started:.1f} s: {len(slice_pods)} slice pods "
            f"({finished} of them Succeeded), {args.pods - len(slice_pods)} plain pods"
        )

        started = time.perf_counter()
        process = start_watcher(base, nats_server, api.url)
        await wait_active(base / "pod-watcher.ready", process, base / "pod-watcher.log")
        view_s = time.perf_counter() - started
        listed = usage(process.pid)
        pages = sum(
            1
            for record in api.request_log
            if (record.verb, record.resource, record.identity) == ("list", "pods", "mpsflow-pod-watcher")
        )
        print(f"  first complete view           {view_s:.1f} s after the start (ready file: active)")
        print(f"  CPU until then                {listed.cpu_s:.1f} s")
        print(f"  peak RSS then                 {_mib(listed.peak_rss_bytes)} (RSS {_mib(listed.rss_bytes)})")
        print(f"  pod list requests             {pages}")

        bus = await EventBus.connect(nats_server.options_as_admin(), source="benchmark")
        try:
            levels = await bus.current_levels(subjects.POD_EVENTS)
        finally:
            await bus.close()
        kinds = {
            kind: sum(1 for e in levels if isinstance(e.event, kind)) for kind in (PodObserved, PodRejected)
        }
        phases: dict[str, int] = {}
        for envelope in levels:
            if isinstance(envelope.event, PodObserved):
                phases[envelope.event.phase] = phases.get(envelope.event.phase, 0) + 1
        print(
            f"  pod levels on the bus         {kinds[PodObserved]} PodObserved "
            f"{dict(sorted(phases.items()))}, {kinds[PodRejected]} PodRejected"
        )

        if args.changes:
            await watch_phase(args, api, nats_server, workload)
        end = usage(process.pid)
        print(f"  peak RSS at the end           {_mib(end.peak_rss_bytes)} (RSS {_mib(end.rss_bytes)})")
        print(f"  CPU at the end                {end.cpu_s:.1f} s")
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        await api.stop()
        nats_server.stop()
        shutil.rmtree(base, ignore_errors=True)


async def watch_phase(
    args: argparse.Namespace,
    api: ApiServer,
    nats_server: LocalNatsServer,
    workload: list[tuple[str, dict[str, Any]]],
) -> None:
    """`--changes` running slice pods finish; the seconds until the watcher told each on the bus."""
    running = [
        (namespace, body["metadata"]["name"])
        for namespace, body in workload
        if "hostIPC" in body["spec"] and (body.get("status") or {}).get("phase") == "Running"
    ][: args.changes]
    waiting = {subjects.pod_subject(namespace, name) for namespace, name in running}
    told = asyncio.Event()
    kinds: dict[str, int] = {}
    options = nats_server.options_as_admin()
    connection = await nats.connect(options.url, user_credentials=str(options.credentials))

    async def seen(message: Any) -> None:
        if message.subject in waiting:
            waiting.discard(message.subject)
            kind = json.loads(message.data).get("event", {}).get("kind", "?")
            kinds[kind] = kinds.get(kind, 0) + 1
            if not waiting:
                told.set()

    try:
        await connection.subscribe(subjects.POD_EVENTS, cb=seen)
        await connection.flush()
        started = time.perf_counter()
        paths = [f"/api/v1/namespaces/{ns}/pods/{name}/status" for ns, name in running]
        await patch_all(api.url, paths, {"status": {"phase": "Succeeded"}})
        written = time.perf_counter() - started
        try:
            await asyncio.wait_for(told.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            raise SystemExit(f"{len(waiting)} of {len(running)} finished pods not told on the bus") from None
        told_s = time.perf_counter() - started
    finally:
        await connection.close()
    told_kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    print(
        f"  watch: {len(running)} running slice pods finish: written in {written:.1f} s, all told on the "
        f"bus {told_s:.1f} s after the first write ({told_kinds})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pod_watcher_scale", description=__doc__)
    parser.add_argument("--pods", type=int, default=20000)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--changes", type=int, default=1000, help="running slice pods that finish (watch)")
    args = parser.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
