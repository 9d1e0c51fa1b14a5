"""`mpsflow record` and `mpsflow replay` as a user runs them, on a real nats-server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from events import subjects
from events.envelope import decode
from events.jetstream import EventBus
from events.pods import PodDeleted
from simulation.nats_server import LocalNatsServer

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def mpsflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_replay_prints_the_plans_of_a_recorded_stream() -> None:
    finished = mpsflow("replay", str(GOLDEN / "demo.events.jsonl"))
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == (GOLDEN / "demo.plans.jsonl").read_text()


def test_replay_refuses_a_bad_line_naming_it(tmp_path: Path) -> None:
    recorded = tmp_path / "events.jsonl"
    lines = (GOLDEN / "demo.events.jsonl").read_text().splitlines()[:3]
    recorded.write_text("\n".join([*lines, '{"id": "x"}']) + "\n")
    finished = mpsflow("replay", str(recorded))
    assert finished.returncode == 2
    assert finished.stderr.startswith(f"mpsflow replay: {recorded}:4: ")
    assert finished.stdout == ""


@pytest.mark.anyio
async def test_record_writes_every_event_of_the_stream(
    bus: EventBus, nats_server: LocalNatsServer, tmp_path: Path
) -> None:
    for name in ("a", "b"):
        await bus.publish(
            subjects.pod_subject("default", name), PodDeleted(namespace="default", name=name, uid=name)
        )
    out = tmp_path / "recorded.jsonl"
    finished = mpsflow("record", "--nats-url", nats_server.url, str(out))
    assert finished.returncode == 0, finished.stderr
    recorded = [decode(line.encode()).event for line in out.read_text().splitlines()]
    assert recorded == [PodDeleted(namespace="default", name=n, uid=n) for n in ("a", "b")]
