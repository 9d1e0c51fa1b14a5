"""`make fuzz`: every fuzz property at volume, in rounds, with the counts of what was tried.

One pytest run of `tests/fuzz` per round, each with its own Hypothesis seed and
`MPSFLOW_FUZZ_EXAMPLES` set to the round's share, so that memory stays that of one round (a run
keeps a tree of every example it tried: 20,000 at once took about 10 GB). Each round adds its
tally to one file (`tests/fuzz/conftest.py`); at the end this prints the sums per boundary. Exits
with the first failing round's status, after printing its output's tail.

    python -m tests.fuzz.volume --examples 20000 --per-round 2000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tests.fuzz.profile import EXAMPLES_VARIABLE, TALLY_VARIABLE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.volume", description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=20_000, help="examples per property in all")
    parser.add_argument("--per-round", type=int, default=2_000, help="examples per property per round")
    parser.add_argument("--seed", type=int, default=1, help="the first round's Hypothesis seed")
    args = parser.parse_args(argv)
    rounds = math.ceil(args.examples / args.per_round)
    totals: dict[str, Counter[str]] = {}
    with tempfile.TemporaryDirectory(prefix="mpsflow-fuzz-") as directory:
        tally = Path(directory) / "tally.jsonl"
        for number in range(rounds):
            share = min(args.per_round, args.examples - number * args.per_round)
            seed = args.seed + number
            print(f"fuzz round {number + 1}/{rounds}: {share} examples per property, seed {seed}", flush=True)
            environment = {**os.environ, EXAMPLES_VARIABLE: str(share), TALLY_VARIABLE: str(tally)}
            command = [sys.executable, "-m", "pytest", "tests/fuzz", "-q", f"--hypothesis-seed={seed}"]
            done = subprocess.run(command, check=False, env=environment, capture_output=True, text=True)
            if done.returncode != 0:
                kept = Path(tempfile.mkdtemp(prefix="mpsflow-fuzz-failed-")) / f"round-{number + 1}.log"
                kept.write_text(done.stdout + done.stderr)
                summary = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
                print(*summary, f"round {number + 1} failed; its whole output: {kept}", sep="\n")
                return done.returncode
        for line in tally.read_text().splitlines():
            for boundary, counts in json.loads(line).items():
                totals.setdefault(boundary, Counter()).update(counts)
    print(f"fuzz: {rounds} rounds, every property passed; what each boundary was given:")
    for boundary, counts in sorted(totals.items()):
        rest = "; ".join(f"{label} {n:,}" for label, n in sorted(counts.items()) if label != "examples")
        print(f"  {boundary}: {counts['examples']:,} examples ({rest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
