"""The node agent's functional core: desired config + current slices -> new slices or a refusal."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.nodes import GpuReport, NodeGpusReported, SliceState
from events.plans import NodeMpsConfig
from node_agent.gpus import GpuReading
from node_agent.reconcile import (
    Reconciled,
    Refused,
    SliceUsage,
    capacity_gb,
    gpu_report,
    observed_usage,
    reconcile,
)
from node_agent.slices import SliceDevice, parse_slice_device_id, slice_device_id

A100_40GB_MIB = 40960  # 40 GiB
H100_80GB_MIB = 81559  # 79 GiB: the nominal 80 GB is a little less than 80 GiB
P40_MIB = 24576  # 24 GiB, Pascal
V100_32GB_MIB = 32768


def gpu(
    index: int,
    memory_mib: int = A100_40GB_MIB,
    *,
    compute_capability: tuple[int, int] = (8, 0),
    mig_enabled: bool = False,
    model: str = "NVIDIA-A100-SXM4-40GB",
) -> GpuReading:
    return GpuReading(
        index=index,
        uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
        model=model,
        memory_total_mib=memory_mib,
        memory_used_mib=0,
        compute_capability=compute_capability,
        mig_enabled=mig_enabled,
        processes=(),
    )


def dev(on: GpuReading, size_gb: int, ordinal: int) -> SliceDevice:
    return SliceDevice(
        id=slice_device_id(on.index, size_gb, ordinal),
        gpu_index=on.index,
        gpu_uuid=on.uuid,
        size_gb=size_gb,
        gpu_memory_mib=on.memory_total_mib,
    )


def config(gpus: dict[int, tuple[int, ...]], plan_id: str = "plan-1") -> NodeMpsConfig:
    return NodeMpsConfig(node="node-a", plan_id=plan_id, plan_sequence=1, gpus=gpus)


def ids(outcome: Reconciled | Refused) -> list[str]:
    assert isinstance(outcome, Reconciled), outcome
    return [device.id for device in outcome.devices]


GPU0 = gpu(0)
GPU1 = gpu(1, H100_80GB_MIB, compute_capability=(9, 0), model="NVIDIA-H100-80GB-HBM3")


# Table tests: slice IDs.


def test_new_slices_get_ids_ordered_by_gpu_size_and_ordinal() -> None:
    outcome = reconcile([GPU1, GPU0], [], set(), config({1: (20,), 0: (20, 10, 10)}))

    assert ids(outcome) == ["mps-g0-10gb-0", "mps-g0-10gb-1", "mps-g0-20gb-0", "mps-g1-20gb-0"]
    assert isinstance(outcome, Reconciled)
    assert outcome.devices[3] == dev(GPU1, 20, 0)
    assert outcome.devices[3].gpu_memory_mib == H100_80GB_MIB


def test_a_surviving_slice_keeps_its_id_and_new_ones_do_not_reuse_existing_ordinals() -> None:
    current = [dev(GPU0, 10, 0), dev(GPU0, 10, 3)]

    outcome = reconcile([GPU0], current, set(), config({0: (10, 10, 10)}))

    assert ids(outcome) == ["mps-g0-10gb-0", "mps-g0-10gb-3", "mps-g0-10gb-4"]


def test_a_kept_slice_is_the_same_device_object() -> None:
    kept = dev(GPU0, 10, 2)

    outcome = reconcile([GPU0], [kept], set(), config({0: (10, 20)}))

    assert isinstance(outcome, Reconciled)
    assert outcome.devices[0] is kept


def test_the_id_of_a_dropped_free_slice_can_come_back_later() -> None:
    # Free slices of a size are reused before new ones are made, so an ID is never dropped and
    # created in the same step; once gone (and held by nobody) its ordinal is free again.
    current = [dev(GPU0, 10, 0), dev(GPU0, 10, 1), dev(GPU0, 20, 0)]
    shrunk = reconcile([GPU0], current, set(), config({0: (10,)}))
    assert isinstance(shrunk, Reconciled)

    grown = reconcile([GPU0], shrunk.devices, set(), config({0: (10, 10)}))

    assert ids(shrunk) == ["mps-g0-10gb-0"]
    assert ids(grown) == ["mps-g0-10gb-0", "mps-g0-10gb-1"]


def test_shrinking_keeps_the_lowest_free_ordinals() -> None:
    current = [dev(GPU0, 10, 0), dev(GPU0, 10, 1), dev(GPU0, 10, 2), dev(GPU0, 10, 3)]

    outcome = reconcile([GPU0], current, {"mps-g0-10gb-2"}, config({0: (10, 10)}))

    assert ids(outcome) == ["mps-g0-10gb-0", "mps-g0-10gb-2"]


def test_a_size_change_replaces_free_slices() -> None:
    current = [dev(GPU0, 10, 0), dev(GPU0, 10, 1)]

    outcome = reconcile([GPU0], current, set(), config({0: (20, 20)}))

    assert ids(outcome) == ["mps-g0-20gb-0", "mps-g0-20gb-1"]


def test_an_empty_desired_list_drops_every_free_slice() -> None:
    current = [dev(GPU0, 10, 0), dev(GPU0, 10, 1)]

    assert ids(reconcile([GPU0], current, set(), config({0: ()}))) == []


# Table tests: slices in use.


def test_an_in_use_slice_counts_toward_the_desired_slices() -> None:
    current = [dev(GPU0, 10, 0), dev(GPU0, 10, 1)]

    outcome = reconcile([GPU0], current, {"mps-g0-10gb-1"}, config({0: (10,)}))

    assert ids(outcome) == ["mps-g0-10gb-1"]


def test_an_in_use_slice_the_config_omits_is_kept() -> None:
    current = [dev(GPU0, 10, 0), dev(GPU0, 10, 1)]

    outcome = reconcile([GPU0], current, {"mps-g0-10gb-1"}, config({0: (20,)}))

    assert ids(outcome) == ["mps-g0-10gb-1", "mps-g0-20gb-0"]


def test_an_in_use_slice_survives_an_empty_desired_list() -> None:
    current = [dev(GPU0, 10, 0), dev(GPU0, 20, 0)]

    outcome = reconcile([GPU0], current, {"mps-g0-20gb-0"}, config({0: ()}))

    assert ids(outcome) == ["mps-g0-20gb-0"]


def test_keeping_an_omitted_in_use_slice_that_overflows_the_gpu_is_refused() -> None:
    current = [dev(GPU0, 10, 0)]

    outcome = reconcile([GPU0], current, {"mps-g0-10gb-0"}, config({0: (20, 20)}))

    assert outcome == Refused(
        "GPU 0: slices would add up to 50 GiB (10 GiB of them held by running containers) "
        "but the GPU has 40 GiB"
    )


def test_in_use_ids_of_other_nodes_or_unknown_slices_change_nothing() -> None:
    current = [dev(GPU0, 10, 0)]

    outcome = reconcile([GPU0], current, {"mps-g7-10gb-0", "something-else"}, config({0: (20,)}))

    assert ids(outcome) == ["mps-g0-20gb-0"]


def test_a_held_slice_the_agent_does_not_know_yet_is_adopted() -> None:
    # After an agent restart `current` is empty but the kubelet still lists the held slice.
    outcome = reconcile([GPU0], [], {"mps-g0-10gb-3"}, config({0: (10, 20)}))

    assert ids(outcome) == ["mps-g0-10gb-3", "mps-g0-20gb-0"]


# Table tests: GPUs the config leaves out.


def test_gpus_absent_from_the_config_keep_their_slices() -> None:
    current = [dev(GPU0, 10, 0), dev(GPU1, 20, 0), dev(GPU1, 20, 1)]

    outcome = reconcile([GPU0, GPU1], current, set(), config({0: (10, 10)}))

    assert ids(outcome) == ["mps-g0-10gb-0", "mps-g0-10gb-1", "mps-g1-20gb-0", "mps-g1-20gb-1"]


def test_an_empty_config_changes_nothing() -> None:
    current = [dev(GPU1, 20, 1), dev(GPU0, 10, 0)]

    outcome = reconcile([GPU0, GPU1], current, {"mps-g0-10gb-0"}, config({}))

    assert ids(outcome) == ["mps-g0-10gb-0", "mps-g1-20gb-1"]


# Table tests: refusals.


@pytest.mark.parametrize(
    ("gpus", "desired", "reason"),
    [
        pytest.param(
            [GPU0, GPU1],
            {3: (10,), 2: (10,)},
            "GPU 2 does not exist on this node (it has GPU 0, 1)",
            id="unknown-gpu",
        ),
        pytest.param(
            [], {0: (10,)}, "GPU 0 does not exist on this node (it has GPU none)", id="node-without-gpus"
        ),
        pytest.param(
            [GPU0],
            {0: (20, 21)},
            "GPU 0: slices would add up to 41 GiB but the GPU has 40 GiB",
            id="over-capacity",
        ),
        pytest.param(
            [GPU0, GPU1],
            {1: (80,)},
            "GPU 1: slices would add up to 80 GiB but the GPU has 79 GiB",
            id="nominal-80gb-is-79gib",
        ),
        pytest.param(
            [GPU1],
            {1: (1,) * 49},
            "GPU 1: 49 slices, more than the 48 MPS clients a GPU of this generation allows",
            id="too-many-clients-volta-and-later",
        ),
        pytest.param(
            [gpu(0, P40_MIB, compute_capability=(6, 1))],
            {0: (1,) * 17},
            "GPU 0: 17 slices, more than the 16 MPS clients a GPU of this generation allows",
            id="too-many-clients-before-volta",
        ),
        pytest.param(
            [gpu(0, mig_enabled=True)],
            {0: (10,)},
            "GPU 0 is in MIG mode; mpsflow leaves MIG GPUs alone",
            id="mig",
        ),
        pytest.param(
            [GPU0],
            {0: (10, -1)},
            "GPU 0: slice sizes must be positive, got [-1, 10]",
            id="negative-size",
        ),
        pytest.param([GPU0], {0: (0,)}, "GPU 0: slice sizes must be positive, got [0]", id="zero-size"),
        pytest.param(
            [GPU0, GPU1],
            {0: (10,), 1: (40, 40)},
            "GPU 1: slices would add up to 80 GiB but the GPU has 79 GiB",
            id="one-bad-gpu-refuses-all",
        ),
    ],
)
def test_refusals(gpus: list[GpuReading], desired: dict[int, tuple[int, ...]], reason: str) -> None:
    assert reconcile(gpus, [], set(), config(desired)) == Refused(reason)


@pytest.mark.parametrize(
    ("reading", "desired"),
    [
        pytest.param(GPU0, (20, 20), id="exactly-the-capacity"),
        pytest.param(GPU1, (1,) * 48, id="exactly-48-clients"),
        pytest.param(gpu(0, P40_MIB, compute_capability=(6, 1)), (1,) * 16, id="exactly-16-clients"),
        pytest.param(gpu(0, mig_enabled=True), (), id="mig-gpu-without-slices"),
    ],
)
def test_limits_are_inclusive(reading: GpuReading, desired: tuple[int, ...]) -> None:
    outcome = reconcile([reading], [], set(), config({reading.index: desired}))

    assert isinstance(outcome, Reconciled)
    assert len(outcome.devices) == len(desired)


@pytest.mark.parametrize(
    ("compute_capability", "clients"),
    [((6, 1), 16), ((6, 2), 16), ((7, 0), 48), ((7, 5), 48), ((8, 0), 48), ((9, 0), 48)],
)
def test_mps_client_limit_by_generation(compute_capability: tuple[int, int], clients: int) -> None:
    assert gpu(0, V100_32GB_MIB, compute_capability=compute_capability).max_mps_clients == clients


def test_capacity_is_whole_gib() -> None:
    assert capacity_gb(GPU0) == 40
    assert capacity_gb(GPU1) == 79
    assert capacity_gb(gpu(0, 1023)) == 0


def test_capacity_is_checked_before_the_client_limit() -> None:
    p40 = gpu(0, P40_MIB, compute_capability=(6, 1))

    outcome = reconcile([p40], [], set(), config({0: (1,) * 25}))

    assert outcome == Refused("GPU 0: slices would add up to 25 GiB but the GPU has 24 GiB")


def test_a_refusal_on_a_later_gpu_leaves_nothing_half_applied() -> None:
    current = [dev(GPU0, 10, 0)]

    outcome = reconcile([GPU0, GPU1], current, set(), config({0: (20,), 1: (100,)}))

    assert isinstance(outcome, Refused)
    assert "GPU 1" in outcome.reason


# gpu_report.


def test_gpu_report_marks_exactly_the_in_use_slices_their_holders_listing_and_daemon_health() -> None:
    mig_gpu = gpu(2, mig_enabled=True)
    devices = [dev(GPU0, 10, 0), dev(GPU0, 10, 1), dev(GPU1, 20, 0)]
    usage = SliceUsage(
        in_use=frozenset({"mps-g0-10gb-1", "mps-g1-20gb-0", "mps-g5-10gb-0"}),
        holders={"mps-g0-10gb-1": "ml/train", "mps-g5-10gb-0": "ml/gone"},
        listed=frozenset({"mps-g0-10gb-1", "mps-g1-20gb-0"}),
    )

    report = gpu_report("node-a", [mig_gpu, GPU1, GPU0], devices, usage, {0: True, 1: False}, "plan-7")

    assert report == NodeGpusReported(
        node="node-a",
        applied_plan_id="plan-7",
        gpus=(
            GpuReport(
                index=0,
                uuid=GPU0.uuid,
                model="NVIDIA-A100-SXM4-40GB",
                memory_mib=A100_40GB_MIB,
                compute_capability=(8, 0),
                mig_enabled=False,
                daemon_healthy=True,
                slices=(
                    SliceState(id="mps-g0-10gb-0", size_gb=10, used=False, listed_by_kubelet=False),
                    SliceState(id="mps-g0-10gb-1", size_gb=10, used=True, holder="ml/train"),
                ),
            ),
            GpuReport(
                index=1,
                uuid=GPU1.uuid,
                model="NVIDIA-H100-80GB-HBM3",
                memory_mib=H100_80GB_MIB,
                compute_capability=(9, 0),
                mig_enabled=False,
                daemon_healthy=False,
                slices=(SliceState(id="mps-g1-20gb-0", size_gb=20, used=True),),
            ),
            GpuReport(
                index=2,
                uuid=mig_gpu.uuid,
                model="NVIDIA-A100-SXM4-40GB",
                memory_mib=A100_40GB_MIB,
                compute_capability=(8, 0),
                mig_enabled=True,
                daemon_healthy=False,  # no daemon was started for it
                slices=(),
            ),
        ),
    )


def test_gpu_report_before_any_config() -> None:
    report = gpu_report("node-a", [GPU0], [], SliceUsage(), {0: True}, None)

    assert report.applied_plan_id is None
    assert report.gpus[0].slices == ()
    assert report.gpus[0].daemon_healthy


# Properties.

_MEMORIES = (16384, 24576, 32768, 40960, 81559)
_SIZES = st.integers(min_value=1, max_value=24)


@dataclass(frozen=True)
class Scenario:
    gpus: list[GpuReading]
    current: list[SliceDevice]
    in_use: frozenset[str]
    desired: NodeMpsConfig


@st.composite
def gpu_readings(draw: st.DrawFn) -> list[GpuReading]:
    count = draw(st.integers(min_value=1, max_value=3))
    readings = []
    for index in range(count):
        memory = draw(st.sampled_from(_MEMORIES))
        compute_capability = draw(st.sampled_from([(6, 1), (7, 0), (8, 0), (9, 0)]))
        mig_enabled = compute_capability in {(8, 0), (9, 0)} and draw(st.integers(0, 9)) == 0
        readings.append(gpu(index, memory, compute_capability=compute_capability, mig_enabled=mig_enabled))
    return readings


@st.composite
def current_slices(draw: st.DrawFn, reading: GpuReading) -> list[SliceDevice]:
    """Slices that fit the GPU, with gaps in the ordinals as past reconfigurations leave them."""
    if reading.mig_enabled:
        return []
    devices: list[SliceDevice] = []
    budget = capacity_gb(reading)
    for size in draw(st.lists(_SIZES, max_size=8)):
        if size > budget or len(devices) >= reading.max_mps_clients:
            continue
        budget -= size
        taken = {d.ordinal for d in devices if d.size_gb == size}
        ordinal = draw(st.sampled_from([o for o in range(8) if o not in taken]))
        devices.append(dev(reading, size, ordinal))
    return devices


@st.composite
def scenarios(draw: st.DrawFn, *, fitting: bool = False, nothing_in_use: bool = False) -> Scenario:
    readings = draw(gpu_readings())
    current = [device for reading in readings for device in draw(current_slices(reading))]
    in_use: frozenset[str] = frozenset()
    if not nothing_in_use and current:
        in_use = frozenset(draw(st.sets(st.sampled_from([d.id for d in current]))))
    desired: dict[int, tuple[int, ...]] = {}
    for reading in draw(st.sets(st.sampled_from(readings))):
        if fitting:
            if reading.mig_enabled:
                desired[reading.index] = ()
                continue
            held = [d for d in current if d.gpu_index == reading.index and d.id in in_use]
            room = capacity_gb(reading) - sum(d.size_gb for d in held)
            sizes: list[int] = []
            for size in draw(st.lists(_SIZES, max_size=10)):
                if size <= room and len(held) + len(sizes) < reading.max_mps_clients:
                    sizes.append(size)
                    room -= size
            desired[reading.index] = tuple(sizes)
        else:
            desired[reading.index] = tuple(draw(st.lists(_SIZES, max_size=12)))
    return Scenario(readings, current, in_use, config(desired))


def _expected_sizes(scenario: Scenario, reading: GpuReading) -> Counter[int]:
    """Per size, the larger of what the config wants and what containers hold."""
    held = Counter(
        d.size_gb for d in scenario.current if d.gpu_index == reading.index and d.id in scenario.in_use
    )
    return Counter(scenario.desired.gpus[reading.index]) | held


def _on(devices: Sequence[SliceDevice], reading: GpuReading) -> list[SliceDevice]:
    return [d for d in devices if d.gpu_index == reading.index]


def _reconciled(scenario: Scenario, in_use: Collection[str] | None = None) -> Reconciled | Refused:
    return reconcile(
        scenario.gpus,
        scenario.current,
        scenario.in_use if in_use is None else in_use,
        scenario.desired,
    )


@given(scenarios(fitting=True, nothing_in_use=True))
def test_a_fitting_config_gives_exactly_the_desired_sizes(scenario: Scenario) -> None:
    outcome = _reconciled(scenario)

    assert isinstance(outcome, Reconciled), outcome
    for reading in scenario.gpus:
        if reading.index in scenario.desired.gpus:
            sizes = sorted(d.size_gb for d in _on(outcome.devices, reading))
            assert sizes == sorted(scenario.desired.gpus[reading.index])


@given(scenarios(fitting=True))
def test_a_fitting_config_is_applied_and_in_use_slices_survive(scenario: Scenario) -> None:
    outcome = _reconciled(scenario)

    assert isinstance(outcome, Reconciled), outcome
    result_ids = {d.id for d in outcome.devices}
    assert scenario.in_use <= result_ids
    for reading in scenario.gpus:
        if reading.index in scenario.desired.gpus:
            sizes = Counter(d.size_gb for d in _on(outcome.devices, reading))
            assert sizes == _expected_sizes(scenario, reading)


@given(scenarios())
def test_result_invariants(scenario: Scenario) -> None:
    outcome = _reconciled(scenario)
    if isinstance(outcome, Refused):
        return
    devices = outcome.devices
    current_ids = {d.id for d in scenario.current}
    by_index = {reading.index: reading for reading in scenario.gpus}

    assert len({d.id for d in devices}) == len(devices), "IDs must be unique"
    assert scenario.in_use <= {d.id for d in devices}, "an in-use slice was dropped"
    assert list(devices) == sorted(devices, key=lambda d: (d.gpu_index, d.size_gb, d.ordinal))
    for device in devices:
        reading = by_index[device.gpu_index]
        assert (device.gpu_uuid, device.gpu_memory_mib) == (reading.uuid, reading.memory_total_mib)
        assert parse_slice_device_id(device.id) == (device.gpu_index, device.size_gb, device.ordinal)
    for reading in scenario.gpus:
        on_gpu = _on(devices, reading)
        assert sum(d.size_gb for d in on_gpu) <= capacity_gb(reading)
        assert len(on_gpu) <= reading.max_mps_clients
        assert not (reading.mig_enabled and on_gpu)
        before = _on(scenario.current, reading)
        if reading.index not in scenario.desired.gpus:
            assert on_gpu == sorted(before, key=lambda d: (d.size_gb, d.ordinal))
            continue
        for size in {d.size_gb for d in on_gpu}:
            old = [d for d in before if d.size_gb == size]
            now = [d for d in on_gpu if d.size_gb == size]
            survivors = [d for d in now if d.id in current_ids]
            fresh = [d for d in now if d.id not in current_ids]
            # As many existing slices as possible survive, and new ones take ordinals above them all.
            assert len(survivors) == min(len(old), len(now))
            top = max((d.ordinal for d in old), default=-1)
            assert all(d.ordinal > top for d in fresh)


@given(scenarios())
def test_refused_exactly_when_the_config_cannot_fit(scenario: Scenario) -> None:
    outcome = _reconciled(scenario)

    must_refuse = False
    for reading in scenario.gpus:
        if reading.index not in scenario.desired.gpus:
            continue
        wanted = scenario.desired.gpus[reading.index]
        sizes = _expected_sizes(scenario, reading)
        total = sum(size * count for size, count in sizes.items())
        if (
            (reading.mig_enabled and wanted)
            or total > capacity_gb(reading)
            or sizes.total() > reading.max_mps_clients
        ):
            must_refuse = True
    assert isinstance(outcome, Refused) == must_refuse, outcome


@given(scenarios())
def test_reconcile_is_idempotent(scenario: Scenario) -> None:
    first = _reconciled(scenario)
    if isinstance(first, Refused):
        return

    again = reconcile(scenario.gpus, first.devices, scenario.in_use, scenario.desired)

    assert again == first


@given(scenarios(fitting=True), st.data())
def test_releasing_slices_never_makes_a_fitting_config_refused(
    scenario: Scenario, data: st.DataObject
) -> None:
    fewer = data.draw(
        st.sets(st.sampled_from(sorted(scenario.in_use))) if scenario.in_use else st.just(set())
    )

    assert isinstance(_reconciled(scenario, in_use=fewer), Reconciled)


# --- observed_usage: what the slices are doing, from the plugin's and the kubelet's word ----------------

GRACE = {"allocation_grace": 30.0, "listing_grace": 2.0}


@pytest.mark.parametrize(
    ("allocations", "held", "seen_held_at", "in_use"),
    [
        # The kubelet names the holder: in use, whatever the plugin remembers.
        ({}, {"s1": "ml/a"}, {}, {"s1"}),
        # Just allocated, the kubelet names no holder yet (the container does not exist yet): in use.
        ({"s1": 95.0}, {}, {}, {"s1"}),
        # Allocated longer ago than the grace and never named: the container never came; free.
        ({"s1": 60.0}, {}, {}, set()),
        # Named after its allocation, and no longer held: the container ended; free at once.
        ({"s1": 95.0}, {}, {"s1": 97.0}, set()),
        # Named before a newer allocation (a new container got it): in use again.
        ({"s1": 98.0}, {}, {"s1": 97.0}, {"s1"}),
    ],
)
def test_a_slice_is_in_use_while_held_or_just_allocated(
    allocations: dict[str, float], held: dict[str, str], seen_held_at: dict[str, float], in_use: set[str]
) -> None:
    usage = observed_usage(
        allocations=allocations,
        offered=frozenset({"s1", "s2"}),
        held=held,
        listed=frozenset({"s1", "s2"}),
        seen_held_at=seen_held_at,
        offered_at={},
        now=100.0,
        **GRACE,
    )
    assert usage.in_use == in_use
    assert usage.holders == held


@pytest.mark.parametrize(
    ("listed", "offered_at", "expected"),
    [
        # The kubelet lists its devices: only offered ones it lists count.
        (frozenset({"s1", "gone"}), {}, {"s1"}),
        # An old kubelet lists nothing: offered long enough counts, just offered does not.
        (None, {"s1": 90.0, "s2": 99.5}, {"s1"}),
        (None, {"s1": 98.0, "s2": 98.0}, {"s1", "s2"}),
    ],
)
def test_a_slice_is_listed_when_the_kubelet_lists_it_or_has_had_time_to(
    listed: frozenset[str] | None, offered_at: dict[str, float], expected: set[str]
) -> None:
    usage = observed_usage(
        allocations={},
        offered=frozenset({"s1", "s2"}),
        held={},
        listed=listed,
        seen_held_at={},
        offered_at=offered_at,
        now=100.0,
        **GRACE,
    )
    assert usage.listed == expected


DEVICES = st.sampled_from(["s1", "s2", "s3", "s4"])
TIMES = st.floats(min_value=0, max_value=200, allow_nan=False)


@given(
    allocations=st.dictionaries(DEVICES, TIMES),
    offered=st.frozensets(DEVICES),
    held=st.dictionaries(DEVICES, st.sampled_from(["ml/a", "ml/b"])),
    listed=st.none() | st.frozensets(DEVICES),
    seen_held_at=st.dictionaries(DEVICES, TIMES),
    offered_at=st.dictionaries(DEVICES, TIMES),
    now=TIMES,
)
def test_what_the_kubelet_holds_is_in_use_and_only_offered_slices_are_listed(
    allocations: dict[str, float],
    offered: frozenset[str],
    held: dict[str, str],
    listed: frozenset[str] | None,
    seen_held_at: dict[str, float],
    offered_at: dict[str, float],
    now: float,
) -> None:
    usage = observed_usage(
        allocations=allocations,
        offered=offered,
        held=held,
        listed=listed,
        seen_held_at=seen_held_at,
        offered_at=offered_at,
        now=now,
        **GRACE,
    )
    assert set(held) <= usage.in_use <= set(held) | set(allocations)
    assert usage.listed <= offered


@pytest.mark.parametrize(
    ("memory_mib", "reserve_mib", "capacity"),
    [(A100_40GB_MIB, 0, 40), (A100_40GB_MIB, 1, 39), (A100_40GB_MIB, 1024, 39), (H100_80GB_MIB, 1024, 78)],
)
def test_the_reserve_is_kept_back_before_whole_gib_are_counted(
    memory_mib: int, reserve_mib: int, capacity: int
) -> None:
    assert capacity_gb(gpu(0, memory_mib), reserve_mib) == capacity


def test_slices_that_would_eat_into_the_reserve_are_refused_saying_so() -> None:
    assert isinstance(reconcile([GPU0], [], set(), config({0: (39,)}), reserve_mib=1024), Reconciled)
    assert reconcile([GPU0], [], set(), config({0: (40,)}), reserve_mib=1024) == Refused(
        "GPU 0: slices would add up to 40 GiB but the GPU has 39 GiB once 1024 MiB are kept back for MPS"
    )


def test_the_report_tells_the_reserve_of_every_gpu() -> None:
    report = gpu_report("node-a", [GPU0, GPU1], [], SliceUsage(), {0: True, 1: True}, None, reserve_mib=512)
    assert [g.reserved_mib for g in report.gpus] == [512, 512]


def test_the_report_tells_the_nodes_ipc_mode() -> None:
    usage, health = SliceUsage(), {0: True}
    assert gpu_report("node-a", [GPU0], [], usage, health, None).mps_ipc == "host"
    assert (
        gpu_report("node-a", [GPU0], [], usage, health, None, mps_ipc="shm-directory").mps_ipc
        == "shm-directory"
    )
