"""The config publisher's Kubernetes compatibility writes, with kubernetes-asyncio.

Where it sits: the effectful half of compatibility mode (the pure half is `render`); the config
publisher calls it after the node-config KV bucket, which stays the main path. It writes what
clusters built around nebuly's device-plugin fork and GPU Operator read:

- with a ConfigMap (`--compat-configmap [NAMESPACE/NAME]`, by default nos's
  `nebuly-nvidia/nos-device-plugin-configs`): each node's device-plugin config under its own key,
  then the node's `nvidia.com/device-plugin.config` label naming that key;
- with node labels (default on): mpsflow's sharing labels `mpsflow.dev/gpu.sharing-strategy` and
  `mpsflow.dev/gpu.replicas`, and nos's `nos.nebuly.com/status-gpu-*` annotations on each node;
  with `gfd_labels` (`--gfd-labels`) also GPU Feature Discovery's `nvidia.com/gpu.sharing-strategy`
  and `nvidia.com/gpu.replicas`, for nodes where GFD does not write them: where it does, the two
  writers would undo each other's values.

For a batch of nodes it (1) reads every node, skipping with a warning a node that does not exist,
so a missing node never gets a key; (2) sets each node's key in the ConfigMap, creating the
ConfigMap if absent, and removes only keys that `render.key_owner` names as that node's, except
the one its label still points at; (3) reads the ConfigMap back and flips the label of each node
whose key it holds: the label never names a key the API server does not hold, with no sleep;
(4) removes the node's previous key, leaving one key per node. Every write is compare-and-set (a
ConfigMap replace or a node merge patch carrying the resourceVersion it read), retried on 409
after a fresh read on the bounded, jittered `CONFLICT` schedule (services/kit/retry.py), and
skipped when it would change nothing; a
rendering this writer already applied, or one from an older plan, costs no request at all.

It never deletes a ConfigMap key it cannot attribute to a node by exact name (never by prefix, so
`node-1` never touches `node-10`'s key, nor the fork's `default`), never touches other labels or
annotations (k8s/base/config-publisher-policy.yaml makes the API server refuse a node write that does,
and a refusal is logged with the policy's message), never removes GFD's labels when it does not
write them, and never sleeps to wait for anyone. A failure on one node never stops the others; an
unreachable API server ends the batch at once (every other node would wait out the same timeout)
and is logged once per outage. The ConfigMap only reaches the API server: the kubelet
copies it into the device plugin's volume later, and the fork's config-manager restarts (and so
retries) while its volume lacks the key (docs/nos-compatibility.md §2.4); nothing here can
observe that copy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from events.plans import NodeLayout
from events.vocabulary import DEVICE_PLUGIN_CONFIG_LABEL
from services.config_publisher.render import (
    NodeRendering,
    key_owner,
    metadata_patch,
    owner_tag,
    render_node,
)
from services.kit.retry import CONFLICT, Backoff, retrying

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10
MERGE_PATCH = "application/merge-patch+json"

T = TypeVar("T")


class ConflictError(Exception):
    """An object kept changing between our read and our write, every attempt."""


class _StaleError(Exception):
    """One compare-and-set lost (409): the object changed since it was read."""


class ApiUnreachableError(Exception):
    """The API server could not be reached (connection refused, reset, or timed out)."""


def parse_configmap(text: str) -> tuple[str, str]:
    """`NAMESPACE/NAME` as (namespace, name)."""
    namespace, separator, name = text.partition("/")
    if not separator or not namespace or not name or "/" in name:
        raise ValueError(f"{text!r} is not NAMESPACE/NAME")
    return namespace, name


def _keep(key: str, wanted: Mapping[str, str], selected: Mapping[str, str]) -> bool:
    """Whether a ConfigMap key survives a write of the nodes in `wanted` (owner tag -> new key):
    every key of another node or of no node does, and of a written node's keys only the new one
    and the one its label selects now (in `selected`, owner tag -> key)."""
    owner = key_owner(key)
    if owner is None or owner not in wanted:
        return True
    return key in (wanted[owner], selected.get(owner))


def _reason(error: Exception) -> str:
    if isinstance(error, ApiException):
        return f"API answered {error.status} {error.reason}{_status_message(error)}"
    return str(error) or type(error).__name__


def _status_message(error: ApiException) -> str:
    """`: <message>` of the Status the API server answered with, or "" without one: a refusal by an
    admission policy names the policy and the rule there."""
    try:
        status = json.loads(error.body or "")
    except (TypeError, ValueError):
        return ""
    message = status.get("message") if isinstance(status, dict) else None
    return f": {message}" if isinstance(message, str) and message else ""


class CompatibilityWriter:
    """Writes the compatibility view of nodes' layouts; see the module docstring.

    `namespace` and `configmap_name` (both or neither) select the device-plugin ConfigMap;
    `node_labels` writes mpsflow's sharing labels and nos's status annotations, and `gfd_labels`
    (only with them) GFD's sharing labels too. The `nvidia.com/device-plugin.config` label is
    written exactly when there is a ConfigMap.
    `conflicts` is the schedule of the compare-and-set retries (its `attempts` bounds them).
    """

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str | None = None,
        configmap_name: str | None = None,
        *,
        node_labels: bool = True,
        gfd_labels: bool = False,
        conflicts: Backoff = CONFLICT,
    ) -> None:
        if (namespace is None) != (configmap_name is None):
            raise ValueError("give both the ConfigMap's namespace and its name, or neither")
        if namespace is None and not node_labels:
            raise ValueError("nothing to write: no ConfigMap and no node labels")
        if gfd_labels and not node_labels:
            raise ValueError("GFD's sharing labels are written only beside the node labels")
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.configmap_name = configmap_name
        self.node_labels = node_labels
        self.gfd_labels = gfd_labels
        self.conflicts = conflicts
        self._applied: dict[str, tuple[int, NodeRendering]] = {}
        self._unreachable = False

    @property
    def uses_configmap(self) -> bool:
        return self.configmap_name is not None

    def _pending(self, layouts: Mapping[str, NodeLayout], version: int) -> dict[str, NodeRendering]:
        """The renderings that differ from what this writer applied, unless from an older plan."""
        pending = {}
        for node, layout in sorted(layouts.items()):
            rendering = render_node(node, layout, gfd_labels=self.gfd_labels)
            applied = self._applied.get(node)
            if applied is None or (version >= applied[0] and applied[1] != rendering):
                pending[node] = rendering
            elif applied[1] == rendering and version > applied[0]:
                self._applied[node] = (version, rendering)
        return pending

    async def write(self, layouts: Mapping[str, NodeLayout], version: int) -> dict[str, str]:
        """Bring these nodes to their layouts; `version` orders calls (the plan's stream sequence).

        Returns the reason for every node that could not be written (a node that does not exist
        is skipped, not failed). A node that failed is tried again by the next call.
        """
        renderings = self._pending(layouts, version)
        failures: dict[str, str] = {}
        try:
            await self._write(renderings, version, failures)
        except ApiUnreachableError as error:
            if not self._unreachable:
                self._unreachable = True
                log.warning("Kubernetes API unreachable (%s): compatibility writes wait for it", error)
            for node, rendering in renderings.items():
                if node not in failures and self._applied.get(node) != (version, rendering):
                    failures[node] = f"Kubernetes API unreachable: {error}"
        return failures

    async def _request(self, call: Awaitable[T]) -> T:
        try:
            result = await call
        except ApiException:
            self._reached()
            raise
        except (aiohttp.ClientConnectionError, TimeoutError) as error:
            raise ApiUnreachableError(_reason(error)) from error
        self._reached()
        return result

    def _reached(self) -> None:
        if self._unreachable:
            self._unreachable = False
            log.info("Kubernetes API reachable again")

    async def _compare_and_set(self, write: Callable[[], Awaitable[T]], what: str) -> T:
        """`write()` again after each lost compare-and-set (`_StaleError`), on the `conflicts`
        schedule; ConflictError once it lost every attempt."""
        try:
            return await retrying(
                write, on=_StaleError, backoff=self.conflicts, what=f"writing {what}", level=logging.DEBUG
            )
        except _StaleError:
            raise ConflictError(f"{what} kept changing under {self.conflicts.attempts} attempts") from None

    def _fail(self, failures: dict[str, str], node: str, reason: str) -> None:
        log.warning("node %s: compatibility config not written: %s", node, reason)
        failures[node] = reason

    async def _write(
        self, renderings: Mapping[str, NodeRendering], version: int, failures: dict[str, str]
    ) -> None:
        nodes: dict[str, client.V1Node] = {}
        for name in renderings:
            try:
                nodes[name] = await self._request(self.core.read_node(name, _request_timeout=REQUEST_TIMEOUT))
            except ApiException as error:
                if error.status == 404:
                    log.warning("node %s: not found; no compatibility config written for it", name)
                else:
                    self._fail(failures, name, f"reading the node: {_reason(error)}")
        ready = sorted(nodes)
        if self.uses_configmap and ready:
            ready = await self._store_configs({name: renderings[name] for name in ready}, nodes, failures)
        labelled = []
        for name in ready:
            try:
                if await self._patch_node(nodes[name], renderings[name]):
                    labelled.append(name)
                else:
                    log.warning("node %s: deleted while being written; skipped", name)
            except (ApiException, ConflictError) as error:
                self._fail(failures, name, f"patching the node: {_reason(error)}")
        if self.uses_configmap and labelled:
            current = {owner_tag(name): renderings[name].config_key for name in labelled}

            def drop_previous(data: dict[str, str]) -> dict[str, str]:
                return {key: text for key, text in data.items() if _keep(key, current, {})}

            try:
                await self._update_configmap(drop_previous)
            except (ApiException, ConflictError) as error:
                for name in labelled:
                    self._fail(failures, name, f"removing its previous ConfigMap key: {_reason(error)}")
                return
        for name in labelled:
            self._applied[name] = (version, renderings[name])

    async def _store_configs(
        self,
        renderings: Mapping[str, NodeRendering],
        nodes: Mapping[str, client.V1Node],
        failures: dict[str, str],
    ) -> list[str]:
        """Sets each node's key, then reads the ConfigMap back; the nodes whose key it holds."""
        wanted = {owner_tag(name): rendering.config_key for name, rendering in renderings.items()}
        selected = {
            owner_tag(name): (nodes[name].metadata.labels or {}).get(DEVICE_PLUGIN_CONFIG_LABEL, "")
            for name in renderings
        }

        def put(data: dict[str, str]) -> dict[str, str]:
            updated = {key: text for key, text in data.items() if _keep(key, wanted, selected)}
            updated.update((r.config_key, r.config_yaml) for r in renderings.values())
            return updated

        where = f"ConfigMap {self.namespace}/{self.configmap_name}"
        try:
            await self._update_configmap(put)
            held = (await self._read_configmap()).data or {}
        except (ApiException, ConflictError) as error:
            for name in renderings:
                self._fail(failures, name, f"{where}: {_reason(error)}")
            return []
        ready = []
        for name, rendering in sorted(renderings.items()):
            if held.get(rendering.config_key) == rendering.config_yaml:
                ready.append(name)
            else:
                self._fail(failures, name, f"{where} lost key {rendering.config_key} to another writer")
        return ready

    async def _read_configmap(self) -> client.V1ConfigMap:
        assert self.configmap_name is not None and self.namespace is not None
        return await self._request(
            self.core.read_namespaced_config_map(
                self.configmap_name, self.namespace, _request_timeout=REQUEST_TIMEOUT
            )
        )

    async def _update_configmap(self, change: Callable[[dict[str, str]], dict[str, str]]) -> None:
        """Replaces the ConfigMap's data with `change(data)`, compare-and-set; creates it if absent
        (unless `change({})` is empty)."""
        namespace, name = self.namespace, self.configmap_name
        assert namespace is not None and name is not None

        async def write() -> None:
            try:
                current = await self._read_configmap()
            except ApiException as error:
                if error.status != 404:
                    raise
                current = None
            if current is None:
                data = change({})
                if not data:
                    return
                body = client.V1ConfigMap(
                    metadata=client.V1ObjectMeta(name=name, namespace=namespace),
                    data=data,
                )
                try:
                    await self._request(
                        self.core.create_namespaced_config_map(
                            namespace, body, _request_timeout=REQUEST_TIMEOUT
                        )
                    )
                except ApiException as error:
                    if error.status == 409:  # AlreadyExists: someone else created it; re-read
                        raise _StaleError from error
                    raise
                return
            data = dict(current.data or {})
            wanted = change(data)
            if wanted == data:
                return
            current.data = wanted
            try:
                await self._request(
                    self.core.replace_namespaced_config_map(
                        name, namespace, current, _request_timeout=REQUEST_TIMEOUT
                    )
                )
            except ApiException as error:
                if error.status == 409:
                    raise _StaleError from error
                raise

        await self._compare_and_set(write, f"ConfigMap {namespace}/{name}")

    async def _patch_node(self, node: client.V1Node, rendering: NodeRendering) -> bool:
        """Merge-patches the node's labels and annotations, compare-and-set; False if it is gone."""
        name = rendering.node
        fresh = True  # the first try uses the node as read; a retry reads it again

        async def patch_node() -> bool:
            nonlocal node, fresh
            if not fresh:
                try:
                    node = await self._request(self.core.read_node(name, _request_timeout=REQUEST_TIMEOUT))
                except ApiException as error:
                    if error.status == 404:
                        return False
                    raise
            fresh = False
            metadata = node.metadata
            patch: dict[str, Any] = metadata_patch(
                rendering,
                metadata.labels or {},
                metadata.annotations or {},
                config_label=self.uses_configmap,
                node_labels=self.node_labels,
            )
            if not patch:
                return True
            body = {"metadata": {**patch, "resourceVersion": metadata.resource_version}}
            try:
                await self._request(
                    self.core.patch_node(
                        name,
                        body,
                        _content_type=MERGE_PATCH,  # type: ignore[call-arg]
                        _request_timeout=REQUEST_TIMEOUT,
                    )
                )
            except ApiException as error:
                if error.status == 404:
                    return False
                if error.status == 409:
                    raise _StaleError from error
                raise
            return True

        return await self._compare_and_set(patch_node, f"node {name}")
