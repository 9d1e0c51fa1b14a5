"""mpsflow's scheduling gate: put on every slice pod at creation, lifted when its slice is ready.

Where it sits: the Kubernetes API server calls the admission webhook served here (a
MutatingWebhookConfiguration, k8s/base/admission-webhook.yaml) when a pod is created, before any
scheduler can see the pod. A pod that asks for an `nvidia.com/gpu-<N>gb` resource gets mpsflow's
scheduling gate (`admission_review`), so no scheduler binds it until the planner has a slice ready
for it on some node; then the pod watcher lifts the gate and pins the pod to that node in one patch
(`release_patch`). That is how mpsflow never lets a pod be bound to a slice that is about to go,
whatever scheduler the cluster runs. The webhook is stateless (no bus, no API access), so it runs
as its own small Deployment (`mpsflow run admission-webhook`) with as many replicas as pod creation
deserves.

The functions that decide are pure; the aiohttp app around them only moves JSON. The webhook never
refuses a pod: a malformed request is the pod watcher's to explain with an Event, and a pod it does
not understand passes unchanged.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web
from opentelemetry.trace import SpanKind

from events.tracing import POD, tracer
from events.vocabulary import (
    RELEASED_TO_ANNOTATION,
    SLICE_GATE,
    WEBHOOK_HEALTH_PATH,
    WEBHOOK_PATH,
    asks_for_a_slice,
)
from services.kit.listen import ListenAddress
from services.pod_watcher.translate import is_gated

log = logging.getLogger(__name__)

REVIEW_VERSION = "admission.k8s.io/v1"


class UnreadableReviewError(ValueError):
    """The request body is not an AdmissionReview this webhook can answer."""


def gate_patch(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON patch that puts mpsflow's gate on a new pod, or [] when it needs none.

    A pod that asks for no slice, already carries the gate, or is created bound to a node (which
    the API forbids together with gates) is left as it is. A release annotation the new pod carries
    goes: only the release of this pod may set it.
    """
    spec = pod.get("spec") or {}
    if not asks_for_a_slice(pod) or is_gated(pod) or spec.get("nodeName"):
        return []
    gate = {"name": SLICE_GATE}
    patch: list[dict[str, Any]] = (
        [{"op": "add", "path": "/spec/schedulingGates/-", "value": gate}]
        if spec.get("schedulingGates")
        else [{"op": "add", "path": "/spec/schedulingGates", "value": [gate]}]
    )
    if RELEASED_TO_ANNOTATION in ((pod.get("metadata") or {}).get("annotations") or {}):
        # Copied from a released pod's manifest: it belongs to that pod's release, not this one.
        patch.append(
            {"op": "remove", "path": "/metadata/annotations/" + RELEASED_TO_ANNOTATION.replace("/", "~1")}
        )
    return patch


def admission_review(review: Mapping[str, Any]) -> dict[str, Any]:
    """The AdmissionReview answering `review` (a v1 AdmissionReview request): always allowed, with
    the gate patch for a pod being created that asks for a slice."""
    request = review.get("request")
    if review.get("apiVersion") != REVIEW_VERSION or not isinstance(request, Mapping):
        raise UnreadableReviewError(f"expected an {REVIEW_VERSION} AdmissionReview with a request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise UnreadableReviewError("request.uid is missing")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    pod = request.get("object")
    is_pod = (request.get("kind") or {}).get("kind") == "Pod"
    if is_pod and request.get("operation") == "CREATE" and isinstance(pod, Mapping):
        patch = gate_patch(pod)
        if patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": REVIEW_VERSION, "kind": "AdmissionReview", "response": response}


def release_patch(pod: Mapping[str, Any], node: str) -> dict[str, Any]:
    """The merge patch that lifts mpsflow's gate from a gated pod and pins it to `node`.

    The pin is a required node affinity on the node's name, added to every term the pod already
    has (terms are ORed, so each must carry it) or as the only term: Kubernetes lets a gated pod's
    scheduling constraints only narrow, and this narrows them to one node. The pod's
    resourceVersion goes along, so the patch fails with a conflict if the pod changed meanwhile.
    The annotation says where it was released, for the planner and for people.
    """
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    gates = [gate for gate in spec.get("schedulingGates") or [] if gate.get("name") != SLICE_GATE]
    pin = {"key": "metadata.name", "operator": "In", "values": [node]}
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    pinned = (
        [{**term, "matchFields": [*(term.get("matchFields") or []), pin]} for term in terms]
        if terms
        else [{"matchFields": [pin]}]
    )
    return {
        "metadata": {
            "resourceVersion": metadata.get("resourceVersion"),
            "annotations": {RELEASED_TO_ANNOTATION: node},
        },
        "spec": {
            "schedulingGates": gates or None,
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": pinned}
                }
            },
        },
    }


async def _review(request: web.Request) -> web.Response:
    with tracer().start_as_current_span("admit pod", kind=SpanKind.SERVER) as span:
        try:
            body = json.loads(await request.read())
            if not isinstance(body, Mapping):
                raise UnreadableReviewError("the body is not a JSON object")
            answer = admission_review(body)
        except (ValueError, UnreadableReviewError) as error:
            log.warning("refusing an unreadable admission review: %s", error)
            return web.json_response({"error": str(error)}, status=400)
        pod = _reviewed_pod(body)
        if pod is not None:
            span.set_attribute(POD, pod)
        span.set_attribute("mpsflow.gated", "patch" in answer["response"])
        return web.json_response(answer)


def _reviewed_pod(review: Mapping[str, Any]) -> str | None:
    """The pod under review as "namespace/name", for the span (None while its name is still to be
    generated)."""
    request = review.get("request") or {}
    name = request.get("name") or ((request.get("object") or {}).get("metadata") or {}).get("name")
    namespace = request.get("namespace")
    return f"{namespace}/{name}" if isinstance(namespace, str) and isinstance(name, str) and name else None


async def _healthy(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def webhook_app() -> web.Application:
    app = web.Application()
    app.router.add_post(WEBHOOK_PATH, _review)
    app.router.add_get(WEBHOOK_HEALTH_PATH, _healthy)
    return app


CERTIFICATE_CHECK_SECONDS = 60.0


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The server side of the TLS the API server requires of webhooks."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


async def keep_certificate_fresh(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Load the certificate again whenever its files change (cert-manager renews it in the Secret,
    which the kubelet updates in the volume): new connections get the new one. Without this, the
    webhook would serve an expired certificate, and with failurePolicy Fail no slice pod could be
    created."""
    seen = _modified(cert_file, key_file)
    while True:
        await anyio.sleep(CERTIFICATE_CHECK_SECONDS)
        current = _modified(cert_file, key_file)
        if current == seen:
            continue
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as error:  # caught half-written: the next check takes it
            log.warning("certificate not reloaded yet: %s", error)
            continue
        seen = current
        log.info("certificate reloaded from %s", cert_file)


def _modified(*files: Path) -> tuple[int, ...]:
    return tuple(path.stat().st_mtime_ns if path.exists() else 0 for path in files)


async def serve_webhook(address: ListenAddress, tls: ssl.SSLContext | None) -> web.AppRunner:
    """Start serving at `address` (https with `tls`); the caller stops it with `runner.cleanup()`."""
    runner = web.AppRunner(webhook_app(), access_log=None)
    await runner.setup()
    await address.site(runner, tls).start()
    log.info("admission webhook serving %s on %s", "https" if tls else "http", address)
    return runner
