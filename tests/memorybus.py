"""Service tests on the in-memory bus, in virtual time.

`virtual_time` is an anyio backend whose event loop runs on a virtual clock (looptime): when every
task waits, the clock jumps to the next timer, so a batch window of 100 ms or a retry after 30 s
costs nothing and happens at exactly its time, and a test that waits for something waits for it,
never for luck. The broker's wall clock (`MemoryBroker.clock`) is derived from the same loop
clock, so event times and the services' `now` agree with it.

`MemoryLog` reads what the broker stored, waiting on the broker's own "something was stored"
signal instead of polling.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
import looptime

from events.base import Model
from events.envelope import Event
from events.memory import MemoryBroker

E = TypeVar("E", bound=Model)

EPOCH = datetime(2026, 12, 1, tzinfo=UTC)
WAIT = 60.0  # virtual seconds: generous, and free


def virtual_time() -> tuple[str, dict[str, Any]]:
    """The value of an `anyio_backend` fixture that runs tests on a virtual clock."""
    return ("asyncio", {"loop_factory": looptime.new_event_loop})


def loop_clock() -> datetime:
    """Wall-clock time as the virtual loop tells it."""
    return EPOCH + timedelta(seconds=anyio.current_time())


def virtual_broker() -> MemoryBroker:
    return MemoryBroker(clock=loop_clock)


class MemoryLog:
    """Every event the broker stored, in stream order."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    @property
    def events(self) -> list[tuple[str, Event]]:
        return [
            (message.subject, envelope.event)
            for message in self.broker.stored()
            if (envelope := message.envelope()) is not None
        ]

    @property
    def undecodable(self) -> list[str]:
        return [m.subject for m in self.broker.stored() if m.envelope() is None]

    def of(self, kind: type[E]) -> list[E]:
        return [event for _, event in self.events if isinstance(event, kind)]

    def on(self, subject: str) -> list[Event]:
        return [event for s, event in self.events if s == subject]

    async def wait_for(
        self, kind: type[E], where: Callable[[E], bool] = lambda _: True, within: float = WAIT
    ) -> E:
        """The first stored event of `kind` that satisfies `where`, waiting (boundedly) for it."""
        with anyio.fail_after(within):
            while True:
                for event in self.of(kind):
                    if where(event):
                        return event
                await self.broker.next_store()


async def advance(seconds: float) -> None:
    """Let `seconds` of virtual time pass with no input: every timer due in them fires, in order."""
    await anyio.sleep(seconds)
