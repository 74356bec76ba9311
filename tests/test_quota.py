from __future__ import annotations

from datetime import timedelta

from daemon.pipeline.quota import Ledger, Resident, choose_evictions
from tests.conftest import T0


def test_free_space_counts_headroom_and_other_tools() -> None:
    ledger = Ledger(limit_bytes=1000, headroom_bytes=100, ours_bytes=300, foreign_bytes=200)
    assert ledger.free_bytes == 400
    assert ledger.fits(400) and not ledger.fits(401)


def test_eviction_takes_the_least_recently_needed_unpinned_copies_first() -> None:
    residents = [
        Resident(1, 100, last_needed_at=T0 + timedelta(hours=3), uploaded_at=T0, pinned=False),
        Resident(2, 100, last_needed_at=None, uploaded_at=T0 + timedelta(hours=1), pinned=False),
        Resident(3, 500, last_needed_at=None, uploaded_at=T0, pinned=True),
        Resident(4, 100, last_needed_at=T0 + timedelta(hours=2), uploaded_at=T0, pinned=False),
    ]
    assert choose_evictions(residents, needed_bytes=50, free_bytes=100) == []
    assert choose_evictions(residents, needed_bytes=250, free_bytes=100) == [2, 4]
    assert choose_evictions(residents, needed_bytes=400, free_bytes=100) == [2, 4, 1]


def test_nothing_is_evicted_when_even_everything_unpinned_would_not_do() -> None:
    residents = [Resident(1, 100, None, T0, pinned=False), Resident(2, 900, None, T0, pinned=True)]
    assert choose_evictions(residents, needed_bytes=500, free_bytes=0) is None
