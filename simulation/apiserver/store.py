"""The objects, the global resourceVersion, the retained history and the open watches.

Where it sits: below `server`, which does every read and write through `Store`; it imports `common`
and `selectors`. It decides nothing about what a write may be (validation, admission, pod rules and
optimistic concurrency are the server's) and writes nothing to the network: a `Watch` only queues
the events it must see, each as the line the server streams, encoded once for every watch that
sends it. It must never mutate an object once stored, and never await: every method is
synchronous, hence atomic on the event loop.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections import deque
from dataclasses import dataclass, field

from simulation.apiserver.common import KINDS, ApiError, JsonObject
from simulation.apiserver.selectors import Filter


@dataclass(frozen=True)
class _Change:
    """One write. `obj` is the object after it (for DELETED: its last state at the deletion's
    resourceVersion); `previous` the object before it, to turn selector transitions into events."""

    resource_version: int
    resource: str
    type: str
    obj: JsonObject
    previous: JsonObject | None
    lines: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)
    """The watch lines of `obj` by event type, encoded by the first watch that sends one."""

    def line(self, event_type: str) -> bytes:
        found = self.lines.get(event_type)
        if found is None:
            found = self.lines[event_type] = watch_line(event_type, self.obj)
        return found


def watch_line(event_type: str, obj: JsonObject) -> bytes:
    """One watch event as the stream carries it: a JSON object on a line of its own."""
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


@dataclass(frozen=True)
class _Queued:
    """An event waiting in one watch's queue, as its line, with the loop time it was queued at."""

    line: bytes
    queued_at: float


@dataclass(eq=False)
class Watch:
    """One open watch: the resource and filter it asked for, its queue of changes to send, its
    connection (which `ApiServer.drop_watches` aborts) and who opened it (the bearer token, if any)."""

    resource: str
    filter: Filter
    queue: asyncio.Queue[_Queued | None]  # None ends the stream cleanly
    transport: asyncio.Transport | None
    identity: str | None = None

    def push(self, change: _Change) -> None:
        """Queue what the watch sends of `change`, if anything (`event_for`)."""
        event = self.event_for(change)
        if event is None:
            return
        event_type, obj = event
        line = change.line(event_type) if obj is change.obj else watch_line(event_type, obj)
        self.queue.put_nowait(_Queued(line, asyncio.get_running_loop().time()))

    def end_now(self) -> None:
        """Ends the stream cleanly after at most the change it is sending: what is still queued
        is never sent, as when a real API server ends a watch; the client resumes to get it."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

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


class Store:
    """Objects, the global resourceVersion, retained history and open watches.

    Every method is synchronous, so each runs atomically on the event loop. Stored objects are
    never mutated after they are stored: a write stores a new dict."""

    def __init__(self, history_limit: int) -> None:
        self.resource_version = 0
        self.objects: dict[str, dict[tuple[str, str], JsonObject]] = {resource: {} for resource in KINDS}
        self.watches: set[Watch] = set()
        self._history: deque[_Change] = deque()
        self._history_limit = history_limit
        self._history_floor = 0  # every change after this resourceVersion is retained

    def get(self, resource: str, namespace: str | None, name: str) -> JsonObject:
        found = self.objects[resource].get((namespace or "", name))
        if found is None:
            details = {"name": name, "kind": resource}
            raise ApiError(404, f'{resource} "{name}" not found', details=details)
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
            # Only what the watch would send is queued for it, as the real watch cache hands a change
            # only to the watchers it concerns: with a watch per kubelet, waking every one of them
            # for every pod change cost more than the rest of the API together.
            if watch.resource == resource:
                watch.push(change)
        return stored

    def snapshot(self, resource: str, at: int) -> dict[tuple[str, str], JsonObject]:
        """The objects of `resource` by (namespace, name) as they were at resourceVersion `at`, no
        later than the current one: the current objects with every retained change after `at`
        undone. 410 Expired when the retained history no longer reaches back to `at` (the real
        API's compaction). The result is a new dict of the stored (never mutated) objects."""
        if at < self._history_floor:
            raise ApiError(410, f"too old resource version: {at} ({self._history_floor})", "Expired")
        objects = dict(self.objects[resource])
        for change in reversed(self._history):
            if change.resource_version <= at:
                break
            if change.resource != resource:
                continue
            key = (change.obj["metadata"].get("namespace", ""), change.obj["metadata"]["name"])
            if change.previous is None:  # created after `at`
                objects.pop(key, None)
            else:
                objects[key] = change.previous
        return objects

    def expire_history(self) -> None:
        self._history.clear()
        self._history_floor = self.resource_version

    def open_watch(self, watch: Watch, since: int | None) -> None:
        """Queues what the watch must see first and registers it for live changes."""
        if since is None:
            initial = [
                _Change(int(obj["metadata"]["resourceVersion"]), watch.resource, "ADDED", obj, None)
                for obj in self.items(watch.resource)
            ]
        elif since < self._history_floor:
            raise ApiError(410, f"too old resource version: {since} ({self._history_floor})", "Expired")
        else:
            initial = [
                c for c in self._history if c.resource_version > since and c.resource == watch.resource
            ]
        for change in initial:
            watch.push(change)
        self.watches.add(watch)
