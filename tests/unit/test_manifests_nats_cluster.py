"""The three-server NATS cluster component, k8s/components/nats-cluster: built with `kubectl kustomize`
on the base as an overlay lists it (skipped where kubectl is not installed), and checked against what
the servers and the bootstrap need. The production overlay has it (test_overlays.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from events.credentials import Authority
from services.cli import build_parser
from simulation.nats_server import nats_server_binary
from tests.unit.test_manifests import base_with, needs_kubectl


@pytest.fixture(scope="module")
def built() -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in base_with("nats-cluster")}


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
