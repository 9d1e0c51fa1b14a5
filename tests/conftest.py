"""Shared fixtures: the anyio backend, a real nats-server per test, an event bus on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from events.jetstream import EventBus
from simulation.nats_server import LocalNatsServer
from tests.natsbus import bootstrapped_bus


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def nats_server() -> Iterator[LocalNatsServer]:
    with LocalNatsServer() as server:
        yield server


@pytest.fixture
async def bus(nats_server: LocalNatsServer) -> AsyncIterator[EventBus]:
    connected = await bootstrapped_bus(nats_server)
    try:
        yield connected
    finally:
        await connected.close()
