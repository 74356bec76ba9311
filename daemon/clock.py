"""Time, injected: domain code asks a Clock for tz-aware UTC times instead of reading the datetime module,
so tests can move time without monkeypatching."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, tz-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """A time as ISO 8601 UTC with a Z ("2026-11-30T12:00:00.123456Z"), as the CLI and result metadata show it."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None
