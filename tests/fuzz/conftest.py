"""Prints what the fuzz properties tried (`profile.TALLY`) at the end of a run that ran any, and
adds it to the file `MPSFLOW_FUZZ_TALLY` names, where `tests.fuzz.volume` sums its rounds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fuzz.profile import EXAMPLES_VARIABLE, TALLY, TALLY_VARIABLE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY:
        return
    profile = os.environ.get(EXAMPLES_VARIABLE) or "unset, the bounded profile"
    terminalreporter.section(f"fuzz: what each boundary was given ({EXAMPLES_VARIABLE}: {profile})")
    for boundary, counts in sorted(TALLY.items()):
        rest = "; ".join(
            f"{label} {count:,}" for label, count in sorted(counts.items()) if label != "examples"
        )
        terminalreporter.write_line(f"{boundary}: {counts['examples']:,} examples ({rest})")
    sink = os.environ.get(TALLY_VARIABLE)
    if sink:
        with Path(sink).open("a") as lines:
            lines.write(json.dumps({boundary: dict(counts) for boundary, counts in TALLY.items()}) + "\n")
