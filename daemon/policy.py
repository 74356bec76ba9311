"""What the daemon does about each class of error, in one place. Pipeline steps ask `decide()` and act on
its answer; they never inspect error types themselves.

    OfflineError        everything that talks to the API waits (a short pause, then try again); status: offline
    AuthError           everything that talks to the API waits, with a long pause (no hammering); status says so
    StorageQuotaFull    free space (evict our own unneeded uploads, re-read the server's usage), then retry;
                        never sleep on its RetryInfo, which is about 2^63 seconds
    RemoteFileGone      a 403 on a file we believed alive: it expired or was deleted; mark expired, re-upload
    UnsupportedFormat   the API refused the format: re-encode this recording to the fallback format
    TransientError      retry this item later: exponential backoff with jitter, a sane server delay wins
    PermanentError      give up on this item with the server's message until a person runs `audiodrop retry`
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from daemon.errors import (
    AuthError,
    OfflineError,
    PermanentError,
    RemoteFileGone,
    StorageQuotaFull,
    TransientError,
    UnsupportedFormat,
)

OFFLINE_PAUSE_SECONDS = 5.0
AUTH_PAUSE_SECONDS = 300.0
QUOTA_PAUSE_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 1800.0
# Unexpected errors (bugs) are retried a few times, then left for a person.
MAX_UNEXPECTED_ATTEMPTS = 5


class Action(enum.StrEnum):
    WAIT_OFFLINE = "wait offline"
    WAIT_AUTH = "wait for a valid key"
    MAKE_ROOM = "make room"
    REUPLOAD = "re-upload"
    REENCODE = "re-encode"
    RETRY_LATER = "retry later"
    GIVE_UP = "give up"


@dataclass(frozen=True)
class Decision:
    action: Action
    error: str
    retry_at: datetime | None = None


def backoff(now: datetime, attempts: int, retry_after: float | None = None) -> datetime:
    """Exponential backoff with jitter (5 s, 10 s, 20 s ... at most 30 min); a sane server delay wins."""
    delay = retry_after if retry_after is not None else min(MAX_BACKOFF_SECONDS, 5.0 * 2 ** max(attempts - 1, 0))
    return now + timedelta(seconds=delay * random.uniform(1.0, 1.25))


def decide(err: BaseException, *, attempts: int, now: datetime) -> Decision:
    """The policy for `err` on an item that has failed `attempts` times so far (this failure included)."""
    message = getattr(err, "title", None) or str(err) or type(err).__name__
    if isinstance(err, OfflineError):
        return Decision(Action.WAIT_OFFLINE, message, now + timedelta(seconds=OFFLINE_PAUSE_SECONDS))
    if isinstance(err, AuthError):
        return Decision(Action.WAIT_AUTH, message, now + timedelta(seconds=AUTH_PAUSE_SECONDS))
    if isinstance(err, StorageQuotaFull):
        return Decision(Action.MAKE_ROOM, message, now + timedelta(seconds=QUOTA_PAUSE_SECONDS))
    if isinstance(err, RemoteFileGone):
        return Decision(Action.REUPLOAD, message, now)
    if isinstance(err, UnsupportedFormat):
        return Decision(Action.REENCODE, message, now)
    if isinstance(err, TransientError):
        return Decision(Action.RETRY_LATER, message, backoff(now, attempts, err.retry_after))
    if isinstance(err, PermanentError):
        return Decision(Action.GIVE_UP, message)
    if attempts >= MAX_UNEXPECTED_ATTEMPTS:
        return Decision(Action.GIVE_UP, f"unexpected error: {message} (see the daemon log)")
    return Decision(Action.RETRY_LATER, f"unexpected error: {message} (see the daemon log)", backoff(now, attempts))
