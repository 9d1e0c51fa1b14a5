"""Keeping one MPS control daemon per GPU running: what `mpsflow run mps-daemons` does on each node.

Why a service of its own: a daemon is a process of the container that started it, and when that
container stops (a rollout, an eviction, an OOM kill) the runtime kills every process in it, MPS
servers and their clients' channel included. The node agent is updated and restarted often; the
daemons must not be. So a separate DaemonSet (`k8s/base/mps-daemons.yaml`, updated only `OnDelete`) owns
them, and the agent (`--mps-daemons external`) only talks to them through their pipe directories.
`--mps-daemons own` keeps the older arrangement (the agent starts them) for a single-container setup.

`DaemonKeeper` starts a daemon for every GPU not in MIG mode (adopting one that already answers,
after setting the GPU's compute mode to EXCLUSIVE_PROCESS, as NVIDIA recommends under MPS) and starts
it again when it stops answering, backing off on the `MPS_DAEMON` schedule. It never stops a daemon
and never sends a command other than its health probe.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from events.metrics import DAEMON_RESTARTS
from node_agent.gpus import GpuReading
from node_agent.mps import DaemonSpec, MpsControl
from node_agent.nvml import GpuInventory
from services.kit.retry import MPS_DAEMON

if TYPE_CHECKING:
    from services.kit.status import Status

log = logging.getLogger(__name__)


class DaemonKeeper:
    """One GPU's daemon started, and started again after it dies, with backoff between failures."""

    def __init__(self, inventory: GpuInventory, mps: MpsControl, mps_root: Path) -> None:
        self.inventory = inventory
        self.mps = mps
        self.mps_root = mps_root
        self._failures: dict[int, tuple[int, float]] = {}  # GPU index -> (failures in a row, next try)
        self._started: set[str] = set()  # GPUs (uuid) this keeper started a daemon on

    def daemon(self, gpu: GpuReading) -> DaemonSpec:
        return DaemonSpec.under(self.mps_root, gpu.index, gpu.uuid)

    async def keep(self, gpu: GpuReading) -> bool:
        """True when the GPU's daemon answers, after starting it if it did not and a try is due."""
        daemon = self.daemon(gpu)
        if await self.mps.is_alive(daemon):
            self._failures.pop(gpu.index, None)
            return True
        failures, next_try = self._failures.get(gpu.index, (0, 0.0))
        if anyio.current_time() < next_try:
            return False
        try:
            await self.inventory.set_exclusive_process(gpu.index)
            await self.mps.start_daemon(daemon)
        except Exception as error:
            delay = MPS_DAEMON.delay(failures + 1)
            self._failures[gpu.index] = (failures + 1, anyio.current_time() + delay)
            log.error("GPU %d: MPS daemon did not start (%s); next try in %.0fs", gpu.index, error, delay)
            return False
        self._failures.pop(gpu.index, None)
        if gpu.uuid in self._started:
            DAEMON_RESTARTS.labels(gpu.uuid).inc()
        self._started.add(gpu.uuid)
        log.info("GPU %d: MPS daemon answers on %s", gpu.index, daemon.pipe_dir)
        return True

    async def keep_all(self, gpus: list[GpuReading]) -> dict[int, bool]:
        """`keep` for every GPU not in MIG mode (those are left alone); GPU index -> daemon answers."""
        return {gpu.index: await self.keep(gpu) for gpu in gpus if not gpu.mig_enabled}

    async def run(
        self, check_seconds: float, alive_file: Path | None = None, status: Status | None = None
    ) -> None:
        """Keep every GPU's daemon running, reading the GPUs again at every check, until cancelled;
        `alive_file` is touched and `status` told after every check (the liveness probe checks their age)."""
        if status is not None:
            status.watch("daemon checks", within=max(60.0, 6 * check_seconds))
        while True:
            try:
                gpus = await self.inventory.read()
            except Exception as error:
                log.warning("NVML read failed (%s); checking again in %.0fs", error, check_seconds)
            else:
                await self.keep_all(gpus)
            if alive_file is not None:
                await anyio.to_thread.run_sync(alive_file.touch)
            if status is not None:
                status.beat("daemon checks")
                status.ready("keeping daemons")
            await anyio.sleep(check_seconds)
