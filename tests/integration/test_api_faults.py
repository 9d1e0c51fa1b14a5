"""The API emulator's injected faults (`simulation.apiserver.Faults`), seen over HTTP.

Each fault is pinned as a real API server shows it: 429 in plain text with `Retry-After` (API
Priority and Fairness), 500 with an InternalError `Status`, both before anything is written and on
watches too; 410 Expired as one ERROR event on a watch that missed changes; latency before a request is
handled; open watches ended on a period, cleanly or by a connection reset. Also: faults reach only
the identities and resources they target, are recorded in the request log and counted, and the same
seed gives the same faults. One test pins the client quirk that `services/kit/watching.py` works
around: kubernetes-asyncio's `Watch` reads a refused watch's plain-text body as an event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import pytest
from kubernetes_asyncio import client, watch

from simulation.apiserver import ApiServer, Faults

pytestmark = pytest.mark.anyio

NAMESPACE = "default"
VICTIM = "victim"
BYSTANDER = "bystander"
POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def as_(identity: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {identity}"}


async def get(http: aiohttp.ClientSession, url: str, identity: str = VICTIM) -> tuple[int, Any, Any]:
    """(status, headers, body: JSON when it is, else text) of one GET."""
    async with http.get(url, headers=as_(identity)) as response:
        text = await response.text()
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            body = text
        return response.status, response.headers, body


async def watch_lines(http: aiohttp.ClientSession, url: str, identity: str = VICTIM) -> list[Any]:
    """Every line a short watch streams, decoded, until the stream ends."""
    async with http.get(url, headers=as_(identity)) as response:
        assert response.status == 200
        return [json.loads(line) async for line in response.content if line.strip()]


async def test_a_throttled_request_gets_429_in_plain_text_with_retry_after_and_changes_nothing(
    http: aiohttp.ClientSession,
) -> None:
    async with ApiServer(faults=Faults(throttle_rate=1.0, retry_after_s=3, identities=(VICTIM,))) as api:
        pods = f"{api.url}/api/v1/namespaces/{NAMESPACE}/pods"
        async with http.post(pods, json=POD, headers=as_(VICTIM)) as created:
            status, headers, body = created.status, created.headers, await created.text()
        listed = await get(http, pods)
        watched = await get(http, f"{pods}?watch=true&timeoutSeconds=1")
        bystander = await get(http, pods, BYSTANDER)

        assert (status, headers["Retry-After"], body) == (
            429,
            "3",
            "Too many requests, please try again later.\n",
        )
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        assert [status for status, _, _ in (listed, watched)] == [429, 429]
        assert bystander[0] == 200 and bystander[2]["items"] == []  # the throttled create wrote nothing
        assert [(r.verb, r.identity, r.faults) for r in api.request_log] == [
            ("create", VICTIM, ("throttled",)),
            ("list", VICTIM, ("throttled",)),
            ("watch", VICTIM, ("throttled",)),
            ("list", BYSTANDER, ()),
        ]
        assert api.faults_injected == {"throttled": 3}


async def test_an_erroring_request_gets_500_with_an_internal_error_status_and_changes_nothing(
    http: aiohttp.ClientSession,
) -> None:
    async with ApiServer(faults=Faults(error_rate=1.0, identities=(VICTIM,), resources=("pods",))) as api:
        pods = f"{api.url}/api/v1/namespaces/{NAMESPACE}/pods"
        async with http.post(pods, json=POD, headers=as_(VICTIM)) as created:
            status, body = created.status, await created.json()
        nodes = await get(http, f"{api.url}/api/v1/nodes")  # not a targeted resource
        watched = await get(http, f"{pods}?watch=true&timeoutSeconds=1")

        assert status == 500
        assert (body["kind"], body["reason"], body["code"]) == ("Status", "InternalError", 500)
        assert body["message"].startswith(
            "Internal error occurred: injected fault (error_rate) on create pods"
        )
        assert nodes[0] == 200 and watched[0] == 500
        assert api.objects("pods") == []
        assert api.faults_injected == {"error": 2}


async def test_a_watch_that_missed_changes_can_get_410_as_one_error_event(
    http: aiohttp.ClientSession,
) -> None:
    async with ApiServer(faults=Faults(gone_rate=1.0)) as api:
        pods = f"{api.url}/api/v1/namespaces/{NAMESPACE}/pods"
        async with http.post(pods, json=POD) as created:
            assert created.status == 201
        fresh = await watch_lines(http, f"{pods}?watch=true&timeoutSeconds=0.2")
        current = await watch_lines(http, f"{pods}?watch=true&timeoutSeconds=0.2&resourceVersion=1")
        async with http.delete(f"{pods}/p") as deleted:
            assert deleted.status == 200
        behind = await watch_lines(http, f"{pods}?watch=true&timeoutSeconds=0.2&resourceVersion=1")

        assert [event["type"] for event in fresh] == ["ADDED"]
        assert current == []  # nothing was missed: no reason for a 410
        [gone] = behind
        assert gone["type"] == "ERROR"
        assert {key: gone["object"][key] for key in ("kind", "reason", "code", "message")} == {
            "kind": "Status",
            "reason": "Expired",
            "code": 410,
            "message": "too old resource version: 1 (2)",
        }
        assert [r.faults for r in api.request_log] == [(), (), (), (), ("gone",)]


async def test_a_slow_request_is_answered_late(http: aiohttp.ClientSession) -> None:
    async with ApiServer(faults=Faults(slow_rate=1.0, slow_s=0.3, resources=("nodes",))) as api:
        started = anyio.current_time()
        slow = await get(http, f"{api.url}/api/v1/nodes")
        slow_s = anyio.current_time() - started
        started = anyio.current_time()
        fast = await get(http, f"{api.url}/api/v1/namespaces/{NAMESPACE}/pods")
        fast_s = anyio.current_time() - started

    assert slow[0] == fast[0] == 200
    assert slow_s >= 0.3 > fast_s
    assert api.faults_injected == {"slow": 1}


async def test_open_watches_are_ended_on_a_period_cleanly_or_by_a_reset(
    http: aiohttp.ClientSession,
) -> None:
    # Seed 2 draws: ended, reset, ended, reset, ...
    async with ApiServer(faults=Faults(seed=2, drop_watch_every_s=0.3, identities=(VICTIM,))) as api:
        pods = f"{api.url}/api/v1/namespaces/{NAMESPACE}/pods?watch=true"
        ended: list[str] = []

        async def watch_until_dropped(identity: str) -> None:
            async with http.get(pods, headers=as_(identity)) as response:
                try:
                    async for _ in response.content:
                        pytest.fail("no change was made: nothing may be streamed")
                    ended.append(f"{identity}: ended")
                except aiohttp.ClientPayloadError:
                    ended.append(f"{identity}: reset")

        with anyio.fail_after(2):
            await watch_until_dropped(VICTIM)
            await watch_until_dropped(VICTIM)
        with anyio.move_on_after(0.7):  # two more drops: a bystander's watch is never one of them
            await watch_until_dropped(BYSTANDER)

    assert ended == ["victim: ended", "victim: reset"]
    assert api.faults_injected == {"watch_ended": 1, "watch_reset": 1}


async def test_the_same_seed_gives_the_same_faults_to_the_same_requests(http: aiohttp.ClientSession) -> None:
    async def faults_of_twenty_lists(seed: int) -> list[tuple[str, ...]]:
        faults = Faults(seed=seed, error_rate=0.3, throttle_rate=0.3, slow_rate=0.3, slow_s=0.001)
        async with ApiServer(faults=faults) as api:
            for _ in range(20):
                await get(http, f"{api.url}/api/v1/nodes")
            return [record.faults for record in api.request_log]

    first, again, other = [await faults_of_twenty_lists(seed) for seed in (7, 7, 8)]

    assert first == again != other
    assert {"slow", "throttled", "error"} <= {fault for faults in first for fault in faults}


async def test_kubernetes_asyncio_reads_a_refused_watch_as_its_stream() -> None:
    """Why `list_and_watch` checks a watch's HTTP status itself: the client's `Watch` never does,
    so the 429's plain text comes out as an event (a str) and `Retry-After` is lost."""
    async with (
        ApiServer(faults=Faults(throttle_rate=1.0)) as api,
        client.ApiClient(client.Configuration(host=api.url)) as api_client,
    ):
        core = client.CoreV1Api(api_client)
        async with watch.Watch() as pods:
            events = [event async for event in pods.stream(core.list_node, timeout_seconds=1)]

    assert events == ["Too many requests, please try again later.\n"]
