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
