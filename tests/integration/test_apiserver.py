"""The Kubernetes API emulator, driven by the real `kubernetes_asyncio` client the services use.

These tests pin both the emulator's behaviour and the client's quirks that the services must
live with (how a watch reports a dropped connection or an expired resourceVersion, which key the
bearer token goes under, the Binding response the client cannot deserialize). Admission webhooks
are tiny aiohttp servers on loopback; watch timing is measured with the loop clock, as lower
bounds only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from simulation.apiserver import AdmissionWebhook, ApiServer

pytestmark = pytest.mark.anyio

NAMESPACE = "default"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer(bookmark_interval=0.05) as server:
        yield server


@pytest.fixture
async def core(api: ApiServer) -> AsyncIterator[Any]:
    async with client.ApiClient(client.Configuration(host=api.url)) as api_client:
        yield client.CoreV1Api(api_client)


def pod(name: str = "", *, labels: dict[str, str] | None = None, generate_name: str | None = None) -> Any:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name or None, generate_name=generate_name, labels=labels),
        spec=client.V1PodSpec(containers=[client.V1Container(name="main", image="busybox")]),
    )


def binding(pod_name: str, node_name: str) -> Any:
    return client.V1Binding(
        metadata=client.V1ObjectMeta(name=pod_name),
        target=client.V1ObjectReference(kind="Node", name=node_name),
    )


async def bind(core: Any, pod_name: str, node_name: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of a binding. It needs `_preload_content=False`, as the API answers a Status
    that the client cannot read as a Binding; the client then raises no ApiException on errors either."""
    response = await core.create_namespaced_pod_binding(
        pod_name, NAMESPACE, binding(pod_name, node_name), _preload_content=False
    )
    body: dict[str, Any] = await response.json()
    return response.status, body


def failure(error: ApiException) -> dict[str, Any]:
    assert error.body is not None
    body: dict[str, Any] = json.loads(error.body)
    return body


async def pod_names(core: Any, **selectors: str) -> list[str]:
    pods = await core.list_namespaced_pod(NAMESPACE, **selectors)
    return [p.metadata.name for p in pods.items]


async def watch_until(core: Any, last_name: str, **kwargs: Any) -> list[tuple[str, str]]:
    """(type, pod name) of each pod event up to and including the first one about `last_name`."""
    seen: list[tuple[str, str]] = []
    async with watch.Watch() as pods:
        async for event in pods.stream(core.list_namespaced_pod, NAMESPACE, timeout_seconds=5, **kwargs):
            seen.append((event["type"], event["raw_object"]["metadata"]["name"]))
            if seen[-1][1] == last_name:
                break
    return seen


async def test_create_get_list_and_delete(api: ApiServer, core: Any) -> None:
    created = await core.create_namespaced_pod(NAMESPACE, pod("alpha"))
    assert created.metadata.uid and created.metadata.creation_timestamp is not None
    assert created.metadata.namespace == NAMESPACE
    assert created.status.phase == "Pending"
    assert created.kind == "Pod" and created.api_version == "v1"

    fetched = await core.read_namespaced_pod("alpha", NAMESPACE)
    assert fetched.metadata.resource_version == created.metadata.resource_version

    await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="node-a")))
    listed = await core.list_pod_for_all_namespaces()
    assert listed.kind == "PodList"
    assert listed.metadata.resource_version == "2"  # one global resourceVersion across resources
    assert [p.metadata.name for p in listed.items] == ["alpha"]
    assert [n.metadata.name for n in (await core.list_node()).items] == ["node-a"]

    deleted = await core.delete_namespaced_pod("alpha", NAMESPACE)
    assert deleted.metadata.name == "alpha"
    with pytest.raises(ApiException) as missing:
        await core.read_namespaced_pod("alpha", NAMESPACE)
    assert missing.value.status == 404 and failure(missing.value)["reason"] == "NotFound"
    assert api.objects("pods") == []


async def test_generate_name_and_already_exists(core: Any) -> None:
    generated = await core.create_namespaced_pod(NAMESPACE, pod(generate_name="worker-"))
    assert (
        generated.metadata.name.startswith("worker-") and len(generated.metadata.name) == len("worker-") + 5
    )

    with pytest.raises(ApiException) as duplicate:
        await core.create_namespaced_pod(NAMESPACE, pod(generated.metadata.name))
    assert duplicate.value.status == 409
    assert failure(duplicate.value)["reason"] == "AlreadyExists"


async def test_replace_with_stale_resource_version_conflicts(core: Any) -> None:
    config_map = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="plan"), data={"slices": "2"})
    stale = await core.create_namespaced_config_map(NAMESPACE, config_map)
    stale.data = {"slices": "4"}
    fresh = await core.replace_namespaced_config_map("plan", NAMESPACE, stale)
    assert fresh.data == {"slices": "4"}
    assert int(fresh.metadata.resource_version) > int(stale.metadata.resource_version)

    with pytest.raises(ApiException) as conflict:
        await core.replace_namespaced_config_map("plan", NAMESPACE, stale)
    assert conflict.value.status == 409
    assert failure(conflict.value)["reason"] == "Conflict"


async def test_merge_patch_sets_and_deletes_node_labels(core: Any) -> None:
    labels = {"mpsflow.io/enabled": "true", "zone": "a"}
    await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="gpu-1", labels=labels)))
    patch = {"metadata": {"labels": {"zone": None, "mpsflow.io/slices": "4"}}}
    patched = await core.patch_node("gpu-1", patch, _content_type="application/merge-patch+json")
    assert patched.metadata.labels == {"mpsflow.io/enabled": "true", "mpsflow.io/slices": "4"}


async def test_patch_with_stale_resource_version_conflicts(core: Any) -> None:
    node = await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="gpu-1")))
    await core.patch_node("gpu-1", {"metadata": {"labels": {"a": "1"}}})
    stale = {"metadata": {"resourceVersion": node.metadata.resource_version, "labels": {"a": "2"}}}
    with pytest.raises(ApiException) as conflict:
        await core.patch_node("gpu-1", stale, _content_type="application/merge-patch+json")
    assert failure(conflict.value)["reason"] == "Conflict"


