"""Notifications: webhooks, a command hook and desktop notifications about what people wait for or must act on.

An event is written to the `outbox` table in the transaction of its cause (`emit` and the helpers below it, or
`follow_history` for state changes), one row per target that wants it, so it exists exactly when its cause is
committed and never otherwise. `OutboxKind`, engine work of its own ("notify", two workers), delivers the rows
afterwards, outside any transaction: the pipeline never waits on a receiver, a hanging one holds only a notify
worker, and only up to its time limit.

Delivery is at least once. Every attempt for a row sends the same body and the same idempotency key
(X-Audiodrop-Delivery); a receiver that remembers the keys it handled drops a repeat. A repeat happens only when
the daemon dies (kill -9, power cut) after the receiver answered and before the delivery was committed: the
claim's lease passes, the row is taken back and sent again, with the same key.

Webhooks ([[webhooks]] url, secret or secret_file, events, timeout_seconds)
    A POST of the envelope {"key", "event", "created_at", "data"} (JSON, UTF-8) with the headers
        Content-Type: application/json
        X-Audiodrop-Event: result.done
        X-Audiodrop-Delivery: prompt-42-done        the idempotency key, the same on every attempt
        X-Audiodrop-Timestamp: 1764680000           Unix seconds of this attempt
        X-Audiodrop-Signature: sha256=<hex>         HMAC-SHA256 of "<timestamp>.<body>" keyed with the secret
                                                    (absent when the webhook has no secret)
    A receiver checks the signature over the raw body and refuses stale timestamps (`verify` does both). A 2xx
    answer is delivered; redirects are not followed. Anything else (another status, a refused or dropped
    connection, no answer within timeout_seconds for the connection or any read) is retried after 5 s, 10 s,
    20 s ... at most 30 min apart, with jitter (a Retry-After of up to an hour is honoured). After 50 attempts
    or 24 hours it gives up: the row keeps `gave_up_at` and `last_error`, the log says so at ERROR, and
    `summary()` counts it for `status`. Delivered and given-up rows are deleted after 7 days.

The command hook ([notify] on_result = ["notify-send", "audiodrop", "{summary}"], command_timeout_seconds)
    Runs on result.done: an argv list, never a shell. "{name}" in an argument becomes the field of the event's
    data (or "event", "key"; lists joined by ", "; an unknown name stays as written); nothing in a value is
    interpreted. The environment is the daemon's without GEMINI_API_KEY, GOOGLE_API_KEY, CREDENTIALS_DIRECTORY
    and AUDIODROP_DATABASE_URL, plus AUDIODROP_EVENT, AUDIODROP_DELIVERY and AUDIODROP_PAYLOAD (the envelope).
    A non-zero exit, or passing the time limit (its process group is killed), is retried like a webhook; a
    program that cannot be run is given up at once.

Desktop notifications ([notify] desktop = true; for the user service)
    notify-send, when a session bus is there (DBUS_SESSION_BUS_ADDRESS), for every event but recording.failed
    (a passing problem that is retried by itself). Best effort: tried once.

The events and their data (times ISO 8601 UTC):
    result.done         {prompt_id, template, recording_ids, recordings (file names), model, result_path,
                         summary (the result's beginning, one line, at most 200 characters), output_tokens,
                         finished_at}                                      key prompt-<id>-done
    prompt.failed       {prompt_id, template, recording_ids, error, attempts, at}
                                                                           key prompt-<id>-failed-<event id>
    recording.rejected  {recording_id, source_path, name, error, at}       key recording-<id>-rejected-<event id>
    recording.failed    {recording_id, source_path, name, error, attempts, next_attempt_at (null: it waits for
                         `audiodrop retry`), at}                           key recording-<id>-failed-<event id>
    quota.full          {used_bytes, limit_bytes, needed_bytes, detail}    key quota-full-<UTC hour>
    budget.reached      {period ("day" or "month"), spent_usd, budget_usd} key budget-<period>-<date or month>
    daemon.offline      {reason ("network": the API unreachable; "stopped": the daemon was not running), since,
                         seconds, detail}                                  key offline-<reason>-<since>

This module reads its settings through the protocols below (the webhooks and [notify] tables of
daemon.config.Settings) and must not import google.genai or the pipeline.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.message import Message as HeaderMessage
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from sqlalchemy import Connection, delete, func, or_, select, update
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from daemon import policy
from daemon.engine import Claim
from db.models import OutboxMessage, Prompt, PromptEvent, PromptRecording, Recording, RecordingEvent
from db.session import rowcount, session_scope

log = logging.getLogger(__name__)

EVENTS = ("result.done", "prompt.failed", "recording.rejected", "recording.failed", "quota.full", "budget.reached",
          "daemon.offline")
DESKTOP_EVENTS = frozenset(EVENTS) - {"recording.failed"}
KIND = "notify"
COMMAND = "command"
DESKTOP = "desktop"
MAX_ATTEMPTS = 50
GIVE_UP_AFTER = timedelta(hours=24)
KEEP_FINISHED = timedelta(days=7)
MAX_RETRY_AFTER_SECONDS = 3600.0
SIGNATURE_TOLERANCE_SECONDS = 300.0
DESKTOP_TIMEOUT_SECONDS = 5.0
SECRET_VARIABLES = frozenset({"GEMINI_API_KEY", "GOOGLE_API_KEY", "CREDENTIALS_DIRECTORY", "AUDIODROP_DATABASE_URL"})
SUMMARY_CHARS = 200
ERROR_CHARS = 500
_WAKE_PENDING = "notify.wake_after_commit"


# -- what this module reads of the settings -------------------------------------------------------------------

class HookConfig(Protocol):
    """One [[webhooks]] table."""

    @property
    def url(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def secret(self) -> str | None: ...
    @property
    def secret_file(self) -> Path | None: ...
    @property
    def events(self) -> Sequence[str]: ...
    @property
    def timeout_seconds(self) -> float: ...


class NotifyConfig(Protocol):
    """The [notify] table."""

    @property
    def on_result(self) -> Sequence[str]: ...
    @property
    def command_timeout_seconds(self) -> float: ...
    @property
    def desktop(self) -> bool: ...
    @property
    def offline_after_seconds(self) -> float: ...


class SettingsView(Protocol):
    """What notifications need of daemon.config.Settings."""

    @property
    def webhooks(self) -> Sequence[HookConfig]: ...
    @property
    def notify(self) -> NotifyConfig: ...


@runtime_checkable
class HasSettings(Protocol):
    """A daemon.context.Context, as far as `emit` is concerned."""

    @property
    def settings(self) -> SettingsView: ...


class Host(Protocol):
    """What OutboxKind needs of daemon.context.Context."""

    @property
    def settings(self) -> SettingsView: ...
    @property
    def sessions(self) -> sessionmaker[Session]: ...
    @property
    def holder(self) -> str: ...
    def now(self) -> datetime: ...


Source = SettingsView | HasSettings


# -- emitting: one row per target, in the caller's transaction ------------------------------------------------

def emit(session: Session, source: Source, event: str, key: str, payload: Mapping[str, Any], *,
         now: datetime | None = None) -> int:
    """Record `event` for every target that wants it, in `session`'s transaction; how many rows were added. An
    event whose key a target already has is not added again. With a Context, the notify work is woken once the
    transaction commits (with bare settings the caller wakes it: ctx.wake("notify"))."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}")
    settings = _settings(source)
    names = targets(settings, event)
    if not names:
        return 0
    at = now or _now(source)
    body = json.dumps(dict(payload), ensure_ascii=False, separators=(",", ":"), default=_json_value)
    rows = [{"event": event, "key": key, "target": name, "payload": body, "created_at": at, "attempts": 0,
             "next_attempt_at": at} for name in names]
    added = _insert(session.connection(), rows)
    if added:
        _wake_after_commit(session, source)
    return added


