"""`services.kit.listen`: the addresses a process serves HTTP on, and serving on a socket it inherits.

The processes here are real `mpsflow run admission-webhook` processes, handed listening sockets
as the demo hands them (`fd:N`); what they serve is asked over real HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from events.vocabulary import WEBHOOK_HEALTH_PATH
from services.kit.listen import ListenAddress, inherited_listener


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9000", ListenAddress("127.0.0.1", 9000)),
        (":8443", ListenAddress("0.0.0.0", 8443)),
        ("[::1]:0", ListenAddress("[::1]", 0)),
        ("fd:3", ListenAddress(inherited_fd=3)),
    ],
)
def test_an_address_is_host_and_port_or_an_inherited_descriptor(text: str, address: ListenAddress) -> None:
    assert ListenAddress.parse(text) == address
    assert ListenAddress.parse(str(address)) == address


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("8080", "'8080' is not HOST:PORT or fd:N"),
        ("localhost:http", "'localhost:http' is not HOST:PORT or fd:N"),
        ("localhost:70000", "'localhost:70000' is not HOST:PORT or fd:N"),
        ("fd:", "'fd:' is not fd:N"),
        ("fd:-1", "'fd:-1' is not fd:N"),
        ("fd:three", "'fd:three' is not fd:N"),
    ],
)
def test_anything_else_is_refused_naming_it(text: str, said: str) -> None:
    with pytest.raises(ValueError) as refused:
        ListenAddress.parse(text)
    assert str(refused.value).startswith(said)


def test_a_descriptor_that_is_not_a_socket_is_named(tmp_path: Path) -> None:
    with (tmp_path / "file").open("w") as file, pytest.raises(OSError) as refused:
        number = file.fileno()
        inherited_listener(number)
    assert f"fd:{number} is not an open socket: Socket operation on non-socket" in str(refused.value)


def test_a_socket_that_does_not_listen_is_named_and_left_open() -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        with pytest.raises(OSError, match=f"fd:{bound.fileno()} is a socket that does not listen"):
            inherited_listener(bound.fileno())
        assert bound.getsockname()[1] > 0  # still the caller's, still open


@pytest.fixture
def listeners() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A webhook socket and a status socket, bound and listening on loopback before any process runs."""
    with socket.socket() as webhook, socket.socket() as status:
        for listener in (webhook, status):
            listener.bind(("127.0.0.1", 0))
            listener.listen()
        yield webhook, status


def start_webhook(webhook: socket.socket, status: socket.socket) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "services.cli",
        "run",
        "admission-webhook",
        "--listen",
        f"fd:{webhook.fileno()}",
        "--status-address",
        f"fd:{status.fileno()}",
    ]
    handed = [webhook.fileno(), status.fileno()]
    return subprocess.Popen(command, pass_fds=handed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def get(listener: socket.socket, path: str, timeout: float = 30) -> str:
    """One HTTP/1.0 GET to `listener`'s port; the whole answer (status line, headers, body)."""
    with socket.create_connection(listener.getsockname(), timeout=timeout) as connection:
        connection.sendall(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
    return answer.decode()


def stop(process: subprocess.Popen[bytes]) -> str:
    process.terminate()
    output, _ = process.communicate(timeout=30)
    return output.decode()


def test_a_process_serves_on_the_sockets_it_is_handed(listeners: tuple[socket.socket, socket.socket]) -> None:
    webhook, status = listeners
    process = start_webhook(webhook, status)
    try:
        assert get(webhook, WEBHOOK_HEALTH_PATH).startswith("HTTP/1.0 200")
        readiness = get(status, "/readyz")
        assert readiness.startswith("HTTP/1.0 200") and readiness.endswith("serving\n")
    finally:
        log = stop(process)
    assert process.returncode == 0, log
    assert f"on fd:{status.fileno()}, port {status.getsockname()[1]}" in log


def test_the_port_outlives_a_restart_and_a_request_made_between_is_answered(
    listeners: tuple[socket.socket, socket.socket],
) -> None:
    webhook, status = listeners
    first = start_webhook(webhook, status)
    try:
        assert get(webhook, WEBHOOK_HEALTH_PATH).startswith("HTTP/1.0 200")
    finally:
        first.kill()
        first.communicate(timeout=30)
    # Nothing serves now, yet the port is held: a connection made now waits in the backlog.
    waiting = socket.create_connection(webhook.getsockname(), timeout=30)
    waiting.sendall(f"GET {WEBHOOK_HEALTH_PATH} HTTP/1.0\r\n\r\n".encode())
    time.sleep(0.2)
    second = start_webhook(webhook, status)
    try:
        with waiting:
            assert waiting.recv(4096).startswith(b"HTTP/1.0 200")
    finally:
        log = stop(second)
    assert second.returncode == 0, log


def test_a_descriptor_it_was_not_handed_stops_the_process_naming_it() -> None:
    unused = 1000  # no descriptor this high is open in a process just started
    command = ["run", "admission-webhook", "--listen", f"fd:{unused}", "--status-address", "none"]
    finished = subprocess.run(
        [sys.executable, "-m", "services.cli", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode != 0
    assert f"fd:{unused} is not an open socket" in finished.stdout + finished.stderr
