"""`mpsflow demo --scenario` files: a valid scenario mutated, damaged, or replaced by anything at all.

A scenario (docs/formats.md §2.1) is mutated as a document (fields dropped, duplicated, retyped,
unknown ones added; negative, zero and huge numbers; duplicate nodes and pods; pod manifests whose
`spec`, `metadata` or `containers` are of the wrong type) and written as YAML or JSON, then maybe
damaged as text (cut short, bytes flipped, numbers of thousands of digits, nesting thousands deep,
invalid UTF-8). What must hold:

- `parse_scenario` either accepts it or raises `ScenarioError` with one line that starts with the
  offending field (`nodes[0].gpus[1].memory_mib: ...`; `scenario: ...` for the file as a whole);
  no other exception, ever;
- through the command line (`mpsflow demo --scenario FILE`, in process, only for files the parser
  refuses: a valid one would start the demo), it exits 2 with one line, `mpsflow demo: ...`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from services.cli import main
from simulation.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from tests.fuzz.garbage import damaged_bytes, json_values, mutated_json, to_json
from tests.fuzz.profile import fuzz, tried

POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "train-1", "namespace": "ml"},
    "spec": {
        "hostIPC": True,
        "securityContext": {"runAsUser": 1000},
        "containers": [
            {"name": "main", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu-10gb": 1}}}
        ],
    },
}
SEED: dict[str, Any] = {
    "nodes": [
        {
            "name": "a100-1",
            "labels": {"nos.nebuly.com/gpu-partitioning": "mps"},
            "gpus": [
                {"model": "NVIDIA-A100-SXM4-80GB", "memory_mib": 81920},
                {"model": "NVIDIA-L4", "memory_mib": 23034, "compute_capability": [8, 9]},
            ],
        },
        {"name": "cpu-1", "taints": [{"key": "dedicated", "value": "batch", "effect": "NoSchedule"}]},
    ],
    "node_changes": [{"at": 3.0, "node": "cpu-1", "labels": {"nos.nebuly.com/gpu-partitioning": "mps"}}],
    "timing": {"node_status_period_s": 10, "watch_delay_s": 0.05},
    "timeout": 60,
    "workload": [
        {"at": 0.0, "runs_for": 30, "pod": POD},
        {"at": 0.5, "pod": {**POD, "metadata": {"name": "train-2"}}},
    ],
}
if "api_faults" in Scenario.model_fields:  # the API emulator's faults, where this version has them
    SEED["api_faults"] = {"seed": 1, "identities": ["mpsflow-*"], "resources": ["pods"], "error_rate": 0.1}
WORDS = (
    *Scenario.model_fields,
    "name",
    "labels",
    "taints",
    "gpus",
    "model",
    "memory_mib",
    "compute_capability",
    "at",
    "runs_for",
    "pod",
    "node",
    "kind",
    "metadata",
    "spec",
    "containers",
    "Pod",
    "Deployment",
    "a100-1",
    "cpu-1",
    "A100",
    "a..b",
    "-a",
)

LONGEST = 65_536
"""Characters in the longest string a mutation writes: YAML in pure Python reads a megabyte slowly."""
HOW = ("mutated", "mutated", "mutated", "damaged", "mutated_and_damaged", "wrong_shape", "arbitrary")


@st.composite
def hostile_scenarios(draw: st.DrawFn) -> bytes:
    """The seed scenario made hostile, as the bytes of a YAML or JSON file."""
    how = draw(st.sampled_from(HOW))
    if how == "wrong_shape":
        return to_json(draw(json_values(surrogates=False, longest=LONGEST))).encode()
    if how == "arbitrary":
        return draw(st.binary(max_size=256))
    document: Any = SEED
    if how in ("mutated", "mutated_and_damaged"):
        document = draw(mutated_json(SEED, words=WORDS, max_mutations=4, surrogates=False, longest=LONGEST))
    as_yaml = draw(st.booleans())
    text = yaml.safe_dump(document, allow_unicode=draw(st.booleans())) if as_yaml else to_json(document)
    data = text.encode()
    if how in ("damaged", "mutated_and_damaged"):
        data = draw(damaged_bytes(data))
    return data


def top_level_keys(text: str) -> set[str]:
    """The file's own top-level keys, as a one-line message writes them (a newline as `\\n`)."""
    try:
        document = yaml.safe_load(text)
    except Exception:  # whatever the parser's reason, the file has no keys to name
        return set()
    if not isinstance(document, dict):
        return set()
    return {"".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(key)) for key in document}


