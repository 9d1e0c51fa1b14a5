"""The one retry helper (services/kit/retry.py), in virtual time: waits come at their exact time.

`retrying` runs a coroutine function again after the failures it is told to retry, on a schedule,
and gives up after the schedule's attempts; `keep_running` runs a session forever and starts the
schedule over once a session got something done; `Backoff.delay` is the same schedule for loops
that wait by themselves.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import stamina

from services.kit.retry import Backoff, keep_running, retrying
from tests.memorybus import virtual_time

pytestmark = pytest.mark.anyio

SCHEDULE = Backoff(first=1.0, longest=4.0)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return virtual_time()


class FlakyError(Exception):
    pass


async def test_a_failure_is_tried_again_after_the_schedules_growing_delays() -> None:
    tries: list[float] = []

    async def work() -> str:
        tries.append(anyio.current_time())
        if len(tries) < 5:
            raise FlakyError(f"try {len(tries)}")
        return "done"

    start = anyio.current_time()
    assert await retrying(work, on=FlakyError, backoff=SCHEDULE, what="work") == "done"
    assert [round(at - start, 6) for at in tries] == [0, 1, 3, 7, 11]  # waits 1, 2, 4, 4


async def test_after_its_attempts_the_last_failure_is_raised() -> None:
    tries = 0

    async def work() -> None:
        nonlocal tries
        tries += 1
        raise FlakyError(f"try {tries}")

    with pytest.raises(FlakyError, match="try 3"):
        await retrying(work, on=FlakyError, backoff=Backoff(first=1.0, longest=4.0, attempts=3), what="work")
    assert tries == 3


async def test_a_failure_of_another_kind_is_raised_at_once() -> None:
    tries = 0

    async def work() -> None:
        nonlocal tries
        tries += 1
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        await retrying(work, on=FlakyError, backoff=SCHEDULE, what="work")
    assert tries == 1


async def test_each_retry_is_logged_with_what_failed_why_and_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failed = False

    async def work() -> None:
        nonlocal failed
        if not failed:
            failed = True
            raise FlakyError("the API is away")

    await retrying(work, on=FlakyError, backoff=SCHEDULE, what="writing node a")
    assert "writing node a failed (the API is away); trying again in 1.00s" in caplog.messages


async def test_a_session_that_got_something_done_starts_the_schedule_over() -> None:
    starts: list[float] = []
    # What each session does: fail, fail, get something done then fail, fail, return, fail, fail.
    script = ["fail", "fail", "progress", "fail", "return", "fail", "fail"]

    async def session(progress: Any) -> None:
        if len(starts) == len(script):
            await anyio.sleep_forever()
        starts.append(anyio.current_time())
        step = script[len(starts) - 1]
        if step == "progress":
            progress()
        if step != "return":
            raise FlakyError(step)

    start = anyio.current_time()
    with anyio.move_on_after(20):
        await keep_running(session, on=FlakyError, backoff=SCHEDULE, what="watching")
    assert [round(at - start, 6) for at in starts] == [
        0,  # fails
        1,  # fails after waiting 1
        3,  # waited 2; gets something done, then fails
        4,  # waited 1 again (the schedule started over); fails
        6,  # waited 2; returns
        6,  # runs again at once; fails
        7,  # waited 1 (a session that returned started the schedule over too)
    ]


async def test_the_delays_of_loops_that_wait_by_themselves_are_the_same_schedule() -> None:
    assert [SCHEDULE.delay(failures) for failures in range(1, 6)] == [1.0, 2.0, 4.0, 4.0, 4.0]


async def test_in_stamina_test_mode_retries_take_no_time() -> None:
    tries = 0

    async def work() -> None:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise FlakyError("not yet")

    start = anyio.current_time()
    with stamina.set_testing(True, attempts=3):
        await retrying(work, on=FlakyError, backoff=Backoff(first=60.0, longest=600.0), what="work")
    assert (tries, anyio.current_time() - start) == (3, 0)
