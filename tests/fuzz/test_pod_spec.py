"""Pods and nodes as the Kubernetes API serves them, with hostile values everywhere they may vary.

The pod watcher reads pods and nodes through kubernetes-asyncio's typed models, so their shape is
the API's (a `spec` that is an object, `containers` a list of objects, resource quantities
strings); every value within that shape is the user's, and hostile here: resource names that are
nearly slices (`nvidia.com/gpu-0gb`, `-1e3gb`, `-10GB`, Arabic digits), quantities such as "1e3",
"0x10", "1Ki", "-1", "01" or thousands of digits, several slices, whole GPUs beside slices, odd
gates, affinities, tolerations, users and phases. What must hold:

- `translate_pod` never raises: a pod is a `PodObserved` (exactly one well-formed slice of
  quantity 1 that the client rules allow), a `PodRejected` whose reason is one of the rules and
  is broken by the pod as written, or None when no container asks for an `nvidia.com/gpu-...`
  resource;
- the admission webhook's `gate_patch` never raises and gates exactly the slice pods that are
  neither gated nor bound;
- `translate_node` never raises: a node is None unless it opts in, and an opted-in node has GPU
  facts or says why not, and only well-formed slice counts.

`test_a_pod_outside_the_api_schema_is_refused_naming_the_field`: shapes the API cannot serve are
refused with `UnreadablePodError` naming the field.
"""

from __future__ import annotations

import copy
from typing import Any, get_args

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from events.nodes import NodeObserved
from events.pods import PodObserved, PodPhase, PodRejected
from events.vocabulary import (
    DEFAULT_OPT_IN,
    GFD_COUNT,
    GFD_MEMORY,
    GFD_PRODUCT,
    RELEASED_TO_ANNOTATION,
    SLICE_GATE,
    SLICE_RESOURCE_PREFIX,
    WHOLE_GPU_RESOURCE,
    RejectionRule,
    asks_for_a_slice,
    container_requests,
    is_opted_in,
    is_zero_slice,
    slice_resource,
    slice_size,
)
from services.pod_watcher.gate import gate_patch
from services.pod_watcher.translate import (
    MpsClientRules,
    UnreadablePodError,
    is_gated,
    translate_node,
    translate_pod,
)
from tests.fuzz.garbage import EDGE_INTS, hostile_ints, hostile_texts
from tests.fuzz.profile import fuzz, tried

SLICE_NAMES = (
    "nvidia.com/gpu-10gb",
    "nvidia.com/gpu-1gb",
    "nvidia.com/gpu-80gb",
    "nvidia.com/gpu-81gb",
    "nvidia.com/gpu-0gb",
    "nvidia.com/gpu-00gb",
    "nvidia.com/gpu-010gb",
    "nvidia.com/gpu--1gb",
    "nvidia.com/gpu-1e3gb",
    "nvidia.com/gpu-0x10gb",
    "nvidia.com/gpu-10GB",
    "nvidia.com/gpu-10gib",
    "nvidia.com/gpu-10gb ",
    "nvidia.com/gpu-gb",
    "nvidia.com/gpu-",
    "nvidia.com/gpu-\u0661\u0660gb"  # Arabic-Indic digits,
    "nvidia.com/gpu-99999999999999999999999999999gb",
    WHOLE_GPU_RESOURCE,
    "nvidia.com/gpu.shared",
    "nvidia.com/mig-1g.5gb",
    "example.com/gpu-10gb",
    "cpu",
    "memory",
)
QUANTITIES = (
    "1",
    "1",
    "1",
    " 1",
    "1 ",
    "1.0",
    "01",
    "+1",
    "1e0",
    "1e3",
    "0x10",
    "1Ki",
    "1k",
    "1000m",
    "0",
    "-1",
    "2",
    "",
    "one",
    "\u0661",  # an Arabic-Indic one
    "9" * 5000,
)
PHASES = get_args(PodPhase)

