"""One active replica per service: a lease in a key-value bucket, held by renewing it.

Where it sits: around the whole of a control-plane service (planner, config publisher, pod watcher).
`lead` runs the service only while this replica holds the service's lease; a second replica waits,
and takes the lease over once the holder stops renewing it (crashed, partitioned) or gives it up
(stopped: a rolling update hands over at once). Losing the lease stops the service before the
lease can have expired, so two replicas never act at once for longer than a clock can drift; what
they do is idempotent anyway (every message id and every write is derived from content, compare-
and-set or deduplicated), so an overlap costs work, never a duplicate or a lost effect.

The lease is a JSON value `{"holder": ..., "expires": ...}` in the `mpsflow-leases` bucket, written
only by compare-and-set on the revision read: create when absent, update when held by this replica
or expired. `expires` is the holder's clock; replicas' clocks agree to well under `MARGIN_S` on a
cluster with NTP. `decide` is the pure rule; `lead` is the loop around it. Nothing here knows what
the service does.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from events.bus import BusUnavailableError, ConfigStore, RevisionConflictError, StoredValue

log = logging.getLogger(__name__)

TTL_S = 3.0
"""How long a lease lasts unless renewed: a standby takes over within this, plus `POLL_S`."""
RENEW_S = 1.0
POLL_S = 0.5
MARGIN_S = 0.5
"""The holder stops its service this long before its lease would expire unrenewed."""


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    expires: float

    def encode(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": self.expires}, sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes) -> LeaseRecord | None:
        """The record, or None for a value that is not one (taken over like an expired lease)."""
        try:
            fields = json.loads(value)
            return cls(str(fields["holder"]), float(fields["expires"]))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Claim:
    """Create the lease (it does not exist)."""


@dataclass(frozen=True)
class Take:
    """Write the lease at `revision`: renew it, or take it over from a holder that let it expire."""

    revision: int


@dataclass(frozen=True)
class Wait:
    """Another replica holds it; look again at `until` (the holder's expiry, or a poll)."""

    until: float


def decide(stored: StoredValue | None, me: str, now: float) -> Claim | Take | Wait:
    """What replica `me` does about the lease, as `stored` shows it at `now`."""
    if stored is None:
        return Claim()
    record = LeaseRecord.decode(stored.value)
    if record is None or record.holder == me or record.expires <= now:
        return Take(stored.revision)
    return Wait(min(record.expires, now + POLL_S))


class Lease:
    """Replica `me`'s side of the lease `name` in `store`, on `clock` (seconds, any epoch the
    replicas share: wall-clock time in production)."""

    def __init__(self, store: ConfigStore, name: str, me: str, clock: Callable[[], float]) -> None:
        self.store = store
        self.name = name
        self.me = me
        self.clock = clock
        self.revision: int | None = None
        self.expires = 0.0

    async def try_hold(self) -> float | None:
        """Claim, renew or take over the lease: None when this replica holds it now, else when to
        try again."""
        now = self.clock()
        try:
            stored = await self.store.get(self.name)
            action = decide(stored, self.me, now)
            if isinstance(action, Wait):
                return action.until
            record = LeaseRecord(self.me, now + TTL_S)
            if isinstance(action, Claim):
                self.revision = await self.store.create(self.name, record.encode())
            else:
                self.revision = await self.store.update(self.name, record.encode(), last=action.revision)
        except RevisionConflictError:  # another replica wrote it first: look again soon
            return now + POLL_S
        except BusUnavailableError as error:
            log.warning("lease %s: the bus does not answer (%s)", self.name, error)
            return now + POLL_S
        self.expires = record.expires
        return None

    async def give_up(self) -> None:
        """Let the lease expire now, so that a standby takes over at once (best effort)."""
        if self.revision is None:
            return
        with (
            anyio.move_on_after(1.0, shield=True),
            contextlib.suppress(RevisionConflictError, BusUnavailableError),
        ):
            await self.store.update(self.name, LeaseRecord(self.me, 0.0).encode(), last=self.revision)
        self.revision = None


async def lead(
    lease: Lease, work: Callable[[], Awaitable[None]], on_change: Callable[[bool], None] = lambda active: None
) -> None:
    """Run `work` whenever `lease` is held, until cancelled: wait for the lease, run `work` while
    renewing, and when a renewal fails for so long that the lease may expire, cancel `work` and wait
    again. `work` is called afresh each time (a service rebuilds its state when it becomes active).
    `on_change(True/False)` tells when this replica becomes active or standby."""
    try:
        while True:
            await _acquire(lease)
            log.info("lease %s: %s is active", lease.name, lease.me)
            on_change(True)
            async with anyio.create_task_group() as group:
                group.start_soon(_run_then_stop, work, group.cancel_scope)
                await _keep(lease)
                group.cancel_scope.cancel()
            log.warning("lease %s: %s lost it; standing by", lease.name, lease.me)
            on_change(False)
    finally:
        await lease.give_up()


async def _acquire(lease: Lease) -> None:
    """Until this replica holds the lease."""
    while True:
        retry_at = await lease.try_hold()
        if retry_at is None:
            return
        await anyio.sleep(max(0.0, retry_at - lease.clock()))


async def _run_then_stop(work: Callable[[], Awaitable[None]], scope: anyio.CancelScope) -> None:
    await work()
    scope.cancel()


async def _keep(lease: Lease) -> None:
    """Renew the lease every `RENEW_S`; return once it cannot be renewed before it would expire."""
    while True:
        await anyio.sleep(RENEW_S)
        while (retry_at := await lease.try_hold()) is not None:
            if retry_at >= lease.expires - MARGIN_S:
                return
            await anyio.sleep(max(0.0, retry_at - lease.clock()))
