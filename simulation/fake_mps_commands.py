"""What the fake ``nvidia-cuda-mps-control`` daemon makes of each control command: its state and replies.

Where it sits: inside the daemon process of ``simulation.fake_mps_control``, which receives each command on
its control socket, logs it and hands it to ``ControlDaemonState.execute``, then sends the ``Reply`` back;
the tests drive the same state in-process. It answers the legacy (v2) control commands of docs/mps.md §2
with the semantics NVIDIA documents: ``set_default_*`` affects only servers started later, a server
snapshots the defaults when it starts, ``quit`` loses the defaults (the state lives only in the daemon and
dies with it). A command it rejects (unknown verb, bad arguments, unknown server PID) gets the reply
``Error: <reason>``, marked not accepted.

Reply formats, as docs/mps.md §3 lists them with their sources (pinned by ``tests/contract/mps_replies.py``,
which the contract suite also holds the real daemon to):

* thread percentages: one decimal, ``"25.0"`` (NVIDIA's GPU Operator documentation shows ``25.0``); the
  default is 100.0;
* pinned memory limits: a whole number of GiB in ``G`` (``"5G"`` for a limit set as ``5120M``: NVIDIA's
  GPU Operator documentation shows ``3G`` for a limit its device plugin sets in ``M``), any other
  limit in ``M`` (*unverified*: the real daemon may round it down to GiB); unset: ``"N/A"``
  (*unverified*, the fake's choice);
* ``get_server_list`` / ``get_client_list``: one PID per line, empty when there are none (the separator
  between several PIDs is *unverified*);
* ``get_server_status``: ``"ACTIVE"``; ``set_*``, ``start_server``, ``shutdown_server``, ``quit``: empty
  (*unverified*);
* ``ps``: a header and one line per server (``PID UID COMMAND``), a layout of the fake's own;
* a command the daemon refuses: ``Error: <reason>``, not accepted (*unverified*: the real text and exit
  status of a refusal are not known).

How its semantics differ from the real daemon's (documented, deliberate):

* There is no GPU and no ``nvidia-cuda-mps-server``: servers exist only as entries with made-up PIDs
  (not real processes) holding a snapshot of the limits; they have no clients, so ``get_client_list``
  is always empty and ``shutdown_server`` (with or without ``-f``) removes the entry at once.
  ``start_server -uid U`` refuses a second server for the same UID but does not model the real
  one-server-at-a-time queueing of different UIDs, nor ``-mlopart`` (rejected).
* A device index must be below the number of devices the daemon sees (``device_count``, from
  ``CUDA_VISIBLE_DEVICES`` when that is set). A non-numeric device given to
  ``set_*_device_pinned_mem_limit`` (e.g. a GPU UUID) is accepted and has no effect, mimicking the
  silent ignore reported in k8s-device-plugin PR#572.
* Thread percentages accept any number in (0, 100]; the real daemon rounds to hardware granularity.
* Only the legacy v2 commands listed in docs/mps.md §2 exist, less ``get_device_client_list``; no MPS v3.

This module is pure: it never opens a socket, starts or signals a process, reads the environment or
touches a file. Whatever reaches the outside world is ``simulation.fake_mps_control``'s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from events.vocabulary import MIB_PER_GIB

UNSET_MEM_LIMIT_REPLY = "N/A"
SERVER_STATUS_REPLY = "ACTIVE"
DEFAULT_ACTIVE_THREAD_PERCENTAGE = 100.0

_MEM_LIMIT_ARGUMENT = re.compile(r"(\d+)([MG])")
_FIRST_FAKE_SERVER_PID = 40_000


class CommandRejectedError(Exception):
    """The daemon refuses a control command; the message is the reply the client prints."""


@dataclass(frozen=True)
class Reply:
    """The daemon's answer to one command."""

    text: str
    accepted: bool = True
    stops_daemon: bool = False