async def test_dict_patch_is_strategic_merge_applied_as_merge_patch(core: Any) -> None:
    taint = client.V1Taint(key="gpu", value="busy", effect="NoSchedule")
    node = client.V1Node(metadata=client.V1ObjectMeta(name="gpu-1"), spec=client.V1NodeSpec(taints=[taint]))
    await core.create_node(node)
    patch = {"spec": {"taints": [{"key": "mps", "effect": "NoSchedule"}]}, "metadata": {"labels": {"x": "1"}}}
    patched = await core.patch_node("gpu-1", patch)  # the client picks strategic-merge-patch for a dict
    assert patched.metadata.labels == {"x": "1"}
    assert [t.key for t in patched.spec.taints] == ["mps"]  # lists are replaced, not merged by key


async def test_json_patch_with_escaped_pointer(core: Any) -> None:
    await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="gpu-1", labels={"a": "1"})))
    operations = [
        {"op": "test", "path": "/metadata/labels/a", "value": "1"},
        {"op": "add", "path": "/metadata/labels/mpsflow.io~1slices", "value": "7"},
        {"op": "remove", "path": "/metadata/labels/a"},
    ]
    patched = await core.patch_node("gpu-1", operations)  # the client picks json-patch for a list
    assert patched.metadata.labels == {"mpsflow.io/slices": "7"}

    with pytest.raises(ApiException) as failed_test:
        await core.patch_node(
            "gpu-1", [{"op": "test", "path": "/metadata/labels/mpsflow.io~1slices", "value": "1"}]
        )
    assert failed_test.value.status == 422 and failure(failed_test.value)["reason"] == "Invalid"


async def test_binding_sets_node_name_once(api: ApiServer, core: Any) -> None:
    await core.create_namespaced_pod(NAMESPACE, pod("job"))
    status, answer = await bind(core, "job", "gpu-1")
    assert status == 201
    assert answer["kind"] == "Status" and answer["status"] == "Success" and answer["code"] == 201

    bound = await core.read_namespaced_pod("job", NAMESPACE)
    assert bound.spec.node_name == "gpu-1"
    assert [(c.type, c.status) for c in bound.status.conditions] == [("PodScheduled", "True")]

    status, answer = await bind(core, "job", "gpu-2")
    assert status == 409 and answer["reason"] == "Conflict"
    assert api.request_log[-1].resource == "pods/binding" and api.request_log[-1].verb == "create"


async def test_binding_response_cannot_be_deserialized_by_the_client(core: Any) -> None:
    await core.create_namespaced_pod(NAMESPACE, pod("job"))
    with pytest.raises(ValueError, match="target"):
        await core.create_namespaced_pod_binding("job", NAMESPACE, binding("job", "gpu-1"))
    assert (await core.read_namespaced_pod("job", NAMESPACE)).spec.node_name == "gpu-1"  # it did bind


async def test_status_subresource_changes_only_status(core: Any) -> None:
    await core.create_namespaced_pod(NAMESPACE, pod("job", labels={"a": "1"}))
    patch = {"status": {"phase": "Running"}, "metadata": {"labels": {"a": "2"}}}
    patched = await core.patch_namespaced_pod_status("job", NAMESPACE, patch)
    assert patched.status.phase == "Running" and patched.metadata.labels == {"a": "1"}

    main = await core.patch_namespaced_pod("job", NAMESPACE, {"status": {"phase": "Failed"}})
    assert main.status.phase == "Running"  # the main resource ignores status


async def test_unchanged_patch_is_not_a_write(core: Any) -> None:
    created = await core.create_namespaced_pod(NAMESPACE, pod("job", labels={"a": "1"}))
    patched = await core.patch_namespaced_pod("job", NAMESPACE, {"metadata": {"labels": {"a": "1"}}})
    assert patched.metadata.resource_version == created.metadata.resource_version


async def test_label_selectors(core: Any) -> None:
    for name, labels in [("one", {"tier": "gpu", "mps": "on"}), ("two", {"tier": "cpu"}), ("three", {})]:
        await core.create_namespaced_pod(NAMESPACE, pod(name, labels=labels))
    cases = {
        "tier=gpu": ["one"],
        "tier==cpu": ["two"],
        "tier!=gpu": ["three", "two"],
        "tier in (gpu, cpu)": ["one", "two"],
        "tier notin (gpu)": ["three", "two"],
        "mps": ["one"],
        "!mps": ["three", "two"],
        "tier,!mps": ["two"],
    }
    for selector, expected in cases.items():
        assert await pod_names(core, label_selector=selector) == expected, selector

    with pytest.raises(ApiException) as invalid:
        await core.list_namespaced_pod(NAMESPACE, label_selector="tier in gpu")
    assert invalid.value.status == 400 and failure(invalid.value)["reason"] == "BadRequest"


async def test_field_selectors(core: Any) -> None:
    for name in ("bound", "waiting"):
        await core.create_namespaced_pod(NAMESPACE, pod(name))
    await bind(core, "bound", "gpu-1")
    await core.patch_namespaced_pod_status("bound", NAMESPACE, {"status": {"phase": "Running"}})

    assert await pod_names(core, field_selector="spec.nodeName=") == ["waiting"]
    assert await pod_names(core, field_selector="spec.nodeName!=") == ["bound"]
    assert await pod_names(core, field_selector="status.phase=Pending") == ["waiting"]
    assert await pod_names(core, field_selector="spec.nodeName==gpu-1,metadata.name=bound") == ["bound"]

    await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="gpu-1")))
    nodes = await core.list_node(field_selector="spec.unschedulable=false")
    assert [n.metadata.name for n in nodes.items] == ["gpu-1"]

    with pytest.raises(ApiException) as unsupported:
        await core.list_namespaced_pod(NAMESPACE, field_selector="spec.priority=1")
    assert unsupported.value.status == 400
    assert failure(unsupported.value) | {"message": ""} == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "",
        "reason": "BadRequest",
        "code": 400,
    }


async def page(core: Any, **options: Any) -> tuple[list[str], str, str | None, int | None]:
    """One page of pods: the names, the list's resourceVersion, continue and remainingItemCount."""
    listed = await core.list_namespaced_pod(NAMESPACE, **options)
    names = [p.metadata.name for p in listed.items]
    return (
        names,
        listed.metadata.resource_version,
        listed.metadata._continue,
        listed.metadata.remaining_item_count,
    )


