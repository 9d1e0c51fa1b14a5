"""`mpsflow`: the one command. `run` starts a service, `plan` plans offline, `demo` shows it all.

Argument errors exit 2 with a message naming the offending argument or field.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from events.vocabulary import (
    DEFAULT_MPS_IPC,
    DEFAULT_OPT_IN,
    MPS_IPC_MODES,
    NOS_DEVICE_PLUGIN_CONFIGMAP,
    MpsIpcMode,
    OptInLabel,
)
from services.kit.lifecycle import close_all
from services.kit.listen import ListenAddress

if TYPE_CHECKING:
    from events.bus import Bus
    from events.jetstream import NatsOptions
    from node_agent.device_plugin import SliceDevicePlugin
    from node_agent.health import XidPolicy
    from node_agent.mps import MpsControl
    from node_agent.nvml import GpuInventory
    from services.kit.status import Status

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_MEMORY_RESERVE_MIB = 1024
DEFAULT_STATUS_PORT = 8080
"""Kept back on every GPU for MPS itself: the server's context and each client's own (the pinned limit
caps only what a client allocates). A guess to be measured on real GPUs: docs/mps.md."""
COMMAND_PLUGINS = "mpsflow.commands"
"""Entry points that add commands (the demo adds `demo`), so this module imports none of them."""


class PluginCommand(Protocol):
    help: str

    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def plugin_commands() -> dict[str, PluginCommand]:
    """The commands installed packages add through the `mpsflow.commands` entry points."""
    return {entry.name: entry.load() for entry in sorted(entry_points(group=COMMAND_PLUGINS))}


def _replicated(parser: argparse.ArgumentParser) -> None:
    """The flags of a service that runs as replicas, one active at a time by a lease."""
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="written `active` once this replica holds the service's lease and has caught up, `standby` "
        "while it waits for the lease (for a probe; replicas are told apart by env POD_NAME)",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    """Where NATS is and how to prove who we are: the standard credentials file and TLS."""
    parser.add_argument(
        "--nats-url",
        default=os.environ.get("MPSFLOW_NATS_URL", DEFAULT_NATS_URL),
        help="NATS server with JetStream (env MPSFLOW_NATS_URL); tls:// for TLS",
    )
    for flag, environment, what in (
        (
            "--nats-creds",
            "MPSFLOW_NATS_CREDS",
            "this identity's NATS credentials file (.creds: user JWT and seed)",
        ),
        (
            "--nats-tls-ca",
            "MPSFLOW_NATS_TLS_CA",
            "CA certificates (PEM) to check the NATS server's certificate",
        ),
        (
            "--nats-tls-cert",
            "MPSFLOW_NATS_TLS_CERT",
            "client certificate (PEM) for NATS servers that ask for one",
        ),
        ("--nats-tls-key", "MPSFLOW_NATS_TLS_KEY", "the client certificate's private key (PEM)"),
    ):
        parser.add_argument(
            flag, type=Path, default=os.environ.get(environment), help=f"{what} (env {environment})"
        )


def nats_options(args: argparse.Namespace, identity: str) -> NatsOptions:
    """How this process connects to NATS, as `identity` (docs/security.md)."""
    from events.jetstream import NatsOptions

    return NatsOptions(
        args.nats_url,
        identity,
        credentials=args.nats_creds,
        tls_ca=args.nats_tls_ca,
        tls_cert=args.nats_tls_cert,
        tls_key=args.nats_tls_key,
    )


def _nats_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the NATS options of a command that takes them, if anything."""
    if "nats_tls_cert" in args and (args.nats_tls_cert is None) != (args.nats_tls_key is None):
        return "give both --nats-tls-cert and --nats-tls-key, or neither"
    return None


def _kube(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kube-url",
        default=os.environ.get("MPSFLOW_KUBE_URL"),
        help="API server URL (env MPSFLOW_KUBE_URL); default: in-cluster, then kubeconfig",
    )


