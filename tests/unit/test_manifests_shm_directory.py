"""The shm-directory IPC mode: the kustomize component k8s/components/shm-directory, which an overlay
adds, switches the pod watcher, the node agents and the MPS daemon keepers together and changes
nothing else.

The component is built with `kubectl kustomize` (skipped where kubectl is not installed) on the base,
as an overlay lists it.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from node_agent.slices import mps_shm_directory
from services.cli import build_parser
from tests.unit.test_manifests import BASE, OVERLAYS, base_with, documents, needs_kubectl
from tests.unit.test_manifests_schema import VERSIONS, object_id

SWITCHED = {"mpsflow-pod-watcher", "mpsflow-node-agent", "mpsflow-mps-daemons"}
PROPAGATION = {"mpsflow-mps-daemons": "Bidirectional", "mpsflow-node-agent": "HostToContainer"}


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = workload["spec"]["template"]["spec"]["containers"][0]
    return container


def _mps_ipc(workload: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    """The IPC mode the workload's command runs in, with the environment its container gets."""
    container = _container(workload)
    monkeypatch.delenv("MPSFLOW_MPS_IPC", raising=False)
    for variable in container.get("env", []):
        if variable["name"] == "MPSFLOW_MPS_IPC":
            monkeypatch.setenv("MPSFLOW_MPS_IPC", variable["value"])
    args = [a.replace("$(NODE_NAME)", "gpu-1") for a in container["args"]]
    mode: str = build_parser().parse_args(args).mps_ipc
    return mode


@pytest.fixture(scope="module")
def switched() -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` builds from the base with the component."""
    return base_with("shm-directory")


def test_host_mode_stays_the_default_in_the_base_and_the_overlays(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "components" not in yaml.safe_load((BASE / "kustomization.yaml").read_text())
    for overlay in OVERLAYS.iterdir():
        components = yaml.safe_load((overlay / "kustomization.yaml").read_text()).get("components", [])
        assert not [c for c in components if c.endswith("/shm-directory")], overlay.name
    workloads = {d["metadata"]["name"]: d for d in documents() if d["kind"] in ("Deployment", "DaemonSet")}
    for name in SWITCHED:
        assert _mps_ipc(workloads[name], monkeypatch) == "host", name
    for name in PROPAGATION:
        assert workloads[name]["spec"]["template"]["spec"]["hostIPC"] is True, name


@needs_kubectl
@pytest.mark.parametrize("version", VERSIONS)
def test_every_switched_object_is_valid_against_the_kubernetes_schema(
    switched: list[dict[str, Any]], version: str
) -> None:
    for document in switched:
        kubernetes_validate.validate(document, version, strict=True)


@needs_kubectl
def test_every_service_that_cares_is_switched_and_none_keeps_host_ipc(
    switched: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    workloads = {d["metadata"]["name"]: d for d in switched if d["kind"] in ("Deployment", "DaemonSet")}

    for name in SWITCHED:
        assert _mps_ipc(workloads[name], monkeypatch) == "shm-directory", name
    for name, workload in workloads.items():
        assert not workload["spec"]["template"]["spec"].get("hostIPC"), name


@needs_kubectl
def test_the_keeper_mounts_reach_the_host_and_the_agent_sees_them(switched: list[dict[str, Any]]) -> None:
    workloads = {d["metadata"]["name"]: d for d in switched if d["kind"] == "DaemonSet"}

    for name, propagation in PROPAGATION.items():
        spec = workloads[name]["spec"]["template"]["spec"]
        [mps] = [m for m in _container(workloads[name])["volumeMounts"] if m["name"] == "mps"]
        [volume] = [v for v in spec["volumes"] if v["name"] == "mps"]
        assert mps["mountPropagation"] == propagation, name
        # Bidirectional propagation is allowed to privileged containers only.
        assert _container(workloads[name])["securityContext"]["privileged"] is True, name
        # Each GPU's shm directory (which Allocate names as a host path) is under the host directory
        # both mount, at the same path inside as outside.
        args = [a.replace("$(NODE_NAME)", "gpu-1") for a in _container(workloads[name])["args"]]
        mps_root = build_parser().parse_args(args).mps_root
        assert mps["mountPath"] == volume["hostPath"]["path"] == str(mps_root), name
        assert mps_shm_directory(mps_root, "GPU-uuid").is_relative_to(mps["mountPath"]), name


def _without_the_switch(document: dict[str, Any]) -> dict[str, Any]:
    """The object with what the component changes taken back out (mount order aside)."""
    undone = copy.deepcopy(document)
    if document["metadata"]["name"] not in SWITCHED or document["kind"] not in ("Deployment", "DaemonSet"):
        return undone
    spec = undone["spec"]["template"]["spec"]
    container = spec["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "MPSFLOW_MPS_IPC"]
    if "hostIPC" in spec:
        spec["hostIPC"] = True
    for mount in container.get("volumeMounts", []):
        mount.pop("mountPropagation", None)
    container.get("volumeMounts", []).sort(key=lambda m: m["mountPath"])
    return undone


@needs_kubectl
def test_the_component_changes_nothing_else(switched: list[dict[str, Any]]) -> None:
    base = sorted((_without_the_switch(d) for d in documents()), key=object_id)

    assert sorted((_without_the_switch(d) for d in switched), key=object_id) == base
