"""What every pipeline step needs, built once by the service: settings, database sessions, the clock, the
Gemini client (None without an API key) and the shared "what are we waiting for" record."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from daemon.gemini import GeminiClient
from daemon.policy import Action, Decision

def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Waiting:
    """Global reasons the uploads pause: the API is unreachable, the key is missing or refused."""

    offline_since: datetime | None = None
    auth_problem: str | None = None
    quota_problem: str | None = None
    retry_at: datetime | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self, has_key: bool) -> str | None:
        if not has_key:
            return "no API key: set GEMINI_API_KEY (or gemini.api_key_file); converting and queueing meanwhile"
        if self.auth_problem:
            return self.auth_problem
        if self.offline_since:
            return f"offline since {self.offline_since.isoformat(timespec='seconds')}; retrying"
        if self.quota_problem:
            return self.quota_problem
        return None

    def paused(self, now: datetime) -> bool:
        return self.retry_at is not None and now < self.retry_at

    def note(self, decision: Decision, now: datetime) -> None:
        """A global problem: pause everything that talks to the API until `decision.retry_at`."""
        with self.lock:
            if decision.action is Action.WAIT_OFFLINE:
                self.offline_since = self.offline_since or now
            elif decision.action is Action.WAIT_AUTH:
                self.auth_problem = decision.error
            elif decision.action is Action.MAKE_ROOM:
                self.quota_problem = decision.error
            self.retry_at = decision.retry_at

    def storage_reconciled(self) -> None:
        """The server's usage was just read again: uploads retry now, making room from the corrected ledger."""
        with self.lock:
            if self.quota_problem:
                self.quota_problem = None
                self.retry_at = None

    def clear_network_problems(self) -> None:
        """The API answered: it is reachable and the key works."""
        with self.lock:
            self.offline_since = None
            self.auth_problem = None


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    client: GeminiClient | None
    now: Callable[[], datetime] = utcnow
    waiting: Waiting = field(default_factory=Waiting)
    instance_id: str = ""
    wake: Callable[[str], None] = lambda job: None
