"""How every mpsflow process runs: logging, tracing, signals, and a clean stop.

`run_service` runs one coroutine under anyio's asyncio backend until it returns or SIGTERM or
SIGINT arrives; then it cancels it, lets shielded cleanups finish, and flushes the spans. Beside
it, the process's `/healthz`, `/readyz` and `/metrics` (`services.kit.status`), where an address
is given.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import stamina
from anyio import CancelScope

if TYPE_CHECKING:
    from services.kit.listen import ListenAddress
    from services.kit.status import Status


def configure_logging(service: str) -> None:
    logging.basicConfig(
        level=os.environ.get("MPSFLOW_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
    # services/kit/retry.py logs every retry, saying what failed; stamina's own line would repeat
    # it without saying what.
    stamina.instrumentation.set_on_retry_hooks([])


async def _stop_on_signal(scope: CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            logging.getLogger(__name__).info("received %s, stopping", signal.Signals(received).name)
            scope.cancel()
            return


CLEANUP_TIMEOUT_S = 5.0  # how long a stopping service may spend closing what it opened


async def close_all(*closers: Callable[[], Awaitable[object]]) -> None:
    """Close what a service opened, in order, even while it is being cancelled (anyio's
    cancellation would otherwise cancel each close at its first await, leaving sockets bound and
    publishes unflushed), but within `CLEANUP_TIMEOUT_S` all together."""
    with CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
        for close in closers:
            await close()


def run_service(
    service: str,
    main: Callable[[], Awaitable[None]],
    *,
    status: Status | None = None,
    status_address: ListenAddress | None = None,
    **resource: str,
) -> None:
    """Run `main` as the process's service; `status` is served on `status_address` if both are given."""
    from services.kit.status import StatusServer
    from services.kit.telemetry import setup_tracing

    configure_logging(service)
    provider = setup_tracing(service, **resource)

    async def supervised() -> None:
        server = StatusServer(status) if status is not None and status_address is not None else None
        if server is not None and status_address is not None:
            await server.start(status_address)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_stop_on_signal, group.cancel_scope)
                await main()
                group.cancel_scope.cancel()
        finally:
            if server is not None:
                await close_all(server.close)

    try:
        anyio.run(supervised, backend="asyncio")
    finally:
        provider.shutdown()
