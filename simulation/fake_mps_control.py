"""A stand-in for the ``nvidia-cuda-mps-control`` binary, for machines without a GPU: the executable.

Where it sits: below ``node_agent.mps.SubprocessMpsControl``, in place of NVIDIA's binary. Run it as
``python -m simulation.fake_mps_control [-d | -f]``; it reads the same environment variables
(``CUDA_MPS_PIPE_DIRECTORY``, ``CUDA_MPS_LOG_DIRECTORY``, ``CUDA_VISIBLE_DEVICES``) and answers the
legacy (v2) control commands of docs/mps.md §2. This module is the plumbing: arguments, daemonizing, the
pid file, the control socket, the command log and the client. What each command does, what it replies
and what it refuses, and how those semantics differ from the real daemon's, is
``simulation.fake_mps_commands``. Every command the daemon receives is appended to
``$CUDA_MPS_LOG_DIRECTORY/control.log`` as ``[<local time> Control <pid>] Cmd:<command>``, so tests can
check what it was told (``read_logged_commands``).

Modes and exit statuses:

* ``-d``: daemonizes (double fork) and exits 0 once the control socket listens; ``-f``: the same daemon
  in the foreground, echoing its log lines to stdout. Both exit 1 with a message on stderr when a
  daemon already answers on the pipe directory (``An instance of this daemon is already running``, the
  real binary's words as a public MPS manager script matches them; its stream and exit status are
  unverified) or the control socket path is taken (a stale socket file makes bind fail, so whoever
  starts the daemon must remove it).
* No flag: client. Reads exactly one command from stdin (a trailing newline is optional), prints the
  reply on stdout and exits 0. A command the daemon rejects (unknown verb, bad arguments, unknown
  server PID) prints ``Error: <reason>`` on stdout and exits 1 (unverified: what the real one prints
  and whether it exits non-zero). When no daemon answers it prints ``Cannot find MPS control daemon
  process`` and exits 1, as the real client does (the text and status as public scripts check them;
  which stream it uses is unverified, the fake's is stderr). Any other invocation exits 2.

How it differs from the real binary (documented, deliberate):

* The client talks to the daemon through a private request/reply protocol on the ``control`` socket;
  no credential check (``SCM_CREDENTIALS``), no ``control_privileged`` socket, no ``control_lock``.
* The real control shell accepts several commands per session; the fake client takes exactly one.
* The daemon sees as many devices as ``CUDA_VISIBLE_DEVICES`` has entries when that is set, and any
  device index otherwise.
* No ``-S``/``-v``/``-p``/multi-user flags: only ``-d``, ``-f`` or none.

This module must never touch a real GPU or a pipe directory it was not pointed at, and importing it
has no side effects: the daemon and client run only through ``main``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TextIO

from simulation.fake_mps_commands import ControlDaemonState, Reply

DEFAULT_PIPE_DIRECTORY = Path("/tmp/nvidia-mps")
DEFAULT_LOG_DIRECTORY = Path("/var/log/nvidia-mps")
CONTROL_SOCKET_NAME = "control"
PID_FILE_NAME = "nvidia-cuda-mps-control.pid"
CONTROL_LOG_NAME = "control.log"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

NO_DAEMON_MESSAGE = "Cannot find MPS control daemon process"
ALREADY_RUNNING_MESSAGE = "An instance of this daemon is already running"

_COMMAND_LOG_PREFIX = "Cmd:"
_LOG_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} Control +\d+\] (.*)")
_CLIENT_TIMEOUT_SECONDS = 30.0
_CONNECTION_TIMEOUT_SECONDS = 5.0
_LISTEN_BACKLOG = 16
_READY = b"ready"


@dataclass(frozen=True)
class DaemonPaths:
    """Where a daemon lives, from the same environment variables the real binary reads."""

    pipe_dir: Path
    log_dir: Path

    @classmethod
    def from_environment(cls, environment: Mapping[str, str]) -> DaemonPaths:
        pipe_dir = Path(environment.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIRECTORY)
        log_dir = Path(environment.get("CUDA_MPS_LOG_DIRECTORY") or DEFAULT_LOG_DIRECTORY)
        return cls(pipe_dir.absolute(), log_dir.absolute())

    @property
    def control_socket(self) -> Path:
        return self.pipe_dir / CONTROL_SOCKET_NAME

    @property
    def pid_file(self) -> Path:
        return self.pipe_dir / PID_FILE_NAME

    @property
    def control_log(self) -> Path:
        return self.log_dir / CONTROL_LOG_NAME


def read_logged_commands(log_dir: Path) -> list[str]:
    """The commands a daemon logged to ``<log_dir>/control.log``, oldest first."""
    log = log_dir / CONTROL_LOG_NAME
    if not log.exists():
        return []
    commands = []
    for line in log.read_text().splitlines():
        match = _LOG_LINE.fullmatch(line)
        if match and match.group(1).startswith(_COMMAND_LOG_PREFIX):
            commands.append(match.group(1).removeprefix(_COMMAND_LOG_PREFIX))
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    """Run as the real binary would be run; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    paths = DaemonPaths.from_environment(os.environ)
    device_count = _visible_device_count(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if arguments == ["-d"]:
        return _start_in_background(paths, device_count)
    if arguments == ["-f"]:
        return _run_in_foreground(paths, device_count)
    if not arguments:
        return _run_client(paths)
    print("usage: python -m simulation.fake_mps_control [-d | -f]", file=sys.stderr)
    return EXIT_USAGE


class _StartRefusedError(Exception):
    pass


class _NoDaemonError(Exception):
    pass


class _Terminated(BaseException):  # BaseException: a broad "except Exception" must not swallow SIGTERM
    pass


class _ControlLog:
    def __init__(self, path: Path, echo: TextIO | None) -> None:
        self._path = path
        self._echo = echo

    def write(self, message: str) -> None:
        timestamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        line = f"[{timestamp} Control {os.getpid():5d}] {message}\n"
        with self._path.open("a") as log:
            log.write(line)
        if self._echo is not None:
            self._echo.write(line)
            self._echo.flush()


def _run_client(paths: DaemonPaths) -> int:
    commands = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    if len(commands) != 1:
        print("the fake nvidia-cuda-mps-control reads exactly one command from stdin", file=sys.stderr)
        return EXIT_USAGE
    try:
        reply = _exchange(paths.control_socket, commands[0])
    except _NoDaemonError:
        print(NO_DAEMON_MESSAGE, file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, ValueError) as error:
        print(f"No reply from the MPS control daemon: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if reply.text:
        print(reply.text)
    return EXIT_OK if reply.accepted else EXIT_FAILURE


def _exchange(control_socket: Path, command: str) -> Reply:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(_CLIENT_TIMEOUT_SECONDS)
        try:
            connection.connect(str(control_socket))
        except OSError as error:
            raise _NoDaemonError from error
        connection.sendall(command.encode())
        connection.shutdown(socket.SHUT_WR)
        answer = json.loads(_receive_all(connection))
    return Reply(text=str(answer["text"]), accepted=bool(answer["accepted"]))


def _receive_all(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _daemon_answers(control_socket: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_CONNECTION_TIMEOUT_SECONDS)
        try:
            probe.connect(str(control_socket))
        except OSError:
            return False
    return True


def _run_in_foreground(paths: DaemonPaths, device_count: int | None) -> int:
    try:
        listener = _listen(paths)
    except _StartRefusedError as refusal:
        print(refusal, file=sys.stderr)
        return EXIT_FAILURE
    _serve(listener, paths, ControlDaemonState(device_count), _ControlLog(paths.control_log, sys.stdout))
    return EXIT_OK


def _start_in_background(paths: DaemonPaths, device_count: int | None) -> int:
    status_reader, status_writer = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        os.close(status_reader)
        os.setsid()
        if os.fork() == 0:
            exit_status = EXIT_FAILURE
            try:
                exit_status = _become_daemon(paths, device_count, status_writer)
            finally:
                os._exit(exit_status)
        os._exit(EXIT_OK)
    os.close(status_writer)
    with os.fdopen(status_reader, "rb") as status:
        outcome = status.read()
    os.waitpid(intermediate, 0)
    if outcome == _READY:
        return EXIT_OK
    print(outcome.decode(errors="replace") or "the daemon exited before it was ready", file=sys.stderr)
    return EXIT_FAILURE


def _become_daemon(paths: DaemonPaths, device_count: int | None, status_writer: int) -> int:
    """The detached grandchild: report readiness (or why not) through the pipe, then serve until quit."""
    null = os.open(os.devnull, os.O_RDWR)
    for stream in (0, 1, 2):
        os.dup2(null, stream)
    os.close(null)
    try:
        listener = _listen(paths)
    except _StartRefusedError as refusal:
        os.write(status_writer, str(refusal).encode())
        return EXIT_FAILURE
    os.write(status_writer, _READY)
    os.close(status_writer)
    _serve(listener, paths, ControlDaemonState(device_count), _ControlLog(paths.control_log, None))
    return EXIT_OK


def _listen(paths: DaemonPaths) -> socket.socket:
    paths.pipe_dir.mkdir(parents=True, exist_ok=True)
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    if _daemon_answers(paths.control_socket):
        raise _StartRefusedError(f"{ALREADY_RUNNING_MESSAGE} (pipe directory {paths.pipe_dir})")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(paths.control_socket))
    except OSError as error:
        listener.close()
        reason = "a stale control socket is in the way" if error.errno == errno.EADDRINUSE else str(error)
        raise _StartRefusedError(f"cannot listen on {paths.control_socket}: {reason}") from error
    listener.listen(_LISTEN_BACKLOG)
    paths.pid_file.write_text(f"{os.getpid()}\n")
    return listener


def _serve(listener: socket.socket, paths: DaemonPaths, state: ControlDaemonState, log: _ControlLog) -> None:
    def terminate(_signal: int, _frame: FrameType | None) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, terminate)
    log.write(f"Starting control daemon using socket {paths.control_socket}")
    log.write(
        f"To connect CUDA applications to this daemon, set env CUDA_MPS_PIPE_DIRECTORY={paths.pipe_dir}"
    )
    try:
        with listener:
            while not _answer_one(listener, paths, state, log).stops_daemon:
                pass
    except _Terminated:
        log.write("Received SIGTERM, exiting")
    finally:
        _remove_endpoint(paths)
    log.write("Exit")


def _answer_one(
    listener: socket.socket, paths: DaemonPaths, state: ControlDaemonState, log: _ControlLog
) -> Reply:
    connection, _ = listener.accept()
    with connection:
        connection.settimeout(_CONNECTION_TIMEOUT_SECONDS)
        try:
            command = _receive_all(connection).decode(errors="replace").strip()
        except OSError:
            return Reply("", accepted=False)
        if not command:  # a liveness probe: connect and hang up
            return Reply("")
        log.write(f"{_COMMAND_LOG_PREFIX}{command}")
        reply = state.execute(command)
        if reply.stops_daemon:
            _remove_endpoint(paths)  # once quit is answered, nobody can reach this daemon any more
        try:
            connection.sendall(json.dumps({"text": reply.text, "accepted": reply.accepted}).encode())
        except OSError:
            log.write("Client went away before the reply was sent")
        return reply


def _remove_endpoint(paths: DaemonPaths) -> None:
    paths.control_socket.unlink(missing_ok=True)
    paths.pid_file.unlink(missing_ok=True)


def _visible_device_count(visible_devices: str | None) -> int | None:
    if visible_devices is None:
        return None
    return len([device for device in visible_devices.split(",") if device.strip()])


if __name__ == "__main__":
    sys.exit(main())
