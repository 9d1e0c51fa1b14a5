"""The three-server NATS cluster component in k8s/: built with `kubectl kustomize` as a user enables it
(skipped where kubectl is not installed), and checked against what the servers and the bootstrap need."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from events.credentials import Authority
from services.cli import build_parser
from simulation.nats_server import nats_server_binary
from tests.unit.test_manifests import K8S

COMMENTED = "#   - nats-cluster\n"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@pytest.fixture(scope="module")
def built() -> Iterator[dict[tuple[str, str], dict[str, Any]]]:
    copied = Path(tempfile.mkdtemp(prefix="mpsflow-k8s-")) / "k8s"
    try:
        shutil.copytree(K8S, copied)
        kustomization = copied / "kustomization.yaml"
        text = kustomization.read_text()
        assert COMMENTED in text
        kustomization.write_text(
            text.replace("# components:\n", "components:\n").replace(COMMENTED, "  - nats-cluster\n")
        )
        # Only this component: the others need namespaces or switch modes this test is not about.
        text = kustomization.read_text()
        kustomization.write_text(text.replace("#   - shm-directory\n", "").replace("#   - nos-compat\n", ""))
        output = subprocess.run(
            ["kubectl", "kustomize", str(copied)], capture_output=True, text=True, check=True
        ).stdout
        yield {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(output) if o}
    finally:
        shutil.rmtree(copied.parent, ignore_errors=True)


@needs_kubectl
def test_three_servers_route_to_each_other_through_a_headless_service(
    built: dict[tuple[str, str], dict[str, Any]],
) -> None:
    servers = built[("StatefulSet", "nats")]
    assert servers["spec"]["replicas"] == 3
    [container] = servers["spec"]["template"]["spec"]["containers"]
    assert {"name": "cluster", "containerPort": 6222} in container["ports"]
    assert container["env"][0]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    routes = built[("Service", "nats-routes")]["spec"]
    assert routes["clusterIP"] == "None" and routes["selector"] == servers["spec"]["selector"]["matchLabels"]
    config = built[("ConfigMap", "nats-config")]["data"]["nats.conf"]
    assert "server_name: $POD_NAME" in config
    for n in range(3):
        assert f"nats-route://nats-{n}.nats-routes.mpsflow.svc:6222" in config
    assert "include ./trust/nats-auth.conf" in config  # authentication stays on


@needs_kubectl
def test_the_bootstrap_keeps_every_stream_on_all_three(built: dict[tuple[str, str], dict[str, Any]]) -> None:
    job = built[("Job", "mpsflow-bootstrap")]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert build_parser().parse_args(args).replicas == 3


@needs_kubectl
def test_the_cluster_configuration_is_one_nats_server_accepts(
    built: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    """`nats-server -t` checks the configuration as each server of the StatefulSet reads it: its
    name from the environment, the trust file mpsflow credentials writes beside it."""
    config = tmp_path / "nats.conf"
    config.write_text(
        built[("ConfigMap", "nats-config")]["data"]["nats.conf"].replace("/data", str(tmp_path))
    )
    (tmp_path / "trust").mkdir()
    authority = Authority.load_or_create(tmp_path / "keys")
    (tmp_path / "trust" / "nats-auth.conf").write_text(authority.server_config())
    checked = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "POD_NAME": "nats-1"},
        cwd=tmp_path,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
