"""The pod watcher's pure translation: every validation rule of a pod, and the opt-in of a node."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from events.nodes import GfdFacts, NodeObserved, Taint
from events.pods import NodeRules, NodeSelectorTerm, PodObserved, PodRejected, Requirement, Toleration
from events.vocabulary import RELEASED_TO_ANNOTATION, SLICE_GATE, MpsIpcMode, OptInLabel, RejectionRule
from services.pod_watcher.translate import MpsClientRules, translate_node, translate_pod

CREATED = "2026-11-22T10:00:00Z"


def container(
    name: str = "main",
    requests: dict[str, str] | None = None,
    limits: dict[str, str] | None = None,
    user: int | None = None,
) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    made: dict[str, Any] = {"name": name, "image": "busybox", "resources": resources}
    if user is not None:
        made["securityContext"] = {"runAsUser": user}
    return made


def pod(
    *containers: dict[str, Any],
    init: list[dict[str, Any]] | None = None,
    priority: int | None = None,
    phase: str | None = "Pending",
    node: str | None = None,
    host_ipc: bool | None = True,
    user: int | None = None,
) -> dict[str, Any]:
    """A pod; by default a well-formed MPS client (hostIPC: true) with no runAsUser of its own."""
    spec: dict[str, Any] = {"containers": list(containers)}
    if host_ipc is not None:
        spec["hostIPC"] = host_ipc
    if user is not None:
        spec["securityContext"] = {"runAsUser": user}
    if init is not None:
        spec["initContainers"] = init
    if priority is not None:
        spec["priority"] = priority
    if node is not None:
        spec["nodeName"] = node
    return {
        "metadata": {
            "namespace": "ml",
            "name": "train",
            "uid": "uid-train",
            "resourceVersion": "42",
            "creationTimestamp": CREATED,
        },
        "spec": spec,
        "status": {"phase": phase} if phase is not None else {},
    }


def rejected(result: PodObserved | PodRejected | None) -> PodRejected:
    assert isinstance(result, PodRejected), result
    assert (result.namespace, result.name, result.uid, result.resource_version) == (
        "ml",
        "train",
        "uid-train",
        "42",
    )
    return result


def observed(result: PodObserved | PodRejected | None) -> PodObserved:
    assert isinstance(result, PodObserved), result
    return result


# --- pods: every rule, with its reason and the offending value in the message -----------------

REJECTIONS: list[tuple[str, dict[str, Any], int | None, str, list[str]]] = [
    (
        "letters-for-size",
        pod(container(limits={"nvidia.com/gpu-abcgb": "1"})),
        None,
        RejectionRule.MALFORMED_RESOURCE,
        ["'nvidia.com/gpu-abcgb'", "'main'"],
    ),
    (
        "upper-case-unit",
        pod(container(limits={"nvidia.com/gpu-10GB": "1"})),
        None,
        RejectionRule.MALFORMED_RESOURCE,
        ["'nvidia.com/gpu-10GB'"],
    ),
    (
        "trailing-garbage",
        pod(container(limits={"nvidia.com/gpu-10gbx": "1"})),
        None,
        RejectionRule.MALFORMED_RESOURCE,
        ["'nvidia.com/gpu-10gbx'"],
    ),
    (
        "leading-zero",
        pod(container(limits={"nvidia.com/gpu-010gb": "1"})),
        None,
        RejectionRule.MALFORMED_RESOURCE,
        ["'nvidia.com/gpu-010gb'"],
    ),
    (
        "no-size",
        pod(container(limits={"nvidia.com/gpu-gb": "1"})),
        None,
        RejectionRule.MALFORMED_RESOURCE,
        ["'nvidia.com/gpu-gb'"],
    ),
    (
        "zero-size",
        pod(container(limits={"nvidia.com/gpu-0gb": "1"})),
        None,
        RejectionRule.ZERO_SIZE,
        ["nvidia.com/gpu-0gb", "'main'"],
    ),
    (
        "zero-size-several-zeros",
        pod(container(limits={"nvidia.com/gpu-00gb": "1"})),
        None,
        RejectionRule.ZERO_SIZE,
        ["nvidia.com/gpu-00gb"],
    ),
    (
        "two-slices-in-one-container",
        pod(container(limits={"nvidia.com/gpu-10gb": "1", "nvidia.com/gpu-20gb": "1"})),
        None,
        RejectionRule.SEVERAL_IN_CONTAINER,
        ["nvidia.com/gpu-10gb", "nvidia.com/gpu-20gb", "'main'"],
    ),
    (
        "two-slices-one-in-requests-one-in-limits",
        pod(container(requests={"nvidia.com/gpu-10gb": "1"}, limits={"nvidia.com/gpu-20gb": "1"})),
        None,
        RejectionRule.SEVERAL_IN_CONTAINER,
        ["nvidia.com/gpu-10gb", "nvidia.com/gpu-20gb"],
    ),
    (
        "quantity-two",
        pod(container(limits={"nvidia.com/gpu-10gb": "2"})),
        None,
        RejectionRule.QUANTITY_NOT_ONE,
        ["2", "nvidia.com/gpu-10gb", "'main'"],
    ),
    (
        "quantity-two-in-requests-only",
        pod(container(requests={"nvidia.com/gpu-10gb": "2"})),
        None,
        RejectionRule.QUANTITY_NOT_ONE,
        ["2", "nvidia.com/gpu-10gb"],
    ),
    (
        "quantity-zero",
        pod(container(limits={"nvidia.com/gpu-10gb": "0"})),
        None,
        RejectionRule.QUANTITY_NOT_ONE,
        ["0 of nvidia.com/gpu-10gb"],
    ),
    (
        "whole-gpu-with-slice",
        pod(container(limits={"nvidia.com/gpu": "1", "nvidia.com/gpu-10gb": "1"})),
        None,
        RejectionRule.WITH_WHOLE_GPU,
        ["nvidia.com/gpu", "nvidia.com/gpu-10gb", "'main'"],
    ),
    (
        "whole-gpu-in-requests-slice-in-limits",
        pod(container(requests={"nvidia.com/gpu": "1"}, limits={"nvidia.com/gpu-10gb": "1"})),
        None,
        RejectionRule.WITH_WHOLE_GPU,
        ["nvidia.com/gpu-10gb"],
    ),
    (
        "a-slice-in-each-of-two-containers",
        pod(
            container("a", limits={"nvidia.com/gpu-10gb": "1"}),
            container("b", limits={"nvidia.com/gpu-20gb": "1"}),
        ),
        None,
        RejectionRule.SEVERAL_IN_POD,
        ["'a'", "'b'"],
    ),
    (
        "a-slice-in-an-init-container-and-in-a-container",
        pod(
            container("worker", limits={"nvidia.com/gpu-10gb": "1"}),
            init=[container("warmup", limits={"nvidia.com/gpu-10gb": "1"})],
        ),
        None,
        RejectionRule.SEVERAL_IN_POD,
        ["'warmup'", "'worker'"],
    ),
    (
        "malformed-in-init-container",
        pod(container("main"), init=[container("setup", limits={"nvidia.com/gpu-xgb": "1"})]),
        None,
        RejectionRule.MALFORMED_RESOURCE,
        ["'nvidia.com/gpu-xgb'", "'setup'"],
    ),
    (
        "larger-than-the-largest-gpu",
        pod(container(limits={"nvidia.com/gpu-100gb": "1"})),
        80,
        RejectionRule.TOO_LARGE,
        ["nvidia.com/gpu-100gb", "100 GiB", "80 GiB"],
    ),
    (
        "one-more-than-the-largest-gpu",
        pod(container(limits={"nvidia.com/gpu-41gb": "1"})),
        40,
        RejectionRule.TOO_LARGE,
        ["nvidia.com/gpu-41gb", "40 GiB"],
    ),
]


@pytest.mark.parametrize(
    ("manifest", "largest_gpu_gb", "reason", "quoted"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_a_pod_that_breaks_a_rule_is_rejected_with_the_rule_as_reason(
    manifest: dict[str, Any], largest_gpu_gb: int | None, reason: str, quoted: list[str]
) -> None:
    result = rejected(translate_pod(manifest, largest_gpu_gb))

    assert result.reason == reason
    for value in quoted:
        assert value in result.message


# --- pods: what an MPS client needs, checked after the rules above ------------------------------

TEN = {"nvidia.com/gpu-10gb": "1"}
USER_1000 = MpsClientRules(mps_user=1000)

CLIENT_REJECTIONS: list[tuple[str, dict[str, Any], MpsClientRules, str, list[str]]] = [
    (
        "host-ipc-unset",
        pod(container(limits=TEN), host_ipc=None),
        MpsClientRules(),
        RejectionRule.HOST_IPC_REQUIRED,
        ["hostIPC unset", "spec.hostIPC: true"],
    ),
    (
        "host-ipc-false",
        pod(container(limits=TEN), host_ipc=False),
        MpsClientRules(),
        RejectionRule.HOST_IPC_REQUIRED,
        ["hostIPC false"],
    ),
    (
        "host-ipc-before-the-user",
        pod(container(limits=TEN), host_ipc=None, user=0),
        USER_1000,
        RejectionRule.HOST_IPC_REQUIRED,
        ["hostIPC unset"],
    ),
    (
        "pod-user-differs",
        pod(container(limits=TEN), user=0),
        USER_1000,
        RejectionRule.USER_MISMATCH,
        ["'main'", "user 0", "the pod's securityContext.runAsUser", "serves user 1000"],
    ),
    (
        "container-user-overrides-a-matching-pod-user",
        pod(container(limits=TEN, user=2000), user=1000),
        USER_1000,
        RejectionRule.USER_MISMATCH,
        ["user 2000", "its securityContext.runAsUser"],
    ),
    (
        "user-left-to-the-image",
        pod(container(limits=TEN)),
        USER_1000,
        RejectionRule.USER_MISMATCH,
        ["'main'", "runAsUser unset", "runAsUser: 1000"],
    ),
    (
        "the-slice-in-an-init-container-runs-as-another-user",
        pod(container("main", user=1000), init=[container("warmup", limits=TEN, user=0)]),
        USER_1000,
        RejectionRule.USER_MISMATCH,
        ["'warmup'", "user 0"],
    ),
]


@pytest.mark.parametrize(
    ("manifest", "rules", "reason", "quoted"),
    [case[1:] for case in CLIENT_REJECTIONS],
    ids=[case[0] for case in CLIENT_REJECTIONS],
)
def test_a_pod_that_cannot_be_an_mps_client_is_rejected_with_the_rule_as_reason(
    manifest: dict[str, Any], rules: MpsClientRules, reason: str, quoted: list[str]
) -> None:
    result = rejected(translate_pod(manifest, 80, rules))

    assert result.reason == reason
    for value in quoted:
        assert value in result.message


@pytest.mark.parametrize(
    ("manifest", "rules"),
    [
        (pod(container(limits=TEN), host_ipc=None), MpsClientRules(ipc="shm-directory")),
        (pod(container(limits=TEN)), MpsClientRules()),
        (pod(container(limits=TEN), user=1000), USER_1000),
        (pod(container(limits=TEN, user=1000)), USER_1000),
        (pod(container(limits=TEN, user=1000), user=0), USER_1000),
        (pod(container(limits=TEN, user=1000), container("sidecar", user=0)), USER_1000),
        (pod(container(limits=TEN, user=0)), MpsClientRules(mps_user=0)),
    ],
    ids=[
        "host-ipc-not-required-in-shm-directory-mode",
        "user-not-checked-by-default",
        "pod-user-matches",
        "container-user-matches",
        "container-user-overrides-a-wrong-pod-user",
        "only-the-slice-container-counts",
        "root-as-the-mps-user",
    ],
)
def test_a_pod_that_can_be_an_mps_client_is_observed(manifest: dict[str, Any], rules: MpsClientRules) -> None:
    assert observed(translate_pod(manifest, 80, rules)).size_gb == 10


# hostIPC as a pod may set it (absent, false, true) against each IPC mode: None means accepted.
HOST_IPC_BY_MODE: list[tuple[MpsIpcMode, bool | None, str | None]] = [
    ("host", None, "hostIPC unset"),
    ("host", False, "hostIPC false"),
    ("host", True, None),
    ("shm-directory", None, None),
    ("shm-directory", False, None),
    ("shm-directory", True, None),  # not needed, but harmless to MPS and left to Pod Security
]


@pytest.mark.parametrize(
    ("ipc", "host_ipc", "complaint"),
    HOST_IPC_BY_MODE,
    ids=[f"{ipc}-hostIPC-{json.dumps(host_ipc)}" for ipc, host_ipc, _ in HOST_IPC_BY_MODE],
)
def test_the_host_ipc_rule_follows_the_ipc_mode(
    ipc: MpsIpcMode, host_ipc: bool | None, complaint: str | None
) -> None:
    result = translate_pod(pod(container(limits=TEN), host_ipc=host_ipc), 80, MpsClientRules(ipc=ipc))

    if complaint is None:
        assert observed(result).size_gb == 10
    else:
        refusal = rejected(result)
        assert refusal.reason == RejectionRule.HOST_IPC_REQUIRED
        assert complaint in refusal.message
        assert "host IPC mode" in refusal.message


def test_the_shm_directory_mode_still_checks_the_user() -> None:
    rules = MpsClientRules(ipc="shm-directory", mps_user=1000)

    assert rejected(translate_pod(pod(container(limits=TEN), host_ipc=None), 80, rules)).reason == (
        RejectionRule.USER_MISMATCH
    )
    assert observed(translate_pod(pod(container(limits=TEN), host_ipc=None, user=1000), 80, rules))


def test_the_client_rules_default_to_the_host_ipc_mode_without_a_user() -> None:
    assert MpsClientRules() == MpsClientRules(ipc="host", mps_user=None)


@pytest.mark.parametrize(
    ("manifest", "largest_gpu_gb", "reason"),
    [
        (
            pod(container(limits={"nvidia.com/gpu-xgb": "1"}), host_ipc=None),
            80,
            RejectionRule.MALFORMED_RESOURCE,
        ),
        (
            pod(container(limits={"nvidia.com/gpu-10gb": "2"}), host_ipc=None),
            80,
            RejectionRule.QUANTITY_NOT_ONE,
        ),
        (
            pod(container(limits=TEN), container("b", limits=TEN), host_ipc=None),
            80,
            RejectionRule.SEVERAL_IN_POD,
        ),
        (pod(container(limits={"nvidia.com/gpu-200gb": "1"}), host_ipc=None), 80, RejectionRule.TOO_LARGE),
        (
            pod(container(limits={"nvidia.com/gpu-200gb": "1"}), host_ipc=None),
            None,
            RejectionRule.HOST_IPC_REQUIRED,
        ),
    ],
    ids=["malformed", "quantity", "several-in-pod", "too-large", "size-unknown-yet"],
)
def test_the_resource_rules_come_before_the_mps_client_rules(
    manifest: dict[str, Any], largest_gpu_gb: int | None, reason: str
) -> None:
    assert rejected(translate_pod(manifest, largest_gpu_gb, USER_1000)).reason == reason


def test_a_pod_without_slices_needs_nothing_of_an_mps_client() -> None:
    manifest = pod(container(limits={"nvidia.com/gpu": "1"}), host_ipc=None, user=0)

    assert translate_pod(manifest, 80, USER_1000) is None


def test_every_rule_is_covered_by_the_tables() -> None:
    rules = set(RejectionRule)
    assert {case[3] for case in REJECTIONS} | {case[3] for case in CLIENT_REJECTIONS} == rules
    assert len(rules) == 9


def test_the_reason_strings_are_the_documented_ones() -> None:
    assert (
        RejectionRule.MALFORMED_RESOURCE,
        RejectionRule.ZERO_SIZE,
        RejectionRule.TOO_LARGE,
        RejectionRule.SEVERAL_IN_CONTAINER,
        RejectionRule.SEVERAL_IN_POD,
        RejectionRule.QUANTITY_NOT_ONE,
        RejectionRule.WITH_WHOLE_GPU,
        RejectionRule.HOST_IPC_REQUIRED,
        RejectionRule.USER_MISMATCH,
    ) == (
        "MpsSliceResourceMalformed",
        "MpsSliceSizeZero",
        "MpsSliceLargerThanAnyGpu",
        "MpsSeveralSlicesInContainer",
        "MpsSeveralSlicesInPod",
        "MpsSliceQuantityNotOne",
        "MpsSliceWithWholeGpu",
        "MpsHostIpcRequired",
        "MpsUserMismatch",
    )


def test_the_size_limit_applies_only_once_the_largest_gpu_is_known() -> None:
    huge = pod(container(limits={"nvidia.com/gpu-500gb": "1"}))

    assert observed(translate_pod(huge, None)).size_gb == 500
    assert rejected(translate_pod(huge, 80)).reason == RejectionRule.TOO_LARGE


def test_a_slice_exactly_as_large_as_the_largest_gpu_is_accepted() -> None:
    assert observed(translate_pod(pod(container(limits={"nvidia.com/gpu-80gb": "1"})), 80)).size_gb == 80


def test_the_first_problem_in_container_order_names_the_reason() -> None:
    manifest = pod(
        container("a", limits={"nvidia.com/gpu-0gb": "1"}),
        container("b", limits={"nvidia.com/gpu-10gb": "3"}),
    )

    result = rejected(translate_pod(manifest, None))

    assert result.reason == RejectionRule.ZERO_SIZE
    assert "'a'" in result.message


# --- pods: what is accepted, and what is none of our business ----------------------------------


@pytest.mark.parametrize(
    "manifest",
    [
        pod(container()),
        pod(container(limits={"nvidia.com/gpu": "1"})),
        pod(container(limits={"cpu": "2", "memory": "1Gi"}, requests={"cpu": "1"})),
        pod(container(limits={"nvidia.com/mig-1g.5gb": "1"})),
        pod(container(limits={"nvidia.com/gpu": "1"}), container("b", limits={"nvidia.com/gpu": "2"})),
        {"metadata": {"name": "bare", "uid": "u"}, "spec": {"containers": [{"name": "c"}]}},
    ],
    ids=["no-resources", "whole-gpu", "cpu-and-memory", "mig-resource", "two-whole-gpus", "minimal-object"],
)
def test_a_pod_without_slices_is_none_of_our_business(manifest: dict[str, Any]) -> None:
    assert translate_pod(manifest, 80) is None


def test_a_valid_pod_becomes_pod_observed_with_every_field() -> None:
    manifest = pod(
        container("main", limits={"nvidia.com/gpu-10gb": "1", "cpu": "2"}),
        container("sidecar", limits={"cpu": "1"}),
        priority=1000,
        phase="Running",
        node="a100-1.example.com",
    )

    assert translate_pod(manifest, 80) == PodObserved(
        namespace="ml",
        name="train",
        uid="uid-train",
        resource_version="42",
        size_gb=10,
        priority=1000,
        created=datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
        phase="Running",
        node="a100-1.example.com",
    )


@pytest.mark.parametrize(
    "slice_container",
    [
        container(requests={"nvidia.com/gpu-20gb": "1"}),
        container(limits={"nvidia.com/gpu-20gb": "1"}),
        container(requests={"nvidia.com/gpu-20gb": "1"}, limits={"nvidia.com/gpu-20gb": "1"}),
    ],
    ids=["requests-only", "limits-only", "both"],
)
def test_a_slice_is_read_from_requests_or_limits(slice_container: dict[str, Any]) -> None:
    assert observed(translate_pod(pod(slice_container), None)).size_gb == 20


def test_a_slice_in_an_init_container_alone_is_read() -> None:
    manifest = pod(container("main"), init=[container("prepare", limits={"nvidia.com/gpu-5gb": "1"})])

    assert observed(translate_pod(manifest, None)).size_gb == 5


def test_a_pending_unbound_pod_has_defaults() -> None:
    manifest = pod(container(limits={"nvidia.com/gpu-1gb": "1"}), phase=None)
    del manifest["metadata"]["namespace"]

    result = observed(translate_pod(manifest, None))

    assert (result.namespace, result.phase, result.node, result.priority) == ("default", "Pending", None, 0)
    assert result.waits_for_slice


def test_a_gated_pod_is_observed_held_and_a_released_one_with_its_node() -> None:
    gated = pod(container(limits={"nvidia.com/gpu-10gb": "1"}))
    gated["spec"]["schedulingGates"] = [{"name": "other.example/gate"}, {"name": SLICE_GATE}]
    held = observed(translate_pod(gated, None))
    assert (held.gated, held.released_to, held.waits_for_slice) == (True, None, True)

    released = pod(container(limits={"nvidia.com/gpu-10gb": "1"}))
    released["spec"]["schedulingGates"] = [{"name": "other.example/gate"}]
    released["metadata"]["annotations"] = {RELEASED_TO_ANNOTATION: "a100-1"}
    free = observed(translate_pod(released, None))
    assert (free.gated, free.released_to, free.waits_for_slice, free.holder_node) == (
        False,
        "a100-1",
        False,
        "a100-1",
    )

    copied = pod(container(limits={"nvidia.com/gpu-10gb": "1"}))
    copied["spec"]["schedulingGates"] = [{"name": SLICE_GATE}]
    copied["metadata"]["annotations"] = {RELEASED_TO_ANNOTATION: "a100-1"}
    still_held = observed(translate_pod(copied, None))
    assert (still_held.gated, still_held.released_to, still_held.waits_for_slice) == (True, None, True)

    bound = pod(container(limits={"nvidia.com/gpu-10gb": "1"}), node="a100-2", phase="Running")
    bound["metadata"]["annotations"] = {RELEASED_TO_ANNOTATION: "a100-1"}
    assert observed(translate_pod(bound, None)).holder_node == "a100-2"


@pytest.mark.parametrize(
    "created",
    ["2026-11-22T10:00:00Z", "2026-11-22T10:00:00+00:00", datetime(2026, 11, 22, 10, 0)],
    ids=["zulu", "offset", "naive-datetime"],
)
def test_the_creation_time_is_read_as_utc(created: object) -> None:
    manifest = pod(container(limits={"nvidia.com/gpu-1gb": "1"}))
    manifest["metadata"]["creationTimestamp"] = created

    assert observed(translate_pod(manifest, None)).created == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


# --- nodes --------------------------------------------------------------------------------------

GFD = {
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
    "nvidia.com/gpu.count": "4",
    "nvidia.com/gpu.memory": "81920",
}


def node(labels: dict[str, str] | None, *, unschedulable: bool | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if unschedulable is not None:
        spec["unschedulable"] = unschedulable
    return {"metadata": {"name": "a100-1.example.com", "labels": labels}, "spec": spec}


@pytest.mark.parametrize("key", ["nos.nebuly.com/gpu-partitioning", "nos.nebuly.ai/gpu-partitioning"])
def test_a_node_opts_in_with_either_label(key: str) -> None:
    assert translate_node(node({key: "mps", **GFD})) == NodeObserved(
        name="a100-1.example.com",
        unschedulable=False,
        gfd=GfdFacts(product="NVIDIA-A100-SXM4-80GB", count=4, memory_mib=81920),
        labels={key: "mps", **GFD},
    )


@pytest.mark.parametrize(
    ("opt_in", "labels", "opted_in"),
    [
        (OptInLabel("example.com/mps", "yes"), {"example.com/mps": "yes"}, True),
        (OptInLabel("example.com/mps", "yes"), {"example.com/mps": "mps"}, False),
        (OptInLabel("example.com/mps", "yes"), {"nos.nebuly.com/gpu-partitioning": "mps"}, False),
        (OptInLabel("example.com/gpu-partitioning", "mps"), {"nos.nebuly.ai/gpu-partitioning": "mps"}, False),
        (OptInLabel("mps-node", "true"), {"mps-node": "true"}, True),
        (OptInLabel("nos.nebuly.com/partitioning", "on"), {"nos.nebuly.ai/partitioning": "on"}, True),
        (OptInLabel("nos.nebuly.com/partitioning", "on"), {"nos.nebuly.ai/gpu-partitioning": "on"}, False),
        (OptInLabel(value="shared"), {"nos.nebuly.ai/gpu-partitioning": "shared"}, True),
        (OptInLabel(value="shared"), {"nos.nebuly.ai/gpu-partitioning": "mps"}, False),
    ],
    ids=[
        "own-key",
        "own-key-other-value",
        "own-key-ignores-the-default",
        "no-alias-outside-the-nos-domain",
        "key-without-prefix",
        "nos-key-with-its-ai-twin",
        "the-twin-has-the-same-name",
        "default-key-with-own-value-through-the-twin",
        "the-twin-needs-the-configured-value",
    ],
)
def test_the_opt_in_label_is_configurable(opt_in: OptInLabel, labels: dict[str, str], opted_in: bool) -> None:
    assert (translate_node(node({**labels, **GFD}), opt_in) is not None) is opted_in


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("nos.nebuly.com/gpu-partitioning=mps", OptInLabel()),
        ("example.com/mps=yes", OptInLabel("example.com/mps", "yes")),
        ("mps=on", OptInLabel("mps", "on")),
        ("a.b-c/Mps_Node.1=Yes-1.0_x", OptInLabel("a.b-c/Mps_Node.1", "Yes-1.0_x")),
    ],
)
def test_an_opt_in_label_is_parsed_from_key_equals_value(text: str, parsed: OptInLabel) -> None:
    assert OptInLabel.parse(text) == parsed


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("nos.nebuly.com/gpu-partitioning", "'nos.nebuly.com/gpu-partitioning' is not KEY=VALUE"),
        ("=mps", "'' is not a label key"),
        ("Example.com/mps=yes", "'Example.com/mps' is not a label key"),
        ("a/b/c=yes", "'a/b/c' is not a label key"),
        ("/mps=yes", "'/mps' is not a label key"),
        (f"{'x' * 64}=yes", "is not a label key"),
        (f"{'p' * 254}/mps=yes", "is not a label key"),
        ("mps-=yes", "'mps-' is not a label key"),
        ("mps=", "'' is not a non-empty label value"),
        ("mps=a b", "'a b' is not a non-empty label value"),
        (f"mps={'y' * 64}", "is not a non-empty label value"),
    ],
    ids=[
        "no-equals",
        "empty-key",
        "upper-case-prefix",
        "two-slashes",
        "empty-prefix",
        "name-too-long",
        "prefix-too-long",
        "name-ends-in-dash",
        "empty-value",
        "space-in-value",
        "value-too-long",
    ],
)
def test_a_malformed_opt_in_label_is_refused_saying_why(text: str, quoted: str) -> None:
    with pytest.raises(ValueError) as caught:
        OptInLabel.parse(text)

    assert quoted in str(caught.value)


@pytest.mark.parametrize(
    "labels",
    [
        None,
        {},
        GFD,
        {"nos.nebuly.com/gpu-partitioning": "mig", **GFD},
        {"nos.nebuly.com/gpu-partitioning": "MPS", **GFD},
        {"nos.nebuly.com/gpu-partitioning": "", **GFD},
        {"nebuly.com/gpu-partitioning": "mps", **GFD},
    ],
    ids=["no-labels", "empty-labels", "gfd-only", "mig", "upper-case", "empty-value", "wrong-key"],
)
def test_a_node_that_does_not_opt_in_is_none(labels: dict[str, str] | None) -> None:
    assert translate_node(node(labels)) is None


def test_a_node_without_a_labels_key_is_none() -> None:
    assert translate_node({"metadata": {"name": "n"}}) is None


@pytest.mark.parametrize(
    ("absent", "named"),
    [
        (["nvidia.com/gpu.memory"], ["nvidia.com/gpu.memory"]),
        (["nvidia.com/gpu.product"], ["nvidia.com/gpu.product"]),
        (
            ["nvidia.com/gpu.count", "nvidia.com/gpu.memory"],
            ["nvidia.com/gpu.count", "nvidia.com/gpu.memory"],
        ),
        (list(GFD), list(GFD)),
    ],
    ids=["memory", "product", "count-and-memory", "all"],
)
def test_missing_gfd_labels_are_a_named_problem(absent: list[str], named: list[str]) -> None:
    labels = {"nos.nebuly.com/gpu-partitioning": "mps"} | {k: v for k, v in GFD.items() if k not in absent}

    result = translate_node(node(labels))

    assert result is not None
    assert result.gfd is None
    assert result.gfd_problem is not None
    assert "missing" in result.gfd_problem
    for key in named:
        assert key in result.gfd_problem
    for key in set(GFD) - set(absent):
        assert key not in result.gfd_problem


@pytest.mark.parametrize(
    ("count", "memory", "quoted"),
    [
        ("four", "81920", "'four'"),
        ("4", "80Gi", "'80Gi'"),
        ("4", "0", "'0'"),
        ("-1", "81920", "'-1'"),
        ("4", "", "''"),
    ],
    ids=["count-not-a-number", "memory-with-unit", "memory-zero", "count-negative", "memory-empty"],
)
def test_unreadable_gfd_labels_are_a_named_problem(count: str, memory: str, quoted: str) -> None:
    labels = {
        "nos.nebuly.ai/gpu-partitioning": "mps",
        **GFD,
        "nvidia.com/gpu.count": count,
        "nvidia.com/gpu.memory": memory,
    }

    result = translate_node(node(labels))

    assert result is not None
    assert result.gfd is None
    assert result.gfd_problem is not None
    assert "unreadable" in result.gfd_problem
    assert "nvidia.com/gpu.count" in result.gfd_problem
    assert "nvidia.com/gpu.memory" in result.gfd_problem
    assert quoted in result.gfd_problem


def test_gfd_memory_is_read_in_mib() -> None:
    labels = {"nos.nebuly.com/gpu-partitioning": "mps", **GFD, "nvidia.com/gpu.memory": "81559"}

    result = translate_node(node(labels))

    assert result is not None and result.gfd is not None
    assert result.gfd.memory_mib == 81559
    assert result.gfd_problem is None


@pytest.mark.parametrize(("flag", "expected"), [(True, True), (False, False), (None, False)])
def test_the_unschedulable_flag_is_read(flag: bool | None, expected: bool) -> None:
    result = translate_node(node({"nos.nebuly.com/gpu-partitioning": "mps", **GFD}, unschedulable=flag))

    assert result is not None
    assert result.unschedulable is expected


def test_a_nodes_allocatable_slices_are_read_by_size() -> None:
    manifest = node({"nos.nebuly.com/gpu-partitioning": "mps"})
    manifest["status"] = {
        "allocatable": {
            "cpu": "64",
            "nvidia.com/gpu-10gb": "2",
            "nvidia.com/gpu-5gb": "0",
            "nvidia.com/gpu": "1",
        }
    }
    observed_node = translate_node(manifest)
    assert observed_node is not None and observed_node.allocatable == {5: 0, 10: 2}


def test_a_pods_node_rules_and_a_nodes_labels_and_taints_are_read() -> None:
    manifest = pod(container(limits={"nvidia.com/gpu-10gb": "1"}))
    manifest["spec"]["nodeSelector"] = {"gpu": "a100"}
    manifest["spec"]["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["x"]}]},
                    {"matchExpressions": [{"key": "k", "operator": "Sometimes"}]},
                ]
            }
        }
    }
    manifest["spec"]["tolerations"] = [
        {"operator": "Exists"},
        {"key": "mps", "value": "yes", "effect": "NoSchedule"},
    ]
    rules = observed(translate_pod(manifest, None)).rules
    assert rules == NodeRules(
        node_selector={"gpu": "a100"},
        required_terms=(
            NodeSelectorTerm(expressions=(Requirement(key="zone", operator="In", values=("a", "b")),)),
            NodeSelectorTerm(fields=(Requirement(key="metadata.name", operator="NotIn", values=("x",)),)),
            NodeSelectorTerm(),  # an operator it cannot read: a term that holds for no node
        ),
        tolerations=(
            Toleration(operator="Exists"),
            Toleration(key="mps", value="yes", effect="NoSchedule"),
        ),
    )
    tainted = node({"nos.nebuly.com/gpu-partitioning": "mps", **GFD})
    tainted["spec"]["taints"] = [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]
    observed_node = translate_node(tainted)
    assert observed_node is not None and observed_node.taints == (
        Taint(key="dedicated", value="ml", effect="NoSchedule"),
    )


@pytest.mark.parametrize(("host_ipc", "shares"), [(True, True), (False, False), (None, False)])
def test_whether_a_pod_shares_the_host_ipc_namespace_is_observed(host_ipc: bool | None, shares: bool) -> None:
    manifest = pod(container(limits=TEN), host_ipc=host_ipc)
    assert observed(translate_pod(manifest, 80, MpsClientRules(ipc="shm-directory"))).host_ipc is shares
