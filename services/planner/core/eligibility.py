"""Which opted-in nodes a pod may run on, by its node selector, required node affinity and tolerations.

Where it sits: the planner's core asks it before placing a pod that has rules, so that a pod is
released only to a node the scheduler can bind it to (a pod released elsewhere would be pinned
there for good). The rules follow kube-scheduler's NodeAffinity and TaintToleration filters:
every `nodeSelector` label equal; at least one required term holding, a term holding when all its
requirements do (a term without requirements holds for no node); every NoSchedule and NoExecute
taint tolerated. Pure, and nothing here performs I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from events.nodes import NodeObserved, Taint
from events.pods import NodeRules, Requirement, Toleration

BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})


def admits(rules: NodeRules, node: NodeObserved) -> bool:
    """The node is one the pod's rules let it run on."""
    if any(node.labels.get(key) != value for key, value in rules.node_selector.items()):
        return False
    fields = {"metadata.name": node.name}
    if rules.required_terms and not any(
        (term.expressions or term.fields)
        and all(_holds(r, node.labels) for r in term.expressions)
        and all(_holds(r, fields) for r in term.fields)
        for term in rules.required_terms
    ):
        return False
    return all(
        any(_tolerates(toleration, taint) for toleration in rules.tolerations)
        for taint in node.taints
        if taint.effect in BLOCKING_EFFECTS
    )


def has_effect(rules: NodeRules, nodes: Mapping[str, NodeObserved]) -> bool:
    """Whether the rules can rule out any of `nodes` at all (most pods have none that do)."""
    return bool(rules.node_selector or rules.required_terms) or any(
        taint.effect in BLOCKING_EFFECTS for node in nodes.values() for taint in node.taints
    )


def _holds(requirement: Requirement, values: Mapping[str, str]) -> bool:
    present = requirement.key in values
    value = values.get(requirement.key, "")
    match requirement.operator:
        case "In":
            return present and value in requirement.values
        case "NotIn":
            return not present or value not in requirement.values
        case "Exists":
            return present
        case "DoesNotExist":
            return not present
        case "Gt" | "Lt":
            if not present or len(requirement.values) != 1:
                return False
            try:
                have, bound = int(value), int(requirement.values[0])
            except ValueError:
                return False
            return have > bound if requirement.operator == "Gt" else have < bound


def _tolerates(toleration: Toleration, taint: Taint) -> bool:
    if toleration.effect and toleration.effect != taint.effect:
        return False
    if toleration.operator == "Exists":
        return toleration.key is None or toleration.key == taint.key
    return toleration.key == taint.key and toleration.value == taint.value
