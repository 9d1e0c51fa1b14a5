"""The production steps on a real nats-server: credentials, the server's trust, bootstrap, a service.

`mpsflow credentials` writes the server's side of the trust and one `.creds` per identity; the server
runs with that file; `mpsflow bootstrap` with the admin's credentials makes the streams; a node agent
then connects with its own credentials and reports. A service started before the bootstrap stops,
naming it. Over TLS, with a client certificate the server asks for, the same works, and without one
the server refuses the connection.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from events import access, subjects
from events.bootstrap import BusLimits, bootstrap
from events.credentials import AUTH_CONFIG, credentials_path
from events.jetstream import EventBus, NatsOptions
from events.nodes import GpuReport, NodeGpusReported
from simulation.nats_server import LocalNatsServer

NODE = "gpu-1"
REFUSED_HANDSHAKE = (OSError, nats.errors.Error)
"""How a connection the server ends in the TLS handshake fails (a broken pipe, a reset, an SSL error)."""


def mpsflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def issued(tmp_path: Path) -> Path:
    finished = mpsflow("credentials", str(tmp_path / "credentials"), "--node", NODE)
    assert finished.returncode == 0, finished.stderr
    return tmp_path / "credentials"


@pytest.fixture
def server(issued: Path) -> Iterator[LocalNatsServer]:
    with LocalNatsServer(extra_config=(issued / AUTH_CONFIG).read_text()) as running:
        yield running


def report() -> NodeGpusReported:
    gpu = GpuReport(index=0, uuid="GPU-0", model="A100", memory_mib=81920, compute_capability=(8, 0))
    return NodeGpusReported(node=NODE, gpus=(gpu,))


@pytest.mark.anyio
async def test_from_issued_credentials_to_a_node_agent_reporting(
    issued: Path, server: LocalNatsServer
) -> None:
    admin = credentials_path(issued, access.ADMIN)
    bootstrapped = mpsflow("bootstrap", "--nats-url", server.url, "--nats-creds", str(admin))
    assert bootstrapped.returncode == 0, bootstrapped.stderr
    assert bootstrapped.stdout.splitlines() == [
        f"mpsflow bootstrap: {name}: created" for name in access.STREAMS
    ]

    identity = access.node_agent_identity(NODE)
    options = NatsOptions(server.url, identity, credentials=credentials_path(issued, identity))
    bus = await EventBus.connect(options, source=f"node-agent/{NODE}")
    try:
        assert await bus.publish(subjects.gpus_subject(NODE), report()) == 1
    finally:
        await bus.close()


def test_a_service_started_before_the_bootstrap_stops_naming_it(
    issued: Path, server: LocalNatsServer
) -> None:
    planner = credentials_path(issued, access.PLANNER)
    finished = mpsflow("run", "planner", "--nats-url", server.url, "--nats-creds", str(planner))
    assert finished.returncode != 0
    assert "run `mpsflow bootstrap` with the admin credentials" in finished.stderr


def test_the_cli_refuses_a_client_certificate_without_its_key(tmp_path: Path) -> None:
    finished = mpsflow("run", "planner", "--nats-tls-cert", str(tmp_path / "client.pem"))
    assert finished.returncode == 2
    assert "give both --nats-tls-cert and --nats-tls-key" in finished.stderr


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path / "tls"
    folder.mkdir()
    ca, ca_key = str(folder / "ca.pem"), str(folder / "ca.key")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        ca_key,
        "-out",
        ca,
    )
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        key, request, certificate = (str(folder / f"{name}.{suffix}") for suffix in ("key", "csr", "pem"))
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key, "-out", request
        )
        signing = [
            "x509",
            "-req",
            "-days",
            "1",
            "-in",
            request,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
        ]
        extensions = ["-extfile", str(folder / "server.ext")] if name == "server" else []
        openssl(*signing, *extensions, "-out", certificate)
    return folder


@pytest.mark.anyio
async def test_over_tls_a_client_certificate_is_asked_for_and_the_bus_works(certificates: Path) -> None:
    tls = (
        f'tls {{ cert_file: "{certificates / "server.pem"}", key_file: "{certificates / "server.key"}", '
        f'ca_file: "{certificates / "ca.pem"}", verify: true }}'
    )
    with LocalNatsServer(secured=True, extra_config=tls) as server:
        admin = server.options_as_admin()
        mutual = {"tls_ca": certificates / "ca.pem", "tls_cert": certificates / "client.pem"}
        admin = NatsOptions(
            admin.url, admin.identity, admin.credentials, **mutual, tls_key=certificates / "client.key"
        )
        await bootstrap(admin, BusLimits())
        agent = server.options_as(access.node_agent_role(NODE))
        options = NatsOptions(
            agent.url, agent.identity, agent.credentials, **mutual, tls_key=certificates / "client.key"
        )
        bus = await EventBus.connect(options, source=f"node-agent/{NODE}")
        try:
            assert await bus.publish(subjects.gpus_subject(NODE), report()) == 1
        finally:
            await bus.close()

        without_certificate = NatsOptions(
            agent.url, agent.identity, agent.credentials, tls_ca=certificates / "ca.pem"
        )
        with pytest.raises(REFUSED_HANDSHAKE):
            await nats.connect(
                agent.url,
                user_credentials=str(agent.credentials),
                tls=without_certificate.tls_context(),
                allow_reconnect=False,
                connect_timeout=2,
            )
