"""Writes the large demo scenarios, `simulation/scenarios/scale-200.yaml` and `burst-500.yaml`.

    python -m benchmarks.scale_scenarios [--out DIR]

They are checked in; this is how they were made, and remakes them exactly (every random draw comes
from a generator seeded here). Both use a real cluster's timing (the kubelet's node status every
10 s, 50 ms of watch delay) and A100s of 80 GiB; their pods ask for 1 to 10 GiB, drawn uniformly.

- `scale-200`: 200 nodes of 8 GPUs; 2,000 pods arriving as a Poisson stream of 10 a second (about
  200 s), in four namespaces; 60 % of them run 30 to 120 s and then succeed (their slices are freed,
  and taken again or reclaimed for other sizes), the rest run to the end.
- `burst-500`: 50 nodes of 2 empty GPUs; 500 pods arriving within 2 s (uniformly), each running to
  the end: every pod fits (2,750 GiB asked on average of 8,000), so none needs a reclaim.

The files stay readable at this size with YAML anchors: the first node and the first pod of each
size are written out, every other refers to them (`<<: *p5` and a `metadata` of its own).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "simulation" / "scenarios"
OPT_IN = "{nos.nebuly.com/gpu-partitioning: mps}"
GPU = "{model: NVIDIA-A100-SXM4-80GB, memory_mib: 81920}"
SIZES = range(1, 11)
TIMING = "timing: {node_status_period_s: 10, watch_delay_s: 0.05}"


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    size_gb: int
    at: float
    runs_for: float | None


def _nodes(count: int, gpus: int, prefix: str) -> Iterator[str]:
    yield "nodes:"
    gpu_list = "[" + ", ".join([GPU] * gpus) + "]"
    for index in range(1, count + 1):
        name = f"{prefix}-{index:03d}"
        if index == 1:
            yield f"  - {{name: {name}, labels: &opt-in {OPT_IN}, gpus: &gpus {gpu_list}}}"
        else:
            yield f"  - {{name: {name}, labels: *opt-in, gpus: *gpus}}"


def _workload(pods: list[Pod]) -> Iterator[str]:
    yield "workload:"
    written: set[int] = set()
    for pod in sorted(pods, key=lambda p: (p.at, p.name)):
        timing = f"at: {pod.at:.3f}" + ("" if pod.runs_for is None else f", runs_for: {pod.runs_for:.1f}")
        metadata = f"metadata: {{name: {pod.name}, namespace: {pod.namespace}}}"
        if pod.size_gb not in written:
            written.add(pod.size_gb)
            limits = f"{{nvidia.com/gpu-{pod.size_gb}gb: 1}}"
            yield (
                f"  - {{{timing}, pod: &p{pod.size_gb} {{apiVersion: v1, kind: Pod, {metadata}, spec: "
                "{hostIPC: true, securityContext: {runAsUser: 1000}, containers: "
                f"[{{name: main, image: busybox, resources: {{limits: {limits}}}}}]}}}}}}"
            )
        else:
            yield f"  - {{{timing}, pod: {{<<: *p{pod.size_gb}, {metadata}}}}}"


def scale_200() -> str:
    draw = random.Random(200)
    pods, at = [], 0.0
    for index in range(2000):
        at += draw.expovariate(10.0)
        runs_for = round(draw.uniform(30, 120), 1) if draw.random() < 0.6 else None
        namespace = f"team-{'abcd'[index % 4]}"
        pods.append(Pod(f"job-{index:04d}", namespace, draw.choice(SIZES), round(at, 3), runs_for))
    return "\n".join(
        [
            "# 200 nodes of 8 A100-80GB, 2,000 pods of 1 to 10 GiB arriving at 10 a second (about 200 s),",
            "# 60 % of them finishing after 30 to 120 s; a real cluster's timing. `make scale-demo`",
            "# plays it.",
            "# Written by `python -m benchmarks.scale_scenarios`: remake it there, do not edit it here.",
            *_nodes(200, 8, "gpu"),
            TIMING,
            "timeout: 600",
            *_workload(pods),
        ]
    )


def burst_500() -> str:
    draw = random.Random(500)
    pods = [
        Pod(f"burst-{index:03d}", "burst", draw.choice(SIZES), round(draw.uniform(0, 2), 3), None)
        for index in range(500)
    ]
    return "\n".join(
        [
            "# 50 nodes of 2 empty A100-80GB, 500 pods of 1 to 10 GiB arriving within 2 s, all running to",
            "# the end: every pod fits without a reclaim. Goal: mpsflow's part p50 <= 0.3 s, p99 <= 1 s.",
            "# Written by `python -m benchmarks.scale_scenarios`: remake it there, do not edit it here.",
            *_nodes(50, 2, "node"),
            TIMING,
            "timeout: 180",
            *_workload(pods),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_scenarios")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write them (default {OUT})")
    args = parser.parse_args(argv)
    for name, text in (("scale-200", scale_200()), ("burst-500", burst_500())):
        (args.out / f"{name}.yaml").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
