"""Planning at cluster scale: `mpsflow plan` end to end, and one incremental decision.

Run: `.venv/bin/python -m benchmarks.planner_scale` (no extra dependencies).

1. Generates a seeded snapshot of 2,000 nodes x 8 GPUs with 20,000 pending pods
   (`benchmarks.snapshots.generate`) into a temporary file and runs `mpsflow plan FILE` as a
   subprocess several times: wall time (min, median) and peak resident memory of the process
   (from `/usr/bin/time -v` when present, else `getrusage(RUSAGE_CHILDREN)`), the pods placed,
   and an upper bound on what any plan could place (`benchmarks.optimum.upper_bound`).
   Targets: <= 2 s and <= 1 GiB.
2. Folds the same cluster into the planner service's `ClusterState` from envelopes
   (NodeObserved + NodeGpusReported per node, PodObserved per pending pod), calls
   `compute_plan` once, then repeatedly folds one new PodObserved and times `apply` and
   `compute_plan` again (min, median). Target: <= 20 ms per decision after one new event.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from benchmarks.folding import T0, envelope, fold_state, pending_pod_event
from benchmarks.optimum import upper_bound
from benchmarks.snapshots import generate, write_snapshot
from services.planner.core.model import PendingPod, PlanSettings
from services.planner.core.run import plan_cluster
from services.planner.core.state import (
    ClusterState,
    IncrementalPlanner,
    PlannerSettings,
    compute_plan,
    planning_nodes,
)
from services.planner.snapshot import parse_snapshot
from simulation.nats_server import installed_command

TARGET_WALL_S = 2.0
TARGET_RSS_BYTES = 1024**3
TARGET_DECISION_MS = 20.0


@dataclass(frozen=True)
class PlanRun:
    wall_s: float
    peak_rss_bytes: int | None
    placed: int


def run_plan(path: Path) -> PlanRun:
    """One `mpsflow plan PATH` subprocess: wall time, peak RSS, pods placed."""
    command = [installed_command("mpsflow", "mpsflow (pip install -e .)"), "plan", str(path)]
    timer = Path("/usr/bin/time").exists()
    if timer:
        command = ["/usr/bin/time", "-v", *command]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"mpsflow plan failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    peak: int | None = None
    if timer:
        match = re.search(rb"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        peak = int(match.group(1)) * 1024 if match else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    placed = len(json.loads(done.stdout)["placed"])
    return PlanRun(wall_s=wall, peak_rss_bytes=peak, placed=placed)


def _ms(seconds: float) -> str:
    milliseconds = seconds * 1000
    return f"{milliseconds:.3f} ms" if milliseconds < 10 else f"{milliseconds:.1f} ms"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.planner_scale", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--pods", type=int, default=20000)
    parser.add_argument("--load", type=float, default=0.45, help="mean share of GPU memory already used")
    parser.add_argument("--runs", type=int, default=3, help="`mpsflow plan` runs")
    parser.add_argument("--repeats", type=int, default=5, help="incremental decisions to time")
    args = parser.parse_args(argv)

    snapshot = generate(args.seed, args.nodes, args.gpus_per_node, args.pods, load=args.load)
    gpus = args.nodes * args.gpus_per_node
    print(
        f"== mpsflow plan: {args.nodes} nodes x {args.gpus_per_node} GPUs ({gpus} GPUs), "
        f"{args.pods} pending pods, load {args.load:.2f}, seed {args.seed} =="
    )
    with tempfile.TemporaryDirectory(prefix="mpsflow-bench-") as directory:
        path = Path(directory) / "snapshot.json"
        write_snapshot(path, snapshot)
        print(f"  snapshot size                 {path.stat().st_size / 2**20:.1f} MiB")
        runs = [run_plan(path) for _ in range(args.runs)]
        nodes, pods = parse_snapshot(path.read_text(encoding="utf-8"))
    walls = [r.wall_s for r in runs]
    peaks = [r.peak_rss_bytes for r in runs if r.peak_rss_bytes is not None]
    bound = upper_bound(nodes, pods, PlanSettings())
    placeable = sum(1 for p in pods if p.size_gb >= 1)
    median_wall = statistics.median(walls)
    print(
        f"  wall time, {args.runs} runs: min, median  {min(walls):.3f} s, {median_wall:.3f} s   "
        f"(target <= {TARGET_WALL_S:.0f} s, median: {_verdict(median_wall <= TARGET_WALL_S)})"
    )
    if peaks:
        peak = max(peaks)
        print(
            f"  peak RSS (max of runs)        {peak / 2**20:.0f} MiB   "
            f"(target <= 1024 MiB: {_verdict(peak <= TARGET_RSS_BYTES)})"
        )
    print(
        f"  pods placed                   {runs[0].placed} of {len(pods)} ({placeable} ask for 1 GiB or more)"
    )
    share = 100 * runs[0].placed / max(bound, 1)
    print(f"  upper bound on pods placed    {bound}   (placed / bound {share:.2f} %)")

    print("== incremental decision: the planner service's IncrementalPlanner after one new PodObserved ==")
    started = time.perf_counter()
    state = fold_state(snapshot)
    print(
        f"  fold {len(snapshot['nodes']) * 2 + len(snapshot['pending_pods'])} envelopes   "
        f"{_ms(time.perf_counter() - started)}"
    )
    settings = PlannerSettings()
    now = T0 + timedelta(seconds=1)
    planner = IncrementalPlanner(settings)
    started = time.perf_counter()
    first = planner.compute(state, now)
    print(
        f"  first (full) computation      {_ms(time.perf_counter() - started)}   ({len(first.placed)} placed)"
    )
    applies: list[float] = []
    plans: list[float] = []
    for n in range(args.repeats):
        pod = {
            "namespace": "default",
            "name": f"late-arrival-{n}",
            "size_gb": 10,
            "priority": 0,
            "created": (T0 + timedelta(seconds=2 + n)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        at = now + timedelta(milliseconds=100 * (n + 1))
        arrival = envelope(pending_pod_event(pod), at, 10**9 + n)
        started = time.perf_counter()
        state.apply(arrival)
        applied = time.perf_counter()
        plan = planner.compute(state, at)
        finished = time.perf_counter()
        if plan.model_dump_json() != compute_plan(state, at, settings).model_dump_json():
            raise SystemExit("the incremental plan differs from the plan computed from scratch")
        applies.append(applied - started)
        plans.append(finished - applied)
        if (
            f"default/late-arrival-{n}" not in plan.placed
            and f"default/late-arrival-{n}" not in plan.unplaced
        ):
            raise SystemExit("the new pod is missing from the plan")
    totals = [a + p for a, p in zip(applies, plans, strict=True)]
    median_ms = statistics.median(totals) * 1000
    print(f"  apply one PodObserved: min, median    {_ms(min(applies))}, {_ms(statistics.median(applies))}")
    print(
        f"  plan after it: min, median            {_ms(min(plans))}, {_ms(statistics.median(plans))}"
        "   (each checked identical to a plan computed from scratch)"
    )
    print(
        f"  decision (apply + plan), {args.repeats} repeats: min, median  "
        f"{_ms(min(totals))}, {_ms(statistics.median(totals))}   "
        f"(target <= {TARGET_DECISION_MS:.0f} ms, median: {_verdict(median_ms <= TARGET_DECISION_MS)})"
    )
    _breakdown(state, now + timedelta(seconds=1), settings)
    return 0


def _breakdown(state: ClusterState, now: datetime, settings: PlannerSettings) -> None:
    """Where one compute_plan's time goes: building the nodes, planning, and the rest."""
    started = time.perf_counter()
    nodes, _, _ = planning_nodes(state, now, settings)
    built = time.perf_counter()
    pending = [
        PendingPod(p.namespace, p.name, p.size_gb, p.priority, p.created)
        for p in state.pods.values()
        if p.waits_for_slice
    ]
    listed = time.perf_counter()
    plan_cluster(nodes, pending, settings.plan)
    planned = time.perf_counter()
    compute_plan(state, now, settings)
    whole = time.perf_counter() - planned
    print("  one computation from scratch, broken down (separate calls):")
    print(f"    planning_nodes (state -> Node/Gpu values)   {_ms(built - started)}")
    print(f"    pending pods list                           {_ms(listed - built)}")
    print(f"    plan_cluster                                {_ms(planned - listed)}")
    print(f"    compute_plan as a whole                     {_ms(whole)}")


if __name__ == "__main__":
    raise SystemExit(main())
