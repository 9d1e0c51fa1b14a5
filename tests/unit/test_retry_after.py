"""A failure that says how long to wait (`TransientError.retry_after`: an API's 429 with Retry-After)
waits exactly that in `retrying` and `keep_running` (services/kit/retry.py), whatever the schedule says,
and the log says so; the schedule still counts it as a failure. In virtual time: waits are exact."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from events.bus import TransientError
from services.kit.retry import Backoff, keep_running, retrying
from tests.memorybus import virtual_time

pytestmark = pytest.mark.anyio

SCHEDULE = Backoff(first=1.0, longest=4.0)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return virtual_time()


async def test_retrying_waits_what_a_failure_asked_then_the_schedule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tries: list[float] = []
    failures = [
        TransientError("429", retry_after=3.0),
        TransientError("500"),
        TransientError("429", retry_after=0.5),
    ]

    async def work() -> str:
        tries.append(anyio.current_time())
        if failures:
            raise failures.pop(0)
        return "done"

    start = anyio.current_time()
    assert await retrying(work, on=TransientError, backoff=SCHEDULE, what="posting") == "done"
    assert [round(at - start, 6) for at in tries] == [0, 3, 5, 5.5]  # waits 3 (asked), 2 (schedule), 0.5
    assert caplog.messages[0] == "posting failed (429); trying again in 3.00s"


async def test_keep_running_waits_what_a_failure_asked_with_or_without_progress() -> None:
    starts: list[float] = []
    # What each session does: fail asking 2.5 s, get something done then fail asking 1.5 s, fail
    # asking nothing, fail.
    script = [("fail", 2.5), ("progress", 1.5), ("fail", None), ("fail", None)]

    async def session(progress: Any) -> None:
        if len(starts) == len(script):
            await anyio.sleep_forever()
        starts.append(anyio.current_time())
        step, asked = script[len(starts) - 1]
        if step == "progress":
            progress()
        raise TransientError(step, retry_after=asked)

    start = anyio.current_time()
    with anyio.move_on_after(20):
        await keep_running(session, on=TransientError, backoff=SCHEDULE, what="watching")
    # Waits 2.5 and 1.5 (asked), then 2: the second failure of the run that began after progress.
    assert [round(at - start, 6) for at in starts] == [0, 2.5, 4.0, 6.0]
