"""List-then-watch of one kind of object, the way informers do it, with kubernetes-asyncio.

It lists, hands the full list over (so the caller can publish what vanished meanwhile), then
watches from the list's resourceVersion with bookmarks. A watch that ends, cleanly or not, is
resumed from the last resourceVersion seen; a 410 Gone (an ERROR event or the answer to the
request) means history was lost, so it lists again; a dropped connection or an API error is
retried on the `KUBERNETES_API` schedule (services/kit/retry.py), which starts over once a change
was delivered, except that a 429 waits exactly the `Retry-After` the API asked for. It never
decides anything: it only delivers objects (as JSON dicts, camelCase as the API serves them).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from events.bus import TransientError
from services.kit.retry import KUBERNETES_API, keep_running

log = logging.getLogger(__name__)

WATCH_SECONDS = 240

ListFunction = Callable[..., Awaitable[Any]]
OnRelist = Callable[[list[dict[str, Any]]], Awaitable[None]]
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
    """`list_function` for a watch stream, raising `ApiException` with the response's status and
    headers when the API refuses the watch (kubernetes-asyncio's `Watch` would read the refusal's
    body as the stream: a 429's plain text as an event, and never its `Retry-After`)."""

    @functools.wraps(list_function)
    async def watch_request(*args: Any, **kwargs: Any) -> Any:
        response = await list_function(*args, **kwargs)
        if 200 <= response.status <= 299:
            return response
        refused = ApiException(status=response.status, reason=response.reason)
        try:
            refused.body, refused.headers = await response.read(), response.headers
        finally:
            response.release()
        raise refused

    return watch_request


async def list_and_watch(
    api: client.ApiClient,
    list_function: ListFunction,
    on_relist: OnRelist,
    on_event: OnEvent,
    **selectors: str,
) -> NoReturn:
    """Run until cancelled; every object change reaches `on_event`, every (re)list `on_relist`."""
    name = list_function.__name__
    watch_function = _refusals_raised(list_function)
    resource_version: str | None = None

    async def session(progress: Callable[[], None]) -> None:
        """A list (unless resuming), then one watch until it ends; failures as `TransientError`."""
        nonlocal resource_version
        try:
            if resource_version is None:
                listed = await list_function(_request_timeout=30, **selectors)
                resource_version = listed.metadata.resource_version
                await on_relist([as_json(api, item) for item in listed.items])
            watcher = watch.Watch()
            async with watcher.stream(
                watch_function,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(10, WATCH_SECONDS + 30),
                **selectors,
            ) as stream:
                async for change in stream:
                    if change["type"] != "BOOKMARK":
                        await on_event(change["type"], as_json(api, change["object"]))
                    # Only once the change was handled: a watch that breaks resumes after it.
                    resource_version = watcher.resource_version or resource_version
                    progress()
        except ApiException as error:
            if error.status != 410:
                raise TransientError(
                    f"API error {error.status} {error.reason}", retry_after=_retry_after(error)
                ) from error
            log.info("%s: history expired (410), listing again", name)
            resource_version = None
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise TransientError(f"watch interrupted: {error or type(error).__name__}") from error

    await keep_running(session, on=TransientError, backoff=KUBERNETES_API, what=name)
