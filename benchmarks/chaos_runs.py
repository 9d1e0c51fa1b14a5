"""Many chaos plans, each a whole demo run: does the workload still settle, and how fast does each
killed part come back?

Run: `.venv/bin/python -m benchmarks.chaos_runs [--rounds 2] [--hog]` (or `make chaos-runs`). Each
plan is `mpsflow demo --replicas 2 --chaos PLAN` on its scenario, as a user runs it; `--hog` keeps one
core busy meanwhile. It prints one line per run (exit status, pods Failed or Pending, the counters)
and one per kill (takeover from the kill, recovery from the restart), then, per target, the min /
median / max over all runs of the time it took to serve again (from the kill; for a node agent, from
its restart). The plans kill each part alone, several at once, the same part twice, and NATS under
the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.demo_runs import one_core_busy

SCENARIOS = Path(__file__).resolve().parents[1] / "simulation" / "scenarios"
CONTROL_PLANE = SCENARIOS / "control-plane-chaos.yaml"
AGENT_IN_FLIGHT = SCENARIOS / "agent-kill-in-flight.yaml"

PLANS: tuple[tuple[Path, str], ...] = (
    (CONTROL_PLANE, "kill:planner@2"),
    (CONTROL_PLANE, "kill:planner@2,kill:planner@8"),
    (CONTROL_PLANE, "kill:pod-watcher@4"),
    (CONTROL_PLANE, "kill:config-publisher@4"),
    (CONTROL_PLANE, "kill:nats@5"),
    (CONTROL_PLANE, "kill:planner@3,kill:config-publisher@3,kill:pod-watcher@3"),
    (CONTROL_PLANE, "kill:nats@3,kill:planner@6"),
    (CONTROL_PLANE, "kill:node-agent/a100-1@5,kill:planner@5.5"),
    (AGENT_IN_FLIGHT, "kill:node-agent/a100-1@8"),
    (AGENT_IN_FLIGHT, "kill:node-agent/a100-1@8,kill:nats@8.2"),
)


def run_plan(scenario: Path, plan: str, out: Path) -> tuple[int, float, dict[str, Any] | None]:
    """One demo run with two replicas of each service and `plan`: exit status, seconds, summary."""
    command = [sys.executable, "-m", "services.cli", "demo", "--scenario", str(scenario)]
    command += ["--replicas", "2", "--chaos", plan, "--json", str(out)]
    started = time.monotonic()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    summary = json.loads(out.read_text()) if out.exists() else None
    return finished.returncode, time.monotonic() - started, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="how many times to play every plan")
    parser.add_argument("--hog", action="store_true", help="keep one core busy meanwhile")
    args = parser.parse_args()

    takeovers: dict[str, list[float]] = defaultdict(list)
    failed_runs = 0
    with one_core_busy(args.hog), tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.rounds):
            for index, (scenario, plan) in enumerate(PLANS):
                out = Path(scratch) / f"{round_number}-{index}.json"
                status, elapsed, summary = run_plan(scenario, plan, out)
                pods = summary["pods"] if summary else {}
                bad = sorted(key for key, pod in pods.items() if pod["phase"] in ("Failed", "Pending"))
                counters = summary["counters"] if summary else {}
                failed_runs += status != 0 or bool(bad)
                print(
                    f"{scenario.stem} {plan}: exit {status} in {elapsed:.0f}s; "
                    f"{len(bad)} Failed or Pending {bad}; counters {counters}"
                )
                for kill in summary["chaos"] if summary else []:
                    taken = kill.get("takeover_seconds")
                    print(
                        f"    {kill['target']} at {kill['at']:g}s: takeover {taken}s, "
                        f"recovered {kill['recovered_seconds']}s after its restart"
                    )
                    # A node agent has no standby: it serves again once restarted and recovered.
                    served = taken if taken is not None else kill["recovered_seconds"]
                    if served is not None:
                        takeovers[kill["target"].split("/")[0]].append(served)
    runs = args.rounds * len(PLANS)
    print(f"\n{runs} runs, {failed_runs} failed (exit status, or a pod Failed or left Pending)")
    for target, values in sorted(takeovers.items()):
        print(
            f"{target}: served again {min(values):.2f} / {statistics.median(values):.2f} / "
            f"{max(values):.2f} s after the kill (min / median / max, {len(values)} kills)"
        )
    return 1 if failed_runs else 0


if __name__ == "__main__":
    raise SystemExit(main())
