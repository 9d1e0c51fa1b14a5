"""The shm-directory IPC mode's MPS control command run for real: tmpfs and bind mounts in mount
namespaces on this machine, with the fake MPS control daemon standing in for NVIDIA's binary.

What it shows: a daemon started through `shm_directory_control` lives in a mount namespace of its own
whose /dev/shm is its GPU's tmpfs, the directory Allocate gives that GPU's slice containers; each GPU
gets its own; control commands reach the daemon through the same wrapper; a command is refused while
no tmpfs is mounted; a daemon started again keeps the tmpfs its clients hold. What it cannot show: a
real MPS server using that /dev/shm, the kubelet binding it into a container, and mount propagation
between pods and the host (docs/mps.md, "The shm-directory IPC mode", says what was not run on a node).
Those need root with CAP_SYS_ADMIN and util-linux (`unshare`, `mount`, `mountpoint`) and are skipped
otherwise; the refusals that come before any mount need only `sh`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from node_agent.mps import DaemonSpec, MpsCommandError, SubprocessMpsControl
from node_agent.shm import SHM_TMPFS_SOURCE, shm_directory_control
from node_agent.slices import mps_shm_directory
from tests.support import wait_until_gone

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_CONTROL = (sys.executable, "-m", "simulation.fake_mps_control")


def _can_make_mount_namespaces() -> bool:
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "mount", "mountpoint")):
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False, timeout=10)
    return probe.returncode == 0


pytestmark = pytest.mark.anyio
needs_mount_namespaces = pytest.mark.skipif(
    not _can_make_mount_namespaces(), reason="needs root, CAP_SYS_ADMIN and util-linux"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An MPS root in /tmp (unix socket paths stay short); on the way out, the fake daemons started
    under it are killed and the tmpfs mounted under it unmounted."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    made = Path(tempfile.mkdtemp(prefix="mpsf-shm-", dir="/tmp"))
    try:
        yield made
    finally:
        for pid_file in made.glob("*/pipe/nvidia-cuda-mps-control.pid"):
            _kill_fake_daemon(int(pid_file.read_text()))
        for shm in made.glob("*/shm"):
            if os.path.ismount(shm):
                subprocess.run(["umount", "--lazy", str(shm)], check=True, timeout=10)
        shutil.rmtree(made)


@pytest.fixture
def control() -> SubprocessMpsControl:
    return SubprocessMpsControl(shm_directory_control(FAKE_CONTROL))


def _gpu(root: Path, index: int) -> DaemonSpec:
    return DaemonSpec.under(root, index, f"GPU-{uuid.uuid4()}")


def _kill_fake_daemon(pid: int) -> None:
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return
    if b"simulation.fake_mps_control" in command_line:
        os.kill(pid, signal.SIGKILL)
        wait_until_gone(pid)


def _daemon_pid(daemon: DaemonSpec) -> int:
    return int(daemon.pid_file.read_text())


def _dev_shm_of(daemon: DaemonSpec) -> Path:
    """/dev/shm as the daemon's own mount namespace has it."""
    return Path(f"/proc/{_daemon_pid(daemon)}/root/dev/shm")


