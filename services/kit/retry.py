"""The failure policy: which failures are tried again, on which schedule, and which never are.

Errors (the taxonomy is `events/bus.py`'s):

- Transient: the effect cannot happen now but may later. `TransientError` (an API answered an
  error, a connection dropped, a compare-and-set kept losing), `BusUnavailableError` (a publish
  did not reach NATS), a conflict (HTTP 409, `RevisionConflictError`), a kubelet that refuses or
  lacks its socket, an MPS daemon that does not start. Code that meets one tries again on a
  schedule below; a bus handler that raises `TransientError` gets its message again after
  `retry_after` or `events.bus.NAK_DELAYS` (0.2, 1, 5, 15 s), up to `max_deliver` deliveries.
- Permanent: `PermanentError` (the message contradicts itself or names what cannot exist), and a
  message that does not decode. Never retried: `events.bus.deliver` terminates the message and
  records it as a `DeadLetter` at once. Any other exception in a handler is a bug or a surprise:
  it is redelivered on `NAK_DELAYS` and dead-lettered after the last delivery.

Schedules: `first` seconds after the first failure, doubling after each further one up to
`longest`; `attempts` tries in all (None: until it works). The delays are stamina's formula
(`first * 2 ** (failure - 1)`, capped), whether stamina waits (`retrying`, `keep_running`) or a
loop that must cut its wait short waits by itself (`Backoff.delay`). A failure that says how long
to wait (a `TransientError` with `retry_after`: an API's 429 with `Retry-After`) waits exactly that
instead, in `retrying` and `keep_running` as on the bus; it still counts as a failure.

- `KUBERNETES_API` (0.2 s to 10 s, forever): lists and watches (`kit.watching.list_and_watch`,
  starting over once a change was delivered, and waiting a 429's `Retry-After`); the config
  publisher's compatibility writes (waits by itself: a new ask cuts the wait short).
- `KUBERNETES_EVENT` (0.2 s to 10 s, 5 tries): the pod watcher's rejection Events, then given up,
  since the watch must go on.
- `CONFLICT` (0.05 s to 0.4 s plus up to 0.05 s of jitter, 5 tries): compare-and-set that lost to
  another writer: the config publisher's KV key, the compatibility ConfigMap and node patches,
  the pod watcher's release patch. Then a `TransientError` (the bus redelivers the message) or,
  for the compatibility writes, a failed node that the next pass writes again.
- `BUS` (0.5 s to 30 s, forever): the planner publishing a step.
- `KUBELET` (0.1 s to 5 s, forever): the device plugin's registrations with the kubelet (waits by
  itself: a new kubelet.sock cuts the wait short).
- `MPS_DAEMON` (1 s to 60 s, forever): the node agent starting a dead MPS daemon again (the
  heartbeat drives the tries; the schedule gives the earliest next one).

Two schedules stay in `events/`, which imports no service: the redelivery delays `NAK_DELAYS`
(`events/bus.py`), and the JetStream consumer's wait after a failed fetch, the NATS client's own
reconnect interval (`events.jetstream.RECONNECT_WAIT`, 0.5 s).

Tests that need retries to be instant pass a short `Backoff`, or use `stamina.set_testing(True,
...)`, which also bounds every retry to a number of attempts, forever ones included (so never
around `keep_running`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import stamina

from events.bus import TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")
Retryable = type[Exception] | tuple[type[Exception], ...]


@dataclass(frozen=True)
class Backoff:
    """A retry schedule: `first` seconds after the first failure, doubling up to `longest`;
    `attempts` tries in all (None: no limit); plus up to `jitter` seconds at random."""

    first: float
    longest: float
    attempts: int | None = None
    jitter: float = 0.0

    def delay(self, failures: int) -> float:
        """The wait after `failures` failures in a row (1 or more), without jitter."""
        return min(self.longest, self.first * 2.0 ** (failures - 1))


KUBERNETES_API = Backoff(first=0.2, longest=10.0)
KUBERNETES_EVENT = Backoff(first=0.2, longest=10.0, attempts=5)
CONFLICT = Backoff(first=0.05, longest=0.4, attempts=5, jitter=0.05)
BUS = Backoff(first=0.5, longest=30.0)
KUBELET = Backoff(first=0.1, longest=5.0)
MPS_DAEMON = Backoff(first=1.0, longest=60.0)


def _asked_wait(error: Exception) -> float | None:
    """The wait a failure asked for (a `TransientError`'s `retry_after`), if any."""
    return error.retry_after if isinstance(error, TransientError) else None


def _attempts(on: Retryable, backoff: Backoff, attempts: int | None) -> AsyncIterable[stamina.Attempt]:
    def retry_or_wait(error: Exception) -> bool | float:
        """stamina's backoff hook: whether to retry `error`, or after how long when it asked."""
        if not isinstance(error, on):
            return False
        asked = _asked_wait(error)
        return True if asked is None else asked

    return stamina.retry_context(
        on=retry_or_wait,
        attempts=attempts,
        timeout=None,
        wait_initial=backoff.first,
        wait_max=backoff.longest,
        wait_jitter=backoff.jitter,
    )


def _log_retry(level: int, what: str, error: Exception, attempt: stamina.Attempt) -> None:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    asked = _asked_wait(error)
    wait = attempt.next_wait if asked is None else asked
    log.log(level, "%s failed (%s); trying again in %.2fs", what, reason, wait)


async def retrying(
    run: Callable[[], Awaitable[T]],
    *,
    on: Retryable,
    backoff: Backoff,
    what: str,
    level: int = logging.WARNING,
) -> T:
    """What `run()` returns; after a failure of a type in `on`, waits by `backoff` and runs it again.

    Each retry is logged at `level`, saying `what` failed, why and for how long it waits. After
    `backoff.attempts` tries the last failure is raised; any other exception is raised at once.
    """
    async for attempt in _attempts(on, backoff, backoff.attempts):
        with attempt:
            try:
                return await run()
            except on as error:
                if backoff.attempts is None or attempt.num < backoff.attempts:
                    _log_retry(level, what, error, attempt)
                raise
    raise AssertionError("unreachable: stamina either returns or raises")


async def keep_running(
    session: Callable[[Callable[[], None]], Awaitable[None]],
    *,
    on: Retryable,
    backoff: Backoff,
    what: str,
) -> NoReturn:
    """Runs `session(progress)` until cancelled: again at once when it returns, again after
    `backoff`'s delay when it fails with `on` (forever, whatever `backoff.attempts` says).

    A session calls `progress()` whenever it got something done; the schedule then starts over, so
    a failure after progress waits `backoff.first`, however many failures came before it.
    """
    progressed = False

    def progress() -> None:
        nonlocal progressed
        progressed = True

    failed_after_progress: Exception | None = None
    while True:
        # One retry context per run of failures: a fresh one is how stamina's schedule starts over.
        async for attempt in _attempts(on, backoff, None):
            with attempt:
                if failed_after_progress is not None:
                    # The failure that ended the last run of successes, as this run's first one.
                    error, failed_after_progress = failed_after_progress, None
                    _log_retry(logging.WARNING, what, error, attempt)
                    raise error
                progressed = False
                try:
                    await session(progress)
                except on as error:
                    if not progressed:
                        _log_retry(logging.WARNING, what, error, attempt)
                        raise
                    failed_after_progress = error
