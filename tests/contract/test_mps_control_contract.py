"""The MPS control port's behaviour, held against the fake daemon and, on a GPU, the real one.

`SubprocessMpsControl` drives `nvidia-cuda-mps-control`; the node agent relies on what this suite
states. Everywhere it runs against `simulation.fake_mps_control` (a separate process, as the real
daemon is) and against `simulation.fake_mps_inprocess` (the same fake daemon's state inside the
calling process, as the demo's node hosts run it; it has no control socket and its pid file names
the host); on a machine with an NVIDIA GPU (`-m gpu`, or any run where NVML loads and the binary
is on the PATH) it runs against the real daemon too, so the fake cannot drift from the real thing
unnoticed. The replies and failures mpsflow relies on are pinned row by row in `mps_replies.py`, each
row verified from a public source or marked unverified; this suite is where a GPU run settles them.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from node_agent.mps import (
    DaemonSpec,
    MpsCommandError,
    MpsControl,
    SubprocessMpsControl,
    apply_gpu_defaults,
    parse_mem_limit,
    parse_server_list,
    parse_thread_percentage,
)
from simulation.fake_mps_inprocess import InProcessDaemons, InProcessMpsControl
from tests.contract.mps_replies import FAILURES, REPLIES, Failure, Reply
from tests.support import wait_until_gone

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_EXECUTABLE = (sys.executable, "-m", "simulation.fake_mps_control")


def real_daemon_available() -> bool:
    if shutil.which("nvidia-cuda-mps-control") is None:
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    return True


pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _first_gpu_uuid() -> tuple[int, str]:
    from node_agent.nvml import NvmlInventory

    usable = [g for g in await NvmlInventory().read() if not g.mig_enabled]
    if not usable:
        pytest.skip("every GPU is in MIG mode")
    return usable[0].index, usable[0].uuid


@pytest.fixture(
    params=[
        "fake",
        "in-process",
        pytest.param(
            "real",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not real_daemon_available(), reason="needs an NVIDIA GPU and nvidia-cuda-mps-control"
                ),
            ],
        ),
    ]
)
async def mps(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[MpsControl, DaemonSpec]]:
    with tempfile.TemporaryDirectory(prefix="mpsc-", dir="/tmp") as root:  # socket paths stay short
        control: MpsControl
        if request.param == "in-process":
            control = InProcessDaemons().control()
            daemon = DaemonSpec.under(Path(root), 0, f"GPU-{uuid.uuid4()}")
        elif request.param == "fake":
            # The fake runs as `python -m simulation...`, whatever directory pytest runs from.
            monkeypatch.setenv(
                "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
            )
            control = SubprocessMpsControl(FAKE_EXECUTABLE)
            daemon = DaemonSpec.under(Path(root), 0, f"GPU-{uuid.uuid4()}")
        else:
            control = SubprocessMpsControl()
            daemon = DaemonSpec.under(Path(root), *await _first_gpu_uuid())
        try:
            yield control, daemon
        finally:
            with anyio.CancelScope(shield=True):
                await _stop(control, daemon)


async def _stop(control: MpsControl, daemon: DaemonSpec) -> None:
    """Quit the daemon if it answers; kill it if it does not (a test may have left it broken)."""
    if await control.is_alive(daemon):
        await control.send(daemon, "quit")
    try:
        pid = int(daemon.pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return
    if pid == os.getpid():  # an in-process daemon: it lives in this very process
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_until_gone(pid)


async def test_start_daemon_leaves_a_daemon_answering(mps: tuple[MpsControl, DaemonSpec]) -> None:
    control, daemon = mps
    assert not await control.is_alive(daemon)

    await control.start_daemon(daemon)

    assert await control.is_alive(daemon)
    assert daemon.control_socket.is_socket() or isinstance(control, InProcessMpsControl)
    assert daemon.pid_file.is_file()


async def test_start_daemon_adopts_a_daemon_that_answers(
    mps: tuple[MpsControl, DaemonSpec],
) -> None:
    control, daemon = mps
    await control.start_daemon(daemon)
    first_pid = daemon.pid_file.read_text()

    await control.start_daemon(daemon)

    assert daemon.pid_file.read_text() == first_pid


@pytest.mark.parametrize("case", REPLIES, ids=lambda case: case.id)
async def test_the_daemon_replies_as_pinned(mps: tuple[MpsControl, DaemonSpec], case: Reply) -> None:
    control, daemon = mps
    await control.start_daemon(daemon)
    for command in case.setup:
        await control.send(daemon, command.format(uid=os.getuid()))

    reply = await control.send(daemon, case.command)

    assert case.matches(reply), f"{case.command!r} replied {reply!r}; pinned {case.example!r} ({case.source})"
    if case.parser is not None:
        case.parser(reply)


@pytest.mark.parametrize("case", FAILURES, ids=lambda case: case.id)
async def test_the_daemon_fails_as_pinned(mps: tuple[MpsControl, DaemonSpec], case: Failure) -> None:
    control, daemon = mps
    if case.daemon_running:
        await control.start_daemon(daemon)

    with pytest.raises(MpsCommandError) as failure:
        await control.send(daemon, case.command)

    status = failure.value.exit_status
    assert status, case.source  # exited non-zero; None would be a timeout
    if case.exit_status is not None:
        assert status == case.exit_status, case.source
    assert case.output in failure.value.output, (failure.value.output, case.source)


async def test_gpu_defaults_are_applied_and_read_back(mps: tuple[MpsControl, DaemonSpec]) -> None:
    control, daemon = mps
    await control.start_daemon(daemon)

    await apply_gpu_defaults(control, daemon, pinned_mem_limit_mib=10240, active_thread_percentage=50)

    assert parse_mem_limit(await control.send(daemon, "get_default_device_pinned_mem_limit 0")) == 10240
    assert parse_thread_percentage(await control.send(daemon, "get_default_active_thread_percentage")) == 50.0


async def test_a_server_keeps_the_defaults_it_started_with(
    mps: tuple[MpsControl, DaemonSpec],
) -> None:
    control, daemon = mps
    await control.start_daemon(daemon)
    await apply_gpu_defaults(control, daemon, pinned_mem_limit_mib=8192, active_thread_percentage=50)
    await control.send(daemon, f"start_server -uid {os.getuid()}")
    [server] = parse_server_list(await control.send(daemon, "get_server_list"))

    await apply_gpu_defaults(control, daemon, pinned_mem_limit_mib=4096, active_thread_percentage=25)

    assert (
        parse_thread_percentage(await control.send(daemon, f"get_active_thread_percentage {server}")) == 50.0
    )
    assert parse_mem_limit(await control.send(daemon, f"get_device_pinned_mem_limit {server} 0")) == 8192
    assert parse_thread_percentage(await control.send(daemon, "get_default_active_thread_percentage")) == 25.0


async def test_a_running_server_can_be_retargeted_on_its_own(
    mps: tuple[MpsControl, DaemonSpec],
) -> None:
    control, daemon = mps
    await control.start_daemon(daemon)
    await control.send(daemon, f"start_server -uid {os.getuid()}")
    [server] = parse_server_list(await control.send(daemon, "get_server_list"))

    await control.send(daemon, f"set_active_thread_percentage {server} 30")
    await control.send(daemon, f"set_device_pinned_mem_limit {server} 0 2G")

    assert (
        parse_thread_percentage(await control.send(daemon, f"get_active_thread_percentage {server}")) == 30.0
    )
    assert parse_mem_limit(await control.send(daemon, f"get_device_pinned_mem_limit {server} 0")) == 2048
    assert (
        parse_thread_percentage(await control.send(daemon, "get_default_active_thread_percentage")) == 100.0
    )


async def test_quit_stops_the_daemon_and_a_new_one_starts_from_the_defaults(
    mps: tuple[MpsControl, DaemonSpec],
) -> None:
    control, daemon = mps
    await control.start_daemon(daemon)
    await control.send(daemon, "set_default_active_thread_percentage 40")
    pid = int(daemon.pid_file.read_text())

    await control.send(daemon, "quit")

    if pid != os.getpid():  # an in-process daemon's pid is this process's
        wait_until_gone(pid)
    assert not await control.is_alive(daemon)
    await control.start_daemon(daemon)
    assert (
        parse_thread_percentage(await control.send(daemon, "get_default_active_thread_percentage")) == 100.0
    )


async def test_a_command_the_daemon_rejects_fails(mps: tuple[MpsControl, DaemonSpec]) -> None:
    control, daemon = mps
    await control.start_daemon(daemon)
    with pytest.raises(MpsCommandError):
        await control.send(daemon, "set_default_active_thread_percentage 250")
    assert (
        parse_thread_percentage(await control.send(daemon, "get_default_active_thread_percentage")) == 100.0
    )
