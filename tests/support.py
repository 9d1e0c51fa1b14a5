"""Waiting in tests, bounded: for a condition to hold, for a process to be gone."""

from __future__ import annotations

import inspect
import os
import select
from collections.abc import Awaitable, Callable

import anyio
import pytest

WAIT_S = 5.0
POLL_S = 0.02


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    """Returns as soon as `condition` holds, checking it every POLL_S seconds; fails the test after
    `timeout_s` seconds naming `what`. `condition` may be a coroutine function (asking a server, say);
    an attempt still running at the deadline is cancelled."""
    with anyio.move_on_after(timeout_s):
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await anyio.sleep(POLL_S)  # for what has no event to wait on: files, processes, lists
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def wait_until_gone(pid: int, timeout_s: float = WAIT_S) -> None:
    """Until process `pid` has exited (a zombie counts as gone: nothing may reap a daemon's orphan).

    Blocking, so that synchronous teardown can use it too; it waits on a pidfd, which becomes readable
    the moment the process exits."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout_s)  # readable once the process exits
    finally:
        os.close(pidfd)
    if not readable:
        raise AssertionError(f"process {pid} is still running after {timeout_s} s")
