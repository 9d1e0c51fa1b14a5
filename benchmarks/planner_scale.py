"""Planning at cluster scale: `mpsflow plan` end to end, against nos's algorithm, a restart, and
one incremental decision.

Run: `.venv/bin/python -m benchmarks.planner_scale` (no extra dependencies; `--no-nos` leaves out
nos's algorithm, which takes half a minute at the default size).

1. Generates a seeded snapshot of 2,000 nodes x 8 GPUs with 20,000 pending pods
   (`benchmarks.snapshots.generate`) into a temporary file and runs `mpsflow plan FILE` as a
   subprocess several times: wall time (min, median, max) and peak resident memory of the process
   (from `/usr/bin/time -v` when present, else `getrusage(RUSAGE_CHILDREN)`), the pods placed,
   and an upper bound on what any plan could place (`benchmarks.optimum.upper_bound`).
   Targets: <= 2 s and <= 1 GiB.
2. From scratch, in this process, on the same snapshot: mpsflow's `plan_cluster` (what `mpsflow
   plan` runs between parsing and rendering) several times, and nos's planner
   (`benchmarks.nos_algorithm.plan_geometry`, one `Planner.Plan` call) once. Target: nos's
   time is at least 10x mpsflow's.
3. A restart of the planner service: the envelopes it reads on start (NodeObserved and
   NodeGpusReported per node, PodObserved per pending pod) encoded as on the bus, then decoded and
   folded into a new `Planner` (what the service's consumer does with each message), and its
   first step, which decides from scratch. As the service runs it, with Python's cyclic garbage
   collector paused (`services.planner.collector`), and, to show what that pause is worth, with
   the collector running. Target: <= 2 s from the first envelope to the first decision.
4. Incremental decisions on that state, as the service would take them: its first decision is
   published (committed), then after each new PodObserved the planner decides again (its
   `IncrementalPlanner` extends the last computation): `apply` and `compute` (min, median, max), and
   the whole step (`decide`: the plan, then what to publish). Each plan is checked identical to
   one computed from scratch. Then a decision from scratch on the same state, to compare.
   Targets: <= 20 ms per decision after one new event, and at most 1/100 of one from scratch.

Wall times depend on what else the machine runs; each figure also gives the process's CPU time.
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
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.folding import COMPUTE_CAPABILITY, T0, envelope, pending_pod_event
from benchmarks.nos_algorithm import plan_geometry
from benchmarks.snapshots import generate, write_snapshot
from events.envelope import Envelope, decode, encode
from events.nodes import GpuReport, NodeGpusReported, NodeObserved, SliceState
from events.plans import PlanComputed
from services.planner.collector import collector_paused
from services.planner.core.model import Node, PendingPod, PlanSettings
from services.planner.core.run import plan_cluster
from services.planner.core.state import (
    ClusterState,
    IncrementalPlanner,
    PlannerSettings,
    PublishPlan,
    compute_plan,
    decide,
    planning_nodes,
)
from services.planner.core.step import Planner
from services.planner.snapshot import parse_snapshot
from simulation.nats_server import installed_command

TARGET_WALL_S = 2.0
TARGET_RSS_BYTES = 1024**3
TARGET_DECISION_MS = 20.0
TARGET_NOS_RATIO = 10.0
TARGET_RESTART_S = 2.0
TARGET_INCREMENTAL_SHARE = 1 / 100

T = TypeVar("T")


@dataclass(frozen=True)
class PlanRun:
    wall_s: float
    peak_rss_bytes: int | None
    placed: int


@dataclass(frozen=True)
class Timed:
    """Wall and CPU seconds of one call."""

    wall_s: float
    cpu_s: float


def timed(call: Callable[[], T]) -> tuple[T, Timed]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, Timed(time.perf_counter() - wall, time.process_time() - cpu)


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


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s"


def _spread(values: Sequence[float], unit: Callable[[float], str] = _ms) -> str:
    """min, median, max"""
    return f"{unit(min(values))}, {unit(statistics.median(values))}, {unit(max(values))}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.planner_scale", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--pods", type=int, default=20000)
    parser.add_argument("--load", type=float, default=0.45, help="mean share of GPU memory already used")
    parser.add_argument("--runs", type=int, default=3, help="`mpsflow plan` runs, and runs of each figure")
    parser.add_argument("--repeats", type=int, default=5, help="incremental decisions to time")
    parser.add_argument("--no-nos", action="store_true", help="leave out nos's algorithm")
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
    placeable = sum(1 for p in pods if p.size_gb >= 1)
    median_wall = statistics.median(walls)
    print(
        f"  wall time, {args.runs} runs: min, median, max  {_spread(walls, _s)}   "
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
    try:
        from benchmarks.optimum import upper_bound  # SciPy: the bench extra only
    except ImportError:
        print("  upper bound on pods placed    needs SciPy: pip install -e '.[bench]'")
    else:
        bound = upper_bound(nodes, pods, PlanSettings())
        share = 100 * runs[0].placed / max(bound, 1)
        print(f"  upper bound on pods placed    {bound}   (placed / bound {share:.2f} %)")

    nos = _against_nos(nodes, pods, args.runs, not args.no_nos)
    _restart(snapshot, args.runs)
    _incremental(snapshot, args.repeats, args.runs, nos)
    return 0


def _against_nos(
    nodes: Sequence[Node], pods: Sequence[PendingPod], runs: int, with_nos: bool
) -> Timed | None:
    """mpsflow's plan from scratch and nos's on the same snapshot, in this process."""
    print("== from scratch, same snapshot, this process: mpsflow's plan_cluster and nos's algorithm ==")
    ours = [timed(lambda: plan_cluster(nodes, pods, PlanSettings()))[1] for _ in range(runs)]
    print(
        f"  mpsflow plan_cluster, {runs} runs: min, median, max  wall {_spread([t.wall_s for t in ours], _s)}"
        f"   cpu {_spread([t.cpu_s for t in ours], _s)}   (collector running, as in `mpsflow plan`)"
    )
    if not with_nos:
        return None
    geometry, nos = timed(lambda: plan_geometry(nodes, pods))
    print(
        f"  nos's Planner.Plan (plan_geometry), 1 run        wall {_s(nos.wall_s)}   cpu {_s(nos.cpu_s)}"
        f"   ({len(geometry)} nodes planned)"
    )
    ratio = nos.wall_s / statistics.median(t.wall_s for t in ours)
    cpu_ratio = nos.cpu_s / statistics.median(t.cpu_s for t in ours)
    print(
        f"  nos / mpsflow (median)        wall {ratio:.1f}x   cpu {cpu_ratio:.1f}x   "
        f"(target >= {TARGET_NOS_RATIO:.0f}x: {_verdict(ratio >= TARGET_NOS_RATIO)})"
    )
    return nos


def restart_envelopes(snapshot: dict[str, Any]) -> list[Envelope]:
    """What a restarted planner reads for `snapshot`: every node's NodeObserved and its agent's
    report, and every pending pod's PodObserved (the last message of each subject)."""
    envelopes: list[Envelope] = []
    for node in snapshot["nodes"]:
        gpus = tuple(
            GpuReport(
                index=gpu["index"],
                uuid=f"GPU-{node['name']}-{gpu['index']}",
                model=gpu["model"],
                memory_mib=gpu["memory_mib"],
                compute_capability=COMPUTE_CAPABILITY.get(gpu["model"], (8, 0)),
                slices=tuple(
                    SliceState(id=f"mps-{gpu['index']}-{n}", size_gb=s["size_gb"], used=s["used"])
                    for n, s in enumerate(gpu["slices"])
                ),
            )
            for gpu in node["gpus"]
        )
        for event in (NodeObserved(name=node["name"]), NodeGpusReported(node=node["name"], gpus=gpus)):
            envelopes.append(envelope(event, T0, len(envelopes) + 1))
    for pod in snapshot["pending_pods"]:
        envelopes.append(envelope(pending_pod_event(pod), T0, len(envelopes) + 1))
    return envelopes


