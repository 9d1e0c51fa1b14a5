"""The scale benchmark runs end to end at a small size and prints every figure it promises."""

from __future__ import annotations

import pytest

from benchmarks import planner_scale


def test_the_scale_benchmark_prints_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--nodes", "6", "--gpus-per-node", "2", "--pods", "40", "--runs", "1", "--repeats", "1"]
    assert planner_scale.main(args) == 0
    out = capsys.readouterr().out
    for figure in (
        "wall time, 1 runs",
        "nos / mpsflow (median)",
        "restart: fold 52 envelopes",
        "+ first decision",
        "collector running",
        "decision (apply + plan)",
        "whole step (apply + decide",
        "incremental / from scratch (medians)",
        "compute_plan as a whole",
    ):
        assert figure in out, figure