def _opt_in_label(text: str) -> OptInLabel:
    try:
        return OptInLabel.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _uid(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a user id (a whole number, 0 or more)")
    return int(text)


def _listen_address(text: str) -> ListenAddress:
    try:
        return ListenAddress.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _status_address(text: str) -> ListenAddress | None:
    return None if text.strip().lower() == "none" else _listen_address(text)


def _status(parser: argparse.ArgumentParser) -> None:
    """Where the process serves /healthz, /readyz and /metrics (`services.kit.status`)."""
    parser.add_argument(
        "--status-address",
        type=_status_address,
        default=ListenAddress("0.0.0.0", DEFAULT_STATUS_PORT),
        metavar="HOST:PORT",
        help=f"serve /healthz, /readyz and /metrics here (default 0.0.0.0:{DEFAULT_STATUS_PORT}; none: off; "
        "fd:N: on the listening socket inherited as descriptor N)",
    )


def _mib(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB (0 or more)")
    return int(text)


def _xid_policy(setting: str) -> XidPolicy:
    from node_agent.health import XidPolicy

    try:
        return XidPolicy.parse(setting)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _foreign_mps_dirs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--foreign-mps-dirs",
        nargs="*",
        type=Path,
        metavar="DIR",
        help="refuse to start while another MPS control daemon answers on a control socket in these "
        "directories or below them (default: /tmp/nvidia-mps, CUDA's default pipe directory, and "
        "/run/nvidia/mps, NVIDIA's device plugin and GPU Operator); give the flag alone to skip the check",
    )


def _slice_serving(parser: argparse.ArgumentParser, role: str) -> None:
    """The flags of whoever serves the slices to the kubelet, and of the link to the keeper."""
    parser.add_argument(
        "--plugin-dir",
        type=Path,
        default=Path("/var/lib/kubelet/device-plugins"),
        help=f"the kubelet's device-plugin directory ({role})",
    )
    parser.add_argument("--thread-policy", choices=["proportional", "equal", "off"], default="proportional")
    parser.add_argument(
        "--device-list-strategy",
        choices=["envvar", "cdi-annotations", "cdi-cri"],
        default="cdi-cri",
        help="how a slice container gets its GPU: cdi-cri for CDI-enabled containerd or CRI-O (the GPU "
        "Operator's default from v25.10), cdi-annotations for the nvidia runtime in CDI mode, envvar "
        "(NVIDIA_VISIBLE_DEVICES) for the nvidia runtime in legacy mode",
    )
    parser.add_argument(
        "--cdi-kind",
        default="nvidia.com/gpu",
        help="the CDI kind of the node's GPUs; the CDI spec must name them by UUID (<kind>=<uuid>)",
    )
    parser.add_argument(
        "--link-socket",
        type=Path,
        default=Path("/run/mpsflow/link/slices.sock"),
        help="where the agent asks the mps-daemons keeper to serve its slices (node_agent.link)",
    )


def _mps_ipc(text: str) -> MpsIpcMode:
    for mode in MPS_IPC_MODES:
        if text == mode:
            return mode
    raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(MPS_IPC_MODES)}")


def _mps_ipc_flag(parser: argparse.ArgumentParser, effect: str) -> None:
    parser.add_argument(
        "--mps-ipc",
        type=_mps_ipc,
        default=os.environ.get("MPSFLOW_MPS_IPC", DEFAULT_MPS_IPC),
        metavar="{" + ",".join(MPS_IPC_MODES) + "}",
        help="how MPS clients share /dev/shm with their GPU's server; the pod watcher, every node agent "
        "and every daemon keeper must be given the same (env MPSFLOW_MPS_IPC; default host). host: "
        "through the host IPC namespace (slice pods set hostIPC: true); shm-directory: through a tmpfs "
        f"of each GPU's own, <mps-root>/<GPU uuid>/shm (no hostIPC). For this service: {effect}",
    )


