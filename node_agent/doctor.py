"""`mpsflow doctor`: checks, on a node, everything the node agent needs, and says what it found.

Run on a GPU node (or any machine with an NVIDIA driver) before the agent, or when it misbehaves. In
order: NVML and the driver, each GPU (model, memory, compute capability, MIG, compute mode's users),
the MPS control command, a control daemon started in a private pipe directory with a pinned memory
limit set and read back, and a CUDA client, through the driver API (ctypes on libcuda, no framework),
whose allocation just under its slice succeeds and just over it fails. Each check says ok, fail or
skip and why; the exit status is 0 only when every check is ok. On a machine without a GPU it says so
and exits 1.

It never touches a GPU's compute mode, another pipe directory or a running daemon: the daemon it
starts lives in a temporary directory and is stopped before it returns.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from events.vocabulary import MIB_PER_GIB
from node_agent.gpus import GpuReading
from node_agent.mps import DaemonSpec, SubprocessMpsControl, apply_gpu_defaults, parse_mem_limit
from node_agent.nvml import NvmlInventory, NvmlLibrary, NvmlUnavailable

Status = Literal["ok", "fail", "skip"]

CUDA_CLIENT = r"""
import ctypes, sys

cuda = ctypes.CDLL(sys.argv[1])


def name_of(result):
    text = ctypes.c_char_p()
    cuda.cuGetErrorName(result, ctypes.byref(text))
    return text.value.decode() if text.value else str(result)


def check(result, what):
    if result != 0:
        print(f"{what} failed: {name_of(result)}")
        sys.exit(2)


check(cuda.cuInit(0), "cuInit")
device = ctypes.c_int()
check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
context = ctypes.c_void_p()
check(cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device), "cuCtxCreate")
pointer = ctypes.c_uint64()
result = cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(int(sys.argv[2]) * 1024 * 1024))
if result == 0:
    print("allocated")
    sys.exit(0)