def _filesystem(path: Path) -> int:
    return path.stat().st_dev


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def _write(path: Path, content: bytes) -> None:
    path.write_bytes(content)


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def _mounts_at(path: Path) -> list[tuple[str, str, str, str]]:
    """(filesystem type, source, mount options, superblock options) of each mount on `path`, as this
    process sees them (/proc/self/mountinfo)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        own, _, shared = line.partition(" - ")
        fields = own.split()
        if fields[4] == str(path):
            fstype, source, super_options = shared.split()[:3]
            found.append((fstype, source, fields[5], super_options))
    return found


@needs_mount_namespaces
async def test_a_command_is_refused_while_no_tmpfs_is_mounted(
    root: Path, control: SubprocessMpsControl
) -> None:
    daemon = _gpu(root, 0)
    shm = mps_shm_directory(root, daemon.gpu_uuid)

    assert not await control.is_alive(daemon)
    with pytest.raises(MpsCommandError) as refused:
        await control.send(daemon, "get_server_list")

    assert refused.value.exit_status == 1
    assert f"mpsflow-mps-shm: no tmpfs is mounted on {shm}" in refused.value.output
    assert not shm.exists()  # only a daemon start mounts one


@needs_mount_namespaces
async def test_the_daemon_has_its_gpus_tmpfs_as_dev_shm_and_commands_reach_it(
    root: Path, control: SubprocessMpsControl
) -> None:
    daemon = _gpu(root, 0)
    shm = mps_shm_directory(root, daemon.gpu_uuid)

    await control.start_daemon(daemon)

    [(fstype, source, options, _)] = _mounts_at(shm)
    assert (fstype, source) == ("tmpfs", SHM_TMPFS_SOURCE)
    assert {"rw", "nosuid", "nodev", "noexec"} <= set(options.split(","))
    assert _mode(shm) == 0o1777  # clients of any user create their files there
    assert _filesystem(_dev_shm_of(daemon)) == _filesystem(shm) != _filesystem(Path("/dev/shm"))
    _write(shm / "cuda.shm.0.1.1", b"client")  # what a slice container writes, its server reads
    assert _files(_dev_shm_of(daemon)) == {"cuda.shm.0.1.1": b"client"}
    # The bind over /dev/shm stayed in the daemon's namespace.
    assert SHM_TMPFS_SOURCE not in {source for _, source, _, _ in _mounts_at(Path("/dev/shm"))}
    assert await control.send(daemon, "get_server_list") == ""
    assert await control.is_alive(daemon)


@needs_mount_namespaces
async def test_each_gpu_gets_a_tmpfs_of_its_own(root: Path, control: SubprocessMpsControl) -> None:
    first, second = _gpu(root, 0), _gpu(root, 1)

    await control.start_daemon(first)
    await control.start_daemon(second)

    assert _filesystem(_dev_shm_of(first)) == _filesystem(mps_shm_directory(root, first.gpu_uuid))
    assert _filesystem(_dev_shm_of(second)) == _filesystem(mps_shm_directory(root, second.gpu_uuid))
    assert _filesystem(_dev_shm_of(first)) != _filesystem(_dev_shm_of(second))
    _write(mps_shm_directory(root, first.gpu_uuid) / "only-gpu-0", b"")
    assert _files(_dev_shm_of(first)) == {"only-gpu-0": b""}
    assert _files(_dev_shm_of(second)) == {}


@needs_mount_namespaces
async def test_a_daemon_started_again_keeps_the_tmpfs_its_clients_hold(
    root: Path, control: SubprocessMpsControl
) -> None:
    daemon = _gpu(root, 0)
    shm = mps_shm_directory(root, daemon.gpu_uuid)
    await control.start_daemon(daemon)
    filesystem = _filesystem(shm)
    _write(shm / "held-by-a-client", b"")

    _kill_fake_daemon(_daemon_pid(daemon))
    assert not await control.is_alive(daemon)
    await control.start_daemon(daemon)

    assert len(_mounts_at(shm)) == 1  # not mounted over: running clients would be split off
    assert _filesystem(shm) == filesystem
    assert _files(_dev_shm_of(daemon)) == {"held-by-a-client": b""}


@needs_mount_namespaces
async def test_a_command_runs_as_the_process_its_caller_started(root: Path) -> None:
    """exec all the way down: a caller that kills its command on a timeout kills the command itself."""
    daemon = _gpu(root, 0)
    await SubprocessMpsControl(shm_directory_control(FAKE_CONTROL)).start_daemon(daemon)
    report = "import os, sys; sys.stdin.read(); print(os.getpid())"
    command = shm_directory_control((sys.executable, "-c", report))

    def run() -> tuple[int, int, bytes]:
        with subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **daemon.environment()},
        ) as process:
            printed, _ = process.communicate(b"get_server_list\n", timeout=30)
            return process.pid, process.returncode, printed

    pid, status, printed = await anyio.to_thread.run_sync(run)

    assert (int(printed), status) == (pid, 0)


@pytest.mark.parametrize(
    ("pipe", "status", "complaint"),
    [
        (None, 2, "CUDA_MPS_PIPE_DIRECTORY= is not <MPS root>/<GPU uuid>/pipe"),
        ("/run/mpsflow/mps/GPU-1/log", 2, "CUDA_MPS_PIPE_DIRECTORY=/run/mpsflow/mps/GPU-1/log is not"),
        ("/nonexistent/GPU-1/pipe", 1, "no tmpfs is mounted on /nonexistent/GPU-1/shm"),
    ],
    ids=["unset", "not-a-pipe-directory", "no-daemon-started"],
)
async def test_a_refusal_takes_the_input_first_and_names_the_problem(
    pipe: str | None, status: int, complaint: str
) -> None:
    """A megabyte of input does not fit a pipe: had the program left it unread, the write would fail
    (and `SubprocessMpsControl` would see a broken pipe, not an exit status)."""
    environment = {k: v for k, v in os.environ.items() if k != "CUDA_MPS_PIPE_DIRECTORY"}
    if pipe is not None:
        environment["CUDA_MPS_PIPE_DIRECTORY"] = pipe

    result = await anyio.run_process(
        shm_directory_control(("false",)), input=b"x" * 1_000_000, env=environment, check=False
    )

    assert result.returncode == status
    assert result.stderr.decode().startswith(f"mpsflow-mps-shm: {complaint}")
