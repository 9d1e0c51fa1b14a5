"""The link between the node agent and the slice server that outlives it.

Why: the kubelet marks every device of a plugin Unhealthy the moment the plugin's stream ends, and a
pod bound to the node a moment before then fails admission. The node agent restarts (a rollout, an
eviction, a crash); the `mps-daemons` keeper, a DaemonSet updated only `OnDelete`, does not. So the
keeper serves the slices to the kubelet (`SliceDevicePlugin`) and the agent tells it, over a unix
socket, which slices to serve: a killed agent leaves the kubelet's devices, the pods' allocations
and every pod in flight to the node as they were, and the agent that comes back finds the slices
where it left them, device IDs included.

The protocol: one JSON request per connection, one JSON reply, then the connection closes.
`offer` makes a slice list the served one (the reply is the list served, which keeps slices
allocated since the agent last looked); `state` returns the served list and the allocations, with
their ages (the two processes' clocks differ). The keeper writes every offer to a state file as
well, so that a restarted keeper serves the last list at once.

`LinkServer` runs in the keeper; `RemotePlugin` is what the agent holds instead of a plugin of its
own. Neither decides anything: the agent decides the slices, the plugin serves them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import anyio
from anyio.abc import SocketStream
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from node_agent.device_plugin import Allocations, SliceDevicePlugin
from node_agent.slices import SliceDevice

log = logging.getLogger(__name__)

LINK_TIMEOUT_S = 5.0
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # 48 slices on each of dozens of GPUs fit many times over


class SliceServerUnavailable(Exception):  # noqa: N818 - names a state of the node, like NvmlUnavailable
    """The slice server (`mpsflow run mps-daemons`) does not answer on the link socket."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkedSlice(_Message):
    id: str
    gpu_index: int
    gpu_uuid: str
    size_gb: int
    gpu_memory_mib: int
    healthy: bool = True

    @classmethod
    def of(cls, device: SliceDevice) -> LinkedSlice:
        return cls(
            id=device.id,
            gpu_index=device.gpu_index,
            gpu_uuid=device.gpu_uuid,
            size_gb=device.size_gb,
            gpu_memory_mib=device.gpu_memory_mib,
            healthy=device.healthy,
        )

    def device(self) -> SliceDevice:
        return SliceDevice(
            id=self.id,
            gpu_index=self.gpu_index,
            gpu_uuid=self.gpu_uuid,
            size_gb=self.size_gb,
            gpu_memory_mib=self.gpu_memory_mib,
            healthy=self.healthy,
        )


class OfferRequest(_Message):
    op: Literal["offer"] = "offer"
    devices: tuple[LinkedSlice, ...]
    avoided_gpus: tuple[int, ...] = ()
    seen_allocations: int | None = None


class StateRequest(_Message):
    op: Literal["state"] = "state"


class ServedSlices(_Message):
    """The slice list served now, and the GPUs the kubelet is asked to give out last."""

    devices: tuple[LinkedSlice, ...]
    avoided_gpus: tuple[int, ...] = ()


class StateReply(ServedSlices):
    allocation_ages: dict[str, float] = Field(default_factory=dict)
    """Device ID -> seconds since its last allocation."""
    allocation_count: int = 0


_REQUEST: TypeAdapter[OfferRequest | StateRequest] = TypeAdapter(
    Annotated[OfferRequest | StateRequest, Field(discriminator="op")]
)