well_formed_slices = st.integers(1, 200).map(slice_resource)
resource_names = st.one_of(
    well_formed_slices,
    well_formed_slices,
    st.sampled_from(SLICE_NAMES),
    hostile_texts(12, surrogates=False).map(lambda tail: SLICE_RESOURCE_PREFIX + tail),
    hostile_texts(12, surrogates=False),
)
quantities = st.one_of(
    st.just("1"),
    st.just("1"),
    st.sampled_from(QUANTITIES),
    hostile_ints().map(str),
    hostile_texts(8, surrogates=False),
)
texts = hostile_texts(16, surrogates=False)
resource_lists = st.dictionaries(resource_names, quantities, max_size=3)
users = st.one_of(st.sampled_from([0, 1000, 1001, -1, 2**31]), st.integers())


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects whose every field may be absent, as the API leaves out what is unset."""
    return st.fixed_dictionaries({}, optional=fields)


plain_containers = st.fixed_dictionaries(
    {"name": texts},
    optional={
        "image": texts,
        "resources": optional(limits=resource_lists, requests=resource_lists),
        "securityContext": optional(runAsUser=users),
    },
)
slice_containers = st.fixed_dictionaries(
    {
        "name": texts,
        "resources": st.fixed_dictionaries(
            {"limits": st.dictionaries(resource_names, quantities, min_size=1, max_size=2)},
            optional={"requests": resource_lists},
        ),
    },
    optional={"securityContext": optional(runAsUser=users)},
)
containers = st.one_of(slice_containers, slice_containers, plain_containers)
requirements = st.fixed_dictionaries(
    {
        "key": texts,
        "operator": st.one_of(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]), texts),
    },
    optional={"values": st.lists(texts, max_size=3)},
)
affinities = st.fixed_dictionaries(
    {
        "nodeAffinity": optional(
            requiredDuringSchedulingIgnoredDuringExecution=st.fixed_dictionaries(
                {
                    "nodeSelectorTerms": st.lists(
                        optional(
                            matchExpressions=st.lists(requirements, max_size=2),
                            matchFields=st.lists(requirements, max_size=2),
                        ),
                        max_size=2,
                    )
                }
            )
        )
    }
)
tolerations = optional(
    key=texts,
    operator=st.one_of(st.sampled_from(["Equal", "Exists"]), texts),
    value=texts,
    effect=st.one_of(st.sampled_from(["NoSchedule", "NoExecute", "PreferNoSchedule"]), texts),
)
specs = st.fixed_dictionaries(
    {"containers": st.lists(containers, min_size=1, max_size=3)},
    optional={
        "initContainers": st.lists(containers, max_size=2),
        "hostIPC": st.sampled_from([True, True, True, False]),
        "securityContext": optional(runAsUser=users),
        "priority": st.one_of(
            st.sampled_from([v for v in EDGE_INTS if -(2**31) <= v < 2**31]), st.integers(-(2**31), 2**31 - 1)
        ),
        "nodeName": texts,
        "schedulingGates": st.lists(
            st.fixed_dictionaries({"name": st.one_of(st.just(SLICE_GATE), texts)}), max_size=2
        ),
        "nodeSelector": st.dictionaries(texts, texts, max_size=2),
        "affinity": affinities,
        "tolerations": st.lists(tolerations, max_size=2),
    },
)
any_pods = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries(
            {"name": texts, "uid": texts},
            optional={
                "namespace": texts,
                "resourceVersion": texts,
                "creationTimestamp": st.sampled_from(
                    ["2026-11-22T10:00:00+00:00", "2026-11-22T10:00:00Z", "1970-01-01T00:00:00+00:00"]
                ),
                "annotations": st.dictionaries(
                    st.one_of(st.just(RELEASED_TO_ANNOTATION), texts), texts, max_size=2
                ),
            },
        ),
        "spec": specs,
    },
    optional={"status": optional(phase=st.one_of(st.sampled_from(PHASES), st.sampled_from(PHASES), texts))},
)


def _with_one_slice(pod: dict[str, Any], requests: dict[str, Any], index: int) -> dict[str, Any]:
    """`pod` with one container asking for exactly one well-formed slice, and the rest asking for
    none, hostIPC set: a valid request, so that what varies is everything else."""
    spec = pod["spec"]
    spec.pop("initContainers", None)
    spec["hostIPC"] = True
    for container in spec["containers"]:
        container.pop("resources", None)
    spec["containers"][min(index, len(spec["containers"]) - 1)]["resources"] = requests
    return pod


valid_requests = st.builds(lambda resource: {"limits": {resource: "1"}}, well_formed_slices)
one_slice_pods = st.builds(
    _with_one_slice,
    any_pods,
    valid_requests,
    st.integers(0, 2),
)


pods = st.one_of(any_pods, one_slice_pods)
"""Pods with any requests, and pods with one valid slice request and hostile everything else."""


client_rules = st.builds(
    MpsClientRules,
    ipc=st.sampled_from(["host", "shm-directory"]),
    mps_user=st.one_of(st.none(), st.sampled_from([0, 1000])),
)


def slice_requests(pod: dict[str, Any]) -> list[tuple[dict[str, Any], str, object]]:
    """(container, resource, quantity) of every `nvidia.com/gpu-...` request, init containers first."""
    spec = pod["spec"]
    return [
        (container, resource, quantity)
        for container in [*spec.get("initContainers", []), *spec["containers"]]
        for resource, quantity in container_requests(container).items()
        if resource.startswith(SLICE_RESOURCE_PREFIX)
    ]


def breaks(rule: str, pod: dict[str, Any], largest: int | None, rules: MpsClientRules) -> bool:
    """Whether the pod as written breaks `rule` (the witness a rejection must have)."""
    asked = slice_requests(pod)
    spec = pod["spec"]
    sized = [(c, slice_size(r)) for c, r, q in asked if slice_size(r) is not None and str(q).strip() == "1"]
    per_container = [
        [r for r in container_requests(c) if r.startswith(SLICE_RESOURCE_PREFIX)]
        for c in [*spec.get("initContainers", []), *spec["containers"]]
    ]
    if rule == RejectionRule.MALFORMED_RESOURCE:
        return any(slice_size(r) is None and not is_zero_slice(r) for _, r, _ in asked)
    if rule == RejectionRule.ZERO_SIZE:
        return any(is_zero_slice(r) for _, r, _ in asked)
    if rule == RejectionRule.QUANTITY_NOT_ONE:
        return any(slice_size(r) is not None and str(q).strip() != "1" for _, r, q in asked)
    if rule == RejectionRule.SEVERAL_IN_CONTAINER:
        return any(len(requested) > 1 for requested in per_container)
    if rule == RejectionRule.WITH_WHOLE_GPU:
        return any(asked and WHOLE_GPU_RESOURCE in container_requests(c) for c, _, _ in asked)
    if rule == RejectionRule.SEVERAL_IN_POD:
        return len(sized) > 1
    if rule == RejectionRule.TOO_LARGE:
        return largest is not None and any(size is not None and size > largest for _, size in sized)
    if rule == RejectionRule.HOST_IPC_REQUIRED:
        return rules.ipc == "host" and spec.get("hostIPC") is not True
    if rule == RejectionRule.USER_MISMATCH:
        return rules.mps_user is not None and any(runs_as(c, spec) != rules.mps_user for c, _, _ in asked)
    return False


def runs_as(container: dict[str, Any], spec: dict[str, Any]) -> object:
    """The container's effective `runAsUser`: its own, else the pod's (None: the image's)."""
    own = container.get("securityContext", {}).get("runAsUser")
    return own if own is not None else spec.get("securityContext", {}).get("runAsUser")


VALID_POD: dict[str, Any] = {
    "metadata": {"name": "p", "uid": "u"},
    "spec": {
        "hostIPC": True,
        "containers": [{"name": "m", "resources": {"limits": {"nvidia.com/gpu-10gb": "1"}}}],
    },
}


@fuzz(bounded=400)
@given(pod=pods, largest=st.one_of(st.none(), st.sampled_from([1, 15, 80, 10**6])), rules=client_rules)
@example(pod={**VALID_POD, "status": {"phase": "Evicted"}}, largest=None, rules=MpsClientRules()).via(
    "a phase this version does not know raised pydantic's ValidationError"
)
def test_a_pod_is_observed_rejected_for_a_rule_it_breaks_or_none_of_our_business(
    pod: dict[str, Any], largest: int | None, rules: MpsClientRules
) -> None:
    served = copy.deepcopy(pod)
    result = translate_pod(served, largest, rules)
    assert served == pod, "translation changed the pod it read"
    asked = slice_requests(pod)
    assert asks_for_a_slice(pod) is bool(asked)
    if not asked:
        tried("pod specs", "not a slice pod")
        assert result is None
        return
    assert result is not None, "a pod that asks for a slice was ignored"
    metadata = pod["metadata"]
    assert (result.namespace, result.name, result.uid) == (
        metadata.get("namespace", "default"),
        metadata["name"],
        metadata["uid"],
    )
    if isinstance(result, PodRejected):
        tried("pod specs", f"rejected {result.reason}")
        assert result.reason in set(RejectionRule), result.reason
        assert result.message.strip()
        assert breaks(result.reason, pod, largest, rules), f"{result.reason} but the pod does not break it"
        return
    tried("pod specs", "observed")
    assert isinstance(result, PodObserved)
    ((container, resource, quantity),) = asked
    assert slice_size(resource) == result.size_gb >= 1
    assert str(quantity).strip() == "1"
    assert WHOLE_GPU_RESOURCE not in container_requests(container)
    assert largest is None or result.size_gb <= largest
    assert rules.ipc != "host" or pod["spec"].get("hostIPC") is True
    assert rules.mps_user is None or runs_as(container, pod["spec"]) == rules.mps_user
    assert result.gated is is_gated(pod)
    phase = pod.get("status", {}).get("phase") or "Pending"
    assert result.phase == (phase if phase in PHASES else "Unknown")


@fuzz(bounded=200)
@given(pod=pods)
def test_the_webhook_gates_exactly_the_slice_pods_not_yet_gated_or_bound(pod: dict[str, Any]) -> None:
    patch = gate_patch(pod)
    should_gate = asks_for_a_slice(pod) and not is_gated(pod) and not pod["spec"].get("nodeName")
    tried("webhook pods", "gated" if should_gate else "left alone")
    assert bool(patch) is should_gate
    if should_gate:
        assert any(op["path"].startswith("/spec/schedulingGates") for op in patch)


# --- nodes -----------------------------------------------------------------------------------------

label_values = st.one_of(
    st.sampled_from(
        ["mps", "MPS", "mig", "", "81920", "0", "-1", "1e3", "0x10", "\u0661\u0660", "\u00b2", "9" * 5000]
    ),
    hostile_ints().map(str),
    texts,
)
labels = st.builds(
    lambda known, more: {**more, **known},
    st.fixed_dictionaries(
        {},
        optional={
            DEFAULT_OPT_IN.keys[0]: st.sampled_from(["mps", "mps", "mps", "mps", "MPS", "mig", ""]),
            DEFAULT_OPT_IN.keys[-1]: st.sampled_from(["mps", "MPS", ""]),
            GFD_PRODUCT: texts,
            GFD_COUNT: label_values,
            GFD_MEMORY: label_values,
        },
    ),
    st.dictionaries(texts, label_values, max_size=3),
)
counts = st.sampled_from(["0", "1", "2", "48", "-1", "1e3", "1k", "\u0661", "\u00b2", "9" * 5000])
allocatable = st.dictionaries(
    st.one_of(well_formed_slices, well_formed_slices, resource_names),
    st.one_of(counts, counts, quantities, label_values),
    min_size=1,
    max_size=4,
)
"""What a kubelet says a node has, as the API serves it: slice resources among others, counted oddly."""
nodes = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries(
            {"name": texts, "labels": labels}, optional={"resourceVersion": texts}
        ),
        "status": st.fixed_dictionaries({"allocatable": allocatable}),
    },
    optional={
        "spec": optional(
            unschedulable=st.booleans(),
            taints=st.lists(
                st.fixed_dictionaries({"key": texts, "effect": texts}, optional={"value": texts}), max_size=2
            ),
        ),
    },
)


