"""`services.kit.lease`: one active replica per service, by a lease renewed in a key-value bucket.

The rule (`decide`) in a table; the loop (`lead`) with two replicas on the in-memory bucket, in
virtual time: one is active, the other takes over within TTL + poll of the first dying, at once when
it stops cleanly, and a replica that cannot renew stops its work before its lease could expire."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from events.bus import BusUnavailableError, StoredValue
from events.memory import MemoryConfigStore
from services.kit.lease import MARGIN_S, POLL_S, TTL_S, Claim, Lease, LeaseRecord, Take, Wait, decide, lead
from tests.memorybus import virtual_time

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return virtual_time()


def stored(holder: str, expires: float, revision: int = 7) -> StoredValue:
    return StoredValue("planner", LeaseRecord(holder, expires).encode(), revision)


@pytest.mark.parametrize(
    ("current", "now", "expected"),
    [
        (None, 10.0, Claim()),
        (stored("me", 12.0), 10.0, Take(7)),  # renew my own
        (stored("other", 12.0), 10.0, Wait(10.0 + POLL_S)),  # held: look again soon
        (stored("other", 10.2), 10.0, Wait(10.2)),  # held until 10.2: look again then
        (stored("other", 10.0), 10.0, Take(7)),  # expired: take it over
        (StoredValue("planner", b"not json", 3), 10.0, Take(3)),  # garbage: taken over too
    ],
    ids=["absent", "mine", "held", "held-briefly", "expired", "garbage"],
)
def test_what_a_replica_does_about_the_lease(
    current: StoredValue | None, now: float, expected: Claim | Take | Wait
) -> None:
    assert decide(current, "me", now) == expected


class Replica:
    """One replica: the lease loop around a `work` that records when it runs."""

    def __init__(self, store: MemoryConfigStore, name: str) -> None:
        self.lease = Lease(store, "planner", name, anyio.current_time)
        self.active_spans: list[tuple[float, float | None]] = []
        self.changes: list[bool] = []

    async def work(self) -> None:
        self.active_spans.append((anyio.current_time(), None))
        try:
            await anyio.sleep_forever()
        finally:
            start, _ = self.active_spans[-1]
            self.active_spans[-1] = (start, anyio.current_time())

    @property
    def active(self) -> bool:
        return bool(self.active_spans) and self.active_spans[-1][1] is None

    async def run(self) -> None:
        await lead(self.lease, self.work, self.changes.append)


async def until(condition: Callable[[], bool], limit_s: float = 30.0) -> float:
    """Virtual seconds until `condition` holds, looking every 50 ms."""
    started = anyio.current_time()
    with anyio.fail_after(limit_s):
        while True:
            if condition():
                return anyio.current_time() - started
            await anyio.sleep(0.05)


async def test_one_replica_is_active_and_the_other_takes_over_when_it_dies() -> None:
    store = MemoryConfigStore()
    first, second = Replica(store, "planner-a"), Replica(store, "planner-b")
    async with anyio.create_task_group() as group:
        crashed = anyio.CancelScope()

        async def run_first() -> None:
            with crashed:
                await first.run()

        group.start_soon(run_first)
        await until(lambda: first.active)
        group.start_soon(second.run)
        await anyio.sleep(10)
        assert first.active and not second.active  # ten seconds of renewals: no takeover

        # The first dies without giving the lease up (a crash: no give_up, its work just stops).
        first.lease.give_up = _nothing  # type: ignore[method-assign]
        crashed.cancel()
        took = await until(lambda: second.active)
        assert took <= TTL_S + POLL_S
        group.cancel_scope.cancel()


async def _nothing() -> None:
    """A crashed replica gives nothing up."""


async def test_a_replica_that_stops_cleanly_hands_over_at_once() -> None:
    store = MemoryConfigStore()
    first, second = Replica(store, "planner-a"), Replica(store, "planner-b")
    async with anyio.create_task_group() as group:
        stopping = anyio.CancelScope()

        async def run_first() -> None:
            with stopping:
                await first.run()

        group.start_soon(run_first)
        await until(lambda: first.active)
        group.start_soon(second.run)
        await anyio.sleep(2)
        stopping.cancel()  # SIGTERM in a rolling update
        assert await until(lambda: second.active) <= POLL_S + 0.1
        group.cancel_scope.cancel()


class FailingStore(MemoryConfigStore):
    """A bucket that stops answering when told to (the bus is gone for this replica)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def get(self, key: str) -> StoredValue | None:
        if self.down:
            raise BusUnavailableError("no route to the bus")
        return await super().get(key)


async def test_a_replica_that_cannot_renew_stops_before_its_lease_could_expire() -> None:
    store = FailingStore()
    replica = Replica(store, "planner-a")
    async with anyio.create_task_group() as group:
        group.start_soon(replica.run)
        await until(lambda: replica.active)
        await anyio.sleep(5)
        store.down = True
        expires = replica.lease.expires
        await until(lambda: not replica.active)
        _, stopped = replica.active_spans[-1]
        assert stopped is not None and stopped <= expires - MARGIN_S + 0.1
        assert replica.changes == [True, False]
        store.down = False  # the bus is back: it takes the lease again (nobody else wanted it)
        await until(lambda: replica.active)
        group.cancel_scope.cancel()
