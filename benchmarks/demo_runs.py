"""How the whole system behaves over repeated demo runs: failed pods, refusals, plans, latency.

Run: `.venv/bin/python -m benchmarks.demo_runs [--runs 10] [--scenario FILE] [--hog]` (or
`make demo-runs`). Each run is `mpsflow demo --json` as a new user runs it, every service its own
process; `--hog` keeps one core busy with another process meanwhile, as a loaded machine would.
It prints one line per run and then, over all runs: runs that failed, pods that ended Failed,
configs refused, admission failures, plans published while idle, plans per pod, and the
pending-to-running p50/p99 (creation to running) beside what mpsflow adds (creation until the
slice the pod ends on is listed to its kubelet), pooled over every pod of every run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _spin() -> None:
    while True:
        pass


@contextmanager
def one_core_busy(enabled: bool) -> Iterator[None]:
    """Another process spinning on one core while the block runs (nothing when not `enabled`)."""
    if not enabled:
        yield
        return
    hog = multiprocessing.Process(target=_spin, daemon=True)
    hog.start()
    try:
        yield
    finally:
        hog.terminate()
        hog.join()


def run_once(scenario: Path | None, out: Path) -> tuple[int, float, dict[str, Any] | None]:
    command = [sys.executable, "-m", "services.cli", "demo", "--json", str(out)]
    if scenario is not None:
        command += ["--scenario", str(scenario)]
    started = time.monotonic()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.monotonic() - started
    summary = json.loads(out.read_text()) if out.exists() else None
    return finished.returncode, elapsed, summary


def _quantile(values: Sequence[float], q: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--scenario", type=Path, help="a scenario file (default: the built-in one)")
    parser.add_argument("--hog", action="store_true", help="keep one core busy meanwhile")
    args = parser.parse_args(argv)

    name = args.scenario.name if args.scenario else "built-in scenario"
    print(f"== {args.runs} runs of mpsflow demo, {name}{', one core kept busy' if args.hog else ''} ==")
    failed_runs = 0
    counters = {
        "failed pods": 0,
        "configs refused": 0,
        "admission failures": 0,
        "plans while idle": 0,
        "errors in service logs": 0,
    }
    plans = pods = 0
    pending: list[float] = []
    mpsflow: list[float] = []
    with one_core_busy(args.hog), tempfile.TemporaryDirectory() as scratch:
        for run in range(1, args.runs + 1):
            status, elapsed, summary = run_once(args.scenario, Path(scratch) / f"summary-{run}.json")
            if summary is None:
                failed_runs += 1
                print(f"  run {run:2d}: exit {status} in {elapsed:.0f} s, no summary")
                continue
            failed_runs += status != 0
            ran = summary["pods"].values()
            failed = sum(pod["phase"] == "Failed" for pod in ran)
            count = summary["counters"]
            counters["failed pods"] += failed
            counters["configs refused"] += count["configs_refused"]
            counters["admission failures"] += count["admission_failures"]
            counters["plans while idle"] += count["plans_while_idle"]
            counters["errors in service logs"] += count["service_errors"]
            plans += count["plans"]
            pods += len(summary["pods"])
            pending += [pod["pending_seconds"] for pod in ran if pod["pending_seconds"] is not None]
            mpsflow += [pod["mpsflow_seconds"] for pod in ran if pod["mpsflow_seconds"] is not None]
            latency = summary["latency"]
            print(
                f"  run {run:2d}: exit {status} in {elapsed:.0f} s; {failed} Failed, "
                f"{count['configs_refused']} refused, {count['admission_failures']} admission failures, "
                f"{count['plans_while_idle']} idle plans, {count['plans']} plans; pending p50 "
                f"{latency['pending_p50']:.2f} s p99 {latency['pending_p99']:.2f} s, mpsflow p50 "
                f"{latency['mpsflow_p50']:.2f} s p99 {latency['mpsflow_p99']:.2f} s"
            )
    print(f"  runs that failed                 {failed_runs} of {args.runs}")
    for label, value in counters.items():
        print(f"  {label:32} {value}")
    print(f"  plans per pod                    {plans / pods if pods else 0:.2f} ({plans} for {pods} pods)")
    print(
        f"  pending-to-running p50, p99      {statistics.median(pending) if pending else 0:.2f} s, "
        f"{_quantile(pending, 99):.2f} s  ({len(pending)} pods)"
    )
    print(
        f"  of which mpsflow p50, p99        {statistics.median(mpsflow) if mpsflow else 0:.2f} s, "
        f"{_quantile(mpsflow, 99):.2f} s"
    )
    return 1 if failed_runs or counters["failed pods"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
