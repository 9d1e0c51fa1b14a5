"""Seeded `mpsflow plan` snapshots (docs/formats.md §1) with realistic GPU mixes, for the benchmarks.

`generate(seed, nodes, gpus_per_node, pods)` returns a snapshot dict; the same arguments always
give the same snapshot. What it contains:

* GPU models as GPU Feature Discovery names them, one model per node, in a fleet-like mix:
  A100-SXM4-40GB, A100-SXM4-80GB, H100-80GB-HBM3, L4 and T4, with the memory NVML reports.
* Existing slices on most GPUs: some used (a running pod holds them), some free, never more
  memory than the GPU has (GiB = memory_mib // 1024) and never more than 48 slices.
* Pending pods with a skewed size mix: many 1/2/4/5/10 GiB, fewer 20/40, a rare 80 (fits only
  an A100-80GB: an H100 has 79 GiB) and a few impossible ones (0 GiB, 100 GiB and more).
* Priorities mostly 0, some 10 and a few 100; creation times spread over a day.

`load` and `free_share` tune how full the GPUs already are, so that the quality benchmark can
build instances where not every pod fits and the planner's choices matter.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from events.vocabulary import DEFAULT_OPT_IN

OPT_IN_LABELS = {DEFAULT_OPT_IN.key: DEFAULT_OPT_IN.value}
MAX_SLICES = 48  # every model here is Volta or newer

# (GFD product name, memory_mib as NVML reports it, share of nodes)
GPU_MODELS: tuple[tuple[str, int, float], ...] = (
    ("NVIDIA-A100-SXM4-40GB", 40960, 0.25),
    ("NVIDIA-A100-SXM4-80GB", 81920, 0.25),
    ("NVIDIA-H100-80GB-HBM3", 81559, 0.20),
    ("NVIDIA-L4", 23034, 0.15),
    ("Tesla-T4", 15360, 0.15),
)

# Pending pod sizes (GiB) and their weights: skewed to small pods, with impossible sizes.
POD_SIZES: tuple[tuple[int, float], ...] = (
    (1, 12),
    (2, 14),
    (4, 14),
    (5, 18),
    (10, 20),
    (20, 9),
    (40, 5),
    (80, 1),
    (0, 1.5),
    (100, 1),
    (160, 0.5),
)

# Sizes of the slices that already exist (used by running pods, or free).
SLICE_SIZES: tuple[tuple[int, float], ...] = ((1, 8), (2, 12), (4, 14), (5, 18), (10, 22), (20, 10), (40, 4))

PRIORITIES: tuple[tuple[int, float], ...] = ((0, 75), (10, 18), (100, 7))
NAMESPACES = ("default", "team-a", "team-b", "research")
EPOCH = datetime(2026, 11, 22, tzinfo=UTC)


def _pick(rng: random.Random, table: tuple[tuple[int, float], ...]) -> int:
    values = [v for v, _ in table]
    weights = [w for _, w in table]
    return rng.choices(values, weights=weights)[0]


def _slices(rng: random.Random, capacity_gib: int, load: float, free_share: float) -> list[dict[str, Any]]:
    """Existing slices of one GPU: used ones up to a drawn load, then some free ones."""
    if rng.random() < 0.2:
        return []  # a GPU nobody partitioned yet
    used_target = capacity_gib * min(1.0, rng.uniform(0.5, 1.5) * load)
    free_target = capacity_gib * rng.uniform(0.0, 2 * free_share)
    slices: list[dict[str, Any]] = []
    total = 0
    for used, target in ((True, used_target), (False, used_target + free_target)):
        misses = 0
        while misses < 4 and len(slices) < MAX_SLICES:
            size = _pick(rng, SLICE_SIZES)
            if total + size > min(target, capacity_gib):
                misses += 1
                continue
            slices.append({"size_gb": size, "used": used})
            total += size
    rng.shuffle(slices)
    return slices


def generate(
    seed: int,
    nodes: int,
    gpus_per_node: int,
    pods: int,
    *,
    load: float = 0.45,
    free_share: float = 0.12,
) -> dict[str, Any]:
    """A snapshot dict in the contract format; deterministic for its arguments.

    `load` is the mean share of each GPU's memory held by used slices, `free_share` the mean
    share held by free slices on top of that.
    """
    rng = random.Random(seed)
    models = [m for m, _, _ in GPU_MODELS]
    memories = {m: mib for m, mib, _ in GPU_MODELS}
    shares = [s for _, _, s in GPU_MODELS]
    node_list: list[dict[str, Any]] = []
    for n in range(nodes):
        model = rng.choices(models, weights=shares)[0]
        memory_mib = memories[model]
        gpus = [
            {
                "index": index,
                "model": model,
                "memory_mib": memory_mib,
                "slices": _slices(rng, memory_mib // 1024, load, free_share),
            }
            for index in range(gpus_per_node)
        ]
        labels = {
            **OPT_IN_LABELS,
            "nvidia.com/gpu.product": model,
            "nvidia.com/gpu.memory": str(memory_mib),
            "nvidia.com/gpu.count": str(gpus_per_node),
        }
        node_list.append({"name": f"gpu-node-{n:04d}", "labels": labels, "gpus": gpus})
    pod_list: list[dict[str, Any]] = []
    for p in range(pods):
        created = EPOCH + timedelta(seconds=rng.randrange(86400))
        pod_list.append(
            {
                "namespace": rng.choice(NAMESPACES),
                "name": f"job-{p:05d}",
                "size_gb": _pick(rng, POD_SIZES),
                "priority": _pick(rng, PRIORITIES),
                "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    return {"nodes": node_list, "pending_pods": pod_list}


def dumps(snapshot: dict[str, Any]) -> str:
    return json.dumps(snapshot, separators=(",", ":")) + "\n"


def write_snapshot(path: Path | str, snapshot: dict[str, Any]) -> None:
    Path(path).write_text(dumps(snapshot), encoding="utf-8")
