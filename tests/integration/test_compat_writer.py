"""Compatibility mode against the API emulator, with the real kubernetes-asyncio client.

The writer keeps one key per node in the device-plugin ConfigMap (exact keys, never by prefix),
replaces it compare-and-set (a stale resourceVersion is retried), flips the node's
`nvidia.com/device-plugin.config` label only after reading the key back, writes mpsflow's sharing
labels and nos status annotations (removing stale ones) and GFD's sharing labels only when asked,
skips a node that does not exist, and never lets one node's failure stop the others. The last
tests run it inside the config publisher, on a real nats-server: only nodes whose rendering
changed cost a request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from events import subjects
from events.bus import Delivery
from events.envelope import decode
from events.jetstream import EventBus
from events.plans import NodeLayout, NodePlanned, SliceSpec
from events.vocabulary import (
    DEVICE_PLUGIN_CONFIG_LABEL,
    GFD_REPLICAS_LABEL,
    GFD_SHARING_STRATEGY_LABEL,
    NOS_DEVICE_PLUGIN_CONFIGMAP,
    REPLICAS_LABEL,
    SHARING_STRATEGY_LABEL,
)
from services.cli import build_parser
from services.config_publisher.kube_writer import CompatibilityWriter, parse_configmap
from services.config_publisher.render import (
    key_owner,
    render_node,
)
from services.config_publisher.service import ConfigPublisherService
from services.kit.retry import CONFLICT, Backoff
from simulation.apiserver import ApiServer, RequestRecord
from tests.unit.test_render import fork_schema_problems

pytestmark = pytest.mark.anyio

NAMESPACE, CONFIGMAP = NOS_DEVICE_PLUGIN_CONFIGMAP


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server:
        yield server


@pytest.fixture
async def kube(api: ApiServer) -> AsyncIterator[client.ApiClient]:
    async with client.ApiClient(client.Configuration(host=api.url)) as api_client:
        yield api_client


@pytest.fixture
def core(kube: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(kube)


FAST_CONFLICTS = Backoff(first=0.001, longest=0.001, attempts=CONFLICT.attempts)
"""The writer's compare-and-set schedule, as many attempts but no time to speak of."""


def compat_writer(
    kube: client.ApiClient, *, configmap: bool = True, gfd_labels: bool = False
) -> CompatibilityWriter:
    if configmap:
        return CompatibilityWriter(
            kube, NAMESPACE, CONFIGMAP, gfd_labels=gfd_labels, conflicts=FAST_CONFLICTS
        )
    return CompatibilityWriter(kube, gfd_labels=gfd_labels, conflicts=FAST_CONFLICTS)


def layout(*gpus: tuple[int, ...], used: int = 0) -> NodeLayout:
    """GPU i gets the sizes of `gpus[i]`; the first `used` slices of GPU 0 are used."""
    return NodeLayout(
        gpus={
            index: tuple(
                SliceSpec(size_gb=size, used=index == 0 and n < used) for n, size in enumerate(sizes)
            )
            for index, sizes in enumerate(gpus)
        }
    )


