"""The real API's pod rules that scheduling gates need: what a new pod gets, which new pods and spec
updates are refused, and how a refused binding is worded.

Where it sits: below `server`, which calls it on pod create, update, patch and binding; it imports
only `common`. It must never store anything or raise: it says what the real API's
PrepareForCreate, ValidatePodCreate, ValidatePodUpdate and binding storage would do or answer, and
`server` acts on it.

On create: `spec.schedulingGates` with `spec.nodeName` is 422, and a pod with gates gets the
condition PodScheduled=False, reason SchedulingGated (unless it already has a PodScheduled
condition). On update and patch of a pod (not of pods/status), the spec is immutable except:
containers' and initContainers' `image`, `activeDeadlineSeconds`, `terminationGracePeriodSeconds`
from a negative value to 1, `tolerations` (existing ones kept, only their tolerationSeconds may
change), `schedulingGates` (entries may only be removed), and, while the stored pod has gates,
`nodeSelector` (keys may only be added) and `affinity.nodeAffinity` (preferred terms freely; a
required node selector may be set when absent, and one that is present keeps its number of terms,
each of which may only gain requirements after those it has). Unset, null, [] and {} compare
equal, as in the real API's semantic equality.
Refusals are 422 Invalid with the real message `Pod "<name>" is invalid: <field>: <reason>` and
causes; values are shown as JSON (not Go syntax) and the spec diff after "pod updates may not change
fields other than ..." lists the changed paths (not Go's cmp.Diff). Binding a pod with gates is
409 `Operation cannot be fulfilled on pods/binding "<name>": pod <name> has non-empty
.spec.schedulingGates`. As in the real API, the SchedulingGated condition stays when the gates go,
until the scheduler writes PodScheduled.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Final

from simulation.apiserver.common import ApiError, FieldError, JsonObject, now

_UPDATABLE_POD_SPEC_FIELDS: Final = ",".join(
    (
        "`spec.containers[*].image`",
        "`spec.initContainers[*].image`",
        "`spec.activeDeadlineSeconds`",
        "`spec.tolerations` (only additions to existing tolerations)",
        "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
    )
)
_REQUIRED_NODE_SELECTOR: Final = "requiredDuringSchedulingIgnoredDuringExecution"
_NODE_SELECTOR_TERMS_PATH: Final = f"spec.affinity.nodeAffinity.{_REQUIRED_NODE_SELECTOR}.nodeSelectorTerms"
_SCHEDULING_GATED: Final = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "SchedulingGated",
    "message": "Scheduling is blocked due to non-empty scheduling gates",
}


def _normalized(value: Any) -> Any:
    """`value` without null, [] or {} members at any depth: the real API's semantic equality does not
    tell them from an unset field. List items keep their positions."""
    if isinstance(value, dict):
        kept = {key: _normalized(member) for key, member in value.items()}
        return {key: member for key, member in kept.items() if member not in (None, [], {})}
    if isinstance(value, list):
        return [_normalized(item) for item in value]
    return value


def _set_or_drop(target: JsonObject, key: str, value: Any) -> None:
    if value is None:
        target.pop(key, None)
    else:
        target[key] = copy.deepcopy(value)


def _differences(old: Any, new: Any, path: str) -> list[str]:
    """One line per changed leaf, `path: old -> new` (the real message shows Go's cmp.Diff instead)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for key in sorted(old.keys() | new.keys())
            for line in _differences(old.get(key), new.get(key), f"{path}.{key}")
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            line
            for i, pair in enumerate(zip(old, new, strict=True))
            for line in _differences(*pair, f"{path}[{i}]")
        ]
    return [] if old == new else [f"  {path}: {json.dumps(old)} -> {json.dumps(new)}"]


def _only_added_requirements(new_term: JsonObject, old_term: JsonObject) -> bool:
    """Whether a node selector term kept the old term's requirements first and in order (they AND)."""
    kinds = ("matchExpressions", "matchFields")
    if not any(old_term.get(kind) for kind in kinds):
        return not any(new_term.get(kind) for kind in kinds)
    return all(
        new_term.get(kind, [])[: len(old_term.get(kind, []))] == old_term.get(kind, []) for kind in kinds
    )


def _node_affinity_errors(new: JsonObject | None, old: JsonObject | None) -> list[FieldError]:
    """The real validateNodeAffinityMutation: a required node selector may be set when there is none;
    an existing one keeps its number of terms and each term may only gain requirements."""
    old_required = (old or {}).get(_REQUIRED_NODE_SELECTOR)
    if old_required is None:
        return []
    old_terms = old_required.get("nodeSelectorTerms", [])
    new_terms = (new or {}).get(_REQUIRED_NODE_SELECTOR, {}).get("nodeSelectorTerms", [])
    if old_terms and len(new_terms) != len(old_terms):
        detail = "no additions/deletions to non-empty NodeSelectorTerms list are allowed"
        return [FieldError(_NODE_SELECTOR_TERMS_PATH, "Invalid", detail, new_terms)]
    return [
        FieldError(
            f"{_NODE_SELECTOR_TERMS_PATH}[{index}]",
            "Invalid",
            "only additions are allowed (no mutations or deletions)",
            new_term,
        )
        for index, (new_term, old_term) in enumerate(zip(new_terms, old_terms, strict=False))
        if not _only_added_requirements(new_term, old_term)
    ]


