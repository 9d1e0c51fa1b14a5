"""`services.kit.status` over real HTTP: what probes and Prometheus are told, and the CLI's flag."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from events import metrics
from events.metrics import DEAD_LETTERS
from services.cli import build_parser
from services.kit.listen import ListenAddress
from services.kit.status import Status, StatusServer

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def served() -> AsyncIterator[tuple[Status, Clock, str]]:
    clock = Clock()
    status = Status(clock=clock)
    server = StatusServer(status)
    await server.start(ListenAddress("127.0.0.1", 0))
    try:
        yield status, clock, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def test_readiness_says_why_not_then_the_role(served: tuple[Status, Clock, str]) -> None:
    status, _, base = served
    assert await get(f"{base}/readyz") == (503, "not ready: starting\n")
    status.ready("standby")
    assert await get(f"{base}/readyz") == (200, "standby\n")
    status.ready("active")
    assert await get(f"{base}/readyz") == (200, "active\n")
    status.not_ready("lost the bus")
    assert await get(f"{base}/readyz") == (503, "not ready: lost the bus\n")


async def test_health_fails_when_a_watched_loop_stops_beating(served: tuple[Status, Clock, str]) -> None:
    status, clock, base = served
    assert await get(f"{base}/healthz") == (200, "ok\n")
    status.watch("heartbeat", within=60)
    clock.now += 59
    assert await get(f"{base}/healthz") == (200, "ok\n")
    clock.now += 2
    code, text = await get(f"{base}/healthz")
    assert code == 503 and "heartbeat last beat 61 s ago (limit 60 s)" in text
    status.beat("heartbeat")
    assert await get(f"{base}/healthz") == (200, "ok\n")


async def test_metrics_are_the_prometheus_text_format(served: tuple[Status, Clock, str]) -> None:
    _, _, base = served
    DEAD_LETTERS.labels("status-test", "undecodable").inc()
    code, text = await get(f"{base}/metrics")
    assert code == 200
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = [
        s for s in families["mpsflow_dead_letters"].samples if s.labels.get("consumer") == "status-test"
    ]
    assert [(s.name, s.value) for s in samples if s.name.endswith("_total")] == [
        ("mpsflow_dead_letters_total", 1.0)
    ]
    assert "process_resident_memory_bytes" in families or "python_info" in families


async def test_a_registry_of_its_own_serves_only_its_metrics() -> None:
    registry = CollectorRegistry()
    Counter("only_here", "a metric of this registry", registry=registry).inc()
    server = StatusServer(Status(), registry)
    await server.start(ListenAddress("127.0.0.1", 0))
    try:
        _, text = await get(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        await server.close()
    assert {family.name for family in text_string_to_metric_families(text)} <= {
        "only_here",
        "only_here_created",
    }
    assert "only_here_total 1.0" in text


@pytest.mark.parametrize(
    ("given", "address"),
    [
        (None, ListenAddress("0.0.0.0", 8080)),
        ("none", None),
        ("127.0.0.1:9000", ListenAddress("127.0.0.1", 9000)),
        (":9100", ListenAddress("0.0.0.0", 9100)),
        ("fd:3", ListenAddress(inherited_fd=3)),
    ],
)
def test_every_service_takes_a_status_address(given: str | None, address: ListenAddress | None) -> None:
    for service in ("pod-watcher", "planner", "config-publisher", "admission-webhook"):
        flag = [] if given is None else ["--status-address", given]
        assert build_parser().parse_args(["run", service, *flag]).status_address == address
    for service in ("node-agent", "mps-daemons"):
        flag = [] if given is None else ["--status-address", given]
        assert build_parser().parse_args(["run", service, "--node", "n", *flag]).status_address == address


def test_a_bad_status_address_is_refused_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "planner", "--status-address", "8080"])
    assert exit_.value.code == 2
    assert "argument --status-address: '8080' is not HOST:PORT or fd:N" in capsys.readouterr().err


def test_the_observability_page_lists_every_metric_with_its_type_and_labels() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")
        for line in page.splitlines()
        if "| `mpsflow_" in line
    }
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        [family] = list(value.describe())
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in rows, f"{name} is not in docs/observability.md"
        row = rows[name]
        assert row[2].strip() == family.type, (name, row[2])
        for label in value._labelnames:
            assert f"`{label}`" in row[3], (name, label, row[3])
