"""Where a process's HTTP servers listen: `HOST:PORT`, or `fd:N`, a listening socket it was started with.

Where it sits: `--status-address` (every process, `services.kit.status`) and the admission
webhook's `--listen` take either form. `fd:N` is socket activation, as systemd does it: whoever
starts the process binds and listens first and hands the socket on (the demo does, for every
process it starts). No other process can then take the port between its choice and its use, and
the port stays the process's across restarts: connections made while it restarts wait in the
socket's backlog and are served by the next process. In a Pod, `HOST:PORT` is the form to use.

It only opens what it is told to: nothing here chooses a port or decides what is served.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

INHERITED = "fd:"


@dataclass(frozen=True)
class ListenAddress:
    """A TCP address to bind (`host`, `port`; port 0: any free one), or `inherited_fd`, the
    number of a listening socket the process was started with."""

    host: str = "0.0.0.0"
    port: int = 0
    inherited_fd: int | None = None

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """`HOST:PORT` (an empty host is every interface) or `fd:N`; ValueError naming `text` for
        anything else."""
        if text.startswith(INHERITED):
            number = text.removeprefix(INHERITED)
            if not number.isdigit():
                raise ValueError(f"{text!r} is not fd:N (N: the number of an inherited listening socket)")
            return cls(inherited_fd=int(number))
        host, colon, port = text.rpartition(":")
        if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r} is not HOST:PORT or fd:N")
        return cls(host or "0.0.0.0", int(port))

    def __str__(self) -> str:
        if self.inherited_fd is not None:
            return f"{INHERITED}{self.inherited_fd}"
        return f"{self.host}:{self.port}"

    def site(self, runner: web.AppRunner, tls: ssl.SSLContext | None = None) -> web.BaseSite:
        """The aiohttp site that serves `runner` here; starting it binds (a TCP address) or
        accepts on the inherited socket. OSError naming the descriptor if it is not a listening
        socket."""
        from aiohttp import web  # here, so that parsing an address costs no aiohttp import

        if self.inherited_fd is None:
            return web.TCPSite(runner, self.host, self.port, ssl_context=tls)
        return web.SockSite(runner, inherited_listener(self.inherited_fd), ssl_context=tls)


def inherited_listener(fd: int) -> socket.socket:
    """The listening socket open as descriptor `fd`; OSError saying what `fd` is instead."""
    try:
        listener = socket.socket(fileno=fd)
    except OSError as error:
        raise OSError(error.errno, f"{INHERITED}{fd} is not an open socket: {error.strerror}") from None
    if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listener.detach()  # the descriptor is the caller's, not ours to close
        raise OSError(f"{INHERITED}{fd} is a socket that does not listen")
    listener.setblocking(False)
    return listener


def bound_port(runner: web.AppRunner) -> int | None:
    """The TCP port `runner` serves on (the one chosen for port 0 or an inherited socket), if any."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[1], int):
            return address[1]
    return None
