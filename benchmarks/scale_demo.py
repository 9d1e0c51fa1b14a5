"""`make scale-demo`: the large demo scenarios, each played once, with what it took.

For each scenario (default: `simulation/scenarios/scale-200.yaml`, then `burst-500.yaml`) it runs
`mpsflow demo --scenario FILE --json OUT` as a subprocess and prints, from the outside: seconds from
starting the command to its `cluster ready` line (the demo gives up at 30 s), seconds to its end,
its exit status, and the machine's load average around the run (`os.getloadavg`: what else the
cores were doing); then, from the summary: the pods by phase, the counters, and the latency
figures, pending-to-running and mpsflow's part, for all pods and apart for pods whose slice came
with a reclaim. The demo's own output goes to a log file beside the summary (`--out DIR`).

    python -m benchmarks.scale_demo [--out DIR] [SCENARIO ...]

Exit status 1 when a run failed (the demo's own status), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = (
    REPO / "simulation" / "scenarios" / "scale-200.yaml",
    REPO / "simulation" / "scenarios" / "burst-500.yaml",
)
READY_LINE = "cluster ready"


def play(scenario: Path, out: Path) -> dict[str, Any]:
    """One demo run of `scenario`: its timings from the outside and its summary."""
    summary_file = out / f"{scenario.stem}.summary.json"
    log_file = out / f"{scenario.stem}.log"
    summary_file.unlink(missing_ok=True)
    load_before = os.getloadavg()
    started = time.monotonic()
    ready_s = None
    with log_file.open("w") as log:
        demo = subprocess.Popen(
            [
                *(sys.executable, "-m", "services.cli", "demo"),
                *("--scenario", str(scenario), "--json", str(summary_file)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        assert demo.stdout is not None
        for line in demo.stdout:
            log.write(line)
            if ready_s is None and READY_LINE in line:
                ready_s = time.monotonic() - started
                print(f"  {ready_s:6.1f}s  {line.strip()}", flush=True)
        status = demo.wait()
    total_s = time.monotonic() - started
    result: dict[str, Any] = {
        "scenario": str(scenario.relative_to(REPO) if scenario.is_relative_to(REPO) else scenario),
        "status": status,
        "ready_seconds": None if ready_s is None else round(ready_s, 1),
        "total_seconds": round(total_s, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "log": str(log_file),
    }
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        result["phases"] = dict(Counter(pod["phase"] for pod in summary["pods"].values()))
        result["rejected"] = len(summary["rejected"])
        result["counters"] = summary["counters"]
        result["latency"] = summary["latency"]
        result["summary"] = str(summary_file)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale_demo", description="The large demo scenarios."
    )
    parser.add_argument("scenarios", nargs="*", type=Path, default=list(SCENARIOS))
    parser.add_argument(
        "--out", type=Path, help="where the summaries and logs go (default: a new temporary directory)"
    )
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="mpsflow-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    failed = False
    for scenario in args.scenarios:
        print(f"{scenario}: playing (log in {out / (scenario.stem + '.log')})", flush=True)
        result = play(scenario.resolve(), out)
        failed = failed or result["status"] != 0
        print(json.dumps(result, indent=2), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
