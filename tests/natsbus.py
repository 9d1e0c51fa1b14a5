"""A bus on a real nats-server for tests: the bootstrap first, as in production, then a connection."""

from __future__ import annotations

from events.bootstrap import BusLimits, bootstrap
from events.jetstream import EventBus
from simulation.nats_server import LocalNatsServer


async def bootstrapped_bus(server: LocalNatsServer, *, source: str = "tests") -> EventBus:
    """An admin's bus on `server`, once `mpsflow bootstrap`'s step made the streams and the bucket."""
    await bootstrap(server.options_as_admin(), BusLimits())
    return await EventBus.connect(server.options_as_admin(), source=source)