class LinkServer:
    """Serves `plugin`'s slice list to the agent on `socket_path`; keeps the last offer in `state_file`."""

    def __init__(self, plugin: SliceDevicePlugin, socket_path: Path, state_file: Path) -> None:
        self.plugin = plugin
        self.socket_path = socket_path
        self.state_file = state_file

    async def restore(self) -> None:
        """Serve the last slice list an agent offered, if a state file holds one."""
        try:
            text = await anyio.Path(self.state_file).read_text()
            last = ServedSlices.model_validate_json(text)
        except FileNotFoundError:
            return
        except (OSError, ValidationError) as error:
            log.warning(
                "state file %s unreadable (%s): serving no slices until the agent offers",
                self.state_file,
                error,
            )
            return
        await self.plugin.set_devices(
            [linked.device() for linked in last.devices], avoided_gpus=frozenset(last.avoided_gpus)
        )
        log.info("serving the %d slices last offered, from %s", len(last.devices), self.state_file)

    async def run(self) -> None:
        """Answer the agent's requests until cancelled."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)  # a leftover of an earlier keeper blocks the bind
        listener = await anyio.create_unix_listener(self.socket_path)
        async with listener:
            await listener.serve(self._answer)

    async def _answer(self, stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(LINK_TIMEOUT_S):
                    request = _REQUEST.validate_json(await _read_line(stream))
                    reply = await self._reply(request)
                    await stream.send(reply.model_dump_json().encode() + b"\n")
            except (TimeoutError, ValueError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as error:
                log.warning("link request not answered: %s", error)

    async def _reply(self, request: OfferRequest | StateRequest) -> ServedSlices:
        if isinstance(request, OfferRequest):
            served = await self.plugin.set_devices(
                [linked.device() for linked in request.devices],
                avoided_gpus=frozenset(request.avoided_gpus),
                seen_allocations=request.seen_allocations,
            )
            reply = ServedSlices(
                devices=tuple(LinkedSlice.of(d) for d in served), avoided_gpus=request.avoided_gpus
            )
            await anyio.to_thread.run_sync(_write_atomically, self.state_file, reply.model_dump_json())
            return reply
        devices, avoided = await self.plugin.served()
        allocations = await self.plugin.allocations()
        now = anyio.current_time()
        return StateReply(
            devices=tuple(LinkedSlice.of(d) for d in devices),
            avoided_gpus=tuple(sorted(avoided)),
            allocation_ages={device: max(0.0, now - at) for device, at in allocations.at.items()},
            allocation_count=allocations.count,
        )


class RemotePlugin:
    """The agent's side of the link: the plugin interface the agent uses, answered by the keeper.

    Every call raises `SliceServerUnavailable` when the keeper does not answer within
    `LINK_TIMEOUT_S`; nothing here retries, the agent decides what a missing answer means.
    """

    outlives_agent = True
    """The slices stay served when the agent stops: a stopping agent has nothing to withdraw."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def set_devices(
        self,
        devices: Sequence[SliceDevice],
        *,
        avoided_gpus: frozenset[int] = frozenset(),
        seen_allocations: int | None = None,
    ) -> tuple[SliceDevice, ...]:
        request = OfferRequest(
            devices=tuple(LinkedSlice.of(d) for d in devices),
            avoided_gpus=tuple(sorted(avoided_gpus)),
            seen_allocations=seen_allocations,
        )
        reply = ServedSlices.model_validate_json(await self._ask(request))
        return tuple(linked.device() for linked in reply.devices)

    async def allocations(self) -> Allocations:
        state = await self._state()
        now = anyio.current_time()
        return Allocations({d: now - age for d, age in state.allocation_ages.items()}, state.allocation_count)

    async def served(self) -> tuple[tuple[SliceDevice, ...], frozenset[int]]:
        state = await self._state()
        return tuple(linked.device() for linked in state.devices), frozenset(state.avoided_gpus)

    async def run(self) -> None:
        """Nothing to serve here: the keeper serves the kubelet."""
        await anyio.sleep_forever()

    async def close(self) -> None:
        """Nothing to close: the keeper keeps serving the slices after the agent is gone."""

    async def _state(self) -> StateReply:
        return StateReply.model_validate_json(await self._ask(StateRequest()))

    async def _ask(self, request: OfferRequest | StateRequest) -> bytes:
        try:
            with anyio.fail_after(LINK_TIMEOUT_S):
                async with await anyio.connect_unix(self.socket_path) as stream:
                    await stream.send(request.model_dump_json().encode() + b"\n")
                    return await _read_line(stream)
        except (TimeoutError, OSError, anyio.EndOfStream, anyio.BrokenResourceError) as error:
            raise SliceServerUnavailable(
                f"the slice server (mpsflow run mps-daemons) does not answer on {self.socket_path}: "
                f"{error or type(error).__name__}"
            ) from error


async def _read_line(stream: SocketStream) -> bytes:
    received = bytearray()
    while not received.endswith(b"\n"):
        received += await stream.receive()
        if len(received) > MAX_MESSAGE_BYTES:
            raise ValueError(f"link message over {MAX_MESSAGE_BYTES} bytes")
    return bytes(received)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
