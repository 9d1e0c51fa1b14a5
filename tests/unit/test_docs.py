"""The docs/ folder keeps up with the code, and the code cites only what the repository holds.

docs/events.md is generated (`make docs`) from the event models, so it must equal what the
generator renders now; every event kind must have its subject in the generator; the generator
stays pure (no NATS client, no event loop, no tracing); the examples of docs/formats.md are what
the code reads and writes; and no module cites a document that lives outside this repository.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from events.catalogue import ROUTES, kind_of, render
from events.envelope import Event
from services.planner.core.model import PlanSettings
from services.planner.core.run import plan_cluster
from services.planner.snapshot import parse_snapshot, plan_document
from simulation.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("events", "services", "node_agent", "simulation", "tests", "benchmarks")
OUTSIDE_CITATIONS = ("contracts/", "reference/", "peers.md", "nos.md", "stack.md", "/work/shared")


def test_events_md_is_what_the_models_say() -> None:
    written = (ROOT / "docs" / "events.md").read_text()
    assert written == render(), "docs/events.md is out of date with events/: run `make docs`"


def test_every_event_kind_has_a_subject_in_the_catalogue() -> None:
    kinds = {kind_of(model) for model in get_args(get_args(Event)[0])}
    assert kinds == set(ROUTES), "add the new event kind to events.catalogue.ROUTES"


def test_the_catalogue_needs_no_bus_loop_or_tracing() -> None:
    probe = (
        "import sys, events.catalogue; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'nats', 'anyio', 'opentelemetry'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def _code_blocks(document: str, language: str) -> list[str]:
    text = (ROOT / "docs" / document).read_text()
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_the_plan_example_is_what_mpsflow_plan_makes_of_the_snapshot_example() -> None:
    snapshot, plan = _code_blocks("formats.md", "json")[:2]
    nodes, pods = parse_snapshot(snapshot)
    assert plan_document(plan_cluster(nodes, pods, PlanSettings())) == json.loads(plan)


def test_the_scenario_example_is_a_valid_scenario() -> None:
    (scenario,) = _code_blocks("formats.md", "yaml")
    parsed = parse_scenario(scenario)
    assert [node.name for node in parsed.nodes] == ["a100-1", "cpu-1"]
    assert parsed.workload[0].runs_for == 30


def _python_files() -> list[Path]:
    this = Path(__file__).resolve()
    return sorted(
        path
        for folder in SCANNED
        for path in (ROOT / folder).rglob("*.py")
        if ".venv" not in path.parts and path.resolve() != this
    )


@pytest.mark.parametrize("cited", OUTSIDE_CITATIONS)
def test_no_module_cites_a_document_outside_the_repository(cited: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _python_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        if cited in line
    ]
    assert not offenders, f"{cited!r} names a file this repository does not have; cite docs/: {offenders}"
