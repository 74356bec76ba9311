"""The daemon's exception tree. Every error carries a title and a hint that says what to do next.

    DaemonError                 .title + .hint; str() is "title. hint"
    ├── ConfigError             fatal at start; lists every problem with the file and key
    ├── AlreadyRunning          another daemon holds this state_dir's lock
    ├── DatabaseError           the database cannot be used (corrupt, unreachable, a schema newer than the code)
    ├── TransientError          retried automatically with backoff (network, 429/5xx, timeouts, busy tools)
    │   ├── OfflineError        the API cannot be reached at all
    │   ├── AuthError           the API key is missing or refused: everything waits, without hammering
    │   ├── StorageQuotaFull    the Files API storage quota is full: free space, never sleep on RetryInfo
    │   ├── RemoteFileGone      a 403 on a file we believed alive: it expired or was deleted; re-upload it
    │   └── GenerationTimeout   a generation ran out of its time limit (it may have been billed: bounded retries)
    └── PermanentError          the recording is marked failed/rejected; no retry until a person asks
        ├── RejectedInput       the input itself is unusable (not audio, empty, no audio stream, ...)
        ├── TranscodeError      ffmpeg failed on an input it could probe
        ├── UnsupportedFormat   the API refused the MIME type of the converted file
        └── IllegalTransition   a bug: a state change the lifecycle does not allow

Signals, not failures (each is caught by the code that raises it, or by its caller):

    QueueError (ValueError)     a prompt that cannot be queued; the CLI prints it as a usage error
    NoTimestamps (ValueError)   subtitles asked of a result without [00:01:23] stamps
    NotReady                    a prompt's files are not usable yet: it waits in the queue
    Waiting                     a prompt may not send now (rate limit, budget): it waits until `at`
    Truncated                   the model's answer stopped early: retried bigger, then split
    SourceChanged               the file at a source path is not exactly the one the daemon took: left alone
"""

from __future__ import annotations

from datetime import datetime


class DaemonError(Exception):
    """Base class: a title saying what went wrong and a hint saying what to do."""

    def __init__(self, title: str, hint: str = "") -> None:
        super().__init__(f"{title}. {hint}" if hint else title)
        self.title = title
        self.hint = hint


class ConfigError(DaemonError):
    """The configuration file has problems; `problems` lists each one, naming the file and key."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        listing = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{path}: {len(problems)} problem(s) in the configuration:\n{listing}")


class TransientError(DaemonError):
    """A passing problem; the work is retried later. `retry_after` is a server hint in seconds, if sane;
    `status` is the HTTP status when the server answered one."""

    def __init__(self, title: str, hint: str = "", retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(title, hint)
        self.retry_after = retry_after
        self.status = status


class DatabaseError(DaemonError):
    """The database cannot be used: corrupt, unreachable, or at a schema this code does not know."""


class OfflineError(TransientError):
    """The API cannot be reached (connection refused, DNS, reset)."""


class AuthError(TransientError):
    """The API key is missing or refused; everything waits until it is fixed, without hammering."""


class StorageQuotaFull(TransientError):
    """The project's Files API storage is full."""


class RemoteFileGone(TransientError):
    """A remote file answered 403 PERMISSION_DENIED: it expired or was deleted; re-upload it."""


class GenerationTimeout(TransientError):
    """A generateContent call ran out of prompts.generate_timeout_seconds; the server may still have answered
    (and billed) it, so it is not re-sent blindly."""


class PermanentError(DaemonError):
    """A problem that retrying will not fix."""


class RejectedInput(PermanentError):
    """The input file itself is unusable: empty, not audio, no audio stream, corrupt beyond repair."""


class TranscodeError(PermanentError):
    """ffmpeg failed on a file it could probe; the title carries the last line of its stderr."""


class UnsupportedFormat(PermanentError):
    """The API refused the converted file's MIME type."""


class IllegalTransition(PermanentError):
    """A bug: a recording was asked to move between two states the lifecycle does not connect."""

    def __init__(self, current: str, target: str) -> None:
        super().__init__(f"illegal state change {current} -> {target}")


class AlreadyRunning(DaemonError):
    """Another daemon holds this state_dir's lock."""


class QueueError(ValueError):
    """A prompt that cannot be queued; the message says why."""


class NoTimestamps(ValueError):
    """Subtitles were asked of a result whose lines carry no timestamps."""


class NotReady(Exception):
    """The prompt's files are not usable yet; it waits in the queue (woken when they are)."""


class Waiting(Exception):
    """The prompt may not send now (a rate limit, the budget); it waits in the queue until `at` (None: until
    something changes, e.g. the budget is raised or ask --force)."""

    def __init__(self, message: str, at: datetime | None, kind: str) -> None:
        super().__init__(message)
        self.at = at
        self.kind = kind


class Truncated(Exception):
    """The model's answer stopped early (finish reason not STOP, or empty)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SourceChanged(Exception):
    """The file at the source path is not (or no longer) exactly the one taken."""
