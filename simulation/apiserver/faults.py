"""Which faults the API emulator injects into which request, as a real API server in trouble shows them.

Where it sits: in `simulation.apiserver`, beside `store`; `server` asks it, for every request and
every drop of the open watches, which faults to apply, and applies them, and the package exports
`Faults` for tests and the demo's scenario (`api_faults`). It imports nothing of the package. It
only decides and counts: it never sleeps, writes to the network or touches the store.

Reproducible: every random choice comes from a generator seeded by `Faults.seed`, one generator per
kind of fault (so that turning one kind on or off does not change which requests get another), so a
client that makes the same requests in the same order gets the same faults. The drops of open
watches come on a fixed period.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Final, Literal

Refusal = Literal["throttled", "error"]
Drop = Literal["watch_ended", "watch_reset"]


@dataclass(frozen=True)
class Faults:
    """What to inject, and into whose requests (docs/formats.md §2.1, `api_faults`).

    A request is a target when its identity (its bearer token, "" without one) matches one of the
    shell-style `identities` patterns and its resource (subresources count as their resource) is
    one of `resources` (None: every resource). A target gets, each drawn apart:

    - with `slow_rate`, `slow_s` seconds of delay before it is handled (a watch: before it starts);
    - with `throttle_rate`, 429 with `Retry-After: retry_after_s`, or else with `error_rate`, 500,
      before it is handled (nothing is written); every verb, watch included;
    - a watch from a resourceVersion older than the current one (a resumption that missed
      changes), with `gone_rate`: one ERROR event with a 410 Expired Status, then the end of the
      stream, as the real watch cache answers a resourceVersion it no longer holds.

    Every `drop_watch_every_s` seconds (None: never), every open watch of a target ends without a
    final event, each drawn apart: cleanly (the end of the response, as at a watch's timeout or a
    graceful restart) or by a reset of its connection (as a crash or a proxy would), half and half.
    """

    seed: int = 0
    identities: tuple[str, ...] = ("*",)
    resources: tuple[str, ...] | None = None
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    retry_after_s: int = 1
    slow_rate: float = 0.0
    slow_s: float = 0.0
    gone_rate: float = 0.0
    drop_watch_every_s: float | None = None

    def targets(self, identity: str | None, resource: str) -> bool:
        base = resource.split("/", 1)[0]
        if self.resources is not None and base not in self.resources:
            return False
        return any(fnmatchcase(identity or "", pattern) for pattern in self.identities)


@dataclass(frozen=True)
class RequestFaults:
    """The faults one request gets: a delay first (0 for none), then a refusal, or for a watch
    from a past resourceVersion the 410 Gone of a forgotten one."""

    delay_s: float = 0.0
    refusal: Refusal | None = None
    gone: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """As the request log records them, in the order they are applied."""
        return (
            *(("slow",) if self.delay_s else ()),
            *((self.refusal,) if self.refusal else ()),
            *(("gone",) if self.gone else ()),
        )


NO_FAULTS: Final = RequestFaults()


class FaultInjector:
    """Draws the faults of each request from `faults`, and counts what it injected (`counts`,
    by the names the request log uses, plus `watch_ended` and `watch_reset` per watch dropped)."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.counts: Counter[str] = Counter()
        self._slow = random.Random(f"{faults.seed}:slow")
        self._refusal = random.Random(f"{faults.seed}:refusal")
        self._gone = random.Random(f"{faults.seed}:gone")
        self._drop = random.Random(f"{faults.seed}:drop")
        self._injects = any((faults.error_rate, faults.throttle_rate, faults.slow_rate, faults.gone_rate))
        """Whether any request may get a fault: without, none is matched against the targets."""

    def for_request(self, identity: str | None, resource: str, verb: str, behind: bool) -> RequestFaults:
        """The faults of a request; `behind`: it asks for changes since a past resourceVersion."""
        faults = self.faults
        if not self._injects or not faults.targets(identity, resource):
            return NO_FAULTS
        delay = faults.slow_s if self._slow.random() < faults.slow_rate else 0.0
        draw = self._refusal.random()
        refusal: Refusal | None = None
        if draw < faults.throttle_rate:
            refusal = "throttled"
        elif draw < faults.throttle_rate + faults.error_rate:
            refusal = "error"
        gone = refusal is None and verb == "watch" and behind and self._gone.random() < faults.gone_rate
        chosen = RequestFaults(delay, refusal, gone)
        self.counts.update(chosen.names)
        return chosen

    def drop(self) -> Drop:
        """How one open watch ends at a drop, counted: cleanly or by a reset, half and half."""
        how: Drop = "watch_ended" if self._drop.random() < 0.5 else "watch_reset"
        self.counts[how] += 1
        return how
