"""A test's view of the bus: every event on `mpsflow.>` in stream order, read on demand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self, TypeVar

import anyio
import nats.errors
from nats.js import api as js_api

from events import subjects
from events.base import Model
from events.envelope import Event, UndecodableMessageError, decode
from events.jetstream import EventBus

E = TypeVar("E", bound=Model)

WAIT = 5.0


class BusLog:
    """Reads the stream through an ordered push subscription; messages that are not envelopes
    (a test's poison) are only noted by subject."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._subscription: Any = None
        self.events: list[tuple[str, Event]] = []
        self.undecodable: list[str] = []

    async def __aenter__(self) -> Self:
        self._subscription = await self._bus.js.subscribe(
            subjects.ALL_EVENTS,
            ordered_consumer=True,
            config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._subscription.unsubscribe()

    async def read_one(self, wait: float) -> bool:
        """Read the next message if one comes within `wait` seconds."""
        try:
            message = await self._subscription.next_msg(timeout=wait)
        except nats.errors.TimeoutError:
            return False
        try:
            self.events.append((message.subject, decode(message.data).event))
        except UndecodableMessageError:
            self.undecodable.append(message.subject)
        return True

    async def wait_for(
        self, kind: type[E], where: Callable[[E], bool] = lambda _: True, within: float = WAIT
    ) -> E:
        """The first event of `kind` (already read or still to come) that satisfies `where`."""
        checked = 0
        with anyio.fail_after(within):
            while True:
                for _, event in self.events[checked:]:
                    if isinstance(event, kind) and where(event):
                        return event
                checked = len(self.events)
                await self.read_one(0.05)

    async def settle(self, quiet: float = 0.3, within: float = WAIT) -> None:
        """Read until nothing arrived for `quiet` seconds."""
        with anyio.fail_after(within):
            while await self.read_one(quiet):
                pass

    def of(self, kind: type[E]) -> list[E]:
        return [event for _, event in self.events if isinstance(event, kind)]

    def on(self, subject: str) -> list[Event]:
        return [event for s, event in self.events if s == subject]
