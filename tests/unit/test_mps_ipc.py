"""The IPC mode on the command line: one `--mps-ipc` for the pod watcher, the node agent and the MPS
daemon keeper, and the MPS control command each node service runs in it.

Allocate's answer in each mode is tested in test_slices.py and, over gRPC, in
tests/integration/test_device_plugin.py; the pod rule in test_translate.py; the wrapped control
command, run for real, in tests/integration/test_mps_shm.py; the manifests in
test_manifests_shm_directory.py."""

from __future__ import annotations

import subprocess

import pytest

from events.vocabulary import MPS_IPC_MODES
from node_agent.shm import PROGRAM_NAME, shm_directory_control
from services.cli import build_parser, mps_control_command

SERVICES = {
    "pod-watcher": [],
    "node-agent": ["--node", "gpu-1"],
    "mps-daemons": ["--node", "gpu-1"],
}


def _parse(service: str, *argv: str) -> str:
    mode: str = build_parser().parse_args(["run", service, *SERVICES[service], *argv]).mps_ipc
    return mode


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_that_cares_defaults_to_the_host_ipc_mode(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MPSFLOW_MPS_IPC", raising=False)

    assert _parse(service) == "host"
    assert MPS_IPC_MODES == ("host", "shm-directory")


@pytest.mark.parametrize("service", SERVICES)
def test_the_mode_comes_from_the_flag_over_the_environment(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPSFLOW_MPS_IPC", "shm-directory")

    assert _parse(service) == "shm-directory"
    assert _parse(service, "--mps-ipc", "host") == "host"


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("source", ["flag", "environment"])
def test_an_unknown_mode_exits_2_naming_the_flag(
    service: str, source: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--mps-ipc", "hostipc"] if source == "flag" else []
    if source == "environment":
        monkeypatch.setenv("MPSFLOW_MPS_IPC", "hostipc")

    with pytest.raises(SystemExit) as exited:
        _parse(service, *argv)

    assert exited.value.code == 2
    assert "argument --mps-ipc: 'hostipc' is not one of host, shm-directory" in capsys.readouterr().err


def test_the_admission_webhook_takes_no_mode_as_it_validates_nothing() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "admission-webhook", "--mps-ipc", "host"])


@pytest.mark.parametrize("service", ["node-agent", "mps-daemons"])
def test_the_node_services_run_the_mps_control_command_as_the_mode_needs(service: str) -> None:
    control = ["--mps-control", "chroot /driver-root nvidia-cuda-mps-control"]
    host = build_parser().parse_args(["run", service, "--node", "n", *control])
    shm = build_parser().parse_args(["run", service, "--node", "n", *control, "--mps-ipc", "shm-directory"])

    assert mps_control_command(host) == ("chroot", "/driver-root", "nvidia-cuda-mps-control")
    wrapped = mps_control_command(shm)
    assert wrapped == shm_directory_control(("chroot", "/driver-root", "nvidia-cuda-mps-control"))
    assert wrapped[:2] == ("sh", "-c") and wrapped[3:] == (
        PROGRAM_NAME,
        "chroot",
        "/driver-root",
        "nvidia-cuda-mps-control",
    )


@pytest.mark.parametrize("control", [(), "nvidia-cuda-mps-control"])
def test_the_wrapped_command_must_be_an_argument_list(control: tuple[str, ...] | str) -> None:
    with pytest.raises(ValueError, match="non-empty argument list"):
        shm_directory_control(control)


def test_the_program_is_plain_posix_sh() -> None:
    program = shm_directory_control(("nvidia-cuda-mps-control",))[2]

    assert subprocess.run(["sh", "-n", "-c", program], check=False, timeout=10).returncode == 0
    for needed in ("mountpoint -q", "mount -t tmpfs", "unshare --mount", "mount --bind"):
        assert needed in program
    assert "umount" not in program  # running clients hold a GPU's tmpfs: it is never taken away
