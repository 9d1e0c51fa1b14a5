"""List-then-watch of one kind of object, the way informers do it, with kubernetes-asyncio.

It lists, hands the full list over (so the caller can publish what vanished meanwhile), then
watches from the list's resourceVersion with bookmarks. A watch that ends, cleanly or not, is
resumed from the last resourceVersion seen; a 410 Gone (an ERROR event or the answer to the
request) means history was lost, so it lists again; a dropped connection or an API error is
retried on the `KUBERNETES_API` schedule (services/kit/retry.py), which starts over once a change
was delivered, except that a 429 waits exactly the `Retry-After` the API asked for. It never
decides anything: it only delivers objects (as JSON dicts, camelCase as the API serves them).

At scale (tens of thousands of pods) it keeps memory to one page and never builds the client's
models: a list comes in pages of `PAGE_SIZE` (`limit` and `continue`), every page of it from the
first page's snapshot, handed over as it comes (`Listing`); a continue token that expired (410)
starts the list over, since a list with a hole in it cannot tell what vanished. Lists and the watch
stream are read as raw JSON (`_preload_content=False`), the watch one event a line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NoReturn

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from events.bus import TransientError
from services.kit.retry import KUBERNETES_API, keep_running

log = logging.getLogger(__name__)

WATCH_SECONDS = 240
PAGE_SIZE = 500
"""Objects a list page asks for (`limit`): client-go's pager asks for as many."""
LIST_PAGE_TIMEOUT_S = 30
MAX_EVENT_BYTES = 64 * 2**20
"""The longest watch event line read; the API server's own limit on an object is a few MiB."""

Listing = AsyncIterator[dict[str, Any]]
"""The objects of one complete, consistent list, page by page as they are read."""
ListFunction = Callable[..., Awaitable[Any]]
OnRelist = Callable[[Listing], Awaitable[None]]
OnEvent = Callable[[str, dict[str, Any]], Awaitable[None]]


def as_json(api: client.ApiClient, obj: object) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    converted: dict[str, Any] = api.sanitize_for_serialization(obj)
    return converted


def refused(error: ApiException, what: str) -> TransientError:
    """The `TransientError` for an API refusal of `what`: retried after its `Retry-After` (a 429),
    or on the bus's own schedule."""
    return TransientError(f"{what}: API answered {error.status}", retry_after=_retry_after(error))


def _retry_after(error: ApiException) -> float | None:
    """The seconds a refusal asked the client to wait (`Retry-After` in delta-seconds, as the API
    server sends it with a 429), or None when it did not say so."""
    value = (error.headers.get("Retry-After") or "") if error.headers is not None else ""
    return float(value) if value.strip().isdigit() else None


def _refusals_raised(list_function: ListFunction) -> ListFunction:
    """`list_function` answering the raw response (`_preload_content=False`), raising
    `ApiException` with the response's status, body and headers when the API refuses the request
    (the client checks no status of a raw response, and kubernetes-asyncio's `Watch` would read a
    refusal's body as the stream: a 429's plain text as an event, and never its `Retry-After`)."""

    @functools.wraps(list_function)
    async def raw_request(*args: Any, **kwargs: Any) -> Any:
        response = await list_function(*args, _preload_content=False, **kwargs)
        if 200 <= response.status <= 299:
            return response
        refused = ApiException(status=response.status, reason=response.reason)
        try:
            refused.body, refused.headers = await response.read(), response.headers
        finally:
            response.release()
        raise refused

    return raw_request


async def _page(request: ListFunction, selectors: Mapping[str, str], token: str | None) -> dict[str, Any]:
    """One page of a list, as parsed JSON; ValueError when it is not a list."""
    continued = {"_continue": token} if token else {}
    response = await request(limit=PAGE_SIZE, _request_timeout=LIST_PAGE_TIMEOUT_S, **continued, **selectors)
    try:
        page = json.loads(await response.read())
    finally:
        response.release()
    if not isinstance(page, dict) or not isinstance(page.get("items") or [], list):
        raise ValueError(f"a list answered something else than a list: {str(page)[:200]}")
    metadata = page.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("resourceVersion"):
        raise ValueError("a list answered without metadata.resourceVersion")
    return page


