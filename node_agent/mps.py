"""MPS control port: one ``nvidia-cuda-mps-control`` daemon per GPU, driven through its control pipe.

Where it sits: the node agent's effect side. At startup the agent calls ``start_daemon`` for each GPU
(adopting a daemon that already answers, so an agent restart disrupts nothing) and then
``apply_gpu_defaults`` with the slice size the plan gives that GPU. Everything else in the agent talks
to the ``MpsControl`` protocol; ``SubprocessMpsControl`` is the adapter that runs the real binary, and
``simulation.fake_mps_control`` is an executable that stands in for that binary in tests.

Every daemon gets its own pipe and log directory and ``CUDA_VISIBLE_DEVICES=<uuid>``, so a fatal GPU
exception stays on that GPU and device index 0 always means "this daemon's GPU".

What it relies on of the control client's replies and exit statuses (docs/mps.md §3, each with its source
or marked unverified; ``tests/contract/mps_replies.py`` pins them, against the fake and, with ``-m gpu``,
the real daemon): a command fails exactly when the client exits non-zero (verified when no daemon
answers: ``Cannot find MPS control daemon process``, status 1; unverified for a refused command);
thread percentages with one decimal (``25.0``); pinned limits as a whole number with ``G`` or ``M``
(``5G`` for a limit set as ``5120M``); server PIDs separated by white space, none when there are none.

This module must never send ``quit`` or ``shutdown_server`` on its own: stopping a daemon or a server
kills every client on the GPU. It never touches another GPU's pipe directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import anyio
import anyio.to_thread

from events.vocabulary import MIB_PER_GIB

CONTROL_SOCKET_NAME = "control"
PID_FILE_NAME = "nvidia-cuda-mps-control.pid"
HEALTH_PROBE_COMMAND = "get_default_active_thread_percentage"
UNSET_MEM_LIMIT_REPLY = "N/A"
"""What ``get_*_device_pinned_mem_limit`` prints when no limit is set: the fake's choice, unverified (no
public source shows the real reply). The agent never reads an unset limit; only the tests do."""

_UNIX_SOCKET_PATH_MAX_BYTES = 107  # sun_path is 108 bytes including the terminating NUL
_MEM_LIMIT_REPLY = re.compile(r"(\d+)([MG])")
_READINESS_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class DaemonSpec:
    """Where one GPU's MPS control daemon keeps its pipe and log, and which GPU it may see."""

    gpu_index: int
    gpu_uuid: str
    pipe_dir: Path
    log_dir: Path

    def __post_init__(self) -> None:
        if len(os.fsencode(self.control_socket)) > _UNIX_SOCKET_PATH_MAX_BYTES:
            raise ValueError(f"control socket path {self.control_socket} is too long for a unix socket")

    @classmethod
    def under(cls, root: Path, gpu_index: int, gpu_uuid: str) -> DaemonSpec:
        """The daemon layout used on nodes: ``<root>/<uuid>/pipe`` and ``<root>/<uuid>/log``."""
        if not gpu_uuid or "/" in gpu_uuid or gpu_uuid in {".", ".."}:
            raise ValueError(f"GPU UUID {gpu_uuid!r} cannot name a directory")
        return cls(gpu_index, gpu_uuid, root / gpu_uuid / "pipe", root / gpu_uuid / "log")

    @property
    def control_socket(self) -> Path:
        return self.pipe_dir / CONTROL_SOCKET_NAME

    @property
    def pid_file(self) -> Path:
        return self.pipe_dir / PID_FILE_NAME

    def environment(self) -> dict[str, str]:
        """The variables the daemon, its control clients and its CUDA clients must all share."""
        return {
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
            "CUDA_VISIBLE_DEVICES": self.gpu_uuid,
        }


class MpsCommandError(Exception):
    """The control binary failed: non-zero exit status, or no answer in time (``exit_status`` None)."""

    def __init__(self, command: str, exit_status: int | None, output: str) -> None:
        outcome = "timed out" if exit_status is None else f"exited with status {exit_status}"
        super().__init__(f"MPS control command {command!r} {outcome}: {output or '(no output)'}")
        self.command = command
        self.exit_status = exit_status
        self.output = output


