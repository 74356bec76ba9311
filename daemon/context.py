"""What every pipeline step needs, built once by the service (or by `audiodrop process`): settings, database
sessions, the clock, the Gemini client (None without an API key), this run's name for claims, the engine's
wake-up, and the API pauses (why uploads and prompts wait as a whole)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from daemon.clock import Clock, SystemClock
from daemon.config import Settings
from daemon.gemini import ApiClient
from daemon.policy import Action, Decision

# A storage-quota refusal that files.list cannot explain waits (gemini.storage_retry_seconds), doubling each time
# up to this cap.
QUOTA_PAUSE_CAP_SECONDS = 1800.0


def human_bytes(count: int) -> str:
    """1234 -> '1.2 kB', 3456789 -> '3.5 MB' (decimal units, as the quota is counted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


@dataclass
class ApiPauses:
    """Why this run's API work pauses as a whole, and until when: the API is unreachable, the key is missing or
    refused (every call waits), or the server refuses uploads as over the storage quota (uploads wait)."""

    offline_since: datetime | None = None
    auth_problem: str | None = None
    quota_problem: str | None = None
    retry_at: datetime | None = None  # offline or key refused: every API call waits
    quota_retry_at: datetime | None = None  # storage refused: only uploads wait
    # Uploads wait because nothing of ours can be evicted (every copy is needed by a prompt): not a pause.
    storage_note: str | None = None
    # The database cannot be reached: no API call starts (its outcome could not be recorded, and another node
    # may take the work over when this one's leases lapse).
    database_down_since: datetime | None = None
    # Storage refusals in a row, and the size of the last refused upload (to judge what a reconcile explains).
    quota_refusals: int = 0
    refused_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self, has_key: bool) -> str | None:
        if self.database_down_since:
            return (f"the database cannot be reached since {self.database_down_since.isoformat(timespec='seconds')}; "
                    "no API call starts until it can")
        if not has_key:
            return "no API key: set GEMINI_API_KEY (or gemini.api_key_file); converting and queueing meanwhile"
        if self.auth_problem:
            return self.auth_problem
        if self.offline_since:
            return f"offline since {self.offline_since.isoformat(timespec='seconds')}; retrying"
        return self.quota_problem or self.storage_note

    def paused(self, now: datetime, *, upload: bool = False) -> bool:
        """Whether API calls (`upload`: uploads) must wait now."""
        if self.database_down_since is not None:
            return True
        if self.retry_at is not None and now < self.retry_at:
            return True
        return upload and self.quota_retry_at is not None and now < self.quota_retry_at

    def database_failed(self, now: datetime) -> None:
        with self.lock:
            self.database_down_since = self.database_down_since or now

    def database_ok(self) -> bool:
        """The database answered; True if it had been down (work paused meanwhile resumes)."""
        with self.lock:
            was_down, self.database_down_since = self.database_down_since is not None, None
            return was_down

    def resume_at(self, *, upload: bool = False) -> datetime | None:
        """When the pause that holds API calls (or uploads) ends."""
        times = [self.retry_at] + ([self.quota_retry_at] if upload else [])
        return max((t for t in times if t is not None), default=None)

    def pause_for(self, decision: Decision, now: datetime, *, refused_bytes: int = 0,
                  quota_pause: float = 30.0) -> None:
        """A problem of the whole API: pause everything that talks to it until `decision.retry_at` (a storage
        refusal pauses uploads longer each time it repeats)."""
        with self.lock:
            if decision.action is Action.MAKE_ROOM:
                self.quota_refusals += 1
                self.refused_bytes = refused_bytes
                pause = min(quota_pause * 2 ** (self.quota_refusals - 1), QUOTA_PAUSE_CAP_SECONDS)
                self.quota_retry_at = now + timedelta(seconds=pause)
                self.quota_problem = (f"waiting for storage: the server refused an upload of "
                                      f"{human_bytes(refused_bytes)} as over the project's quota "
                                      f"({self.quota_refusals} time(s) in a row); retrying at "
                                      f"{self.quota_retry_at.isoformat(timespec='seconds')}")
                return
            if decision.action is Action.WAIT_OFFLINE:
                self.offline_since = self.offline_since or now
            elif decision.action is Action.WAIT_AUTH:
                self.auth_problem = decision.error
            self.retry_at = decision.retry_at

    def storage_reconciled(self, refused_upload_fits: bool) -> None:
        """The server's usage was read again. If the ledger now explains the refusal (the upload no longer fits),
        uploads go on at once and make room by evicting; an unexplained refusal keeps its pause."""
        with self.lock:
            if self.quota_problem and not refused_upload_fits:
                self.quota_retry_at = None

    def upload_succeeded(self) -> None:
        with self.lock:
            self.quota_refusals = 0
            self.quota_problem = None
            self.quota_retry_at = None

    def clear_network_problems(self) -> None:
        """The API answered: it is reachable and the key works."""
        with self.lock:
            self.offline_since = None
            self.auth_problem = None
            self.retry_at = None


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    client: ApiClient | None
    clock: Clock = field(default_factory=SystemClock)
    pauses: ApiPauses = field(default_factory=ApiPauses)
    instance_id: str = ""
    # This run's name in claims: node and a random run id, so a restarted daemon never mistakes a dead run's
    # claim for its own.
    holder: str = "local"
    node: str = "local"
    # Several daemons share the database (PostgreSQL): conversions stay with a drop folder's node, compact copies
    # are kept in the database, and the lock of the storage ledger and the rate limit is the database's.
    fleet: bool = False
    wake: Callable[..., None] = lambda *kinds, at=None: None

    def now(self) -> datetime:
        return self.clock.now()


class ContextKind:
    """What every kind of engine work run for the daemon holds: the context and the engine's lease (a callable:
    now -> the end of a new lease). A kind sets `name` and, when it runs more than one at a time, `workers`."""

    name = ""

    def __init__(self, ctx: Context, lease: Callable[[datetime], datetime]) -> None:
        self.ctx = ctx
        self.lease = lease

    def workers(self) -> int:
        return 1

    def api_unusable(self, now: datetime) -> bool:
        """No key, or API calls paused (offline, a refused key, the database lost): claim nothing that calls it."""
        return self.ctx.client is None or self.ctx.pauses.paused(now)
