"""The reply formats of `tests/contract/mps_replies.py`, held in-process: parsers and the fake's semantics.

Without a daemon process: `node_agent.mps`'s parsers read each reply as its source shows it, and the fake's
command semantics (`ControlDaemonState`) give each reply and refuse each failing command. The contract
suite holds the fake and the real daemons to the same rows over their control pipes.
"""

from __future__ import annotations

import os

import pytest

from simulation.fake_mps_commands import ControlDaemonState
from simulation.fake_mps_control import NO_DAEMON_MESSAGE as FAKE_NO_DAEMON_MESSAGE
from tests.contract.mps_replies import FAILURES, NO_DAEMON_MESSAGE, REPLIES, Failure, Reply


@pytest.mark.parametrize("case", [*REPLIES, *FAILURES], ids=lambda case: case.id)
def test_every_row_says_where_it_comes_from(case: Reply | Failure) -> None:
    verdict, _, source = case.source.partition(": ")
    assert verdict in {"verified", "unverified"} and source, case.source


@pytest.mark.parametrize("case", REPLIES, ids=lambda case: case.id)
def test_mpsflow_reads_each_reply_as_its_source_shows_it(case: Reply) -> None:
    assert case.matches(case.example)
    if case.parser is not None:
        assert case.parser(case.example) == case.parsed
        assert case.parser(f"{case.example}\n") == case.parsed  # as the client prints it


@pytest.mark.parametrize("case", REPLIES, ids=lambda case: case.id)
def test_the_fake_replies_as_pinned(case: Reply) -> None:
    state = ControlDaemonState(device_count=1)
    for command in case.setup:
        assert state.execute(command.format(uid=os.getuid())).accepted, command

    reply = state.execute(case.command)

    assert reply.accepted
    assert case.matches(reply.text), reply.text


@pytest.mark.parametrize("case", [f for f in FAILURES if f.daemon_running], ids=lambda case: case.id)
def test_the_fake_refuses_as_pinned(case: Failure) -> None:
    reply = ControlDaemonState(device_count=1).execute(case.command)

    assert not reply.accepted
    assert case.output in reply.text


def test_the_fake_client_says_what_the_real_one_says_without_a_daemon() -> None:
    assert FAKE_NO_DAEMON_MESSAGE == NO_DAEMON_MESSAGE
