"""`mpsflow demo`, plugged into the production CLI from outside it.

The CLI finds extra commands through the `mpsflow.commands` entry points (see pyproject.toml), so
the production command never imports the simulated cluster: this module is the one place where
the demo is wired in. Loading it costs nothing; the demo's machinery is imported only when the
command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class DemoCommand:
    help = "run the whole system on a simulated cluster"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--scenario", type=Path, help="YAML or JSON scenario (default: the built-in one)")
        parser.add_argument("--json", type=Path, dest="json_out", help="write the summary here")
        parser.add_argument(
            "--audit-log",
            type=Path,
            metavar="FILE",
            help="write every request the API emulator served here, one JSON object a line",
        )
        parser.add_argument(
            "--record", type=Path, help="also write every event of the run here (for `mpsflow replay`)"
        )
        parser.add_argument(
            "--compat",
            action="store_true",
            help="also write nebuly's device-plugin ConfigMap (nebuly-nvidia/nos-device-plugin-configs) and "
            "each node's nvidia.com/device-plugin.config label, and print them at the end",
        )
        parser.add_argument(
            "--chaos",
            metavar="SPEC",
            help="kill:TARGET@SECONDS, comma-separated, TARGET one of pod-watcher, planner, config-publisher "
            "(its active replica), nats, node-agent/NODE: SIGKILL it SECONDS into the workload and start it "
            "again one second later",
        )
        parser.add_argument(
            "--replicas",
            type=int,
            choices=[1, 2, 3],
            default=1,
            help="replicas of the pod watcher, the planner and the config publisher, one active by a lease",
        )
        parser.add_argument(
            "--nodes-per-host",
            type=_count,
            metavar="N",
            help="run the MPS daemon keeper and the node agent of N nodes in one process (a node host; "
            "0: each in a process of its own); default: 0 up to 10 nodes or when --chaos kills a node "
            "agent, else 25",
        )
        parser.add_argument(
            "--traces",
            type=Path,
            metavar="DIR",
            help="where every process writes its spans, one JSON-lines file each, for `mpsflow trace` "
            "(default: $MPSFLOW_TRACES_DIR, else mpsflow-traces in the temporary directory; the span "
            "files of an earlier run there are removed first)",
        )
        parser.add_argument(
            "--otlp-endpoint",
            metavar="URL",
            help="also send every process's spans over OTLP/HTTP here, e.g. a local Jaeger's "
            "http://localhost:4318 (sets OTEL_EXPORTER_OTLP_ENDPOINT)",
        )

    def run(self, args: argparse.Namespace) -> int:
        try:
            from simulation.demo import demo_command
        except ModuleNotFoundError as missing:  # a production install, without the demo extra
            print(
                f"mpsflow demo: the simulated cluster needs the demo extra ({missing.name} is not "
                "installed): pip install 'mpsflow[demo]'",
                file=sys.stderr,
            )
            return 2
        return demo_command(
            args.scenario,
            args.json_out,
            args.record,
            args.audit_log,
            args.compat,
            args.chaos,
            args.replicas,
            traces=args.traces,
            otlp_endpoint=args.otlp_endpoint,
            nodes_per_host_asked=args.nodes_per_host,
        )


def _count(text: str) -> int:
    """A whole number, 0 or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, got {text!r}")
    return int(text)


DEMO = DemoCommand()
