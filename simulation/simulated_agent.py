"""The production node services over simulated GPUs: what the demo starts on each simulated node.

`python -m simulation.simulated_agent --simulated-gpus FILE (node-agent | mps-daemons) <options>`
parses the service's options with the production CLI's own parser (`mpsflow run <service>`) and
runs the same wiring, with the NVML library replaced by `FakeNvml` read from FILE. Only the GPUs are
simulated; the agent, its device plugin, the daemon keeper and the bus are the real ones. (In a
large demo, `simulation.node_host` runs the same wiring for many nodes in one process.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from node_agent.nvml import NvmlInventory
from services.cli import build_parser, serve_mps_daemons, serve_node_agent
from services.kit.lifecycle import run_service
from services.kit.status import Status
from simulation.fake_nvml import FakeNvml


def main(argv: Sequence[str] | None = None) -> int:
    own = argparse.ArgumentParser(prog="python -m simulation.simulated_agent", add_help=False)
    own.add_argument("--simulated-gpus", type=Path, required=True, help="JSON file of the node's GPUs")
    own.add_argument("service", choices=["node-agent", "mps-daemons"])
    known, options = own.parse_known_args(argv)
    args = build_parser().parse_args(["run", known.service, *options])
    inventory = NvmlInventory(FakeNvml.from_json(known.simulated_gpus, node_name=args.node))
    serve = serve_node_agent if known.service == "node-agent" else serve_mps_daemons
    status = Status()
    run_service(
        f"mpsflow-{known.service}",
        lambda: serve(args, inventory, status),
        status=status,
        status_address=args.status_address,
        **{"k8s.node.name": args.node},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