OPTED_IN_NODE = {"metadata": {"name": "n", "labels": {"nos.nebuly.com/gpu-partitioning": "mps"}}}


@fuzz(bounded=300)
@given(node=nodes)
@example(node={**OPTED_IN_NODE, "status": {"allocatable": {"nvidia.com/gpu-10gb": "\u00b2"}}}).via(
    "a superscript digit passed str.isdigit and int() raised ValueError"
)
@example(node={**OPTED_IN_NODE, "status": {"allocatable": {"nvidia.com/gpu-10gb": "9" * 5000}}}).via(
    "a count of 5,000 digits made int() raise ValueError"
)
def test_a_node_is_observed_only_when_it_opts_in_with_gpu_facts_or_why_not(node: dict[str, Any]) -> None:
    result = translate_node(node)
    if result is None:
        tried("nodes", "not opted in")
        assert not is_opted_in(node["metadata"]["labels"])
        return
    tried("nodes", "observed with GPU facts" if result.gfd else "observed without GPU facts")
    assert isinstance(result, NodeObserved)
    assert (result.gfd is None) is (result.gfd_problem is not None)
    assert all(size >= 1 and count >= 0 for size, count in result.allocatable.items())


# --- outside the API's schema ------------------------------------------------------------------------

OUTSIDE_THE_SCHEMA = {
    "spec a list": {"metadata": {"name": "p", "uid": "u"}, "spec": []},
    "containers an object": {"metadata": {"name": "p", "uid": "u"}, "spec": {"containers": {"main": {}}}},
    "a container a string": {"metadata": {"name": "p", "uid": "u"}, "spec": {"containers": ["main"]}},
    "resources a string": {
        "metadata": {"name": "p", "uid": "u"},
        "spec": {"containers": [{"name": "main", "resources": "nvidia.com/gpu-10gb"}]},
    },
    "limits a string": {
        "metadata": {"name": "p", "uid": "u"},
        "spec": {"containers": [{"name": "main", "resources": {"limits": "nvidia.com/gpu-10gb"}}]},
    },
    "a slice pod without a name": {
        "metadata": {"uid": "u"},
        "spec": {"containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpu-10gb": "1"}}}]},
    },
}


@pytest.mark.parametrize("pod", OUTSIDE_THE_SCHEMA.values(), ids=OUTSIDE_THE_SCHEMA.keys())
def test_a_pod_outside_the_api_schema_is_refused_naming_the_field(pod: dict[str, Any]) -> None:
    """The API server cannot serve these shapes; given one, translate_pod says which field it could
    not read (the watcher logs that and goes on) instead of failing somewhere inside."""
    with pytest.raises(UnreadablePodError) as raised:
        translate_pod(pod, None)
    field = str(raised.value).partition(":")[0]
    assert field.startswith(("metadata", "spec", "the pod")), str(raised.value)


def test_a_null_spec_is_read_as_an_absent_one() -> None:
    """The API omits empty fields and null means absent: a pod without a spec asks for nothing."""
    assert translate_pod({"metadata": {"name": "p", "uid": "u"}, "spec": None}, None) is None
