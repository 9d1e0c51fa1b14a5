"""The manifests of k8s/base hang together, start the commands that exist and grant least privilege.

Their schema is checked in test_manifests_schema.py, the overlays built on them in test_overlays.py;
that each service uses only what its RBAC grants is audited in tests/e2e/test_rbac.py. The base's
objects are read from its files (no kubectl needed); `kustomize` and `base_with` build with
`kubectl kustomize`, as a user does, for the tests that need it (skipped where kubectl is missing).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import build_parser
from services.kit.listen import ListenAddress

K8S = Path(__file__).resolve().parents[2] / "k8s"
BASE = K8S / "base"
COMPONENTS = K8S / "components"
OVERLAYS = K8S / "overlays"
CONTROL_PLANE_NAMESPACE = "mpsflow"
NODE_NAMESPACE = "mpsflow-node"
NODE_WORKLOADS = ("mpsflow-node-agent", "mpsflow-mps-daemons")
STATUS_PORT: dict[str, Any] = {"name": "status", "containerPort": 8080}
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def documents() -> list[dict[str, Any]]:
    """The objects of k8s/base, read from the files its kustomization lists."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    loaded: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        loaded.extend(d for d in yaml.safe_load_all((BASE / resource).read_text()) if d)
    return loaded


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIRECTORY` builds."""
    built = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [d for d in yaml.safe_load_all(built) if d]


def base_with(*components: str) -> list[dict[str, Any]]:
    """The objects of an overlay that adds these components of k8s/components to the base, as a user
    writes one (`resources: [../../base]`, `components: [../../components/NAME]`), built from a copy."""
    copied = Path(tempfile.mkdtemp(prefix="mpsflow-k8s-")) / "k8s"
    try:
        shutil.copytree(K8S, copied)
        overlay = copied / "overlays" / "under-test"
        overlay.mkdir()
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": ["../../base"],
            "components": [f"../../components/{name}" for name in components],
        }
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return kustomize(overlay)
    finally:
        shutil.rmtree(copied.parent, ignore_errors=True)


def workloads() -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def test_every_manifest_file_is_listed_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert not list(K8S.glob("*.yaml")), "k8s/ holds base/, components/ and overlays/ only"


def test_the_node_services_live_apart_in_the_privileged_namespace() -> None:
    """The node agent and the keeper need root, host paths, hostPID and hostIPC; the control plane
    needs none of it, so its namespace enforces Pod Security "restricted" and theirs "privileged"."""
    namespaces = {d["metadata"]["name"]: d for d in documents() if d["kind"] == "Namespace"}
    assert set(namespaces) == {CONTROL_PLANE_NAMESPACE, NODE_NAMESPACE}
    enforced = {
        name: namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for name, namespace in namespaces.items()
    }
    assert enforced == {CONTROL_PLANE_NAMESPACE: "restricted", NODE_NAMESPACE: "privileged"}
    for document in documents():
        namespace = document["metadata"].get("namespace")
        if document["kind"] == "Namespace" or namespace is None:
            continue
        node_side = document["metadata"]["name"].startswith(NODE_WORKLOADS)
        assert namespace == (NODE_NAMESPACE if node_side else CONTROL_PLANE_NAMESPACE), document["metadata"]


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


def service_containers() -> dict[str, dict[str, Any]]:
    """The container of each `mpsflow run` service, by workload name."""
    return {
        w["metadata"]["name"]: w["spec"]["template"]["spec"]["containers"][0]
        for w in workloads()
        if w["spec"]["template"]["spec"]["containers"][0].get("args", [""])[0] == "run"
    }


def test_every_service_serves_its_status_on_the_port_its_probes_and_service_name() -> None:
    """`mpsflow run` serves /healthz, /readyz and /metrics on --status-address, 0.0.0.0:8080 unless
    told otherwise; each container declares that port as `status`, is probed there, and a headless
    Service in its namespace exposes it for Prometheus."""
    containers = service_containers()
    assert set(containers) == {
        "mpsflow-pod-watcher",
        "mpsflow-admission-webhook",
        "mpsflow-planner",
        "mpsflow-config-publisher",
        *NODE_WORKLOADS,
    }
    services = [d for d in documents() if d["kind"] == "Service"]
    for name, container in containers.items():
        args = [a.replace("$(NODE_NAME)", "gpu-1") for a in container["args"]]
        assert build_parser().parse_args(args).status_address == ListenAddress(
            "0.0.0.0", STATUS_PORT["containerPort"]
        )
        assert STATUS_PORT in container["ports"], name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "status"}, name
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "status"}, name
        assert not {"--ready-file", "--alive-file"} & set(args), name  # the probes ask over HTTP
        [workload] = [w for w in workloads() if w["metadata"]["name"] == name]
        [status] = [
            s
            for s in services
            if s["metadata"]["namespace"] == workload["metadata"]["namespace"]
            and s["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
            and any(port["name"] == "status" for port in s["spec"]["ports"])
        ]
        assert status["metadata"]["name"] == f"{name}-status"
        assert status["spec"]["clusterIP"] == "None"  # each replica scraped on its own
        assert status["spec"]["ports"] == [{"name": "status", "port": 8080, "targetPort": "status"}]


def test_the_node_services_are_unhealthy_after_the_minute_their_loops_may_stall() -> None:
    """The agent's heartbeat and the keeper's daemon checks must beat within 60 s for /healthz to
    answer 200; the probe gives a restarted container 30 s and restarts it after three failures."""
    containers = service_containers()
    for name in NODE_WORKLOADS:
        probe = containers[name]["livenessProbe"]
        assert probe["initialDelaySeconds"] >= 30, name
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 60, name


def test_the_control_plane_services_run_two_replicas_one_active_by_a_lease() -> None:
    by_name = {w["metadata"]["name"]: w for w in workloads()}
    for service in ("planner", "pod-watcher", "config-publisher"):
        deployment = by_name[f"mpsflow-{service}"]
        assert deployment["spec"]["replicas"] == 2, service
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["run", service], service
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, service
        # A standby answers /readyz with 200 too: a rolling update must not wait for the lease.
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", service
