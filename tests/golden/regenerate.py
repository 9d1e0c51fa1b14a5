"""Re-derive the expected plans of every recorded stream: `make golden`, then review the diff like code.

Each `*.events.jsonl` here is a recorded event stream (`mpsflow demo --record` or `mpsflow record`);
its `*.plans.jsonl` is what `mpsflow replay` prints for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from events.envelope import decode
from services.planner.replay import replay

GOLDEN = Path(__file__).parent


def expected_plans(events_file: Path) -> str:
    envelopes = [decode(line.encode()) for line in events_file.read_text().splitlines() if line.strip()]
    return "".join(json.dumps(r.summary(), sort_keys=True) + "\n" for r in replay(envelopes))


def main() -> None:
    for events_file in sorted(GOLDEN.glob("*.events.jsonl")):
        plans_file = events_file.with_name(events_file.name.replace(".events.", ".plans."))
        plans_file.write_text(expected_plans(events_file))
        print(f"wrote {plans_file}")


if __name__ == "__main__":
    main()