def pod_spec_update_errors(old_spec: Any, new_spec: Any) -> list[FieldError]:
    """What the real ValidatePodUpdate says against changing a pod's spec from `old_spec` to
    `new_spec`, for the rules the module docstring lists; empty when the change is allowed."""
    old, new = _normalized(old_spec or {}), _normalized(new_spec or {})
    for containers in ("containers", "initContainers"):
        if len(new.get(containers, [])) != len(old.get(containers, [])):
            detail = "pod updates may not add or remove containers"
            return [FieldError(f"spec.{containers}", "Forbidden", detail)]
    errors: list[FieldError] = []
    new_tolerations = [{**t, "tolerationSeconds": None} for t in new.get("tolerations", [])]
    if any({**t, "tolerationSeconds": None} not in new_tolerations for t in old.get("tolerations", [])):
        detail = "existing toleration can not be modified except its tolerationSeconds"
        errors.append(FieldError("spec.tolerations", "Forbidden", detail))
    old_gates = {gate.get("name") for gate in old.get("schedulingGates", [])}
    added_gates = {gate.get("name"): i for i, gate in enumerate(new.get("schedulingGates", []))}
    for gate, index in added_gates.items():
        if gate not in old_gates:
            detail = f"only deletion is allowed, but found new scheduling gate '{gate}'"
            errors.append(FieldError(f"spec.schedulingGates[{index}].name", "Forbidden", detail))
    if new == old:
        return errors
    munged = copy.deepcopy(new)
    for containers in ("containers", "initContainers"):
        for container, was in zip(munged.get(containers, []), old.get(containers, []), strict=True):
            _set_or_drop(container, "image", was.get("image"))
    for field in ("activeDeadlineSeconds", "schedulingGates", "tolerations"):
        _set_or_drop(munged, field, old.get(field))
    grace = old.get("terminationGracePeriodSeconds")
    if isinstance(grace, int) and grace < 0 and munged.get("terminationGracePeriodSeconds") == 1:
        munged["terminationGracePeriodSeconds"] = grace
    if old.get("schedulingGates"):  # a gated pod may still narrow where it is to run
        new_selector, old_selector = munged.get("nodeSelector", {}), old.get("nodeSelector", {})
        if any(new_selector.get(key) != value for key, value in old_selector.items()):
            detail = "only additions to spec.nodeSelector are allowed (no mutations or deletions)"
            errors.append(FieldError("spec.nodeSelector", "Invalid", detail, new_selector))
        _set_or_drop(munged, "nodeSelector", old.get("nodeSelector"))
        old_affinity = old.get("affinity", {}).get("nodeAffinity")
        errors += _node_affinity_errors(munged.get("affinity", {}).get("nodeAffinity"), old_affinity)
        _set_or_drop(munged.setdefault("affinity", {}), "nodeAffinity", old_affinity)
    munged = _normalized(munged)
    if munged != old:
        changes = "\n".join(_differences(old, munged, "spec"))
        detail = f"pod updates may not change fields other than {_UPDATABLE_POD_SPEC_FIELDS}\n{changes}"
        errors.append(FieldError("spec", "Forbidden", detail))
    return errors


def pod_create_errors(pod: JsonObject) -> list[FieldError]:
    """What the real ValidatePodCreate says against a new pod, for the rule the module docstring lists."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName") and spec.get("schedulingGates"):
        detail = "cannot be set until all schedulingGates have been cleared"
        return [FieldError("spec.nodeName", "Forbidden", detail)]
    return []


def prepare_new_pod(pod: JsonObject) -> None:
    """What the real API's PrepareForCreate does to a new pod, as far as the emulator goes: a
    `Pending` phase when it has no status, and the SchedulingGated condition when it has gates."""
    if not pod.get("status"):
        pod["status"] = {"phase": "Pending"}
    conditions = pod["status"].get("conditions") or []
    gated = bool((pod.get("spec") or {}).get("schedulingGates"))
    if gated and not any(condition.get("type") == "PodScheduled" for condition in conditions):
        gated_since = {"lastProbeTime": None, "lastTransitionTime": now()}
        pod["status"]["conditions"] = [*conditions, _SCHEDULING_GATED | gated_since]


def binding_conflict(pod_name: str, why: str) -> ApiError:
    """The real API's 409 for a binding its storage refuses."""
    message = f'Operation cannot be fulfilled on pods/binding "{pod_name}": {why}'
    return ApiError(409, message, details={"name": pod_name, "kind": "pods/binding"})