async def test_a_limited_list_comes_in_pages_of_one_snapshot_whatever_is_written_meanwhile(
    core: Any,
) -> None:
    for name in ("a", "b", "c", "d", "e"):
        await core.create_namespaced_pod(NAMESPACE, pod(name))

    first, version, token, remaining = await page(core, limit=2)
    await core.delete_namespaced_pod("c", NAMESPACE)
    await core.create_namespaced_pod(NAMESPACE, pod("bb"))
    await core.patch_namespaced_pod("d", NAMESPACE, {"metadata": {"labels": {"changed": "yes"}}})
    second = await core.list_namespaced_pod(NAMESPACE, limit=2, _continue=token)
    third, third_version, end, none_left = await page(core, limit=2, _continue=second.metadata._continue)

    assert (first, version, remaining) == (["a", "b"], "5", 3)
    assert [p.metadata.name for p in second.items] == ["c", "d"]  # "c" deleted and "bb" created since
    assert second.items[1].metadata.labels is None  # "d" as it was at resourceVersion 5
    assert (second.metadata.resource_version, second.metadata.remaining_item_count) == ("5", 1)
    assert (third, third_version, end, none_left) == (["e"], "5", None, None)
    assert await page(core, limit=10) == (["a", "b", "bb", "d", "e"], "8", None, None)
    assert await page(core) == (["a", "b", "bb", "d", "e"], "8", None, None)


async def test_a_continue_token_older_than_the_history_gets_410_expired_with_an_inconsistent_token(
    api: ApiServer, core: Any
) -> None:
    for name in ("a", "b", "c"):
        await core.create_namespaced_pod(NAMESPACE, pod(name))
    _, _, token, _ = await page(core, limit=1)
    await core.delete_namespaced_pod("b", NAMESPACE)
    api.expire_history()  # as etcd compacts: resourceVersion 3 is gone

    with pytest.raises(ApiException) as expired:
        await core.list_namespaced_pod(NAMESPACE, limit=1, _continue=token)

    body = failure(expired.value)
    assert (expired.value.status, body["reason"], body["code"]) == (410, "Expired", 410)
    assert body["message"].startswith("The provided continue parameter is too old")
    # The token it offers continues after "a" at the latest resourceVersion: "b" is gone from it.
    assert await page(core, limit=1, _continue=body["metadata"]["continue"]) == (["c"], "4", None, None)
    assert (await page(core, limit=1))[0:2] == (["a"], "4")  # a new list starts afresh


async def test_a_paged_list_with_a_selector_may_end_on_an_empty_page_and_counts_nothing(core: Any) -> None:
    for name, phase in (
        ("a", "Running"),
        ("b", "Succeeded"),
        ("c", "Failed"),
        ("d", "Running"),
        ("e", "Failed"),
    ):
        await core.create_namespaced_pod(NAMESPACE, pod(name))
        await core.patch_namespaced_pod_status(name, NAMESPACE, {"status": {"phase": phase}})
    not_finished = "status.phase!=Succeeded,status.phase!=Failed"

    first, _, token, remaining = await page(core, limit=1, field_selector=not_finished)
    # b and c are scanned and filtered out on the way to d; e is still to scan after d
    second, _, token_2, _ = await page(core, limit=1, field_selector=not_finished, _continue=token)
    last = await page(core, limit=1, field_selector=not_finished, _continue=token_2)

    assert (first, remaining) == (["a"], None)  # remainingItemCount is unknown with a selector
    assert second == ["d"]
    assert last == ([], "10", None, None)  # fewer items than the limit, down to none
    assert (await page(core, limit=2, label_selector="absent!=x"))[0:4:3] == (["a", "b"], None)


async def test_resource_version_semantics_of_a_limited_list(api: ApiServer, core: Any) -> None:
    for name in ("a", "b", "c"):
        await core.create_namespaced_pod(NAMESPACE, pod(name))
    await core.delete_namespaced_pod("a", NAMESPACE)

    # "0" means Any: served from the watch cache, which ignores the limit.
    from_cache = await page(core, limit=1, resource_version="0")
    # Another resourceVersion means Exact: that snapshot, in pages.
    exact, version, token, remaining = await page(core, limit=1, resource_version="2")
    rest = await page(core, limit=1, resource_version="0", _continue=token)  # "0" with a token: the token's
    refusals = []
    for options in (
        {"resource_version": "2", "_continue": token},
        {"_continue": "bm90IGEgdG9rZW4"},
        {"resource_version": "99"},
    ):
        with pytest.raises(ApiException) as refused:
            await core.list_namespaced_pod(NAMESPACE, limit=1, **options)
        refusals.append((refused.value.status, failure(refused.value)["message"]))
    api.expire_history()
    with pytest.raises(ApiException) as too_old:
        await core.list_namespaced_pod(NAMESPACE, limit=1, resource_version="2")

    assert from_cache == (["b", "c"], "4", None, None)
    assert (exact, version, remaining) == (["a"], "2", 1)
    assert rest == (["b"], "2", None, None)
    assert refusals == [
        (400, "specifying resource version is not allowed when using continue"),
        (400, "continue key is not valid: 'bm90IGEgdG9rZW4'"),
        (504, "Too large resource version: 99, current: 4"),
    ]
    assert (too_old.value.status, failure(too_old.value)["reason"]) == (410, "Expired")


async def test_watch_from_list_resource_version_sees_only_later_changes(core: Any) -> None:
    await core.create_namespaced_pod(NAMESPACE, pod("before"))
    listed = await core.list_namespaced_pod(NAMESPACE)
    await core.create_namespaced_pod(NAMESPACE, pod("after"))
    await core.patch_namespaced_pod("before", NAMESPACE, {"metadata": {"labels": {"seen": "yes"}}})
    await core.delete_namespaced_pod("after", NAMESPACE)
    await core.create_namespaced_pod(NAMESPACE, pod("marker"))

    events = await watch_until(core, "marker", resource_version=listed.metadata.resource_version)
    expected = [("ADDED", "after"), ("MODIFIED", "before"), ("DELETED", "after"), ("ADDED", "marker")]
    assert events == expected


async def test_watch_without_resource_version_starts_with_synthetic_added(core: Any) -> None:
    for name in ("a", "b"):
        await core.create_namespaced_pod(NAMESPACE, pod(name))
    async with watch.Watch() as pods:
        seen = []
        async for event in pods.stream(core.list_namespaced_pod, NAMESPACE, timeout_seconds=5):
            seen.append((event["type"], event["object"].metadata.name))
            if len(seen) == 2:
                await core.delete_namespaced_pod("a", NAMESPACE)
            if len(seen) == 3:
                break
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("DELETED", "a")]