def _restart(snapshot: dict[str, Any], runs: int) -> None:
    """A restarted planner: decode and fold every envelope it reads on start, then its first step."""
    print("== restart: the planner service rebuilding its state, then deciding from scratch ==")
    messages = [encode(e) for e in restart_envelopes(snapshot)]
    now = T0 + timedelta(seconds=1)

    def once(pause: Callable[[], AbstractContextManager[None]]) -> tuple[Timed, Timed]:
        planner = Planner(PlannerSettings())

        def fold_all() -> None:
            for message in messages:
                planner.observe(decode(message))

        with pause():
            _, fold = timed(fold_all)
            step, first = timed(partial(planner.step, now))
        if step.decision is None:
            raise SystemExit("the restarted planner decided nothing")
        return fold, first

    for label, pause in (
        ("collector paused, as the service runs it", collector_paused),
        ("collector running", nullcontext),
    ):
        results = [once(pause) for _ in range(runs)]
        folds = [fold for fold, _ in results]
        firsts = [first for _, first in results]
        totals = [fold.wall_s + first.wall_s for fold, first in results]
        best = min(range(runs), key=lambda r: totals[r])
        print(
            f"  restart: fold {len(messages)} envelopes {_s(folds[best].wall_s)} + first decision "
            f"{_s(firsts[best].wall_s)} = {_s(totals[best])}   ({label}; best of {runs})"
        )
        print(
            f"    {runs} runs: fold {_spread([f.wall_s for f in folds], _s)}; first decision "
            f"{_spread([f.wall_s for f in firsts], _s)}; total {_spread(totals, _s)}; "
            f"cpu total {_spread([f.cpu_s + d.cpu_s for f, d in results], _s)}"
            + (
                f"   (target <= {TARGET_RESTART_S:.0f} s, median: "
                f"{_verdict(statistics.median(totals) <= TARGET_RESTART_S)})"
                if pause is collector_paused
                else ""
            )
        )