async def add_node(
    core: client.CoreV1Api,
    name: str,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> None:
    metadata = client.V1ObjectMeta(name=name, labels=labels, annotations=annotations)
    await core.create_node(client.V1Node(metadata=metadata))


def configmap_data(api: ApiServer) -> dict[str, str]:
    found = [c for c in api.objects("configmaps", NAMESPACE) if c["metadata"]["name"] == CONFIGMAP]
    assert len(found) == 1
    data: dict[str, str] = found[0].get("data") or {}
    return data


def node_metadata(api: ApiServer, name: str) -> tuple[dict[str, str], dict[str, str]]:
    (node,) = [n for n in api.objects("nodes") if n["metadata"]["name"] == name]
    return node["metadata"].get("labels") or {}, node["metadata"].get("annotations") or {}


def requests(api: ApiServer, since: int = 0) -> list[tuple[str, str]]:
    """(verb, resource) of every request from index `since` of the log."""
    return [(r.verb, r.resource) for r in api.request_log[since:]]


def writes(records: list[RequestRecord]) -> list[tuple[str, str]]:
    return [(r.verb, r.resource) for r in records if r.verb in ("create", "update", "patch", "delete")]


async def write_ok(writer: CompatibilityWriter, layouts: Mapping[str, NodeLayout], version: int) -> None:
    assert await writer.write(layouts, version) == {}


# --- the ConfigMap ------------------------------------------------------------------------------


async def test_the_configmap_is_created_with_one_key_per_node_in_the_forks_schema(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    layouts = {"gpu-a": layout((10, 10, 20), (40,), used=1), "gpu-b": layout((5, 5, 5, 5))}
    for name in layouts:
        await add_node(core, name)

    await write_ok(compat_writer(kube), layouts, version=1)

    data = configmap_data(api)
    assert sorted(data) == sorted(render_node(n, layout_).config_key for n, layout_ in layouts.items())
    for name, node_layout in layouts.items():
        rendering = render_node(name, node_layout)
        parsed = yaml.safe_load(data[rendering.config_key])
        assert fork_schema_problems(parsed) == []
        resources = parsed["sharing"]["mps"]["resources"]
        assert {(r["devices"][0], r["memoryGB"], r["replicas"]) for r in resources} == {
            (str(index), size, sizes.count(size))
            for index, specs in node_layout.gpus.items()
            for sizes in [[s.size_gb for s in specs]]
            for size in sizes
        }
        labels, _ = node_metadata(api, name)
        assert labels[DEVICE_PLUGIN_CONFIG_LABEL] == rendering.config_key


async def test_a_second_nodes_write_keeps_the_first_nodes_key(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    writer = compat_writer(kube)
    await add_node(core, "gpu-a")
    await add_node(core, "gpu-b")
    await write_ok(writer, {"gpu-a": layout((10, 10))}, version=1)
    await write_ok(writer, {"gpu-b": layout((20,))}, version=2)

    assert sorted(configmap_data(api)) == sorted(
        [render_node("gpu-a", layout((10, 10))).config_key, render_node("gpu-b", layout((20,))).config_key]
    )


async def test_node_1_never_touches_the_keys_of_node_10_or_anyone_else(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    foreign = {"default": "version: v1\n", "node-1-1700000000": "written by nos\n"}
    await core.create_namespaced_config_map(
        NAMESPACE,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name=CONFIGMAP, namespace=NAMESPACE), data=foreign),
    )
    writer = compat_writer(kube)
    for name in ("node-1", "node-10", "node-11"):
        await add_node(core, name)
    await write_ok(writer, {"node-10": layout((10,)), "node-11": layout((20,))}, version=1)
    others = {key: text for key, text in configmap_data(api).items()}

    for version, sizes in enumerate([(5,), (5, 5), (40,)], start=2):
        await write_ok(writer, {"node-1": layout(sizes)}, version=version)
        data = configmap_data(api)
        mine = render_node("node-1", layout(sizes))
        assert {key: text for key, text in data.items() if key_owner(key) != "node-1"} == others
        assert [key for key in data if key_owner(key) == "node-1"] == [mine.config_key]
        assert data[mine.config_key] == mine.config_yaml


async def test_an_injected_conflict_on_the_configmap_replace_is_retried(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    writer = compat_writer(kube)
    await add_node(core, "gpu-a")
    await write_ok(writer, {"gpu-a": layout((10,))}, version=1)
    start = len(api.request_log)
    api.fail_next("update", "configmaps", 409)

    await write_ok(writer, {"gpu-a": layout((20,))}, version=2)

    assert requests(api, start).count(("update", "configmaps")) == 3  # conflict, retry, old key removed
    assert list(configmap_data(api)) == [render_node("gpu-a", layout((20,))).config_key]


async def test_a_write_between_read_and_replace_is_retried_and_kept(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer changes the ConfigMap right after our read: our replace carries a stale
    resourceVersion, the API answers 409, and the retry keeps the other writer's key."""
    writer = compat_writer(kube)
    await add_node(core, "gpu-a")
    await add_node(core, "gpu-b")
    await write_ok(writer, {"gpu-b": layout((10,))}, version=1)
    real_read = writer.core.read_namespaced_config_map
    raced: list[bool] = []

    async def racing_read(name: str, namespace: str, **kwargs: Any) -> client.V1ConfigMap:
        found = await real_read(name, namespace, **kwargs)
        if not raced:
            raced.append(True)
            await core.patch_namespaced_config_map(name, namespace, {"data": {"other_0123456789": "x"}})
        return found

    monkeypatch.setattr(writer.core, "read_namespaced_config_map", racing_read)
    start = len(api.request_log)

    await write_ok(writer, {"gpu-a": layout((20,))}, version=2)

    assert requests(api, start)[:5] == [
        ("get", "nodes"),
        ("get", "configmaps"),
        ("patch", "configmaps"),  # the other writer
        ("update", "configmaps"),  # stale: 409
        ("get", "configmaps"),
    ]
    assert sorted(configmap_data(api)) == sorted(
        [
            "other_0123456789",
            render_node("gpu-a", layout((20,))).config_key,
            render_node("gpu-b", layout((10,))).config_key,
        ]
    )


async def test_a_configmap_created_by_someone_else_meanwhile_is_read_again(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    await add_node(core, "gpu-a")
    api.fail_next("create", "configmaps", 409)

    await write_ok(compat_writer(kube), {"gpu-a": layout((10,))}, version=1)

    assert requests(api)[2:6] == [
        ("get", "configmaps"),
        ("create", "configmaps"),  # 409 AlreadyExists
        ("get", "configmaps"),
        ("create", "configmaps"),
    ]
    assert list(configmap_data(api)) == [render_node("gpu-a", layout((10,))).config_key]


async def test_a_configmap_that_keeps_changing_fails_its_nodes_after_bounded_attempts(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    writer = compat_writer(kube)
    await add_node(core, "gpu-a")
    await write_ok(writer, {"gpu-a": layout((10,))}, version=1)
    assert writer.conflicts.attempts is not None
    for _ in range(writer.conflicts.attempts):
        api.fail_next("update", "configmaps", 409)

    failures = await writer.write({"gpu-a": layout((20,))}, version=2)

    assert list(failures) == ["gpu-a"] and "kept changing" in failures["gpu-a"]
    labels, _ = node_metadata(api, "gpu-a")
    assert labels[DEVICE_PLUGIN_CONFIG_LABEL] == render_node("gpu-a", layout((10,))).config_key
    await write_ok(writer, {"gpu-a": layout((20,))}, version=2)  # a failed node is written next time
    labels, _ = node_metadata(api, "gpu-a")
    assert labels[DEVICE_PLUGIN_CONFIG_LABEL] == render_node("gpu-a", layout((20,))).config_key


# --- order ----------------------------------------------------------------------------------------


async def test_the_label_flips_only_after_the_configmap_read_back_holds_the_key(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    writer = compat_writer(kube)
    await add_node(core, "gpu-a")
    await write_ok(writer, {"gpu-a": layout((10,))}, version=1)
    start = len(api.request_log)

    await write_ok(writer, {"gpu-a": layout((10, 10))}, version=2)

    assert requests(api, start) == [
        ("get", "nodes"),
        ("get", "configmaps"),
        ("update", "configmaps"),  # the new key beside the one the label still selects
        ("get", "configmaps"),  # read back: the key is there
        ("patch", "nodes"),  # the label flip
        ("get", "configmaps"),
        ("update", "configmaps"),  # the previous key removed
    ]


async def test_no_label_flip_when_the_configmap_cannot_be_written(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    await add_node(core, "gpu-a")
    api.fail_next("create", "configmaps", 403)

    failures = await compat_writer(kube).write({"gpu-a": layout((10,))}, version=1)

    assert list(failures) == ["gpu-a"] and "403" in failures["gpu-a"]
    assert ("patch", "nodes") not in requests(api)
    labels, _ = node_metadata(api, "gpu-a")
    assert DEVICE_PLUGIN_CONFIG_LABEL not in labels


# --- labels and annotations --------------------------------------------------------------------


async def test_labels_and_status_annotations_are_written_and_stale_ones_removed(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    await add_node(
        core,
        "gpu-a",
        labels={"nos.nebuly.com/gpu-partitioning": "mps", REPLICAS_LABEL: "9"},
        annotations={
            "nos.nebuly.com/status-gpu-3-7gb-free": "1",
            "nos.nebuly.com/status-gpu-0-10gb-used": "5",
            "example.com/owner": "team-a",
        },
    )

    await write_ok(compat_writer(kube), {"gpu-a": layout((10, 10, 20), (40,), used=2)}, version=1)

    labels, annotations = node_metadata(api, "gpu-a")
    assert labels == {
        "nos.nebuly.com/gpu-partitioning": "mps",
        SHARING_STRATEGY_LABEL: "mps",
        REPLICAS_LABEL: "3",
        DEVICE_PLUGIN_CONFIG_LABEL: render_node("gpu-a", layout((10, 10, 20), (40,))).config_key,
    }
    assert annotations == {
        "example.com/owner": "team-a",
        "nos.nebuly.com/status-gpu-0-10gb-used": "2",
        "nos.nebuly.com/status-gpu-0-20gb-free": "1",
        "nos.nebuly.com/status-gpu-1-40gb-free": "1",
    }


async def test_usage_changes_only_the_status_annotations(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    writer = compat_writer(kube)
    await add_node(core, "gpu-a")
    await write_ok(writer, {"gpu-a": layout((10, 10), used=0)}, version=1)
    labels_before, _ = node_metadata(api, "gpu-a")
    data_before = configmap_data(api)
    start = len(api.request_log)

    await write_ok(writer, {"gpu-a": layout((10, 10), used=1)}, version=2)

    assert writes(api.request_log[start:]) == [("patch", "nodes")]
    labels, annotations = node_metadata(api, "gpu-a")
    assert labels == labels_before and configmap_data(api) == data_before
    assert annotations == {
        "nos.nebuly.com/status-gpu-0-10gb-used": "1",
        "nos.nebuly.com/status-gpu-0-10gb-free": "1",
    }


async def test_labels_only_mode_never_touches_a_configmap(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    await add_node(core, "gpu-a")

    await write_ok(compat_writer(kube, configmap=False), {"gpu-a": layout((20, 20))}, version=1)

    assert requests(api) == [("create", "nodes"), ("get", "nodes"), ("patch", "nodes")]
    labels, annotations = node_metadata(api, "gpu-a")
    assert labels == {SHARING_STRATEGY_LABEL: "mps", REPLICAS_LABEL: "2"}
    assert annotations == {"nos.nebuly.com/status-gpu-0-20gb-free": "2"}


async def test_gfds_labels_are_left_to_gfd_unless_asked(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    """GPU Feature Discovery keeps `nvidia.com/gpu.sharing-strategy` and `nvidia.com/gpu.replicas` to
    its own values: by default the writer neither writes nor removes them; `--gfd-labels` mirrors
    mpsflow's sharing labels there, for nodes where GFD does not write them."""
    gfd = {GFD_SHARING_STRATEGY_LABEL: "none", GFD_REPLICAS_LABEL: "1", "nvidia.com/gpu.product": "A100"}
    await add_node(core, "gpu-a", labels=gfd)
    await add_node(core, "gpu-b")

    await write_ok(compat_writer(kube, configmap=False), {"gpu-a": layout((20, 20))}, version=1)
    await write_ok(
        compat_writer(kube, configmap=False, gfd_labels=True), {"gpu-b": layout((20, 20))}, version=1
    )

    assert node_metadata(api, "gpu-a")[0] == {**gfd, SHARING_STRATEGY_LABEL: "mps", REPLICAS_LABEL: "2"}
    assert node_metadata(api, "gpu-b")[0] == {
        SHARING_STRATEGY_LABEL: "mps",
        REPLICAS_LABEL: "2",
        GFD_SHARING_STRATEGY_LABEL: "mps",
        GFD_REPLICAS_LABEL: "2",
    }


async def test_a_refused_node_write_is_logged_with_the_api_servers_reason(
    api: ApiServer,
    kube: client.ApiClient,
    core: client.CoreV1Api,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An admission policy's refusal (k8s/base/config-publisher-policy.yaml) names the rule broken in
    the Status message: the failure and the log carry it."""
    await add_node(core, "gpu-a")
    writer = compat_writer(kube, configmap=False, gfd_labels=True)
    message = (
        "nodes \"gpu-a\" is forbidden: ValidatingAdmissionPolicy 'mpsflow-config-publisher-node-writes' "
        "denied request: the config publisher may change only the node labels ..."
    )

    async def refuse(*args: Any, **kwargs: Any) -> None:
        refused = ApiException(status=422, reason="Unprocessable Entity")
        refused.body = json.dumps(
            {"kind": "Status", "status": "Failure", "message": message, "code": 422}
        ).encode()
        raise refused

    monkeypatch.setattr(writer.core, "patch_node", refuse)
    with caplog.at_level(logging.WARNING):
        failures = await writer.write({"gpu-a": layout((10,))}, version=1)

    assert failures == {"gpu-a": f"patching the node: API answered 422 Unprocessable Entity: {message}"}
    assert message in caplog.text


async def test_a_conflict_on_the_node_patch_is_retried_after_a_fresh_read(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    await add_node(core, "gpu-a")
    api.fail_next("patch", "nodes", 409)

    await write_ok(compat_writer(kube, configmap=False), {"gpu-a": layout((20,))}, version=1)

    assert requests(api)[1:] == [("get", "nodes"), ("patch", "nodes"), ("get", "nodes"), ("patch", "nodes")]
    assert node_metadata(api, "gpu-a")[0][REPLICAS_LABEL] == "1"


# --- one node never stops the others -----------------------------------------------------------


async def test_a_missing_node_is_skipped_and_the_others_are_written(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api, caplog: pytest.LogCaptureFixture
) -> None:
    await add_node(core, "gpu-a")
    await add_node(core, "gpu-c")
    layouts = {"gpu-a": layout((10,)), "gpu-b": layout((20,)), "gpu-c": layout((40,))}

    with caplog.at_level(logging.WARNING):
        await write_ok(compat_writer(kube), layouts, version=1)

    assert "node gpu-b: not found" in caplog.text
    assert sorted(configmap_data(api)) == sorted(
        render_node(name, layouts[name]).config_key for name in ("gpu-a", "gpu-c")
    )
    for name in ("gpu-a", "gpu-c"):
        labels, _ = node_metadata(api, name)
        assert labels[DEVICE_PLUGIN_CONFIG_LABEL] == render_node(name, layouts[name]).config_key


async def test_a_failing_node_does_not_stop_the_others_and_is_retried_next_time(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api
) -> None:
    writer = compat_writer(kube)
    layouts = {"gpu-a": layout((10,)), "gpu-b": layout((20,))}
    for name in layouts:
        await add_node(core, name)
    api.fail_next("patch", "nodes", 500)

    failures = await writer.write(layouts, version=1)

    assert list(failures) == ["gpu-a"] and "500" in failures["gpu-a"]
    assert DEVICE_PLUGIN_CONFIG_LABEL in node_metadata(api, "gpu-b")[0]
    assert DEVICE_PLUGIN_CONFIG_LABEL not in node_metadata(api, "gpu-a")[0]
    start = len(api.request_log)
    await write_ok(writer, layouts, version=1)
    assert [r.path for r in api.request_log[start:] if r.resource == "nodes"] == [
        "/api/v1/nodes/gpu-a",
        "/api/v1/nodes/gpu-a",
    ]
    assert (
        node_metadata(api, "gpu-a")[0][DEVICE_PLUGIN_CONFIG_LABEL]
        == render_node("gpu-a", layouts["gpu-a"]).config_key
    )


async def test_an_unreachable_api_fails_the_batch_at_once_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = ApiServer()
    url = await server.start()
    await server.stop()  # nothing listens there any more
    async with client.ApiClient(client.Configuration(host=url)) as unreachable:
        writer = compat_writer(unreachable)
        with caplog.at_level(logging.WARNING):
            first = await writer.write({"gpu-a": layout((10,)), "gpu-b": layout((20,))}, version=1)
            second = await writer.write({"gpu-a": layout((10,)), "gpu-b": layout((20,))}, version=2)
    assert sorted(first) == sorted(second) == ["gpu-a", "gpu-b"]
    assert all("unreachable" in reason for reason in [*first.values(), *second.values()])
    assert caplog.text.count("Kubernetes API unreachable") == 1


async def test_configmap_references_and_modes_are_checked(kube: client.ApiClient) -> None:
    assert parse_configmap("mpsflow/nos-device-plugin-configs") == ("mpsflow", "nos-device-plugin-configs")
    for bad in ("nos-device-plugin-configs", "/name", "ns/", "a/b/c"):
        with pytest.raises(ValueError, match="NAMESPACE/NAME"):
            parse_configmap(bad)
    with pytest.raises(ValueError, match="both"):
        CompatibilityWriter(kube, NAMESPACE)
    with pytest.raises(ValueError, match="nothing to write"):
        CompatibilityWriter(kube, node_labels=False)
    with pytest.raises(ValueError, match="beside the node labels"):
        CompatibilityWriter(kube, NAMESPACE, CONFIGMAP, node_labels=False, gfd_labels=True)


@pytest.mark.parametrize(
    ("flags", "configmap", "node_labels", "gfd_labels"),
    [
        ([], None, True, False),
        (["--compat-configmap"], NOS_DEVICE_PLUGIN_CONFIGMAP, True, False),
        (["--compat-configmap", "gpu-ops/plugin-configs"], ("gpu-ops", "plugin-configs"), True, False),
        (["--compat-configmap", "--gfd-labels"], NOS_DEVICE_PLUGIN_CONFIGMAP, True, True),
        (["--no-node-labels", "--compat-configmap"], NOS_DEVICE_PLUGIN_CONFIGMAP, False, False),
    ],
    ids=["default", "nos-configmap", "other-configmap", "gfd-labels", "configmap-only"],
)
def test_the_config_publishers_flags(
    flags: list[str], configmap: tuple[str, str] | None, node_labels: bool, gfd_labels: bool
) -> None:
    """`--compat-configmap` without a value is nos's ConfigMap, where nebuly's plugin reads it."""
    args = build_parser().parse_args(["run", "config-publisher", *flags])
    assert (args.compat_configmap, args.node_labels, args.gfd_labels) == (configmap, node_labels, gfd_labels)


def test_gfd_labels_need_the_node_labels(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "config-publisher", "--no-node-labels", "--gfd-labels"])
    assert "not allowed with argument" in capsys.readouterr().err


# --- inside the config publisher ----------------------------------------------------------------


def plan(plan_id: str, layouts: Mapping[str, NodeLayout]) -> list[NodePlanned]:
    """What the planner asks of each node for a plan."""
    return [NodePlanned(node=node, plan_id=plan_id, layout=asked) for node, asked in sorted(layouts.items())]


async def handle(service: ConfigPublisherService, bus: EventBus, asks: list[NodePlanned]) -> None:
    """Publishes each ask and hands its message to the service, as its consumer would."""
    for asked in asks:
        subject = subjects.planned_subject(asked.node)
        sequence = await bus.publish(subject, asked, message_id=f"{asked.node}/{asked.plan_id}")
        stored = await bus.js.get_msg(subjects.STREAM, sequence)
        assert stored.data is not None
        await service.handle(Delivery(decode(stored.data), subject, {}, sequence, 1, 0))
    await service.write_kubernetes()


async def test_the_publisher_writes_only_nodes_whose_rendering_changed(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api, bus: EventBus
) -> None:
    service = ConfigPublisherService(bus, compat_writer(kube))
    first = {"gpu-a": layout((10, 10)), "gpu-b": layout((20,))}
    for name in first:
        await add_node(core, name)

    await handle(service, bus, plan("plan-1", first))
    assert sorted(configmap_data(api)) == sorted(render_node(n, lo).config_key for n, lo in first.items())
    start = len(api.request_log)
    await handle(service, bus, plan("plan-2", first))  # the same layouts again: no request at all
    assert requests(api, start) == []
    await handle(service, bus, plan("plan-3", {**first, "gpu-b": layout((20, 20))}))

    assert {r.path for r in api.request_log[start:] if r.resource == "nodes"} == {"/api/v1/nodes/gpu-b"}
    labels, _ = node_metadata(api, "gpu-b")
    assert labels[DEVICE_PLUGIN_CONFIG_LABEL] == render_node("gpu-b", layout((20, 20))).config_key
    assert await (await bus.node_configs()).get(subjects.node_config_key("gpu-b")) is not None


async def test_the_publisher_writes_kv_first_and_retries_a_failed_compat_write(
    api: ApiServer, kube: client.ApiClient, core: client.CoreV1Api, bus: EventBus
) -> None:
    service = ConfigPublisherService(bus, compat_writer(kube))
    await add_node(core, "gpu-a")
    event = plan("plan-1", {"gpu-a": layout((10,))})
    api.fail_next("get", "nodes", 503)

    await handle(service, bus, event)  # the KV is written; the Kubernetes write failed and stays due
    kv = await bus.node_configs()
    assert await kv.get(subjects.node_config_key("gpu-a")) is not None
    assert DEVICE_PLUGIN_CONFIG_LABEL not in node_metadata(api, "gpu-a")[0]

    assert await service.write_kubernetes() == {}  # the retry
    assert (
        node_metadata(api, "gpu-a")[0][DEVICE_PLUGIN_CONFIG_LABEL]
        == render_node("gpu-a", layout((10,))).config_key
    )
