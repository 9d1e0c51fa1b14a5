"""The base of every event model: frozen, strict about unknown fields, and time-zone aware.

Events are past-tense facts with the whole state of what they describe (levels, not deltas),
so a consumer that sees one twice, late or out of order still ends in the right state.
This module never performs I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


def _require_timezone(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("must carry a time zone (RFC 3339, e.g. 2026-11-22T10:00:00Z)")
    return value.astimezone(UTC)


AwareDatetime = Annotated[datetime, AfterValidator(_require_timezone)]


class Model(BaseModel):
    """A frozen value with no unknown fields: the building block of every event."""

    model_config = ConfigDict(frozen=True, extra="forbid")
