"""What the simulated kube-scheduler decides: pure functions over pods and nodes as JSON dicts.

Each rule follows kube-scheduler's default profile (Kubernetes 1.31 and later), with its wording:

- PreEnqueue (SchedulingGates): a pod with a non-empty `spec.schedulingGates` is never scheduled.
- The queue (PrioritySort): higher `spec.priority` first, then older (kube-scheduler: earlier in
  the queue), then namespace/name.
- PreFilter (NodeAffinity): when every required term has `matchFields` `metadata.name In`, only the
  nodes named are evaluated; the others count as "node(s) didn't satisfy plugin(s) [NodeAffinity]",
  and terms whose names do not intersect give "pod affinity terms conflict".
- Filters, in the profile's order, a node failing at the first that rejects it:
  NodeUnschedulable (`spec.unschedulable`, unless the pod tolerates
  `node.kubernetes.io/unschedulable:NoSchedule`); TaintToleration (NoSchedule and NoExecute taints
  need a toleration; PreferNoSchedule only scores); NodeAffinity (`nodeSelector` and the required
  `nodeSelectorTerms`); NodeResourcesFit, for every resource other than cpu, memory and
  ephemeral-storage, which the simulation does not model (its nodes and pods do not account them).
- A node whose Ready condition is not True carries `node.kubernetes.io/not-ready:NoSchedule`
  (`unreachable` when Unknown), as the TaintNodesByCondition admission plugin and the node
  lifecycle controller would add it: kube-scheduler itself has no readiness filter.
- No feasible node: "0/N nodes are available: <count> <reason>, ...", reasons sorted as strings.

Not modelled: cpu, memory, ephemeral-storage and the pod count of a node; NodeName, NodePorts,
volume, topology-spread and inter-pod-affinity filters; pod overhead and pod-level resources;
scoring (every feasible node scores alike, so the choice among them is uniform); preemption (real
messages end with a "preemption: ..." sentence these lack).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

JsonObject = dict[str, Any]

DEFAULT_SCHEDULER = "default-scheduler"
UNMODELLED_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage"})
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"

NODE_UNSCHEDULABLE = "node(s) were unschedulable"
AFFINITY_MISMATCH = "node(s) didn't match Pod's node affinity/selector"
NOT_PINNED_HERE = "node(s) didn't satisfy plugin(s) [NodeAffinity]"
PINS_CONFLICT = "pod affinity terms conflict"
NO_NODES = "no nodes available to schedule pods"

_QUANTITY = re.compile(r"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))([a-zA-Z]*)")
_SUFFIXES: Mapping[str, Fraction] = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    **{suffix: Fraction(10 ** (3 * power)) for power, suffix in enumerate("kMGTPE", start=1)},
    **{suffix + "i": Fraction(2 ** (10 * power)) for power, suffix in enumerate("KMGTPE", start=1)},
}
_INTEGER = re.compile(r"[+-]?[0-9]+")
_SPEC_ONLY_METADATA = ("resourceVersion", "generation", "managedFields", "finalizers")


def _spec(obj: JsonObject) -> JsonObject:
    spec: JsonObject = obj.get("spec") or {}
    return spec


def pod_key(pod: JsonObject) -> str:
    return f"{pod['metadata'].get('namespace', '')}/{pod['metadata']['name']}"


def is_terminal(pod: JsonObject) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def is_gated(pod: JsonObject) -> bool:
    return bool(_spec(pod).get("schedulingGates"))


def wants_scheduling(pod: JsonObject) -> bool:
    """Pending, not bound, and for this scheduler (`schedulerName` unset or `default-scheduler`)."""
    spec = _spec(pod)
    return (
        not spec.get("nodeName")
        and (pod.get("status") or {}).get("phase") == "Pending"
        and spec.get("schedulerName") in (None, "", DEFAULT_SCHEDULER)
    )


def queue_order(pod: JsonObject) -> tuple[int, str, str, str]:
    metadata = pod["metadata"]
    return (
        -int(_spec(pod).get("priority") or 0),
        str(metadata.get("creationTimestamp") or ""),
        metadata.get("namespace", ""),
        metadata["name"],
    )


def spec_changed(old: JsonObject, new: JsonObject) -> bool:
    """Whether an update may change a scheduling decision: anything but status and bookkeeping."""

    def strip(pod: JsonObject) -> JsonObject:
        metadata = {k: v for k, v in pod["metadata"].items() if k not in _SPEC_ONLY_METADATA}
        return {**{k: v for k, v in pod.items() if k != "status"}, "metadata": metadata}

    return strip(old) != strip(new)


# --- resources ---------------------------------------------------------------------------------


def quantity(value: object) -> int:
    """A resource quantity as a whole number, rounded up as Kubernetes' `Quantity.Value()` does."""
    match = _QUANTITY.fullmatch(str(value).strip())
    if match is None or match[2] not in _SUFFIXES:
        raise ValueError(f"invalid resource quantity {value!r}")
    return math.ceil(Fraction(match[1]) * _SUFFIXES[match[2]])