def _configmap(text: str) -> tuple[str, str]:
    from services.config_publisher.kube_writer import parse_configmap

    try:
        return parse_configmap(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpsflow", description="Automatic NVIDIA MPS GPU partitioning for Kubernetes"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one service")
    services = run.add_subparsers(dest="service", required=True)
    watcher = services.add_parser("pod-watcher", help="watch pods and nodes, publish their state")
    _common(watcher)
    _replicated(watcher)
    _status(watcher)
    _kube(watcher)
    watcher.add_argument(
        "--opt-in-label",
        type=_opt_in_label,
        default=os.environ.get("MPSFLOW_OPT_IN_LABEL", str(DEFAULT_OPT_IN)),
        metavar="KEY=VALUE",
        help="the node label that opts a node in (env MPSFLOW_OPT_IN_LABEL); a key in the "
        "nos.nebuly.com domain also matches its nos.nebuly.ai twin",
    )
    _mps_ipc_flag(watcher, "in host mode, slice pods without hostIPC: true are rejected")
    watcher.add_argument(
        "--mps-user",
        type=_uid,
        metavar="UID",
        help="reject slice pods whose effective runAsUser is not this UID, the MPS servers' user "
        "(default: not checked)",
    )
    webhook = services.add_parser(
        "admission-webhook",
        help="serve the admission webhook that puts mpsflow's scheduling gate on slice pods",
    )
    webhook.add_argument(
        "--listen",
        type=_listen_address,
        default=ListenAddress("0.0.0.0", 8443),
        metavar="HOST:PORT",
        help="(default 0.0.0.0:8443; fd:N: on the listening socket inherited as descriptor N)",
    )
    _status(webhook)
    webhook.add_argument("--tls-cert-file", type=Path, help="serve https with this certificate (PEM)")
    webhook.add_argument("--tls-key-file", type=Path, help="the certificate's private key (PEM)")
    planner = services.add_parser("planner", help="fold events into state and publish plans")
    _common(planner)
    _replicated(planner)
    _status(planner)
    publisher = services.add_parser("config-publisher", help="write each node's desired MPS config")
    _common(publisher)
    _replicated(publisher)
    _status(publisher)
    _kube(publisher)
    publisher.add_argument(
        "--compat-configmap",
        type=_configmap,
        nargs="?",
        const=NOS_DEVICE_PLUGIN_CONFIGMAP,
        metavar="NAMESPACE/NAME",
        help="also write each node's config for nebuly's device-plugin fork into this ConfigMap (without "
        f"a value: {'/'.join(NOS_DEVICE_PLUGIN_CONFIGMAP)}, where nos's chart has the fork read it) and "
        "point the node's nvidia.com/device-plugin.config label at it (default: off)",
    )
    node_labels = publisher.add_mutually_exclusive_group()
    node_labels.add_argument(
        "--no-node-labels",
        dest="node_labels",
        action="store_false",
        help="do not write the mpsflow.dev/gpu.sharing-strategy and mpsflow.dev/gpu.replicas labels "
        "and the nos.nebuly.com/status-gpu-* annotations on nodes",
    )
    node_labels.add_argument(
        "--gfd-labels",
        action="store_true",
        help="also write GPU Feature Discovery's nvidia.com/gpu.sharing-strategy and nvidia.com/gpu.replicas "
        "labels: only where GFD does not run on the nodes or its sharing labels are off (GFD rewrites "
        "them), and with the two keys added to k8s/base/config-publisher-policy.yaml",
    )
    keeper = services.add_parser(
        "mps-daemons",
        help="keep one MPS control daemon per GPU running and serve the node's slices to the kubelet "
        "(its own DaemonSet, so that restarting the node agent stops no daemon and no slice)",
    )
    keeper.add_argument("--node", required=True, help="the Kubernetes name of this node")
    _status(keeper)
    keeper.add_argument(
        "--mps-root",
        type=Path,
        default=Path("/run/mpsflow/mps"),
        help="per-GPU MPS pipe and log directories live under <root>/<GPU uuid>/",
    )
    keeper.add_argument(
        "--mps-control",
        default="nvidia-cuda-mps-control",
        help="the MPS control command (split like a shell would)",
    )
    _foreign_mps_dirs(keeper)
    _mps_ipc_flag(
        keeper,
        "in shm-directory mode, each daemon is started with its GPU's tmpfs mounted (the MPS root "
        "needs Bidirectional mount propagation) and bound over /dev/shm, in a mount namespace of its own",
    )
    _slice_serving(keeper, "serves the node's slices to the kubelet, as the agent asks over --link-socket")
    keeper.add_argument("--check-seconds", type=float, default=5.0, help="seconds between daemon checks")
    keeper.add_argument(
        "--alive-file", type=Path, help="touched after every check, for a liveness probe to check its age"
    )

    agent = services.add_parser(
        "node-agent", help="apply a node's MPS config and serve its slices to the kubelet"
    )
    _common(agent)
    _status(agent)
    agent.add_argument("--node", required=True, help="the Kubernetes name of this node")
    agent.add_argument(
        "--pod-resources-socket", type=Path, default=Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    )
    agent.add_argument(
        "--mps-root",
        type=Path,
        default=Path("/run/mpsflow/mps"),
        help="per-GPU MPS pipe and log directories live under <root>/<GPU uuid>/",
    )
    agent.add_argument(
        "--mps-control",
        default="nvidia-cuda-mps-control",
        help="the MPS control command (split like a shell would)",
    )
    _foreign_mps_dirs(agent)
    _mps_ipc_flag(
        agent,
        "in shm-directory mode, Allocate mounts the GPU's tmpfs as the container's /dev/shm, and MPS "
        "commands run with it as theirs (the MPS root needs HostToContainer mount propagation)",
    )
    _slice_serving(agent, "with --mps-daemons own only: the agent then serves the slices itself")
    agent.add_argument("--heartbeat", type=float, default=10.0, help="seconds between GPU reports")
    agent.add_argument(
        "--usage-poll",
        type=float,
        default=0.2,
        metavar="SECONDS",
        help="seconds between looks at what the kubelet lists and what containers hold (its pod-resources "
        "API) and at the slices handed out",
    )
    agent.add_argument(
        "--memory-reserve-mib",
        type=_mib,
        default=DEFAULT_MEMORY_RESERVE_MIB,
        metavar="MIB",
        help="memory kept back on every GPU for the MPS server's and its clients' own contexts; slices "
        f"share whole GiB of the rest (default {DEFAULT_MEMORY_RESERVE_MIB}; see docs/mps.md)",
    )
    agent.add_argument(
        "--ignore-xids",
        type=_xid_policy,
        default="",
        metavar="XIDS",
        help="critical Xid errors that leave a GPU healthy, besides the application ones (13, 31, 43, "
        "45, 68, 109), comma-separated; 'all' turns Xid health checks off",
    )
    agent.add_argument(
        "--alive-file", type=Path, help="touched after every heartbeat, for a liveness probe to check its age"
    )
    agent.add_argument(
        "--mps-daemons",
        choices=["external", "own"],
        default="external",
        help="external: `mpsflow run mps-daemons` keeps the daemons and serves the slices (restarting "
        "the agent stops neither); own: the agent starts the daemons and serves the slices itself",
    )

    plan = commands.add_parser(
        "plan", help="plan offline from a JSON snapshot of opted-in nodes, their slices and pending pods"
    )
    plan.add_argument("snapshot", nargs="?", default="-", help="snapshot file, or - for standard input")
    plan.add_argument("--indent", type=int, help="indent the JSON for people (default: compact)")

    doctor = commands.add_parser(
        "doctor", help="check, on a node, what the node agent needs (NVML, GPUs, MPS, a CUDA client)"
    )
    doctor.add_argument(
        "--mps-control",
        default="nvidia-cuda-mps-control",
        help="the MPS control command (split like a shell would)",
    )
    doctor.add_argument(
        "--slice-gb", type=int, default=2, help="the pinned limit to set and hold a CUDA client to (GiB)"
    )

    record = commands.add_parser(
        "record", help="write every event of the stream to a JSON-lines file (admin credentials)"
    )
    _common(record)
    record.add_argument("out", type=Path, help="file to write (one envelope per line)")

    why = commands.add_parser(
        "explain",
        help="why a slice pod waits or where it went, from the live stream: its request, the planner's "
        "reason, the candidate GPUs and the trace id (admin credentials)",
    )
    _common(why)
    why.add_argument("pod", type=_pod_key, metavar="NAMESPACE/POD", help="the pod, e.g. default/train")

    bootstrap = commands.add_parser(
        "bootstrap",
        help="create or update the streams and the node-config bucket, with their limits (admin credentials; "
        "run before the services, and again to change a limit)",
    )
    _common(bootstrap)
    bootstrap.add_argument(
        "--replicas", type=int, default=1, help="servers that keep each stream (1, 3 or 5)"
    )
    for stream, default_mib in (("events", 1024), ("dead-letters", 256), ("node-configs", 64)):
        bootstrap.add_argument(
            f"--{stream}-max-mib",
            type=int,
            default=default_mib,
            help=f"the most the {stream} stream stores, MiB",
        )

    credentials = commands.add_parser(
        "credentials",
        help="issue NATS credentials: the server's trust (nats-auth.conf) and one .creds per identity",
    )
    credentials.add_argument(
        "directory", type=Path, help="where the keys (keys/), nats-auth.conf and *.creds go"
    )
    credentials.add_argument(
        "--node", action="append", default=[], help="issue the node agent's credentials of this node (repeat)"
    )

    replay = commands.add_parser("replay", help="replay recorded events through the planner, print its plans")
    replay.add_argument("events", type=Path, help="JSON-lines file of envelopes (from `mpsflow record`)")

    waterfall = commands.add_parser(
        "trace", help="print a pod's path through mpsflow as a waterfall of spans (`mpsflow demo --traces`)"
    )
    waterfall.add_argument("pod", type=_pod_key, metavar="NAMESPACE/POD", help="the pod, e.g. default/train")
    waterfall.add_argument(
        "--traces",
        type=Path,
        metavar="DIR",
        help="the directory of span files the processes wrote (env MPSFLOW_TRACES_DIR; default: "
        "mpsflow-traces in the temporary directory, where `mpsflow demo` writes them)",
    )
    waterfall.add_argument("--width", type=int, metavar="N", help="columns to fit (default: the terminal's)")

    for name, command in plugin_commands().items():
        command.configure(commands.add_parser(name, help=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _nats_problem(args)
    if problem is not None:
        print(f"mpsflow {args.command}: {problem}", file=sys.stderr)
        return 2
    if args.command == "plan":
        return plan_command(args.snapshot, args.indent)
    if args.command == "record":
        import anyio

        from events.access import ADMIN

        return anyio.run(record_command, nats_options(args, ADMIN), args.out, backend="asyncio")
    if args.command == "explain":
        import anyio

        from events.access import ADMIN

        return anyio.run(explain_command, nats_options(args, ADMIN), args.pod, backend="asyncio")
    if args.command == "bootstrap":
        return bootstrap_command(args)
    if args.command == "credentials":
        return credentials_command(args.directory, args.node)
    if args.command == "replay":
        return replay_command(args.events)
    if args.command == "trace":
        return trace_command(args.pod, args.traces, args.width)
    if args.command == "doctor":
        return doctor_command(tuple(shlex.split(args.mps_control)), args.slice_gb)
    if args.command != "run":
        return plugin_commands()[args.command].run(args)
    return run_command(args)


def doctor_command(mps_control: tuple[str, ...], slice_gb: int) -> int:
    import anyio

    from node_agent.doctor import DoctorSettings, examine, report

    if slice_gb < 1:
        print(f"mpsflow doctor: --slice-gb must be at least 1, got {slice_gb}", file=sys.stderr)
        return 2
    checks = anyio.run(examine, DoctorSettings(mps_control=mps_control, slice_gb=slice_gb))
    print(report(checks))
    return 0 if all(check.status == "ok" for check in checks) else 1


def plan_command(source: str, indent: int | None = None) -> int:
    from services.planner.core.model import PlanSettings
    from services.planner.core.run import plan_cluster
    from services.planner.snapshot import SnapshotError, parse_snapshot, render_plan

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as error:
        print(f"mpsflow plan: {source}: {error.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as error:
        print(
            f"mpsflow plan: {source}: not UTF-8 text ({error.reason} at byte {error.start})", file=sys.stderr
        )
        return 2
    try:
        nodes, pods = parse_snapshot(text)
    except SnapshotError as error:
        print(f"mpsflow plan: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(render_plan(plan_cluster(nodes, pods, PlanSettings()), indent))
    return 0


def bootstrap_command(args: argparse.Namespace) -> int:
    import anyio

    from events.access import ADMIN
    from events.bootstrap import MIB, BusLimits, bootstrap
    from events.jetstream import NotBootstrappedError

    limits = BusLimits(
        replicas=args.replicas,
        events_max_bytes=args.events_max_mib * MIB,
        dead_letters_max_bytes=args.dead_letters_max_mib * MIB,
        node_configs_max_bytes=args.node_configs_max_mib * MIB,
    )
    try:
        done = anyio.run(bootstrap, nats_options(args, ADMIN), limits, backend="asyncio")
    except (NotBootstrappedError, OSError) as error:
        print(f"mpsflow bootstrap: {error}", file=sys.stderr)
        return 1
    for line in done:
        print(f"mpsflow bootstrap: {line}")
    return 0


def credentials_command(directory: Path, nodes: list[str]) -> int:
    from events.credentials import issue

    for path in issue(directory, nodes):
        print(f"mpsflow credentials: wrote {path}")
    return 0


async def record_command(options: NatsOptions, out: Path) -> int:
    from events.jetstream import EventBus
    from events.subjects import ALL_EVENTS

    bus = await EventBus.connect(options, source="record")
    try:
        envelopes = await bus.everything(ALL_EVENTS)
    finally:
        await close_all(bus.close)
    with out.open("w") as sink:
        for envelope in envelopes:
            sink.write(envelope.model_dump_json() + "\n")
    print(f"mpsflow record: {len(envelopes)} events written to {out}", file=sys.stderr)
    return 0


def _pod_key(text: str) -> str:
    namespace, slash, name = text.partition("/")
    if not (namespace and slash and name) or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/POD")
    return text


def trace_command(pod: str, traces: Path | None, width: int | None) -> int:
    """Print `pod`'s waterfall (`services.traceview`): exit 1 when no span is about it, 2 when the
    directory cannot be read."""
    import shutil
    import tempfile

    from services.traceview import TracesDirError, default_traces_dir, read_spans, waterfall

    directory = traces or default_traces_dir(os.environ, tempfile.gettempdir())
    try:
        spans, _ = read_spans(directory)
    except TracesDirError as error:
        print(f"mpsflow trace: {error}", file=sys.stderr)
        return 2
    columns = width if width is not None else shutil.get_terminal_size((100, 24)).columns
    encoding = (sys.stdout.encoding or "").lower().replace("-", "").replace("_", "")
    drawn = waterfall(spans, pod, width=columns, ascii_only=encoding != "utf8")
    if drawn is None:
        print(
            f"mpsflow trace: no spans of {pod} in {directory} ({len(spans)} spans there); mpsflow's "
            "processes write their spans there when MPSFLOW_TRACES_DIR names it, as `mpsflow demo` does",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(drawn)
    return 0


async def explain_command(options: NatsOptions, pod: str) -> int:
    from events import subjects
    from events.jetstream import EventBus
    from events.nodes import NodeGpusReported
    from events.plans import PlanComputed
    from services.explain import Received, explain

    namespace, name = pod.split("/", 1)
    bus = await EventBus.connect(options, source="explain")
    try:
        pod_levels = [
            Received(envelope, headers)
            for subject in (
                subjects.pod_subject(namespace, name),
                subjects.unplaced_subject(namespace, name),
                subjects.release_subject(namespace, name),
            )
            for envelope, headers in await bus.current_levels_with_headers(subject)
        ]
        plans = [e.event for e in await bus.current_levels(subjects.plan_subject())]
        reports = [e.event for e in await bus.current_levels(subjects.GPU_EVENTS)]
    finally:
        await close_all(bus.close)
    plan = next((p for p in plans if isinstance(p, PlanComputed)), None)
    text = explain(
        f"{namespace}/{name}",
        pod_levels,
        plan,
        (report for report in reports if isinstance(report, NodeGpusReported)),
    )
    if text is None:
        print(
            f"mpsflow explain: no event names {namespace}/{name} in the stream: mpsflow sees only pods that "
            "ask for an nvidia.com/gpu-<N>gb resource (check the name, and that the pod watcher runs)",
            file=sys.stderr,
        )
        return 1
    print(text, end="")
    return 0


def replay_command(source: Path) -> int:
    import json

    from events.envelope import UndecodableMessageError, decode
    from services.planner.replay import replay

    try:
        lines = source.read_text().splitlines()
    except OSError as error:
        print(f"mpsflow replay: {source}: {error.strerror}", file=sys.stderr)
        return 2
    envelopes = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            envelopes.append(decode(line.encode()))
        except UndecodableMessageError as error:
            print(f"mpsflow replay: {source}:{number}: {error}", file=sys.stderr)
            return 2
    for replayed in replay(envelopes):
        print(json.dumps(replayed.summary(), sort_keys=True))
    return 0


def run_command(args: argparse.Namespace) -> int:
    from services.kit.lifecycle import run_service
    from services.kit.status import Status

    service: str = args.service
    status = Status()
    served = {"status": status, "status_address": args.status_address}
    if service == "pod-watcher":
        run_service("mpsflow-pod-watcher", lambda: _pod_watcher(args, status), **served)
    elif service == "admission-webhook":
        if (args.tls_cert_file is None) != (args.tls_key_file is None):
            print(
                "mpsflow run admission-webhook: give both --tls-cert-file and --tls-key-file, or neither",
                file=sys.stderr,
            )
            return 2
        run_service("mpsflow-admission-webhook", lambda: _admission_webhook(args, status), **served)
    elif service == "planner":
        run_service("mpsflow-planner", lambda: _planner(args, status), **served)
    elif service == "config-publisher":
        run_service("mpsflow-config-publisher", lambda: _config_publisher(args, status), **served)
    elif service == "mps-daemons":
        if refuses_for_foreign_gpu_plugin(args) or refuses_for_foreign_mps_daemon(args):
            return 3
        run_service(
            "mpsflow-mps-daemons",
            lambda: serve_mps_daemons(args, status=status),
            **served,
            **{"k8s.node.name": args.node},
        )
    else:
        serves_slices = args.mps_daemons == "own"
        if (serves_slices and refuses_for_foreign_gpu_plugin(args)) or refuses_for_foreign_mps_daemon(args):
            return 3
        run_service(
            "mpsflow-node-agent",
            lambda: serve_node_agent(args, status=status),
            **served,
            **{"k8s.node.name": args.node},
        )
    return 0


def refuses_for_foreign_gpu_plugin(args: argparse.Namespace) -> bool:
    """True, after saying why on stderr, when another GPU device plugin serves this node."""
    from node_agent.device_plugin import foreign_gpu_plugins

    serving = foreign_gpu_plugins(args.plugin_dir)
    if serving:
        print(
            f"mpsflow run {args.service}: another GPU device plugin serves this node ({', '.join(serving)} "
            f"in {args.plugin_dir}); it would hand out the GPUs whole and reset their compute mode. "
            "With the GPU Operator, label the node nvidia.com/gpu.deploy.device-plugin=false",
            file=sys.stderr,
        )
    return bool(serving)


def refuses_for_foreign_mps_daemon(args: argparse.Namespace) -> bool:
    """True, after saying why on stderr, when another MPS control daemon answers on this node."""
    from node_agent.foreign import DEFAULT_FOREIGN_MPS_DIRS, foreign_mps_daemons, refusal

    directories = DEFAULT_FOREIGN_MPS_DIRS if args.foreign_mps_dirs is None else args.foreign_mps_dirs
    live = foreign_mps_daemons(directories, own_root=args.mps_root)
    if live:
        print(refusal(args.service, live), file=sys.stderr)
    return bool(live)


async def _pod_watcher(args: argparse.Namespace, status: Status) -> None:
    from events.access import POD_WATCHER
    from events.jetstream import EventBus
    from services.kit.kube import api_client
    from services.pod_watcher.service import PodWatcherService, WatcherSettings
    from services.pod_watcher.translate import MpsClientRules

    settings = WatcherSettings(args.opt_in_label, MpsClientRules(ipc=args.mps_ipc, mps_user=args.mps_user))
    bus = await EventBus.connect(nats_options(args, POD_WATCHER), source="pod-watcher")
    api = await api_client(args.kube_url, os.environ.get("MPSFLOW_KUBE_TOKEN"))
    api.user_agent = "mpsflow-pod-watcher"

    async def watch(ready: Callable[[], None]) -> None:
        service = PodWatcherService(bus, api, settings)
        service.on_caught_up = ready
        await service.run()

    try:
        await _one_active(bus, POD_WATCHER, watch, args.ready_file, status)
    finally:
        await close_all(api.close, bus.close)


async def _admission_webhook(args: argparse.Namespace, status: Status) -> None:
    import anyio

    from services.pod_watcher.gate import keep_certificate_fresh, serve_webhook, tls_context

    tls = tls_context(args.tls_cert_file, args.tls_key_file) if args.tls_cert_file is not None else None
    runner = await serve_webhook(args.listen, tls)
    status.ready("serving")
    try:
        if tls is None:
            await anyio.sleep_forever()
        else:
            await keep_certificate_fresh(tls, args.tls_cert_file, args.tls_key_file)
    finally:
        await close_all(runner.cleanup)


async def _planner(args: argparse.Namespace, status: Status) -> None:
    import anyio

    from events.access import PLANNER
    from events.jetstream import EventBus
    from services.planner.service import PlannerService

    bus = await EventBus.connect(nats_options(args, PLANNER), source="planner")

    async def plan(ready: Callable[[], None]) -> None:  # afresh each time: it rebuilds its state
        planner = PlannerService(bus)
        planner.on_caught_up = ready
        async with anyio.create_task_group() as group:
            group.start_soon(planner.consume)
            group.start_soon(planner.decide_forever)

    try:
        await _one_active(bus, PLANNER, plan, args.ready_file, status)
    finally:
        await close_all(bus.close)


async def _config_publisher(args: argparse.Namespace, status: Status) -> None:
    import logging

    from kubernetes_asyncio.config import ConfigException

    from events.access import CONFIG_PUBLISHER
    from events.jetstream import EventBus
    from services.config_publisher.kube_writer import CompatibilityWriter
    from services.config_publisher.service import ConfigPublisherService
    from services.kit.kube import api_client

    namespace, name = args.compat_configmap or (None, None)
    api = None
    if namespace is not None or args.node_labels:
        try:
            api = await api_client(args.kube_url, os.environ.get("MPSFLOW_KUBE_TOKEN"))
        except (ConfigException, OSError) as error:
            logging.getLogger(__name__).warning(
                "no Kubernetes API configured (%s): publishing to the node-config KV bucket only", error
            )
    if api is not None:
        api.user_agent = "mpsflow-config-publisher"
    bus = await EventBus.connect(nats_options(args, CONFIG_PUBLISHER), source="config-publisher")

    async def publish(ready: Callable[[], None]) -> None:  # a fresh writer: what it wrote may be stale
        writer = None
        if api is not None:
            writer = CompatibilityWriter(
                api, namespace, name, node_labels=args.node_labels, gfd_labels=args.gfd_labels
            )
        await ConfigPublisherService(bus, writer).consume(ready)

    try:
        await _one_active(bus, CONFIG_PUBLISHER, publish, args.ready_file, status)
    finally:
        await close_all(bus.close, *([api.close] if api is not None else []))


async def _one_active(
    bus: Bus,
    service: str,
    work: Callable[[Callable[[], None]], Awaitable[None]],
    ready_file: Path | None,
    status: Status,
) -> None:
    """Run `work` while this replica holds `service`'s lease: with two replicas, one is active and
    the other takes over within seconds of it dying (`services.kit.lease`). `work` calls the function
    it is given once it has caught up and serves; `status` (and `ready_file`, for the demo's chaos)
    then says `active`, and `standby` while this replica waits for the lease: both are ready."""
    import socket
    import time

    from events.metrics import LEADER
    from services.kit.lease import Lease, lead

    def say(state: str) -> None:
        status.ready(state)
        LEADER.labels(service).set(1 if state == "active" else 0)
        if ready_file is not None:
            ready_file.with_suffix(".tmp").write_text(f"{state}\n")
            ready_file.with_suffix(".tmp").replace(ready_file)

    me = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    say("standby")
    await lead(
        Lease(await bus.leases(), service, me, time.time),
        lambda: work(lambda: say("active")),
        lambda active: None if active else say("standby"),
    )


def mps_control_command(args: argparse.Namespace) -> tuple[str, ...]:
    """`--mps-control` split as a shell would; in the shm-directory IPC mode, run so that each GPU's
    daemon and every command to it see the GPU's shm directory as /dev/shm (`node_agent.shm`)."""
    from node_agent.shm import shm_directory_control

    control = tuple(shlex.split(args.mps_control))
    return shm_directory_control(control) if args.mps_ipc == "shm-directory" else control


async def serve_mps_daemons(
    args: argparse.Namespace,
    inventory: GpuInventory | None = None,
    status: Status | None = None,
    mps: MpsControl | None = None,
) -> None:
    """Keep this node's MPS daemons running, on its GPUs (NVML) or on `inventory` where simulated,
    and serve the slices the node agent asks for to the kubelet, restarts of the agent or not.
    `mps`: the daemons' control, where simulated (default: `--mps-control`, one process a command)."""
    import anyio

    from node_agent.daemons import DaemonKeeper
    from node_agent.link import LinkServer
    from node_agent.mps import SubprocessMpsControl
    from node_agent.nvml import NvmlInventory

    mps = mps or SubprocessMpsControl(mps_control_command(args))
    keeper = DaemonKeeper(inventory or NvmlInventory(), mps, args.mps_root)
    plugin = _slice_plugin(args)
    link = LinkServer(plugin, args.link_socket, args.link_socket.with_name("served-slices.json"))
    try:
        await link.restore()
        async with anyio.create_task_group() as group:
            group.start_soon(plugin.run)
            group.start_soon(link.run)
            group.start_soon(keeper.run, args.check_seconds, args.alive_file, status)
    finally:
        await close_all(plugin.close)  # shielded: a stop by signal cancels this task


def _slice_plugin(args: argparse.Namespace) -> SliceDevicePlugin:
    from node_agent.device_plugin import SliceDevicePlugin

    return SliceDevicePlugin(
        plugin_dir=args.plugin_dir,
        pipe_root=args.mps_root,
        thread_policy=args.thread_policy,
        device_list_strategy=args.device_list_strategy,
        cdi_kind=args.cdi_kind,
        ipc=args.mps_ipc,
    )


async def serve_node_agent(
    args: argparse.Namespace,
    inventory: GpuInventory | None = None,
    status: Status | None = None,
    mps: MpsControl | None = None,
) -> None:
    """The node agent on this node's GPUs (NVML), or on `inventory` where the GPUs are simulated
    (and `mps`, the daemons' control, where they are simulated too)."""
    from events.access import node_agent_identity
    from events.jetstream import EventBus
    from node_agent.agent import AgentSettings, NodeAgent
    from node_agent.device_plugin import SliceServer
    from node_agent.link import RemotePlugin
    from node_agent.mps import SubprocessMpsControl
    from node_agent.nvml import NvmlInventory
    from node_agent.processes import ProcEnvironment

    inventory = inventory or NvmlInventory()
    bus = await EventBus.connect(
        nats_options(args, node_agent_identity(args.node)), source=f"node-agent/{args.node}"
    )
    plugin: SliceServer = _slice_plugin(args) if args.mps_daemons == "own" else RemotePlugin(args.link_socket)
    settings = AgentSettings(
        node=args.node,
        mps_root=args.mps_root,
        pod_resources_socket=args.pod_resources_socket,
        heartbeat_seconds=args.heartbeat,
        usage_poll_seconds=args.usage_poll,
        own_daemons=args.mps_daemons == "own",
        alive_file=args.alive_file,
        xid_policy=args.ignore_xids,
        memory_reserve_mib=args.memory_reserve_mib,
        mps_ipc=args.mps_ipc,
    )
    agent = NodeAgent(
        settings,
        bus,
        inventory,
        mps or SubprocessMpsControl(mps_control_command(args)),
        plugin,
        processes=ProcEnvironment(),
        status=status,
    )
    try:
        await agent.run()
    finally:
        await close_all(plugin.close, bus.close)


if __name__ == "__main__":
    raise SystemExit(main())
