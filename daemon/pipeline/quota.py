"""Pure arithmetic of the Files API storage quota: what we hold, what others hold, what fits, what to evict."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

MAX_FILE_BYTES = 2 * 1024**3  # the Files API's per-file limit


@dataclass(frozen=True)
class Ledger:
    limit_bytes: int
    headroom_bytes: int
    ours_bytes: int  # our remote copies, including uploads in flight
    foreign_bytes: int  # other tools' files in the same project, as last seen on the server

    @property
    def free_bytes(self) -> int:
        return self.limit_bytes - self.headroom_bytes - self.foreign_bytes - self.ours_bytes

    def fits(self, size: int) -> bool:
        return size <= self.free_bytes


@dataclass(frozen=True)
class Resident:
    """One of our remote copies that could be deleted to make room."""

    recording_id: int
    size_bytes: int
    last_needed_at: datetime | None
    uploaded_at: datetime | None
    pinned: bool  # a queued or running prompt needs it


def choose_evictions(residents: list[Resident], *, needed_bytes: int, free_bytes: int) -> list[int] | None:
    """The least recently needed unpinned copies whose deletion makes `needed_bytes` fit; None if no choice can."""
    if needed_bytes <= free_bytes:
        return []
    never = datetime.min.replace(tzinfo=UTC)
    order = sorted((r for r in residents if not r.pinned),
                   key=lambda r: (r.last_needed_at or r.uploaded_at or never, r.recording_id))
    chosen: list[int] = []
    for resident in order:
        chosen.append(resident.recording_id)
        free_bytes += resident.size_bytes
        if needed_bytes <= free_bytes:
            return chosen
    return None
