"""The pure parts of the MPS control port: reply parsers, value formats, daemon layout, input checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_agent.mps import (
    DaemonSpec,
    MpsCommandError,
    SubprocessMpsControl,
    apply_gpu_defaults,
    format_mem_limit,
    parse_mem_limit,
    parse_server_list,
    parse_thread_percentage,
)

GPU_UUID = "GPU-5d2f3b8e-1c4a-4f5e-9b7a-0e6d8c2a1f00"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("mib", "expected"),
    [
        pytest.param(10240, "10240M", id="ten-gib"),
        pytest.param(1, "1M", id="smallest"),
        pytest.param(81559, "81559M", id="not-a-whole-gib"),
    ],
)
def test_format_mem_limit(mib: int, expected: str) -> None:
    assert format_mem_limit(mib) == expected


@pytest.mark.parametrize("mib", [0, -1])
def test_format_mem_limit_rejects_non_positive(mib: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        format_mem_limit(mib)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param("10240M", 10240, id="mib"),
        pytest.param("10G", 10240, id="gib"),
        pytest.param("10240M\n", 10240, id="trailing-newline"),
        pytest.param("N/A", None, id="unset"),
    ],
)
def test_parse_mem_limit(reply: str, expected: int | None) -> None:
    assert parse_mem_limit(reply) == expected


@pytest.mark.parametrize("reply", ["", "10240", "10T", "10.5G", "-1M", "unlimited"])
def test_parse_mem_limit_rejects_unknown_formats(reply: str) -> None:
    with pytest.raises(ValueError, match="pinned memory limit"):
        parse_mem_limit(reply)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param("100.0", 100.0, id="default"),
        pytest.param("33.3\n", 33.3, id="fraction"),
        pytest.param("50", 50.0, id="integer"),
    ],
)
def test_parse_thread_percentage(reply: str, expected: float) -> None:
    assert parse_thread_percentage(reply) == expected


@pytest.mark.parametrize("reply", ["", "N/A", "0.0", "100.1", "nan", "Error: unknown command"])
def test_parse_thread_percentage_rejects_nonsense(reply: str) -> None:
    with pytest.raises(ValueError, match="active thread percentage"):
        parse_thread_percentage(reply)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param("", [], id="no-servers"),
        pytest.param("4242", [4242], id="one"),
        pytest.param("4242\n4243\n", [4242, 4243], id="one-per-line"),
    ],
)
def test_parse_server_list(reply: str, expected: list[int]) -> None:
    assert parse_server_list(reply) == expected


@pytest.mark.parametrize("reply", ["4242 abc", "-1", "Cannot find MPS control daemon process"])
def test_parse_server_list_rejects_non_pids(reply: str) -> None:
    with pytest.raises(ValueError, match="unrecognised PID"):
        parse_server_list(reply)


def test_daemon_layout_is_per_gpu_uuid() -> None:
    daemon = DaemonSpec.under(Path("/run/mpsflow"), 1, GPU_UUID)

    assert daemon.pipe_dir == Path(f"/run/mpsflow/{GPU_UUID}/pipe")
    assert daemon.log_dir == Path(f"/run/mpsflow/{GPU_UUID}/log")
    assert daemon.control_socket == Path(f"/run/mpsflow/{GPU_UUID}/pipe/control")
    assert daemon.environment() == {
        "CUDA_MPS_PIPE_DIRECTORY": f"/run/mpsflow/{GPU_UUID}/pipe",
        "CUDA_MPS_LOG_DIRECTORY": f"/run/mpsflow/{GPU_UUID}/log",
        "CUDA_VISIBLE_DEVICES": GPU_UUID,
    }


@pytest.mark.parametrize("uuid", ["", ".", "..", "GPU-a/b"])
def test_daemon_layout_rejects_uuids_that_are_not_one_directory(uuid: str) -> None:
    with pytest.raises(ValueError, match="cannot name a directory"):
        DaemonSpec.under(Path("/run/mpsflow"), 0, uuid)


def test_daemon_spec_rejects_a_socket_path_too_long_for_unix_sockets() -> None:
    with pytest.raises(ValueError, match="too long"):
        DaemonSpec.under(Path("/run") / ("x" * 80), 0, GPU_UUID)


@pytest.mark.parametrize("executable", [(), "nvidia-cuda-mps-control"])
def test_subprocess_control_needs_an_argument_list(executable: tuple[str, ...] | str) -> None:
    with pytest.raises(ValueError, match="argument list"):
        SubprocessMpsControl(executable)


class RecordingControl:
    """An MpsControl that only records: here the question is what gets sent, not what MPS does."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def start_daemon(self, daemon: DaemonSpec) -> None:
        raise AssertionError("apply_gpu_defaults must not start daemons")

    async def send(self, daemon: DaemonSpec, command: str) -> str:
        self.sent.append(command)
        return ""

    async def is_alive(self, daemon: DaemonSpec) -> bool:
        raise AssertionError("apply_gpu_defaults must not probe")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("pinned_mem_limit_mib", "active_thread_percentage", "expected"),
    [
        pytest.param(
            10240,
            50,
            ["set_default_device_pinned_mem_limit 0 10240M", "set_default_active_thread_percentage 50"],
            id="both",
        ),
        pytest.param(None, 25, ["set_default_active_thread_percentage 25"], id="threads-only"),
        pytest.param(4096, None, ["set_default_device_pinned_mem_limit 0 4096M"], id="memory-only"),
        pytest.param(None, None, [], id="nothing"),
    ],
)
async def test_apply_gpu_defaults_addresses_device_zero(
    pinned_mem_limit_mib: int | None, active_thread_percentage: int | None, expected: list[str]
) -> None:
    control = RecordingControl()

    await apply_gpu_defaults(
        control,
        DaemonSpec.under(Path("/run/mpsflow"), 3, GPU_UUID),
        pinned_mem_limit_mib=pinned_mem_limit_mib,
        active_thread_percentage=active_thread_percentage,
    )

    assert control.sent == expected


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("pinned_mem_limit_mib", "active_thread_percentage"),
    [
        pytest.param(0, 50, id="no-memory"),
        pytest.param(1024, 0, id="no-threads"),
        pytest.param(1024, 101, id="over"),
    ],
)
async def test_apply_gpu_defaults_sends_nothing_when_a_value_is_invalid(
    pinned_mem_limit_mib: int, active_thread_percentage: int
) -> None:
    control = RecordingControl()

    with pytest.raises(ValueError):
        await apply_gpu_defaults(
            control,
            DaemonSpec.under(Path("/run/mpsflow"), 0, GPU_UUID),
            pinned_mem_limit_mib=pinned_mem_limit_mib,
            active_thread_percentage=active_thread_percentage,
        )

    assert control.sent == []


def test_command_error_says_what_failed() -> None:
    failed = MpsCommandError("get_server_list", 1, "Cannot find MPS control daemon process")
    timed_out = MpsCommandError("get_server_list", None, "")

    assert str(failed) == (
        "MPS control command 'get_server_list' exited with status 1: Cannot find MPS control daemon process"
    )
    assert str(timed_out) == "MPS control command 'get_server_list' timed out: (no output)"
