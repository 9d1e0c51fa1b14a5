"""The HTTP side of the API emulator: discovery, routing, the verbs, watch streams and test hooks.

Where it sits: at the top of `simulation.apiserver`, serving what `store` holds with the rules of
`selectors`, `patches`, `pod_rules` and `admission`; nothing in the package imports it but the
package itself. It must never listen beyond the address it is given (loopback by default), and
never check credentials: a bearer token is only recorded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import aiohttp
from aiohttp import web

from simulation.apiserver.admission import AdmissionWebhook, admit
from simulation.apiserver.common import (
    KINDS,
    REASONS,
    ApiError,
    JsonObject,
    Kind,
    checked_object,
    failure_status,
    internal_error,
    invalid,
    now,
)
from simulation.apiserver.faults import FaultInjector, Faults, RequestFaults
from simulation.apiserver.patches import (
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    json_patch,
    merge_patch,
)
from simulation.apiserver.pod_rules import (
    binding_conflict,
    pod_create_errors,
    pod_spec_update_errors,
    prepare_new_pod,
)
from simulation.apiserver.selectors import Filter
from simulation.apiserver.store import Store, Watch, watch_line

VERBS: Final = frozenset({"get", "list", "watch", "create", "update", "patch", "delete"})

_TRUE: Final = frozenset({"1", "t", "T", "true", "True", "TRUE"})
_FALSE: Final = frozenset({"", "0", "f", "F", "false", "False", "FALSE"})
_NAME: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_GENERATED_SUFFIX_ALPHABET: Final = "bcdfghjklmnpqrstvwxz2456789"
CONTINUE_TOKEN_VERSION: Final = "meta.k8s.io/v1"


@dataclass(frozen=True)
class RequestRecord:
    """One request to a resource path, as `ApiServer.request_log` keeps it for audits in tests.

    `identity` is the bearer token of the request, if any; `at` the event loop's clock when it
    arrived; `faults` what the emulator injected into it (`faults.RequestFaults.names`: "slow",
    "throttled", "error", "gone"). Requests to unknown paths (404) or with a method the path does
    not allow (405) are not recorded."""

    method: str
    path: str
    verb: str
    resource: str
    namespace: str | None
    user_agent: str
    identity: str | None
    at: float
    faults: tuple[str, ...]


def _json_response(body: JsonObject, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None


def _bool_param(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "")
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ApiError(400, f"{name}: invalid boolean {value!r}")


@dataclass(frozen=True)
class _Target:
    resource: str
    kind: Kind
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
        kind = KINDS.get(parts[0])
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
            raise ApiError(404, f"the server could not find the requested resource: /api/v1/{tail}")
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
        raise ApiError(405, f"{method} is not allowed on {self.audited_resource}")


def _check_resource_version(target: _Target, current: JsonObject, resource_version: Any) -> None:
    if resource_version and resource_version != current["metadata"]["resourceVersion"]:
        raise ApiError(
            409,
            f'Operation cannot be fulfilled on {target.resource} "{target.name}": the object has been '
            "modified; please apply your changes to the latest version and try again",
            details={"name": target.name, "kind": target.resource},
        )


def _too_many_requests(retry_after_s: int) -> web.Response:
    """The real API server's 429 (API Priority and Fairness, max-in-flight): plain text, not a
    Status, with the seconds to wait in `Retry-After`."""
    return web.Response(
        text="Too many requests, please try again later.\n",
        status=429,
        content_type="text/plain",
        charset="utf-8",
        headers={"Retry-After": str(retry_after_s), "X-Content-Type-Options": "nosniff"},
    )


def _list_limit(query: Mapping[str, str]) -> int | None:
    """The `limit` of a list, None when absent or not positive (the real API then lists everything)."""
    text = query.get("limit", "")
    if not text:
        return None
    try:
        limit = int(text)
    except ValueError:
        raise ApiError(400, f"limit: invalid integer {text!r}") from None
    return limit if limit > 0 else None


def _encode_continue(at: int, last: tuple[str, str]) -> str:
    """A continue token as the real API's etcd3 storage makes one: base64 (URL alphabet, no padding)
    of its version, the snapshot's resourceVersion and the key to start from, here the last key
    served followed by a NUL (the next key in order)."""
    raw = json.dumps({"v": CONTINUE_TOKEN_VERSION, "rv": at, "start": f"{last[0]}/{last[1]}\x00"})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    """The snapshot's resourceVersion (-1: the latest) and the last key served, or 400."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        start, at = raw["start"], raw["rv"]
        valid = raw["v"] == CONTINUE_TOKEN_VERSION and isinstance(at, int) and start.endswith("\x00")
    except (ValueError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise ApiError(400, f"continue key is not valid: {token!r}")
    namespace, _, name = start[:-1].partition("/")
    return at, (namespace, name)


def _continue_expired(last: tuple[str, str]) -> ApiError:
    """The real API's 410 for a continue token whose snapshot was compacted away: reason Expired,
    with a token in the Status's metadata that continues from the same key at the latest
    resourceVersion (an inconsistent list, which a client needing consistency does not use)."""
    error = ApiError(
        410,
        "The provided continue parameter is too old to display a consistent list result. You can start a "
        "new list without the continue parameter, or use the continue token in this response to retrieve "
        "the remainder of the results. Continuing with the provided token results in an inconsistent "
        "list - objects that were created, modified, or deleted between the time the first chunk was "
        "returned and now may show up in the list.",
        "Expired",
    )
    error.body["metadata"]["continue"] = _encode_continue(-1, last)
    return error


def _bookmark(kind: str, resource_version: int) -> JsonObject:
    return {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(resource_version)}}


