"""An in-process emulator of the Kubernetes core/v1 HTTP API, for end-to-end tests and the demo.

Where it sits: simulation only. Tests and the demo start an `ApiServer` and point the real
`kubernetes_asyncio` client of every service at its URL, so the services run unchanged against it.
Production services never import this module. It must never stand in for, proxy to, or talk to a
real cluster, never hold real credentials, and never listen beyond the address it is given
(loopback by default): everything lives in memory and nothing is enforced. The only connections it
makes are the calls to the admission webhooks a test gives it.

What it emulates (core/v1 only): pods, configmaps and events (namespaced) and nodes
(cluster-scoped); the subresources pods/binding, pods/status and nodes/status; the verbs get, list,
watch, create (with generateName), update, patch (merge, strategic merge, JSON patch) and delete;
one global resourceVersion bumped on every write; optimistic concurrency (409 Conflict on a stale
metadata.resourceVersion); label and field selectors on lists and watches; watches that replay
retained history from a resourceVersion, send synthetic ADDED events without one, send BOOKMARK
events, honour timeoutSeconds, turn selector transitions into ADDED/DELETED as the real watch cache
does, and answer a resourceVersion older than the retained history with an ERROR event (410
Expired). Errors are always `Status` objects. Behaviours of the real API kept on purpose: an update
or patch that changes nothing is not a write (no new resourceVersion, no watch event); writes to a
pod or node ignore `status` and writes to their `status` subresource change only `status`;
binding answers `201` with a `Status` (not the Binding), and a Binding whose metadata.name differs
from the pod is refused.

Timing: with `watch_delay` every event a watch delivers (synthetic ADDED and history replays
included) is written no earlier than that many seconds after it was queued for that watch, in
order, as from a watch cache lagging behind etcd; a BOOKMARK is only sent when nothing is held back.

Mutating admission webhooks (`AdmissionWebhook`), on pod CREATE only, as the real API server calls
them: in order, after the request's namespace is checked and before the name is generated, the
object validated and defaulted; an `admission.k8s.io/v1` AdmissionReview is POSTed to the webhook's
URL with `?timeout=<N>s`; a `JSONPatch` answer mutates the pod, `allowed: false` refuses the create
with the webhook's status (code 400 when it gives none below 400, message `admission webhook
"<name>" denied the request: ...`); a call that fails (refused, timed out, not 2xx, unreadable, a
wrong uid, apiVersion or kind, an undecodable patch) refuses the create with 500 `Internal error
occurred: failed calling webhook "<name>": ...` under failurePolicy Fail and is skipped under
Ignore; a patch that cannot be applied is a 500 under either policy. The wording of the underlying
network and decoding errors is the emulator's, not Go's.

Pod validation, as the real API's ValidatePodCreate/ValidatePodUpdate, for what scheduling gates
need. On create: `spec.schedulingGates` with `spec.nodeName` is 422, and a pod with gates gets the
condition PodScheduled=False, reason SchedulingGated (unless it already has a PodScheduled
condition). On update and patch of a pod (not of pods/status), the spec is immutable except:
containers' and initContainers' `image`, `activeDeadlineSeconds`, `terminationGracePeriodSeconds`
from a negative value to 1, `tolerations` (existing ones kept, only their tolerationSeconds may
change), `schedulingGates` (entries may only be removed), and, while the stored pod has gates,
`nodeSelector` (keys may only be added) and `affinity.nodeAffinity` (preferred terms freely; a
required node selector may be set when absent, and one that is present keeps its number of terms,
each of which may only gain requirements after those it has). Unset, null, [] and {} compare
equal, as in the real API's semantic equality.
Refusals are 422 Invalid with the real message `Pod "<name>" is invalid: <field>: <reason>` and
causes; values are shown as JSON (not Go syntax) and the spec diff after "pod updates may not change
fields other than ..." lists the changed paths (not Go's cmp.Diff). Binding a pod with gates is
409 `Operation cannot be fulfilled on pods/binding "<name>": pod <name> has non-empty
.spec.schedulingGates`. As in the real API, the SchedulingGated condition stays when the gates go,
until the scheduler writes PodScheduled.

What it does NOT emulate:
- authentication and RBAC: bearer tokens are only recorded (`RequestRecord.identity`) and passed
  to webhooks as the username, never checked;
- admission beyond the mutating webhooks above: no validating webhooks or admission policies, no
  webhooks on other resources, subresources or operations, no reinvocation, no namespace or object
  selectors, no CEL (`AdmissionWebhook.matches` stands in for matchConditions), service references
  or caBundle (https is verified against the system's certificates), audit annotations or
  warnings; no quota, limit ranges or defaulting beyond `status.phase: Pending` for a new pod
  created without a status (the real API resets a new pod's status; this keeps a given one);
- validation beyond object names (RFC 1123 subdomains), kind/apiVersion, name/namespace agreement
  with the URL, Binding targets, selector syntax and the pod rules above (not: the pod's own
  schema, gate names and duplicates, how activeDeadlineSeconds may change, QoS immutability,
  metadata update rules, in-place resize);
- graceful deletion: DELETE removes any object, pods included, at once (no deletionTimestamp,
  grace period, finalizers or garbage collection); of DeleteOptions only preconditions are honoured;
- strategic merge semantics: a strategic merge patch is applied as an RFC 7386 merge patch, so lists
  are replaced whole rather than merged by key, and `$patch`/`$retainKeys` directives are not special;
- server-side apply (`application/apply-patch+yaml` gets 415), protobuf, table output, dry run,
  managed fields, metadata.generation;
- pagination (`limit`/`continue` are ignored: lists are complete) and the resourceVersion options of a
  list (a list is always served at the current resourceVersion); `resourceVersionMatch`,
  `sendInitialEvents`, the legacy `/api/v1/watch/...` paths, deletecollection;
- Namespace objects and every other resource or API group (any namespace name is accepted);
- a watch from a resourceVersion newer than the current one just streams live changes (the real API
  waits, then answers 504 "Too large resource version");
- any controller: no scheduler, kubelet, node heartbeats, event aggregation or TTL.

Test hooks on `ApiServer`: `request_log` (webhook calls are not in it), `bookmarks_sent`,
`fail_next`, `drop_watches` (aborts the TCP connections: the client sees
`aiohttp.ClientPayloadError`), `expire_history`, `objects` and the settable `watch_delay`.

Concurrency: everything runs on one asyncio loop; every store operation is synchronous, hence atomic,
and each open watch gets its changes through its own asyncio.Queue, in resourceVersion order. A pod
create awaits its webhooks before its synchronous store operation, so other requests go on meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import math
import random
import re
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal

import aiohttp
from aiohttp import web
from yarl import URL

JsonObject = dict[str, Any]

VERBS: Final = frozenset({"get", "list", "watch", "create", "update", "patch", "delete"})

MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"
JSON_PATCH: Final = "application/json-patch+json"

_REASONS: Final = {
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
_TRUE: Final = frozenset({"1", "t", "T", "true", "True", "TRUE"})
_FALSE: Final = frozenset({"", "0", "f", "F", "false", "False", "FALSE"})
_NAME: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_KEY: Final = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE: Final = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_SET_TERM: Final = re.compile(r"(?P<key>[^\s=!()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)")
_EQUALITY_TERM: Final = re.compile(r"(?P<key>[^\s=!()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s=!()]*)")
_EXISTENCE_TERM: Final = re.compile(r"(?P<absent>!?)\s*(?P<key>[^\s=!()]+)")
_FIELD_TERM: Final = re.compile(r"(?P<label>[^\s=!]+)\s*(?P<op>==|=|!=)\s*(?P<value>.*)")
_GENERATED_SUFFIX_ALPHABET: Final = "bcdfghjklmnpqrstvwxz2456789"


@dataclass(frozen=True)
class RequestRecord:
    """One request to a resource path, as `ApiServer.request_log` keeps it for audits in tests.

    `identity` is the bearer token of the request, if any. Requests to unknown paths (404) or with a
    method the path does not allow (405) are not recorded."""

    method: str
    path: str
    verb: str
    resource: str
    namespace: str | None
    user_agent: str
    identity: str | None


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


@dataclass(frozen=True)
class _Kind:
    kind: str
    namespaced: bool
    subresources: frozenset[str]
    fields: frozenset[str]
    """Field selector labels besides metadata.name and metadata.namespace."""


_KINDS: Final = {
    "pods": _Kind(
        "Pod",
        True,
        frozenset({"status", "binding"}),
        frozenset({"spec.nodeName", "spec.schedulerName", "spec.serviceAccountName", "spec.restartPolicy"})
        | {"status.phase", "status.podIP", "status.nominatedNodeName"},
    ),
    "nodes": _Kind("Node", False, frozenset({"status"}), frozenset({"spec.unschedulable"})),
    "configmaps": _Kind("ConfigMap", True, frozenset(), frozenset()),
    "events": _Kind(
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
_FIELD_PATHS: Final = {"source": "source.component"}  # where a label is not the object's own path
_UNSET_FIELD_TEXT: Final = {"spec.unschedulable": "false"}  # how an unset field compares, "" otherwise


class _ApiError(Exception):
    """Answered as a `Status` object with HTTP status `code`; `reason` defaults to the code's usual
    reason, and "" leaves it out (as a webhook's denial without one)."""

    def __init__(self, code: int, message: str, reason: str | None = None, details: JsonObject | None = None):
        super().__init__(message)
        self.code = code
        self.body = _failure(
            code, message, _REASONS.get(code, "Unknown") if reason is None else reason, details
        )


def _failure(code: int, message: str, reason: str, details: JsonObject | None = None) -> JsonObject:
    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message}
    return (
        status
        | ({"reason": reason} if reason else {})
        | {"code": code}
        | ({"details": details} if details else {})
    )