print(name_of(result))
sys.exit(3)
"""
"""A CUDA client in a process of its own: creates a context on device 0 and allocates argv[2] MiB.
Exit 0 when the allocation succeeded, 3 when CUDA refused it (its error name printed), 2 otherwise."""


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class DoctorSettings:
    mps_control: tuple[str, ...] = ("nvidia-cuda-mps-control",)
    slice_gb: int = 2
    """The pinned limit the test daemon sets and the CUDA client is held to."""
    libcuda: str | None = None
    """The CUDA driver library; None: found by `ctypes.util.find_library("cuda")`."""


def report(checks: Sequence[Check]) -> str:
    width = max(len(check.name) for check in checks)
    lines = [f"{check.status:>4}  {check.name:<{width}}  {check.detail}" for check in checks]
    failed = [check.name for check in checks if check.status != "ok"]
    verdict = "every check passed" if not failed else f"not ready: {', '.join(failed)}"
    return "\n".join([*lines, "", verdict])


def gpu_line(gpu: GpuReading) -> str:
    return (
        f"GPU {gpu.index} {gpu.model} {gpu.uuid}: {gpu.memory_total_mib} MiB "
        f"({gpu.memory_used_mib} used), compute capability {gpu.compute_capability[0]}."
        f"{gpu.compute_capability[1]}, MIG {'on' if gpu.mig_enabled else 'off'}, "
        f"{len(gpu.processes)} process(es), up to {gpu.max_mps_clients} MPS clients"
    )


async def examine(settings: DoctorSettings, nvml: NvmlLibrary | None = None) -> list[Check]:
    """Every check, in order; a check that cannot run because an earlier one failed is skipped."""
    checks: list[Check] = []
    try:
        gpus = await NvmlInventory(nvml).read()
    except NvmlUnavailable as error:
        checks.append(Check("nvml", "fail", f"no NVIDIA driver here: {error}"))
        return [*checks, *_skipped("no NVML", "gpus", "mps control", "mps daemon", "cuda client")]
    checks.append(Check("nvml", "ok", _driver_version(nvml)))
    if not gpus:
        checks.append(Check("gpus", "fail", "NVML sees no GPU"))
        return [*checks, *_skipped("no GPU", "mps control", "mps daemon", "cuda client")]
    checks.append(Check("gpus", "ok", "; ".join(gpu_line(gpu) for gpu in gpus)))
    usable = [gpu for gpu in gpus if not gpu.mig_enabled]
    control = settings.mps_control
    found = shutil.which(control[0])
    if found is None:
        checks.append(Check("mps control", "fail", f"{control[0]} is not on the PATH"))
        return [*checks, *_skipped("no MPS control command", "mps daemon", "cuda client")]
    checks.append(Check("mps control", "ok", " ".join([found, *control[1:]])))
    if not usable:
        return [*checks, *_skipped("every GPU is in MIG mode", "mps daemon", "cuda client")]
    with tempfile.TemporaryDirectory(prefix="mpsdoc-", dir="/tmp") as root:
        daemon = DaemonSpec.under(Path(root), usable[0].index, usable[0].uuid)
        mps = SubprocessMpsControl(control)
        checks.append(await _daemon_check(mps, daemon, settings.slice_gb))
        if checks[-1].status == "ok":
            checks.append(_cuda_check(daemon, usable[0], settings))
        else:
            checks.extend(_skipped("no MPS daemon", "cuda client"))
        if await mps.is_alive(daemon):
            await mps.send(daemon, "quit")
    return checks


def _skipped(why: str, *names: str) -> list[Check]:
    return [Check(name, "skip", why) for name in names]


def _driver_version(nvml: NvmlLibrary | None) -> str:
    if nvml is None:
        import pynvml

        return f"driver {pynvml.nvmlSystemGetDriverVersion()}"
    version = getattr(nvml, "nvmlSystemGetDriverVersion", None)
    return f"driver {version()}" if version is not None else "driver version not reported"


async def _daemon_check(mps: SubprocessMpsControl, daemon: DaemonSpec, slice_gb: int) -> Check:
    limit_mib = slice_gb * MIB_PER_GIB
    try:
        await mps.start_daemon(daemon)
        await apply_gpu_defaults(mps, daemon, pinned_mem_limit_mib=limit_mib, active_thread_percentage=None)
        reply = await mps.send(daemon, "get_default_device_pinned_mem_limit 0")
    except Exception as error:
        return Check("mps daemon", "fail", f"GPU {daemon.gpu_index}: {error}")
    read_back = parse_mem_limit(reply)
    if read_back != limit_mib:
        return Check("mps daemon", "fail", f"set a {limit_mib} MiB limit, read back {reply!r}")
    return Check(
        "mps daemon",
        "ok",
        f"GPU {daemon.gpu_index}: started in {daemon.pipe_dir}, "
        f"pinned limit {limit_mib} MiB read back as {reply!r}",
    )


def _cuda_check(daemon: DaemonSpec, gpu: GpuReading, settings: DoctorSettings) -> Check:
    libcuda = settings.libcuda or ctypes.util.find_library("cuda")
    if libcuda is None:
        return Check("cuda client", "fail", "libcuda (the CUDA driver library) is not found")
    limit_mib = settings.slice_gb * MIB_PER_GIB
    environment = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": gpu.uuid,
        "CUDA_MPS_PIPE_DIRECTORY": str(daemon.pipe_dir),
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={limit_mib}M",
    }
    outcomes = {}
    for mib in (limit_mib * 3 // 4, limit_mib * 3 // 2):
        result = subprocess.run(
            [sys.executable, "-c", CUDA_CLIENT, libcuda, str(mib)],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        outcomes[mib] = (result.returncode, (result.stdout or result.stderr).strip().splitlines()[-1:])
    under, over = outcomes.values()
    detail = "; ".join(f"{mib} MiB -> {' '.join(said) or code}" for mib, (code, said) in outcomes.items())
    ok = under[0] == 0 and over[0] == 3
    return Check("cuda client", "ok" if ok else "fail", f"limit {limit_mib} MiB: {detail}")
