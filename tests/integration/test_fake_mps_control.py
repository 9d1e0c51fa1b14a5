"""What only the fake ``nvidia-cuda-mps-control`` shows: its command log, its replies and refusals,
and how the adapter copes with a daemon that hangs, dies or never comes up. What the real daemon
must do too is in tests/contract/test_mps_control_contract.py.

Each test gets its own daemon directory under /tmp (unix socket paths must stay under 108 bytes) and
the fixture kills whatever daemon is left. The last group runs the fake daemon's command semantics
in-process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from node_agent.mps import (
    DaemonSpec,
    MpsCommandError,
    SubprocessMpsControl,
    apply_gpu_defaults,
    parse_mem_limit,
    parse_thread_percentage,
)
from simulation.fake_mps_commands import ControlDaemonState
from simulation.fake_mps_control import read_logged_commands
from tests.support import eventually, wait_until_gone

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_EXECUTABLE = (sys.executable, "-m", "simulation.fake_mps_control")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonSpec]:
    # The fake runs as `python -m simulation...`; make that resolve whatever directory pytest runs from.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    with tempfile.TemporaryDirectory(prefix="mpsflow-", dir="/tmp") as root:
        spec = DaemonSpec.under(Path(root), 0, f"GPU-{uuid.uuid4()}")
        try:
            yield spec
        finally:
            _kill_fake_daemon(spec)


@pytest.fixture
def control() -> SubprocessMpsControl:
    return SubprocessMpsControl(FAKE_EXECUTABLE)


async def test_gpu_defaults_are_applied_and_logged(control: SubprocessMpsControl, daemon: DaemonSpec) -> None:
    await control.start_daemon(daemon)

    await apply_gpu_defaults(control, daemon, pinned_mem_limit_mib=10240, active_thread_percentage=50)

    assert parse_mem_limit(await control.send(daemon, "get_default_device_pinned_mem_limit 0")) == 10240
    assert parse_thread_percentage(await control.send(daemon, "get_default_active_thread_percentage")) == 50.0
    assert read_logged_commands(daemon.log_dir) == [
        "get_default_active_thread_percentage",  # start_daemon's readiness probe
        "set_default_device_pinned_mem_limit 0 10240M",
        "set_default_active_thread_percentage 50",
        "get_default_device_pinned_mem_limit 0",
        "get_default_active_thread_percentage",
    ]


async def test_quit_stops_the_daemon_and_forgets_its_defaults(
    control: SubprocessMpsControl, daemon: DaemonSpec
) -> None:
    await control.start_daemon(daemon)
    await control.send(daemon, "set_default_active_thread_percentage 40")
    pid = _daemon_pid(daemon)

    assert await control.send(daemon, "quit") == ""

    assert not await control.is_alive(daemon)
    assert not daemon.control_socket.exists()
    assert not daemon.pid_file.exists()
    wait_until_gone(pid)
    await control.start_daemon(daemon)
    assert await control.send(daemon, "get_default_active_thread_percentage") == "100.0"


async def test_a_second_daemon_on_the_same_pipe_is_refused(
    control: SubprocessMpsControl, daemon: DaemonSpec
) -> None:
    await control.start_daemon(daemon)

    second = await _start_fake_directly(daemon)

    assert second.returncode == 1
    assert "already running" in second.stderr.decode()
    assert await control.is_alive(daemon)


async def test_start_daemon_clears_what_a_killed_daemon_left(
    control: SubprocessMpsControl, daemon: DaemonSpec
) -> None:
    await control.start_daemon(daemon)
    killed = _daemon_pid(daemon)
    os.kill(killed, signal.SIGKILL)
    wait_until_gone(killed)
    assert daemon.control_socket.exists()
    assert not await control.is_alive(daemon)
    unassisted = await _start_fake_directly(daemon)
    assert unassisted.returncode == 1
    assert "stale control socket" in unassisted.stderr.decode()

    await control.start_daemon(daemon)

    assert await control.is_alive(daemon)
    assert _daemon_pid(daemon) != killed


async def test_a_daemon_that_is_alive_but_silent_is_never_replaced(daemon: DaemonSpec) -> None:
    """A probe that times out proves nothing: the daemon may be stopped or busy. Clearing its socket
    and starting another on the same pipe would split the GPU's clients between two daemons."""
    control = SubprocessMpsControl(FAKE_EXECUTABLE, timeout=0.5)
    await control.start_daemon(daemon)
    pid = _daemon_pid(daemon)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(MpsCommandError, match=f"daemon pid {pid} holds .* but does not answer"):
            await control.start_daemon(daemon)
        assert daemon.control_socket.exists()
        assert _daemon_pid(daemon) == pid
    finally:
        os.kill(pid, signal.SIGCONT)
    assert await control.is_alive(daemon)
    assert _daemon_pid(daemon) == pid


async def test_a_rejected_command_fails_with_the_daemons_reason(
    control: SubprocessMpsControl, daemon: DaemonSpec
) -> None:
    await control.start_daemon(daemon)

    with pytest.raises(MpsCommandError) as failure:
        await control.send(daemon, "set_default_device_pinned_mem_limit 0 10T")

    assert failure.value.exit_status == 1
    assert "invalid pinned memory limit '10T'" in failure.value.output
    assert await control.send(daemon, "get_default_device_pinned_mem_limit 0") == "N/A"