def targets(settings: SettingsView, event: str) -> list[str]:
    """The targets that want `event`: webhooks by name, then "command" and "desktop"."""
    names = [webhook_name(hook) for hook in settings.webhooks if not hook.events or event in hook.events]
    if event == "result.done" and settings.notify.on_result:
        names.append(COMMAND)
    if settings.notify.desktop and event in DESKTOP_EVENTS and session_bus():
        names.append(DESKTOP)
    return names


def webhook_name(hook: HookConfig) -> str:
    """Its name, or one made from a hash of its URL (a URL may hold a token: it is never stored or logged)."""
    return hook.name or "webhook-" + hashlib.sha256(hook.url.encode()).hexdigest()[:8]


def session_bus() -> bool:
    return bool(os.environ.get("DBUS_SESSION_BUS_ADDRESS"))


def _settings(source: Source) -> SettingsView:
    return source.settings if isinstance(source, HasSettings) else source


def _now(source: object) -> datetime:
    now = getattr(source, "now", None)
    return now() if callable(now) else datetime.now(UTC)


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if value else None


def _insert(connection: Connection, rows: list[dict[str, Any]]) -> int:
    """INSERT ... ON CONFLICT (key, target) DO NOTHING: a repeated event never fails the caller's transaction.
    How many rows were new."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(OutboxMessage).values(rows).on_conflict_do_nothing(index_elements=["key", "target"])
    return len(connection.execute(statement.returning(OutboxMessage.id)).all())


def _wake_after_commit(session: Session, source: object) -> None:
    """The notify work looks at the outbox once this transaction commits (a rollback forgets it)."""
    wake = getattr(source, "wake", None)
    if callable(wake):
        session.info[_WAKE_PENDING] = wake


@sqlalchemy_event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    wake = session.info.pop(_WAKE_PENDING, None)
    if wake is None:
        return
    try:
        wake(KIND)
    except Exception:  # committed all the same: the engine finds the rows when it starts or next looks
        log.debug("waking the notify work failed", exc_info=True)


@sqlalchemy_event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    session.info.pop(_WAKE_PENDING, None)


# -- the events ---------------------------------------------------------------------------------------------------

def result_done(session: Session, source: Source, prompt_id: int, *, now: datetime | None = None) -> int:
    """result.done for a done prompt whose result is stored (call it where `result_path` is written)."""
    prompt = session.get(Prompt, prompt_id, populate_existing=True)
    if prompt is None or prompt.result_text is None:
        return 0
    meta = json.loads(prompt.result_meta or "{}")
    data = {"prompt_id": prompt.id, "template": prompt.template,
            "recording_ids": [link.recording_id for link in prompt.recordings],
            "recordings": meta.get("recordings", []), "model": prompt.model, "result_path": prompt.result_path,
            "summary": summarize(prompt.result_text), "output_tokens": prompt.output_tokens,
            "finished_at": _iso(prompt.finished_at)}
    return emit(session, source, "result.done", f"prompt-{prompt.id}-done", data, now=now)


def quota_full(session: Session, source: Source, *, used_bytes: int, limit_bytes: int, needed_bytes: int,
               detail: str, now: datetime | None = None) -> int:
    """quota.full: uploads wait for storage. At most one per hour."""
    at = now or _now(source)
    data = {"used_bytes": used_bytes, "limit_bytes": limit_bytes, "needed_bytes": needed_bytes, "detail": detail}
    return emit(session, source, "quota.full", f"quota-full-{at:%Y%m%dT%H}", data, now=at)


def budget_reached(session: Session, source: Source, *, period: str, spent_usd: float | Decimal,
                   budget_usd: float | Decimal, now: datetime | None = None) -> int:
    """budget.reached: the spending limit of the day or month is used up. Once per period."""
    at = now or _now(source)
    label = f"{at:%Y-%m-%d}" if period == "day" else f"{at:%Y-%m}"
    data = {"period": period, "spent_usd": round(float(spent_usd), 6), "budget_usd": float(budget_usd)}
    return emit(session, source, "budget.reached", f"budget-{period}-{label}", data, now=at)


def daemon_offline(session: Session, source: Source, *, since: datetime, reason: str, detail: str | None = None,
                   now: datetime | None = None) -> int:
    """daemon.offline, once `since` is at least notify.offline_after_seconds ago; once per outage."""
    at = now or _now(source)
    seconds = (at - since).total_seconds()
    if seconds < _settings(source).notify.offline_after_seconds:
        return 0
    data = {"reason": reason, "since": _iso(since), "seconds": round(seconds), "detail": detail}
    return emit(session, source, "daemon.offline", f"offline-{reason}-{since:%Y%m%dT%H%M%S}", data, now=at)


def summarize(text: str) -> str:
    """The beginning of a result on one line: "# Title\\n\\n- first point" -> "Title first point"."""
    lines = (line.strip().lstrip("#*- ").strip() for line in text.strip().splitlines()[:20])
    line = " ".join(" ".join(lines).split())
    return line if len(line) <= SUMMARY_CHARS else line[:SUMMARY_CHARS - 1].rstrip() + "…"


# -- state changes, followed from the history rows ---------------------------------------------------------------

def follow_history(sessions: sessionmaker[Session], source: Source) -> None:
    """recording.rejected, recording.failed and prompt.failed from the history rows every state change writes
    (RecordingEvent, PromptEvent), in the flush that writes them: no call is needed where a state changes, and
    none can be forgotten. Install once on the daemon's sessionmaker."""

    def after_flush(session: Session, _flush: object) -> None:
        for item in list(session.new):
            if isinstance(item, RecordingEvent | PromptEvent) and item.to_state != item.from_state:
                try:
                    _from_history(session, source, item)
                except Exception:  # a notification never costs the state change that caused it
                    log.exception("the notification of %s could not be recorded", item)

    sqlalchemy_event.listen(sessions, "after_flush", after_flush)


