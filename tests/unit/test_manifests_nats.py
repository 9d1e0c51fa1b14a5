"""NATS in k8s/ runs with authentication, and each workload that connects gets its own identity only.

The server's config includes the trust that `mpsflow credentials` writes (no user in it); the bootstrap
Job holds the admin's credentials; each service mounts the Secret of its own identity and no other; a
node agent reads its node's credentials from the node; the workloads that never connect (the admission
webhook, the MPS daemon keeper) get none. docs/security.md says why.
"""

from __future__ import annotations

from typing import Any

import pytest

from events import access
from tests.unit.test_manifests import documents

CREDENTIALS_VARIABLE = "MPSFLOW_NATS_CREDS"
SECRET_OF = {
    "mpsflow-pod-watcher": f"mpsflow-nats-{access.POD_WATCHER}",
    "mpsflow-planner": f"mpsflow-nats-{access.PLANNER}",
    "mpsflow-config-publisher": f"mpsflow-nats-{access.CONFIG_PUBLISHER}",
    "mpsflow-bootstrap": f"mpsflow-nats-{access.ADMIN}",
}


def pod_templates() -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in documents()
        if "template" in d.get("spec", {})
    }


def credentials_volume(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The volume the container's credentials file is on, if it is given one."""
    [container] = spec["containers"]
    path = next((e["value"] for e in container.get("env", []) if e["name"] == CREDENTIALS_VARIABLE), None)
    if path is None:
        return None
    [mount] = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount.get("readOnly") is True
    volumes: list[dict[str, Any]] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    [volume] = volumes
    return volume


def test_the_nats_server_trusts_the_issued_operator_and_no_one_else() -> None:
    [config] = [d for d in documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nats-config"]
    assert "include ./trust/nats-auth.conf" in config["data"]["nats.conf"]
    spec = pod_templates()["nats"]
    assert spec["containers"][0]["args"] == ["-c", "/etc/nats/nats.conf"]
    assert {"name": "trust", "configMap": {"name": "mpsflow-nats-trust"}} in spec["volumes"]


@pytest.mark.parametrize("workload", sorted(SECRET_OF))
def test_each_service_and_the_bootstrap_mount_the_secret_of_their_own_identity(workload: str) -> None:
    volume = credentials_volume(pod_templates()[workload])
    assert volume == {"name": "nats-credentials", "secret": {"secretName": SECRET_OF[workload]}}


def test_a_node_agent_reads_its_own_nodes_credentials_from_the_node() -> None:
    volume = credentials_volume(pod_templates()["mpsflow-node-agent"])
    assert volume is not None
    assert volume["hostPath"] == {"path": "/etc/mpsflow/nats", "type": "Directory"}


@pytest.mark.parametrize("workload", ["mpsflow-admission-webhook", "mpsflow-mps-daemons"])
def test_the_workloads_that_never_connect_to_nats_get_no_credentials(workload: str) -> None:
    assert credentials_volume(pod_templates()[workload]) is None
