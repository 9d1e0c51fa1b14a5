"""`node_agent.health`: which GPUs can serve slices and what the kubelet is told of each slice."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node_agent.health import APPLICATION_XIDS, GpuHealth, XidPolicy, gpu_health, with_health
from node_agent.slices import SliceDevice, slice_device_id


def device(gpu: int, size_gb: int, ordinal: int, *, healthy: bool = True) -> SliceDevice:
    return SliceDevice(
        id=slice_device_id(gpu, size_gb, ordinal),
        gpu_index=gpu,
        gpu_uuid=f"GPU-{gpu}",
        size_gb=size_gb,
        gpu_memory_mib=40960,
        healthy=healthy,
    )


@pytest.mark.parametrize(
    ("setting", "xid", "fault"),
    [
        ("", 79, "Xid 79 (the GPU has fallen off the bus) reported by the driver"),
        ("", 48, "Xid 48 (double-bit ECC error) reported by the driver"),
        ("", 154, "Xid 154 reported by the driver"),
        ("", 31, None),  # an application's memory page fault
        ("", 13, None),
        ("48, 79", 79, None),
        ("48,79", 94, "Xid 94 (contained ECC error) reported by the driver"),
        ("all", 79, None),
        ("ALL", 48, None),
    ],
)
def test_which_xids_take_a_gpu_out(setting: str, xid: int, fault: str | None) -> None:
    assert XidPolicy.parse(setting).fault(xid) == fault


@pytest.mark.parametrize("setting", ["4a", "79;48", "-1", "xid79"])
def test_a_setting_that_is_not_a_list_of_xids_is_refused_naming_the_part(setting: str) -> None:
    with pytest.raises(ValueError, match="is not an Xid"):
        XidPolicy.parse(setting)


def test_application_xids_never_take_a_gpu_out_whatever_else_is_ignored() -> None:
    policy = XidPolicy.parse("79")
    assert all(policy.fault(xid) is None for xid in APPLICATION_XIDS | {79})


def test_a_gpu_is_healthy_when_its_daemon_answers_and_it_has_no_fault() -> None:
    health = gpu_health([0, 1, 2, 3], {0: True, 1: False, 3: True}, {3: "Xid 79"})
    assert {index: (h.healthy, h.problem) for index, h in health.items()} == {
        0: (True, None),
        1: (False, "its MPS control daemon does not answer"),
        2: (False, "its MPS control daemon does not answer"),  # never read: not known to answer
        3: (False, "Xid 79"),
    }


def test_on_an_unhealthy_gpu_a_slice_turns_unhealthy_when_its_container_ends_and_no_other() -> None:
    devices = (device(0, 10, 0), device(0, 10, 1), device(1, 10, 0))
    health = {0: GpuHealth(daemon_answers=True, fault="Xid 79"), 1: GpuHealth(daemon_answers=True)}
    # Held or free, nothing changes when the GPU fails: the planner withdraws what it may.
    assert with_health(devices, set(), health) == devices
    # The holder of mps-g0-10gb-0 and of mps-g1-10gb-0 end: only the one on the failed GPU is marked.
    marked = with_health(devices, {"mps-g0-10gb-0", "mps-g1-10gb-0"}, health)
    assert [(d.id, d.healthy) for d in marked] == [
        ("mps-g0-10gb-0", False),
        ("mps-g0-10gb-1", True),
        ("mps-g1-10gb-0", True),
    ]
    assert [d.healthy for d in with_health(marked, set(), health)] == [False, True, True]  # it stays
    recovered = {0: GpuHealth(daemon_answers=True), 1: GpuHealth(daemon_answers=True)}
    assert all(d.healthy for d in with_health(marked, set(), recovered))


@given(
    st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), max_size=12),
    st.dictionaries(st.integers(0, 3), st.booleans()),
    st.dictionaries(st.integers(0, 3), st.just("Xid 79")),
)
def test_health_marks_change_nothing_a_scheduler_or_kubelet_counts_on(
    slices: list[tuple[int, bool, bool]], answers: dict[int, bool], faults: dict[int, str]
) -> None:
    """Whatever the GPUs' health: the same devices come back in the same order; on a healthy GPU
    every slice is Healthy; otherwise a slice goes from Healthy to Unhealthy only as its container
    ends (so no pod's room shrinks), and never the other way."""
    devices = tuple(
        device(gpu, 10, ordinal, healthy=was_healthy) for ordinal, (gpu, was_healthy, _) in enumerate(slices)
    )
    freed = {d.id for d, (_, _, just_freed) in zip(devices, slices, strict=True) if just_freed}
    health = gpu_health(range(4), answers, faults)
    marked = with_health(devices, freed, health)
    assert [d.id for d in marked] == [d.id for d in devices]
    for before, after in zip(devices, marked, strict=True):
        if health[before.gpu_index].healthy:
            assert after.healthy
        elif before.healthy and after.healthy != before.healthy:
            assert before.id in freed
        else:
            assert after.healthy == before.healthy
