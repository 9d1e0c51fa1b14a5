"""What a node's desired layout looks like to nebuly's device-plugin fork and to GPU Operator users.

Where it sits: the pure half of the config publisher's Kubernetes compatibility mode; the
effectful half is `kube_writer`. From one node's `NodeLayout` it renders:

- the fork's device-plugin config for the node (docs/nos-compatibility.md §2.3): `version: v1`,
  `flags.migStrategy: none`, and `sharing.mps` with `failRequestsGreaterThanOne: true` and one
  resource per (GPU index, slice size): `name: nvidia.com/gpu`, `rename: nvidia.com/gpu-<N>gb`,
  `memoryGB: N`, `replicas: <slices of that size on that GPU>`, `devices: ["<GPU index>"]`.
  `rename` carries the full resource name: the fork's resource-name parser adds the
  `nvidia.com/` prefix when it is missing (nos writes `gpu-<N>gb`), so both read the same. A node
  without any slice gets no `sharing` block at all: the fork rejects an MPS block without
  resources, and a config without sharing advertises the GPUs whole, which is what such a layout
  means;
- the ConfigMap key of that config, which is also the value of the node's
  `nvidia.com/device-plugin.config` label: `<node>_<digest>`, where the digest is the first 10 hex
  digits of the SHA-256 of the config text. The config-manager sidecar reloads only when the
  label's value changes (it does not watch the ConfigMap's content), so the key must change with
  the config; a content digest changes exactly then, unlike nos's `<node>-<unix seconds>` that
  changes with every plan and reloads the plugin for nothing. `_` cannot occur in a node name, so
  the part before the last `_` names the owning node exactly (`key_owner`): `node-1` never matches
  `node-10_…`. A label value holds at most 63 characters; a node name longer than 52 is shortened
  to its first 41 characters plus `_` and 8 hex digits of the SHA-256 of the whole name;
- the node's sharing labels, under mpsflow's own keys `mpsflow.dev/gpu.sharing-strategy` (`mps`, or
  `none` when the node has no slice) and `mpsflow.dev/gpu.replicas`, the facts GPU Feature
  Discovery states in `nvidia.com/gpu.sharing-strategy` and `nvidia.com/gpu.replicas`. Those two
  keys are GFD's, which rewrites them on every pass, so they are rendered only when asked
  (`gfd_labels`, for nodes where GFD does not write them). GFD defines replicas per GPU (a node
  offers `gpu.count * gpu.replicas` shares); with slices of mixed counts we write the largest
  number of slices on any one GPU of the node. That equals GFD's value for every layout GFD can
  describe (the same count on every GPU), keeps `gpu.count * gpu.replicas` an upper bound of the
  node's slices, and keeps `gpu.replicas > 1` meaning "some GPU is shared". A node without slices
  gets `1`, as GFD writes for unshared GPUs;
- nos's status annotations `nos.nebuly.com/status-gpu-<i>-<N>gb-<used|free>: "<count>"`
  (docs/nos-compatibility.md §2.2), counted from the plan's `SliceSpec.used`; as with nos's
  gpu-agent, only non-zero counts appear, and every other annotation under
  `nos.nebuly.com/status-gpu` is stale (`metadata_patch` removes it).

It never performs I/O and never decides anything about placement: it only re-expresses a layout.
It never renders a node key that the admission policy of k8s/base/config-publisher-policy.yaml does not
let the config publisher change (its sharing labels, `nvidia.com/device-plugin.config`, annotations
under `nos.nebuly.com/status-gpu`; GFD's two labels only where the policy is widened for
`--gfd-labels`): a key added here is refused by the API server until it is added there too.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from events.plans import NodeLayout
from events.vocabulary import (
    DEVICE_PLUGIN_CONFIG_LABEL,
    GFD_REPLICAS_LABEL,
    GFD_SHARING_STRATEGY_LABEL,
    REPLICAS_LABEL,
    SHARING_STRATEGY_LABEL,
    STATUS_ANNOTATION_PREFIX,
)

REPLICATED_RESOURCE = "nvidia.com/gpu"

LABEL_VALUE_MAX = 63
DIGEST_LENGTH = 10
NODE_HASH_LENGTH = 8
# A key `<node>_<digest>` fits a label value when the node name is at most this long.
LONGEST_VERBATIM_NODE = LABEL_VALUE_MAX - 1 - DIGEST_LENGTH
# A longer name keeps this many characters, then `_<node hash>`: 41 + 1 + 8 + 1 + 10 = 61.
SHORTENED_NODE_PREFIX = 41


@dataclass(frozen=True)
class NodeRendering:
    """Everything compatibility mode writes for one node."""

    node: str
    config_key: str
    config_yaml: str
    labels: Mapping[str, str]
    """The sharing labels: mpsflow's, and GFD's too when asked (not `nvidia.com/device-plugin.config`)."""
    status_annotations: Mapping[str, str]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _slice_counts(layout: NodeLayout) -> dict[int, Counter[int]]:
    """Per GPU index, how many slices of each size (GiB) it has."""
    return {index: Counter(s.size_gb for s in slices) for index, slices in layout.gpus.items()}


def device_plugin_config(layout: NodeLayout) -> dict[str, Any]:
    """The fork's `config/v1.Config` for this layout, as a document ready to serialise."""
    resources = [
        {
            "name": REPLICATED_RESOURCE,
            "rename": f"{REPLICATED_RESOURCE}-{size}gb",
            "memoryGB": size,
            "replicas": count,
            "devices": [str(index)],
        }
        for index, counts in sorted(_slice_counts(layout).items())
        for size, count in sorted(counts.items())
    ]
    config: dict[str, Any] = {"version": "v1", "flags": {"migStrategy": "none"}}
    if resources:
        config["sharing"] = {"mps": {"failRequestsGreaterThanOne": True, "resources": resources}}
    return config


