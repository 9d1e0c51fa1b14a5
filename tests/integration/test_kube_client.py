"""`services.kit.kube`: the clients every service talks to the API with, over real HTTP to the emulator.

Without a proxy in the environment, a request looks nothing up (no netrc, no proxy variables, no
worker thread); with one, the client is kubernetes-asyncio's own and goes through the proxy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client

from services.kit.kube import api_client, environment_proxy
from simulation.apiserver import ApiServer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    server = ApiServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(autouse=True)
def no_proxy_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
async def handed(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every function the event loop hands to a worker thread while the test runs."""
    loop = asyncio.get_running_loop()
    functions: list[object] = []
    run_in_executor = loop.run_in_executor

    def counted(executor: Any, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        functions.append(function)
        return run_in_executor(executor, function, *args)

    monkeypatch.setattr(loop, "run_in_executor", counted)
    return functions


async def test_without_a_proxy_requests_look_nothing_up_in_a_thread(
    api: ApiServer, handed: list[object]
) -> None:
    async with await api_client(api.url, "mpsflow-pod-watcher") as connected:
        assert not connected.rest_client.pool_manager.trust_env
        core = client.CoreV1Api(connected)
        for _ in range(20):
            await core.list_namespaced_pod("default")
    assert handed == []
    assert [record.identity for record in api.request_log] == ["mpsflow-pod-watcher"] * 20


async def test_kubernetes_asyncios_own_session_would_look_up_twice_a_request(
    api: ApiServer, handed: list[object]
) -> None:
    """What `client_over` spares, so that the test above cannot pass for want of a lookup to spare."""
    configuration = client.Configuration()
    configuration.host = api.url
    async with client.ApiClient(configuration) as own:
        for _ in range(5):
            await client.CoreV1Api(own).list_namespaced_pod("default")
    assert len(handed) == 10


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
async def test_a_proxy_the_environment_names_is_used(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    proxied: list[str] = []

    async def forward(request: web.Request) -> web.Response:  # a plain-http forward proxy
        proxied.append(str(request.url))
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []})

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", forward)
    proxy = web.AppRunner(app)
    await proxy.setup()
    site = web.TCPSite(proxy, "127.0.0.1", 0)
    await site.start()
    try:
        monkeypatch.setenv(variable, f"http://127.0.0.1:{proxy.addresses[0][1]}")
        assert environment_proxy(api.url) == f"http://127.0.0.1:{proxy.addresses[0][1]}"
        async with await api_client(api.url, "mpsflow-pod-watcher") as connected:
            assert connected.rest_client.pool_manager.trust_env
            await client.CoreV1Api(connected).list_namespaced_pod("default")
    finally:
        await proxy.cleanup()
    assert proxied == [f"{api.url}/api/v1/namespaces/default/pods"]


async def test_no_proxy_exempts_the_api_server(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,.cluster.local")
    assert environment_proxy(api.url) is None
    async with await api_client(api.url, "mpsflow-pod-watcher") as connected:
        assert not connected.rest_client.pool_manager.trust_env
        await client.CoreV1Api(connected).list_namespaced_pod("default")


def test_the_proxy_is_asked_for_the_urls_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://secure-proxy:3128")
    assert environment_proxy("https://10.0.0.1:6443") == "http://secure-proxy:3128"
    assert environment_proxy("http://10.0.0.1:8080") is None
    assert environment_proxy(None) is None