def _from_history(session: Session, source: Source, item: RecordingEvent | PromptEvent) -> None:
    if isinstance(item, RecordingEvent) and item.to_state in ("rejected", "failed"):
        event, key = f"recording.{item.to_state}", f"recording-{item.recording_id}-{item.to_state}-{item.id}"
        if targets(_settings(source), event):
            emit(session, source, event, key, _recording_data(session.connection(), item), now=item.at)
    elif isinstance(item, PromptEvent) and item.to_state == "failed":
        key = f"prompt-{item.prompt_id}-failed-{item.id}"
        if targets(_settings(source), "prompt.failed"):
            emit(session, source, "prompt.failed", key, _prompt_data(session.connection(), item), now=item.at)


def _recording_data(connection: Connection, item: RecordingEvent) -> dict[str, Any]:
    row = connection.execute(select(Recording.source_path, Recording.error, Recording.attempts,
                                    Recording.next_attempt_at).where(Recording.id == item.recording_id)).one()
    data = {"recording_id": item.recording_id, "source_path": row.source_path,
            "name": os.path.basename(row.source_path), "error": _clip(row.error or item.reason), "at": _iso(item.at)}
    if item.to_state == "failed":
        data.update(attempts=row.attempts, next_attempt_at=_iso(row.next_attempt_at))
    return data


