"""How many pods mpsflow's planner places, against the optimum and against nos, per instance size.

Run: `.venv/bin/python -m benchmarks.planner_quality [--seeds N]` (needs `pip install .[bench]`).

For seeded small and medium snapshots (`benchmarks.snapshots.generate`), light and contended,
it plans with `plan_cluster` and reports per instance size:

* pods placed by mpsflow; the exact optimum from the ILP (`benchmarks.optimum`): the plain
  maximum number of pods, and the priority-lexicographic optimum (most high-priority pods, then
  the next priority, ...), which a planner that serves higher priorities first can at best reach;
* mean and minimum of placed / optimum, and the instances below it (target: mean >= 99 %);
* how many instances mpsflow's plan is lexicographically worse by priority than the optimum;
* the pods nos's algorithm gets bound (`benchmarks.nos_algorithm`), after one planning cycle
  and after as many cycles as it needs, and the instances where mpsflow places fewer
  (target: never);
* GPUs changed: GPUs whose multiset of slices differs from the input, mpsflow and nos;
* wall time of one `plan_cluster` call.

With `--overdue`, every pending pod is marked overdue (`PendingPod.overdue`: it waited longer than the
planner's `hold_after`), as in a cluster where pods have waited a while: the plan then serves the first
pod left waiting before the others and may hold a GPU for it, and the figures show what that costs.

Instances where mpsflow falls short are listed by seed at the end, so they can be replayed:
`generate(seed, nodes, gpus_per_node, pods, load=...)`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from benchmarks.nos_algorithm import nos_plan
from benchmarks.optimum import solve
from benchmarks.snapshots import dumps, generate
from services.planner.core.model import Node, PendingPod, PlanSettings, Slice
from services.planner.core.run import plan_cluster
from services.planner.snapshot import parse_snapshot

NOS_MAX_CYCLES = 20


@dataclass(frozen=True)
class InstanceSize:
    label: str
    nodes: int
    gpus_per_node: int
    pods: int
    load: float
    seeds: int


SIZES: tuple[InstanceSize, ...] = (
    InstanceSize("small", 4, 2, 20, 0.45, 100),
    InstanceSize("small contended", 4, 2, 40, 0.7, 100),
    InstanceSize("medium", 12, 4, 80, 0.45, 40),
    InstanceSize("medium contended", 12, 4, 160, 0.7, 40),
)


@dataclass
class Row:
    seed: int
    placed: int
    max_opt: int
    prio_opt: int
    proven: bool
    lex_short: int | None  # the first priority (from the top) where the optimum places more
    nos_one: int
    nos_all: int
    lex_below_nos_one: bool
    lex_below_nos_all: bool
    changed: int
    nos_changed: int
    plan_ms: float


@dataclass
class Report:
    size: InstanceSize
    rows: list[Row] = field(default_factory=list)


def gpus_changed(nodes: Sequence[Node], layouts: Mapping[str, Mapping[int, Sequence[Slice]]]) -> int:
    """GPUs whose multiset of slices (size, used) differs between the input and `layouts`."""
    changed = 0
    for node in nodes:
        planned = layouts.get(node.name)
        if planned is None:
            continue
        for gpu in node.gpus:
            after = Counter(planned.get(gpu.index, ()))
            if after != Counter(gpu.slices):
                changed += 1
    return changed


def by_priority(pods: Sequence[PendingPod], keys: set[str]) -> dict[int, int]:
    counts: Counter[int] = Counter(p.priority for p in pods if p.key in keys)
    return dict(counts)


def lexicographically_short(achieved: Mapping[int, int], best: Mapping[int, int]) -> int | None:
    """The priority at which `achieved` falls behind `best`, comparing from the highest priority.

    None when `achieved` is lexicographically as good or better: at the first priority where
    the counts differ, it places more.
    """
    for priority in sorted(set(achieved) | set(best), reverse=True):
        a, b = achieved.get(priority, 0), best.get(priority, 0)
        if a != b:
            return priority if a < b else None
    return None


def measure(size: InstanceSize, seed: int, time_limit_s: float, *, overdue: bool = False) -> Row:
    snapshot = generate(seed, size.nodes, size.gpus_per_node, size.pods, load=size.load)
    nodes, pods = parse_snapshot(dumps(snapshot))
    if overdue:
        pods = [replace(pod, overdue=True) for pod in pods]
    settings = PlanSettings()
    started = time.perf_counter()
    result = plan_cluster(nodes, pods, settings)
    plan_ms = (time.perf_counter() - started) * 1000
    best = solve(nodes, pods, settings, time_limit_s=time_limit_s)
    nos_one = nos_plan(nodes, pods)
    nos_all = nos_plan(nodes, pods, cycles=NOS_MAX_CYCLES)
    mine = by_priority(pods, set(result.placed))
    return Row(
        seed=seed,
        placed=len(result.placed),
        max_opt=best.max_placed,
        prio_opt=best.priority_placed,
        proven=best.max_proven and best.priority_proven,
        lex_short=lexicographically_short(mine, best.by_priority),
        nos_one=nos_one.placed,
        nos_all=nos_all.placed,
        lex_below_nos_one=lexicographically_short(mine, by_priority(pods, set(nos_one.placed_keys)))
        is not None,
        lex_below_nos_all=lexicographically_short(mine, by_priority(pods, set(nos_all.placed_keys)))
        is not None,
        changed=gpus_changed(nodes, result.layouts),
        nos_changed=gpus_changed(nodes, nos_one.layouts),
        plan_ms=plan_ms,
    )


def _ratio(a: int, b: int) -> float:
    return 100.0 if b == 0 else 100.0 * a / b


def render(report: Report) -> str:
    size, rows = report.size, report.rows
    mean = statistics.fmean
    vs_max = [_ratio(r.placed, r.max_opt) for r in rows]
    vs_prio = [_ratio(r.placed, r.prio_opt) for r in rows]
    times = [r.plan_ms for r in rows]
    short_at = Counter(r.lex_short for r in rows if r.lex_short is not None)
    short_detail = ", ".join(f"{n} at priority {p}" for p, n in sorted(short_at.items(), reverse=True))
    lines = [
        f"== {size.label}: {size.nodes} nodes x {size.gpus_per_node} GPUs, {size.pods} pending pods, "
        f"load {size.load:.2f}, seeds 0..{size.seeds - 1} ==",
        f"  ILP proven optimal                          {sum(r.proven for r in rows)}/{len(rows)}",
        f"  mean pods placed: mpsflow                   {mean([r.placed for r in rows]):.2f}",
        f"  mean optimum: max pods                      {mean([r.max_opt for r in rows]):.2f}",
        f"  mean optimum: priority-lexicographic        {mean([r.prio_opt for r in rows]):.2f}",
        f"  placed / max optimum: mean, min             {mean(vs_max):.2f} %, {min(vs_max):.2f} %",
        f"  placed / priority optimum: mean, min        {mean(vs_prio):.2f} %, {min(vs_prio):.2f} %",
        f"  instances below max optimum                 {sum(r.placed < r.max_opt for r in rows)}",
        f"  instances above max optimum (must be 0)     {sum(r.placed > r.max_opt for r in rows)}",
        f"  instances below priority optimum, by count  {sum(r.placed < r.prio_opt for r in rows)}",
        f"  instances lexicographically below it        {sum(short_at.values())}"
        + (f" ({short_detail})" if short_detail else ""),
        f"  mean pods placed: nos, 1 cycle              {mean([r.nos_one for r in rows]):.2f}",
        f"  mean pods placed: nos, converged            {mean([r.nos_all for r in rows]):.2f}",
        f"  instances mpsflow < nos 1 cycle, by count   {sum(r.placed < r.nos_one for r in rows)}",
        f"  instances mpsflow < nos converged, by count {sum(r.placed < r.nos_all for r in rows)}",
        f"  instances lexicographically below nos 1 cycle, converged  "
        f"{sum(r.lex_below_nos_one for r in rows)}, {sum(r.lex_below_nos_all for r in rows)}",
        f"  mean GPUs changed: mpsflow, nos 1 cycle     {mean([r.changed for r in rows]):.2f}, "
        f"{mean([r.nos_changed for r in rows]):.2f}",
        f"  plan_cluster wall time: mean, max           {mean(times):.3f} ms, {max(times):.3f} ms",
    ]
    return "\n".join(lines)


def shortfalls(report: Report) -> list[str]:
    """Seeds below an optimum (compact), and one line per instance below nos."""
    label = report.size.label
    below_max = [r.seed for r in report.rows if r.placed < r.max_opt]
    below_prio = [r.seed for r in report.rows if r.lex_short is not None]
    out = [
        f"  {label}: below max optimum, seeds {below_max or 'none'}",
        f"  {label}: lexicographically below priority optimum, seeds {below_prio or 'none'}",
    ]
    for r in report.rows:
        by_count = r.placed < r.nos_one or r.placed < r.nos_all
        by_priority = r.lex_below_nos_one or r.lex_below_nos_all
        if by_count or by_priority:
            how = "by count" if not by_priority else "lexicographically" if not by_count else "both"
            out.append(
                f"  {label} seed {r.seed}: mpsflow {r.placed} < nos {r.nos_one} (1 cycle) / "
                f"{r.nos_all} (converged), {how}; optimum {r.max_opt} max, {r.prio_opt} by priority"
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.planner_quality", description=__doc__)
    parser.add_argument("--seeds", type=int, help="seeds per instance size (default: per size)")
    parser.add_argument("--time-limit", type=float, default=10.0, help="ILP time limit per solve, seconds")
    parser.add_argument("--overdue", action="store_true", help="plan as though every pod were overdue")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    reports: list[Report] = []
    for size in SIZES:
        count = args.seeds if args.seeds is not None else size.seeds
        report = Report(size=InstanceSize(**{**size.__dict__, "seeds": count}))
        report.rows = [measure(size, seed, args.time_limit, overdue=args.overdue) for seed in range(count)]
        reports.append(report)
        print(render(report), flush=True)
    short = [line for report in reports for line in shortfalls(report)]
    print("== instances where mpsflow does worse than an optimum or than nos ==")
    print("\n".join(short))
    print(f"(benchmark ran {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