class MpsControl(Protocol):
    """The node agent's view of the MPS control daemons, one per GPU."""

    async def start_daemon(self, daemon: DaemonSpec) -> None:
        """Ensure the daemon answers on its pipe; start it if not.

        A daemon that already answers is adopted as it is. Otherwise a stale control socket and pid file
        left by a dead daemon are removed before starting a new one.

        Raises:
            MpsCommandError: the daemon could not be started or never answered.
        """
        ...

    async def send(self, daemon: DaemonSpec, command: str) -> str:
        """Send one control command and return the daemon's reply, stripped.

        Raises:
            MpsCommandError: the control client exited non-zero or did not finish in time.
        """
        ...

    async def is_alive(self, daemon: DaemonSpec) -> bool:
        """Whether the daemon answers the health probe (``get_default_active_thread_percentage``)."""
        ...


class SubprocessMpsControl:
    """``MpsControl`` over the ``nvidia-cuda-mps-control`` binary, one process per command.

    Commands for the same daemon are serialized: the control pipe is a shared resource and replies must
    not interleave. Commands for different daemons run concurrently. A missing executable raises
    ``FileNotFoundError`` from every method: that is a broken node image, not a dead daemon.
    """

    def __init__(
        self, executable: Sequence[str] = ("nvidia-cuda-mps-control",), *, timeout: float = 5.0
    ) -> None:
        if isinstance(executable, str) or not executable:
            raise ValueError("the MPS control executable must be a non-empty argument list")
        if timeout <= 0:
            raise ValueError("the command timeout must be positive")
        self._executable = tuple(executable)
        self._timeout = timeout
        self._locks: dict[Path, anyio.Lock] = {}

    async def start_daemon(self, daemon: DaemonSpec) -> None:
        async with self._lock(daemon):
            if await self._answers(daemon):
                return
            holder = await anyio.to_thread.run_sync(_living_daemon, daemon)
            if holder is not None:
                # Alive but silent (stopped, or too busy to answer in time): clearing its socket and
                # pid file and starting a second daemon on the same pipe would split the GPU's clients.
                raise MpsCommandError(
                    "-d",
                    None,
                    f"daemon pid {holder} holds {daemon.pipe_dir} but does not answer; not replaced",
                )
            await anyio.to_thread.run_sync(_prepare_directories, daemon)
            await self._launch(daemon)
            await self._wait_until_answering(daemon)

    async def send(self, daemon: DaemonSpec, command: str) -> str:
        async with self._lock(daemon):
            return await self._send_unlocked(daemon, command)

    async def is_alive(self, daemon: DaemonSpec) -> bool:
        async with self._lock(daemon):
            return await self._answers(daemon)

    def _lock(self, daemon: DaemonSpec) -> anyio.Lock:
        lock = self._locks.get(daemon.pipe_dir)
        if lock is None:
            lock = self._locks[daemon.pipe_dir] = anyio.Lock()
        return lock

    def _environment(self, daemon: DaemonSpec) -> dict[str, str]:
        return {**os.environ, **daemon.environment()}

    async def _send_unlocked(self, daemon: DaemonSpec, command: str) -> str:
        if not command.strip() or "\n" in command:
            raise ValueError(f"expected exactly one control command, got {command!r}")
        try:
            with anyio.fail_after(self._timeout):
                result = await anyio.run_process(
                    self._executable, input=command.encode(), env=self._environment(daemon), check=False
                )
        except TimeoutError:
            raise MpsCommandError(command, None, f"no reply within {self._timeout} s") from None
        if result.returncode != 0:
            raise MpsCommandError(command, result.returncode, _combined_output(result.stdout, result.stderr))
        return result.stdout.decode(errors="replace").strip()

    async def _answers(self, daemon: DaemonSpec) -> bool:
        try:
            await self._send_unlocked(daemon, HEALTH_PROBE_COMMAND)
        except MpsCommandError:
            return False
        return True

    async def _launch(self, daemon: DaemonSpec) -> None:
        # Output goes to a file, not a pipe: a daemon that keeps inherited descriptors open would
        # otherwise hold the pipe until the timeout even though `-d` itself has returned.
        with await anyio.to_thread.run_sync(tempfile.TemporaryFile) as output:
            try:
                with anyio.fail_after(self._timeout):
                    result = await anyio.run_process(
                        [*self._executable, "-d"],
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=output,
                        env=self._environment(daemon),
                        check=False,
                    )
            except TimeoutError:
                raise MpsCommandError("-d", None, f"daemon not started within {self._timeout} s") from None
            if result.returncode != 0:
                raise MpsCommandError(
                    "-d", result.returncode, await anyio.to_thread.run_sync(_read_back, output)
                )

    async def _wait_until_answering(self, daemon: DaemonSpec) -> None:
        # The real `-d` may return before the control socket listens; the fake returns once it does.
        with anyio.move_on_after(self._timeout):
            while True:
                if await self._answers(daemon):
                    return
                await anyio.sleep(_READINESS_POLL_SECONDS)
        raise MpsCommandError("-d", 0, f"daemon started but did not answer on {daemon.control_socket}")


