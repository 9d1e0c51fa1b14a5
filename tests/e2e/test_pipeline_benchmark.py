"""The pipeline benchmark runs end to end at a small size, from both sources, and prints every figure
it promises (`make test` keeps it from rotting; its figures are measured at size outside it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_the_pipeline_benchmark_prints_every_figure() -> None:
    command = [sys.executable, "-m", "benchmarks.pipeline_throughput", "--pods", "60", "--nodes", "3"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    out = finished.stdout
    assert finished.returncode == 0, out[-3000:] + finished.stderr[-3000:]
    for source in ("api", "watch"):
        assert f"round 1, {source}: 60 pods on 3 nodes" in out, source
    assert out.count("events/s, its last") == 2
    assert out.count("a plan of every pod") == 2
    for service in ("pod-watcher", "planner", "config-publisher", "admission-webhook"):
        assert out.count(f"{service} ") >= 2, service
    assert out.count("cpu during the burst:") == 2
    assert out.count("peak RSS:") == 2
    assert out.count("where the time went (spans, by total):") == 2
    assert "pod-watcher" in out and "publish PodObserved" in out