def _container_requests(container: JsonObject) -> Counter[str]:
    resources = container.get("resources") or {}
    asked = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
    return Counter({name: quantity(q) for name, q in asked.items() if name not in UNMODELLED_RESOURCES})


def pod_requests(pod: JsonObject) -> Counter[str]:
    """What the pod asks of a node, as Kubernetes computes a pod's request: the sum over its
    containers and sidecars (init containers with `restartPolicy: Always`), or more if one init
    container, with the sidecars started before it, asks for more. Limits stand in for missing
    requests (the API's defaulting). Raises ValueError on a quantity the API would refuse."""
    total: Counter[str] = Counter()
    for container in _spec(pod).get("containers") or []:
        total.update(_container_requests(container))
    sidecars: Counter[str] = Counter()
    init_peak: Counter[str] = Counter()
    for container in _spec(pod).get("initContainers") or []:
        asked = _container_requests(container)
        if container.get("restartPolicy") == "Always":
            total.update(asked)
            sidecars.update(asked)
            init_peak |= sidecars
        else:
            init_peak |= asked + sidecars
    return total | init_peak  # drops zero requests, which NodeResourcesFit skips too


def requested_by_node(pods: Mapping[str, JsonObject], assumed: Mapping[str, str]) -> dict[str, Counter[str]]:
    """What the non-terminal pods bound to each node, or assumed on it, request."""
    usage: dict[str, Counter[str]] = {}
    for key, pod in pods.items():
        node = _spec(pod).get("nodeName") or assumed.get(key)
        if node and not is_terminal(pod):
            usage.setdefault(node, Counter()).update(pod_requests(pod))
    return usage


def _allocatable(node: JsonObject, resource: str) -> int:
    try:
        return quantity(((node.get("status") or {}).get("allocatable") or {}).get(resource, 0))
    except ValueError:
        return 0  # the API refuses such a node status; count it as nothing


# --- taints and tolerations --------------------------------------------------------------------


def tolerates(toleration: JsonObject, taint: JsonObject) -> bool:
    """Kubernetes' Toleration.ToleratesTaint: an empty effect or key matches any; the operator
    (Equal when empty) is Exists, matching any value, or Equal, matching the same value."""
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    if key and key != taint.get("key"):
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return True
    return operator == "Equal" and (toleration.get("value") or "") == (taint.get("value") or "")


def node_taints(node: JsonObject) -> list[JsonObject]:
    """The node's taints, with the NoSchedule taint its Ready condition implies when not True."""
    taints: list[JsonObject] = list(_spec(node).get("taints") or [])
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c.get("status") for c in conditions if c.get("type") == "Ready"), None)
    if ready != "True":
        key = UNREACHABLE_TAINT if ready == "Unknown" else NOT_READY_TAINT
        if not any(t.get("key") == key and t.get("effect") == "NoSchedule" for t in taints):
            taints.append({"key": key, "effect": "NoSchedule"})
    return taints


def untolerated_taint(taints: list[JsonObject], tolerations: list[JsonObject]) -> JsonObject | None:
    """The first NoSchedule or NoExecute taint that no toleration tolerates."""
    for taint in taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(
            tolerates(toleration, taint) for toleration in tolerations
        ):
            return taint
    return None


# --- node affinity -----------------------------------------------------------------------------


