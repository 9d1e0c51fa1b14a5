"""End to end with the API emulator in trouble: `mpsflow demo --scenario .../api-faults.yaml`.

The scenario's `api_faults` slows, refuses (500, and 429 with Retry-After), expires (410) and drops the
mpsflow services' requests and watches (in the demo, the pod watcher's lists, watches, release patches
and Events, and the config publisher's node label patches). Nothing may show it: every valid pod Running
or Succeeded, the invalid one rejected, no configuration refused, no admission failure, nothing planned
while idle, no error in the services' logs. The API emulator's request log (`--audit-log`) shows that
the faults fired, on the mpsflow services' requests only, and that the pod watcher's list-and-watch
loops waited out every 429's Retry-After.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from simulation.scenario import load_scenario

pytestmark = pytest.mark.e2e

SCENARIO = Path(__file__).resolve().parents[2] / "simulation" / "scenarios" / "api-faults.yaml"
WATCHER = "mpsflow-pod-watcher"
CLOCK_SLACK_S = 0.01


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary and the API emulator's request log of one demo run of the scenario."""
    out = tmp_path_factory.mktemp("api-faults")
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "demo",
            "--scenario",
            str(SCENARIO),
            "--json",
            str(out / "summary.json"),
            "--audit-log",
            str(out / "requests.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-3000:]
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    requests = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return summary, requests


def test_every_valid_pod_runs_or_succeeds_and_nothing_went_wrong(
    run: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    summary, _ = run
    scenario = load_scenario(SCENARIO)
    assert len(summary["pods"]) == len(scenario.workload) - 1
    for key, pod in summary["pods"].items():
        assert pod["phase"] in ("Running", "Succeeded"), (key, pod)
        assert pod["env"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={pod['size_gb'] * 1024}M", key
    assert list(summary["rejected"]) == ["serving/bad-zero"]
    counters = summary["counters"]
    assert {name: counters[name] for name in counters if name != "plans"} == {
        "configs_refused": 0,
        "admission_failures": 0,
        "plans_while_idle": 0,
        "service_errors": 0,
    }, summary["service_error_lines"]


def test_the_faults_fired_on_the_mpsflow_services_only(
    run: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, requests = run
    faults = Counter((r["identity"], fault) for r in requests for fault in r["faults"])
    print(f"faults injected: {dict(faults)}")
    assert all(identity.startswith("mpsflow-") for identity, _ in faults), faults
    assert {"slow", "gone", "throttled", "error"} <= {fault for _, fault in faults}, faults
    assert {"slow", "gone"} <= {fault for identity, fault in faults if identity == WATCHER}, faults


def test_the_pod_watchers_watches_waited_out_every_retry_after(
    run: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, requests = run
    faults = load_scenario(SCENARIO).api_faults
    assert faults is not None
    loops = [r for r in requests if r["identity"] == WATCHER and r["verb"] in ("list", "watch")]
    waits = []
    for index, throttled in enumerate(loops):
        following = next((r for r in loops[index + 1 :] if r["resource"] == throttled["resource"]), None)
        if "throttled" in throttled["faults"] and following is not None:
            waits.append(following["at"] - throttled["at"])
    assert all(wait >= faults.retry_after_s - CLOCK_SLACK_S for wait in waits), waits