def _prompt_data(connection: Connection, item: PromptEvent) -> dict[str, Any]:
    row = connection.execute(select(Prompt.template, Prompt.error, Prompt.attempts)
                             .where(Prompt.id == item.prompt_id)).one()
    recording_ids = connection.execute(select(PromptRecording.recording_id).where(
        PromptRecording.prompt_id == item.prompt_id).order_by(PromptRecording.position)).scalars().all()
    return {"prompt_id": item.prompt_id, "template": row.template, "recording_ids": list(recording_ids),
            "error": _clip(row.error or item.reason), "attempts": row.attempts, "at": _iso(item.at)}


def _clip(text: str | None) -> str | None:
    return text if text is None or len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 1] + "…"


# -- delivering ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    """One claimed outbox row."""

    id: int
    event: str
    key: str
    target: str
    payload: str
    created_at: datetime
    attempts: int

    def envelope(self) -> bytes:
        """The body: the same bytes on every attempt."""
        return (f'{{"key":{json.dumps(self.key)},"event":{json.dumps(self.event)},'
                f'"created_at":{json.dumps(_iso(self.created_at))},"data":{self.payload}}}').encode()


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: delivered, or why not, and whether to stop trying (`final`)."""

    delivered: bool
    error: str | None = None
    final: bool = False
    retry_after: float | None = None


class OutboxKind:
    """Engine work: deliver due outbox rows, each under a claim, outside any transaction; the outcome is written
    fenced by the claim's token."""

    name = KIND
    # A stop does not wait for a receiver: a delivery cut short is sent again at the next start, with its key.
    restartable = True

    def __init__(self, host: Host, lease: Callable[[datetime], datetime], *, workers: int = 2) -> None:
        self.host = host
        self.lease = lease
        self._workers = workers
        self._next_prune: datetime | None = None

    def workers(self) -> int:
        return self._workers

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        self._prune(session, now)
        due = session.scalars(select(OutboxMessage).where(
            _pending(), OutboxMessage.next_attempt_at <= now,
            or_(OutboxMessage.claimed_until.is_(None), OutboxMessage.claimed_until < now))
            .order_by(OutboxMessage.id).limit(limit)).all()
        claims = []
        for row in due:
            taken = session.execute(update(OutboxMessage)
                                    .where(OutboxMessage.id == row.id, OutboxMessage.claim_token == row.claim_token)
                                    .values(claimed_by=self.host.holder, claimed_until=self.lease(now),
                                            claim_token=row.claim_token + 1)
                                    .execution_options(synchronize_session=False))
            if rowcount(taken):
                message = Message(row.id, row.event, row.key, row.target, row.payload, row.created_at, row.attempts)
                claims.append(Claim(self.name, OutboxMessage, row.id, row.claim_token + 1, {"message": message}))
        return claims

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        return session.scalar(select(func.min(OutboxMessage.next_attempt_at))
                              .where(_pending(), OutboxMessage.claimed_by.is_(None)))

    def run(self, claim: Claim) -> None:
        message: Message = claim.data["message"]
        self.record(claim, message, self.deliver(message))

    def deliver(self, message: Message) -> Outcome:
        """One attempt, outside any transaction."""
        try:
            return self._send(message)
        except Exception as err:  # a bug must not leave the row to come back at every lease forever
            log.exception("notification %s to %s: unexpected error", message.key, message.target)
            return Outcome(False, f"unexpected error: {type(err).__name__}: {err}")

    def _send(self, message: Message) -> Outcome:
        settings = self.host.settings
        if message.target == COMMAND:
            notify = settings.notify
            return run_command(notify.on_result, message, notify.command_timeout_seconds)
        if message.target == DESKTOP:
            return show_on_desktop(message)
        hook = next((h for h in settings.webhooks if webhook_name(h) == message.target), None)
        if hook is None:
            return Outcome(False, f"the webhook {message.target} is no longer configured", final=True)
        return post(hook, message, now=self.host.now())

    def record(self, claim: Claim, message: Message, outcome: Outcome) -> None:
        """The attempt's outcome, in one short transaction that names the claim's token."""
        now = self.host.now()
        attempts = message.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "claimed_by": None, "claimed_until": None,
                                  "last_error": outcome.error}
        if outcome.delivered:
            values.update(delivered_at=now, next_attempt_at=None)
        elif outcome.final or attempts >= MAX_ATTEMPTS or now - message.created_at >= GIVE_UP_AFTER:
            values.update(gave_up_at=now, next_attempt_at=None)
        else:
            retry_after = min(outcome.retry_after, MAX_RETRY_AFTER_SECONDS) if outcome.retry_after else None
            values.update(next_attempt_at=policy.backoff(now, attempts, retry_after))
        with session_scope(self.host.sessions) as session:
            session.execute(update(OutboxMessage)
                            .where(OutboxMessage.id == message.id, OutboxMessage.claim_token == claim.token)
                            .values(**values).execution_options(synchronize_session=False))
        _log(message, attempts, values)

    def _prune(self, session: Session, now: datetime) -> None:
        """Delivered and given-up rows go after a week (looked at once an hour)."""
        if self._next_prune is not None and now < self._next_prune:
            return
        self._next_prune = now + timedelta(hours=1)
        old = now - KEEP_FINISHED
        session.execute(delete(OutboxMessage).where(or_(OutboxMessage.delivered_at < old,
                                                        OutboxMessage.gave_up_at < old)))


