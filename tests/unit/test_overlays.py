"""The two overlays of k8s/, built with `kubectl kustomize` as `kubectl apply -k` builds them, checked
offline for what each promises.

k8s/overlays/demo: one NATS server, one replica of each service, small requests, nothing that needs a
CRD beyond cert-manager's, no NetworkPolicy. k8s/overlays/production: three NATS servers with every
stream on all three, two replicas of each leased service, requests and limits on every container,
Pod Security "restricted" wherever it can hold (checked here rule by rule), NetworkPolicies that let
only mpsflow's NATS clients reach NATS, PodDisruptionBudgets that keep a replica of each service and
a JetStream quorum, and a ServiceMonitor per service on its status port.

Every object is validated against the Kubernetes schema (kubernetes-validate, offline); the kinds the
schema lacks (cert-manager's, the Prometheus operator's) are checked structurally. The builds need
kubectl and are skipped without it, as the other manifest tests are; the first test needs nothing and
checks that every path the kustomizations name exists.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from events.credentials import Authority
from services.cli import build_parser
from simulation.nats_server import nats_server_binary
from tests.unit.test_manifests import (
    BASE,
    COMPONENTS,
    CONTROL_PLANE_NAMESPACE,
    K8S,
    NODE_NAMESPACE,
    NODE_WORKLOADS,
    OVERLAYS,
    kustomize,
    needs_kubectl,
)
from tests.unit.test_manifests_schema import VERSIONS, object_id

Json = dict[str, Any]
OVERLAY_NAMES = ("demo", "production")
LEASED = ("mpsflow-pod-watcher", "mpsflow-planner", "mpsflow-config-publisher")
REPLICATED = (*LEASED, "mpsflow-admission-webhook")
SERVICES = (*REPLICATED, *NODE_WORKLOADS)
NATS_CLIENTS = {
    (CONTROL_PLANE_NAMESPACE, "mpsflow-pod-watcher"),
    (CONTROL_PLANE_NAMESPACE, "mpsflow-planner"),
    (CONTROL_PLANE_NAMESPACE, "mpsflow-config-publisher"),
    (CONTROL_PLANE_NAMESPACE, "mpsflow-bootstrap"),
    (NODE_NAMESPACE, "mpsflow-node-agent"),
}
NAME = "app.kubernetes.io/name"
NAMESPACE_NAME = "kubernetes.io/metadata.name"  # every namespace carries it, set by the API server
PROMETHEUS = (("monitoring", {NAME: "prometheus"}),)  # the operator's label on its Prometheus pods
STRANGERS = (
    ("default", {NAME: "curious"}),
    ("default", {NAME: "mpsflow-planner"}),  # an impostor: the right labels in another namespace
    (CONTROL_PLANE_NAMESPACE, {NAME: "debug"}),
    (NODE_NAMESPACE, {NAME: "debug"}),
)
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
}


# --- building -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> dict[str, list[Json]]:
    return {name: kustomize(OVERLAYS / name) for name in OVERLAY_NAMES}


@pytest.fixture(scope="module")
def demo(built: dict[str, list[Json]]) -> list[Json]:
    return built["demo"]


@pytest.fixture(scope="module")
def production(built: dict[str, list[Json]]) -> list[Json]:
    return built["production"]


def of_kind(objects: list[Json], kind: str) -> list[Json]:
    return [o for o in objects if o["kind"] == kind]


def by_name(objects: list[Json], kind: str) -> dict[str, Json]:
    return {o["metadata"]["name"]: o for o in of_kind(objects, kind)}


def pod_templates(objects: list[Json]) -> Iterator[tuple[Json, Json]]:
    """Each object that makes pods, with its pod template."""
    for o in objects:
        template = o.get("spec", {}).get("template")
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job") and template:
            yield o, template


def containers(pod_spec: Json) -> list[Json]:
    every: list[Json] = [
        *pod_spec.get("initContainers", []),
        *pod_spec["containers"],
        *pod_spec.get("ephemeralContainers", []),
    ]
    return every


def args_of(container: Json) -> list[str]:
    return [a.replace("$(NODE_NAME)", "gpu-1") for a in container.get("args", [])]


# --- label selectors and Pod Security "restricted" -------------------------------------------------


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A Kubernetes LabelSelector: matchLabels and matchExpressions, ANDed; empty selects everything."""
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod_spec: Json) -> list[str]:
    """What Pod Security Admission's "restricted" profile (latest) refuses in a pod, one line a rule
    broken: every baseline rule, then the restricted ones. Empty when the pod is admitted."""
    found: list[str] = []
    pod = pod_spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            found.append(f"{field}: true")
    for volume in pod_spec.get("volumes", []):
        found += [f"volume {volume['name']}: {kind}" for kind in set(volume) - {"name"} - RESTRICTED_VOLUMES]
    found += [f"sysctl {s['name']}" for s in pod.get("sysctls", []) if s["name"] not in SAFE_SYSCTLS]
    if pod.get("runAsUser") == 0:
        found.append("pod runAsUser: 0")
    for context, where in [
        (pod, "pod"),
        *((c.get("securityContext", {}), c["name"]) for c in containers(pod_spec)),
    ]:
        selinux = context.get("seLinuxOptions", {})
        if selinux.get("type") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"{where}: seLinuxOptions")
        if context.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in (
            "RuntimeDefault",
            "Localhost",
        ):
            found.append(f"{where}: appArmorProfile")
        if context.get("windowsOptions", {}).get("hostProcess"):
            found.append(f"{where}: hostProcess")
    for container in containers(pod_spec):
        name, context = container["name"], container.get("securityContext", {})
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities add more than NET_BIND_SERVICE")
        if context.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser: 0")
        seccomp = context.get("seccompProfile") or pod.get("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
    return found


# --- NetworkPolicy ---------------------------------------------------------------------------------


def admits(
    policies: list[Json], target: tuple[str, Json], port: int, source: tuple[str, Mapping[str, str]]
) -> bool:
    """Whether a connection from pod `source` (namespace, labels) to port `port` of pod `target`
    (namespace, pod template) is let in, as Kubernetes defines NetworkPolicy ingress: a pod no policy
    selects takes everything; a selected pod takes what one of its policies' rules admits. Ports are
    numbers here (the overlays name none by name); an ipBlock admits no pod."""
    namespace, template = target
    labels = template["metadata"].get("labels", {})
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], labels)
    ]
    if not selecting:
        return True
    source_namespace, source_labels = source
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and not any(p.get("port") == port for p in rule["ports"]):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                if "ipBlock" in peer:
                    continue
                if "namespaceSelector" in peer:
                    in_namespace = selects(peer["namespaceSelector"], {NAMESPACE_NAME: source_namespace})
                else:
                    in_namespace = source_namespace == namespace
                if in_namespace and selects(peer.get("podSelector"), source_labels):
                    return True
    return False


