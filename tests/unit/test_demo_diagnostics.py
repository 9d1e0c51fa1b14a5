"""What the demo says when something went wrong, before its logs go with it."""

from __future__ import annotations

from pathlib import Path

from simulation.demo import log_tail, service_error_lines


def test_service_errors_are_counted_and_shown_with_their_log_but_not_the_clusters(tmp_path: Path) -> None:
    (tmp_path / "planner.log").write_text(
        "2026-12-03 05:00:00 INFO planner: plan p1\n"
        "2026-12-03 05:00:01 ERROR planner: publishing a step failed\n"
        "Traceback (most recent call last):\n"
    )
    (tmp_path / "pod-watcher.log").write_text("2026-12-03 05:00:02 WARNING x: a retry\n")
    (tmp_path / "cluster.log").write_text("2026-12-03 05:00:03 ERROR kubelet: what a real kubelet logs\n")
    assert service_error_lines(tmp_path) == [
        "planner: 2026-12-03 05:00:01 ERROR planner: publishing a step failed",
        "planner: Traceback (most recent call last):",
    ]


def test_the_end_of_a_dead_processs_log_is_read_or_said_missing(tmp_path: Path) -> None:
    log = tmp_path / "mps-daemons-a100-2.log"
    log.write_text("".join(f"line {n}\n" for n in range(20)))
    assert log_tail(log, 3) == ["line 17", "line 18", "line 19"]
    [missing] = log_tail(tmp_path / "gone.log")
    assert missing.startswith("(no log: ")