def _internal_error(message: str) -> _ApiError:
    """The real API's 500 for an error it did not expect, as apierrors.NewInternalError words it."""
    return _ApiError(500, f"Internal error occurred: {message}", details={"causes": [{"message": message}]})


@dataclass(frozen=True)
class _FieldError:
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


def _invalid(kind: str, name: str, errors: Sequence[_FieldError]) -> _ApiError:
    """The real API's 422 for a refused object (apierrors.NewInvalid): one message and one cause per error."""
    texts = [f"{error.field}: {error.body()}" for error in errors]
    summary = texts[0] if len(texts) == 1 else f"[{', '.join(texts)}]"
    causes = [
        {"reason": f"FieldValue{error.type}", "message": error.body(), "field": error.field}
        for error in errors
    ]
    return _ApiError(
        422, f'{kind} "{name}" is invalid: {summary}', details={"name": name, "kind": kind, "causes": causes}
    )


def _json_response(body: JsonObject, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _ApiError(400, f"the request body is not valid JSON: {error}") from None


def _bool_param(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "")
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _ApiError(400, f"{name}: invalid boolean {value!r}")


# --- selectors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LabelRequirement:
    key: str
    operator: str  # "in", "notin", "exists" or "absent"; "=" is "in" and "!=" is "notin" of one value
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "absent":
            return self.key not in labels
        return (labels.get(self.key) in self.values) == (self.operator == "in")


@dataclass(frozen=True)
class _FieldRequirement:
    path: tuple[str, ...]
    unset: str
    value: str
    equal: bool

    def matches(self, obj: JsonObject) -> bool:
        actual: Any = obj
        for part in self.path:
            actual = actual.get(part) if isinstance(actual, dict) else None
        if isinstance(actual, bool):
            actual = "true" if actual else "false"
        text = self.unset if actual is None else str(actual)
        return (text == self.value) == self.equal


def _split_top_level(text: str) -> list[str]:
    """Splits a label selector at the commas outside parentheses."""
    terms, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    terms.append(text[start:])
    return [term.strip() for term in terms if term.strip()]


def _parse_label_selector(text: str) -> tuple[_LabelRequirement, ...]:
    requirements = []
    for term in _split_top_level(text):
        if match := _SET_TERM.fullmatch(term):
            values = [value.strip() for value in match["values"].split(",")]
            requirement = _LabelRequirement(match["key"], match["op"], frozenset(values))
        elif match := _EQUALITY_TERM.fullmatch(term):
            operator = "notin" if match["op"] == "!=" else "in"
            requirement = _LabelRequirement(match["key"], operator, frozenset({match["value"]}))
        elif match := _EXISTENCE_TERM.fullmatch(term):
            requirement = _LabelRequirement(
                match["key"], "absent" if match["absent"] else "exists", frozenset()
            )
        else:
            raise _ApiError(400, f"unable to parse requirement {term!r} of label selector {text!r}")
        invalid = not _LABEL_KEY.fullmatch(requirement.key) or not all(
            _LABEL_VALUE.fullmatch(value) for value in requirement.values
        )
        if invalid:
            raise _ApiError(400, f"invalid label key or value in requirement {term!r}")
        requirements.append(requirement)
    return tuple(requirements)


def _parse_field_selector(text: str, kind: _Kind) -> tuple[_FieldRequirement, ...]:
    requirements = []
    for term in (term.strip() for term in text.split(",")):
        if not term:
            continue
        match = _FIELD_TERM.fullmatch(term)
        if match is None:
            raise _ApiError(400, f"invalid field selector requirement {term!r}")
        label = match["label"]
        if label not in kind.fields and label not in ("metadata.name", "metadata.namespace"):
            raise _ApiError(400, f"field label not supported: {label}")
        path = tuple(_FIELD_PATHS.get(label, label).split("."))
        unset = _UNSET_FIELD_TEXT.get(label, "")
        requirements.append(_FieldRequirement(path, unset, match["value"], match["op"] != "!="))
    return tuple(requirements)


@dataclass(frozen=True)
class _Filter:
    """What a list or watch asked for: a namespace (None for all) and label and field selectors."""

    namespace: str | None
    labels: tuple[_LabelRequirement, ...]
    fields: tuple[_FieldRequirement, ...]

    @classmethod
    def from_query(cls, namespace: str | None, kind: _Kind, query: Mapping[str, str]) -> _Filter:
        return cls(
            namespace,
            _parse_label_selector(query.get("labelSelector", "")),
            _parse_field_selector(query.get("fieldSelector", ""), kind),
        )

    def matches(self, obj: JsonObject) -> bool:
        metadata = obj["metadata"]
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        labels = metadata.get("labels") or {}
        return all(r.matches(labels) for r in self.labels) and all(r.matches(obj) for r in self.fields)


# --- patches -----------------------------------------------------------------------------------


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; `null` deletes a key and lists are replaced whole."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge_patch(merged.get(key), value)
    return merged


def _invalid_patch(message: str) -> _ApiError:
    return _ApiError(422, f"the JSON patch cannot be applied: {message}")


def _pointer(operation: JsonObject, member: str) -> list[str]:
    path = operation.get(member)
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise _ApiError(400, f"JSON patch operation has no valid {member!r} pointer: {operation}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path.split("/")[1:]]


def _index(token: str, size: int, *, may_append: bool) -> int:
    if token == "-" and may_append:
        return size
    if (
        not re.fullmatch(r"0|[1-9][0-9]*", token)
        or int(token) > size
        or (int(token) == size and not may_append)
    ):
        raise _invalid_patch(f"array index {token!r} out of range")
    return int(token)


def _resolve(document: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(document, dict) and token in document:
            document = document[token]
        elif isinstance(document, list):
            document = document[_index(token, len(document), may_append=False)]
        else:
            raise _invalid_patch(f"path /{'/'.join(tokens)} does not exist")
    return document


def _add(document: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _resolve(document, tokens[:-1])
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
    elif isinstance(parent, list):
        parent.insert(_index(tokens[-1], len(parent), may_append=True), value)
    else:
        raise _invalid_patch(f"cannot add below a scalar at /{'/'.join(tokens)}")
    return document


def _remove(document: Any, tokens: list[str]) -> Any:
    """Removes and returns the value at `tokens`."""
    if not tokens:
        raise _invalid_patch("cannot remove the whole document")
    parent = _resolve(document, tokens[:-1])
    if isinstance(parent, dict) and tokens[-1] in parent:
        return parent.pop(tokens[-1])
    if isinstance(parent, list):
        return parent.pop(_index(tokens[-1], len(parent), may_append=False))
    raise _invalid_patch(f"path /{'/'.join(tokens)} does not exist")


def _json_patch(document: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy and test."""
    if not isinstance(operations, list):
        raise _ApiError(400, "a JSON patch must be a list of operations")
    for operation in operations:
        if not isinstance(operation, dict):
            raise _ApiError(400, f"a JSON patch operation must be an object: {operation!r}")
        tokens = _pointer(operation, "path")
        op = operation.get("op")
        if op in ("add", "replace", "test") and "value" not in operation:
            raise _ApiError(400, f"JSON patch operation {op!r} needs a value: {operation}")
        value = copy.deepcopy(operation.get("value"))
        if op == "add":
            document = _add(document, tokens, value)
        elif op == "remove":
            _remove(document, tokens)
        elif op == "replace":
            if tokens:
                _remove(document, tokens)
            document = _add(document, tokens, value)
        elif op == "move":
            document = _add(document, tokens, _remove(document, _pointer(operation, "from")))
        elif op == "copy":
            document = _add(document, tokens, copy.deepcopy(_resolve(document, _pointer(operation, "from"))))
        elif op == "test":
            if _resolve(document, tokens) != value:
                raise _invalid_patch(f"test failed at {operation['path']}")
        else:
            raise _ApiError(400, f"unsupported JSON patch operation {op!r}")
    return document


# --- pod rules ---------------------------------------------------------------------------------

_UPDATABLE_POD_SPEC_FIELDS: Final = ",".join(
    (
        "`spec.containers[*].image`",
        "`spec.initContainers[*].image`",
        "`spec.activeDeadlineSeconds`",
        "`spec.tolerations` (only additions to existing tolerations)",
        "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
    )
)
_REQUIRED_NODE_SELECTOR: Final = "requiredDuringSchedulingIgnoredDuringExecution"
_NODE_SELECTOR_TERMS_PATH: Final = f"spec.affinity.nodeAffinity.{_REQUIRED_NODE_SELECTOR}.nodeSelectorTerms"
_SCHEDULING_GATED: Final = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "SchedulingGated",
    "message": "Scheduling is blocked due to non-empty scheduling gates",
}


def _normalized(value: Any) -> Any:
    """`value` without null, [] or {} members at any depth: the real API's semantic equality does not
    tell them from an unset field. List items keep their positions."""
    if isinstance(value, dict):
        kept = {key: _normalized(member) for key, member in value.items()}
        return {key: member for key, member in kept.items() if member not in (None, [], {})}
    if isinstance(value, list):
        return [_normalized(item) for item in value]
    return value


def _set_or_drop(target: JsonObject, key: str, value: Any) -> None:
    if value is None:
        target.pop(key, None)
    else:
        target[key] = copy.deepcopy(value)


def _differences(old: Any, new: Any, path: str) -> list[str]:
    """One line per changed leaf, `path: old -> new` (the real message shows Go's cmp.Diff instead)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for key in sorted(old.keys() | new.keys())
            for line in _differences(old.get(key), new.get(key), f"{path}.{key}")
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            line
            for i, pair in enumerate(zip(old, new, strict=True))
            for line in _differences(*pair, f"{path}[{i}]")
        ]
    return [] if old == new else [f"  {path}: {json.dumps(old)} -> {json.dumps(new)}"]


def _only_added_requirements(new_term: JsonObject, old_term: JsonObject) -> bool:
    """Whether a node selector term kept the old term's requirements first and in order (they AND)."""
    kinds = ("matchExpressions", "matchFields")
    if not any(old_term.get(kind) for kind in kinds):
        return not any(new_term.get(kind) for kind in kinds)
    return all(
        new_term.get(kind, [])[: len(old_term.get(kind, []))] == old_term.get(kind, []) for kind in kinds
    )


def _node_affinity_errors(new: JsonObject | None, old: JsonObject | None) -> list[_FieldError]:
    """The real validateNodeAffinityMutation: a required node selector may be set when there is none;
    an existing one keeps its number of terms and each term may only gain requirements."""
    old_required = (old or {}).get(_REQUIRED_NODE_SELECTOR)
    if old_required is None:
        return []
    old_terms = old_required.get("nodeSelectorTerms", [])
    new_terms = (new or {}).get(_REQUIRED_NODE_SELECTOR, {}).get("nodeSelectorTerms", [])
    if old_terms and len(new_terms) != len(old_terms):
        detail = "no additions/deletions to non-empty NodeSelectorTerms list are allowed"
        return [_FieldError(_NODE_SELECTOR_TERMS_PATH, "Invalid", detail, new_terms)]
    return [
        _FieldError(
            f"{_NODE_SELECTOR_TERMS_PATH}[{index}]",
            "Invalid",
            "only additions are allowed (no mutations or deletions)",
            new_term,
        )
        for index, (new_term, old_term) in enumerate(zip(new_terms, old_terms, strict=False))
        if not _only_added_requirements(new_term, old_term)
    ]


def _pod_spec_update_errors(old_spec: Any, new_spec: Any) -> list[_FieldError]:
    """What the real ValidatePodUpdate says against changing a pod's spec from `old_spec` to
    `new_spec`, for the rules the module docstring lists; empty when the change is allowed."""
    old, new = _normalized(old_spec or {}), _normalized(new_spec or {})
    for containers in ("containers", "initContainers"):
        if len(new.get(containers, [])) != len(old.get(containers, [])):
            detail = "pod updates may not add or remove containers"
            return [_FieldError(f"spec.{containers}", "Forbidden", detail)]
    errors: list[_FieldError] = []
    new_tolerations = [{**t, "tolerationSeconds": None} for t in new.get("tolerations", [])]
    if any({**t, "tolerationSeconds": None} not in new_tolerations for t in old.get("tolerations", [])):
        detail = "existing toleration can not be modified except its tolerationSeconds"
        errors.append(_FieldError("spec.tolerations", "Forbidden", detail))
    old_gates = {gate.get("name") for gate in old.get("schedulingGates", [])}
    added_gates = {gate.get("name"): i for i, gate in enumerate(new.get("schedulingGates", []))}
    for gate, index in added_gates.items():
        if gate not in old_gates:
            detail = f"only deletion is allowed, but found new scheduling gate '{gate}'"
            errors.append(_FieldError(f"spec.schedulingGates[{index}].name", "Forbidden", detail))
    if new == old:
        return errors
    munged = copy.deepcopy(new)
    for containers in ("containers", "initContainers"):
        for container, was in zip(munged.get(containers, []), old.get(containers, []), strict=True):
            _set_or_drop(container, "image", was.get("image"))
    for field in ("activeDeadlineSeconds", "schedulingGates", "tolerations"):
        _set_or_drop(munged, field, old.get(field))
    grace = old.get("terminationGracePeriodSeconds")
    if isinstance(grace, int) and grace < 0 and munged.get("terminationGracePeriodSeconds") == 1:
        munged["terminationGracePeriodSeconds"] = grace
    if old.get("schedulingGates"):  # a gated pod may still narrow where it is to run
        new_selector, old_selector = munged.get("nodeSelector", {}), old.get("nodeSelector", {})
        if any(new_selector.get(key) != value for key, value in old_selector.items()):
            detail = "only additions to spec.nodeSelector are allowed (no mutations or deletions)"
            errors.append(_FieldError("spec.nodeSelector", "Invalid", detail, new_selector))
        _set_or_drop(munged, "nodeSelector", old.get("nodeSelector"))
        old_affinity = old.get("affinity", {}).get("nodeAffinity")
        errors += _node_affinity_errors(munged.get("affinity", {}).get("nodeAffinity"), old_affinity)
        _set_or_drop(munged.setdefault("affinity", {}), "nodeAffinity", old_affinity)
    munged = _normalized(munged)
    if munged != old:
        changes = "\n".join(_differences(old, munged, "spec"))
        detail = f"pod updates may not change fields other than {_UPDATABLE_POD_SPEC_FIELDS}\n{changes}"
        errors.append(_FieldError("spec", "Forbidden", detail))
    return errors


def _prepare_new_pod(pod: JsonObject) -> None:
    """What the real API's PrepareForCreate does to a new pod, as far as the emulator goes: a
    `Pending` phase when it has no status, and the SchedulingGated condition when it has gates."""
    if not pod.get("status"):
        pod["status"] = {"phase": "Pending"}
    conditions = pod["status"].get("conditions") or []
    gated = bool((pod.get("spec") or {}).get("schedulingGates"))
    if gated and not any(condition.get("type") == "PodScheduled" for condition in conditions):
        gated_since = {"lastProbeTime": None, "lastTransitionTime": _now()}
        pod["status"]["conditions"] = [*conditions, _SCHEDULING_GATED | gated_since]


def _binding_conflict(pod_name: str, why: str) -> _ApiError:
    """The real API's 409 for a binding its storage refuses."""
    message = f'Operation cannot be fulfilled on pods/binding "{pod_name}": {why}'
    return _ApiError(409, message, details={"name": pod_name, "kind": "pods/binding"})


# --- store and watches -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Change:
    """One write. `obj` is the object after it (for DELETED: its last state at the deletion's
    resourceVersion); `previous` the object before it, to turn selector transitions into events."""

    resource_version: int
    resource: str
    type: str
    obj: JsonObject
    previous: JsonObject | None


@dataclass(frozen=True)
class _Queued:
    """A change waiting in one watch's queue, with the loop time it was queued at."""

    change: _Change
    queued_at: float


@dataclass(eq=False)
class _Watch:
    resource: str
    filter: _Filter
    queue: asyncio.Queue[_Queued | None]  # None ends the stream cleanly
    transport: asyncio.Transport | None

    def push(self, change: _Change) -> None:
        self.queue.put_nowait(_Queued(change, asyncio.get_running_loop().time()))

    def event_for(self, change: _Change) -> tuple[str, JsonObject] | None:
        matches_now = self.filter.matches(change.obj)
        if change.type == "DELETED":
            return ("DELETED", change.obj) if matches_now else None
        matched_before = change.previous is not None and self.filter.matches(change.previous)
        if matches_now:
            return ("MODIFIED" if matched_before else "ADDED"), change.obj
        if matched_before and change.previous is not None:
            gone = copy.deepcopy(change.previous)
            gone["metadata"]["resourceVersion"] = str(change.resource_version)
            return "DELETED", gone
        return None


class _Store:
    """Objects, the global resourceVersion, retained history and open watches.

    Every method is synchronous, so each runs atomically on the event loop. Stored objects are
    never mutated after they are stored: a write stores a new dict."""

    def __init__(self, history_limit: int) -> None:
        self.resource_version = 0
        self.objects: dict[str, dict[tuple[str, str], JsonObject]] = {resource: {} for resource in _KINDS}
        self.watches: set[_Watch] = set()
        self._history: deque[_Change] = deque()
        self._history_limit = history_limit
        self._history_floor = 0  # every change after this resourceVersion is retained

    def get(self, resource: str, namespace: str | None, name: str) -> JsonObject:
        found = self.objects[resource].get((namespace or "", name))
        if found is None:
            details = {"name": name, "kind": resource}
            raise _ApiError(404, f'{resource} "{name}" not found', details=details)
        return found

    def items(self, resource: str) -> list[JsonObject]:
        return [self.objects[resource][key] for key in sorted(self.objects[resource])]

    def commit(
        self, resource: str, change_type: str, obj: JsonObject, previous: JsonObject | None
    ) -> JsonObject:
        self.resource_version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.resource_version)
        key = (stored["metadata"].get("namespace", ""), stored["metadata"]["name"])
        if change_type == "DELETED":
            del self.objects[resource][key]
        else:
            self.objects[resource][key] = stored
        change = _Change(self.resource_version, resource, change_type, stored, previous)
        self._history.append(change)
        while len(self._history) > self._history_limit:
            self._history_floor = self._history.popleft().resource_version
        for watch in self.watches:
            if watch.resource == resource:
                watch.push(change)
        return stored

    def expire_history(self) -> None:
        self._history.clear()
        self._history_floor = self.resource_version

    def open_watch(self, watch: _Watch, since: int | None) -> None:
        """Queues what the watch must see first and registers it for live changes."""
        if since is None:
            initial = [
                _Change(int(obj["metadata"]["resourceVersion"]), watch.resource, "ADDED", obj, None)
                for obj in self.items(watch.resource)
            ]
        elif since < self._history_floor:
            raise _ApiError(410, f"too old resource version: {since} ({self._history_floor})", "Expired")
        else:
            initial = [
                c for c in self._history if c.resource_version > since and c.resource == watch.resource
            ]
        for change in initial:
            watch.push(change)
        self.watches.add(watch)


# --- admission webhooks ------------------------------------------------------------------------

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


def _denial(webhook_name: str, status: Any) -> _ApiError:
    """The real webhookerrors.ToStatusErr: the webhook's status with a code of at least 400 (400
    when it gives none) and its message (else its reason) after who denied the request."""
    result = status if isinstance(status, dict) else {}
    code = result.get("code")
    denied = f'admission webhook "{webhook_name}" denied the request'
    explanation = result.get("message") or result.get("reason")
    return _ApiError(
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
        return _checked_object(_json_patch(copy.deepcopy(pod), operations), "Pod")
    except _ApiError as error:
        raise _internal_error(str(error)) from None


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    resource: str
    kind: _Kind
    namespace: str | None
    name: str | None
    subresource: str | None

    @property
    def audited_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    @classmethod
    def parse(cls, tail: str) -> _Target:
        parts = tail.strip("/").split("/")
        namespace = None
        if parts[0] == "namespaces" and len(parts) >= 3:
            namespace, parts = parts[1], parts[2:]
        kind = _KINDS.get(parts[0])
        name = parts[1] if len(parts) > 1 else None
        subresource = parts[2] if len(parts) > 2 else None
        unknown = (
            kind is None
            or len(parts) > 3
            or (namespace is not None and not kind.namespaced)
            or (namespace is None and name is not None and kind.namespaced)
            or (subresource is not None and subresource not in kind.subresources)
        )
        if unknown or kind is None:
            raise _ApiError(404, f"the server could not find the requested resource: /api/v1/{tail}")
        return cls(parts[0], kind, namespace, name, subresource)

    def verb(self, method: str, query: Mapping[str, str]) -> str:
        if self.name is None:
            if method == "GET":
                return "watch" if _bool_param(query, "watch") else "list"
            if method == "POST" and (self.namespace is not None or not self.kind.namespaced):
                return "create"
        elif self.subresource == "binding":
            if method == "POST":
                return "create"
        elif method in ("GET", "PUT", "PATCH") or (method == "DELETE" and self.subresource is None):
            return {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
        raise _ApiError(405, f"{method} is not allowed on {self.audited_resource}")


def _checked_object(body: Any, kind: str) -> JsonObject:
    """A deep copy of a request body that must be an object of `kind`, with kind and apiVersion set."""
    if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
        raise _ApiError(400, f"the request body must be a {kind} object")
    if body.get("kind", kind) != kind or body.get("apiVersion", "v1") != "v1":
        raise _ApiError(
            400, f"expected kind {kind} of apiVersion v1, got {body.get('kind')} {body.get('apiVersion')}"
        )
    obj = copy.deepcopy(body)
    obj["kind"], obj["apiVersion"] = kind, "v1"
    obj.setdefault("metadata", {})
    return obj


def _check_resource_version(target: _Target, current: JsonObject, resource_version: Any) -> None:
    if resource_version and resource_version != current["metadata"]["resourceVersion"]:
        raise _ApiError(
            409,
            f'Operation cannot be fulfilled on {target.resource} "{target.name}": the object has been '
            "modified; please apply your changes to the latest version and try again",
            details={"name": target.name, "kind": target.resource},
        )


def _bookmark(kind: str, resource_version: int) -> JsonObject:
    return {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(resource_version)}}


async def _send(response: web.StreamResponse, event_type: str, obj: JsonObject) -> None:
    await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")


@web.middleware
async def _errors_as_status(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except _ApiError as error:
        return _json_response(error.body, error.code)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _json_response(
            _failure(error.status, error.reason, _REASONS.get(error.status, "Unknown")), error.status
        )


class ApiServer:
    """The emulator: `async with ApiServer() as api:` serves on a free loopback port at `api.url`.

    `history_limit` is how many writes a watch can replay; `bookmark_interval` how often an idle
    watch that asked for bookmarks gets one; `watch_delay` (seconds, also settable later as an
    attribute) how long every watch event is held back after it was queued for its watch;
    `admission_webhooks` the mutating webhooks every pod create goes through, in order.

    Besides HTTP it offers test hooks: `request_log`, `fail_next`, `drop_watches`,
    `expire_history`, `objects` and `watch_delay`."""

    def __init__(
        self,
        *,
        history_limit: int = 1000,
        bookmark_interval: float = 1.0,
        watch_delay: float = 0.0,
        admission_webhooks: Sequence[AdmissionWebhook] = (),
    ) -> None:
        self.request_log: list[RequestRecord] = []
        self.bookmarks_sent = 0
        self.watch_delay = watch_delay
        self._store = _Store(history_limit)
        self._bookmark_interval = bookmark_interval
        self._webhooks = tuple(admission_webhooks)
        self._failures: list[tuple[str, str, int]] = []
        self._runner: web.AppRunner | None = None
        self._webhook_client: aiohttp.ClientSession | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the API server is not started")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if self._runner is not None:
            raise RuntimeError("the API server is already started")
        app = web.Application(middlewares=[_errors_as_status])
        for path, discovery in (
            ("/version", self._version),
            ("/api", self._api_versions),
            ("/apis", self._api_groups),
            ("/api/v1", self._api_resources),
        ):
            app.router.add_get(path, discovery)
            app.router.add_get(f"{path}/", discovery)
        app.router.add_route("*", "/api/v1/{tail:.+}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_port = self._runner.addresses[0][1]
        self._webhook_client = aiohttp.ClientSession()
        self._url = f"http://{host}:{bound_port}"
        return self._url

    async def stop(self) -> None:
        """Ends every watch cleanly, then stops serving."""
        for watch in self._store.watches:
            watch.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._webhook_client is not None:
            await self._webhook_client.close()
        self._runner = None
        self._webhook_client = None
        self._url = None

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.stop()

    # --- test hooks ---

    def drop_watches(self) -> None:
        """Aborts the connection of every open watch, as a network failure would (no clean end)."""
        for watch in list(self._store.watches):
            self._store.watches.discard(watch)
            if watch.transport is not None:
                watch.transport.abort()

    def expire_history(self) -> None:
        """Forgets the retained history: a watch from any older resourceVersion then gets 410."""
        self._store.expire_history()

    def fail_next(self, verb: str, resource: str, status: int) -> None:
        """Makes the next request with this verb on this resource (e.g. "pods/binding") fail with `status`."""
        if verb not in VERBS or status < 400:
            raise ValueError(
                f"fail_next needs a verb of {sorted(VERBS)} and an error status, got {verb} {status}"
            )
        self._failures.append((verb, resource, status))

    def objects(self, resource: str, namespace: str | None = None) -> list[JsonObject]:
        """Deep copies of the stored objects of `resource`, in namespace/name order."""
        if resource not in _KINDS:
            raise ValueError(f"unknown resource {resource!r}; known: {sorted(_KINDS)}")
        items = self._store.items(resource)
        return [
            copy.deepcopy(o)
            for o in items
            if namespace is None or o["metadata"].get("namespace") == namespace
        ]

    # --- discovery ---

    async def _version(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "major": "1",
                "minor": "31",
                "gitVersion": "v1.31.0-mpsflow-emulator",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2024-08-13T00:00:00Z",
                "goVersion": "go1.22.5",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        )

    async def _api_versions(self, request: web.Request) -> web.Response:
        address = {"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}
        return _json_response(
            {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [address]}
        )

    async def _api_groups(self, request: web.Request) -> web.Response:
        return _json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})

    async def _api_resources(self, request: web.Request) -> web.Response:
        def entry(name: str, kind: _Kind, kind_name: str, verbs: str) -> JsonObject:
            singular = "" if "/" in name else kind_name.lower()
            return {
                "name": name,
                "singularName": singular,
                "namespaced": kind.namespaced,
                "kind": kind_name,
                "verbs": verbs.split(),
            }

        resources = []
        for resource, kind in _KINDS.items():
            resources.append(entry(resource, kind, kind.kind, "create delete get list patch update watch"))
            if "status" in kind.subresources:
                resources.append(entry(f"{resource}/status", kind, kind.kind, "get patch update"))
            if "binding" in kind.subresources:
                resources.append(entry(f"{resource}/binding", kind, "Binding", "create"))
        return _json_response({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources})

    # --- resources ---

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = _Target.parse(request.match_info["tail"])
        verb = target.verb(request.method, request.query)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        identity = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        self.request_log.append(
            RequestRecord(
                method=request.method,
                path=request.path,
                verb=verb,
                resource=target.audited_resource,
                namespace=target.namespace,
                user_agent=request.headers.get("User-Agent", ""),
                identity=identity,
            )
        )
        for index, (failing_verb, resource, status) in enumerate(self._failures):
            if (failing_verb, resource) == (verb, target.audited_resource):
                del self._failures[index]
                raise _ApiError(status, f"injected failure of {verb} {resource}")
        if verb == "watch":
            return await self._watch(request, target)
        if verb == "list":
            return _json_response(self._list(target, request.query))
        if verb == "get":
            return _json_response(self._store.get(target.resource, target.namespace, target.name or ""))
        raw = await request.read()
        if verb == "create" and target.subresource == "binding":
            return _json_response(self._bind(target, _parse_json(raw)), 201)
        if verb == "create":
            return _json_response(await self._create(target, _parse_json(raw), identity, request.query), 201)
        if verb == "update":
            return _json_response(self._update(target, _parse_json(raw)))
        if verb == "patch":
            return _json_response(self._patch(target, raw, request.content_type))
        return _json_response(self._delete(target, raw))

    def _list(self, target: _Target, query: Mapping[str, str]) -> JsonObject:
        selected = _Filter.from_query(target.namespace, target.kind, query)
        items = [
            {key: value for key, value in obj.items() if key not in ("kind", "apiVersion")}
            for obj in self._store.items(target.resource)
            if selected.matches(obj)
        ]
        return {
            "kind": f"{target.kind.kind}List",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._store.resource_version)},
            "items": items,
        }

    async def _create(
        self, target: _Target, body: Any, identity: str | None, query: Mapping[str, str]
    ) -> JsonObject:
        obj = _checked_object(body, target.kind.kind)
        if target.kind.namespaced:
            if (obj["metadata"].get("namespace") or target.namespace) != target.namespace:
                raise _ApiError(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            obj["metadata"]["namespace"] = target.namespace
        if target.resource == "pods" and target.subresource is None:
            obj = await self._admit(obj, identity, query)
        return self._store_created(target, obj)

    async def _admit(self, pod: JsonObject, identity: str | None, query: Mapping[str, str]) -> JsonObject:
        """Calls every webhook whose `matches` allows it, in order, as the real API server calls mutating
        webhooks on a create, and returns the pod as they left it."""
        options = {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"} | {
            option: query[option] for option in ("fieldManager", "fieldValidation") if query.get(option)
        }
        for webhook in self._webhooks:
            if webhook.matches is not None and not webhook.matches(copy.deepcopy(pod)):
                continue
            if self._webhook_client is None:
                raise RuntimeError("the API server is not started")
            review = _admission_review(str(uuid.uuid4()), pod, identity, options)
            try:
                pod = _admitted(webhook.name, pod, await _post_review(self._webhook_client, webhook, review))
            except _WebhookCallError as failure:
                if webhook.failure_policy == "Fail":
                    raise _internal_error(f'failed calling webhook "{webhook.name}": {failure}') from None
        return pod

    def _store_created(self, target: _Target, obj: JsonObject) -> JsonObject:
        """Names, checks, defaults and stores an admitted new object, in one synchronous step."""
        metadata = obj["metadata"]
        if metadata.get("resourceVersion"):
            raise _ApiError(400, "resourceVersion should not be set on objects to be created")
        name = metadata.get("name")
        if not name and metadata.get("generateName"):
            name = metadata["generateName"] + "".join(random.choices(_GENERATED_SUFFIX_ALPHABET, k=5))
        if not isinstance(name, str) or len(name) > 253 or not _NAME.fullmatch(name):
            raise _ApiError(
                422, f"metadata.name: Invalid value: {name!r}: must be a lowercase RFC 1123 subdomain"
            )
        spec = obj.get("spec") or {}
        if target.resource == "pods" and spec.get("nodeName") and spec.get("schedulingGates"):
            detail = "cannot be set until all schedulingGates have been cleared"
            raise _invalid("Pod", name, [_FieldError("spec.nodeName", "Forbidden", detail)])
        if (target.namespace or "", name) in self._store.objects[target.resource]:
            details = {"name": name, "kind": target.resource}
            raise _ApiError(409, f'{target.resource} "{name}" already exists', "AlreadyExists", details)
        metadata.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=_now())
        metadata.pop("namespace", None)
        if target.kind.namespaced:
            metadata["namespace"] = target.namespace
        if target.resource == "pods":
            _prepare_new_pod(obj)
        return self._store.commit(target.resource, "ADDED", obj, None)

    def _update(self, target: _Target, body: Any) -> JsonObject:
        current = self._store.get(target.resource, target.namespace, target.name or "")
        incoming = _checked_object(body, target.kind.kind)
        _check_resource_version(target, current, incoming["metadata"].get("resourceVersion"))
        return self._write_update(target, current, incoming)

    def _patch(self, target: _Target, raw: bytes, content_type: str) -> JsonObject:
        current = self._store.get(target.resource, target.namespace, target.name or "")
        patch = _parse_json(raw)
        if content_type in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
            if not isinstance(patch, dict):
                raise _ApiError(400, "a merge patch must be a JSON object")
            patched = _merge_patch(current, patch)
        elif content_type == JSON_PATCH:
            patched = _json_patch(copy.deepcopy(current), patch)
        else:
            raise _ApiError(415, f"the patch content type {content_type!r} is not supported by the emulator")
        incoming = _checked_object(patched, target.kind.kind)
        _check_resource_version(target, current, incoming["metadata"].get("resourceVersion"))
        return self._write_update(target, current, incoming)

    def _write_update(self, target: _Target, current: JsonObject, incoming: JsonObject) -> JsonObject:
        metadata = incoming["metadata"]
        expected = {"name": target.name, "namespace": target.namespace if target.kind.namespaced else None}
        for field, value in expected.items():
            if value is not None and metadata.get(field) and metadata[field] != value:
                message = (
                    f"the {field} of the object ({metadata[field]}) does not match the {field} on the URL"
                )
                raise _ApiError(400, f"{message} ({value})")
        if target.subresource == "status":
            updated = copy.deepcopy(current)
            updated["status"] = incoming.get("status", {})
        else:
            updated = incoming
            if "status" in target.kind.subresources:
                updated.pop("status", None)
                if "status" in current:
                    updated["status"] = current["status"]
        for field in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion"):
            updated["metadata"].pop(field, None)
            if field in current["metadata"]:
                updated["metadata"][field] = current["metadata"][field]
        if target.resource == "pods" and target.subresource is None:
            errors = _pod_spec_update_errors(current.get("spec"), updated.get("spec"))
            if errors:
                raise _invalid("Pod", target.name or "", errors)
        if updated == current:
            return current
        return self._store.commit(target.resource, "MODIFIED", updated, current)

    def _delete(self, target: _Target, raw: bytes) -> JsonObject:
        current = self._store.get(target.resource, target.namespace, target.name or "")
        options = _parse_json(raw) if raw.strip() else {}
        preconditions = (options.get("preconditions") if isinstance(options, dict) else None) or {}
        for field in ("uid", "resourceVersion"):
            wanted = preconditions.get(field)
            if wanted and wanted != current["metadata"].get(field):
                raise _ApiError(
                    409,
                    f"Precondition failed: {field} in precondition: {wanted}, in object meta: "
                    f"{current['metadata'].get(field)}",
                )
        return self._store.commit(target.resource, "DELETED", current, current)

    def _bind(self, target: _Target, body: Any) -> JsonObject:
        binding = _checked_object(body, "Binding")
        if binding["metadata"].get("name") != target.name:
            raise _ApiError(400, "name in URL does not match name in Binding object")
        node_target = binding.get("target")
        if not isinstance(node_target, dict) or not node_target.get("name"):
            raise _ApiError(422, "target.name: Required value")
        if node_target.get("kind", "Node") not in ("", "Node"):
            raise _ApiError(422, f"target.kind: Unsupported value: {node_target.get('kind')!r}: must be Node")
        pod_name = target.name or ""
        pod = self._store.get("pods", target.namespace, pod_name)
        bound_to = (pod.get("spec") or {}).get("nodeName")
        if bound_to:
            raise _binding_conflict(pod_name, f'pod {pod_name} is already assigned to node "{bound_to}"')
        if (pod.get("spec") or {}).get("schedulingGates"):
            raise _binding_conflict(pod_name, f"pod {pod_name} has non-empty .spec.schedulingGates")
        bound = copy.deepcopy(pod)
        bound.setdefault("spec", {})["nodeName"] = node_target["name"]
        if binding["metadata"].get("annotations"):
            bound["metadata"].setdefault("annotations", {}).update(binding["metadata"]["annotations"])
        status = bound.setdefault("status", {})
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        status["conditions"] = [
            *conditions,
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()},
        ]
        self._store.commit("pods", "MODIFIED", bound, pod)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    async def _watch(self, request: web.Request, target: _Target) -> web.StreamResponse:
        watch = _Watch(
            target.resource,
            _Filter.from_query(target.namespace, target.kind, request.query),
            asyncio.Queue(),
            request.transport,
        )
        bookmarks = _bool_param(request.query, "allowWatchBookmarks")
        try:
            lifetime = float(request.query["timeoutSeconds"]) if "timeoutSeconds" in request.query else None
            since_text = request.query.get("resourceVersion", "")
            since = int(since_text) if since_text not in ("", "0") else None
        except ValueError:
            raise _ApiError(400, "timeoutSeconds and resourceVersion must be integers") from None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            self._store.open_watch(watch, since)
        except _ApiError as expired:
            await response.prepare(request)
            await _send(response, "ERROR", expired.body)
            await response.write_eof()
            return response
        try:
            await response.prepare(request)
            await self._stream(response, watch, target.kind.kind, lifetime, bookmarks)
            await response.write_eof()
        finally:
            self._store.watches.discard(watch)
        return response

    async def _stream(
        self, response: web.StreamResponse, watch: _Watch, kind: str, lifetime: float | None, bookmarks: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if lifetime is None else loop.time() + lifetime
        next_bookmark = loop.time() + self._bookmark_interval if bookmarks else None
        while deadline is None or loop.time() < deadline:
            wake = min((t for t in (deadline, next_bookmark) if t is not None), default=None)
            try:
                async with asyncio.timeout_at(wake):
                    queued = await watch.queue.get()
            except TimeoutError:
                if next_bookmark is not None and loop.time() >= next_bookmark:
                    # Nothing is queued or held back, so every change up to the current
                    # resourceVersion was sent.
                    await _send(response, "BOOKMARK", _bookmark(kind, self._store.resource_version))
                    self.bookmarks_sent += 1
                    next_bookmark = loop.time() + self._bookmark_interval
                continue
            if queued is None:
                return
            release = queued.queued_at + self.watch_delay
            if release > loop.time():
                if deadline is not None and release > deadline:
                    await asyncio.sleep(deadline - loop.time())
                    return  # the watch's lifetime ends while the change is held back
                await asyncio.sleep(release - loop.time())
            event = watch.event_for(queued.change)
            if event is not None:
                await _send(response, *event)