@dataclass
class FakeServer:
    """An MPS server entry: the limits it took from the defaults when it started, then its own."""

    uid: int
    active_thread_percentage: float
    pinned_mem_limits_mib: dict[int, int]


@dataclass
class ControlDaemonState:
    """Everything the daemon remembers; lives only in the daemon process and dies with ``quit``.

    ``execute`` is pure with respect to the outside world, so the command semantics can be tested
    in-process.
    """

    device_count: int | None
    default_active_thread_percentage: float = DEFAULT_ACTIVE_THREAD_PERCENTAGE
    default_pinned_mem_limits_mib: dict[int, int] = field(default_factory=dict)
    servers: dict[int, FakeServer] = field(default_factory=dict)
    next_server_pid: int = _FIRST_FAKE_SERVER_PID

    def execute(self, command: str) -> Reply:
        if not command.split():
            return Reply("Error: empty command", accepted=False)
        verb, *arguments = command.split()
        handler = self._handlers().get(verb)
        if handler is None:
            return Reply(f"Error: unknown command {verb!r}", accepted=False)
        try:
            return handler(arguments)
        except CommandRejectedError as rejection:
            return Reply(f"Error: {rejection}", accepted=False)

    def _handlers(self) -> dict[str, Callable[[list[str]], Reply]]:
        return {
            "get_server_list": self._get_server_list,
            "get_server_status": self._get_server_status,
            "start_server": self._start_server,
            "shutdown_server": self._shutdown_server,
            "get_client_list": self._get_client_list,
            "ps": self._ps,
            "quit": self._quit,
            "set_default_active_thread_percentage": self._set_default_active_thread_percentage,
            "get_default_active_thread_percentage": self._get_default_active_thread_percentage,
            "set_active_thread_percentage": self._set_active_thread_percentage,
            "get_active_thread_percentage": self._get_active_thread_percentage,
            "set_default_device_pinned_mem_limit": self._set_default_device_pinned_mem_limit,
            "get_default_device_pinned_mem_limit": self._get_default_device_pinned_mem_limit,
            "set_device_pinned_mem_limit": self._set_device_pinned_mem_limit,
            "get_device_pinned_mem_limit": self._get_device_pinned_mem_limit,
        }

    def _get_server_list(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 0, "get_server_list")
        return Reply("\n".join(str(pid) for pid in sorted(self.servers)))

    def _get_server_status(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 1, "get_server_status <PID>")
        self._server(arguments[0])
        return Reply(SERVER_STATUS_REPLY)

    def _start_server(self, arguments: list[str]) -> Reply:
        if len(arguments) != 2 or arguments[0] != "-uid":
            raise CommandRejectedError("usage: start_server -uid <uid> (-mlopart is not simulated)")
        uid = _non_negative_int(arguments[1], "uid")
        if any(server.uid == uid for server in self.servers.values()):
            raise CommandRejectedError(f"a server for uid {uid} is already running")
        self.servers[self.next_server_pid] = FakeServer(
            uid=uid,
            active_thread_percentage=self.default_active_thread_percentage,
            pinned_mem_limits_mib=dict(self.default_pinned_mem_limits_mib),
        )
        self.next_server_pid += 1
        return Reply("")

    def _shutdown_server(self, arguments: list[str]) -> Reply:
        if len(arguments) not in (1, 2) or arguments[1:] not in ([], ["-f"]):
            raise CommandRejectedError("usage: shutdown_server <PID> [-f]")
        self._server(arguments[0])
        del self.servers[int(arguments[0])]
        return Reply("")

    def _get_client_list(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 1, "get_client_list <PID>")
        self._server(arguments[0])
        return Reply("")

    def _ps(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 0, "ps")
        rows = [f"{pid} {server.uid} nvidia-cuda-mps-server" for pid, server in sorted(self.servers.items())]
        return Reply("\n".join(["PID UID COMMAND", *rows]))

    def _quit(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 0, "quit")
        return Reply("", stops_daemon=True)

    def _set_default_active_thread_percentage(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 1, "set_default_active_thread_percentage <percentage>")
        self.default_active_thread_percentage = _percentage(arguments[0])
        return Reply("")

    def _get_default_active_thread_percentage(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 0, "get_default_active_thread_percentage")
        return Reply(_format_percentage(self.default_active_thread_percentage))

    def _set_active_thread_percentage(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 2, "set_active_thread_percentage <PID> <percentage>")
        server = self._server(arguments[0])
        server.active_thread_percentage = _percentage(arguments[1])
        return Reply("")

    def _get_active_thread_percentage(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 1, "get_active_thread_percentage <PID>")
        return Reply(_format_percentage(self._server(arguments[0]).active_thread_percentage))

    def _set_default_device_pinned_mem_limit(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 2, "set_default_device_pinned_mem_limit <device> <value>")
        self._set_limit(self.default_pinned_mem_limits_mib, arguments[0], arguments[1])
        return Reply("")

    def _get_default_device_pinned_mem_limit(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 1, "get_default_device_pinned_mem_limit <device>")
        return Reply(_format_limit(self.default_pinned_mem_limits_mib.get(self._device(arguments[0]))))

    def _set_device_pinned_mem_limit(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 3, "set_device_pinned_mem_limit <PID> <device> <value>")
        server = self._server(arguments[0])
        self._set_limit(server.pinned_mem_limits_mib, arguments[1], arguments[2])
        return Reply("")

    def _get_device_pinned_mem_limit(self, arguments: list[str]) -> Reply:
        _expect_count(arguments, 2, "get_device_pinned_mem_limit <PID> <device>")
        server = self._server(arguments[0])
        return Reply(_format_limit(server.pinned_mem_limits_mib.get(self._device(arguments[1]))))

    def _set_limit(self, limits: dict[int, int], device: str, value: str) -> None:
        mib = _mem_limit_mib(value)
        if not device.isdigit():
            return  # the real daemon silently ignores a device given by UUID (k8s-device-plugin PR#572)
        limits[self._device(device)] = mib

    def _server(self, pid: str) -> FakeServer:
        server = self.servers.get(_non_negative_int(pid, "server PID"))
        if server is None:
            raise CommandRejectedError(f"no server with PID {pid}")
        return server

    def _device(self, device: str) -> int:
        index = _non_negative_int(device, "device index")
        if self.device_count is not None and index >= self.device_count:
            raise CommandRejectedError(
                f"invalid device {index}: the daemon sees {self.device_count} device(s)"
            )
        return index


