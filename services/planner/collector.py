"""When the planner lets Python's cyclic garbage collector run: not while it catches up or decides.

At cluster scale the planner holds about a million objects (the last event of every pod and node,
a node report holding a model per GPU and per slice) and a decision builds a few hundred thousand
more (the plan). None of them is in a reference cycle: reference counting frees each one as soon
as it is replaced, and the cyclic collector finds nothing. It still goes through all of them each
time enough new objects have survived, which is what folding a backlog and deciding do: it took
about two thirds of the time of both (`benchmarks/planner_scale.py` prints them with and without).

So the planner service pauses the collector while it catches up on start and for each decision
(computing and publishing it), and lets it run between decisions. Once caught up and decided, it
collects once and freezes what is left (`gc.freeze`): the state it folded is never gone through
again, and what it replaces later is freed all the same (a frozen object is only exempt from the
cyclic collector, not from reference counting). None of this changes what the planner decides.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic collector paused, then leave it as it was (pauses nest)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def settle() -> None:
    """Collect once, then exempt every object alive now from later collections (`gc.freeze`): for
    the state a long-lived process has just built, before it goes on changing it bit by bit."""
    gc.collect()
    gc.freeze()