def everyone(objects: list[Json]) -> list[tuple[str, Mapping[str, str]]]:
    """Every pod the overlay makes, Prometheus, and strangers, as connection sources."""
    ours = [
        (o["metadata"]["namespace"], template["metadata"].get("labels", {}))
        for o, template in pod_templates(objects)
    ]
    return [*ours, *PROMETHEUS, *STRANGERS]


def admitted_on(objects: list[Json], workload: str, port: int) -> set[tuple[str, str]]:
    policies = of_kind(objects, "NetworkPolicy")
    [(owner, template)] = [(o, t) for o, t in pod_templates(objects) if o["metadata"]["name"] == workload]
    target = (owner["metadata"]["namespace"], template)
    return {
        (namespace, labels.get(NAME, "?"))
        for namespace, labels in everyone(objects)
        if admits(policies, target, port, (namespace, labels))
    }


# --- no kubectl needed -----------------------------------------------------------------------------


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def test_every_path_a_kustomization_names_exists_and_every_file_is_used() -> None:
    """resources name files or kustomization directories, components name Component directories,
    patches name files; and no manifest lies in k8s/ that no kustomization reads."""
    assert {p.parent for p in kustomizations()} == {
        BASE,
        *(OVERLAYS / name for name in OVERLAY_NAMES),
        *(d for d in COMPONENTS.iterdir() if d.is_dir()),
    }
    used: set[Path] = set()
    for kustomization_file in kustomizations():
        folder = kustomization_file.parent
        kustomization = yaml.safe_load(kustomization_file.read_text())
        assert kustomization["kind"] in KUSTOMIZE_KINDS, kustomization_file
        for resource in kustomization.get("resources", []):
            path = (folder / resource).resolve()
            assert path.is_file() or (path / "kustomization.yaml").is_file(), (
                f"{kustomization_file}: {resource}"
            )
            used.add(path)
        for component in kustomization.get("components", []):
            path = (folder / component).resolve()
            assert path.is_relative_to(COMPONENTS), f"{kustomization_file}: {component}"
            assert yaml.safe_load((path / "kustomization.yaml").read_text())["kind"] == "Component", component
        for patch in kustomization.get("patches", []):
            assert ("path" in patch) != ("patch" in patch), f"{kustomization_file}: {patch}"
            if "path" in patch:
                assert (folder / patch["path"]).is_file(), f"{kustomization_file}: {patch['path']}"
                used.add((folder / patch["path"]).resolve())
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests - used == set()