class OutboxSweeper:
    """Frees the outbox rows of dead claims (they are sent again: the receiver drops a repeat by its key)."""

    def take_back(self, session: Session, now: datetime, dead: Any) -> int:
        result = session.execute(update(OutboxMessage).where(OutboxMessage.claimed_by.is_not(None),
                                                             dead(OutboxMessage))
                                 .values(claimed_by=None, claimed_until=None)
                                 .execution_options(synchronize_session=False))
        return rowcount(result)


def _pending() -> Any:
    return OutboxMessage.delivered_at.is_(None) & OutboxMessage.gave_up_at.is_(None)


def _log(message: Message, attempts: int, values: Mapping[str, Any]) -> None:
    if values.get("delivered_at"):
        log.info("notification %s (%s) delivered to %s", message.key, message.event, message.target)
    elif values.get("gave_up_at"):
        log.error("notification %s (%s) to %s given up after %d attempt(s) since %s: %s", message.key, message.event,
                  message.target, attempts, _iso(message.created_at), values["last_error"])
    else:
        log.warning("notification %s (%s) to %s not delivered (%s); trying again at %s", message.key, message.event,
                    message.target, values["last_error"], _iso(values["next_attempt_at"]))


def summary(session: Session) -> dict[str, Any]:
    """For `status --json`: {"pending": N, "gave_up": N, "oldest_pending": ISO or null, "last_error": ...}."""
    pending = session.execute(select(func.count(), func.min(OutboxMessage.created_at)).where(_pending())).one()
    gave_up = session.scalar(select(func.count()).where(OutboxMessage.gave_up_at.is_not(None))) or 0
    error = session.scalar(select(OutboxMessage.last_error).where(OutboxMessage.last_error.is_not(None))
                           .order_by(OutboxMessage.id.desc()).limit(1))
    return {"pending": pending[0], "gave_up": gave_up, "oldest_pending": _iso(pending[1]), "last_error": error}


