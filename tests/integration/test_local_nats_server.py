"""`simulation.nats_server.LocalNatsServer`, the real nats-server every bus test and the demo run on:
the port it takes is one no outgoing connection can take from it, it tries another where one is
taken, and a crash and restart keeps it, as the clients' URL needs."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import simulation.nats_server
from simulation.nats_server import PORT_TRIES, LocalNatsServer, unclaimed_ports


def ephemeral_ports() -> range:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return range(int(low), int(high) + 1)


def test_its_ports_lie_below_the_range_outgoing_connections_take_theirs_from() -> None:
    ports = unclaimed_ports()
    assert ports.start >= 1024
    assert ports.stop - 1 < ephemeral_ports().start
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as outgoing:
            assert outgoing.getsockname()[1] in ephemeral_ports()


@pytest.fixture
def taken() -> Iterator[int]:
    """A port of `unclaimed_ports` that another process (here: this one) listens on."""
    chooser = random.Random()
    for _ in range(100):
        held = socket.socket()
        try:
            held.bind(("127.0.0.1", chooser.choice(unclaimed_ports())))
        except OSError:
            held.close()
            continue
        with held:
            held.listen()
            yield int(held.getsockname()[1])
        return
    pytest.fail("no free port below the ephemeral range in 100 tries")


class Choices:
    """Gives `given` in order, then whatever the real chooser would."""

    def __init__(self, *given: int) -> None:
        self.given = list(given)

    def choice(self, ports: range) -> int:
        return self.given.pop(0) if self.given else random.SystemRandom().choice(ports)


def test_a_taken_port_is_passed_over_for_another(taken: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulation.nats_server, "_PICK", Choices(taken, taken))
    with LocalNatsServer() as server:
        assert server.port != taken
        assert server.port in unclaimed_ports()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
            assert connection.recv(4).startswith(b"INFO")


def test_it_gives_up_naming_the_tries_when_every_port_is_taken(
    taken: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(simulation.nats_server, "_PICK", Choices(*[taken] * PORT_TRIES))
    with pytest.raises(RuntimeError, match=f"nats-server found no free port in {PORT_TRIES} tries"):
        LocalNatsServer(tmp_path / "store").start()


def test_a_restart_after_a_crash_serves_on_the_same_port_and_keeps_the_store(tmp_path: Path) -> None:
    server = LocalNatsServer(tmp_path / "store").start()
    try:
        port, url = server.port, server.url
        server.kill()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        server.start()
        assert (server.port, server.url) == (port, url)
        assert (tmp_path / "store" / "jetstream").is_dir()
    finally:
        server.stop()


def test_before_its_first_start_it_has_no_url() -> None:
    with pytest.raises(RuntimeError, match="has not started"):
        _ = LocalNatsServer().url