def test_each_overlay_builds_on_the_base_and_names_its_components() -> None:
    expected = {"demo": ["cert-manager"], "production": ["nats-cluster", "cert-manager"]}
    for name in OVERLAY_NAMES:
        kustomization = yaml.safe_load((OVERLAYS / name / "kustomization.yaml").read_text())
        assert kustomization["resources"][0] == "../../base", name
        assert [Path(c).name for c in kustomization["components"]] == expected[name], name


def test_the_restricted_checker_refuses_the_node_services_for_the_reasons_they_need_privilege() -> None:
    """The checker is the one that passes the control plane below: it refuses what the node agent's
    and the keeper's pods need, which is why they live in the namespace labelled "privileged"."""
    base = yaml.safe_load_all((BASE / "node-agent.yaml").read_text())
    [agent] = [d for d in base if d and d["kind"] == "DaemonSet"]
    found = restricted_violations(agent["spec"]["template"]["spec"])
    assert {"hostPID: true", "hostIPC: true", "node-agent: privileged"} <= set(found)
    assert "volume pod-resources: hostPath" in found
    assert "node-agent: runAsNonRoot is not true" in found
    compliant: Json = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "c",
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    assert restricted_violations(compliant) == []
    compliant["containers"][0]["securityContext"]["runAsNonRoot"] = False  # overrides the pod's
    assert restricted_violations(compliant) == ["c: runAsNonRoot is not true"]