def assert_names_the_field(message: str, text: str) -> None:
    """One line, starting with `scenario` or a top-level field (of the format, or the file's own)."""
    assert message.strip() and "\n" not in message, message

    def starts_with_one_of(roots: set[str]) -> bool:
        return any(message.startswith(root + after) for root in roots for after in (": ", ".", "["))

    assert starts_with_one_of({"scenario", *Scenario.model_fields}) or starts_with_one_of(
        top_level_keys(text)
    ), f"{message!r} does not start with a field"


NESTED = b"nodes: " + b"[" * 10_000 + b"]" * 10_000


@fuzz(bounded=300)
@given(data=hostile_scenarios())
@example(data=NESTED).via("yaml.safe_load raised RecursionError")
@example(data=b"nodes: [{name: a}]\ntimeout: " + b"9" * 5000).via("yaml's int() raised ValueError")
@example(data=b"nodes: [{name: a}]\nworkload: [{at: 0, pod: {metadata: {name: p}, spec: [1]}}]").via(
    "a pod whose spec is a list raised AttributeError in the pod check"
)
@example(data=b"nodes: [").via("the YAML error went into the message on several lines")
@example(data=b'nodes: ["\\UFFFFFFFF"]').via("yaml's chr() raised OverflowError")
@example(data=b'{"\\ud800\\udc00": null}').via("a key pydantic cannot read gave a message naming no field")
@example(data=b'{"nodes": [{"name": "a"}], "\\n": null}').via("an unknown key's newline broke the line")
@example(data=b'{"nodes": [{"name": "a"}], 60, "timeout": 5}').via(
    "a flow mapping's lone 60 became an int key, named as the index [60] (make fuzz, round 8)"
)
def test_a_scenario_is_refused_naming_the_field_or_accepted(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        scenario = parse_scenario(text)
    except ScenarioError as error:
        root = re.split(r"[:.\[]", str(error), maxsplit=1)[0]
        tried(
            "scenarios",
            "refused: " + (root if root in {"scenario", *Scenario.model_fields} else "another field"),
        )
        assert_names_the_field(str(error), text)
        return
    tried("scenarios", "accepted")
    assert scenario.nodes


def demo_command(data: bytes) -> tuple[int, str] | None:
    """`mpsflow demo --scenario FILE` in this process: exit status and standard error; None, and
    nothing run, when `load_scenario` (the command's first step) accepts the file."""
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as directory:
        scenario = Path(directory) / "scenario.yaml"
        scenario.write_bytes(data)
        try:
            load_scenario(scenario)
        except ScenarioError:
            pass
        else:
            return None  # a valid scenario: the command would start the demo
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            status = main(["demo", "--scenario", str(scenario)])
    return status, err.getvalue()


def refused(data: bytes) -> bool:
    """Whether the text is no scenario (not UTF-8, or invalid): most of these the command refuses."""
    try:
        parse_scenario(data.decode("utf-8"))
    except (UnicodeDecodeError, ScenarioError):
        return True
    return False


@fuzz(bounded=30, share=0.1)
@given(data=hostile_scenarios().filter(refused))
@example(data=b"nodes: [{name: \xff}]").via("a file that is not UTF-8 made read_text raise")
def test_the_demo_refuses_an_invalid_scenario_with_exit_2_and_one_line(data: bytes) -> None:
    ran = demo_command(data)
    if ran is None:
        tried("demo command", "valid once read as a file, not run")
        return
    status, err = ran
    tried("demo command", f"exit {status}")
    assert status == 2, (status, err)
    assert err.startswith("mpsflow demo: ") and err.endswith("\n") and err.count("\n") == 1, err


def test_the_seed_scenario_is_valid() -> None:
    """The fuzzing starts from a valid scenario, so that what is refused is what the mutation broke."""
    assert parse_scenario(json.dumps(SEED)).workload[1].key == "default/train-2"
