"""List-then-watch of one kind of object, the way informers do it, with kubernetes-asyncio.

It lists, hands the full list over (so the caller can publish what vanished meanwhile), then
watches from the list's resourceVersion with bookmarks. A watch that ends is resumed from the
last resourceVersion seen; a 410 Gone means history was lost, so it lists again; a dropped
connection or an API error is retried with exponential backoff. It never decides anything:
it only delivers objects (as JSON dicts, camelCase as the API serves them).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import anyio
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

WATCH_SECONDS = 240
BACKOFF_START = 0.2
BACKOFF_MAX = 10.0

ListFunction = Callable[..., Awaitable[Any]]
OnRelist = Callable[[list[dict[str, Any]]], Awaitable[None]]
OnEvent = Callable[[str, dict[str, Any]], Awaitable[None]]


def as_json(api: client.ApiClient, obj: object) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    converted: dict[str, Any] = api.sanitize_for_serialization(obj)
    return converted


async def list_and_watch(
    api: client.ApiClient,
    list_function: ListFunction,
    on_relist: OnRelist,
    on_event: OnEvent,
    **selectors: str,
) -> None:
    """Run until cancelled; every object change reaches `on_event`, every (re)list `on_relist`."""
    resource_version: str | None = None
    backoff = BACKOFF_START
    while True:
        try:
            if resource_version is None:
                listed = await list_function(_request_timeout=30, **selectors)
                resource_version = listed.metadata.resource_version
                await on_relist([as_json(api, item) for item in listed.items])
            watcher = watch.Watch()
            async with watcher.stream(
                list_function,
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
                    backoff = BACKOFF_START
        except ApiException as error:
            if error.status == 410:
                log.info("%s: history expired (410), listing again", list_function.__name__)
                resource_version = None
                continue
            log.warning("%s: API error %s, retrying in %.1fs", list_function.__name__, error.status, backoff)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.warning(
                "%s: watch interrupted (%s), resuming in %.1fs",
                list_function.__name__,
                error or type(error).__name__,
                backoff,
            )
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
