"""List-then-watch of one kind of object, the way informers do it, with kubernetes-asyncio.

It lists, hands the full list over (so the caller can publish what vanished meanwhile), then
watches from the list's resourceVersion with bookmarks. A watch that ends is resumed from the
last resourceVersion seen; a 410 Gone means history was lost, so it lists again; a dropped
connection or an API error is retried on the `KUBERNETES_API` schedule (services/kit/retry.py),
which starts over once a change was delivered. It never decides anything:
it only delivers objects (as JSON dicts, camelCase as the API serves them).
"""

from __future__ import annotations

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


async def list_and_watch(
    api: client.ApiClient,
    list_function: ListFunction,
    on_relist: OnRelist,
    on_event: OnEvent,
    **selectors: str,
) -> NoReturn:
    """Run until cancelled; every object change reaches `on_event`, every (re)list `on_relist`."""
    name = list_function.__name__
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
                    progress()
        except ApiException as error:
            if error.status != 410:
                raise TransientError(f"API error {error.status} {error.reason}") from error
            log.info("%s: history expired (410), listing again", name)
            resource_version = None
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise TransientError(f"watch interrupted: {error or type(error).__name__}") from error

    await keep_running(session, on=TransientError, backoff=KUBERNETES_API, what=name)