async def test_watch_turns_selector_transitions_into_added_and_deleted(core: Any) -> None:
    await core.create_namespaced_pod(NAMESPACE, pod("job", labels={"mps": "on"}))
    listed = await core.list_namespaced_pod(NAMESPACE)
    await core.patch_namespaced_pod("job", NAMESPACE, {"metadata": {"labels": {"mps": "off"}}})
    await core.patch_namespaced_pod("job", NAMESPACE, {"metadata": {"labels": {"mps": "on"}}})
    await core.create_namespaced_pod(NAMESPACE, pod("marker", labels={"mps": "on"}))

    events = await watch_until(
        core, "marker", label_selector="mps=on", resource_version=listed.metadata.resource_version
    )
    assert events == [("DELETED", "job"), ("ADDED", "job"), ("ADDED", "marker")]


async def test_bookmarks(core: Any) -> None:
    await core.create_namespaced_pod(NAMESPACE, pod("a"))
    async with watch.Watch() as pods:
        kinds = []
        stream = pods.stream(
            core.list_namespaced_pod, NAMESPACE, allow_watch_bookmarks=True, timeout_seconds=5
        )
        async for event in stream:
            kinds.append(event["type"])
            if event["type"] == "BOOKMARK":
                assert event["raw_object"]["metadata"] == {"resourceVersion": "1"}
                break
        assert pods.resource_version == "1"
    assert kinds == ["ADDED", "BOOKMARK"]


async def test_watch_from_expired_resource_version(api: ApiServer, core: Any) -> None:
    for name in ("a", "b"):
        await core.create_namespaced_pod(NAMESPACE, pod(name))
    api.expire_history()
    for extra, attempts in (({"timeout_seconds": 5}, 1), ({}, 2)):
        before = len(api.request_log)
        async with watch.Watch() as pods:
            with pytest.raises(ApiException) as expired:
                async for _ in pods.stream(
                    core.list_namespaced_pod, NAMESPACE, resource_version="1", **extra
                ):
                    pytest.fail("a watch from an expired resourceVersion must not deliver events")
        # Without timeout_seconds the client retries a 410 once, with the same resourceVersion.
        assert (
            expired.value.status == 410 and expired.value.reason == "Expired: too old resource version: 1 (2)"
        )
        assert expired.value.body is None  # a watch error carries no Status body, unlike a request error
        assert [r.verb for r in api.request_log[before:]] == ["watch"] * attempts


async def test_history_limit_expires_the_oldest_resource_versions() -> None:
    async with (
        ApiServer(history_limit=1) as server,
        client.ApiClient(client.Configuration(host=server.url)) as ac,
    ):
        pods_api = client.CoreV1Api(ac)
        for name in ("a", "b", "c"):
            await pods_api.create_namespaced_pod(NAMESPACE, pod(name))
        assert await watch_until(pods_api, "c", resource_version="2") == [("ADDED", "c")]
        with pytest.raises(ApiException) as expired:
            await watch_until(pods_api, "c", resource_version="1")
        assert expired.value.status == 410


async def test_drop_watches_breaks_the_stream(api: ApiServer, core: Any) -> None:
    await core.create_namespaced_pod(NAMESPACE, pod("a"))
    for extra in ({"timeout_seconds": 5}, {}):
        seen: list[str] = []
        # Unbroken, the first watch would end cleanly after 5 s, the second not at all.
        with anyio.fail_after(30):
            async with watch.Watch() as pods:
                with pytest.raises(aiohttp.ClientPayloadError):  # not retried by the client, timeout or not
                    async for change in pods.stream(core.list_namespaced_pod, NAMESPACE, **extra):
                        seen.append(f"{change['type']} {change['object'].metadata.name}")
                        api.drop_watches()
        assert seen == ["ADDED a"]


async def test_stop_ends_open_watches() -> None:
    server = ApiServer()
    seen: list[str] = []
    async with client.ApiClient(client.Configuration(host=await server.start())) as api_client:
        pods_api = client.CoreV1Api(api_client)
        await pods_api.create_namespaced_pod(NAMESPACE, pod("a"))
        # The watch would last a minute; stopping the server ends it at once, cleanly (no error).
        with anyio.fail_after(30):
            async with watch.Watch() as pods:
                async for change in pods.stream(pods_api.list_namespaced_pod, NAMESPACE, timeout_seconds=60):
                    seen.append(f"{change['type']} {change['object'].metadata.name}")
                    await server.stop()
    assert seen == ["ADDED a"]


async def test_fail_next(api: ApiServer, core: Any) -> None:
    await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="gpu-1")))
    api.fail_next("patch", "nodes", 409)
    with pytest.raises(ApiException) as injected:
        await core.patch_node("gpu-1", {"metadata": {"labels": {"a": "1"}}})
    assert injected.value.status == 409 and failure(injected.value)["reason"] == "Conflict"
    patched = await core.patch_node("gpu-1", {"metadata": {"labels": {"a": "1"}}})
    assert patched.metadata.labels == {"a": "1"}


async def test_request_log_identity_comes_from_the_bearer_token(api: ApiServer) -> None:
    keyed_as_brief = client.Configuration(
        host=api.url, api_key={"authorization": "scheduler"}, api_key_prefix={"authorization": "Bearer"}
    )
    keyed_as_loaders = client.Configuration(
        host=api.url, api_key={"BearerToken": "scheduler"}, api_key_prefix={"BearerToken": "Bearer"}
    )
    for configuration in (keyed_as_brief, keyed_as_loaders):
        async with client.ApiClient(configuration) as api_client:
            await client.CoreV1Api(api_client).list_node()
    # kubernetes_asyncio only sends api_key["BearerToken"] (as its kubeconfig and in-cluster loaders set it).
    assert [r.identity for r in api.request_log] == [None, "scheduler"]
    assert api.request_log[-1].path == "/api/v1/nodes" and api.request_log[-1].namespace is None


async def test_events(core: Any) -> None:
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="job."),
        involved_object=client.V1ObjectReference(kind="Pod", namespace=NAMESPACE, name="job"),
        reason="Partitioned",
        message="2 MPS slices",
        type="Normal",
    )
    created = await core.create_namespaced_event(NAMESPACE, event)
    assert created.reason == "Partitioned"
    found = await core.list_event_for_all_namespaces(
        field_selector="involvedObject.name=job,reason=Partitioned"
    )
    assert [e.metadata.name for e in found.items] == [created.metadata.name]


