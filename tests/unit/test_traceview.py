"""`mpsflow trace`'s reading, selecting and drawing (`services.traceview`), on hand-made spans.

A pod's path is its own traces and the traces that link to them, never another pod's; the tree puts a
span under its parent and a linked trace under the span it links to; the waterfall fits its width,
keeps every bar inside its frame and draws in plain ASCII when asked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import main
from services.traceview import (
    ASCII,
    MIN_BAR,
    UNICODE,
    Attribute,
    Row,
    SpanRecord,
    TracesDirError,
    arrange,
    bar,
    default_traces_dir,
    parse_spans,
    read_spans,
    render,
    select,
    service_label,
    waterfall,
)

MS = 1_000_000
OBSERVED, PLAN, OTHER, LATER = "a" * 32, "b" * 32, "c" * 32, "d" * 32


def span(
    name: str,
    trace: str,
    span_id: str,
    *,
    parent: str | None = None,
    start: float = 0,
    end: float = 1,
    service: str = "mpsflow-planner",
    pod: str | None = None,
    pods: tuple[str, ...] | None = None,
    node: str | None = None,
    links: tuple[tuple[str, str], ...] = (),
    status: str = "UNSET",
) -> SpanRecord:
    attributes: dict[str, Attribute] = {}
    if pod is not None:
        attributes["mpsflow.pod"] = pod
    if node is not None:
        attributes["mpsflow.node"] = node
    if pods is not None:
        attributes["mpsflow.pods"] = pods
    return SpanRecord(
        trace_id=trace,
        span_id=span_id.ljust(16, "0"),
        parent_span_id=None if parent is None else parent.ljust(16, "0"),
        name=name,
        service=service,
        start_unix_nano=int(start * MS),
        end_unix_nano=int(end * MS),
        attributes=attributes,
        links=tuple((t, s.ljust(16, "0")) for t, s in links),
        status=status,
    )


# One pod's path: the pod watcher publishes its observation, the planner handles it; a plan (its own
# trace) links to that publish and to another pod's, and travels to the config publisher and a node
# agent. Another pod's observation is a trace of its own.
PATH = [
    span("publish PodObserved", OBSERVED, "1", start=0, end=2, service="mpsflow-pod-watcher", pod="ns/a"),
    span("process PodObserved", OBSERVED, "2", parent="1", start=3, end=4, pod="ns/a"),
    span("plan", PLAN, "3", start=10, end=30, links=((OBSERVED, "1"), (OTHER, "7"))),
    span("publish NodePlanned", PLAN, "4", parent="3", start=11, end=12),
    span("process NodePlanned", PLAN, "5", parent="4", start=14, end=16, service="mpsflow-config-publisher"),
    span("apply node config", PLAN, "6", parent="5", start=20, end=40, service="mpsflow-node-agent"),
    span("publish PodObserved", OTHER, "7", start=1, end=2, service="mpsflow-pod-watcher", pod="ns/b"),
    span("process PodObserved", OTHER, "8", parent="7", start=5, end=6, pod="ns/b"),
]


def names(spans: list[SpanRecord]) -> list[tuple[str, str]]:
    return [(s.trace_id[0], s.name) for s in spans]


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (
            "ns/a",
            [
                ("a", "publish PodObserved"),
                ("a", "process PodObserved"),
                ("b", "plan"),
                ("b", "publish NodePlanned"),
                ("b", "process NodePlanned"),
                ("b", "apply node config"),
            ],
        ),
        (
            "ns/b",
            [
                ("c", "publish PodObserved"),
                ("c", "process PodObserved"),
                ("b", "plan"),
                ("b", "publish NodePlanned"),
                ("b", "process NodePlanned"),
                ("b", "apply node config"),
            ],
        ),
        ("ns/c", []),
        ("ns", []),
    ],
    ids=["own-and-linked", "the-other-pod-shares-only-the-plan", "unknown-pod", "a-prefix-is-not-a-pod"],
)
def test_a_pod_s_path_is_its_traces_and_the_traces_linking_to_them(
    pod: str, expected: list[tuple[str, str]]
) -> None:
    assert names(select(PATH, pod)) == expected


def test_a_plan_that_placed_the_pod_is_on_its_path_without_a_link() -> None:
    spans = [
        span("plan", PLAN, "1", start=0, end=5, pods=("ns/a", "ns/z")),
        span("publish NodePlanned", PLAN, "2", parent="1", start=1, end=2),
        span("plan", LATER, "3", start=9, end=10, pods=("ns/z",)),
    ]
    assert names(select(spans, "ns/a")) == [("b", "plan"), ("b", "publish NodePlanned")]


def test_only_one_hop_of_links_is_followed_and_a_span_written_twice_counts_once() -> None:
    spans = [
        *PATH,
        PATH[0],
        span("plan", LATER, "9", start=50, end=51, links=((PLAN, "6"),)),  # links to the plan's trace
    ]
    assert names(select(spans, "ns/a")) == names(select(PATH, "ns/a"))


# A plan decides for two pods on two nodes at once: ns/a's path keeps what concerns ns/a and its node.
SHARED_PLAN = [
    span("publish PodObserved", OBSERVED, "1", start=0, end=1, service="mpsflow-pod-watcher", pod="ns/a"),
    span("plan", PLAN, "2", start=5, end=30, links=((OBSERVED, "1"),)),
    span("publish NodePlanned", PLAN, "3", parent="2", start=6, end=7, node="x"),
    span("apply node config", PLAN, "4", parent="3", start=8, end=20, service="mpsflow-node-agent", node="x"),
    span("publish NodeConfigApplied", PLAN, "5", parent="4", start=19, end=20, node="x"),
    span("publish NodePlanned", PLAN, "6", parent="2", start=7, end=8, node="y"),
    span("apply node config", PLAN, "7", parent="6", start=9, end=25, service="mpsflow-node-agent", node="y"),
    span("publish PodReleased", PLAN, "8", parent="2", start=26, end=27, pod="ns/a", node="x"),
    span("publish PodReleased", PLAN, "9", parent="2", start=27, end=28, pod="ns/b", node="y"),
    span("process PodReleased", PLAN, "10", parent="9", start=28, end=29, pod="ns/b"),
]


def test_what_a_shared_plan_did_for_other_pods_and_nodes_is_left_out() -> None:
    assert names(select(SHARED_PLAN, "ns/a")) == [
        ("a", "publish PodObserved"),
        ("b", "plan"),
        ("b", "publish NodePlanned"),
        ("b", "apply node config"),
        ("b", "publish NodeConfigApplied"),
        ("b", "publish PodReleased"),
    ]
    assert {s.attributes.get("mpsflow.node") for s in select(SHARED_PLAN, "ns/a")} == {None, "x"}


def test_before_the_pod_has_a_node_every_node_of_its_plans_is_shown() -> None:
    unreleased = [s for s in SHARED_PLAN if s.name not in ("publish PodReleased", "process PodReleased")]
    assert len(select(unreleased, "ns/a")) == len(unreleased)


def test_the_header_names_the_first_trace_ids_and_counts_the_rest() -> None:
    spans = [span("publish PodObserved", t * 32, "1", pod="ns/a") for t in "abcde"]
    header = waterfall(spans, "ns/a", width=80)
    assert header is not None
    first = header.splitlines()[0]
    assert first.endswith(f"trace ids {'a' * 32} {'b' * 32} {'c' * 32} and 2 more")


def shape(rows: list[Row]) -> list[tuple[int, str, bool]]:
    return [(row.depth, row.span.name, row.linked) for row in rows]


def test_the_tree_puts_children_under_parents_and_a_linked_trace_under_its_link() -> None:
    assert shape(arrange(select(PATH, "ns/a"))) == [
        (0, "publish PodObserved", False),
        (1, "process PodObserved", False),
        (1, "plan", True),
        (2, "publish NodePlanned", False),
        (3, "process NodePlanned", False),
        (4, "apply node config", False),
    ]


def test_a_linked_trace_hangs_under_the_latest_span_it_links_to_that_began_before_it() -> None:
    spans = [
        span("first", OBSERVED, "1", start=0, end=1, pod="ns/a"),
        span("second", OBSERVED, "2", start=2, end=3, pod="ns/a"),
        span("too late", OBSERVED, "3", start=20, end=21, pod="ns/a"),
        span("plan", PLAN, "4", start=10, end=11, links=((OBSERVED, "1"), (OBSERVED, "2"), (OBSERVED, "3"))),
    ]
    assert shape(arrange(select(spans, "ns/a"))) == [
        (0, "first", False),
        (0, "second", False),
        (1, "plan", True),
        (0, "too late", False),
    ]


def test_a_span_whose_parent_was_never_written_starts_a_tree_and_circles_still_end() -> None:
    spans = [
        span("orphan", OBSERVED, "1", parent="9", start=5, end=6, pod="ns/a"),
        span("x", PLAN, "2", start=1, end=2, pod="ns/a", links=((LATER, "3"),)),
        span("y", LATER, "3", start=1, end=2, pod="ns/a", links=((PLAN, "2"),)),
    ]
    assert shape(arrange(select(spans, "ns/a"))) == [(0, "x", False), (1, "y", True), (0, "orphan", False)]


@pytest.mark.parametrize(
    ("start", "end", "total", "cells", "drawn"),
    [
        (0, 10, 10, 10, "##########"),
        (0, 5, 10, 10, "#####     "),
        (5, 5, 10, 10, "     #    "),  # no time at all still shows
        (10, 10, 10, 10, "         #"),  # at the very end, inside the frame
        (0, 1, 1000, 10, "#         "),
        (3, 4, 0, 4, "   #"),  # nothing took any time
        (0, 50, 10, 5, "#####"),  # past the end is cut at the frame
    ],
)
def test_bars_stay_inside_their_frame(start: int, end: int, total: int, cells: int, drawn: str) -> None:
    assert bar(start, end, total, cells, "#") == drawn


def test_the_waterfall_reads_as_expected() -> None:
    drawn = waterfall(PATH, "ns/a", width=80, ascii_only=True)
    assert drawn == (
        f"ns/a: 6 spans in 2 traces, 40.0 ms; trace ids {OBSERVED} {PLAN}\n"
        "publish PodObserved       pod-watcher       +0.0  2.0ms |##                    |\n"
        "  process PodObserved     planner           +3.0  1.0ms | ##                   |\n"
        "  -> link: plan           planner          +10.0 20.0ms |     ############     |\n"
        "    publish NodePlanned   planner          +11.0  1.0ms |      #               |\n"
        "      process NodePlanned config-publisher +14.0  2.0ms |       ##             |\n"
        "        apply node config node-agent       +20.0 20.0ms |           ###########|\n"
    )


@pytest.mark.parametrize("width", [20, 60, 100, 200])
def test_rows_fit_the_width_and_bars_never_shrink_below_the_minimum(width: int) -> None:
    lines = (waterfall(PATH, "ns/a", width=width) or "").splitlines()
    rows = lines[1:]
    assert len({len(row) for row in rows}) == 1, "every row is as wide as the others"
    cells = len(rows[0].split("|")[1])
    assert cells >= MIN_BAR
    if cells > MIN_BAR:
        assert len(rows[0]) == width


def test_long_names_are_cut_and_errors_marked() -> None:
    spans = [
        span("x" * 200, OBSERVED, "1", start=0, end=1, pod="ns/a"),
        span("publish PodReleased", OBSERVED, "2", parent="1", start=1, end=2, status="ERROR"),
    ]
    ascii_rows = (waterfall(spans, "ns/a", width=80, ascii_only=True) or "").splitlines()[1:]
    assert ascii_rows[0].startswith("x" * 35 + ASCII.cut + " ")
    assert "publish PodReleased [error]" in ascii_rows[1]
    unicode_rows = (waterfall(spans, "ns/a", width=80) or "").splitlines()[1:]
    assert UNICODE.cut in unicode_rows[0]


def test_ascii_only_output_is_ascii_and_the_default_draws_blocks() -> None:
    assert (waterfall(PATH, "ns/a", ascii_only=True) or "").isascii()
    drawn = waterfall(PATH, "ns/a") or ""
    assert UNICODE.fill in drawn and UNICODE.link in drawn


def test_a_node_s_own_process_shows_its_node() -> None:
    record = SpanRecord(
        trace_id=OBSERVED,
        span_id="1" * 16,
        parent_span_id=None,
        name="apply node config",
        service="mpsflow-node-agent",
        start_unix_nano=0,
        end_unix_nano=1,
        resource={"k8s.node.name": "gpu-1"},
    )
    assert service_label(record) == "node-agent@gpu-1"


def test_render_of_nothing_says_so() -> None:
    assert render("ns/a", []) == "ns/a: no spans\n"
    assert waterfall(PATH, "ns/nobody") is None


# --- the file format ---------------------------------------------------------------------------


def test_a_span_survives_its_line() -> None:
    record = SpanRecord(
        trace_id=PLAN,
        span_id="2" * 16,
        parent_span_id="1" * 16,
        name="plan",
        service="mpsflow-planner",
        start_unix_nano=5,
        end_unix_nano=9,
        kind="PRODUCER",
        status="ERROR",
        status_description="boom",
        attributes={"mpsflow.pods": ("ns/a", "ns/b"), "mpsflow.placed": 2, "ok": True, "x": 0.5},
        links=((OBSERVED, "3" * 16),),
        resource={"service.name": "mpsflow-planner"},
    )
    line = record.to_json()
    assert "\n" not in line
    assert SpanRecord.from_json(line) == record


VALID = {
    "trace_id": "a",
    "span_id": "1",
    "name": "x",
    "service": "s",
    "start_unix_nano": 0,
    "end_unix_nano": 0,
}


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        '{"trace_id": "a"',  # cut short by a killed process
        "[1, 2]",
        json.dumps({**VALID, "trace_id": ""}),
        json.dumps({**VALID, "start_unix_nano": -1}),
        json.dumps({**VALID, "end_unix_nano": "soon"}),
        json.dumps({**VALID, "links": 5}),
        json.dumps({**VALID, "links": [{"trace_id": "a"}]}),
        json.dumps({**VALID, "attributes": [1]}),
    ],
)
def test_a_line_that_is_not_a_span_is_counted_not_fatal(line: str) -> None:
    good = PATH[0].to_json()
    assert parse_spans([good, "", line, good]) == ([PATH[0], PATH[0]], 1)
    assert parse_spans([json.dumps(VALID)])[1] == 0


def test_read_spans_reads_every_jsonl_file_of_the_directory(tmp_path: Path) -> None:
    (tmp_path / "mpsflow-planner-1.jsonl").write_text(PATH[2].to_json() + "\n" + '{"half')
    (tmp_path / "mpsflow-pod-watcher-2.jsonl").write_text(PATH[0].to_json() + "\n")
    (tmp_path / "notes.txt").write_text("not spans")
    (tmp_path / "sub.jsonl").mkdir()
    spans, unreadable = read_spans(tmp_path)
    assert [s.name for s in spans] == ["plan", "publish PodObserved"]
    assert unreadable == 1


def test_read_spans_refuses_what_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TracesDirError, match="no such directory"):
        read_spans(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(TracesDirError, match="not a directory"):
        read_spans(tmp_path / "file")


def test_the_default_directory_is_the_environment_s_or_one_in_the_temporary_directory() -> None:
    assert default_traces_dir({"MPSFLOW_TRACES_DIR": "/x/y"}, "/tmp") == Path("/x/y")
    assert default_traces_dir({}, "/var/tmp") == Path("/var/tmp/mpsflow-traces")


# --- the command -----------------------------------------------------------------------------------


def test_mpsflow_trace_prints_the_waterfall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mpsflow-all-1.jsonl").write_text("".join(s.to_json() + "\n" for s in PATH))
    assert main(["trace", "ns/a", "--traces", str(tmp_path), "--width", "90"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("ns/a: 6 spans in 2 traces")
    assert len(out.splitlines()) == 7


def test_mpsflow_trace_of_a_pod_without_spans_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mpsflow-all-1.jsonl").write_text("".join(s.to_json() + "\n" for s in PATH))
    assert main(["trace", "ns/nobody", "--traces", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert f"no spans of ns/nobody in {tmp_path} (8 spans there)" in line
    assert "MPSFLOW_TRACES_DIR" in line


def test_mpsflow_trace_of_a_missing_directory_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trace", "ns/a", "--traces", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"mpsflow trace: {tmp_path / 'missing'}: no such directory\n"


@pytest.mark.parametrize("pod", ["nopod", "/a", "ns/", "a/b/c"])
def test_mpsflow_trace_wants_namespace_slash_pod(pod: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["trace", pod])
    assert exited.value.code == 2
    assert "is not NAMESPACE/POD" in capsys.readouterr().err


def test_the_span_example_of_docs_formats_md_is_a_span_on_the_pod_s_path() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text()
    [example] = [block for block in text.split("```json\n")[1:] if '"trace_id"' in block.split("```")[0]]
    record = SpanRecord.from_json(json.dumps(json.loads(example.split("```")[0])))
    assert record.to_json() == SpanRecord.from_json(record.to_json()).to_json()
    assert select([record], "default/traced") == [record]
