"""Every event kind survives model -> bytes -> model; subjects encode names reversibly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events import subjects
from events.envelope import Envelope, Event, UndecodableMessageError, content_id, decode, encode
from events.nodes import (
    GfdFacts,
    GpuReport,
    NodeGpusReported,
    NodeObserved,
    NodeOptedOut,
    SliceOverused,
    SliceState,
)
from events.plans import (
    NodeConfigApplied,
    NodeConfigFailed,
    NodeConfigPublished,
    NodeLayout,
    NodePlanned,
    Placement,
    PlanComputed,
    SliceSpec,
)
from events.pods import PodDeleted, PodObserved, PodRejected, PodReleased, PodUnplaced

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)

EVERY_KIND: list[Event] = [
    PodObserved(
        namespace="ml",
        name="train-1",
        uid="u1",
        resource_version="42",
        size_gb=10,
        priority=5,
        created=T0,
        phase="Running",
        node="a100-1.example.com",
    ),
    PodObserved(
        namespace="ml",
        name="tune-1",
        uid="u4",
        resource_version="44",
        size_gb=20,
        created=T0,
        phase="Pending",
        released_to="a100-1.example.com",
    ),
    PodRejected(
        namespace="ml",
        name="bad",
        uid="u2",
        resource_version="43",
        reason="SliceSizeZero",
        message="nvidia.com/gpu-0gb asks for 0 GiB",
    ),
    PodDeleted(namespace="ml", name="train-1", uid="u1"),
    PodReleased(namespace="ml", name="tune-1", uid="u4", node="a100-1.example.com", size_gb=20, plan_id="p1"),
    PodUnplaced(
        namespace="ml", name="huge", uid="u3", reason="needs 200 GiB; the largest opted-in GPU has 80 GiB"
    ),
    NodeObserved(name="a100-1", gfd=GfdFacts(product="NVIDIA-A100-SXM4-80GB", count=2, memory_mib=81920)),
    NodeObserved(name="bare", gfd_problem="label nvidia.com/gpu.memory is missing"),
    NodeOptedOut(name="a100-1", reason="label removed"),
    NodeGpusReported(
        node="a100-1",
        applied_plan_id="p1",
        gpus=(
            GpuReport(
                index=0,
                uuid="GPU-1",
                model="A100",
                memory_mib=81920,
                compute_capability=(8, 0),
                slices=(
                    SliceState(id="mps-g0-10gb-0", size_gb=10, used=True, holder="ml/train-1"),
                    SliceState(id="mps-g0-20gb-0", size_gb=20, used=False, listed_by_kubelet=False),
                ),
            ),
        ),
    ),
    SliceOverused(
        node="a100-1",
        namespace="ml",
        name="train-1",
        slice_id="mps-g0-10gb-0",
        gpu_index=0,
        size_gb=10,
        used_mib=11000,
        pids=(4242,),
    ),
    PlanComputed(
        plan_id="p1",
        nodes={"a100-1": NodeLayout(gpus={0: (SliceSpec(size_gb=10, used=True),)})},
        placed={"ml/train-2": Placement(node="a100-1", gpu=0, size_gb=10)},
        unplaced={"ml/huge": "too big"},
        excluded_nodes={"broken": "impossible"},
    ),
    NodePlanned(
        node="a100-1", plan_id="p1", layout=NodeLayout(gpus={0: (SliceSpec(size_gb=10, used=True),)})
    ),
    NodeConfigPublished(node="a100-1", plan_id="p1", revision=3),
    NodeConfigApplied(node="a100-1", plan_id="p1", gpus={0: (10, 20)}),
    NodeConfigFailed(node="a100-1", plan_id="p1", reason="GPU 3 does not exist", gpus={3: (10,)}),
]


@pytest.mark.parametrize("event", EVERY_KIND, ids=lambda e: e.kind)
def test_every_event_kind_round_trips_through_bytes(event: Event) -> None:
    envelope = Envelope(id="e1", time=T0, source="tests", event=event)
    assert decode(encode(envelope)) == envelope


def test_every_kind_in_the_union_is_covered() -> None:
    covered = {event.kind for event in EVERY_KIND}
    union = set(Envelope.model_fields["event"].annotation.__args__)  # type: ignore[union-attr]
    assert covered == {model.model_fields["kind"].default for model in union}


def test_times_are_normalised_to_utc_and_naive_times_refused() -> None:
    local = datetime(2026, 11, 22, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    envelope = Envelope(id="e", time=local, source="s", event=PodDeleted(namespace="a", name="b", uid="c"))
    assert envelope.time == T0 and envelope.time.tzinfo == UTC
    with pytest.raises(ValueError, match="time zone"):
        Envelope(
            id="e", time=datetime(2026, 1, 1), source="s", event=PodDeleted(namespace="a", name="b", uid="c")
        )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"not json", "(message)"),
        (b'{"id": "x", "time": "2026-11-22T10:00:00Z", "source": "s", "event": {"kind": "Nope"}}', "event"),
        (
            b'{"id": "x", "time": "2026-11-22T10:00:00Z", "source": "s", "schema_version": 2, '
            b'"event": {"kind": "PodDeleted", "namespace": "a", "name": "b", "uid": "c"}}',
            "schema_version",
        ),
        (
            b'{"id": "x", "time": "2026-11-22T10:00:00Z", "source": "s", '
            b'"event": {"kind": "PodDeleted", "namespace": "a", "name": "b"}}',
            "event.PodDeleted.uid",
        ),
    ],
)
def test_undecodable_messages_name_the_offending_field(data: bytes, field: str) -> None:
    with pytest.raises(UndecodableMessageError) as error:
        decode(data)
    assert str(error.value).startswith(field)


@given(st.text())
def test_token_encoding_round_trips_any_string(name: str) -> None:
    token = subjects.encode_token(name)
    assert subjects.decode_token(token) == name
    assert token and not set(token) & set(". *>\t\n\r")


@given(st.text(), st.text())
def test_distinct_names_get_distinct_tokens(first: str, second: str) -> None:
    if first != second:
        assert subjects.encode_token(first) != subjects.encode_token(second)


@pytest.mark.parametrize(
    ("name", "token"),
    [("gpu-1", "gpu-1"), ("gpu-1.example.com", "gpu-1_2Eexample_2Ecom"), ("a_b", "a_5Fb"), ("", "_")],
)
def test_token_examples(name: str, token: str) -> None:
    assert subjects.encode_token(name) == token


@pytest.mark.parametrize("token", ["a.b", "a_2", "a_zz", "a*"])
def test_tokens_that_encoding_cannot_produce_are_refused(token: str) -> None:
    with pytest.raises(ValueError, match="token"):
        subjects.decode_token(token)


def test_subjects_keep_dotted_names_in_one_token() -> None:
    assert subjects.pod_subject("ml", "job.v2") == "mpsflow.pod.ml.job_2Ev2"
    assert subjects.gpus_subject("n.example") == "mpsflow.gpus.n_2Eexample"
    assert subjects.node_config_key("n.example") == "n_2Eexample"


def test_content_ids_are_stable_and_sensitive_to_every_part() -> None:
    assert content_id("a", "b") == content_id("a", "b")
    assert content_id("a", "b") != content_id("ab")
