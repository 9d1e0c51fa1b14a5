"""`admits`: the nodes a pod's node selector, required node affinity and tolerations allow."""

from __future__ import annotations

import pytest

from events.nodes import NodeObserved, Taint
from events.pods import NodeRules, NodeSelectorTerm, Requirement, Toleration
from services.planner.core.eligibility import admits, has_effect

NODE = NodeObserved(
    name="a100-1",
    labels={"gpu": "a100", "zone": "a", "cores": "64"},
    taints=(
        Taint(key="dedicated", value="ml", effect="NoSchedule"),
        Taint(key="soft", effect="PreferNoSchedule"),
    ),
)
TOLERATE = (Toleration(key="dedicated", value="ml", effect="NoSchedule"),)


def term(*expressions: Requirement, fields: tuple[Requirement, ...] = ()) -> NodeSelectorTerm:
    return NodeSelectorTerm(expressions=expressions, fields=fields)


def req(key: str, operator: str, *values: str) -> Requirement:
    return Requirement(key=key, operator=operator, values=values)


@pytest.mark.parametrize(
    ("rules", "admitted"),
    [
        (NodeRules(tolerations=TOLERATE), True),
        (NodeRules(), False),  # the NoSchedule taint is not tolerated
        (NodeRules(tolerations=(Toleration(operator="Exists"),)), True),
        (NodeRules(tolerations=(Toleration(key="dedicated", operator="Exists"),)), True),
        (NodeRules(tolerations=(Toleration(key="dedicated", value="other"),)), False),
        (NodeRules(tolerations=(Toleration(key="dedicated", value="ml", effect="NoExecute"),)), False),
        (NodeRules(node_selector={"gpu": "a100"}, tolerations=TOLERATE), True),
        (NodeRules(node_selector={"gpu": "h100"}, tolerations=TOLERATE), False),
        (NodeRules(required_terms=(term(req("zone", "In", "a", "b")),), tolerations=TOLERATE), True),
        (NodeRules(required_terms=(term(req("zone", "NotIn", "a")),), tolerations=TOLERATE), False),
        (NodeRules(required_terms=(term(req("rack", "NotIn", "r1")),), tolerations=TOLERATE), True),
        (NodeRules(required_terms=(term(req("zone", "Exists")),), tolerations=TOLERATE), True),
        (NodeRules(required_terms=(term(req("zone", "DoesNotExist")),), tolerations=TOLERATE), False),
        (NodeRules(required_terms=(term(req("cores", "Gt", "32")),), tolerations=TOLERATE), True),
        (NodeRules(required_terms=(term(req("cores", "Lt", "32")),), tolerations=TOLERATE), False),
        (NodeRules(required_terms=(term(req("gpu", "Gt", "1")),), tolerations=TOLERATE), False),
        (NodeRules(required_terms=(term(),), tolerations=TOLERATE), False),  # an empty term: no node
        (
            NodeRules(
                required_terms=(term(req("zone", "In", "b")), term(req("gpu", "In", "a100"))),
                tolerations=TOLERATE,
            ),
            True,  # terms are ORed
        ),
        (
            NodeRules(
                required_terms=(term(req("zone", "In", "a"), req("gpu", "In", "h100")),),
                tolerations=TOLERATE,
            ),
            False,  # requirements of a term are ANDed
        ),
        (
            NodeRules(
                required_terms=(term(fields=(req("metadata.name", "In", "a100-1"),)),), tolerations=TOLERATE
            ),
            True,
        ),
        (
            NodeRules(
                required_terms=(term(fields=(req("metadata.name", "In", "a100-2"),)),), tolerations=TOLERATE
            ),
            False,
        ),
    ],
)
def test_admits_as_kube_scheduler_filters(rules: NodeRules, admitted: bool) -> None:
    assert admits(rules, NODE) is admitted


def test_rules_matter_only_with_a_selector_terms_or_a_blocking_taint() -> None:
    plain = {"n": NodeObserved(name="n", taints=(Taint(key="soft", effect="PreferNoSchedule"),))}
    assert not has_effect(NodeRules(), plain)
    assert has_effect(NodeRules(node_selector={"a": "b"}), plain)
    assert has_effect(NodeRules(), {"a100-1": NODE})
