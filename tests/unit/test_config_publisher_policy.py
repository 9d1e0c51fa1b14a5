"""The admission policy that confines the config publisher's node writes, evaluated offline.

k8s/base/config-publisher-policy.yaml is a ValidatingAdmissionPolicy; its schema is checked with every
manifest in test_manifests_schema.py. Here its CEL runs on cel-python (`celpy`) the way the API server
runs it: the match conditions on the request, then the variables in order (each sees those before it
as `variables`), then every validation, all on `request`, `object` (the node after the request) and
`oldObject` (before it). An expression that does not evaluate to true (an error included) refuses, as
`failurePolicy: Fail` does. What is not emulated: Kubernetes type-checks the expressions against the
Node schema when the policy is created, and compares lists of `x-kubernetes-list-type: map` (taints)
without regard to order; the expressions keep to what both accept (`has()`, no optional syntax).

The cases pin what it admits (the publisher's own keys, any change by anyone else) and refuses
(another label, an annotation outside `nos.nebuly.com/status-gpu`, the spec, taints, finalizers);
a property holds the writer's own merge patches, on nodes full of others' keys, to be admitted.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import celpy
import pytest
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError
from hypothesis import given, settings
from hypothesis import strategies as st

from events.plans import NodeLayout
from events.vocabulary import (
    DEVICE_PLUGIN_CONFIG_LABEL,
    GFD_REPLICAS_LABEL,
    GFD_SHARING_STRATEGY_LABEL,
    REPLICAS_LABEL,
    SHARING_STRATEGY_LABEL,
    STATUS_ANNOTATION_PREFIX,
)
from services.config_publisher.render import metadata_patch, render_node
from tests.unit.test_manifests import documents
from tests.unit.test_render import A100, layouts

POLICY_NAME = "mpsflow-config-publisher-node-writes"
PUBLISHER_ACCOUNT = ("mpsflow", "mpsflow-config-publisher")
PUBLISHER = "system:serviceaccount:{}:{}".format(*PUBLISHER_ACCOUNT)
Json = dict[str, Any]


def policy() -> Json:
    found = [d for d in documents() if d["kind"] == "ValidatingAdmissionPolicy"]
    assert [d["metadata"]["name"] for d in found] == [POLICY_NAME]
    return found[0]


ENVIRONMENT = celpy.Environment()
"""One for the module: creating one raises the recursion limit, which Hypothesis refuses to see
change while a test runs."""


@functools.cache
def _program(expression: str) -> celpy.Runner:
    return ENVIRONMENT.program(ENVIRONMENT.compile(expression))


def evaluate(expression: str, activation: Mapping[str, Any]) -> Any:
    """The value of a CEL expression, or the CELEvalError it ends in."""
    try:
        return _program(expression).evaluate(dict(activation))
    except CELEvalError as error:
        return error


def holds(expression: str, activation: Mapping[str, Any]) -> bool:
    """Whether the expression evaluates to true: false, another value or an error refuse."""
    value = evaluate(expression, activation)
    return isinstance(value, celtypes.BoolType) and bool(value)


def refusals(spec: Json, old: Json, new: Json, username: str = PUBLISHER) -> list[str]:
    """The messages of the validations an UPDATE of node `old` to `new` by `username` fails: empty
    when the policy admits it."""
    activation: dict[str, Any] = {
        "request": json_to_cel({"operation": "UPDATE", "userInfo": {"username": username}}),
        "object": json_to_cel(new),
        "oldObject": json_to_cel(old),
    }
    matches = [evaluate(c["expression"], activation) for c in spec["matchConditions"]]
    if errors := [str(m) for m in matches if not isinstance(m, celtypes.BoolType)]:
        return errors  # failurePolicy Fail: a condition that cannot be evaluated refuses
    if not all(matches):
        return []
    variables: dict[celtypes.StringType, Any] = {}
    for variable in spec["variables"]:
        scope = {**activation, "variables": celtypes.MapType(variables)}
        variables[celtypes.StringType(variable["name"])] = evaluate(variable["expression"], scope)
    activation["variables"] = celtypes.MapType(variables)
    return [v["message"] for v in spec["validations"] if not holds(v["expression"], activation)]


NODE: Json = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "gpu-1",
        "resourceVersion": "41",
        "labels": {
            "kubernetes.io/hostname": "gpu-1",
            "nos.nebuly.com/gpu-partitioning": "mps",
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
            GFD_SHARING_STRATEGY_LABEL: "none",
            GFD_REPLICAS_LABEL: "1",
            SHARING_STRATEGY_LABEL: "mps",
            REPLICAS_LABEL: "3",
        },
        "annotations": {
            "node.alpha.kubernetes.io/ttl": "0",
            f"{STATUS_ANNOTATION_PREFIX}-0-10gb-free": "3",
        },
    },
    "spec": {"podCIDR": "10.244.1.0/24", "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
    "status": {"capacity": {"nvidia.com/gpu-10gb": "3"}},
}
BARE_NODE: Json = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-2"}, "spec": {}}


def changed(node: Json, *changes: Callable[[Json], object]) -> Json:
    """A copy of `node` with each change applied to it."""
    new = copy.deepcopy(node)
    for change in changes:
        change(new)
    return new


def labels_of(node: Json) -> dict[str, str]:
    found: dict[str, str] = node["metadata"].setdefault("labels", {})
    return found


def annotations_of(node: Json) -> dict[str, str]:
    found: dict[str, str] = node["metadata"].setdefault("annotations", {})
    return found


ADMITTED: list[tuple[str, Json, Json]] = [
    ("nothing-changes", NODE, NODE),
    ("sharing-labels", NODE, changed(NODE, lambda n: labels_of(n).update({REPLICAS_LABEL: "4"}))),
    (
        "config-label",
        NODE,
        changed(NODE, lambda n: labels_of(n).update({DEVICE_PLUGIN_CONFIG_LABEL: "gpu-1_0123456789"})),
    ),
    ("own-label-removed", NODE, changed(NODE, lambda n: labels_of(n).pop(SHARING_STRATEGY_LABEL))),
    (
        "status-annotations",
        NODE,
        changed(
            NODE,
            lambda n: annotations_of(n).pop(f"{STATUS_ANNOTATION_PREFIX}-0-10gb-free"),
            lambda n: annotations_of(n).update({f"{STATUS_ANNOTATION_PREFIX}-0-20gb-used": "1"}),
        ),
    ),
    ("resource-version", NODE, changed(NODE, lambda n: n["metadata"].update({"resourceVersion": "42"}))),
    (
        "bare-node-gets-its-labels-and-annotations",
        BARE_NODE,
        changed(
            BARE_NODE,
            lambda n: labels_of(n).update({SHARING_STRATEGY_LABEL: "none", REPLICAS_LABEL: "1"}),
            lambda n: annotations_of(n).update({f"{STATUS_ANNOTATION_PREFIX}-0-5gb-free": "1"}),
        ),
    ),
    (
        "labels-emptied-to-none",
        changed(BARE_NODE, lambda n: labels_of(n).update({REPLICAS_LABEL: "1"})),
        BARE_NODE,
    ),
]

REFUSED: list[tuple[str, Json, Json, str]] = [
    (
        "another-label-changed",
        NODE,
        changed(NODE, lambda n: labels_of(n).update({"kubernetes.io/hostname": "x"})),
        "labels",
    ),
    ("another-label-added", NODE, changed(NODE, lambda n: labels_of(n).update({"team": "ml"})), "labels"),
    (
        "another-label-removed",
        NODE,
        changed(NODE, lambda n: labels_of(n).pop("nvidia.com/gpu.product")),
        "labels",
    ),
    (
        "opted-out",
        NODE,
        changed(NODE, lambda n: labels_of(n).pop("nos.nebuly.com/gpu-partitioning")),
        "labels",
    ),
    (
        "gfd-label",
        NODE,
        changed(NODE, lambda n: labels_of(n).update({GFD_SHARING_STRATEGY_LABEL: "mps"})),
        "labels",
    ),
    (
        "bare-node-other-label",
        BARE_NODE,
        changed(BARE_NODE, lambda n: labels_of(n).update({"a": "b"})),
        "labels",
    ),
    (
        "annotation-added",
        NODE,
        changed(NODE, lambda n: annotations_of(n).update({"example.com/owner": "me"})),
        "annotations",
    ),
    (
        "annotation-changed",
        NODE,
        changed(NODE, lambda n: annotations_of(n).update({"node.alpha.kubernetes.io/ttl": "5"})),
        "annotations",
    ),
    (
        "annotation-removed",
        NODE,
        changed(NODE, lambda n: annotations_of(n).pop("node.alpha.kubernetes.io/ttl")),
        "annotations",
    ),
    (
        "nos-annotation-outside-the-prefix",
        NODE,
        changed(NODE, lambda n: annotations_of(n).update({"nos.nebuly.com/spec-gpu-0-10gb": "1"})),
        "annotations",
    ),
    ("cordoned", NODE, changed(NODE, lambda n: n["spec"].update({"unschedulable": True})), "spec"),
    (
        "taint-added",
        NODE,
        changed(NODE, lambda n: n["spec"]["taints"].append({"key": "x", "effect": "NoExecute"})),
        "spec",
    ),
    ("taints-removed", NODE, changed(NODE, lambda n: n["spec"].pop("taints")), "spec"),
    ("pod-cidr", NODE, changed(NODE, lambda n: n["spec"].update({"podCIDR": "10.0.0.0/8"})), "spec"),
    (
        "finalizer",
        NODE,
        changed(NODE, lambda n: n["metadata"].update({"finalizers": ["example.com/keep"]})),
        "finalizers",
    ),
    (
        "own-change-with-another",
        NODE,
        changed(NODE, lambda n: labels_of(n).update({REPLICAS_LABEL: "9", "team": "ml"})),
        "labels",
    ),
]


@pytest.mark.parametrize(("old", "new"), [case[1:] for case in ADMITTED], ids=[case[0] for case in ADMITTED])
def test_the_publishers_own_keys_may_change(old: Json, new: Json) -> None:
    assert refusals(policy()["spec"], old, new) == []


@pytest.mark.parametrize(
    ("old", "new", "what"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED]
)
def test_anything_else_the_publisher_changes_is_refused(old: Json, new: Json, what: str) -> None:
    refused = refusals(policy()["spec"], old, new)
    assert len(refused) == 1 and what in refused[0], refused


@pytest.mark.parametrize(("old", "new"), [case[1:3] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_nobody_else_is_concerned(old: Json, new: Json) -> None:
    for username in ("system:node:gpu-1", "system:serviceaccount:mpsflow:mpsflow-pod-watcher", "admin"):
        assert refusals(policy()["spec"], old, new, username) == []


def test_the_policy_names_the_vocabularys_keys_and_the_publishers_account() -> None:
    spec = policy()["spec"]
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    assert set(evaluate(variables["ownedLabels"], {})) == {
        SHARING_STRATEGY_LABEL,
        REPLICAS_LABEL,
        DEVICE_PLUGIN_CONFIG_LABEL,
    }
    assert evaluate(variables["ownedAnnotationPrefix"], {}) == STATUS_ANNOTATION_PREFIX
    [deployment] = [
        d
        for d in documents()
        if d["metadata"]["name"] == "mpsflow-config-publisher" and d["kind"] == "Deployment"
    ]
    account = (
        deployment["metadata"]["namespace"],
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
    )
    assert account == PUBLISHER_ACCOUNT
    assert [c["expression"] for c in spec["matchConditions"]] == [
        f"request.userInfo.username == '{PUBLISHER}'"
    ]


def test_the_policy_is_bound_to_deny_and_matches_every_node_update() -> None:
    spec = policy()["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}
    ]
    bindings = [d for d in documents() if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert [(b["spec"]["policyName"], b["spec"]["validationActions"]) for b in bindings] == [
        (POLICY_NAME, ["Deny"])
    ]
    assert "matchResources" not in bindings[0]["spec"]  # every node, every namespace
    for validation in spec["validations"]:
        assert "\n" not in validation["message"]  # the API server refuses a message with line breaks
    for expression in [
        *(c["expression"] for c in spec["matchConditions"]),
        *(v["expression"] for v in spec["variables"]),
        *(v["expression"] for v in spec["validations"]),
    ]:
        assert ".?" not in expression  # optional syntax: not in cel-python, so not evaluated here


# --- the writer's own patches ----------------------------------------------------------------------


def merge_patch(target: Json, patch: Mapping[str, Any]) -> Json:
    """RFC 7386 JSON merge patch, as the API server applies `application/merge-patch+json`."""
    merged = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            current = merged.get(key)
            merged[key] = merge_patch(current if isinstance(current, dict) else {}, value)
        else:
            merged[key] = value
    return merged


def writers_update(node: Json, layout: NodeLayout, *, config_label: bool, gfd_labels: bool) -> Json:
    """The node after the config publisher's merge patch for `layout`."""
    metadata = node["metadata"]
    patch = metadata_patch(
        render_node(metadata["name"], layout, gfd_labels=gfd_labels),
        metadata.get("labels") or {},
        metadata.get("annotations") or {},
        config_label=config_label,
        node_labels=True,
    )
    return merge_patch(node, {"metadata": {**patch, "resourceVersion": metadata.get("resourceVersion")}})


