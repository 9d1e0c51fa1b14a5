"""Every manifest in k8s/base is valid against the Kubernetes OpenAPI schema, checked offline.

kubernetes-validate ships the JSON schemas of each Kubernetes version inside its wheel, so this
needs neither network nor cluster. Strict mode also refuses fields the schema does not know, so a
misspelt key fails here instead of being dropped by the API server. Where kubectl is installed,
`kubectl kustomize k8s/base` must build exactly the objects the other manifest tests read. The
overlays' objects are validated in test_overlays.py.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.unit.test_manifests import BASE, documents, kustomize, needs_kubectl

# the version the API emulator reports, and the one of the kubernetes-asyncio client
VERSIONS = ("1.31", "1.36")


def object_id(document: dict[str, Any]) -> str:
    namespace = document["metadata"].get("namespace")
    return f"{document['kind']}/{namespace + '/' if namespace else ''}{document['metadata']['name']}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("document", documents(), ids=object_id)
def test_every_object_is_valid_against_the_kubernetes_schema(document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize(
    ("path", "value", "complaint"),
    [
        (("spec", "template", "spec", "serviceAcountName"), "x", "'serviceAcountName' was unexpected"),
        (("spec", "replicas"), "one", "'one' is not of type 'integer'"),
    ],
    ids=["misspelt-field", "wrong-type"],
)
def test_a_broken_object_is_refused_naming_the_problem(
    path: tuple[str, ...], value: str, complaint: str
) -> None:
    broken = copy.deepcopy(next(d for d in documents() if d["kind"] == "Deployment"))
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value

    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)

    assert complaint in caught.value.message


@needs_kubectl
def test_kustomize_builds_the_objects_of_the_manifests() -> None:
    objects = kustomize(BASE)

    assert sorted(objects, key=object_id) == sorted(documents(), key=object_id)
