"""Shared by the end-to-end tests: one run of the built-in demo for the whole session.

`mpsflow demo --compat` runs once, as a subprocess, writing its summary (read by test_demo.py) and
the API emulator's request log (audited by test_rbac.py). Compatibility mode makes the config
publisher write nebuly's device-plugin ConfigMap besides the node labels, so that the audit sees
every kind of request the services make. The built-in workload runs here with a 1 s node-status
period to keep the suite short; test_hostile.py plays a hostile scenario at a real kubelet's 10 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulation.scenario import load_scenario

FAST_TIMING = {"node_status_period_s": 1.0, "watch_delay_s": 0.05}


@pytest.fixture(scope="session")
def demo_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding summary.json and requests.jsonl of one successful built-in demo."""
    out = tmp_path_factory.mktemp("demo")
    scenario = load_scenario(None).model_dump(mode="json")
    scenario["timing"] = FAST_TIMING
    (out / "scenario.json").write_text(json.dumps(scenario))
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "demo",
            "--scenario",
            str(out / "scenario.json"),
            "--compat",
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
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def demo_summary(demo_outputs: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((demo_outputs / "summary.json").read_text())
    return loaded


@pytest.fixture(scope="session")
def demo_requests(demo_outputs: Path) -> list[dict[str, Any]]:
    """Every request the API emulator recorded during the demo (simulation.apiserver.RequestRecord)."""
    lines = (demo_outputs / "requests.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