async def test_discovery_and_version(core: Any) -> None:
    async with client.ApiClient(core.api_client.configuration) as api_client:
        version = await client.VersionApi(api_client).get_code()
    assert version.major == "1"
    resources = await core.get_api_resources()
    assert {"pods", "pods/binding", "pods/status", "nodes", "nodes/status", "configmaps", "events"} == {
        r.name for r in resources.resources
    }


# --- admission webhooks ------------------------------------------------------------------------

GATE = "mpsflow.dev/slice"
SCHEDULING_GATED = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "SchedulingGated",
    "message": "Scheduling is blocked due to non-empty scheduling gates",
    "lastProbeTime": None,
}


@dataclass(frozen=True)
class Received:
    """One AdmissionReview a test webhook received, with the path and query it was posted to."""

    path: str
    query: dict[str, str]
    review: dict[str, Any]


@dataclass
class Webhooks:
    """A tiny webhook server on loopback; each path answers AdmissionReviews its own way."""

    url: str
    received: list[Received] = field(default_factory=list)


def answer(review: dict[str, Any], **response: Any) -> web.Response:
    uid = review["request"]["uid"]
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, **response},
    }
    return web.json_response(body)


def encoded(operations: list[dict[str, Any]]) -> str:
    return base64.b64encode(json.dumps(operations).encode()).decode()


