"""What a process tells its probes and Prometheus: `/healthz`, `/readyz` and `/metrics` over HTTP.

Where it sits: every long-running `mpsflow run` process starts one `StatusServer` on
`--status-address` (default 0.0.0.0:8080; or a socket it inherits, `services.kit.listen`) beside
its work; the manifests' probes and the ServiceMonitors point at it, and the demo scrapes it.
The process says how it is through a `Status`: `ready(role)` once it serves (`active`, or
`standby` for a replica waiting for its lease: a standby is ready too, or a rolling update would
wait for a lease the old replica holds), `not_ready(why)` while it starts or has lost what it
needs, and `beat(name)` for each loop whose stalling must make the process unhealthy
(`watch(name, within)` says how stale is too stale).

- `/healthz`: 200 `ok` while the event loop answers and no watched loop is stale; else 503 naming
  the stale loop. The kubelet restarts the container on repeated failures.
- `/readyz`: 200 with the role, or 503 with why not.
- `/metrics`: the Prometheus text format of the process's registry (`events.metrics`).

It only reports: nothing here changes what the process does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from services.kit.listen import ListenAddress, bound_port

log = logging.getLogger(__name__)


@dataclass
class Status:
    """How the process is, as its parts say: ready or why not, and the loops that must keep beating."""

    clock: Callable[[], float] = time.monotonic
    role: str | None = None
    why_not_ready: str = "starting"
    _beats: dict[str, float] = field(default_factory=dict)
    _limits: dict[str, float] = field(default_factory=dict)

    def ready(self, role: str) -> None:
        self.role = role
        self.why_not_ready = ""

    def not_ready(self, why: str) -> None:
        self.role = None
        self.why_not_ready = why

    def watch(self, name: str, within: float) -> None:
        """From now on, `name` must `beat` at least every `within` seconds for the process to be healthy."""
        self._limits[name] = within
        self._beats[name] = self.clock()

    def beat(self, name: str) -> None:
        self._beats[name] = self.clock()

    def stale(self) -> list[str]:
        """The watched loops that have not beaten in time, each with how long ago they did."""
        now = self.clock()
        return [
            f"{name} last beat {now - self._beats[name]:.0f} s ago (limit {limit:.0f} s)"
            for name, limit in sorted(self._limits.items())
            if now - self._beats[name] > limit
        ]


class StatusServer:
    """The HTTP side of a `Status`, on aiohttp, in the process's event loop."""

    def __init__(self, status: Status, registry: CollectorRegistry = REGISTRY) -> None:
        self.status = status
        self.registry = registry
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, address: ListenAddress) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await address.site(runner).start()
        self._runner = runner
        self.port = bound_port(runner)
        log.info("status on %s, port %s (/healthz, /readyz, /metrics)", address, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        stale = self.status.stale()
        if stale:
            return web.Response(status=503, text="unhealthy: " + "; ".join(stale) + "\n")
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        if self.status.role is None:
            return web.Response(status=503, text=f"not ready: {self.status.why_not_ready}\n")
        return web.Response(text=f"{self.status.role}\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
