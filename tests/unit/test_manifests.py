"""The manifests in k8s/ hang together and start the commands that exist."""

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


def test_only_the_pod_watcher_may_read_the_kubernetes_api() -> None:
    bound = {d["subjects"][0]["name"] for d in documents() if d["kind"].endswith("RoleBinding")}
    assert bound == {"mpsflow-pod-watcher"}
    for document in documents():
        if document["kind"] == "ServiceAccount" and document["metadata"]["name"] not in bound:
            assert document.get("automountServiceAccountToken") is False, document["metadata"]["name"]


def test_the_node_agent_only_runs_on_opted_in_nodes() -> None:
    agent = next(w for w in workloads() if w["metadata"]["name"] == "mpsflow-node-agent")
    spec = agent["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nos.nebuly.com/gpu-partitioning": "mps"}
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {"/var/lib/kubelet/device-plugins", "/var/lib/kubelet/pod-resources", "/tmp/nvidia-mps"} <= mounts
