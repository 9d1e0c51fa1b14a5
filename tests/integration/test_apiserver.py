"""The Kubernetes API emulator, driven by the real `kubernetes_asyncio` client the services use.

These tests pin both the emulator's behaviour and the client's quirks that the services must
live with (how a watch reports a dropped connection or an expired resourceVersion, which key the
bearer token goes under, the Binding response the client cannot deserialize).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from simulation.apiserver import ApiServer

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
        async with watch.Watch() as pods:
            with pytest.raises(aiohttp.ClientPayloadError):  # not retried by the client, timeout or not
                async for _ in pods.stream(core.list_namespaced_pod, NAMESPACE, **extra):
                    api.drop_watches()


async def test_stop_ends_open_watches() -> None:
    server = ApiServer()
    async with client.ApiClient(client.Configuration(host=await server.start())) as api_client:
        pods_api = client.CoreV1Api(api_client)
        await pods_api.create_namespaced_pod(NAMESPACE, pod("a"))
        async with watch.Watch() as pods:
            async for _ in pods.stream(pods_api.list_namespaced_pod, NAMESPACE, timeout_seconds=5):
                await server.stop()  # the stream then ends cleanly


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