# -- webhooks ------------------------------------------------------------------------------------------------------

class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer that is not 2xx: retried, never followed with the body and signature."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: HeaderMessage, newurl: str) -> urllib.request.Request | None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Audiodrop-Signature value: "sha256=" + hex HMAC-SHA256 of "<timestamp>.<body>"."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, *, now: float,
           tolerance: float = SIGNATURE_TOLERANCE_SECONDS) -> bool:
    """What a receiver checks: the signature over the raw body, and a timestamp close to its own clock."""
    try:
        fresh = abs(now - int(timestamp)) <= tolerance
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


def post(hook: HookConfig, message: Message, *, now: datetime) -> Outcome:
    """One POST of the message to the webhook; any 2xx is delivered."""
    body, timestamp = message.envelope(), str(int(now.timestamp()))
    headers = {"Content-Type": "application/json", "User-Agent": "audiodrop", "X-Audiodrop-Event": message.event,
               "X-Audiodrop-Delivery": message.key, "X-Audiodrop-Timestamp": timestamp}
    try:
        secret = read_secret(hook)
    except OSError as err:
        return Outcome(False, f"its secret_file cannot be read ({err.strerror or err})")
    if secret is not None:
        headers["X-Audiodrop-Signature"] = sign(secret, timestamp, body)
    request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=hook.timeout_seconds) as response:
            response.read(65536)
            status = response.status
    except urllib.error.HTTPError as err:
        err.close()
        return Outcome(False, f"answered HTTP {err.code} {err.reason}", retry_after=_retry_after(err.headers))
    except (OSError, http.client.HTTPException) as err:
        return Outcome(False, _transport_error(err, hook.timeout_seconds))
    return Outcome(True) if 200 <= status < 300 else Outcome(False, f"answered HTTP {status}")


