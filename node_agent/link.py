"""The link between the node agent and the slice server that outlives it.

Why: the kubelet marks every device of a plugin Unhealthy the moment the plugin's stream ends, and a
pod bound to the node a moment before then fails admission. The node agent restarts (a rollout, an
eviction, a crash); the `mps-daemons` keeper, a DaemonSet updated only `OnDelete`, does not. So the
keeper serves the slices to the kubelet (`SliceDevicePlugin`) and the agent tells it, over a unix
socket, which slices to serve: a killed agent leaves the kubelet's devices, the pods' allocations
and every pod in flight to the node as they were, and the agent that comes back finds the slices
where it left them, device IDs included.

The protocol: requests and replies alternate on a connection, one JSON line each; the agent keeps
its connection (it asks several times a second) and opens another when the keeper closed it, as a
restarted keeper, or one that answered one request a connection, does. `offer` makes a slice list
the served one (the reply is the list served, which keeps slices allocated since the agent last
looked); `state` returns the served list and the allocations, with their ages (the two processes'
clocks differ). The keeper writes every offer to a state file as well, so that a restarted keeper
serves the last list at once.

`LinkServer` runs in the keeper; `RemotePlugin` is what the agent holds instead of a plugin of its
own. Neither decides anything: the agent decides the slices, the plugin serves them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import anyio
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
        self._connections: set[asyncio.StreamWriter] = set()

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
        server = await asyncio.start_unix_server(self._answer, self.socket_path, limit=MAX_MESSAGE_BYTES)
        try:
            await anyio.sleep_forever()
        finally:
            # Not `serve_forever`: from Python 3.12 it waits, once cancelled, for every connection to
            # close, and the agent's kept connection would hold the keeper's stop up.
            server.close()
            for connection in list(self._connections):
                connection.close()  # its reader ends, and with it the task answering it

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the requests of one connection until the agent closes it. An unreadable request
        or a reply not sent in time ends the connection: the agent opens another."""
        self._connections.add(writer)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the agent closed the connection (a partial line: it stopped mid-request)
                try:
                    async with asyncio.timeout(LINK_TIMEOUT_S):
                        reply = await self._reply(_REQUEST.validate_json(line))
                        writer.write(reply.model_dump_json().encode() + b"\n")
                        await writer.drain()
                except (TimeoutError, ValueError, OSError) as error:
                    log.warning("link request not answered: %s", error)
                    return
        except asyncio.LimitOverrunError as error:
            log.warning("link request not answered: over %d bytes (%s)", MAX_MESSAGE_BYTES, error)
        finally:
            self._connections.discard(writer)
            writer.close()

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
        self._connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._asking = anyio.Lock()  # one request at a time on the connection

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
        """Close the connection; the keeper keeps serving the slices after the agent is gone."""
        if self._connection is not None:
            _, writer = self._connection
            self._connection = None
            writer.close()

    async def _state(self) -> StateReply:
        return StateReply.model_validate_json(await self._ask(StateRequest()))

    async def _ask(self, request: OfferRequest | StateRequest) -> bytes:
        """The keeper's reply to `request`. A kept connection the keeper has closed since (it
        restarted) is found out by this request, which goes once more on a new connection: both
        requests are idempotent."""
        line = request.model_dump_json().encode() + b"\n"
        try:
            with anyio.fail_after(LINK_TIMEOUT_S):
                async with self._asking:
                    kept = self._connection is not None
                    try:
                        return await self._exchange(line)
                    except _CONNECTION_ENDED:
                        if not kept:
                            raise
                        return await self._exchange(line)
        except (TimeoutError, *_CONNECTION_ENDED) as error:
            raise SliceServerUnavailable(
                f"the slice server (mpsflow run mps-daemons) does not answer on {self.socket_path}: "
                f"{error or type(error).__name__}"
            ) from error

    async def _exchange(self, line: bytes) -> bytes:
        """Send one request on the connection (opened if there is none) and read its reply; on any
        failure or cancellation the connection is dropped, so no late reply is taken for the next."""
        if self._connection is None:
            self._connection = await asyncio.open_unix_connection(self.socket_path, limit=MAX_MESSAGE_BYTES)
        reader, writer = self._connection
        try:
            writer.write(line)
            await writer.drain()
            return await reader.readuntil(b"\n")
        except BaseException:
            self._connection = None
            writer.close()
            raise


_CONNECTION_ENDED = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)
"""How a connection fails: it is refused or broken, ends mid-reply, or carries a reply too long."""


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
