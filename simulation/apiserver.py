"""An in-process emulator of the Kubernetes core/v1 HTTP API, for end-to-end tests and the demo.

Where it sits: simulation only. Tests and the demo start an `ApiServer` and point the real
`kubernetes_asyncio` client of every service at its URL, so the services run unchanged against it.
Production services never import this module. It must never stand in for, proxy to, or talk to a
real cluster, never hold real credentials, and never listen beyond the address it is given
(loopback by default): everything lives in memory and nothing is enforced.

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

What it does NOT emulate:
- authentication and RBAC: bearer tokens are only recorded (`RequestRecord.identity`), never checked;
- admission (webhooks, quota, limit ranges, defaulting) beyond `status.phase: Pending` for a new pod
  created without a status (the real API resets a new pod's status; this keeps a given one);
- validation beyond object names (RFC 1123 subdomains), kind/apiVersion, name/namespace agreement
  with the URL, Binding targets and selector syntax; pod spec immutability is not enforced;
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

Test hooks on `ApiServer`: `request_log`, `fail_next`, `drop_watches` (aborts the TCP connections:
the client sees `aiohttp.ClientPayloadError`), `expire_history` and `objects`.

Concurrency: everything runs on one asyncio loop; every store operation is synchronous, hence atomic,
and each open watch gets its changes through its own asyncio.Queue, in resourceVersion order.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import re
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

from aiohttp import web

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
    """Answered as a `Status` object with HTTP status `code`."""

    def __init__(self, code: int, message: str, reason: str | None = None, details: JsonObject | None = None):
        super().__init__(message)
        self.code = code
        self.body = _failure(code, message, reason or _REASONS.get(code, "Unknown"), details)


def _failure(code: int, message: str, reason: str, details: JsonObject | None = None) -> JsonObject:
    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message}
    return status | {"reason": reason, "code": code} | ({"details": details} if details else {})


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


@dataclass(eq=False)
class _Watch:
    resource: str
    filter: _Filter
    queue: asyncio.Queue[_Change | None]  # None ends the stream cleanly
    transport: asyncio.Transport | None

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
                watch.queue.put_nowait(change)
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
            watch.queue.put_nowait(change)
        self.watches.add(watch)


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

    Besides HTTP it offers test hooks: `request_log`, `fail_next`, `drop_watches`,
    `expire_history` and `objects`."""

    def __init__(self, *, history_limit: int = 1000, bookmark_interval: float = 1.0) -> None:
        self.request_log: list[RequestRecord] = []
        self._store = _Store(history_limit)
        self._bookmark_interval = bookmark_interval
        self._failures: list[tuple[str, str, int]] = []
        self._runner: web.AppRunner | None = None
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
        self._url = f"http://{host}:{bound_port}"
        return self._url

    async def stop(self) -> None:
        """Ends every watch cleanly, then stops serving."""
        for watch in self._store.watches:
            watch.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
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
            return _json_response(self._create(target, _parse_json(raw)), 201)
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

    def _create(self, target: _Target, body: Any) -> JsonObject:
        obj = _checked_object(body, target.kind.kind)
        metadata = obj["metadata"]
        if metadata.get("resourceVersion"):
            raise _ApiError(400, "resourceVersion should not be set on objects to be created")
        if target.kind.namespaced and (metadata.get("namespace") or target.namespace) != target.namespace:
            raise _ApiError(
                400, "the namespace of the provided object does not match the namespace sent on the request"
            )
        name = metadata.get("name")
        if not name and metadata.get("generateName"):
            name = metadata["generateName"] + "".join(random.choices(_GENERATED_SUFFIX_ALPHABET, k=5))
        if not isinstance(name, str) or len(name) > 253 or not _NAME.fullmatch(name):
            raise _ApiError(
                422, f"metadata.name: Invalid value: {name!r}: must be a lowercase RFC 1123 subdomain"
            )
        if (target.namespace or "", name) in self._store.objects[target.resource]:
            details = {"name": name, "kind": target.resource}
            raise _ApiError(409, f'{target.resource} "{name}" already exists', "AlreadyExists", details)
        metadata.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=_now())
        metadata.pop("namespace", None)
        if target.kind.namespaced:
            metadata["namespace"] = target.namespace
        if target.resource == "pods" and not obj.get("status"):
            obj["status"] = {"phase": "Pending"}
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
        pod = self._store.get("pods", target.namespace, target.name or "")
        bound_to = (pod.get("spec") or {}).get("nodeName")
        if bound_to:
            raise _ApiError(409, f'pod {target.name} is already assigned to node "{bound_to}"')
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
                    change = await watch.queue.get()
            except TimeoutError:
                if next_bookmark is not None and loop.time() >= next_bookmark:
                    # The queue is empty, so every change up to the current resourceVersion was sent.
                    await _send(response, "BOOKMARK", _bookmark(kind, self._store.resource_version))
                    next_bookmark = loop.time() + self._bookmark_interval
                continue
            if change is None:
                return
            event = watch.event_for(change)
            if event is not None:
                await _send(response, *event)