@pytest.fixture
async def webhooks() -> AsyncIterator[Webhooks]:
    answers: dict[str, Callable[[dict[str, Any]], web.Response]] = {
        "/gate": lambda review: answer(
            review,
            allowed=True,
            patchType="JSONPatch",
            patch=encoded([{"op": "add", "path": "/spec/schedulingGates", "value": [{"name": GATE}]}]),
        ),
        "/slow": lambda review: answer(review, allowed=True),  # only once the test is over
        "/deny": lambda review: answer(
            review, allowed=False, status={"code": 403, "reason": "Forbidden", "message": "no slice for you"}
        ),
        "/deny-without-code": lambda review: answer(review, allowed=False, status={"message": "no slice"}),
        "/garbage": lambda review: web.Response(text="this is not an AdmissionReview"),
        "/without-kind": lambda review: web.json_response({"response": {"uid": review["request"]["uid"]}}),
        "/wrong-uid": lambda review: answer(review | {"request": {"uid": "not-this-one"}}, allowed=True),
        "/unappliable-patch": lambda review: answer(
            review,
            allowed=True,
            patchType="JSONPatch",
            patch=encoded([{"op": "remove", "path": "/spec/nope"}]),
        ),
    }
    released = asyncio.Event()  # ends the slow webhook's calls when the test is over
    server = Webhooks("")

    async def handle(request: web.Request) -> web.StreamResponse:
        review = await request.json()
        server.received.append(Received(request.path, dict(request.query), review))
        if request.path == "/slow":
            await released.wait()
        return answers[request.path](review)

    app = web.Application()
    app.router.add_post("/{path:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        released.set()
        await runner.cleanup()


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """The URL of a loopback port held bound without listening, for the test's length: connecting
    is refused at once, and no other process can take the port meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}/"


@asynccontextmanager
async def emulator(
    *hooks: AdmissionWebhook, token: str | None = None
) -> AsyncIterator[tuple[ApiServer, Any]]:
    """An emulator calling `hooks` on pod creates, and a CoreV1Api on it (with `token` as bearer)."""
    async with ApiServer(admission_webhooks=hooks) as server:
        configuration = client.Configuration(host=server.url)
        if token:
            configuration.api_key = {"BearerToken": token}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
        async with client.ApiClient(configuration) as api_client:
            yield server, client.CoreV1Api(api_client)


def slice_pod(
    name: str = "", *, generate_name: str = "", gates: tuple[str, ...] = (), node_name: str = ""
) -> dict[str, Any]:
    """A pod asking for one 10 GiB MPS slice, as a plain body."""
    container = {"name": "main", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu-10gb": "1"}}}
    spec: dict[str, Any] = {"containers": [container]}
    if gates:
        spec["schedulingGates"] = [{"name": gate} for gate in gates]
    if node_name:
        spec["nodeName"] = node_name
    metadata = {"name": name} if name else {"generateName": generate_name}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def asks_for_a_slice(pod_object: dict[str, Any]) -> bool:
    return any(
        "nvidia.com/gpu-10gb" in ((c.get("resources") or {}).get("limits") or {})
        for c in pod_object["spec"]["containers"]
    )


def without_times(condition: dict[str, Any]) -> dict[str, Any]:
    assert condition["lastTransitionTime"]
    return {key: value for key, value in condition.items() if key != "lastTransitionTime"}


async def test_webhook_json_patch_gates_the_stored_pod(webhooks: Webhooks) -> None:
    async with emulator(AdmissionWebhook("gate.test", f"{webhooks.url}/gate")) as (server, core):
        created = await core.create_namespaced_pod(NAMESPACE, slice_pod("job"))
        [stored] = server.objects("pods")
    assert [gate.name for gate in created.spec.scheduling_gates] == [GATE]
    assert stored["spec"]["schedulingGates"] == [{"name": GATE}]
    assert [without_times(c) for c in stored["status"]["conditions"]] == [SCHEDULING_GATED]
    assert stored["status"]["phase"] == "Pending"


async def test_admission_review_is_the_one_the_real_api_server_sends(webhooks: Webhooks) -> None:
    async with emulator(AdmissionWebhook("gate.test", f"{webhooks.url}/gate"), token="mpsflow") as (_, core):
        created = await core.create_namespaced_pod(
            NAMESPACE, slice_pod(generate_name="job-"), field_manager="mpsflow-tests"
        )
    [call] = webhooks.received
    assert call.path == "/gate" and call.query == {"timeout": "10s"}
    assert (call.review["apiVersion"], call.review["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    request = dict(call.review["request"])
    uuid.UUID(request.pop("uid"))
    # The webhook sees the pod before it is named, defaulted or stored; an empty name is left out.
    assert request.pop("object") == slice_pod(generate_name="job-") | {
        "metadata": {"generateName": "job-", "namespace": NAMESPACE}
    }
    assert created.metadata.name.startswith("job-") and "name" not in request
    assert request == {
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": NAMESPACE,
        "operation": "CREATE",
        "userInfo": {"username": "mpsflow"},
        "oldObject": None,
        "dryRun": False,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "mpsflow-tests"},
    }


async def test_webhook_denial_is_answered_with_its_status(webhooks: Webhooks) -> None:
    hooks = (
        AdmissionWebhook("deny.test", f"{webhooks.url}/deny", matches=lambda p: p["metadata"]["name"] == "a"),
        AdmissionWebhook("bare.test", f"{webhooks.url}/deny-without-code"),
    )
    async with emulator(*hooks) as (server, core):
        with pytest.raises(ApiException) as denied:
            await core.create_namespaced_pod(NAMESPACE, slice_pod("a"))
        with pytest.raises(ApiException) as without_code:
            await core.create_namespaced_pod(NAMESPACE, slice_pod("b"))
        assert server.objects("pods") == []
    assert denied.value.status == 403
    assert failure(denied.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'admission webhook "deny.test" denied the request: no slice for you',
        "reason": "Forbidden",
        "code": 403,
    }
    assert without_code.value.status == 400  # the real API server's code for a denial without one
    body = failure(without_code.value)
    assert body["message"] == 'admission webhook "bare.test" denied the request: no slice'
    assert "reason" not in body and body["code"] == 400


FAILED_CALLS = {
    "down": "failed to call webhook: Post ",
    "/slow": "failed to call webhook: Post ",
    "/garbage": "failed to call webhook: ",
    "/without-kind": "received invalid webhook response: expected webhook response of "
    "admission.k8s.io/v1, Kind=AdmissionReview, got /, Kind=",
    "/wrong-uid": 'received invalid webhook response: expected response.uid="',
}


@pytest.mark.parametrize("path", sorted(FAILED_CALLS))
async def test_failed_webhook_call_refuses_with_fail_and_is_skipped_with_ignore(
    webhooks: Webhooks, refusing_url: str, path: str
) -> None:
    url = refusing_url if path == "down" else f"{webhooks.url}{path}"
    hooks = (
        AdmissionWebhook(
            "fail.test", url, timeout_seconds=0.2, matches=lambda p: p["metadata"]["name"] == "a"
        ),
        AdmissionWebhook("ignore.test", url, "Ignore", timeout_seconds=0.2),
        AdmissionWebhook("gate.test", f"{webhooks.url}/gate"),  # later webhooks still run
    )
    async with emulator(*hooks) as (server, core):
        with pytest.raises(ApiException) as refused:
            await core.create_namespaced_pod(NAMESPACE, slice_pod("a"))
        await core.create_namespaced_pod(NAMESPACE, slice_pod("b"))
        [stored] = server.objects("pods")
    assert refused.value.status == 500
    body = failure(refused.value)
    assert body["reason"] == "InternalError"
    prefix = f'Internal error occurred: failed calling webhook "fail.test": {FAILED_CALLS[path]}'
    assert body["message"].startswith(prefix), body["message"]
    if path == "/slow":
        assert body["message"].endswith(": context deadline exceeded")
    assert stored["metadata"]["name"] == "b" and stored["spec"]["schedulingGates"] == [{"name": GATE}]


async def test_a_patch_that_cannot_be_applied_refuses_even_when_ignored(webhooks: Webhooks) -> None:
    hook = AdmissionWebhook("bad.test", f"{webhooks.url}/unappliable-patch", "Ignore")
    async with emulator(hook) as (server, core):
        with pytest.raises(ApiException) as refused:
            await core.create_namespaced_pod(NAMESPACE, slice_pod("job"))
        assert server.objects("pods") == []
    assert refused.value.status == 500
    assert failure(refused.value)["message"].startswith(
        "Internal error occurred: the JSON patch cannot be applied"
    )


async def test_matches_decides_whether_the_webhook_is_called(webhooks: Webhooks) -> None:
    async with emulator(AdmissionWebhook("gate.test", f"{webhooks.url}/gate", matches=asks_for_a_slice)) as (
        server,
        core,
    ):
        await core.create_namespaced_pod(NAMESPACE, pod("plain"))
        await core.create_namespaced_pod(NAMESPACE, slice_pod("sliced"))
        stored = {p["metadata"]["name"]: p for p in server.objects("pods")}
    assert [call.review["request"]["name"] for call in webhooks.received] == ["sliced"]
    assert "schedulingGates" not in stored["plain"]["spec"] and "conditions" not in stored["plain"]["status"]
    assert stored["sliced"]["spec"]["schedulingGates"] == [{"name": GATE}]


# --- scheduling gates and pod updates ------------------------------------------------------------

NODE_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-1"]}]}
            ]
        }
    }
}


async def invalid(call: Awaitable[Any]) -> dict[str, Any]:
    """The Status of a request that must be refused as 422 Invalid."""
    with pytest.raises(ApiException) as refused:
        await call
    assert refused.value.status == 422
    body = failure(refused.value)
    assert body["reason"] == "Invalid" and body["code"] == 422
    return body


async def test_gates_with_node_name_on_create_are_invalid(api: ApiServer, core: Any) -> None:
    body = await invalid(
        core.create_namespaced_pod(NAMESPACE, slice_pod("job", gates=(GATE,), node_name="n"))
    )
    detail = "cannot be set until all schedulingGates have been cleared"
    assert body["message"] == f'Pod "job" is invalid: spec.nodeName: Forbidden: {detail}'
    assert body["details"] == {
        "name": "job",
        "kind": "Pod",
        "causes": [
            {"reason": "FieldValueForbidden", "message": f"Forbidden: {detail}", "field": "spec.nodeName"}
        ],
    }
    assert api.objects("pods") == []


async def test_scheduling_gated_condition_stays_until_the_scheduler_writes_pod_scheduled(
    api: ApiServer, core: Any
) -> None:
    await core.create_namespaced_pod(NAMESPACE, slice_pod("job", gates=("a.test/one", "b.test/two")))
    [gated] = api.objects("pods")[0]["status"]["conditions"]
    assert without_times(gated) == SCHEDULING_GATED
    other = {"type": "mpsflow.dev/Sliced", "status": "True"}
    await core.patch_namespaced_pod_status("job", NAMESPACE, {"status": {"conditions": [gated, other]}})

    await core.patch_namespaced_pod("job", NAMESPACE, [{"op": "remove", "path": "/spec/schedulingGates/0"}])
    assert api.objects("pods")[0]["status"]["conditions"] == [gated, other]  # one gate is left
    await core.patch_namespaced_pod("job", NAMESPACE, [{"op": "remove", "path": "/spec/schedulingGates"}])
    assert api.objects("pods")[0]["status"]["conditions"] == [gated, other]


async def test_gated_pod_is_pinned_and_released_in_one_json_patch(api: ApiServer, core: Any) -> None:
    await core.create_namespaced_pod(NAMESPACE, slice_pod("job", gates=(GATE,)))
    status, answer_body = await bind(core, "job", "gpu-1")
    assert status == 409 and answer_body["reason"] == "Conflict"
    assert answer_body["message"] == (
        'Operation cannot be fulfilled on pods/binding "job": pod job has non-empty .spec.schedulingGates'
    )
    assert answer_body["details"] == {"name": "job", "kind": "pods/binding"}
    assert "nodeName" not in api.objects("pods")[0]["spec"]

    await core.patch_namespaced_pod("job", NAMESPACE, {"spec": {"nodeSelector": {"zone": "a"}}})
    await core.patch_namespaced_pod(
        "job", NAMESPACE, {"spec": {"nodeSelector": {"zone": "a", "gpu": "h200"}}}
    )
    release = [
        {"op": "remove", "path": "/spec/schedulingGates"},
        {"op": "add", "path": "/spec/affinity", "value": NODE_AFFINITY},
    ]
    await core.patch_namespaced_pod("job", NAMESPACE, release)
    [stored] = api.objects("pods")
    assert "schedulingGates" not in stored["spec"] and stored["spec"]["affinity"] == NODE_AFFINITY
    assert stored["spec"]["nodeSelector"] == {"zone": "a", "gpu": "h200"}
    assert (await bind(core, "job", "gpu-1"))[0] == 201
    [scheduled] = api.objects("pods")[0]["status"]["conditions"]
    assert (scheduled["type"], scheduled["status"]) == ("PodScheduled", "True")

    toleration = {"key": "mps", "operator": "Exists", "effect": "NoSchedule"}
    allowed = [
        {"op": "replace", "path": "/spec/containers/0/image", "value": "busybox:1.37"},
        {"op": "add", "path": "/spec/tolerations", "value": [toleration]},
        {"op": "add", "path": "/spec/activeDeadlineSeconds", "value": 600},
    ]
    patched = await core.patch_namespaced_pod("job", NAMESPACE, allowed)
    assert patched.spec.containers[0].image == "busybox:1.37" and patched.spec.active_deadline_seconds == 600


ONLY_OTHER_FIELDS = (
    "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
)
TERMS = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
TERMS_POINTER = "/" + TERMS.replace(".", "/")


async def test_scheduling_gates_may_only_be_removed(core: Any) -> None:
    await core.create_namespaced_pod(NAMESPACE, slice_pod("free"))
    await core.create_namespaced_pod(NAMESPACE, slice_pod("gated", gates=(GATE,)))

    late_gate = [{"op": "add", "path": "/spec/schedulingGates", "value": [{"name": "late.test/gate"}]}]
    body = await invalid(core.patch_namespaced_pod("free", NAMESPACE, late_gate))
    assert body["message"] == (
        'Pod "free" is invalid: spec.schedulingGates[0].name: Forbidden: '
        "only deletion is allowed, but found new scheduling gate 'late.test/gate'"
    )
    renamed = [{"op": "replace", "path": "/spec/schedulingGates/0/name", "value": "other.test/gate"}]
    body = await invalid(core.patch_namespaced_pod("gated", NAMESPACE, renamed))
    assert body["message"].endswith(
        "only deletion is allowed, but found new scheduling gate 'other.test/gate'"
    )
    assert body["details"]["causes"] == [
        {
            "reason": "FieldValueForbidden",
            "message": "Forbidden: only deletion is allowed, but found new scheduling gate 'other.test/gate'",
            "field": "spec.schedulingGates[0].name",
        }
    ]


async def test_placement_may_only_narrow_while_gated(core: Any) -> None:
    gated = slice_pod("gated", gates=(GATE,))
    gated["spec"] |= {"nodeSelector": {"zone": "a"}, "affinity": NODE_AFFINITY}
    await core.create_namespaced_pod(NAMESPACE, gated)
    await core.create_namespaced_pod(NAMESPACE, slice_pod("free"))
    await core.create_namespaced_pod(NAMESPACE, slice_pod("released", gates=(GATE,)))
    await core.patch_namespaced_pod(
        "released", NAMESPACE, [{"op": "remove", "path": "/spec/schedulingGates"}]
    )
    requirement = {"key": "gpu", "operator": "In", "values": ["h200"]}

    moved = {"spec": {"nodeSelector": {"zone": "b"}}}
    body = await invalid(core.patch_namespaced_pod("gated", NAMESPACE, moved))
    assert body["message"] == (
        'Pod "gated" is invalid: spec.nodeSelector: Invalid value: {"zone": "b"}: '
        "only additions to spec.nodeSelector are allowed (no mutations or deletions)"
    )
    body = await invalid(core.patch_namespaced_pod("free", NAMESPACE, moved))
    assert body["message"].startswith(f'Pod "free" is invalid: {ONLY_OTHER_FIELDS}')
    assert body["message"].endswith('\n  spec.nodeSelector: null -> {"zone": "b"}')

    changed = [{"op": "replace", "path": f"{TERMS_POINTER}/0/matchFields/0/values/0", "value": "gpu-2"}]
    body = await invalid(core.patch_namespaced_pod("gated", NAMESPACE, changed))
    assert body["message"].startswith(f'Pod "gated" is invalid: {TERMS}[0]: Invalid value: ')
    assert body["message"].endswith(": only additions are allowed (no mutations or deletions)")
    added_term = [{"op": "add", "path": f"{TERMS_POINTER}/-", "value": {"matchExpressions": [requirement]}}]
    body = await invalid(core.patch_namespaced_pod("gated", NAMESPACE, added_term))
    assert body["message"].endswith(
        ": no additions/deletions to non-empty NodeSelectorTerms list are allowed"
    )
    narrowed = [{"op": "add", "path": f"{TERMS_POINTER}/0/matchExpressions", "value": [requirement]}]
    await core.patch_namespaced_pod("gated", NAMESPACE, narrowed)  # a term may gain requirements

    late_affinity = [{"op": "add", "path": "/spec/affinity", "value": NODE_AFFINITY}]
    body = await invalid(core.patch_namespaced_pod("released", NAMESPACE, late_affinity))
    assert body["message"].startswith(f'Pod "released" is invalid: {ONLY_OTHER_FIELDS}')


async def test_other_pod_spec_changes_are_refused(core: Any) -> None:
    await core.create_namespaced_pod(NAMESPACE, slice_pod("gated", gates=(GATE,)))
    resized = await core.read_namespaced_pod("gated", NAMESPACE)
    resized.spec.containers[0].resources.limits = {"nvidia.com/gpu-20gb": "1"}
    body = await invalid(core.replace_namespaced_pod("gated", NAMESPACE, resized))
    assert body["message"].startswith(f'Pod "gated" is invalid: {ONLY_OTHER_FIELDS}')
    assert '\n  spec.containers[0].resources.limits.nvidia.com/gpu-20gb: null -> "1"' in body["message"]
    assert [cause["field"] for cause in body["details"]["causes"]] == ["spec"]

    added = [{"op": "add", "path": "/spec/containers/-", "value": {"name": "side", "image": "busybox"}}]
    body = await invalid(core.patch_namespaced_pod("gated", NAMESPACE, added))
    assert (
        body["message"]
        == 'Pod "gated" is invalid: spec.containers: Forbidden: pod updates may not add or remove containers'
    )


# --- watch delay -------------------------------------------------------------------------------

DELAY = 0.3
TimedEvent = tuple[str, str, int, float]  # type, pod name ("" for a bookmark), resourceVersion, arrival


async def timed_events(
    core: Any, until: Callable[[list[TimedEvent]], bool], **kwargs: Any
) -> list[TimedEvent]:
    """Every pod event with the loop time it arrived at, up to the first one after which `until` holds."""
    loop = asyncio.get_running_loop()
    seen: list[TimedEvent] = []
    async with watch.Watch() as pods:
        async for event in pods.stream(core.list_namespaced_pod, NAMESPACE, timeout_seconds=10, **kwargs):
            metadata = event["raw_object"]["metadata"]
            seen.append(
                (event["type"], metadata.get("name", ""), int(metadata["resourceVersion"]), loop.time())
            )
            if until(seen):
                break
    return seen


def reached(name: str) -> Callable[[list[TimedEvent]], bool]:
    return lambda seen: seen[-1][1] == name


async def test_watch_delay_holds_every_event_back_in_order() -> None:
    loop = asyncio.get_running_loop()
    async with (
        ApiServer(watch_delay=DELAY) as server,
        client.ApiClient(client.Configuration(host=server.url)) as api_client,
    ):
        core = client.CoreV1Api(api_client)
        await core.create_namespaced_pod(NAMESPACE, pod("existing"))
        listed = await core.list_namespaced_pod(NAMESPACE)
        watching = asyncio.create_task(
            timed_events(core, reached("marker"), resource_version=listed.metadata.resource_version)
        )
        caused_at = [loop.time()]
        await core.create_namespaced_pod(NAMESPACE, pod("b"))
        caused_at.append(loop.time())
        await core.patch_namespaced_pod("existing", NAMESPACE, {"metadata": {"labels": {"seen": "yes"}}})
        caused_at.append(loop.time())
        await core.delete_namespaced_pod("b", NAMESPACE)
        caused_at.append(loop.time())
        await core.create_namespaced_pod(NAMESPACE, pod("marker"))
        events = await watching

        opened_at = loop.time()
        initial = await timed_events(core, reached("marker"))

    expected = [("ADDED", "b"), ("MODIFIED", "existing"), ("DELETED", "b"), ("ADDED", "marker")]
    assert [(kind, name) for kind, name, _, _ in events] == expected
    assert [version for _, _, version, _ in events] == [2, 3, 4, 5]
    for (_, _, _, arrived), caused in zip(events, caused_at, strict=True):
        assert arrived - caused >= DELAY
    assert [(kind, name) for kind, name, _, _ in initial] == [("ADDED", "existing"), ("ADDED", "marker")]
    assert all(arrived - opened_at >= DELAY for _, _, _, arrived in initial)


async def test_bookmarks_never_run_ahead_of_held_back_events(api: ApiServer, core: Any) -> None:
    api.watch_delay = DELAY
    await core.create_namespaced_pod(NAMESPACE, pod("a"))
    listed = await core.list_namespaced_pod(NAMESPACE)

    def bookmark_after_d(events: list[TimedEvent]) -> bool:
        return events[-1][0] == "BOOKMARK" and any(name == "d" for _, name, _, _ in events)

    watching = asyncio.create_task(
        timed_events(
            core,
            bookmark_after_d,
            allow_watch_bookmarks=True,
            resource_version=listed.metadata.resource_version,
        )
    )
    for name in ("b", "c", "d"):
        last = await core.create_namespaced_pod(NAMESPACE, pod(name))
    seen = await watching

    assert [name for kind, name, _, _ in seen if kind != "BOOKMARK"] == ["b", "c", "d"]
    for index, (kind, _, version, _) in enumerate(seen):
        if kind == "BOOKMARK":
            held_back = [later for k, _, later, _ in seen[index + 1 :] if k != "BOOKMARK"]
            assert all(later > version for later in held_back), seen
    assert seen[-1][2] == int(last.metadata.resource_version)


async def test_a_pod_stored_as_admitted_is_defaulted_watched_and_timed_like_a_created_one(
    api: ApiServer, core: Any
) -> None:
    listed = await core.list_namespaced_pod(NAMESPACE)
    stream = watch.Watch().stream(
        core.list_namespaced_pod,
        NAMESPACE,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=5,
    )
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "burst-1"},
        "spec": {"containers": [{"name": "main", "image": "busybox"}], "schedulingGates": [{"name": "g"}]},
    }
    before = anyio.current_time()
    stored = api.store_admitted(NAMESPACE, manifest)
    assert stored["metadata"]["uid"] and stored["metadata"]["creationTimestamp"]
    assert before <= api.pods_created_at[f"{NAMESPACE}/burst-1"] <= anyio.current_time()
    with anyio.fail_after(5):
        async for event in stream:
            assert (event["type"], event["object"].metadata.name) == ("ADDED", "burst-1")
            assert event["object"].spec.scheduling_gates[0].name == "g"
            break
    with pytest.raises(ValueError, match="takes a Pod"):
        api.store_admitted(NAMESPACE, {"kind": "Node", "metadata": {"name": "n"}})