async def _pages(
    request: ListFunction, selectors: Mapping[str, str], first: dict[str, Any]
) -> AsyncGenerator[dict[str, Any], None]:
    """The objects of the list whose first page is `first`, reading each further page once the
    objects of the one before were taken, so that one page at a time is held. A page from another
    snapshot than the first (an API that does not keep its promise) is refused as an expired list
    would be: the list starts over."""
    version = first["metadata"]["resourceVersion"]
    pages = [first]
    del first
    while pages:
        page = pages.pop()
        items: list[dict[str, Any]] = page.get("items") or []
        token = page["metadata"].get("continue")
        del page
        for item in items:
            yield item
        del items
        if token:
            pages.append(await _page(request, selectors, token))
            if pages[0]["metadata"]["resourceVersion"] != version:
                raise ApiException(status=410, reason=f"a page of another snapshot than {version}")


async def _events(response: aiohttp.ClientResponse) -> AsyncGenerator[dict[str, Any], None]:
    """The events of a watch response, one JSON object a line, a line as long as it takes up to
    `MAX_EVENT_BYTES`; ValueError for a line that is not a JSON object."""
    pending = b""
    async for chunk in response.content.iter_any():
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_EVENT_BYTES:
            raise ValueError(f"a watch event longer than {MAX_EVENT_BYTES} bytes")
        for line in lines:
            if line.strip():
                yield _event(line)
    if pending.strip():
        yield _event(pending)


def _event(line: bytes) -> dict[str, Any]:
    """One watch event; `ApiException` for an ERROR event or a `Status` in its place (as
    kubernetes-asyncio's `Watch` raises them), ValueError for anything else that is no event."""
    event = json.loads(line)
    if not isinstance(event, dict):
        raise ValueError(f"a watch event that is not an object: {line[:200]!r}")
    obj = event.get("object")
    if "type" not in event or not isinstance(obj, dict):
        if "code" in event:
            raise ApiException(status=event["code"], reason=f"{event.get('reason')}: {event.get('message')}")
        raise ValueError(f"a watch event without type or object: {line[:200]!r}")
    if event["type"] == "ERROR":
        raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
    return event


def _version(obj: dict[str, Any]) -> str | None:
    metadata = obj.get("metadata")
    version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    return version if isinstance(version, str) and version else None


async def list_and_watch(
    api: client.ApiClient,
    list_function: ListFunction,
    on_relist: OnRelist,
    on_event: OnEvent,
    **selectors: str,
) -> NoReturn:
    """Run until cancelled; every object change reaches `on_event`, every (re)list `on_relist`.

    `on_relist` gets the objects of one complete list as they are read, and must take them all: if
    reading fails midway (an expired continue token, a dropped connection), the exception comes
    out of its iteration, and the list is read again from the start, handed to a new `on_relist`.
    Only a list `on_relist` went through whole is watched from. `api`, the client `list_function`
    belongs to, is not used: objects come as the API's JSON, never as the client's models."""
    del api
    name = list_function.__name__
    request = _refusals_raised(list_function)
    resource_version: str | None = None

    async def session(progress: Callable[[], None]) -> None:
        """A list (unless resuming), then one watch until it ends; failures as `TransientError`."""
        nonlocal resource_version
        try:
            if resource_version is None:
                first = await _page(request, selectors, None)
                listed_version: str = first["metadata"]["resourceVersion"]
                listing = _pages(request, selectors, first)
                del first
                try:
                    await on_relist(listing)
                finally:
                    await listing.aclose()
                resource_version = listed_version
            response = await request(
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(10, WATCH_SECONDS + 30),
                **selectors,
            )
            try:
                async with contextlib.aclosing(_events(response)) as changes:
                    async for change in changes:
                        if change["type"] == "BOOKMARK":
                            version = _version(change["object"])
                            if version is None:
                                raise ValueError("a BOOKMARK event without metadata.resourceVersion")
                        else:
                            await on_event(change["type"], change["object"])
                            version = _version(change["object"])
                        # Only once the change was handled: a watch that breaks resumes after it.
                        resource_version = version or resource_version
                        progress()
            finally:
                response.release()
        except ApiException as error:
            if error.status != 410:
                raise TransientError(
                    f"API error {error.status} {error.reason}", retry_after=_retry_after(error)
                ) from error
            log.info("%s: history expired (410: %s), listing again", name, error.reason)
            resource_version = None
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise TransientError(f"watch interrupted: {error or type(error).__name__}") from error

    await keep_running(session, on=TransientError, backoff=KUBERNETES_API, what=name)