def device_plugin_config_yaml(layout: NodeLayout) -> str:
    return yaml.safe_dump(device_plugin_config(layout), sort_keys=False, default_flow_style=False)


def owner_tag(node: str) -> str:
    """The part of a node's ConfigMap keys before the last `_`: the node name if short enough."""
    if len(node) <= LONGEST_VERBATIM_NODE:
        return node
    return f"{node[:SHORTENED_NODE_PREFIX]}_{_sha256(node)[:NODE_HASH_LENGTH]}"


def config_key(node: str, config_yaml: str) -> str:
    """The ConfigMap key (and `nvidia.com/device-plugin.config` value) of a node's config."""
    return f"{owner_tag(node)}_{_sha256(config_yaml)[:DIGEST_LENGTH]}"


def key_owner(key: str) -> str | None:
    """The `owner_tag` of the node whose config a ConfigMap key is, or None for any other key.

    Ownership is an exact match on the whole part before the last `_`, never a prefix."""
    owner, separator, digest = key.rpartition("_")
    if separator and owner and len(digest) == DIGEST_LENGTH and all(c in "0123456789abcdef" for c in digest):
        return owner
    return None


def sharing_labels(layout: NodeLayout, *, gfd_labels: bool = False) -> dict[str, str]:
    """mpsflow's sharing labels of the layout; with `gfd_labels`, GFD's two keys with the same values."""
    most = max((len(slices) for slices in layout.gpus.values()), default=0)
    strategy, replicas = ("mps", str(most)) if most else ("none", "1")
    labels = {SHARING_STRATEGY_LABEL: strategy, REPLICAS_LABEL: replicas}
    if gfd_labels:
        labels |= {GFD_SHARING_STRATEGY_LABEL: strategy, GFD_REPLICAS_LABEL: replicas}
    return labels


def status_annotations(layout: NodeLayout) -> dict[str, str]:
    counts: Counter[str] = Counter(
        f"{STATUS_ANNOTATION_PREFIX}-{index}-{s.size_gb}gb-{'used' if s.used else 'free'}"
        for index, slices in layout.gpus.items()
        for s in slices
    )
    return {key: str(count) for key, count in sorted(counts.items())}


def render_node(node: str, layout: NodeLayout, *, gfd_labels: bool = False) -> NodeRendering:
    text = device_plugin_config_yaml(layout)
    return NodeRendering(
        node=node,
        config_key=config_key(node, text),
        config_yaml=text,
        labels=sharing_labels(layout, gfd_labels=gfd_labels),
        status_annotations=status_annotations(layout),
    )


def metadata_patch(
    rendering: NodeRendering,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    *,
    config_label: bool,
    node_labels: bool,
) -> dict[str, dict[str, str | None]]:
    """The merge patch of a node's `metadata` that brings its current labels and annotations to
    the rendering: only what differs, stale status annotations set to null; `{}` if nothing does.

    `config_label` writes `nvidia.com/device-plugin.config`; `node_labels` writes the sharing
    labels and the status annotations.
    """
    wanted_labels = dict(rendering.labels) if node_labels else {}
    if config_label:
        wanted_labels[DEVICE_PLUGIN_CONFIG_LABEL] = rendering.config_key
    patch: dict[str, dict[str, str | None]] = {}
    label_changes: dict[str, str | None] = {
        key: value for key, value in wanted_labels.items() if labels.get(key) != value
    }
    if label_changes:
        patch["labels"] = label_changes
    if node_labels:
        annotation_changes: dict[str, str | None] = {
            key: value for key, value in rendering.status_annotations.items() if annotations.get(key) != value
        }
        annotation_changes.update(
            (key, None)
            for key in annotations
            if key.startswith(STATUS_ANNOTATION_PREFIX) and key not in rendering.status_annotations
        )
        if annotation_changes:
            patch["annotations"] = annotation_changes
    return patch