FOREIGN_KEYS = st.from_regex(
    r"(example\.com|kubernetes\.io|nvidia\.com)/[a-z][a-z0-9.-]{0,20}", fullmatch=True
)


@settings(max_examples=50, deadline=None)  # cel-python interprets: ~0.15 s an example
@given(
    layouts(),
    layouts(),
    st.dictionaries(FOREIGN_KEYS, st.from_regex(r"[a-z0-9]{0,8}", fullmatch=True), max_size=6),
    st.dictionaries(FOREIGN_KEYS, st.text(max_size=8), max_size=6),
    st.booleans(),
)
def test_every_patch_the_writer_makes_is_admitted(
    before: NodeLayout,
    after: NodeLayout,
    foreign_labels: dict[str, str],
    foreign_annotations: dict[str, str],
    config_label: bool,
) -> None:
    """Whatever the node carries of others', and whatever the publisher wrote on it before."""
    spec = policy()["spec"]
    node = changed(
        BARE_NODE,
        lambda n: labels_of(n).update(foreign_labels),
        lambda n: annotations_of(n).update(foreign_annotations),
    )
    written = writers_update(node, before, config_label=config_label, gfd_labels=False)
    assert refusals(spec, node, written) == []
    assert (
        refusals(spec, written, writers_update(written, after, config_label=config_label, gfd_labels=False))
        == []
    )


def test_gfds_labels_are_refused_until_the_policy_is_widened_for_them() -> None:
    """`--gfd-labels` writes GFD's keys: the shipped policy refuses them; adding them to
    `ownedLabels`, as the manifest's comment says, admits them."""
    spec = policy()["spec"]
    node = changed(BARE_NODE, lambda n: labels_of(n).update({"nvidia.com/gpu.product": "A100"}))
    update = writers_update(node, A100, config_label=True, gfd_labels=True)
    assert len(refusals(spec, node, update)) == 1
    widened = copy.deepcopy(spec)
    [owned] = [v for v in widened["variables"] if v["name"] == "ownedLabels"]
    owned["expression"] = owned["expression"].replace(
        "]", f", '{GFD_SHARING_STRATEGY_LABEL}', '{GFD_REPLICAS_LABEL}']"
    )
    assert refusals(widened, node, update) == []
    assert refusals(widened, node, changed(update, lambda n: labels_of(n).pop("nvidia.com/gpu.product")))