async def _send(response: web.StreamResponse, event_type: str, obj: JsonObject) -> None:
    await response.write(watch_line(event_type, obj))


@web.middleware
async def _errors_as_status(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return _json_response(error.body, error.code)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _json_response(
            failure_status(error.status, error.reason, REASONS.get(error.status, "Unknown")), error.status
        )


class ApiServer:
    """The emulator: `async with ApiServer() as api:` serves on a free loopback port at `api.url`.

    `history_limit` is how many writes a watch can replay; `bookmark_interval` how often an idle
    watch that asked for bookmarks gets one; `watch_delay` (seconds, also settable later as an
    attribute) how long every watch event is held back after it was queued for its watch;
    `admission_webhooks` the mutating webhooks every pod create goes through, in order; `faults`
    what to inject into which requests (`faults.Faults`; None: nothing).

    Besides HTTP it offers test hooks: `request_log`, `fail_next`, `drop_watches`,
    `expire_history`, `objects`, `watch_delay` and `faults_injected`."""

    def __init__(
        self,
        *,
        history_limit: int = 1000,
        bookmark_interval: float = 1.0,
        watch_delay: float = 0.0,
        admission_webhooks: Sequence[AdmissionWebhook] = (),
        faults: Faults | None = None,
    ) -> None:
        self.request_log: list[RequestRecord] = []
        self.pods_created_at: dict[str, float] = {}
        """namespace/name -> `time.monotonic()` when a create stored the pod (after its webhooks): when
        it came to exist, for the demo's latency figures, which must not count the time its request
        waited in this one-process emulator, busy as no real API server is."""
        self.bookmarks_sent = 0
        self.watch_delay = watch_delay
        self._store = Store(history_limit)
        self._bookmark_interval = bookmark_interval
        self._webhooks = tuple(admission_webhooks)
        self._failures: list[tuple[str, str, int]] = []
        self._faults = FaultInjector(faults or Faults())
        self._dropping_watches: asyncio.Task[None] | None = None
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
        if self._faults.faults.drop_watch_every_s is not None:
            self._dropping_watches = asyncio.create_task(
                self._drop_watches_every(self._faults.faults.drop_watch_every_s)
            )
        return self._url

    async def stop(self) -> None:
        """Ends every watch cleanly, then stops serving."""
        if self._dropping_watches is not None:
            self._dropping_watches.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dropping_watches
            self._dropping_watches = None
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

    @property
    def faults_injected(self) -> dict[str, int]:
        """How many of each fault `faults` injected so far: per request "slow", "throttled",
        "error" and "gone"; per watch dropped "watch_ended" and "watch_reset"."""
        return dict(self._faults.counts)

    def fail_next(self, verb: str, resource: str, status: int) -> None:
        """Makes the next request with this verb on this resource (e.g. "pods/binding") fail with `status`."""
        if verb not in VERBS or status < 400:
            raise ValueError(
                f"fail_next needs a verb of {sorted(VERBS)} and an error status, got {verb} {status}"
            )
        self._failures.append((verb, resource, status))

    def store_admitted(self, namespace: str | None, obj: JsonObject) -> JsonObject:
        """Stores `obj` as a create of it would once admitted: named, checked, defaulted, stored
        and sent to the watches, without a request or the webhooks (the caller puts in what they
        would have). For benchmarks whose bursts of creations must not be bounded by what this one
        process serves over HTTP, as a real API server's would not. The stored object is returned."""
        kind = KINDS.get("pods") if obj.get("kind") == "Pod" else None
        if kind is None:
            raise ValueError(f"store_admitted takes a Pod, got kind {obj.get('kind')!r}")
        target = _Target("pods", kind, namespace, None, None)
        return self._store_created(target, checked_object(copy.deepcopy(obj), "Pod"))

    def objects(self, resource: str, namespace: str | None = None) -> list[JsonObject]:
        """Deep copies of the stored objects of `resource`, in namespace/name order."""
        if resource not in KINDS:
            raise ValueError(f"unknown resource {resource!r}; known: {sorted(KINDS)}")
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
        def entry(name: str, kind: Kind, kind_name: str, verbs: str) -> JsonObject:
            singular = "" if "/" in name else kind_name.lower()
            return {
                "name": name,
                "singularName": singular,
                "namespaced": kind.namespaced,
                "kind": kind_name,
                "verbs": verbs.split(),
            }

        resources = []
        for resource, kind in KINDS.items():
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
        since = request.query.get("resourceVersion", "")
        behind = since.isdigit() and 0 < int(since) < self._store.resource_version
        faults = self._faults.for_request(identity, target.audited_resource, verb, behind)
        self.request_log.append(
            RequestRecord(
                method=request.method,
                path=request.path,
                verb=verb,
                resource=target.audited_resource,
                namespace=target.namespace,
                user_agent=request.headers.get("User-Agent", ""),
                identity=identity,
                at=asyncio.get_running_loop().time(),
                faults=faults.names,
            )
        )
        for index, (failing_verb, resource, status) in enumerate(self._failures):
            if (failing_verb, resource) == (verb, target.audited_resource):
                del self._failures[index]
                raise ApiError(status, f"injected failure of {verb} {resource}")
        if faults.delay_s:
            await asyncio.sleep(faults.delay_s)
        if faults.refusal == "throttled":
            return _too_many_requests(self._faults.faults.retry_after_s)
        if faults.refusal == "error":
            raise internal_error(f"injected fault (error_rate) on {verb} {target.audited_resource}")
        if verb == "watch":
            return await self._watch(request, target, identity, faults)
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
        """A list as the real API serves it (docs: API concepts, "Retrieving large results sets in
        chunks" and "Resource versions"): without `limit`, or with resourceVersion "0" (the watch
        cache ignores the limit), every matching object at the current resourceVersion; with
        `limit`, at most that many, in namespace/name order, from one snapshot: the current one
        ("Most Recent"), the one `resourceVersion` names ("Exact"), or the one the `continue`
        token carries, rebuilt from the retained history (410 Expired once that is gone)."""
        selected = Filter.from_query(target.namespace, target.kind, query)
        limit = _list_limit(query)
        since = query.get("resourceVersion", "")
        current = self._store.resource_version
        token = query.get("continue", "")
        after: tuple[str, str] | None = None
        if token:
            if since not in ("", "0"):
                raise ApiError(400, "specifying resource version is not allowed when using continue")
            at, after = _decode_continue(token)
            if at < 0:  # the inconsistent continuation an expired token's 410 offered: the latest
                at = current
            try:
                objects = self._store.snapshot(target.resource, at)
            except ApiError:
                raise _continue_expired(after) from None
        elif limit is None or since == "0":
            limit, at, objects = None, current, self._store.objects[target.resource]
        elif since:
            if not since.isdigit():
                raise ApiError(400, f"invalid resource version: {since!r}")
            at = int(since)
            if at > current:
                cause = {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
                message = f"Too large resource version: {at}, current: {current}"
                raise ApiError(504, message, "Timeout", {"causes": [cause]})
            objects = self._store.snapshot(target.resource, at)
        else:
            at, objects = current, self._store.objects[target.resource]
        keys = sorted(key for key in objects if after is None or key > after)
        items: list[JsonObject] = []
        scanned = 0
        for key in keys:
            if limit is not None and len(items) == limit:
                break
            scanned += 1
            if selected.matches(objects[key]):
                items.append(objects[key])
        metadata: JsonObject = {"resourceVersion": str(at)}
        if scanned < len(keys):  # the limit stopped the scan before the end of the snapshot
            last = items[-1]["metadata"]
            metadata["continue"] = _encode_continue(at, (last.get("namespace", ""), last["name"]))
            if not query.get("labelSelector") and not query.get("fieldSelector"):
                metadata["remainingItemCount"] = sum(
                    1 for key in keys[scanned:] if selected.matches(objects[key])
                )
        return {
            "kind": f"{target.kind.kind}List",
            "apiVersion": "v1",
            "metadata": metadata,
            "items": [
                {key: value for key, value in obj.items() if key not in ("kind", "apiVersion")}
                for obj in items
            ],
        }

    async def _create(
        self, target: _Target, body: Any, identity: str | None, query: Mapping[str, str]
    ) -> JsonObject:
        obj = checked_object(body, target.kind.kind)
        if target.kind.namespaced:
            if (obj["metadata"].get("namespace") or target.namespace) != target.namespace:
                raise ApiError(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            obj["metadata"]["namespace"] = target.namespace
        if target.resource == "pods" and target.subresource is None and self._webhooks:
            if self._webhook_client is None:
                raise RuntimeError("the API server is not started")
            obj = await admit(self._webhook_client, self._webhooks, obj, identity, query)
        return self._store_created(target, obj)

    def _store_created(self, target: _Target, obj: JsonObject) -> JsonObject:
        """Names, checks, defaults and stores an admitted new object, in one synchronous step."""
        metadata = obj["metadata"]
        if metadata.get("resourceVersion"):
            raise ApiError(400, "resourceVersion should not be set on objects to be created")
        name = metadata.get("name")
        if not name and metadata.get("generateName"):
            name = metadata["generateName"] + "".join(random.choices(_GENERATED_SUFFIX_ALPHABET, k=5))
        if not isinstance(name, str) or len(name) > 253 or not _NAME.fullmatch(name):
            raise ApiError(
                422, f"metadata.name: Invalid value: {name!r}: must be a lowercase RFC 1123 subdomain"
            )
        if target.resource == "pods" and (errors := pod_create_errors(obj)):
            raise invalid("Pod", name, errors)
        if (target.namespace or "", name) in self._store.objects[target.resource]:
            details = {"name": name, "kind": target.resource}
            raise ApiError(409, f'{target.resource} "{name}" already exists', "AlreadyExists", details)
        metadata.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=now())
        metadata.pop("namespace", None)
        if target.kind.namespaced:
            metadata["namespace"] = target.namespace
        if target.resource == "pods":
            prepare_new_pod(obj)
            self.pods_created_at[f"{target.namespace}/{name}"] = time.monotonic()
        return self._store.commit(target.resource, "ADDED", obj, None)

    def _update(self, target: _Target, body: Any) -> JsonObject:
        current = self._store.get(target.resource, target.namespace, target.name or "")
        incoming = checked_object(body, target.kind.kind)
        _check_resource_version(target, current, incoming["metadata"].get("resourceVersion"))
        return self._write_update(target, current, incoming)

    def _patch(self, target: _Target, raw: bytes, content_type: str) -> JsonObject:
        current = self._store.get(target.resource, target.namespace, target.name or "")
        patch = _parse_json(raw)
        if content_type in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
            if not isinstance(patch, dict):
                raise ApiError(400, "a merge patch must be a JSON object")
            patched = merge_patch(current, patch)
        elif content_type == JSON_PATCH:
            patched = json_patch(current, patch)
        else:
            raise ApiError(415, f"the patch content type {content_type!r} is not supported by the emulator")
        incoming = checked_object(patched, target.kind.kind)
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
                raise ApiError(400, f"{message} ({value})")
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
            errors = pod_spec_update_errors(current.get("spec"), updated.get("spec"))
            if errors:
                raise invalid("Pod", target.name or "", errors)
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
                raise ApiError(
                    409,
                    f"Precondition failed: {field} in precondition: {wanted}, in object meta: "
                    f"{current['metadata'].get(field)}",
                )
        return self._store.commit(target.resource, "DELETED", current, current)

    def _bind(self, target: _Target, body: Any) -> JsonObject:
        binding = checked_object(body, "Binding")
        if binding["metadata"].get("name") != target.name:
            raise ApiError(400, "name in URL does not match name in Binding object")
        node_target = binding.get("target")
        if not isinstance(node_target, dict) or not node_target.get("name"):
            raise ApiError(422, "target.name: Required value")
        if node_target.get("kind", "Node") not in ("", "Node"):
            raise ApiError(422, f"target.kind: Unsupported value: {node_target.get('kind')!r}: must be Node")
        pod_name = target.name or ""
        pod = self._store.get("pods", target.namespace, pod_name)
        bound_to = (pod.get("spec") or {}).get("nodeName")
        if bound_to:
            raise binding_conflict(pod_name, f'pod {pod_name} is already assigned to node "{bound_to}"')
        if (pod.get("spec") or {}).get("schedulingGates"):
            raise binding_conflict(pod_name, f"pod {pod_name} has non-empty .spec.schedulingGates")
        bound = copy.deepcopy(pod)
        bound.setdefault("spec", {})["nodeName"] = node_target["name"]
        if binding["metadata"].get("annotations"):
            bound["metadata"].setdefault("annotations", {}).update(binding["metadata"]["annotations"])
        status = bound.setdefault("status", {})
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        status["conditions"] = [
            *conditions,
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
        ]
        self._store.commit("pods", "MODIFIED", bound, pod)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    async def _watch(
        self, request: web.Request, target: _Target, identity: str | None, faults: RequestFaults
    ) -> web.StreamResponse:
        watch = Watch(
            target.resource,
            Filter.from_query(target.namespace, target.kind, request.query),
            asyncio.Queue(),
            request.transport,
            identity,
        )
        bookmarks = _bool_param(request.query, "allowWatchBookmarks")
        try:
            lifetime = float(request.query["timeoutSeconds"]) if "timeoutSeconds" in request.query else None
            since_text = request.query.get("resourceVersion", "")
            since = int(since_text) if since_text not in ("", "0") else None
        except ValueError:
            raise ApiError(400, "timeoutSeconds and resourceVersion must be integers") from None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            if faults.gone:
                current = self._store.resource_version
                raise ApiError(410, f"too old resource version: {since} ({current})", "Expired")
            self._store.open_watch(watch, since)
        except ApiError as expired:
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

    async def _drop_watches_every(self, period_s: float) -> None:
        """The `drop_watch_every_s` fault: every `period_s`, ends every targeted open watch without
        a final event, cleanly or by resetting its connection (`FaultInjector.drop`)."""
        while True:
            await asyncio.sleep(period_s)
            for watch in list(self._store.watches):
                if not self._faults.faults.targets(watch.identity, watch.resource):
                    continue
                self._store.watches.discard(watch)
                if self._faults.drop() == "watch_reset" and watch.transport is not None:
                    watch.transport.abort()
                else:
                    watch.end_now()

    async def _stream(
        self, response: web.StreamResponse, watch: Watch, kind: str, lifetime: float | None, bookmarks: bool
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
            await response.write(queued.line)
