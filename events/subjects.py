"""Subject names, KV keys and the reversible token encoding: the one place they are built.

Every process that touches the bus names subjects through this module, so that a subject
written by the pod watcher is exactly the subject the planner filters on. Kubernetes names
may contain dots (node names are often FQDNs), and a dot separates NATS tokens, so every
name becomes a token through `encode_token`, which `decode_token` reverses exactly.

This module never performs I/O and never depends on the NATS client.
"""

from __future__ import annotations

import string

PREFIX = "mpsflow"
STREAM = "MPSFLOW"
DEAD_LETTER_STREAM = "MPSFLOW_DEAD_LETTERS"
DEAD_LETTER_PREFIX = "mpsflow-dead"
NODE_CONFIG_BUCKET = "mpsflow-node-config"
LEASE_BUCKET = "mpsflow-leases"
"""One key per service, its active replica's lease (`services.kit.lease`)."""

_PLAIN = frozenset(string.ascii_letters + string.digits + "-")
_ESCAPE = "_"
_HEX_DIGITS = frozenset("0123456789ABCDEF")


def encode_token(name: str) -> str:
    """Turn any string into one NATS subject token (and KV key) that `decode_token` reverses.

    Letters, digits and '-' stay as they are; every other byte of the UTF-8 form becomes
    '_' followed by two upper-case hex digits. The empty string becomes a lone '_'.
    """
    if not name:
        return _ESCAPE
    out: list[str] = []
    for char in name:
        if char in _PLAIN:
            out.append(char)
        else:
            out.extend(f"{_ESCAPE}{byte:02X}" for byte in char.encode())
    return "".join(out)


def decode_token(token: str) -> str:
    """Reverse `encode_token`; raises ValueError on a token it could not have produced."""
    if token == _ESCAPE:
        return ""
    raw = bytearray()
    position = 0
    while position < len(token):
        char = token[position]
        if char == _ESCAPE:
            digits = token[position + 1 : position + 3]
            if len(digits) != 2 or not set(digits) <= _HEX_DIGITS:
                raise ValueError(f"malformed escape at {position} in token {token!r}")
            raw.append(int(digits, 16))
            position += 3
        elif char in _PLAIN:
            raw.extend(char.encode())
            position += 1
        else:
            raise ValueError(f"character {char!r} cannot appear in an encoded token {token!r}")
    return raw.decode()


def pod_subject(namespace: str, name: str) -> str:
    """Observations, rejections and the deletion of one pod share this subject (last value = level)."""
    return f"{PREFIX}.pod.{encode_token(namespace)}.{encode_token(name)}"


def node_subject(node: str) -> str:
    """What the pod watcher saw of one node (opt-in label, GPU Feature Discovery facts)."""
    return f"{PREFIX}.node.{encode_token(node)}"


def gpus_subject(node: str) -> str:
    """What one node agent reports of its GPUs and slices."""
    return f"{PREFIX}.gpus.{encode_token(node)}"


def plan_subject() -> str:
    """Every plan the planner computes; the last one is the desired state of the cluster."""
    return f"{PREFIX}.plan"


def planned_subject(node: str) -> str:
    """One node's desired layout, as each plan changes it (the last one is the node's level)."""
    return f"{PREFIX}.planned.{encode_token(node)}"


def unplaced_subject(namespace: str, name: str) -> str:
    """Why the planner could not place one pending pod (the pod watcher turns it into an Event)."""
    return f"{PREFIX}.unplaced.{encode_token(namespace)}.{encode_token(name)}"


def release_subject(namespace: str, name: str) -> str:
    """The planner releasing one gated pod to a node (the pod watcher lifts the gate)."""
    return f"{PREFIX}.release.{encode_token(namespace)}.{encode_token(name)}"


def overuse_subject(node: str, namespace: str, name: str) -> str:
    """A node agent saying one pod's processes use more GPU memory than its slice (under the node's
    name first, so that an agent's rights can stop at its own node)."""
    return f"{PREFIX}.overuse.{encode_token(node)}.{encode_token(namespace)}.{encode_token(name)}"


def config_subject(node: str) -> str:
    """Published, applied and failed configs of one node."""
    return f"{PREFIX}.config.{encode_token(node)}"


def node_config_key(node: str) -> str:
    """The KV key under which a node's desired MPS config lives."""
    return encode_token(node)


def dead_letter_subject(consumer: str) -> str:
    """Where a consumer records a message it had to terminate."""
    return f"{DEAD_LETTER_PREFIX}.{encode_token(consumer)}"


ALL_EVENTS = f"{PREFIX}.>"
POD_EVENTS = f"{PREFIX}.pod.>"
NODE_EVENTS = f"{PREFIX}.node.>"
GPU_EVENTS = f"{PREFIX}.gpus.>"
UNPLACED_EVENTS = f"{PREFIX}.unplaced.>"
PLANNED_EVENTS = f"{PREFIX}.planned.>"
RELEASE_EVENTS = f"{PREFIX}.release.>"
CONFIG_EVENTS = f"{PREFIX}.config.>"
OVERUSE_EVENTS = f"{PREFIX}.overuse.>"