async def apply_gpu_defaults(
    control: MpsControl,
    daemon: DaemonSpec,
    *,
    pinned_mem_limit_mib: int | None,
    active_thread_percentage: int | None,
) -> None:
    """Set the defaults that MPS servers started later on this GPU inherit.

    Servers already running keep their settings, and clients already connected keep theirs
    (docs/mps.md §5): this retargets future clients only. ``None`` leaves a default untouched.
    Device index 0 is this daemon's GPU because the daemon sees only that GPU.
    """
    commands = []
    if pinned_mem_limit_mib is not None:
        commands.append(f"set_default_device_pinned_mem_limit 0 {format_mem_limit(pinned_mem_limit_mib)}")
    if active_thread_percentage is not None:
        if not 1 <= active_thread_percentage <= 100:
            raise ValueError(f"active thread percentage {active_thread_percentage} is not within 1..100")
        commands.append(f"set_default_active_thread_percentage {active_thread_percentage}")
    for command in commands:
        await control.send(daemon, command)


def format_mem_limit(mib: int) -> str:
    """A pinned memory limit as the control commands take it, always in MiB: ``10240`` → ``"10240M"``."""
    if mib <= 0:
        raise ValueError(f"pinned memory limit must be positive, got {mib} MiB")
    return f"{mib}M"


def parse_mem_limit(reply: str) -> int | None:
    """A ``get_*_device_pinned_mem_limit`` reply in MiB; ``None`` when no limit is set (``"N/A"``).

    The daemon prints a limit set as ``5120M`` back as ``5G`` (NVIDIA's GPU Operator documentation shows
    ``3G`` for a limit its device plugin sets in ``M``), so both units are read."""
    text = reply.strip()
    if text == UNSET_MEM_LIMIT_REPLY:
        return None
    match = _MEM_LIMIT_REPLY.fullmatch(text)
    if match is None:
        raise ValueError(f"unrecognised pinned memory limit reply {reply!r}")
    amount = int(match.group(1))
    return amount * MIB_PER_GIB if match.group(2) == "G" else amount


def parse_thread_percentage(reply: str) -> float:
    """A ``get_*active_thread_percentage`` reply such as ``"25.0"`` (one decimal, as NVIDIA's GPU Operator
    documentation shows it)."""
    try:
        value = float(reply.strip())
    except ValueError:
        raise ValueError(f"unrecognised active thread percentage reply {reply!r}") from None
    if not 0 < value <= 100:
        raise ValueError(f"active thread percentage reply {reply!r} is not within (0, 100]")
    return value


def parse_server_list(reply: str) -> list[int]:
    """The PIDs of a ``get_server_list`` (or ``get_client_list``) reply, separated by any white space
    (the separator between several PIDs is unverified); an empty reply means none."""
    pids = []
    for token in reply.split():
        if not token.isdigit():
            raise ValueError(f"unrecognised PID {token!r} in reply {reply!r}")
        pids.append(int(token))
    return pids


def _living_daemon(daemon: DaemonSpec) -> int | None:
    """The pid in the daemon's pid file when that process still runs and is an MPS control daemon
    (its command line names `mps-control` or `mps_control`: the real binary or the fake), else None.
    A stale pid file, a dead or zombie process, or a pid reused by another program gives None."""
    try:
        pid = int(daemon.pid_file.read_text().strip())
        status = Path(f"/proc/{pid}/stat").read_text()
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return None
    zombie = status.rsplit(")", 1)[-1].split()[0] == "Z"
    if zombie or not (b"mps-control" in command_line or b"mps_control" in command_line):
        return None
    return pid


def _prepare_directories(daemon: DaemonSpec) -> None:
    """Create the daemon's directories and clear what a dead daemon left; only when none answers."""
    daemon.pipe_dir.mkdir(parents=True, exist_ok=True)
    daemon.log_dir.mkdir(parents=True, exist_ok=True)
    daemon.control_socket.unlink(missing_ok=True)
    daemon.pid_file.unlink(missing_ok=True)


def _read_back(output: IO[bytes]) -> str:
    output.seek(0)
    return output.read().decode(errors="replace").strip()


def _combined_output(stdout: bytes, stderr: bytes) -> str:
    parts = (stream.decode(errors="replace").strip() for stream in (stdout, stderr))
    return "\n".join(part for part in parts if part)
