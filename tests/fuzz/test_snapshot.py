"""`mpsflow plan` snapshots: valid snapshots mutated, damaged, or replaced by anything at all.

A snapshot (docs/formats.md §1.2) is mutated as JSON (fields dropped, duplicated, retyped; negative,
zero and huge numbers; duplicate nodes, GPU indexes and pods; odd unicode; times at the calendar's
edges) and as text (cut short, bytes flipped, numbers of thousands of digits, nesting thousands
deep, invalid UTF-8). What must hold:

- `parse_snapshot` either refuses it with a `SnapshotError` whose message is one line that starts
  with the offending field's path (`nodes[3].gpus[0].memory_mib: ...`, or `snapshot: ...` for the
  document as a whole), or accepts it, and then the plan keeps the contract's invariants
  (tests/unit/planner/invariants.py) and renders; no other exception, ever;
- through the command line (`mpsflow plan FILE`, in process), an invalid snapshot exits 2 with
  nothing on standard output and one line on standard error, `mpsflow plan: <field>: <problem>`,
  and a valid one exits 0 with the plan as JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from services.cli import main
from services.planner.core.model import PlanSettings
from services.planner.core.run import plan_cluster
from services.planner.snapshot import SnapshotError, parse_snapshot, render_plan
from tests.fuzz.garbage import EDGE_TIMES, damaged_bytes, json_values, mutated_json, to_json
from tests.fuzz.profile import fuzz, tally, tried
from tests.unit.planner.invariants import assert_plan_invariants

OPT_IN = {"nos.nebuly.com/gpu-partitioning": "mps"}
SEED: dict[str, Any] = {
    "nodes": [
        {
            "name": "a100-1",
            "labels": OPT_IN,
            "gpus": [
                {
                    "index": 0,
                    "model": "NVIDIA-A100-SXM4-80GB",
                    "memory_mib": 81920,
                    "slices": [{"size_gb": 10, "used": True}, {"size_gb": 20, "used": False}],
                },
                {"index": 1, "model": "Tesla-P100-PCIE-16GB", "memory_mib": 16384},
            ],
        },
        {"name": "cpu-1", "labels": {}, "gpus": []},
        {
            "name": "l4-1",
            "labels": {"nos.nebuly.ai/gpu-partitioning": "mps"},
            "gpus": [{"index": 3, "model": "NVIDIA-L4", "memory_mib": 23034, "slices": []}],
        },
    ],
    "pending_pods": [
        {
            "namespace": "default",
            "name": "train-1",
            "size_gb": 10,
            "priority": 0,
            "created": "2026-11-22T10:00:00Z",
        },
        {"namespace": "default", "name": "huge-1", "size_gb": 200},
        {
            "namespace": "ml",
            "name": "outside",
            "size_gb": 20,
            "priority": -5,
            "created": None,
            "gated": False,
        },
    ],
}
FIELDS = (
    "nodes",
    "name",
    "labels",
    "gpus",
    "index",
    "model",
    "memory_mib",
    "slices",
    "size_gb",
    "used",
    "pending_pods",
    "namespace",
    "priority",
    "created",
    "gated",
)
WORDS = (
    *FIELDS,
    *EDGE_TIMES,
    "a100-1",
    "default",
    "train-1",
    "mps",
    "nos.nebuly.com/gpu-partitioning",
    "K80",
)
FIELD_PATH = re.compile(r"snapshot|(?P<field>[a-z_]+)(\[\d+\])*(\.(?P<more>[a-z_]+)(\[\d+\])*)*")

HOW = ("mutated", "mutated", "mutated", "damaged", "mutated_and_damaged", "wrong_shape", "arbitrary")


@st.composite
def hostile_snapshots(draw: st.DrawFn) -> bytes:
    """The seed snapshot made hostile, as the bytes of a file."""
    how = draw(st.sampled_from(HOW))
    if how == "wrong_shape":
        return to_json(draw(json_values())).encode("utf-8", "surrogatepass")
    if how == "arbitrary":
        return draw(st.binary(max_size=256))
    data = to_json(SEED).encode()
    if how in ("mutated", "mutated_and_damaged"):
        document = draw(mutated_json(SEED, words=WORDS, max_mutations=4))
        data = to_json(document, ascii_only=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if how in ("damaged", "mutated_and_damaged"):
        data = draw(damaged_bytes(data))
    return data


def assert_names_the_field(message: str) -> None:
    """One line, starting with a field path of the contract (or `snapshot`), then the problem."""
    assert "\n" not in message, message
    path, separator, problem = message.partition(": ")
    assert separator and problem.strip(), message
    match = FIELD_PATH.fullmatch(path)
    assert match is not None, f"{message!r} does not start with a field path"
    names = [part for part in re.split(r"[.\[\]\d]+", path) if part]
    assert path == "snapshot" or set(names) <= set(FIELDS), f"{message!r} names no field of the contract"


def as_text(data: bytes) -> str:
    """The text of a snapshot file: UTF-8 (lone surrogates kept, as JSON escapes would give them),
    with a replacement character for each byte that is not (the command refuses those files)."""
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace")


@fuzz(bounded=300)
@given(data=hostile_snapshots())
@example(data=b"[" * 100_000).via("json.loads raised RecursionError")
@example(
    data=b'{"nodes": [], "pending_pods": [{"namespace": "a", "name": "b", "size_gb": ' + b"9" * 5000 + b"}]}"
).via("json.loads raised ValueError for more digits than int() converts")
@example(
    data=json.dumps(
        {"nodes": [], "pending_pods": [{"namespace": "a\nb", "name": "c", "size_gb": 1}] * 2}
    ).encode()
).via("the duplicate pod's key went into the message as it was, newline and all")
def test_a_snapshot_is_refused_naming_the_field_or_planned_within_the_contract(data: bytes) -> None:
    try:
        nodes, pods = parse_snapshot(as_text(data))
    except SnapshotError as error:
        where = str(error).partition(": ")[0]
        tried("snapshots", "refused: " + re.sub(r"\[\d+\]", "[]", where))
        assert_names_the_field(str(error))
        return
    tried("snapshots", "planned")
    tally("snapshots", "pending pods planned", len(pods))
    result = plan_cluster(nodes, pods, PlanSettings())
    assert_plan_invariants(nodes, pods, result, PlanSettings())
    json.loads(render_plan(result))


def test_an_opted_in_node_without_gpus_is_in_the_plan() -> None:
    snapshot = {"nodes": [{"name": "a", "labels": OPT_IN, "gpus": []}], "pending_pods": []}
    nodes, pods = parse_snapshot(json.dumps(snapshot))
    result = plan_cluster(nodes, pods, PlanSettings())
    assert "a" in {*result.layouts, *result.excluded_nodes}
    assert result.excluded_nodes["a"].startswith("reports no GPU")


def plan_command(data: bytes) -> tuple[int, str, str]:
    """`mpsflow plan FILE` in this process: exit status, standard output, standard error."""
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as directory:
        snapshot = Path(directory) / "snapshot.json"
        snapshot.write_bytes(data)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["plan", str(snapshot)])
    return status, out.getvalue(), err.getvalue()


@fuzz(bounded=40, share=0.1)
@given(data=hostile_snapshots())
@example(data=b'{"nodes": [{"name": "\xff"}]}').via("a file that is not UTF-8 made read_text raise")
def test_the_plan_command_exits_2_with_one_line_naming_the_field(data: bytes) -> None:
    status, out, err = plan_command(data)
    if status == 0:
        tried("plan command", "exit 0")
        assert err == ""
        json.loads(out)
        return
    tried("plan command", f"exit {status}")
    assert (status, out) == (2, ""), (status, out, err)
    assert err.startswith("mpsflow plan: ") and err.endswith("\n") and err.count("\n") == 1, err