def read_secret(hook: HookConfig) -> bytes | None:
    """The webhook's signing key: `secret`, else the file's content (read at each delivery: rotation needs no
    reload). None: requests are not signed."""
    if hook.secret:
        return hook.secret.encode()
    if hook.secret_file is not None:
        return hook.secret_file.read_text(encoding="utf-8").strip().encode()
    return None


def _retry_after(headers: HeaderMessage | None) -> float | None:
    value = headers.get("Retry-After", "") if headers is not None else ""
    return float(value) if value.strip().isdigit() else None


def _transport_error(err: BaseException, timeout: float) -> str:
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    return f"not reached: {str(reason) or type(reason).__name__}"


# -- the command hook and the desktop ----------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def command_argv(template: Sequence[str], values: Mapping[str, Any]) -> list[str]:
    """The hook's argv with its placeholders filled, in one pass (a value is never looked at again):
    ["notify-send", "audiodrop", "{summary}"], {"summary": "$(x) {key}"} -> ["notify-send", "audiodrop", "$(x) {key}"].
    """
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return _text(values[name]) if name in values else match.group(0)

    return [_PLACEHOLDER.sub(fill, argument) for argument in template]


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(_text(item) for item in value)
    return str(value)


def command_environment(message: Message) -> dict[str, str]:
    """The daemon's environment without the API key and credentials, plus the event."""
    env = {name: value for name, value in os.environ.items() if name not in SECRET_VARIABLES}
    env.update(AUDIODROP_EVENT=message.event, AUDIODROP_DELIVERY=message.key,
               AUDIODROP_PAYLOAD=message.envelope().decode())
    return env


def run_command(template: Sequence[str], message: Message, timeout: float) -> Outcome:
    """The command hook for one message."""
    if not template:
        return Outcome(False, "notify.on_result is no longer configured", final=True)
    values = {**json.loads(message.payload), "event": message.event, "key": message.key}
    return run_program(command_argv(template, values), command_environment(message), timeout)


def run_program(argv: list[str], env: dict[str, str], timeout: float) -> Outcome:
    """Run argv (no shell) in its own process group; past `timeout` the whole group is killed."""
    try:
        process = subprocess.Popen(argv, shell=False, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
    except OSError as err:
        return Outcome(False, f"{argv[0]} cannot be run: {err.strerror or err}", final=True)
    with process:
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return Outcome(False, f"{argv[0]} did not finish within {timeout:g} s and was stopped")
    if process.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] if stderr else []
        return Outcome(False, f"{argv[0]} exited with status {process.returncode}" + "".join(f": {t}" for t in tail))
    return Outcome(True)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.communicate(timeout=2)
    except subprocess.TimeoutExpired:  # a child that left the group still holds stderr
        process.kill()
        process.wait()


_TITLES = {"result.done": "result ready", "prompt.failed": "a prompt failed", "recording.rejected":
           "a recording was rejected", "recording.failed": "a recording failed", "quota.full": "storage is full",
           "budget.reached": "the budget is reached", "daemon.offline": "was offline"}


def show_on_desktop(message: Message) -> Outcome:
    """A desktop notification through notify-send; best effort, tried once."""
    program = shutil.which("notify-send")
    if not session_bus() or program is None:
        return Outcome(False, "no session bus or no notify-send (package libnotify-bin)", final=True)
    data = json.loads(message.payload)
    what = data.get("name") or _text(data.get("recordings")) or ""
    detail = data.get("summary") or data.get("error") or data.get("detail") or ""
    body = " — ".join(part for part in (what, detail) if part)
    argv = [program, "--app-name=audiodrop", f"audiodrop: {_TITLES.get(message.event, message.event)}", body]
    outcome = run_program(argv, command_environment(message), DESKTOP_TIMEOUT_SECONDS)
    return outcome if outcome.delivered else replace(outcome, final=True)