def _expect_count(arguments: list[str], count: int, usage: str) -> None:
    if len(arguments) != count:
        raise CommandRejectedError(f"usage: {usage}")


def _non_negative_int(text: str, what: str) -> int:
    if not text.isdigit():
        raise CommandRejectedError(f"invalid {what} {text!r}")
    return int(text)


def _percentage(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CommandRejectedError(f"invalid active thread percentage {text!r}") from None
    if not 0 < value <= 100:
        raise CommandRejectedError(f"active thread percentage {text} is not within (0, 100]")
    return value


def _mem_limit_mib(text: str) -> int:
    match = _MEM_LIMIT_ARGUMENT.fullmatch(text)
    if match is None or int(match.group(1)) == 0:
        raise CommandRejectedError(
            f"invalid pinned memory limit {text!r}: expected a positive integer with G or M"
        )
    amount = int(match.group(1))
    return amount * MIB_PER_GIB if match.group(2) == "G" else amount


def _format_percentage(value: float) -> str:
    return f"{value:.1f}"


def _format_limit(mib: int | None) -> str:
    if mib is None:
        return UNSET_MEM_LIMIT_REPLY
    gib, rest = divmod(mib, MIB_PER_GIB)
    return f"{gib}G" if rest == 0 else f"{mib}M"
