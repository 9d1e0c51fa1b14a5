"""mpsflow's scheduling gate: what the admission webhook answers, and the patch that lifts the gate.

The API emulator applies both for real in the end-to-end tests and in tests/integration; here each
rule is pinned down on plain JSON, as the API server sends and takes it."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from events.vocabulary import RELEASED_TO_ANNOTATION, SLICE_GATE
from services.pod_watcher import gate
from services.pod_watcher.gate import (
    REVIEW_VERSION,
    UnreadableReviewError,
    admission_review,
    gate_patch,
    release_patch,
)
from tests.support import eventually


def pod(resources: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "busybox", "resources": resources or {}}
    return {"metadata": {"name": "p", "resourceVersion": "7"}, "spec": {"containers": [container], **spec}}


def review(obj: dict[str, Any], *, operation: str = "CREATE", kind: str = "Pod") -> dict[str, Any]:
    return {
        "apiVersion": REVIEW_VERSION,
        "kind": "AdmissionReview",
        "request": {
            "uid": "r-1",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "operation": operation,
            "object": obj,
        },
    }


SLICE = {"limits": {"nvidia.com/gpu-10gb": 1}}


@pytest.mark.parametrize(
    ("obj", "patch"),
    [
        (pod(SLICE), [{"op": "add", "path": "/spec/schedulingGates", "value": [{"name": SLICE_GATE}]}]),
        (
            pod({"requests": {"nvidia.com/gpu-abcgb": 1}}),
            [{"op": "add", "path": "/spec/schedulingGates", "value": [{"name": SLICE_GATE}]}],
        ),
        (
            pod(SLICE, schedulingGates=[{"name": "other.example/gate"}]),
            [{"op": "add", "path": "/spec/schedulingGates/-", "value": {"name": SLICE_GATE}}],
        ),
        (pod(SLICE, schedulingGates=[{"name": SLICE_GATE}]), []),
        (pod(SLICE, nodeName="gpu-1"), []),
        (pod({"limits": {"nvidia.com/gpu": 1}}), []),
        (pod(), []),
    ],
    ids=["slice", "malformed slice", "another gate", "already gated", "created bound", "whole GPU", "no GPU"],
)
def test_only_pods_asking_for_a_slice_get_the_gate(obj: dict[str, Any], patch: list[dict[str, Any]]) -> None:
    assert gate_patch(obj) == patch


def test_the_review_allows_every_pod_and_carries_the_gate_as_a_base64_json_patch() -> None:
    answer = admission_review(review(pod(SLICE)))
    assert answer["apiVersion"] == REVIEW_VERSION and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert (response["uid"], response["allowed"], response["patchType"]) == ("r-1", True, "JSONPatch")
    assert json.loads(base64.b64decode(response["patch"])) == gate_patch(pod(SLICE))
    for other in (review(pod()), review(pod(SLICE), operation="UPDATE"), review(pod(SLICE), kind="Node")):
        assert admission_review(other)["response"] == {"uid": "r-1", "allowed": True}


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"apiVersion": "admission.k8s.io/v1beta1", "request": {"uid": "x"}},
        {"apiVersion": REVIEW_VERSION, "request": {}},
    ],
    ids=["empty", "old version", "no uid"],
)
def test_a_review_it_cannot_read_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(UnreadableReviewError):
        admission_review(body)


def test_release_lifts_only_our_gate_pins_the_node_and_guards_the_resource_version() -> None:
    gated = pod(SLICE, schedulingGates=[{"name": "other.example/gate"}, {"name": SLICE_GATE}])
    assert release_patch(gated, "gpu-1") == {
        "metadata": {"resourceVersion": "7", "annotations": {RELEASED_TO_ANNOTATION: "gpu-1"}},
        "spec": {
            "schedulingGates": [{"name": "other.example/gate"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-1"]}]}
                        ]
                    }
                }
            },
        },
    }
    assert (
        release_patch(pod(SLICE, schedulingGates=[{"name": SLICE_GATE}]), "gpu-1")["spec"]["schedulingGates"]
        is None
    )


def test_release_adds_the_pin_to_every_term_the_pod_already_has() -> None:
    zone = {"key": "zone", "operator": "In", "values": ["a"]}
    fast = {"key": "fast", "operator": "Exists"}
    mine = {"key": "metadata.name", "operator": "NotIn", "values": ["old"]}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [zone]},
                    {"matchExpressions": [fast], "matchFields": [mine]},
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [fast]}}
            ],
        }
    }
    patch = release_patch(pod(SLICE, schedulingGates=[{"name": SLICE_GATE}], affinity=affinity), "gpu-2")
    pin = {"key": "metadata.name", "operator": "In", "values": ["gpu-2"]}
    terms = patch["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchExpressions": [zone], "matchFields": [pin]},
        {"matchExpressions": [fast], "matchFields": [mine, pin]},
    ]
    # A merge patch: the preferred terms, which it leaves out, stay as they are.
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in patch["spec"]["affinity"]["nodeAffinity"]


def test_a_release_annotation_copied_into_a_new_pod_goes_with_the_gate() -> None:
    copied = pod(SLICE)
    copied["metadata"]["annotations"] = {RELEASED_TO_ANNOTATION: "gpu-1", "team": "ml"}
    assert gate_patch(copied) == [
        {"op": "add", "path": "/spec/schedulingGates", "value": [{"name": SLICE_GATE}]},
        {"op": "remove", "path": "/metadata/annotations/mpsflow.dev~1released-to"},
    ]


@pytest.mark.anyio
async def test_the_webhook_loads_its_certificate_again_when_its_files_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("one")
    key.write_text("one")
    loaded: list[str] = []
    reloaded = anyio.Event()

    class Context:
        def load_cert_chain(self, cert_file: Path, key_file: Path) -> None:
            loaded.append(Path(cert_file).read_text())
            reloaded.set()

    checks = 0
    modified = gate._modified

    def counted(*files: Path) -> tuple[int, ...]:
        nonlocal checks
        checks += 1
        return modified(*files)

    monkeypatch.setattr(gate, "CERTIFICATE_CHECK_SECONDS", 0.01)
    monkeypatch.setattr(gate, "_modified", counted)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(gate.keep_certificate_fresh, Context(), cert, key)  # type: ignore[arg-type]
            await eventually(lambda: checks >= 3, "three certificate checks")
            assert loaded == []  # unchanged files, checked twice: nothing loaded
            cert.write_text("two")
            os.utime(cert, ns=(cert.stat().st_atime_ns, cert.stat().st_mtime_ns + 1_000_000))
            await reloaded.wait()
            group.cancel_scope.cancel()
    assert loaded == ["two"]
