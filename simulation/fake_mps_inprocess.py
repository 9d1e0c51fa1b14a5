"""The fake MPS control daemons of many simulated nodes inside one process: an `MpsControl`.

Where it sits: in a node host (`simulation.node_host`), in place of `node_agent.mps.SubprocessMpsControl`
running `simulation.fake_mps_control`. Each daemon is a `ControlDaemonState` (`simulation.fake_mps_commands`,
the same object the subprocess fake keeps), so every control command has exactly the semantics, the
replies and the refusals of the subprocess fake; what differs is only the plumbing, which is what costs:
the subprocess fake is one Python interpreter per daemon and one more per command (each command is a
`python -m simulation.fake_mps_control` client, ~50 ms of CPU), which 1,600 simulated GPUs on two cores
cannot afford. A node host's keepers and agents share one `InProcessDaemons`, as a node's keeper and
agent share its daemons through their pipe directories.

How it differs from the subprocess fake (documented, deliberate):

* A daemon lives in the host process, not in a process of its own: it does not outlive the host, so
  killing a host (or stopping it) takes every daemon of its nodes with it. That is why the demo keeps one
  process per node, with daemons of their own, wherever it kills node agents (`--chaos`).
* The pid file holds the host's pid (the process that answers), so daemons of one host share a pid, and
  a daemon that quit and was started again keeps it: the agent, which tells a restarted daemon by its
  pid, would not see that one restart (nothing in the simulation sends `quit`). Pid files are removed
  when the host stops (`close`).
* No control socket file and no ``control.log``: whether a daemon answers is whether it is registered
  here, and the commands are not logged (the tests that read ``control.log`` run one process per node).
* Each command waits `COMMAND_DELAY_S` before it is answered: the real control client is a process
  started per command (fork, exec, a round trip on the daemon's pipe), a few milliseconds that a real
  node pays and that an in-process call would hide. The wait costs no CPU.

Commands to one daemon are serialized, as `SubprocessMpsControl` serializes them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from node_agent.mps import HEALTH_PROBE_COMMAND, DaemonSpec, MpsCommandError
from simulation.fake_mps_commands import ControlDaemonState

COMMAND_DELAY_S = 0.005
"""What one control command costs a real node before its answer: starting `nvidia-cuda-mps-control`
and a round trip on the daemon's pipe."""
NO_DAEMON_MESSAGE = "Cannot find MPS control daemon process"
"""What the real client says when no daemon answers (as `simulation.fake_mps_control` says it)."""
_CLIENT_FAILURE = 1


@dataclass
class _Daemon:
    spec: DaemonSpec
    state: ControlDaemonState


@dataclass
class InProcessDaemons:
    """Every simulated MPS control daemon of one process, by pipe directory."""

    command_delay_s: float = COMMAND_DELAY_S
    _daemons: dict[Path, _Daemon] = field(default_factory=dict)
    _locks: dict[Path, anyio.Lock] = field(default_factory=dict)

    def control(self) -> InProcessMpsControl:
        """An `MpsControl` over these daemons (one per keeper and agent, as each has its own)."""
        return InProcessMpsControl(self)

    def answering(self) -> list[DaemonSpec]:
        """The daemons that answer now."""
        return [daemon.spec for daemon in self._daemons.values()]

    def close(self) -> None:
        """The host stops: every daemon goes with it, and so do their pid files."""
        for daemon in self._daemons.values():
            with contextlib.suppress(OSError):
                daemon.spec.pid_file.unlink(missing_ok=True)
        self._daemons.clear()

    def lock(self, spec: DaemonSpec) -> anyio.Lock:
        lock = self._locks.get(spec.pipe_dir)
        if lock is None:
            lock = self._locks[spec.pipe_dir] = anyio.Lock()
        return lock

    def start(self, spec: DaemonSpec) -> None:
        """A new daemon on `spec`'s pipe: what a dead one left there is cleared first."""
        spec.pipe_dir.mkdir(parents=True, exist_ok=True)
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        spec.control_socket.unlink(missing_ok=True)
        # CUDA_VISIBLE_DEVICES names this daemon's one GPU, so it sees one device, as the real one does.
        self._daemons[spec.pipe_dir] = _Daemon(spec, ControlDaemonState(device_count=1))
        spec.pid_file.write_text(f"{os.getpid()}\n")

    def execute(self, spec: DaemonSpec, command: str) -> str:
        """The daemon's reply to `command`, as the control client prints it; `MpsCommandError` when
        no daemon answers or it refuses the command (the client's exit status 1)."""
        daemon = self._daemons.get(spec.pipe_dir)
        if daemon is None:
            raise MpsCommandError(command, _CLIENT_FAILURE, NO_DAEMON_MESSAGE)
        reply = daemon.state.execute(command)
        if reply.stops_daemon:
            del self._daemons[spec.pipe_dir]
            spec.pid_file.unlink(missing_ok=True)
        if not reply.accepted:
            raise MpsCommandError(command, _CLIENT_FAILURE, reply.text)
        return reply.text.strip()


class InProcessMpsControl:
    """`node_agent.mps.MpsControl` over `InProcessDaemons`, with `SubprocessMpsControl`'s contract."""

    def __init__(self, daemons: InProcessDaemons) -> None:
        self._daemons = daemons

    async def start_daemon(self, daemon: DaemonSpec) -> None:
        async with self._daemons.lock(daemon):
            if await self._answers(daemon):
                return
            self._daemons.start(daemon)

    async def send(self, daemon: DaemonSpec, command: str) -> str:
        async with self._daemons.lock(daemon):
            return await self._send_unlocked(daemon, command)

    async def is_alive(self, daemon: DaemonSpec) -> bool:
        async with self._daemons.lock(daemon):
            return await self._answers(daemon)

    async def _send_unlocked(self, daemon: DaemonSpec, command: str) -> str:
        if not command.strip() or "\n" in command:
            raise ValueError(f"expected exactly one control command, got {command!r}")
        await anyio.sleep(self._daemons.command_delay_s)
        return self._daemons.execute(daemon, command)

    async def _answers(self, daemon: DaemonSpec) -> bool:
        try:
            await self._send_unlocked(daemon, HEALTH_PROBE_COMMAND)
        except MpsCommandError:
            return False
        return True
