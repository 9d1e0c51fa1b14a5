"""Shared fixtures: the anyio backend, a real nats-server per test, an event bus on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from events.jetstream import EventBus
from simulation.nats_server import LocalNatsServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def nats_server() -> Iterator[LocalNatsServer]:
    with LocalNatsServer() as server:
        yield server


@pytest.fixture
async def bus(nats_server: LocalNatsServer) -> AsyncIterator[EventBus]:
    connected = await EventBus.connect(nats_server.url, source="tests")
    try:
        yield connected
    finally:
        await connected.close()
