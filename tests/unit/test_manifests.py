"""The manifests in k8s/ hang together, start the commands that exist and grant least privilege.

Their schema is checked in test_manifests_schema.py; that each service uses only what its RBAC
grants is audited in tests/e2e/test_rbac.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import build_parser

K8S = Path(__file__).resolve().parents[2] / "k8s"


def documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    loaded: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        loaded.extend(d for d in yaml.safe_load_all((K8S / resource).read_text()) if d)
    return loaded


def workloads() -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def test_every_manifest_file_is_listed_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_every_object_has_kind_api_version_and_name() -> None:
    for document in documents():
        assert document["apiVersion"] and document["kind"] and document["metadata"]["name"], document


@pytest.mark.parametrize(
    "workload",
    [w for w in workloads() if "mpsflow" in w["metadata"]["name"]],
    ids=lambda w: w["metadata"]["name"],
)
def test_each_service_runs_a_real_command_under_its_own_service_account(workload: dict[str, Any]) -> None:
    accounts = {d["metadata"]["name"] for d in documents() if d["kind"] == "ServiceAccount"}
    spec = workload["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == workload["metadata"]["name"]
    assert spec["serviceAccountName"] in accounts
    selector = workload["spec"]["selector"]["matchLabels"]
    assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    args = [a.replace("$(NODE_NAME)", "gpu-1") for a in spec["containers"][0]["args"]]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "run"


def test_only_the_services_that_use_the_kubernetes_api_get_a_token_and_roles() -> None:
    bound = {s["name"] for d in documents() if d["kind"].endswith("RoleBinding") for s in d["subjects"]}
    assert bound == {"mpsflow-pod-watcher", "mpsflow-config-publisher"}
    for document in documents():
        if document["kind"] == "ServiceAccount":
            name = document["metadata"]["name"]
            assert document.get("automountServiceAccountToken", True) is (name in bound), name


def test_every_binding_binds_an_existing_role_to_existing_service_accounts() -> None:
    accounts = {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for d in documents()
        if d["kind"] == "ServiceAccount"
    }
    roles = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        for d in documents()
        if d["kind"] in ("Role", "ClusterRole")
    }
    bindings = [d for d in documents() if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert bindings
    for binding in bindings:
        namespace = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io", binding["metadata"]["name"]
        if binding["kind"] == "ClusterRoleBinding":
            assert ref["kind"] == "ClusterRole", binding["metadata"]["name"]
        role_namespace = namespace if ref["kind"] == "Role" else None
        assert (ref["kind"], role_namespace, ref["name"]) in roles, binding["metadata"]["name"]
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount", binding["metadata"]["name"]
            assert (subject.get("namespace", namespace), subject["name"]) in accounts, subject


def rbac_rules() -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], rule)
        for d in documents()
        if d["kind"] in ("Role", "ClusterRole")
        for rule in d["rules"]
    ]


def test_no_rule_grants_by_wildcard() -> None:
    for role, rule in rbac_rules():
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), (role, field)


def test_resource_names_restrict_only_verbs_whose_request_names_an_object() -> None:
    """create, list, watch and deletecollection name no object: resourceNames would refuse them."""
    for role, rule in rbac_rules():
        if rule.get("resourceNames"):
            assert not {"create", "list", "watch", "deletecollection"} & set(rule["verbs"]), role


def test_the_node_agent_only_runs_on_opted_in_nodes() -> None:
    agent = next(w for w in workloads() if w["metadata"]["name"] == "mpsflow-node-agent")
    spec = agent["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nos.nebuly.com/gpu-partitioning": "mps"}
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {"/run/mpsflow/link", "/var/lib/kubelet/pod-resources", "/run/mpsflow/mps"} <= mounts


def test_the_keeper_serves_the_slices_to_the_kubelet_and_shares_the_link_with_the_agent() -> None:
    by_name = {w["metadata"]["name"]: w for w in workloads()}
    keeper, agent = by_name["mpsflow-mps-daemons"], by_name["mpsflow-node-agent"]
    keeper_mounts = {
        m["mountPath"] for m in keeper["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    agent_mounts = {
        m["mountPath"] for m in agent["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert {"/var/lib/kubelet/device-plugins", "/run/mpsflow/link", "/run/mpsflow/mps"} <= keeper_mounts
    assert "/var/lib/kubelet/device-plugins" not in agent_mounts  # it serves nothing to the kubelet itself


def test_the_node_agent_gets_the_driver_lands_on_tainted_gpu_pools_and_is_bounded() -> None:
    agent = next(w for w in workloads() if w["metadata"]["name"] == "mpsflow-node-agent")
    spec = agent["spec"]["template"]["spec"]
    [container] = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert spec["runtimeClassName"] == "nvidia"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert set(env["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"compute", "utility"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}
    assert "memory" in container["resources"]["limits"]


def test_the_mps_daemons_outlive_the_agent_on_the_same_nodes_and_pipes() -> None:
    by_name = {w["metadata"]["name"]: w for w in workloads()}
    keeper, agent = by_name["mpsflow-mps-daemons"], by_name["mpsflow-node-agent"]
    assert keeper["spec"]["updateStrategy"] == {"type": "OnDelete"}
    keeper_spec, agent_spec = keeper["spec"]["template"]["spec"], agent["spec"]["template"]["spec"]
    for field in ("nodeSelector", "tolerations", "runtimeClassName"):
        assert keeper_spec[field] == agent_spec[field], field
    [keeper_container], [agent_container] = keeper_spec["containers"], agent_spec["containers"]
    assert keeper_container["args"][:2] == ["run", "mps-daemons"]
    assert "--mps-daemons" not in agent_container["args"]  # external, the default: the agent starts none

    def pipes(spec: dict[str, Any], container: dict[str, Any]) -> set[tuple[str, str]]:
        """The writable MPS mounts (the read-only ones are other daemons' pipes, only probed)."""
        host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        return {
            (host[m["name"]], m["mountPath"])
            for m in container["volumeMounts"]
            if "mps" in m["mountPath"] and not m.get("readOnly")
        }

    assert (
        pipes(keeper_spec, keeper_container)
        == pipes(agent_spec, agent_container)
        == {("/run/mpsflow/mps", "/run/mpsflow/mps"), ("/run/mpsflow/link", "/run/mpsflow/link")}
    )


def test_the_node_services_are_probed_on_the_file_they_touch() -> None:
    by_name = {w["metadata"]["name"]: w for w in workloads()}
    for name in ("mpsflow-node-agent", "mpsflow-mps-daemons"):
        [container] = by_name[name]["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        alive = args[args.index("--alive-file") + 1]
        command = container["livenessProbe"]["exec"]["command"]
        assert command[0] == "python" and command[-1] == alive, name
        assert "getmtime" in command[2], name


def test_the_control_plane_services_run_two_replicas_one_active_by_a_lease() -> None:
    by_name = {w["metadata"]["name"]: w for w in workloads()}
    for service in ("planner", "pod-watcher", "config-publisher"):
        deployment = by_name[f"mpsflow-{service}"]
        assert deployment["spec"]["replicas"] == 2, service
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"][:4] == ["run", service, "--ready-file", "/tmp/mpsflow-ready"], service
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, service
        assert container["readinessProbe"]["exec"]["command"] == ["test", "-s", "/tmp/mpsflow-ready"]
