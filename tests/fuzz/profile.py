"""How many examples each fuzz property tries, and the tally of what they tried.

`make test` runs the bounded profile: each property its own small default, so that the whole fuzz
set costs well under a minute. With `MPSFLOW_FUZZ_EXAMPLES` set, every property tries that many
examples instead, except the two that run the command line on a file per example (`mpsflow plan`,
`mpsflow demo`), which try a tenth of that. `make fuzz` (`tests.fuzz.volume`) reaches 20,000 per
property in rounds of a few thousand with different seeds, as Hypothesis keeps a tree of every
example one run tried and would need gigabytes for 20,000 at once.
`--hypothesis-show-statistics` prints Hypothesis's own counts per property (passing, failing and
invalid examples, and the outcome of each example as shares); `tally` counts what went in
(examples, messages, how each was refused) and `tests/fuzz/conftest.py` prints those counts at the
end of the run, for the notes.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from hypothesis import HealthCheck, event, settings

EXAMPLES_VARIABLE = "MPSFLOW_FUZZ_EXAMPLES"
TALLY_VARIABLE = "MPSFLOW_FUZZ_TALLY"
"""A file each run adds its tally to, as a JSON line (`tests.fuzz.volume` sets it)."""

TALLY: dict[str, Counter[str]] = {}
"""Per property (its test's name), how many times each label was counted in this process."""

F = TypeVar("F", bound=Callable[..., object])


def examples(bounded: int, share: float = 1.0) -> int:
    """`bounded` in the default profile; in the long run `MPSFLOW_FUZZ_EXAMPLES`, times `share` for
    a property that costs much more per example than the others."""
    configured = os.environ.get(EXAMPLES_VARIABLE)
    return max(1, round(int(configured) * share)) if configured else bounded


def fuzz(bounded: int, share: float = 1.0) -> Callable[[F], F]:
    """Hypothesis settings for a fuzz property: `examples(bounded, share)` examples, no deadline (a
    slow example is not a failure here; a hang is caught by the test's own bounds)."""
    return settings(
        max_examples=examples(bounded, share),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


def tally(boundary: str, label: str, count: int = 1) -> None:
    """Add `count` to `label` of `boundary` (messages sent, values skipped, and so on)."""
    TALLY.setdefault(boundary, Counter())[label] += count


def tried(boundary: str, outcome: str) -> None:
    """One example of `boundary` tried, with the outcome that sorts it (also shown by Hypothesis)."""
    tally(boundary, "examples")
    tally(boundary, outcome)
    event(outcome)
