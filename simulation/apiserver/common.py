"""What every part of the API emulator shares: the resources it serves, its `Status` errors, the
check of a body that must be an object of a kind, and timestamps.

Where it sits: at the bottom of `simulation.apiserver`; every other module of the package imports
it, and it imports none of them. It must never hold state or do I/O: it only describes and builds.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    kind: str
    namespaced: bool
    subresources: frozenset[str]
    fields: frozenset[str]
    """Field selector labels besides metadata.name and metadata.namespace."""


KINDS: Final = {
    "pods": Kind(
        "Pod",
        True,
        frozenset({"status", "binding"}),
        frozenset({"spec.nodeName", "spec.schedulerName", "spec.serviceAccountName", "spec.restartPolicy"})
        | {"status.phase", "status.podIP", "status.nominatedNodeName"},
    ),
    "nodes": Kind("Node", False, frozenset({"status"}), frozenset({"spec.unschedulable"})),
    "configmaps": Kind("ConfigMap", True, frozenset(), frozenset()),
    "events": Kind(
        "Event",
        True,
        frozenset(),
        frozenset({"reason", "reportingComponent", "type", "source"})
        | {
            f"involvedObject.{field}"
            for field in ("kind", "namespace", "name", "uid", "apiVersion", "fieldPath")
        },
    ),
}

REASONS: Final = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """Answered as a `Status` object with HTTP status `code`; `reason` defaults to the code's usual
    reason, and "" leaves it out (as a webhook's denial without one)."""

    def __init__(self, code: int, message: str, reason: str | None = None, details: JsonObject | None = None):
        super().__init__(message)
        self.code = code
        self.body = failure_status(
            code, message, REASONS.get(code, "Unknown") if reason is None else reason, details
        )


def failure_status(code: int, message: str, reason: str, details: JsonObject | None = None) -> JsonObject:
    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message}
    return (
        status
        | ({"reason": reason} if reason else {})
        | {"code": code}
        | ({"details": details} if details else {})
    )


def internal_error(message: str) -> ApiError:
    """The real API's 500 for an error it did not expect, as apierrors.NewInternalError words it."""
    return ApiError(500, f"Internal error occurred: {message}", details={"causes": [{"message": message}]})


@dataclass(frozen=True)
class FieldError:
    """One entry of the real API's field.ErrorList: which field, Forbidden or Invalid, and why."""

    field: str
    type: Literal["Forbidden", "Invalid"]
    detail: str
    value: Any = None
    """The rejected value; shown (as JSON, where Go shows its own syntax) only for Invalid."""

    def body(self) -> str:
        if self.type == "Forbidden":
            return f"Forbidden: {self.detail}"
        return f"Invalid value: {json.dumps(self.value)}: {self.detail}"


def invalid(kind: str, name: str, errors: Sequence[FieldError]) -> ApiError:
    """The real API's 422 for a refused object (apierrors.NewInvalid): one message and one cause per error."""
    texts = [f"{error.field}: {error.body()}" for error in errors]
    summary = texts[0] if len(texts) == 1 else f"[{', '.join(texts)}]"
    causes = [
        {"reason": f"FieldValue{error.type}", "message": error.body(), "field": error.field}
        for error in errors
    ]
    return ApiError(
        422, f'{kind} "{name}" is invalid: {summary}', details={"name": name, "kind": kind, "causes": causes}
    )


def checked_object(body: Any, kind: str) -> JsonObject:
    """A deep copy of a request body that must be an object of `kind`, with kind and apiVersion set."""
    if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
        raise ApiError(400, f"the request body must be a {kind} object")
    if body.get("kind", kind) != kind or body.get("apiVersion", "v1") != "v1":
        raise ApiError(
            400, f"expected kind {kind} of apiVersion v1, got {body.get('kind')} {body.get('apiVersion')}"
        )
    obj = copy.deepcopy(body)
    obj["kind"], obj["apiVersion"] = kind, "v1"
    obj.setdefault("metadata", {})
    return obj


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
