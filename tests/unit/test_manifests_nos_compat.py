"""Nebuly compatibility mode: the kustomize component k8s/components/nos-compat, which an overlay adds,
turns `--compat-configmap` on in the config publisher and grants it nos's device-plugin ConfigMap in
nos's namespace, and changes nothing else.

It is a component rather than part of the base or of an overlay because its Role lives in nos's
namespace (`nebuly-nvidia`), which nos's chart creates and mpsflow does not own: a Role in a namespace
that does not exist fails `kubectl apply -k`. Enabled, it is built with `kubectl kustomize` (skipped
where kubectl is not installed) on the base, as an overlay lists it; its own objects are read directly
too, and tests/e2e/test_rbac.py audits the demo's compatibility writes against them.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from events.vocabulary import NOS_DEVICE_PLUGIN_CONFIGMAP
from services.cli import build_parser
from tests.unit.test_manifests import BASE, COMPONENTS, OVERLAYS, base_with, documents, needs_kubectl
from tests.unit.test_manifests_schema import VERSIONS

COMPONENT = COMPONENTS / "nos-compat"
PUBLISHER = "mpsflow-config-publisher"


def nos_compat_documents() -> list[dict[str, Any]]:
    """The objects the component adds (its patch only adds the flag to the publisher's args)."""
    kustomization = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    loaded: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        loaded.extend(d for d in yaml.safe_load_all((COMPONENT / resource).read_text()) if d)
    return loaded


def object_key(document: dict[str, Any]) -> tuple[str, str | None, str]:
    return document["kind"], document["metadata"].get("namespace"), document["metadata"]["name"]


@pytest.fixture(scope="module")
def enabled() -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` builds from the base with the component."""
    return base_with("nos-compat")


def _publisher_args(objects: list[dict[str, Any]]) -> list[str]:
    [deployment] = [d for d in objects if d["kind"] == "Deployment" and d["metadata"]["name"] == PUBLISHER]
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def test_the_base_and_the_overlays_have_compatibility_mode_off() -> None:
    """nos's namespace is not mpsflow's to assume: a user adds the component to an overlay."""
    assert "components" not in yaml.safe_load((BASE / "kustomization.yaml").read_text())
    for overlay in OVERLAYS.iterdir():
        components = yaml.safe_load((overlay / "kustomization.yaml").read_text()).get("components", [])
        assert not [c for c in components if c.endswith("/nos-compat")], overlay.name
    assert build_parser().parse_args(_publisher_args(documents())).compat_configmap is None
    assert not [d for d in documents() if d["kind"] in ("Role", "RoleBinding") and PUBLISHER in str(d)]


def test_the_role_grants_nos_configmap_in_nos_namespace_and_nothing_more() -> None:
    namespace, name = NOS_DEVICE_PLUGIN_CONFIGMAP
    by_kind = {d["kind"]: d for d in nos_compat_documents()}
    assert sorted(by_kind) == ["Role", "RoleBinding"]
    role, binding = by_kind["Role"], by_kind["RoleBinding"]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["get", "update"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": PUBLISHER}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": PUBLISHER, "namespace": "mpsflow"}]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_components_objects_are_valid_against_the_kubernetes_schema(version: str) -> None:
    for document in nos_compat_documents():
        kubernetes_validate.validate(document, version, strict=True)


@needs_kubectl
def test_enabled_the_publisher_writes_nos_configmap_and_nothing_else_changes(
    enabled: list[dict[str, Any]],
) -> None:
    base = {object_key(d): d for d in documents()}
    built = {object_key(d): copy.deepcopy(d) for d in enabled}
    assert sorted(set(built) - set(base), key=str) == sorted(map(object_key, nos_compat_documents()), key=str)
    assert set(base) <= set(built)
    args = _publisher_args(list(built.values()))
    assert args == [*_publisher_args(documents()), "--compat-configmap"]
    assert build_parser().parse_args(args).compat_configmap == NOS_DEVICE_PLUGIN_CONFIGMAP
    args.pop()  # then the rest of the publisher's Deployment, and every other object, is the base's
    assert [key for key in base if built[key] != base[key]] == []
