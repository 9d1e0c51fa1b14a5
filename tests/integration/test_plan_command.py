"""`mpsflow plan` as a user runs it: a process, a snapshot in, a plan or one error line out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = {
    "nodes": [
        {
            "name": "a100-1",
            "labels": {"nos.nebuly.com/gpu-partitioning": "mps"},
            "gpus": [
                {
                    "index": 0,
                    "model": "NVIDIA-A100-SXM4-80GB",
                    "memory_mib": 81920,
                    "slices": [{"size_gb": 10, "used": True}, {"size_gb": 20, "used": False}],
                }
            ],
        },
        {"name": "cpu-1", "labels": {}, "gpus": []},
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
    ],
}


def plan(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "plan", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_contract_example_gives_the_contract_plan(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(json.dumps(EXAMPLE))
    finished = plan(str(snapshot))
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout) == {
        "nodes": {
            "a100-1": {
                "gpus": {
                    "0": [
                        {"size_gb": 10, "used": True},
                        {"size_gb": 20, "used": False},
                        {"size_gb": 10, "used": False},
                    ]
                }
            }
        },
        "placed": {"default/train-1": {"node": "a100-1", "gpu": 0, "size_gb": 10}},
        "unplaced": {"default/huge-1": "needs 200 GiB; the largest opted-in GPU has 80 GiB"},
    }
    assert finished.stderr == ""


def test_standard_input_and_repeated_runs_give_byte_identical_output(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(json.dumps(EXAMPLE))
    from_file = plan(str(snapshot)).stdout
    assert plan(stdin=json.dumps(EXAMPLE)).stdout == from_file
    assert plan("-", stdin=json.dumps(EXAMPLE)).stdout == from_file


@pytest.mark.parametrize(
    ("snapshot", "message"),
    [
        ("{not json", "snapshot: not JSON"),
        ("{}", "nodes: is required"),
        (
            json.dumps({"nodes": [{"name": "n", "gpus": [{"index": 0, "model": "m", "memory_mib": -1}]}]}),
            "nodes[0].gpus[0].memory_mib: must be a positive integer",
        ),
        (
            json.dumps(
                {
                    "nodes": [
                        {
                            "name": "n",
                            "gpus": [
                                {"index": 0, "model": "m", "memory_mib": 1},
                                {"index": 0, "model": "m", "memory_mib": 1},
                            ],
                        }
                    ]
                }
            ),
            "nodes[0].gpus[1].index: GPU index 0 appears twice in this node",
        ),
        (
            json.dumps({"nodes": [], "pending_pods": [{"namespace": "a", "name": "b", "size_gb": 1.5}]}),
            "pending_pods[0].size_gb: must be a whole number of zero or more",
        ),
    ],
)
def test_a_malformed_snapshot_exits_2_with_one_message_naming_the_field(snapshot: str, message: str) -> None:
    finished = plan(stdin=snapshot)
    assert finished.returncode == 2
    assert finished.stdout == ""
    assert finished.stderr.startswith(f"mpsflow plan: {message}")
    assert len(finished.stderr.strip().splitlines()) == 1


def test_a_missing_file_exits_2_naming_it(tmp_path: Path) -> None:
    finished = plan(str(tmp_path / "absent.json"))
    assert finished.returncode == 2
    assert "absent.json" in finished.stderr
