"""Mutating admission webhooks on pod CREATE, called as the real API server calls them.

Where it sits: below `server`, which hands every pod create to `admit` after the request's namespace
is checked and before the name is generated, the object validated and defaulted; it imports
`common` and `patches`. Its webhook calls are the only connections the emulator makes. It must never
store anything or record the calls (they are not in `request_log`): it returns the pod as the
webhooks leave it, or raises the refusal.

As the real API server: the webhooks are called in order, each unless its `matches` says no; an
`admission.k8s.io/v1` AdmissionReview is POSTed to the webhook's URL with `?timeout=<N>s`; a
`JSONPatch` answer mutates the pod, `allowed: false` refuses the create with the webhook's status
(code 400 when it gives none below 400, message `admission webhook "<name>" denied the request:
...`); a call that fails (refused, timed out, not 2xx, unreadable, a wrong uid, apiVersion or kind,
an undecodable patch) refuses the create with 500 `Internal error occurred: failed calling webhook
"<name>": ...` under failurePolicy Fail and is skipped under Ignore; a patch that cannot be applied
is a 500 under either policy. The wording of the underlying network and decoding errors is the
emulator's, not Go's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiohttp
from yarl import URL

from simulation.apiserver.common import ApiError, JsonObject, checked_object, internal_error
from simulation.apiserver.patches import json_patch


@dataclass(frozen=True)
class AdmissionWebhook:
    """A mutating admission webhook the emulator calls on every pod create, as the real API server
    calls one registered for CREATE of pods with admissionReviewVersions [v1] and sideEffects None.

    `url` is its clientConfig.url, http or https (the real API server calls https only, trusting
    the webhook's caBundle; here https is verified against the system's certificates).
    `timeout_seconds` bounds the whole call (the real timeoutSeconds is whole seconds, 1 to 30).
    `matches` stands in for matchConditions, whose CEL the emulator cannot evaluate: given a copy
    of the pod as the webhook would receive it, False skips the call. The emulator never records
    the calls anywhere (not in `request_log`)."""

    name: str
    url: str
    failure_policy: Literal["Fail", "Ignore"] = "Fail"
    timeout_seconds: float = 10.0
    matches: Callable[[JsonObject], bool] | None = None

    def __post_init__(self) -> None:
        target = URL(self.url)
        if target.scheme not in ("http", "https") or not target.host:
            raise ValueError(f"webhook {self.name!r} needs an http or https URL, got {self.url!r}")
        if self.failure_policy not in ("Fail", "Ignore") or self.timeout_seconds <= 0:
            raise ValueError(
                f"webhook {self.name!r} needs failure_policy Fail or Ignore and a positive timeout, "
                f"got {self.failure_policy!r} and {self.timeout_seconds}"
            )


_POD_KIND: Final = {"group": "", "version": "v1", "kind": "Pod"}
_POD_RESOURCE: Final = {"group": "", "version": "v1", "resource": "pods"}
_ADMISSION_REVIEW_API_VERSION: Final = "admission.k8s.io/v1"


class _WebhookCallError(Exception):
    """A webhook call that failed (the real webhookutil.ErrCallingWebhook): the webhook's
    failurePolicy decides whether the create is refused or goes on without it."""


def _admission_review(uid: str, pod: JsonObject, identity: str | None, options: JsonObject) -> JsonObject:
    """The AdmissionReview the real API server sends for a pod create (empty fields left out, as Go's
    omitempty does, so a pod with only generateName has no `name`)."""
    user = (
        {"username": identity}
        if identity
        else {"username": "system:anonymous", "groups": ["system:unauthenticated"]}
    )
    name = pod["metadata"].get("name")
    request = {
        "uid": uid,
        "kind": _POD_KIND,
        "resource": _POD_RESOURCE,
        "requestKind": _POD_KIND,
        "requestResource": _POD_RESOURCE,
        **({"name": name} if name else {}),
        "namespace": pod["metadata"]["namespace"],
        "operation": "CREATE",
        "userInfo": user,
        "object": pod,
        "oldObject": None,
        "dryRun": False,
        "options": options,
    }
    return {"kind": "AdmissionReview", "apiVersion": _ADMISSION_REVIEW_API_VERSION, "request": request}


def _invalid_answer(why: str) -> _WebhookCallError:
    return _WebhookCallError(f"received invalid webhook response: {why}")


async def _post_review(
    session: aiohttp.ClientSession, webhook: AdmissionWebhook, review: JsonObject
) -> JsonObject:
    """The `response` of the webhook's answer to `review`, checked as the real API server checks it
    (VerifyAdmissionResponse); raises _WebhookCallError when the call or the answer fails."""
    url = URL(webhook.url).update_query(timeout=f"{math.ceil(webhook.timeout_seconds)}s")
    try:
        async with asyncio.timeout(webhook.timeout_seconds), session.post(url, json=review) as answer:
            status, body = answer.status, await answer.read()
    except TimeoutError:
        raise _WebhookCallError(f'failed to call webhook: Post "{url}": context deadline exceeded') from None
    except aiohttp.ClientError as error:
        raise _WebhookCallError(f'failed to call webhook: Post "{url}": {error}') from None
    if not 200 <= status <= 206:
        raise _WebhookCallError(f"failed to call webhook: the server answered HTTP status {status}")
    try:
        answer_review = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _WebhookCallError(f"failed to call webhook: the answer is not JSON: {error}") from None
    response = answer_review.get("response") if isinstance(answer_review, dict) else None
    if not isinstance(response, dict):
        raise _invalid_answer("webhook response was absent")
    uid = review["request"]["uid"]
    if response.get("uid") != uid:
        raise _invalid_answer(f'expected response.uid="{uid}", got "{response.get("uid", "")}"')
    api_version, kind = answer_review.get("apiVersion", ""), answer_review.get("kind", "")
    if (api_version, kind) != (_ADMISSION_REVIEW_API_VERSION, "AdmissionReview"):
        group, _, version = str(api_version).rpartition("/")
        expected = f"{_ADMISSION_REVIEW_API_VERSION}, Kind=AdmissionReview"
        raise _invalid_answer(f"expected webhook response of {expected}, got {group}/{version}, Kind={kind}")
    if response.get("patch") and response.get("patchType") is None:
        raise _invalid_answer("webhook returned response.patch but not response.patchType")
    if not response.get("patch") and response.get("patchType") is not None:
        raise _invalid_answer("webhook returned response.patchType but not response.patch")
    return response


def _denial(webhook_name: str, status: Any) -> ApiError:
    """The real webhookerrors.ToStatusErr: the webhook's status with a code of at least 400 (400
    when it gives none) and its message (else its reason) after who denied the request."""
    result = status if isinstance(status, dict) else {}
    code = result.get("code")
    denied = f'admission webhook "{webhook_name}" denied the request'
    explanation = result.get("message") or result.get("reason")
    return ApiError(
        code if isinstance(code, int) and code >= 400 else 400,
        f"{denied}: {explanation}" if explanation else f"{denied} without explanation",
        str(result.get("reason") or ""),
        result.get("details") if isinstance(result.get("details"), dict) else None,
    )


def _admitted(webhook_name: str, pod: JsonObject, response: JsonObject) -> JsonObject:
    """The pod as a webhook's checked `response` leaves it; raises its denial, _WebhookCallError
    for a patch that cannot be decoded or has another type than JSONPatch, and a 500 for one that
    cannot be applied (whatever the failurePolicy, as in the real API server)."""
    if response.get("allowed") is not True:
        raise _denial(webhook_name, response.get("status"))
    if not response.get("patch"):
        return pod
    try:
        operations = json.loads(base64.b64decode(response["patch"], validate=True))
    except (binascii.Error, TypeError, ValueError) as error:
        raise _WebhookCallError(f"received undecodable patch in webhook response: {error}") from None
    if not isinstance(operations, list):
        raise _WebhookCallError("received undecodable patch in webhook response: not a list of operations")
    if not operations:
        return pod
    if response["patchType"] != "JSONPatch":
        raise _WebhookCallError(f'unsupported patch type "{response["patchType"]}"')
    try:
        return checked_object(json_patch(pod, operations), "Pod")
    except ApiError as error:
        raise internal_error(str(error)) from None


async def admit(
    session: aiohttp.ClientSession,
    webhooks: Sequence[AdmissionWebhook],
    pod: JsonObject,
    identity: str | None,
    query: Mapping[str, str],
) -> JsonObject:
    """Calls every webhook whose `matches` allows it, in order, as the real API server calls mutating
    webhooks on a create, and returns the pod as they left it."""
    options = {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"} | {
        option: query[option] for option in ("fieldManager", "fieldValidation") if query.get(option)
    }
    for webhook in webhooks:
        if webhook.matches is not None and not webhook.matches(copy.deepcopy(pod)):
            continue
        review = _admission_review(str(uuid.uuid4()), pod, identity, options)
        try:
            pod = _admitted(webhook.name, pod, await _post_review(session, webhook, review))
        except _WebhookCallError as failure:
            if webhook.failure_policy == "Fail":
                raise internal_error(f'failed calling webhook "{webhook.name}": {failure}') from None
    return pod
