"""The base of every event model: frozen, strict about unknown fields, and time-zone aware.

Events are past-tense facts with the whole state of what they describe (levels, not deltas),
so a consumer that sees one twice, late or out of order still ends in the right state.
This module never performs I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

_EARLIEST = datetime(2, 1, 1, tzinfo=UTC)
_LATEST = datetime(9998, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
_OUT_OF_RANGE = "must be a time between the years 2 and 9998 (in UTC)"


def _require_timezone(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("must carry a time zone (RFC 3339, e.g. 2026-11-22T10:00:00Z)")
    try:
        in_utc = value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is beyond what a datetime holds in UTC
        raise ValueError(_OUT_OF_RANGE) from None
    if not _EARLIEST <= in_utc <= _LATEST:  # consumers add windows to event times: a year of room
        raise ValueError(_OUT_OF_RANGE)
    return in_utc


AwareDatetime = Annotated[datetime, AfterValidator(_require_timezone)]


class Model(BaseModel):
    """A frozen value with no unknown fields: the building block of every event."""

    model_config = ConfigDict(frozen=True, extra="forbid")
