"""Each mpsflow service uses only what its RBAC in k8s/ grants: an audit of the demo's API requests.

The demo gives every process its own bearer token, and a service's token is its ServiceAccount's
name (`mpsflow-pod-watcher`; a node agent's is `mpsflow-node-agent-<node>`). The API emulator
records each request's verb, resource (with subresource), namespace and path; the checker here
decides each one from the Roles, ClusterRoles and bindings of k8s/ with its nos-compat component
(the demo runs compatibility mode, which that component switches on: the publisher writes nos's
ConfigMap in nos's namespace), as the Kubernetes RBAC authorizer does: a Role grants in its
namespace; a ClusterRole grants everywhere through a ClusterRoleBinding and in the binding's
namespace through a RoleBinding; `resourceNames` admit only requests whose URL names one of them
(never a list, a watch or a create). The emulator serves only the core API group, so every request
is of group "".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from events.vocabulary import NOS_DEVICE_PLUGIN_CONFIGMAP
from tests.unit.test_manifests import documents
from tests.unit.test_manifests_nos_compat import nos_compat_documents

SERVICE_PREFIX = "mpsflow-"
WATCHER = "mpsflow-pod-watcher"
PUBLISHER = "mpsflow-config-publisher"
NOS_NAMESPACE, CONFIGMAP = NOS_DEVICE_PLUGIN_CONFIGMAP


def manifests() -> list[dict[str, Any]]:
    """k8s/ with compatibility mode on (the nos-compat component's objects)."""
    return [*documents(), *nos_compat_documents()]


@dataclass(frozen=True)
class Request:
    identity: str
    verb: str
    resource: str
    namespace: str | None = None
    name: str | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Request:
        """From a JSON line of `mpsflow demo --audit-log` (a simulation.apiserver.RequestRecord)."""
        parts = record["path"].removeprefix("/api/v1/").strip("/").split("/")
        if parts[0] == "namespaces" and len(parts) >= 3:
            parts = parts[2:]
        return cls(
            identity=record["identity"] or "",
            verb=record["verb"],
            resource=record["resource"],
            namespace=record["namespace"],
            name=parts[1] if len(parts) > 1 else None,
        )


@dataclass(frozen=True)
class Grant:
    """One rule of a role as bound to an account: `namespace` None grants in every namespace and
    on cluster-scoped resources."""

    namespace: str | None
    api_groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    resource_names: frozenset[str]

    def allows(self, request: Request) -> bool:
        return (
            (self.namespace is None or self.namespace == request.namespace)
            and bool({"", "*"} & self.api_groups)
            and bool({request.resource, "*"} & self.resources)
            and bool({request.verb, "*"} & self.verbs)
            and (not self.resource_names or request.name in self.resource_names)
        )


def grants_by_account(manifests: Iterable[Mapping[str, Any]]) -> dict[str, list[Grant]]:
    """Every account's grants, by `namespace/name` of the ServiceAccount."""
    manifests = list(manifests)
    rules = {
        (d["metadata"].get("namespace"), d["kind"], d["metadata"]["name"]): d.get("rules") or []
        for d in manifests
        if d["kind"] in ("Role", "ClusterRole")
    }
    grants: dict[str, list[Grant]] = defaultdict(list)
    for binding in (d for d in manifests if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        namespace = binding["metadata"]["namespace"] if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        bound = rules[(namespace if ref["kind"] == "Role" else None, ref["kind"], ref["name"])]
        for subject in binding["subjects"]:
            if subject["kind"] != "ServiceAccount":
                continue
            account = f"{subject.get('namespace', namespace)}/{subject['name']}"
            grants[account].extend(
                Grant(
                    namespace,
                    frozenset(rule.get("apiGroups") or ()),
                    frozenset(rule.get("resources") or ()),
                    frozenset(rule.get("verbs") or ()),
                    frozenset(rule.get("resourceNames") or ()),
                )
                for rule in bound
            )
    return grants


def account_of(identity: str, manifests: Iterable[Mapping[str, Any]]) -> str | None:
    """The ServiceAccount whose name is the identity or its longest prefix before a '-', if any."""
    accounts = [
        d["metadata"]
        for d in manifests
        if d["kind"] == "ServiceAccount" and identity.startswith(d["metadata"]["name"])
    ]
    matching = [a for a in accounts if identity == a["name"] or identity[len(a["name"])] == "-"]
    if not matching:
        return None
    best = max(matching, key=lambda a: len(a["name"]))
    return f"{best['namespace']}/{best['name']}"


def denied(requests: Iterable[Request], manifests: Iterable[Mapping[str, Any]]) -> list[Request]:
    """The requests of mpsflow services that their accounts' RBAC does not allow."""
    manifests = list(manifests)
    grants = grants_by_account(manifests)
    refused = []
    for request in requests:
        if not request.identity.startswith(SERVICE_PREFIX):
            continue
        account = account_of(request.identity, manifests)
        if account is None or not any(g.allows(request) for g in grants.get(account, [])):
            refused.append(request)
    return refused


# --- the audit of the demo run ------------------------------------------------------------------


@pytest.mark.e2e
def test_every_api_request_of_every_service_is_granted_by_its_rbac(
    demo_requests: list[dict[str, Any]],
) -> None:
    requests = [Request.from_record(record) for record in demo_requests]

    assert denied(requests, manifests()) == []
    # the audit saw both services at work: the watcher's lists, watches and the Events of the
    # invalid pods; the publisher's node labels and its device-plugin ConfigMap, in nos's namespace
    assert {(r.verb, r.resource) for r in requests if r.identity == WATCHER} >= {
        ("list", "pods"),
        ("watch", "pods"),
        ("list", "nodes"),
        ("watch", "nodes"),
        ("create", "events"),
    }
    assert {(r.verb, r.resource) for r in requests if r.identity == PUBLISHER} >= {
        ("get", "nodes"),
        ("patch", "nodes"),
        ("create", "configmaps"),
        ("get", "configmaps"),
        ("update", "configmaps"),
    }
    assert {r.namespace for r in requests if r.identity == PUBLISHER and r.resource == "configmaps"} == {
        NOS_NAMESPACE
    }


# --- the checker --------------------------------------------------------------------------------

DECISIONS: list[tuple[str, Request, bool]] = [
    ("watcher-lists-pods", Request(WATCHER, "list", "pods"), True),
    ("watcher-watches-nodes", Request(WATCHER, "watch", "nodes"), True),
    ("watcher-creates-an-event", Request(WATCHER, "create", "events", "research"), True),
    ("watcher-gets-a-node", Request(WATCHER, "get", "nodes", None, "gpu-1"), True),
    ("watcher-deletes-a-pod", Request(WATCHER, "delete", "pods", "ml", "train"), False),
    ("watcher-patches-an-event", Request(WATCHER, "patch", "events", "ml", "train.1"), False),
    ("watcher-patches-a-node", Request(WATCHER, "patch", "nodes", None, "gpu-1"), False),
    ("watcher-writes-pod-status", Request(WATCHER, "patch", "pods/status", "ml", "train"), False),
    ("watcher-binds-a-pod", Request(WATCHER, "create", "pods/binding", "ml", "train"), False),
    ("watcher-reads-configmaps", Request(WATCHER, "list", "configmaps", "mpsflow"), False),
    ("publisher-patches-a-node", Request(PUBLISHER, "patch", "nodes", None, "gpu-1"), True),
    ("publisher-gets-nos-configmap", Request(PUBLISHER, "get", "configmaps", NOS_NAMESPACE, CONFIGMAP), True),
    (
        "publisher-updates-nos-configmap",
        Request(PUBLISHER, "update", "configmaps", NOS_NAMESPACE, CONFIGMAP),
        True,
    ),
    ("publisher-creates-a-configmap", Request(PUBLISHER, "create", "configmaps", NOS_NAMESPACE), True),
    (
        "publisher-updates-another-configmap",
        Request(PUBLISHER, "update", "configmaps", NOS_NAMESPACE, "x"),
        False,
    ),
    (
        "publisher-patches-nos-configmap",
        Request(PUBLISHER, "patch", "configmaps", NOS_NAMESPACE, CONFIGMAP),
        False,
    ),
    ("publisher-lists-configmaps", Request(PUBLISHER, "list", "configmaps", NOS_NAMESPACE), False),
    (
        "publisher-its-configmap-in-its-own-namespace",
        Request(PUBLISHER, "get", "configmaps", "mpsflow", CONFIGMAP),
        False,
    ),
    (
        "publisher-creates-a-configmap-in-its-own-namespace",
        Request(PUBLISHER, "create", "configmaps", "mpsflow"),
        False,
    ),
    (
        "publisher-its-configmap-in-another-namespace",
        Request(PUBLISHER, "get", "configmaps", "kube-system", CONFIGMAP),
        False,
    ),
    ("publisher-creates-a-configmap-elsewhere", Request(PUBLISHER, "create", "configmaps", "default"), False),
    ("publisher-patches-node-status", Request(PUBLISHER, "patch", "nodes/status", None, "gpu-1"), False),
    ("publisher-lists-nodes", Request(PUBLISHER, "list", "nodes"), False),
    ("planner-lists-pods", Request("mpsflow-planner", "list", "pods"), False),
    ("node-agent-gets-its-node", Request("mpsflow-node-agent-gpu-1", "get", "nodes", None, "gpu-1"), False),
    ("unknown-service", Request("mpsflow-pod-watcherx", "list", "pods"), False),
]


@pytest.mark.parametrize(
    ("request_", "allowed"), [case[1:] for case in DECISIONS], ids=[case[0] for case in DECISIONS]
)
def test_the_checker_allows_exactly_what_the_manifests_grant(request_: Request, allowed: bool) -> None:
    assert denied([request_], manifests()) == ([] if allowed else [request_])


def test_without_compatibility_mode_the_publisher_gets_no_configmap() -> None:
    request_ = Request(PUBLISHER, "get", "configmaps", NOS_NAMESPACE, CONFIGMAP)
    assert denied([request_], documents()) == [request_]


def test_requests_of_others_than_mpsflow_services_are_not_audited() -> None:
    others = [Request("scheduler", "create", "pods/binding", "ml", "p"), Request("", "delete", "nodes")]

    assert denied(others, []) == []


def test_a_cluster_role_bound_in_a_namespace_grants_only_there() -> None:
    manifests: list[dict[str, Any]] = [
        {"kind": "ServiceAccount", "metadata": {"name": "mpsflow-x", "namespace": "ops"}},
        {
            "kind": "ClusterRole",
            "metadata": {"name": "reader"},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["get"]}],
        },
        {
            "kind": "RoleBinding",
            "metadata": {"name": "reader", "namespace": "ml"},
            "roleRef": {"kind": "ClusterRole", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "mpsflow-x", "namespace": "ops"}],
        },
    ]
    here = Request("mpsflow-x", "get", "pods", "ml", "p")
    elsewhere = Request("mpsflow-x", "get", "pods", "ops", "p")
    cluster_scoped = Request("mpsflow-x", "get", "nodes", None, "n")

    assert denied([here, elsewhere, cluster_scoped], manifests) == [elsewhere, cluster_scoped]


@pytest.mark.parametrize(
    ("path", "namespace", "name"),
    [
        ("/api/v1/namespaces/ml/pods/train/status", "ml", "train"),
        ("/api/v1/namespaces/ml/pods", "ml", None),
        ("/api/v1/nodes/gpu-1", None, "gpu-1"),
        ("/api/v1/pods", None, None),
    ],
)
def test_a_request_record_names_the_object_of_its_path(
    path: str, namespace: str | None, name: str | None
) -> None:
    record = {
        "method": "GET",
        "path": path,
        "verb": "get",
        "resource": "pods",
        "namespace": namespace,
        "user_agent": "mpsflow-pod-watcher",
        "identity": WATCHER,
    }

    assert Request.from_record(record) == Request(WATCHER, "get", "pods", namespace, name)