def _late_pod(n: int) -> dict[str, Any]:
    return {
        "namespace": "default",
        "name": f"late-arrival-{n}",
        "size_gb": 10,
        "priority": 0,
        "created": (T0 + timedelta(seconds=2 + n)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _settled(
    snapshot: dict[str, Any], settings: PlannerSettings
) -> tuple[ClusterState, IncrementalPlanner, datetime]:
    """The state of a planner service that published its decisions on `snapshot` until one asked
    nothing more of nodes or pods, its planner, and the time then."""
    state = ClusterState()
    planner = IncrementalPlanner(settings)
    now = T0 + timedelta(seconds=1)
    with collector_paused():
        for item in restart_envelopes(snapshot):
            state.apply(item)
        # A decision that asks something of nodes or pods changes what the next plan starts from.
        for _ in range(10):
            now += timedelta(seconds=1)
            decision = decide(state, now, settings, planner)
            if not isinstance(decision, PublishPlan):
                break
            state.commit(decision)
            if not (decision.node_plans or decision.releases):
                break
        # The service's next decision, at the next event, is computed from scratch on that state:
        # the decisions after it extend it.
        planner.compute(state, now)
    return state, planner, now


def _arrival(n: int, now: datetime) -> tuple[datetime, Envelope]:
    at = now + timedelta(milliseconds=100 * (n + 1))
    return at, envelope(pending_pod_event(_late_pod(n)), at, 10**9 + n)


def _incremental(snapshot: dict[str, Any], repeats: int, runs: int, nos: Timed | None) -> None:
    """Decisions after one new PodObserved, on the state of a planner that published its decisions
    until they asked nothing more, against decisions from scratch on the same state."""
    print("== incremental decision: the planner service's IncrementalPlanner after one new PodObserved ==")
    settings = PlannerSettings()
    state, planner, now = _settled(snapshot, settings)
    applies: list[float] = []
    computes: list[float] = []
    steps: list[float] = []
    plans: list[tuple[datetime, PlanComputed]] = []
    modes: list[str] = []
    for n in range(repeats):
        at, arrival = _arrival(2 * n, now)
        with collector_paused():
            _, applied = timed(partial(state.apply, arrival))
            plan, computed = timed(partial(planner.compute, state, at))
        modes.append(planner.last_mode)
        plans.append((at, plan))
        applies.append(applied.wall_s)
        computes.append(computed.wall_s)
        # The whole step after another new pod: the plan, then what to publish.
        at, arrival = _arrival(2 * n + 1, now)
        at += settings.window.maximum  # the batch window has closed
        with collector_paused():
            _, applied = timed(partial(state.apply, arrival))
            step, stepped = timed(partial(decide, state, at, settings, planner))
        if not isinstance(step, PublishPlan):
            raise SystemExit("a new pod changed nothing in the plan")
        modes.append(planner.last_mode)
        plans.append((at, step.plan))
        steps.append(applied.wall_s + stepped.wall_s)
    # The same again, each plan checked identical to one computed from scratch (not while timing:
    # a computation from scratch or a plan written out in between would leave the next decision
    # to start from cold caches, which the service's do not).
    check, checker, _ = _settled(snapshot, settings)
    for n, (at, recorded) in enumerate(plans):
        check.apply(_arrival(n, now)[1])
        again = checker.compute(check, at).model_dump_json()
        if (
            again != recorded.model_dump_json()
            or again != compute_plan(check, at, settings).model_dump_json()
        ):
            raise SystemExit("the incremental plan differs from the plan computed from scratch")
    totals = [a + c for a, c in zip(applies, computes, strict=True)]
    print(f"  apply one PodObserved: min, median, max    {_spread(applies)}")
    print(
        f"  plan after it: min, median, max            {_spread(computes)}"
        "   (each checked identical to a plan computed from scratch, afterwards)"
    )
    median_ms = statistics.median(totals) * 1000
    print(
        f"  decision (apply + plan), {repeats} repeats: min, median, max  {_spread(totals)}   "
        f"(target <= {TARGET_DECISION_MS:.0f} ms, median: {_verdict(median_ms <= TARGET_DECISION_MS)})"
    )
    print(
        f"  whole step (apply + decide: plan, layouts, releases, reasons), {repeats} repeats: "
        f"min, median, max  {_spread(steps)}"
    )
    extended = modes.count("incremental")
    if extended < len(modes):
        # A plan is extended only when every pod that can be placed at all was (`PlanRun.extendable`).
        print(
            f"  ({extended} of {len(modes)} decisions extended the last computation, the others from scratch)"
        )

    # From scratch on the same state: the plan alone (`compute_plan`: a new IncrementalPlanner),
    # and the service's whole step after a node changed (its planner keeps what it rendered).
    scratch_plans: list[float] = []
    scratch_steps: list[float] = []
    for n in range(runs):
        at = now + timedelta(seconds=10 + n)
        with collector_paused():
            scratch_plans.append(timed(partial(compute_plan, state, at, settings))[1].wall_s)
        # A node's agent reports a GPU reserve of its own: its capacity may change, so the next
        # decision is computed from scratch.
        name = snapshot["nodes"][n % len(snapshot["nodes"])]["name"]
        report = state.nodes[name].report
        assert report is not None
        gpus = (*report.gpus[:-1], report.gpus[-1].model_copy(update={"reserved_mib": 1 + n}))
        state.apply(envelope(report.model_copy(update={"gpus": gpus}), at, 2 * 10**9 + n))
        with collector_paused():
            _, stepped = timed(partial(decide, state, at + settings.window.maximum, settings, planner))
        if planner.last_mode != "full":
            raise SystemExit("a decision after a node changed was not computed from scratch")
        scratch_steps.append(stepped.wall_s)
    print(f"  plan from scratch (compute_plan), {runs} runs: min, median, max    {_spread(scratch_plans)}")
    print(f"  whole step from scratch (after a node changed): min, median, max  {_spread(scratch_steps)}")
    share = statistics.median(totals) / statistics.median(scratch_plans)
    step_share = statistics.median(steps) / statistics.median(scratch_steps)
    print(
        f"  incremental / from scratch (medians): plan {share:.4f} ({1 / share:.0f}x faster), "
        f"step {step_share:.4f} ({1 / step_share:.0f}x faster)   (target <= {TARGET_INCREMENTAL_SHARE}: "
        f"plan {_verdict(share <= TARGET_INCREMENTAL_SHARE)}, "
        f"step {_verdict(step_share <= TARGET_INCREMENTAL_SHARE)})"
    )
    if nos is not None:
        print(
            f"  nos's Planner.Plan / whole step from scratch (median): "
            f"{nos.wall_s / statistics.median(scratch_steps):.1f}x"
        )
    _breakdown(state, now + timedelta(seconds=30), settings)


def _breakdown(state: ClusterState, now: datetime, settings: PlannerSettings) -> None:
    """Where one compute_plan's time goes: building the nodes, planning, and the rest."""
    with collector_paused():
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
    print("  one computation from scratch, broken down (separate calls, collector paused):")
    print(f"    planning_nodes (state -> Node/Gpu values)   {_ms(built - started)}")
    print(f"    pending pods list                           {_ms(listed - built)}")
    print(f"    plan_cluster                                {_ms(planned - listed)}")
    print(f"    compute_plan as a whole                     {_ms(whole)}")


if __name__ == "__main__":
    raise SystemExit(main())
