"""The link between the node agent and the keeper that serves its slices (`node_agent.link`), over a
real unix socket, with the keeper's real device plugin in front of the simulated kubelet."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from node_agent.link import LinkServer, RemotePlugin, SliceServerUnavailable
from tests.integration.test_device_plugin import GB10, Node, _pod, _slice, node
from tests.support import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def linked(n: Node) -> AsyncIterator[tuple[LinkServer, RemotePlugin]]:
    socket_path = n.plugin_dir.parent / "link.sock"
    server = LinkServer(n.plugin, socket_path, n.plugin_dir.parent / "served-slices.json")
    async with anyio.create_task_group() as group:
        group.start_soon(server.run)
        await eventually(socket_path.exists, "the link socket")
        yield server, RemotePlugin(socket_path)
        group.cancel_scope.cancel()


async def test_the_agent_offers_slices_the_keeper_serves_them_and_tells_what_was_allocated() -> None:
    async with node() as n, linked(n) as (_, remote):
        devices = [_slice(0, 10, 0), _slice(1, 10, 0)]
        assert await remote.set_devices(devices, avoided_gpus=frozenset({1})) == tuple(devices)
        await n.capacity.wait_until(lambda: n.capacity.latest == {GB10: 2}, "both slices listed")
        assert await remote.served() == (tuple(devices), frozenset({1}))
        allocated = await n.manager.allocate(_pod("a"), [("main", GB10)])
        assert allocated["main"].device_ids == ["mps-g0-10gb-0"]  # GPU 1 is avoided
        handed_out = await remote.allocations()
        assert set(handed_out.at) == {"mps-g0-10gb-0"} and handed_out.count == 1
        assert 0 <= anyio.current_time() - handed_out.at["mps-g0-10gb-0"] < 5  # in the agent's clock


async def test_a_slice_allocated_after_the_agent_looked_is_not_dropped() -> None:
    """The agent decided its new list from allocation count 0; the kubelet gave a slice out since, so
    the keeper keeps that slice and says so in its answer."""
    async with node() as n, linked(n) as (_, remote):
        await remote.set_devices([_slice(0, 10, 0)])
        await n.capacity.wait_until(lambda: n.capacity.latest == {GB10: 1}, "the slice listed")
        seen = (await remote.allocations()).count
        await n.manager.allocate(_pod("a"), [("main", GB10)])
        served = await remote.set_devices([_slice(0, 20, 0)], seen_allocations=seen)
        assert [d.id for d in served] == ["mps-g0-20gb-0", "mps-g0-10gb-0"]
        # Once the agent has seen the allocation, its next list decides.
        seen = (await remote.allocations()).count
        assert [d.id for d in await remote.set_devices([_slice(0, 20, 0)], seen_allocations=seen)] == [
            "mps-g0-20gb-0"
        ]


async def test_a_restarted_keeper_serves_the_last_offer_at_once() -> None:
    async with node() as n:
        async with linked(n) as (_, remote):
            await remote.set_devices([_slice(0, 10, 0), _slice(0, 10, 1)])
        await n.plugin.set_devices([])  # the keeper's process is gone: a new one starts empty
        again = LinkServer(
            n.plugin, n.plugin_dir.parent / "link.sock", n.plugin_dir.parent / "served-slices.json"
        )
        await again.restore()
        served, _ = await n.plugin.served()
        assert [d.id for d in served] == ["mps-g0-10gb-0", "mps-g0-10gb-1"]


async def test_an_unreadable_state_file_restores_nothing_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with node() as n:
        state = n.plugin_dir.parent / "served-slices.json"
        state.write_text("{not json")
        await LinkServer(n.plugin, n.plugin_dir.parent / "link.sock", state).restore()
        assert await n.plugin.served() == ((), frozenset())
        assert "unreadable" in caplog.text


async def test_without_a_keeper_every_call_says_the_slice_server_does_not_answer(tmp_path: Path) -> None:
    remote = RemotePlugin(tmp_path / "nobody.sock")
    with pytest.raises(SliceServerUnavailable, match="does not answer"):
        await remote.served()
    with pytest.raises(SliceServerUnavailable):
        await remote.set_devices([_slice(0, 10, 0)])


async def listening(socket_path: Path) -> bool:
    try:
        stream = await anyio.connect_unix(socket_path)
    except OSError:
        return False
    await stream.aclose()
    return True


class CountingLinkServer(LinkServer):
    """A keeper that counts the connections it answers."""

    connections = 0

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await super()._answer(reader, writer)


async def test_the_agent_asks_over_one_kept_connection() -> None:
    """The agent asks five times a second; a connection a request cost both processes CPU."""
    async with node() as n:
        socket_path = n.plugin_dir.parent / "link.sock"
        server = CountingLinkServer(n.plugin, socket_path, n.plugin_dir.parent / "served-slices.json")
        async with anyio.create_task_group() as group:
            group.start_soon(server.run)
            await eventually(socket_path.exists, "the link socket")
            remote = RemotePlugin(socket_path)
            await remote.set_devices([_slice(0, 10, 0)])
            for _ in range(10):
                assert [d.id for d in (await remote.served())[0]] == ["mps-g0-10gb-0"]
                await remote.allocations()
            assert server.connections == 1
            group.cancel_scope.cancel()
        await remote.close()


async def test_a_keeper_restarted_between_two_requests_answers_the_second() -> None:
    """The kept connection ends with the keeper; the next request finds that out and goes again on
    a new connection, so the agent sees no outage that is not there."""
    async with node() as n:
        socket_path = n.plugin_dir.parent / "link.sock"
        state_file = n.plugin_dir.parent / "served-slices.json"
        remote = RemotePlugin(socket_path)
        async with anyio.create_task_group() as group:
            group.start_soon(LinkServer(n.plugin, socket_path, state_file).run)
            await eventually(socket_path.exists, "the link socket")
            await remote.set_devices([_slice(0, 10, 0)])
            group.cancel_scope.cancel()  # the keeper's process ends, its connections with it
        async with anyio.create_task_group() as group:
            group.start_soon(LinkServer(n.plugin, socket_path, state_file).run)
            await eventually(
                lambda: listening(socket_path), "the new keeper listening"
            )  # the dead one's file stays
            assert [d.id for d in (await remote.served())[0]] == ["mps-g0-10gb-0"]
            assert [d.id for d in await remote.set_devices([_slice(0, 20, 0)])] == ["mps-g0-20gb-0"]
            group.cancel_scope.cancel()
        await remote.close()


async def test_a_request_cut_short_leaves_no_reply_behind_for_the_next() -> None:
    """A request cancelled while its reply is on the way drops the connection, so the next request
    reads its own reply and not the late one."""
    async with node() as n, linked(n) as (_, remote):
        await remote.set_devices([_slice(0, 10, 0)])
        with anyio.CancelScope() as scope:
            scope.cancel()
            await remote.set_devices([_slice(0, 20, 0)])
        served = await remote.set_devices([_slice(1, 10, 0)])
        assert [d.id for d in served] == ["mps-g1-10gb-0"]
        assert [d.id for d in (await remote.served())[0]] == ["mps-g1-10gb-0"]
    await remote.close()