# --- both overlays ---------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schema(
    built: dict[str, list[Json]], overlay: str, version: str
) -> None:
    for document in built[overlay]:
        if (document["apiVersion"], document["kind"]) in CRD_KINDS:
            continue  # not in the schema: test_the_custom_resources_are_well_formed
        kubernetes_validate.validate(document, version, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_the_custom_resources_are_well_formed(built: dict[str, list[Json]], overlay: str) -> None:
    """The kinds of cert-manager and of the Prometheus operator, checked for the fields used here."""
    allowed = {
        "ServiceMonitor": {"selector", "endpoints", "namespaceSelector", "jobLabel"},
        "Certificate": {
            "secretName",
            "dnsNames",
            "issuerRef",
            "duration",
            "renewBefore",
            "privateKey",
            "isCA",
            "commonName",
        },
        "Issuer": {"selfSigned", "ca"},
    }
    for document in built[overlay]:
        key = (document["apiVersion"], document["kind"])
        if key not in CRD_KINDS:
            assert not document["apiVersion"].endswith((".coreos.com/v1", "cert-manager.io/v1")), object_id(
                document
            )
            continue
        assert set(document) == {"apiVersion", "kind", "metadata", "spec"}, object_id(document)
        assert document["metadata"]["namespace"], object_id(document)
        assert set(document["spec"]) <= allowed[document["kind"]], object_id(document)
        if document["kind"] == "ServiceMonitor":
            for endpoint in document["spec"]["endpoints"]:
                assert set(endpoint) <= {"port", "path", "interval", "scheme", "scrapeTimeout"}, object_id(
                    document
                )
        if document["kind"] == "Certificate":
            issuer = document["spec"]["issuerRef"]
            assert issuer["kind"] == "Issuer"
            issuers = {
                (i["metadata"]["namespace"], i["metadata"]["name"]) for i in of_kind(built[overlay], "Issuer")
            }
            assert (document["metadata"]["namespace"], issuer["name"]) in issuers, object_id(document)
        if document["kind"] == "Issuer":
            assert len(document["spec"]) == 1, object_id(document)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_cert_manager_issues_the_certificate_the_webhook_serves_and_the_api_server_trusts(
    built: dict[str, list[Json]], overlay: str
) -> None:
    objects = built[overlay]
    webhook = by_name(objects, "Deployment")["mpsflow-admission-webhook"]
    [tls] = [v for v in webhook["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    [configuration] = of_kind(objects, "MutatingWebhookConfiguration")
    namespace, name = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    [certificate] = [
        c
        for c in of_kind(objects, "Certificate")
        if (c["metadata"]["namespace"], c["metadata"]["name"]) == (namespace, name)
    ]
    assert certificate["spec"]["secretName"] == tls["secret"]["secretName"]
    service = configuration["webhooks"][0]["clientConfig"]["service"]
    assert f"{service['name']}.{service['namespace']}.svc" in certificate["spec"]["dnsNames"]
    issuers = by_name(objects, "Issuer")
    ca_issuer = issuers[certificate["spec"]["issuerRef"]["name"]]
    [ca] = [
        c
        for c in of_kind(objects, "Certificate")
        if c["spec"]["secretName"] == ca_issuer["spec"]["ca"]["secretName"]
    ]
    assert ca["spec"]["isCA"] is True  # renewing the webhook's certificate leaves the caBundle as it was


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_container_runs_a_command_that_parses(built: dict[str, list[Json]], overlay: str) -> None:
    parser = build_parser()
    for owner, template in pod_templates(built[overlay]):
        for container in containers(template["spec"]):
            if container["image"].startswith("ghcr.io/mpsflow/"):
                parsed = parser.parse_args(args_of(container))
                assert parsed.command in ("run", "bootstrap"), owner["metadata"]["name"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_what_the_pods_name_exists_in_their_namespace(built: dict[str, list[Json]], overlay: str) -> None:
    """Service accounts, the Services the NATS and OTLP URLs name (from the other namespace too),
    and the ConfigMaps and Secrets pods mount: the overlay makes them, or the install makes them by hand
    (the NATS trust and credentials, docs/security.md), or cert-manager does (the webhook's)."""
    objects = built[overlay]
    made = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects}
    by_hand = {("ConfigMap", CONTROL_PLANE_NAMESPACE, "mpsflow-nats-trust")} | {
        ("Secret", CONTROL_PLANE_NAMESPACE, f"mpsflow-nats-{identity}")
        for identity in ("admin", "pod-watcher", "planner", "config-publisher")
    }
    issued = {
        ("Secret", c["metadata"]["namespace"], c["spec"]["secretName"])
        for c in of_kind(objects, "Certificate")
    }
    services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in of_kind(objects, "Service")}
    for owner, template in pod_templates(objects):
        namespace, spec = owner["metadata"]["namespace"], template["spec"]
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", namespace, spec["serviceAccountName"]) in made, owner["metadata"][
                "name"
            ]
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                wanted = ("ConfigMap", namespace, volume["configMap"]["name"])
            elif "secret" in volume:
                wanted = ("Secret", namespace, volume["secret"]["secretName"])
            else:
                continue
            assert wanted in made | by_hand | issued, (owner["metadata"]["name"], wanted)
        for container in containers(spec):
            for variable in container.get("env", []):
                if variable["name"] not in ("MPSFLOW_NATS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
                    continue
                url = urlsplit(variable["value"])
                assert url.hostname is not None and url.port is not None
                service_name, service_namespace = url.hostname.split(".")
                service = services[(service_namespace, service_name)]
                assert url.port in [p["port"] for p in service["spec"]["ports"]], variable
                backends = [
                    c
                    for o, t in pod_templates(objects)
                    if o["metadata"]["namespace"] == service_namespace
                    and selects({"matchLabels": service["spec"]["selector"]}, t["metadata"]["labels"])
                    for c in t["spec"]["containers"]
                ]
                assert any(url.port in [p["containerPort"] for p in c.get("ports", [])] for c in backends), (
                    variable
                )


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_probe_asks_a_declared_port_and_the_services_ask_their_status_port(
    built: dict[str, list[Json]], overlay: str
) -> None:
    probed = set()
    for owner, template in pod_templates(built[overlay]):
        for container in containers(template["spec"]):
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                if kind not in container:
                    continue
                get = container[kind]["httpGet"]  # no exec probe left: they read files that no one writes
                assert get["port"] in ports, (owner["metadata"]["name"], kind)
                if owner["metadata"]["name"] in SERVICES:
                    assert ports["status"] == 8080 and get["port"] == "status"
                    assert get["path"] == {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}[kind]
                    probed.add((owner["metadata"]["name"], kind))
    assert probed == {(name, kind) for name in SERVICES for kind in ("livenessProbe", "readinessProbe")}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_each_namespace_enforces_a_pod_security_level_its_pods_meet(
    built: dict[str, list[Json]], overlay: str
) -> None:
    objects = built[overlay]
    levels = {
        n["metadata"]["name"]: n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for n in of_kind(objects, "Namespace")
    }
    assert levels == {CONTROL_PLANE_NAMESPACE: "restricted", NODE_NAMESPACE: "privileged"}
    for o in objects:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace"):
            assert o["metadata"]["namespace"] in levels, object_id(o)
    for owner, template in pod_templates(objects):
        namespace = owner["metadata"]["namespace"]
        if owner["metadata"]["name"] in NODE_WORKLOADS:
            assert namespace == NODE_NAMESPACE
        else:
            assert levels[namespace] == "restricted", object_id(owner)
            assert restricted_violations(template["spec"]) == [], object_id(owner)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_the_restricted_containers_write_only_to_their_volumes(
    built: dict[str, list[Json]], overlay: str
) -> None:
    """A read-only root file system in the control plane; /tmp an emptyDir for whatever a library wants
    to put there; NATS writes its store, on its volume."""
    for owner, template in pod_templates(built[overlay]):
        if owner["metadata"]["namespace"] != CONTROL_PLANE_NAMESPACE:
            continue
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        claims = {c["metadata"]["name"] for c in owner["spec"].get("volumeClaimTemplates", [])}
        for container in containers(template["spec"]):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, object_id(owner)
            writable = {
                m["mountPath"]
                for m in container.get("volumeMounts", [])
                if not m.get("readOnly") and (m["name"] in claims or "emptyDir" in volumes.get(m["name"], {}))
            }
            assert writable == ({"/data"} if owner["metadata"]["name"] == "nats" else {"/tmp"}), object_id(
                owner
            )


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_the_streams_fit_on_the_nats_volume(built: dict[str, list[Json]], overlay: str) -> None:
    """What the bootstrap allows the streams (and the lease bucket's 1 MiB) fits on each server's volume."""
    objects = built[overlay]
    job = by_name(objects, "Job")["mpsflow-bootstrap"]
    parsed = build_parser().parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"])
    mib = parsed.events_max_mib + parsed.dead_letters_max_mib + parsed.node_configs_max_mib + 1
    [claim] = by_name(objects, "StatefulSet")["nats"]["spec"]["volumeClaimTemplates"]
    storage = claim["spec"]["resources"]["requests"]["storage"]
    assert storage.endswith("Gi")
    assert mib <= int(storage.removesuffix("Gi")) * 1024, (mib, storage)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_the_nats_configuration_is_one_nats_server_accepts(
    built: dict[str, list[Json]], overlay: str, tmp_path: Path
) -> None:
    """`nats-server -t` on the overlay's nats.conf, with the trust `mpsflow credentials` writes beside it,
    and its monitoring port the one the probes ask."""
    objects = built[overlay]
    text = by_name(objects, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    [container] = by_name(objects, "StatefulSet")["nats"]["spec"]["template"]["spec"]["containers"]
    monitor = {p["name"]: p["containerPort"] for p in container["ports"]}["monitor"]
    assert f"http_port: {monitor}" in text
    (tmp_path / "nats.conf").write_text(text.replace("/data", str(tmp_path)))
    (tmp_path / "trust").mkdir()
    authority = Authority.load_or_create(tmp_path / "keys")
    (tmp_path / "trust" / "nats-auth.conf").write_text(authority.server_config())
    checked = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
        capture_output=True,
        text=True,
        env={**os.environ, "POD_NAME": "nats-0"},
        cwd=tmp_path,
        check=False,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- demo ------------------------------------------------------------------------------------------


@needs_kubectl
def test_the_demo_runs_one_of_everything_on_small_requests(demo: list[Json], production: list[Json]) -> None:
    for deployment in of_kind(demo, "Deployment"):
        assert deployment["spec"]["replicas"] == 1, deployment["metadata"]["name"]
    assert by_name(demo, "StatefulSet")["nats"]["spec"]["replicas"] == 1
    job = by_name(demo, "Job")["mpsflow-bootstrap"]
    assert build_parser().parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"]).replicas == 1
    assert "nats-routes" not in by_name(demo, "Service")
    assert by_name(demo, "Deployment")["jaeger"]["spec"]["template"]["spec"]["containers"][0][
        "image"
    ].startswith("jaegertracing/jaeger:")

    def requests(objects: list[Json]) -> dict[str, Json]:
        return {
            f"{o['metadata']['name']}/{c['name']}": c["resources"]["requests"]
            for o, t in pod_templates(objects)
            for c in containers(t["spec"])
        }

    small, large = requests(demo), requests(production)
    assert set(small) == set(large)
    for name, request in small.items():
        assert request.keys() == {"cpu", "memory"}, name
        assert quantity(request["cpu"]) <= quantity(large[name]["cpu"]), name
        assert quantity(request["memory"]) <= quantity(large[name]["memory"]), name
    assert sum(quantity(r["cpu"]) for r in small.values()) < 0.25  # a quarter of a CPU for the lot


@needs_kubectl
def test_the_demo_needs_no_network_plugin_nor_prometheus_operator(demo: list[Json]) -> None:
    kinds = {o["kind"] for o in demo}
    assert not kinds & {"NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor"}


# --- production ------------------------------------------------------------------------------------


def quantity(text: str | int) -> float:
    """A Kubernetes quantity, in cores or bytes."""
    text = str(text)
    for suffix, factor in (("m", 1e-3), ("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30)):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


@needs_kubectl
def test_production_keeps_every_stream_on_three_nats_servers(production: list[Json]) -> None:
    nats = by_name(production, "StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"  # a server is up only once it finds the others
    job = by_name(production, "Job")["mpsflow-bootstrap"]
    assert build_parser().parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"]).replicas == 3
    config = by_name(production, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    for n in range(3):
        assert f"nats-route://nats-{n}.nats-routes.{CONTROL_PLANE_NAMESPACE}.svc:6222" in config
    assert "include ./trust/nats-auth.conf" in config  # authentication stays on


@needs_kubectl
def test_production_runs_two_replicas_of_each_leased_service_and_of_the_webhook(
    production: list[Json],
) -> None:
    deployments = by_name(production, "Deployment")
    for name in REPLICATED:
        spec = deployments[name]["spec"]
        assert spec["replicas"] == 2, name
        [spread] = spec["template"]["spec"]["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert selects(spread["labelSelector"], spec["template"]["metadata"]["labels"])
    for name in LEASED:  # the replica holding the lease and the standby
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container[
            "env"
        ]


@needs_kubectl
def test_production_gives_every_container_requests_and_limits(production: list[Json]) -> None:
    for owner, template in pod_templates(production):
        for container in containers(template["spec"]):
            resources = container["resources"]
            where = f"{owner['metadata']['name']}/{container['name']}"
            assert resources["requests"].keys() == resources["limits"].keys() == {"cpu", "memory"}, where
            for resource in ("cpu", "memory"):
                assert quantity(resources["requests"][resource]) <= quantity(resources["limits"][resource]), (
                    where
                )
            if container["image"].startswith("ghcr.io/mpsflow/"):  # one event loop: one CPU is never a brake
                assert quantity(resources["limits"]["cpu"]) <= 1, where


@needs_kubectl
def test_production_lets_only_mpsflows_nats_clients_reach_nats(production: list[Json]) -> None:
    assert admitted_on(production, "nats", 4222) == NATS_CLIENTS
    assert admitted_on(production, "nats", 6222) == {(CONTROL_PLANE_NAMESPACE, "nats")}
    assert admitted_on(production, "nats", 8222) == set()  # monitoring: the kubelet's probes only
    [policy] = [
        p
        for p in of_kind(production, "NetworkPolicy")
        if p["spec"]["podSelector"] == {"matchLabels": {NAME: "nats"}}
    ]
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "every rule names who"
        for peer in rule["from"]:
            assert peer["podSelector"], "pods by their labels, never a whole namespace"


@needs_kubectl
def test_production_opens_the_webhook_port_and_the_status_ports_and_nothing_else(
    production: list[Json],
) -> None:
    """The API server cannot be selected by a NetworkPolicy (it calls from the control-plane nodes'
    network), so the webhook port takes any source; the status ports take Prometheus only."""
    sources = {(namespace, labels.get(NAME, "?")) for namespace, labels in everyone(production)}
    assert admitted_on(production, "mpsflow-admission-webhook", 8443) == sources
    for workload in SERVICES:
        assert admitted_on(production, workload, 8080) == {("monitoring", "prometheus")}, workload
        assert admitted_on(production, workload, 4222) == set(), workload


@needs_kubectl
def test_production_disruption_budgets_keep_a_replica_of_each_service_and_a_nats_quorum(
    production: list[Json],
) -> None:
    budgets = of_kind(production, "PodDisruptionBudget")
    for owner, template in pod_templates(production):
        namespace, labels = owner["metadata"]["namespace"], template["metadata"]["labels"]
        matching = [
            b
            for b in budgets
            if b["metadata"]["namespace"] == namespace and selects(b["spec"]["selector"], labels)
        ]
        name = owner["metadata"]["name"]
        if name in REPLICATED:
            [budget] = matching
            assert budget["spec"] == {"minAvailable": 1, "selector": budget["spec"]["selector"]}, name
            assert budget["spec"]["minAvailable"] < owner["spec"]["replicas"], name  # a drain can go on
        elif name == "nats":
            [budget] = matching
            replicas, unavailable = owner["spec"]["replicas"], budget["spec"]["maxUnavailable"]
            assert "minAvailable" not in budget["spec"]
            assert replicas - unavailable >= replicas // 2 + 1  # JetStream's quorum: 2 of 3
            assert unavailable >= 1  # and a drain can go on
        else:
            assert matching == [], name
    assert len(budgets) == len(REPLICATED) + 1


@needs_kubectl
def test_production_scrapes_each_service_on_its_status_port(production: list[Json]) -> None:
    monitors = of_kind(production, "ServiceMonitor")
    assert sorted(m["metadata"]["name"] for m in monitors) == sorted(SERVICES)
    for monitor in monitors:
        namespace = monitor["metadata"]["namespace"]
        [service] = [
            s
            for s in of_kind(production, "Service")
            if s["metadata"]["namespace"] == namespace
            and selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        [(workload, template)] = [
            (o, t)
            for o, t in pod_templates(production)
            if o["metadata"]["namespace"] == namespace
            and selects({"matchLabels": service["spec"]["selector"]}, t["metadata"]["labels"])
        ]
        assert workload["metadata"]["name"] == monitor["metadata"]["name"]
        assert workload["kind"] in ("Deployment", "DaemonSet")
        [port] = [p for p in service["spec"]["ports"] if p["name"] == "status"]
        container_ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert container_ports[port["targetPort"]] == 8080
        assert monitor["spec"]["endpoints"] == [{"port": "status", "path": "/metrics", "interval": "30s"}]