def _matches_requirement(requirement: JsonObject, values: Mapping[str, str]) -> bool:
    operator, wanted = requirement.get("operator"), requirement.get("values") or []
    value = values.get(str(requirement.get("key")))
    if operator == "In":
        return value is not None and value in wanted
    if operator == "NotIn":
        return value is None or value not in wanted
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt") and value is not None and len(wanted) == 1:
        if not (_INTEGER.fullmatch(value) and _INTEGER.fullmatch(str(wanted[0]))):
            return False
        return int(value) > int(wanted[0]) if operator == "Gt" else int(value) < int(wanted[0])
    return False


def matches_term(term: JsonObject, node: JsonObject) -> bool:
    """A node selector term: its `matchExpressions` (on labels) and `matchFields` (on
    `metadata.name`, with In or NotIn) all hold; an empty term matches nothing."""
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False
    labels = node["metadata"].get("labels") or {}
    name = {"metadata.name": node["metadata"]["name"]}
    return all(_matches_requirement(r, labels) for r in expressions) and all(
        r.get("key") == "metadata.name"
        and r.get("operator") in ("In", "NotIn")
        and _matches_requirement(r, name)
        for r in fields
    )


def _required_terms(pod: JsonObject) -> list[JsonObject] | None:
    affinity = (_spec(pod).get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    return None if required is None else list(required.get("nodeSelectorTerms") or [])


def matches_node_affinity(pod: JsonObject, node: JsonObject) -> bool:
    """`nodeSelector` (every label equal) and any of the required `nodeSelectorTerms`."""
    labels = node["metadata"].get("labels") or {}
    if any(labels.get(key) != value for key, value in (_spec(pod).get("nodeSelector") or {}).items()):
        return False
    terms = _required_terms(pod)
    return terms is None or any(matches_term(term, node) for term in terms)


def pinned_nodes(pod: JsonObject) -> set[str] | None:
    """NodeAffinity's PreFilter: the node names every required term pins with `matchFields`
    `metadata.name In`, or None when some term (or no term) pins none, so any node may do."""
    terms = _required_terms(pod)
    if not terms:
        return None
    pinned: set[str] = set()
    for term in terms:
        names: set[str] | None = None
        for requirement in term.get("matchFields") or []:
            if requirement.get("key") == "metadata.name" and requirement.get("operator") == "In":
                values = set(requirement.get("values") or [])
                names = values if names is None else names & values
        if names is None:
            return None
        pinned |= names
    return pinned


# --- filtering ---------------------------------------------------------------------------------


def filter_node(
    pod: JsonObject, requests: Counter[str], node: JsonObject, requested: Counter[str]
) -> list[str]:
    """Why the node cannot take the pod, in the words of the first filter that rejects it (empty
    when it can). `requested` is what the pods bound or assumed on the node already request."""
    tolerations = _spec(pod).get("tolerations") or []
    cordon = {"key": UNSCHEDULABLE_TAINT, "effect": "NoSchedule"}
    if _spec(node).get("unschedulable") and not any(tolerates(t, cordon) for t in tolerations):
        return [NODE_UNSCHEDULABLE]
    taint = untolerated_taint(node_taints(node), tolerations)
    if taint is not None:
        return [f"node(s) had untolerated taint {{{taint.get('key') or ''}: {taint.get('value') or ''}}}"]
    if not matches_node_affinity(pod, node):
        return [AFFINITY_MISMATCH]
    return [
        f"Insufficient {name}"
        for name, count in sorted(requests.items())
        if count > _allocatable(node, name) - requested[name]
    ]


def fit_error(nodes: int, reasons: Counter[str]) -> str:
    histogram = sorted(f"{count} {reason}" for reason, count in reasons.items())
    return f"0/{nodes} nodes are available: {', '.join(histogram)}."


@dataclass(frozen=True)
class Feasibility:
    nodes: list[str]
    """The nodes that can take the pod, by name."""
    message: str
    """Why none can (kube-scheduler's FitError text); empty when some can."""


def feasible_nodes(
    pod: JsonObject, nodes: Mapping[str, JsonObject], requested: Mapping[str, Counter[str]]
) -> Feasibility:
    if not nodes:
        return Feasibility([], NO_NODES)
    pinned = pinned_nodes(pod)
    if pinned is not None and not pinned:
        return Feasibility([], f"0/{len(nodes)} nodes are available: {PINS_CONFLICT}.")
    requests = pod_requests(pod)
    feasible: list[str] = []
    reasons: Counter[str] = Counter()
    for name in sorted(nodes):
        if pinned is not None and name not in pinned:
            reasons[NOT_PINNED_HERE] += 1
            continue
        rejected = filter_node(pod, requests, nodes[name], requested.get(name, Counter()))
        if rejected:
            reasons.update(rejected)
        else:
            feasible.append(name)
    return Feasibility(feasible, "" if feasible else fit_error(len(nodes), reasons))


# --- the scheduling queue ----------------------------------------------------------------------


@dataclass
class SchedulingQueue:
    """kube-scheduler's scheduling queue, reduced to what decides when a pod is tried.

    An active queue in `queue_order`; gated pods wait aside until an update removes their gates
    (PreEnqueue); unschedulable pods wait until `move_all_to_active` (a node added or updated,
    resources freed), an update to their spec or metadata, or `flush_after` seconds; pods whose
    binding failed wait `backoff` seconds. Not modelled: the exponential backoff of pods that were
    unschedulable (kube-scheduler sends them through its backoff queue, 1 s doubling up to 10 s)
    and queueing hints but the one `move_to_active` is given (the scheduler gives NodeAffinity's)."""

    flush_after: float = 60.0
    backoff: float = 1.0
    _active: dict[str, JsonObject] = field(default_factory=dict)
    _gated: dict[str, JsonObject] = field(default_factory=dict)
    _unschedulable: dict[str, tuple[float, JsonObject]] = field(default_factory=dict)
    _backing_off: dict[str, tuple[float, JsonObject]] = field(default_factory=dict)

    def where(self, key: str) -> str | None:
        """Which queue holds the pod: "active", "gated", "unschedulable", "backoff" or None."""
        for name, pods in (
            ("active", self._active),
            ("gated", self._gated),
            ("unschedulable", self._unschedulable),
            ("backoff", self._backing_off),
        ):
            if key in pods:
                return name
        return None

    def add(self, key: str, pod: JsonObject) -> None:
        self.delete(key)
        (self._gated if is_gated(pod) else self._active)[key] = pod

    def update(self, key: str, old: JsonObject | None, new: JsonObject) -> None:
        if key in self._active:
            self._active[key] = new
        elif key in self._backing_off:
            self._backing_off[key] = (self._backing_off[key][0], new)
        elif key in self._gated or key in self._unschedulable:
            if old is None or spec_changed(old, new):
                self.add(key, new)
            elif key in self._gated:
                self._gated[key] = new
            else:
                self._unschedulable[key] = (self._unschedulable[key][0], new)
        else:
            self.add(key, new)

    def delete(self, key: str) -> None:
        for pods in (self._active, self._gated, self._unschedulable, self._backing_off):
            pods.pop(key, None)

    def park(self, key: str, pod: JsonObject, now: float) -> None:
        """The pod fits no node: it waits for something that may change that."""
        self.delete(key)
        self._unschedulable[key] = (now, pod)

    def back_off(self, key: str, pod: JsonObject, now: float) -> None:
        self.delete(key)
        self._backing_off[key] = (now + self.backoff, pod)

    def move_all_to_active(self) -> None:
        for key, (_, pod) in list(self._unschedulable.items()):
            self.add(key, pod)

    def move_to_active(self, may_fit: Callable[[JsonObject], bool]) -> None:
        """Move the unschedulable pods that `may_fit` says the event may let in (a queueing hint)."""
        for key, (_, pod) in list(self._unschedulable.items()):
            if may_fit(pod):
                self.add(key, pod)

    def pop(self, now: float) -> tuple[str, JsonObject] | None:
        """The first active pod, after moving those whose backoff or flush time came."""
        for key, (until, pod) in list(self._backing_off.items()):
            if until <= now:
                self.add(key, pod)
        for key, (since, pod) in list(self._unschedulable.items()):
            if since + self.flush_after <= now:
                self.add(key, pod)
        if not self._active:
            return None
        key = min(self._active, key=lambda k: queue_order(self._active[k]))
        return key, self._active.pop(key)

    def next_due(self, now: float) -> float | None:
        """Seconds until a backoff ends or a flush is due; None when nothing waits on time."""
        times = [until for until, _ in self._backing_off.values()]
        times += [since + self.flush_after for since, _ in self._unschedulable.values()]
        return max(0.0, min(times) - now) if times else None