async def test_a_command_that_hangs_times_out(daemon: DaemonSpec) -> None:
    hanging = SubprocessMpsControl((sys.executable, "-c", "import time; time.sleep(30)"), timeout=0.5)

    with anyio.fail_after(5):
        with pytest.raises(MpsCommandError) as failure:
            await hanging.send(daemon, "get_server_list")

    assert failure.value.exit_status is None


@pytest.mark.parametrize(
    ("script", "exit_status", "output"),
    [
        pytest.param("import sys; sys.exit('cannot start')", 1, "cannot start", id="start-fails"),
        pytest.param(
            "import sys; sys.exit(0 if '-d' in sys.argv else 1)", 0, "did not answer", id="never-answers"
        ),
    ],
)
async def test_start_daemon_reports_a_daemon_that_does_not_come_up(
    daemon: DaemonSpec, script: str, exit_status: int, output: str
) -> None:
    broken = SubprocessMpsControl((sys.executable, "-c", script), timeout=0.5)

    with pytest.raises(MpsCommandError) as failure:
        await broken.start_daemon(daemon)

    assert failure.value.exit_status == exit_status
    assert output in failure.value.output


async def test_send_takes_exactly_one_command(control: SubprocessMpsControl, daemon: DaemonSpec) -> None:
    with pytest.raises(ValueError, match="exactly one control command"):
        await control.send(daemon, "get_server_list\nquit")


async def test_foreground_daemon_logs_to_stdout_and_exits_on_quit(
    control: SubprocessMpsControl, daemon: DaemonSpec
) -> None:
    foreground = await anyio.open_process(
        [*FAKE_EXECUTABLE, "-f"], env={**os.environ, **daemon.environment()}, stdin=subprocess.DEVNULL
    )
    try:
        with anyio.fail_after(5):
            await eventually(lambda: control.is_alive(daemon), "the foreground daemon to answer")
            await control.send(daemon, "quit")
            assert await foreground.wait() == 0
        assert foreground.stdout is not None
        output = (await foreground.stdout.receive()).decode()
    finally:
        if foreground.returncode is None:
            foreground.kill()
        await foreground.aclose()

    assert "Starting control daemon using socket" in output


# The command semantics, in-process.


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        pytest.param("get_default_thread_percentage", "unknown command", id="unknown-verb"),
        pytest.param("set_default_active_thread_percentage", "usage", id="missing-argument"),
        pytest.param("set_default_active_thread_percentage 0", "not within", id="zero-threads"),
        pytest.param("set_default_active_thread_percentage 150", "not within", id="too-many-threads"),
        pytest.param("set_default_device_pinned_mem_limit 0 10", "expected a positive integer", id="no-unit"),
        pytest.param("set_default_device_pinned_mem_limit 0 0M", "expected a positive integer", id="zero"),
        pytest.param("set_default_device_pinned_mem_limit 1 1G", "invalid device 1", id="invisible-device"),
        pytest.param("get_active_thread_percentage 99", "no server with PID 99", id="unknown-server"),
        pytest.param("start_server -uid 0 -mlopart", "not simulated", id="mlopart"),
        pytest.param("shutdown_server 40000 now", "usage", id="bad-shutdown-flag"),
    ],
)
def test_the_fake_rejects_bad_commands(command: str, reason: str) -> None:
    reply = ControlDaemonState(device_count=1).execute(command)

    assert not reply.accepted
    assert reply.text.startswith("Error: ")
    assert reason in reply.text


def test_the_fake_ignores_a_device_given_by_uuid_like_the_real_daemon() -> None:
    state = ControlDaemonState(device_count=1)

    reply = state.execute("set_default_device_pinned_mem_limit GPU-5d2f3b8e 10G")

    assert reply.accepted
    assert state.execute("get_default_device_pinned_mem_limit 0").text == "N/A"


def test_the_fake_runs_one_server_per_uid_and_shuts_servers_down() -> None:
    state = ControlDaemonState(device_count=None)
    state.execute("start_server -uid 1000")
    state.execute("start_server -uid 2000")

    duplicate = state.execute("start_server -uid 1000")
    listing = state.execute("ps").text
    state.execute("shutdown_server 40000 -f")

    assert not duplicate.accepted
    assert listing == "PID UID COMMAND\n40000 1000 nvidia-cuda-mps-server\n40001 2000 nvidia-cuda-mps-server"
    assert state.execute("get_server_list").text == "40001"
    assert state.execute("get_client_list 40001").text == ""


def _daemon_pid(daemon: DaemonSpec) -> int:
    return int(daemon.pid_file.read_text())


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] == "Z"


async def _start_fake_directly(daemon: DaemonSpec) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [*FAKE_EXECUTABLE, "-d"], env={**os.environ, **daemon.environment()}, check=False
    )


def _kill_fake_daemon(daemon: DaemonSpec) -> None:
    """SIGKILL the daemon named by the pid file, if it is still our fake (PIDs get reused)."""
    try:
        pid = _daemon_pid(daemon)
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return
    if b"simulation.fake_mps_control" in command_line:
        os.kill(pid, signal.SIGKILL)
        wait_until_gone(pid)
