"""What every pipeline step needs, built once by the service: settings, database sessions, the clock, the
Gemini client (None without an API key) and the shared "what are we waiting for" record."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from daemon.gemini import GeminiClient

MAX_AUTOMATIC_ATTEMPTS = 8


def utcnow() -> datetime:
    return datetime.now(UTC)


def next_attempt(now: datetime, attempts: int, retry_after: float | None = None) -> datetime | None:
    """When to retry after `attempts` failures: exponential backoff with jitter, a sane server hint wins.
    None once the automatic attempts are used up (a person can still `audiodrop retry`)."""
    if attempts >= MAX_AUTOMATIC_ATTEMPTS:
        return None
    delay = retry_after if retry_after is not None else min(1800.0, 5.0 * 2 ** (attempts - 1))
    return now + timedelta(seconds=delay * random.uniform(1.0, 1.25))


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


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    client: GeminiClient | None
    now: Callable[[], datetime] = utcnow
    waiting: Waiting = field(default_factory=Waiting)
    wake: Callable[[str], None] = lambda job: None
