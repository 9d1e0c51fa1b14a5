"""The `shm-directory` IPC mode at the MPS control command: each GPU's own tmpfs as its `/dev/shm`.

Where it sits: between whoever drives the MPS daemons (the daemon keeper, `mpsflow run mps-daemons`,
and the node agent) and NVIDIA's `nvidia-cuda-mps-control`. `node_agent.mps.SubprocessMpsControl`
runs the control command it is given for every daemon start (`<command> -d`) and every control
command, with `CUDA_MPS_PIPE_DIRECTORY` set to the GPU's pipe directory, `<root>/<GPU uuid>/pipe`
(`node_agent.slices.mps_pipe_directory`). With `--mps-ipc shm-directory` it is given
:func:`shm_directory_control` of that command instead: a short POSIX shell program that

1. finds the GPU's shm directory beside its pipe directory, `<root>/<GPU uuid>/shm`
   (`node_agent.slices.mps_shm_directory`: the directory Allocate mounts as a slice container's
   `/dev/shm`);
2. on a daemon start (`-d`), mounts a tmpfs there unless one is mounted already. The mount must
   reach the host, where the kubelet binds it into slice containers, so the container that starts
   daemons mounts the MPS root with `mountPropagation: Bidirectional`. For any other command it
   refuses (exit status 1, the reason on stderr) while no mount is there as this process sees it, so
   a daemon started in the other mode, or an MPS root mounted without propagation, shows as a daemon
   that does not answer, onto whose GPU nothing is released, instead of slice pods whose CUDA
   clients cannot reach their server;
3. runs the command in a mount namespace of its own (`unshare --mount`) where that directory is
   bound over `/dev/shm`. A daemon keeps the namespace, and so do the servers it starts: the GPU's
   daemon, servers, control commands and slice containers share one `/dev/shm`, and nothing of
   another GPU's.

Nothing here performs I/O: it only builds the command. The program needs CAP_SYS_ADMIN (the pods that
run it are privileged) and util-linux's `mount`, `mountpoint` and `unshare`. It must never unmount a
shm directory nor mount over one that is mounted: running clients hold it, and a second tmpfs would
split them from the clients that come next.
"""

from __future__ import annotations

from collections.abc import Sequence

SHM_TMPFS_SOURCE = "mpsflow-shm"
"""The source name of the tmpfs mounts, as `/proc/mounts` and `findmnt` show them."""
SHM_TMPFS_OPTIONS = "rw,nosuid,nodev,noexec,mode=1777"
"""The flags NVIDIA's device plugin mounts its MPS shm with. No `size`: the kernel's default for a
tmpfs, half of the node's memory, which is also the size NVIDIA's plugin sets; it is a cap, and
pages are charged to the memory cgroup of the process that writes them. `mode=1777`, as any
`/dev/shm` has, for clients of any user."""

_PROGRAM = f"""set -u
# Read the input (one command; nothing for a daemon start) before anything can fail, and hand it on
# below: a refusal must leave its caller an exit status to read, not a pipe closed on its writes.
input=$(cat)
fail() {{ echo "$0: $2" >&2; exit "$1"; }}
pipe="${{CUDA_MPS_PIPE_DIRECTORY-}}"
case "$pipe" in
  /*/pipe) shm="${{pipe%/pipe}}/shm" ;;
  *) fail 2 "CUDA_MPS_PIPE_DIRECTORY=$pipe is not <MPS root>/<GPU uuid>/pipe" ;;
esac
last=
for argument do last="$argument"; done
if ! mountpoint -q "$shm"; then
  [ "$last" = -d ] || fail 1 "no tmpfs is mounted on $shm as this container sees it: the GPU's MPS \
daemon was not started in the shm-directory IPC mode, or the MPS root is mounted here without \
mountPropagation (HostToContainer; Bidirectional where daemons are started)"
  mkdir -p "$shm" && mount -t tmpfs -o {SHM_TMPFS_OPTIONS} {SHM_TMPFS_SOURCE} "$shm" ||
    fail 1 "could not mount a tmpfs on $shm"
fi
# exec all the way: the command is the very process the caller started, and a timeout kills it.
bind='mount --bind "$0" /dev/shm && exec "$@"'
if [ "$last" = -d ]; then
  exec unshare --mount --propagation private -- sh -c "$bind" "$shm" "$@"
fi
exec unshare --mount --propagation private -- sh -c "$bind" "$shm" "$@" <<INPUT
$input
INPUT
"""
PROGRAM_NAME = "mpsflow-mps-shm"
"""`$0` of the program: the name its messages start with."""


def shm_directory_control(control: Sequence[str]) -> tuple[str, ...]:
    """`control`, the MPS control command as `--mps-control` splits it, run so that every daemon
    start and every control command sees its GPU's shm directory as `/dev/shm` (see above).

    The arguments `SubprocessMpsControl` adds (`-d`) come after `control`, as they would without it.
    """
    if isinstance(control, str) or not control:
        raise ValueError("the MPS control command must be a non-empty argument list")
    return ("sh", "-c", _PROGRAM, PROGRAM_NAME, *control)
