"""Rendering a node's layout for nebuly's device-plugin fork and GPU Operator users.

Tables pin the formats (the fork's config, the ConfigMap key, the labels, nos's status
annotations, the node metadata patch; GFD's labels only when asked); a Hypothesis property checks
that every rendered config parses back as YAML and satisfies the fork's schema rules, and that
every key is a valid label value owned by exactly its node. `fork_schema_problems` is the schema
oracle, written from the fork's rules (docs/nos-compatibility.md §2.3) rather than from the renderer;
the integration tests use it too.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from events.plans import NodeLayout, SliceSpec
from events.vocabulary import (
    DEVICE_PLUGIN_CONFIG_LABEL,
    GFD_REPLICAS_LABEL,
    GFD_SHARING_STRATEGY_LABEL,
    REPLICAS_LABEL,
    SHARING_STRATEGY_LABEL,
)
from services.config_publisher.render import (
    device_plugin_config,
    key_owner,
    metadata_patch,
    owner_tag,
    render_node,
    sharing_labels,
    status_annotations,
)

LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
CONFIGMAP_KEY = re.compile(r"[-._a-zA-Z0-9]+")
NODE_NAME = r"[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?){0,3}"
DEVICE_REF = re.compile(r"[0-9]+|[0-9]+:[0-9]+|(GPU|MIG)-[0-9a-fA-F-]+")
RESOURCE_NAME = re.compile(r"(nvidia\.com/)?[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MPS_RESOURCE_FIELDS = ("name", "rename", "memoryGB", "replicas", "devices")


def fork_schema_problems(config: Any) -> list[str]:
    """What the fork's `config/v1` would refuse in a parsed device-plugin config (empty: none).

    MPS resources must be non-empty, each with `name`, `rename`, `memoryGB`, `replicas` and
    `devices`; MPS and time-slicing resources exclude each other."""
    if not isinstance(config, dict):
        return ["the config is not a mapping"]
    problems = []
    if config.get("version") != "v1":
        problems.append(f"version is {config.get('version')!r}, not 'v1'")
    flags = config.get("flags")
    if not isinstance(flags, dict) or flags.get("migStrategy") not in ("none", "single", "mixed"):
        problems.append(f"flags.migStrategy missing or invalid: {flags!r}")
    sharing = config.get("sharing")
    if sharing is None:
        return problems
    if not isinstance(sharing, dict) or set(sharing) - {"mps", "timeSlicing"}:
        return [*problems, f"sharing is not a mapping of mps/timeSlicing: {sharing!r}"]
    mps = sharing.get("mps")
    if not isinstance(mps, dict):
        return [*problems, "sharing.mps is missing"]
    if sharing.get("timeSlicing", {}).get("resources"):
        problems.append("time-slicing resources beside MPS resources")
    if not isinstance(mps.get("failRequestsGreaterThanOne", False), bool):
        problems.append("failRequestsGreaterThanOne is not a boolean")
    resources = mps.get("resources")
    if not isinstance(resources, list) or not resources:
        return [*problems, "no resources specified"]
    for number, resource in enumerate(resources):
        where = f"resources[{number}]"
        if not isinstance(resource, dict):
            problems.append(f"{where} is not a mapping")
            continue
        problems += [f"{where}.{field} missing" for field in MPS_RESOURCE_FIELDS if field not in resource]
        for field in ("name", "rename"):
            if field in resource and not RESOURCE_NAME.fullmatch(str(resource[field])):
                problems.append(f"{where}.{field} is not a resource name: {resource[field]!r}")
        for field in ("memoryGB", "replicas"):
            value = resource.get(field)
            if field in resource and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{where}.{field} is not a positive integer: {value!r}")
        devices = resource.get("devices")
        if "devices" in resource and (
            not isinstance(devices, list)
            or not devices
            or not all(isinstance(d, str) and DEVICE_REF.fullmatch(d) for d in devices)
        ):
            problems.append(f"{where}.devices is not a list of GPU references: {devices!r}")
    return problems


def layout(gpus: dict[int, list[tuple[int, bool]]]) -> NodeLayout:
    return NodeLayout(
        gpus={
            index: tuple(SliceSpec(size_gb=size, used=used) for size, used in slices)
            for index, slices in gpus.items()
        }
    )


A100 = layout({0: [(10, True), (10, False), (10, False), (20, True)], 1: [(40, False)]})


# --- the fork's config --------------------------------------------------------------------------


def test_one_resource_per_gpu_and_size_in_the_forks_schema() -> None:
    rendering = render_node("gpu-a", A100)
    parsed = yaml.safe_load(rendering.config_yaml)
    assert parsed == {
        "version": "v1",
        "flags": {"migStrategy": "none"},
        "sharing": {
            "mps": {
                "failRequestsGreaterThanOne": True,
                "resources": [
                    {
                        "name": "nvidia.com/gpu",
                        "rename": "nvidia.com/gpu-10gb",
                        "memoryGB": 10,
                        "replicas": 3,
                        "devices": ["0"],
                    },
                    {
                        "name": "nvidia.com/gpu",
                        "rename": "nvidia.com/gpu-20gb",
                        "memoryGB": 20,
                        "replicas": 1,
                        "devices": ["0"],
                    },
                    {
                        "name": "nvidia.com/gpu",
                        "rename": "nvidia.com/gpu-40gb",
                        "memoryGB": 40,
                        "replicas": 1,
                        "devices": ["1"],
                    },
                ],
            }
        },
    }
    assert fork_schema_problems(parsed) == []


def test_devices_are_quoted_strings_in_the_yaml() -> None:
    assert "- '0'" in render_node("gpu-a", A100).config_yaml


@pytest.mark.parametrize(
    "empty", [layout({}), layout({0: []}), layout({0: [], 1: []})], ids=["no GPU", "1 GPU", "2 GPUs"]
)
def test_a_node_without_slices_gets_a_config_without_sharing(empty: NodeLayout) -> None:
    """The fork refuses an MPS block without resources ("no resources specified")."""
    parsed = yaml.safe_load(render_node("gpu-a", empty).config_yaml)
    assert parsed == {"version": "v1", "flags": {"migStrategy": "none"}}
    assert fork_schema_problems(parsed) == []


def test_a_gpu_without_slices_gets_no_resource() -> None:
    config = device_plugin_config(layout({0: [], 1: [(5, False)], 3: [(5, False), (5, True)]}))
    assert [(r["devices"], r["replicas"]) for r in config["sharing"]["mps"]["resources"]] == [
        (["1"], 1),
        (["3"], 2),
    ]


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (
            {"version": "v1", "flags": {"migStrategy": "none"}, "sharing": {"mps": {"resources": []}}},
            "no resources",
        ),
        ({"version": "v1", "flags": {"migStrategy": "none"}, "sharing": {"mps": {}}}, "no resources"),
        (
            {
                "version": "v1",
                "flags": {"migStrategy": "none"},
                "sharing": {"mps": {"resources": [{"name": "nvidia.com/gpu", "memoryGB": 1, "replicas": 1}]}},
            },
            "rename missing",
        ),
        (
            {
                "version": "v1",
                "flags": {"migStrategy": "none"},
                "sharing": {
                    "mps": {
                        "resources": [
                            {
                                "name": "nvidia.com/gpu",
                                "rename": "gpu-1gb",
                                "memoryGB": 1,
                                "replicas": 1,
                                "devices": [0],
                            }
                        ]
                    }
                },
            },
            "devices is not a list of GPU references",
        ),
        ({"version": "v2", "flags": {"migStrategy": "none"}}, "version"),
    ],
    ids=["empty resources", "no resources", "no rename", "integer device", "version"],
)
def test_the_schema_oracle_catches_what_the_fork_refuses(config: dict[str, Any], problem: str) -> None:
    assert any(problem in found for found in fork_schema_problems(config))


# --- keys ----------------------------------------------------------------------------------------


def test_the_key_is_the_node_and_a_digest_of_its_config() -> None:
    rendering = render_node("gpu-a", A100)
    assert re.fullmatch(r"gpu-a_[0-9a-f]{10}", rendering.config_key)
    assert key_owner(rendering.config_key) == "gpu-a" == owner_tag("gpu-a")


def test_the_key_changes_with_the_sizes_but_not_with_usage() -> None:
    base = render_node("gpu-a", layout({0: [(10, False), (20, False)]})).config_key
    assert render_node("gpu-a", layout({0: [(20, True), (10, True)]})).config_key == base
    assert render_node("gpu-a", layout({0: [(10, False), (10, False)]})).config_key != base
    assert render_node("gpu-b", layout({0: [(10, False), (20, False)]})).config_key != base


@pytest.mark.parametrize(
    ("key", "owner"),
    [
        ("node-1_0123456789", "node-1"),
        ("node-10_0123456789", "node-10"),
        ("gpu.example.com_abcdef0123", "gpu.example.com"),
        ("default", None),
        ("node-1-1700000000", None),  # nos's format: not ours, never touched
        ("node-1_0123", None),
        ("node-1_0123456789ab", None),
        ("node-1_ABCDEF0123", None),
        ("_0123456789", None),
    ],
)
def test_a_key_is_owned_by_exactly_one_node_or_none(key: str, owner: str | None) -> None:
    assert key_owner(key) == owner


def test_a_long_node_name_is_shortened_to_fit_a_label_value() -> None:
    long_a = "a" * 40 + ".compute.internal.example.com"
    long_b = "a" * 40 + ".compute.internal.example.org"
    key_a = render_node(long_a, A100).config_key
    key_b = render_node(long_b, A100).config_key
    assert len(key_a) <= 63 and LABEL_VALUE.fullmatch(key_a)
    assert key_owner(key_a) == owner_tag(long_a) != owner_tag(long_b) == key_owner(key_b)
    exactly = "b" * 52
    assert render_node(exactly, A100).config_key.startswith(f"{exactly}_")


# --- labels and annotations -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "strategy", "replicas"),
    [
        ({0: [(10, False)] * 4, 1: [(10, False)] * 4}, "mps", "4"),  # as GFD: per GPU, not per node
        ({0: [(10, False)] * 3, 1: [(40, True)]}, "mps", "3"),
        ({0: [(80, False)]}, "mps", "1"),
        ({0: [], 1: [(5, False), (5, False)]}, "mps", "2"),
        ({0: []}, "none", "1"),
        ({}, "none", "1"),
    ],
)
def test_sharing_labels(gpus: dict[int, list[tuple[int, bool]]], strategy: str, replicas: str) -> None:
    assert sharing_labels(layout(gpus)) == {SHARING_STRATEGY_LABEL: strategy, REPLICAS_LABEL: replicas}
    assert sharing_labels(layout(gpus), gfd_labels=True) == {
        SHARING_STRATEGY_LABEL: strategy,
        REPLICAS_LABEL: replicas,
        GFD_SHARING_STRATEGY_LABEL: strategy,
        GFD_REPLICAS_LABEL: replicas,
    }


def test_the_sharing_labels_are_mpsflows_own_keys_and_gfds_only_when_asked() -> None:
    """GPU Feature Discovery owns `nvidia.com/gpu.*` and rewrites them: by default nothing of it is
    rendered, so that mpsflow and GFD never write the same key."""
    assert SHARING_STRATEGY_LABEL.startswith("mpsflow.dev/") and REPLICAS_LABEL.startswith("mpsflow.dev/")
    plain = render_node("gpu-a", A100)
    assert set(plain.labels) == {SHARING_STRATEGY_LABEL, REPLICAS_LABEL}
    patch = metadata_patch(plain, {}, {}, config_label=True, node_labels=True)
    assert not [key for key in patch["labels"] if key.startswith("nvidia.com/gpu.")]
    mirrored = render_node("gpu-a", A100, gfd_labels=True)
    assert metadata_patch(mirrored, {}, {}, config_label=False, node_labels=True)["labels"] == {
        SHARING_STRATEGY_LABEL: "mps",
        REPLICAS_LABEL: "4",
        GFD_SHARING_STRATEGY_LABEL: "mps",
        GFD_REPLICAS_LABEL: "4",
    }
    assert mirrored.config_key == plain.config_key


def test_status_annotations_count_used_and_free_slices_per_gpu_and_size() -> None:
    assert status_annotations(A100) == {
        "nos.nebuly.com/status-gpu-0-10gb-free": "2",
        "nos.nebuly.com/status-gpu-0-10gb-used": "1",
        "nos.nebuly.com/status-gpu-0-20gb-used": "1",
        "nos.nebuly.com/status-gpu-1-40gb-free": "1",
    }
    assert status_annotations(layout({0: []})) == {}


def test_the_metadata_patch_sets_what_differs_and_removes_stale_status() -> None:
    rendering = render_node("gpu-a", A100)
    labels = {SHARING_STRATEGY_LABEL: "mps", "example.com/team": "a"}
    annotations = {
        "nos.nebuly.com/status-gpu-0-10gb-free": "2",
        "nos.nebuly.com/status-gpu-0-10gb-used": "7",
        "nos.nebuly.com/status-gpu-5-5gb-free": "1",
        "example.com/note": "kept",
    }
    assert metadata_patch(rendering, labels, annotations, config_label=True, node_labels=True) == {
        "labels": {REPLICAS_LABEL: "4", DEVICE_PLUGIN_CONFIG_LABEL: rendering.config_key},
        "annotations": {
            "nos.nebuly.com/status-gpu-0-10gb-used": "1",
            "nos.nebuly.com/status-gpu-0-20gb-used": "1",
            "nos.nebuly.com/status-gpu-1-40gb-free": "1",
            "nos.nebuly.com/status-gpu-5-5gb-free": None,
        },
    }


def test_the_metadata_patch_is_empty_when_nothing_differs() -> None:
    rendering = render_node("gpu-a", A100)
    labels = {**rendering.labels, DEVICE_PLUGIN_CONFIG_LABEL: rendering.config_key}
    annotations = dict(rendering.status_annotations)
    assert metadata_patch(rendering, labels, annotations, config_label=True, node_labels=True) == {}


def test_without_node_labels_only_the_config_label_is_written() -> None:
    rendering = render_node("gpu-a", A100)
    stale = {"nos.nebuly.com/status-gpu-5-5gb-free": "1"}
    assert metadata_patch(rendering, {}, stale, config_label=True, node_labels=False) == {
        "labels": {DEVICE_PLUGIN_CONFIG_LABEL: rendering.config_key}
    }
    assert metadata_patch(rendering, {}, {}, config_label=False, node_labels=True)["labels"] == dict(
        rendering.labels
    )


# --- properties ---------------------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> NodeLayout:
    slices = st.lists(st.builds(SliceSpec, size_gb=st.integers(1, 96), used=st.booleans()), max_size=12).map(
        tuple
    )
    return NodeLayout(gpus=draw(st.dictionaries(st.integers(0, 15), slices, max_size=8)))


@given(st.from_regex(NODE_NAME, fullmatch=True), layouts())
def test_every_rendered_config_parses_back_and_satisfies_the_forks_schema(
    node: str, node_layout: NodeLayout
) -> None:
    rendering = render_node(node, node_layout)
    parsed = yaml.safe_load(rendering.config_yaml)
    assert fork_schema_problems(parsed) == []
    assert parsed == device_plugin_config(node_layout)
    resources = parsed.get("sharing", {}).get("mps", {}).get("resources", [])
    seen = [(r["devices"][0], r["memoryGB"]) for r in resources]
    assert len(seen) == len(set(seen))
    for resource in resources:
        assert resource["rename"] == f"nvidia.com/gpu-{resource['memoryGB']}gb"
        assert len(resource["devices"]) == 1
    for index, slices in node_layout.gpus.items():
        assert sum(r["replicas"] for r in resources if r["devices"] == [str(index)]) == len(slices)
    assert len(rendering.config_key) <= 63
    assert LABEL_VALUE.fullmatch(rendering.config_key) and CONFIGMAP_KEY.fullmatch(rendering.config_key)
    assert key_owner(rendering.config_key) == owner_tag(node)
    counted = sum(int(count) for count in rendering.status_annotations.values())
    assert counted == sum(len(slices) for slices in node_layout.gpus.values())
