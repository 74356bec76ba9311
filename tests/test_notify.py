"""Notifications against a real HTTP receiver (http.server on 127.0.0.1) and a real migrated SQLite database: events
are recorded in their cause's transaction, webhooks are signed and retried with the same idempotency key, a
kill -9 between send and commit ends in a repeat the receiver drops by its key, and the command hook runs argv
without a shell, without secrets and within its time limit."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon import notify
from daemon.clock import SystemClock
from daemon.config import Settings
from daemon.engine import Claim, Engine
from daemon.pipeline import lifecycle
from daemon.prompts import lifecycle as prompt_lifecycle
from db.models import OutboxMessage, Prompt, PromptRecording
from db.session import make_engine, make_sessionmaker, session_scope, upgrade_to_head
from db.states import PromptState as P
from db.states import RecordingState as S
from tests.conftest import T0

ROOT = Path(__file__).resolve().parent.parent
SECRET = "webhook-secret-0b5e"


# -- settings, host and receiver --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hook:
    url: str
    name: str | None = "receiver"
    secret: str | None = SECRET
    secret_file: Path | None = None
    events: tuple[str, ...] = ()
    timeout_seconds: float = 2.0


@dataclass(frozen=True)
class NotifyOptions:
    on_result: tuple[str, ...] = ()
    command_timeout_seconds: float = 5.0
    desktop: bool = False
    offline_after_seconds: float = 3600.0


@dataclass(frozen=True)
class Config:
    webhooks: tuple[Hook, ...] = ()
    notify: NotifyOptions = NotifyOptions()


@dataclass
class Host:
    """What daemon.context.Context gives OutboxKind, with a clock the test moves."""

    settings: Config
    sessions: sessionmaker[Session]
    current: datetime | None = T0
    holder: str = "test"
    woken: list[tuple[str, ...]] = field(default_factory=list)
    wake_to: Callable[..., None] | None = None

    def now(self) -> datetime:
        return self.current or datetime.now(UTC)

    def wake(self, *kinds: str, at: datetime | None = None) -> None:
        self.woken.append(kinds)
        if self.wake_to is not None:
            self.wake_to(*kinds, at=at)


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """A webhook receiver: records every request; answers each in turn as `plan` says (ok, 500, hang, drop), then
    ok; handles each idempotency key once, as a receiver should."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.handled: list[str] = []
        self.plan: list[str] = []
        self.release = threading.Event()
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                receiver.handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers["Content-Length"]))
        with self.cond:
            self.requests.append(Request(dict(handler.headers), body, time.monotonic()))
            action = self.plan.pop(0) if self.plan else "ok"
            self.cond.notify_all()
        if action == "hang":
            self.release.wait(10)
            return
        if action == "drop":
            handler.close_connection = True
            return
        if action in ("500", "busy"):
            handler.send_response(500 if action == "500" else 503)
            if action == "busy":
                handler.send_header("Retry-After", "120")
        else:
            key = handler.headers["X-Audiodrop-Delivery"]
            if key not in self.handled:  # a repeat is answered 200 and dropped
                self.handled.append(key)
            handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Request]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.requests) >= count, timeout), f"{len(self.requests)} requests"
            return list(self.requests)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One database migrated to head for the module; each test gets a copy (migrating takes a second)."""
    path = tmp_path_factory.mktemp("template") / "audiodrop.db"
    upgrade_to_head(path)
    return path


@pytest.fixture
def sessions(settings: Settings, migrated: Path) -> Iterator[sessionmaker[Session]]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(migrated)) as source, closing(sqlite3.connect(settings.database_path)) as copy:
        source.backup(copy)
    engine = make_engine(settings.database_path)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def host(sessions: sessionmaker[Session], receiver: Receiver) -> Host:
    return Host(Config(webhooks=(Hook(receiver.url),)), sessions)


def kind_for(host: Host) -> notify.OutboxKind:
    return notify.OutboxKind(host, lambda now: now + timedelta(seconds=60))


def deliver_due(host: Host) -> list[Claim]:
    """One pass of the engine's work for the notify kind: claim what is due, run it."""
    kind = kind_for(host)
    with session_scope(host.sessions) as session:
        claims = kind.claim(session, host.now(), 10)
    for claim in claims:
        kind.run(claim)
    return claims


def emit(host: Host, event: str = "result.done", key: str = "prompt-42-done", **data: Any) -> None:
    with session_scope(host.sessions) as session:
        notify.emit(session, host, event, key, data or {"prompt_id": 42, "summary": "Five points."})


def rows(sessions: sessionmaker[Session]) -> list[OutboxMessage]:
    with session_scope(sessions) as session:
        found = list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))
        session.expunge_all()
        return found


# -- recording events -------------------------------------------------------------------------------------------

def test_an_event_is_recorded_per_target_in_its_causes_transaction_and_once_per_key(host: Host) -> None:
    host.settings = Config(webhooks=(Hook("http://a.invalid/", name="a"),
                                     Hook("http://b.invalid/", name="b", events=("prompt.failed",))),
                           notify=NotifyOptions(on_result=("true",)))
    with pytest.raises(RuntimeError), session_scope(host.sessions) as session:
        notify.emit(session, host, "result.done", "prompt-1-done", {"prompt_id": 1})
        raise RuntimeError("the cause rolls back")
    assert rows(host.sessions) == []
    emit(host, key="prompt-1-done")
    emit(host, key="prompt-1-done")  # the same event again: nothing new, and the caller's transaction is fine
    assert [(r.target, r.key, r.event) for r in rows(host.sessions)] == [
        ("a", "prompt-1-done", "result.done"), ("command", "prompt-1-done", "result.done")]
    assert host.woken == [("notify",)], "woken after the commit that added rows, not after the rollback"


def test_state_changes_become_events_through_the_history_rows(host: Host) -> None:
    notify.follow_history(host.sessions, host)
    with session_scope(host.sessions) as session:
        recording = lifecycle.discover(session, path="/in/talk.wav", size=1, mtime_ns=1, watch_root="/in",
                                       closed_after_write=True, now=T0)
        lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.REJECTED, now=T0,
                          reason="not audio", error="talk.wav: not an audio file")
        prompt = Prompt(state=P.FAILED, template="summarize", prompt_text="x", model="m", created_at=T0,
                        error="the model refused", attempts=2)
        session.add(prompt)
        session.flush()
        session.add(PromptRecording(prompt_id=prompt.id, recording_id=recording.id))
        lifecycle.note(session, recording.id, now=T0, reason="a note, not a change")
    with session_scope(host.sessions) as session:
        prompt_lifecycle.advance(session, prompt.id, expected=P.FAILED, to=P.QUEUED, now=T0, reason="retry")
        prompt_lifecycle.advance(session, prompt.id, expected=P.QUEUED, to=P.FAILED, now=T0, reason="again")
    found = rows(host.sessions)
    assert [(r.event, r.key.rsplit("-", 1)[0]) for r in found] == [
        ("recording.rejected", f"recording-{recording.id}-rejected"), ("prompt.failed", f"prompt-{prompt.id}-failed")]
    assert json.loads(found[0].payload) == {"recording_id": recording.id, "source_path": "/in/talk.wav",
                                            "name": "talk.wav", "error": "talk.wav: not an audio file",
                                            "at": "2026-11-25T12:00:00Z"}
    assert json.loads(found[1].payload)["recording_ids"] == [recording.id]


def test_result_done_carries_a_one_line_summary_and_the_result_path(host: Host) -> None:
    with session_scope(host.sessions) as session:
        prompt = Prompt(state=P.DONE, template="summarize", prompt_text="x", model="m", created_at=T0,
                        result_text="# Meeting\n\n- Budget approved\n- " + "long " * 100,
                        result_path="/r/talk.summarize.md", result_meta=json.dumps({"recordings": ["talk.wav"]}))
        session.add(prompt)
        session.flush()
        assert notify.result_done(session, host, prompt.id) == 1
    data = json.loads(rows(host.sessions)[0].payload)
    assert data["summary"].startswith("Meeting Budget approved long") and data["summary"].endswith("…")
    assert len(data["summary"]) <= 200
    assert (data["result_path"], data["recordings"], data["template"]) == ("/r/talk.summarize.md", ["talk.wav"],
                                                                            "summarize")


def test_quota_budget_and_offline_events_come_once_per_hour_period_and_outage(host: Host) -> None:
    with session_scope(host.sessions) as session:
        for minute in (0, 30):
            notify.quota_full(session, host, used_bytes=20, limit_bytes=21, needed_bytes=2, detail="full",
                              now=T0 + timedelta(minutes=minute))
        for _ in range(2):
            notify.budget_reached(session, host, period="day", spent_usd=Decimal("5.0012"), budget_usd=Decimal(5))
        since = T0 - timedelta(minutes=30)
        assert notify.daemon_offline(session, host, since=since, reason="network") == 0, "not long enough yet"
        host.current = T0 + timedelta(hours=1)
        assert notify.daemon_offline(session, host, since=since, reason="network", detail="offline") == 1
        assert notify.daemon_offline(session, host, since=since, reason="network") == 0, "once per outage"
    found = rows(host.sessions)
    assert [(r.event, r.key) for r in found] == [("quota.full", "quota-full-20261125T12"),
                                                  ("budget.reached", "budget-day-2026-11-25"),
                                                  ("daemon.offline", "offline-network-20261125T113000")]
    assert json.loads(found[1].payload) == {"period": "day", "spent_usd": 5.0012, "budget_usd": 5.0}
    assert json.loads(found[2].payload)["seconds"] == 5400


# -- webhooks ---------------------------------------------------------------------------------------------------

def test_a_webhook_gets_signed_json_with_the_idempotency_key(host: Host, receiver: Receiver) -> None:
    emit(host)
    assert len(deliver_due(host)) == 1
    request = receiver.wait_for(1)[0]
    headers = request.headers
    assert headers["Content-Type"] == "application/json" and headers["X-Audiodrop-Event"] == "result.done"
    assert headers["X-Audiodrop-Delivery"] == "prompt-42-done"
    assert headers["X-Audiodrop-Timestamp"] == str(int(T0.timestamp()))
    assert notify.verify(SECRET.encode(), headers["X-Audiodrop-Timestamp"], request.body,
                         headers["X-Audiodrop-Signature"], now=T0.timestamp())
    assert not notify.verify(b"wrong", headers["X-Audiodrop-Timestamp"], request.body,
                             headers["X-Audiodrop-Signature"], now=T0.timestamp())
    assert not notify.verify(SECRET.encode(), headers["X-Audiodrop-Timestamp"], request.body,
                             headers["X-Audiodrop-Signature"], now=T0.timestamp() + 3600), "a replay an hour later"
    assert json.loads(request.body) == {"key": "prompt-42-done", "event": "result.done",
                                        "created_at": "2026-11-25T12:00:00Z",
                                        "data": {"prompt_id": 42, "summary": "Five points."}}
    row = rows(host.sessions)[0]
    assert (row.delivered_at, row.attempts, row.claimed_by) == (T0, 1, None)


@pytest.mark.parametrize("failure", ["500", "hang", "drop"])
def test_a_failed_delivery_is_retried_with_backoff_and_the_same_key(host: Host, receiver: Receiver,
                                                                     failure: str) -> None:
    host.settings = Config(webhooks=(Hook(receiver.url, timeout_seconds=0.5),))
    receiver.plan = [failure]
    emit(host)
    started = time.monotonic()
    deliver_due(host)
    assert time.monotonic() - started < 2.0, "a hanging receiver holds a delivery no longer than its time limit"
    row = rows(host.sessions)[0]
    expected = {"500": "answered HTTP 500", "hang": "no answer within 0.5 s", "drop": "not reached"}[failure]
    assert row.delivered_at is None and row.attempts == 1 and expected in (row.last_error or "")
    assert row.next_attempt_at is not None and 5 <= (row.next_attempt_at - T0).total_seconds() <= 6.25
    host.current = T0 + timedelta(seconds=4)
    assert deliver_due(host) == [], "not before its backoff"
    host.current = T0 + timedelta(seconds=7)
    assert len(deliver_due(host)) == 1
    first, second = receiver.wait_for(2)
    assert first.headers["X-Audiodrop-Delivery"] == second.headers["X-Audiodrop-Delivery"] == "prompt-42-done"
    assert first.body == second.body
    row = rows(host.sessions)[0]
    assert row.delivered_at == T0 + timedelta(seconds=7) and row.attempts == 2 and receiver.handled == [row.key]


def test_a_retry_after_is_honoured_and_it_gives_up_after_a_day(host: Host, receiver: Receiver) -> None:
    receiver.plan = ["busy"]
    emit(host)
    deliver_due(host)
    row = rows(host.sessions)[0]
    assert row.next_attempt_at is not None and 120 <= (row.next_attempt_at - T0).total_seconds() <= 150
    host.current = T0 + timedelta(hours=25)
    receiver.plan = ["500"]
    deliver_due(host)
    row = rows(host.sessions)[0]
    assert row.gave_up_at == host.current and row.next_attempt_at is None and row.delivered_at is None
    with session_scope(host.sessions) as session:
        assert notify.summary(session)["gave_up"] == 1


CHILD = textwrap.dedent("""
    import sys, time
    from datetime import UTC, datetime, timedelta
    from pathlib import Path
    from types import SimpleNamespace
    from daemon import notify
    from db.session import make_engine, make_sessionmaker, session_scope

    database, url, secret, marker = sys.argv[1:]
    hook = SimpleNamespace(url=url, name="receiver", secret=secret, secret_file=None, events=(), timeout_seconds=5.0)
    host = SimpleNamespace(settings=SimpleNamespace(webhooks=(hook,), notify=None), holder="child",
                           sessions=make_sessionmaker(make_engine(Path(database))), now=lambda: datetime.now(UTC),
                           wake=lambda *kinds, at=None: None)

    class Dying(notify.OutboxKind):
        def record(self, claim, message, outcome):  # sent and answered: the commit never comes
            Path(marker).write_text(str(outcome.delivered))
            time.sleep(60)

    kind = Dying(host, lambda now: now + timedelta(seconds=60))
    with session_scope(host.sessions) as session:
        claims = kind.claim(session, host.now(), 1)
    kind.run(claims[0])
""")


def test_a_kill_9_between_send_and_commit_resends_with_the_same_key_and_the_receiver_drops_it(
        host: Host, receiver: Receiver, settings: Settings, tmp_path: Path) -> None:
    host.current = None  # the real clock: the child judges leases by it too
    emit(host)
    marker = tmp_path / "sent"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(settings.database_path), receiver.url, SECRET,
                              str(marker)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        receiver.wait_for(1, timeout=15)
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.read_text() == "True", "the receiver answered 200 before the kill"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    row = rows(host.sessions)[0]
    assert row.claimed_by == "child" and row.delivered_at is None, "killed before its commit"
    engine = Engine(host.sessions, SystemClock(), "parent", [kind_for(host)], [notify.OutboxSweeper()])
    host.wake_to = engine.wake
    engine.start()  # one node per SQLite file: the dead run's claim is taken back at start
    try:
        first, second = receiver.wait_for(2)
        deadline = time.monotonic() + 5
        while rows(host.sessions)[0].delivered_at is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.stop(2.0)
    assert first.headers["X-Audiodrop-Delivery"] == second.headers["X-Audiodrop-Delivery"] == "prompt-42-done"
    assert first.body == second.body
    assert receiver.handled == ["prompt-42-done"], "the repeat was dropped by its key"
    assert rows(host.sessions)[0].delivered_at is not None


def test_with_the_engine_running_an_event_arrives_right_after_its_commit_and_a_hang_blocks_nothing(
        host: Host, receiver: Receiver) -> None:
    host.current = None
    host.settings = Config(webhooks=(Hook(receiver.url, timeout_seconds=1.5),))
    engine = Engine(host.sessions, SystemClock(), "me", [kind_for(host)], [notify.OutboxSweeper()])
    host.wake_to = engine.wake
    engine.start()
    receiver.plan = ["hang"]
    try:
        emit(host, key="prompt-1-done")
        receiver.wait_for(1)
        started = time.monotonic()
        emit(host, key="prompt-2-done")
        emitted = time.monotonic()
        second = receiver.wait_for(2)[1]
    finally:
        engine.stop(3.0)
    assert emitted - started < 0.2, "emitting is one insert, whatever the receiver does"
    assert second.headers["X-Audiodrop-Delivery"] == "prompt-2-done"
    assert second.at - emitted < 1.0, "delivered while the first delivery still hangs"


# -- the command hook and the desktop -------------------------------------------------------------------------

RECORD_ARGV = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps([sys.argv[2:], dict(os.environ)]))"


def test_the_command_hook_runs_argv_without_a_shell_and_without_secrets(
        host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.setenv(variable, "must-not-leak")
    out, touched = tmp_path / "argv.json", tmp_path / "x"
    host.settings = Config(notify=NotifyOptions(
        on_result=(sys.executable, "-c", RECORD_ARGV, str(out), "{summary}", "id {prompt_id}", "{unknown}")))
    emit(host, summary=f"$(touch {touched}) `touch {touched}`; {{key}}", prompt_id=7)
    deliver_due(host)
    argv, env = json.loads(out.read_text())
    assert argv == [f"$(touch {touched}) `touch {touched}`; {{key}}", "id 7", "{unknown}"]
    assert not touched.exists()
    assert not {"GEMINI_API_KEY", "GOOGLE_API_KEY", "CREDENTIALS_DIRECTORY"} & set(env)
    assert env["AUDIODROP_EVENT"] == "result.done" and env["AUDIODROP_DELIVERY"] == "prompt-42-done"
    assert rows(host.sessions)[0].delivered_at is not None


def test_a_hanging_command_is_killed_at_its_time_limit_and_a_missing_one_is_given_up(host: Host) -> None:
    host.settings = Config(notify=NotifyOptions(on_result=(sys.executable, "-c", "import time; time.sleep(30)"),
                                                command_timeout_seconds=0.5))
    emit(host)
    started = time.monotonic()
    deliver_due(host)
    assert time.monotonic() - started < 3.0
    row = rows(host.sessions)[0]
    assert "did not finish within 0.5 s" in (row.last_error or "") and row.next_attempt_at is not None
    host.settings = Config(notify=NotifyOptions(on_result=("/nonexistent/notifier",)))
    host.current = T0 + timedelta(seconds=7)
    deliver_due(host)
    row = rows(host.sessions)[0]
    assert row.gave_up_at is not None and "cannot be run" in (row.last_error or "")


def test_desktop_notifications_need_a_session_bus(host: Host, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    host.settings = Config(notify=NotifyOptions(desktop=True))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    emit(host, key="no-bus")
    assert rows(host.sessions) == []
    out = tmp_path / "notify-send.json"
    fake = tmp_path / "bin" / "notify-send"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/run/user/1000/bus")
    emit(host, "recording.rejected", "recording-3-rejected-9", name="talk.wav", error="not an audio file")
    emit(host, "recording.failed", "recording-3-failed-10", name="talk.wav", error="passing")
    deliver_due(host)
    assert json.loads(out.read_text()) == ["--app-name=audiodrop", "audiodrop: a recording was rejected",
                                           "talk.wav — not an audio file"]
    assert [row.event for row in rows(host.sessions)] == ["recording.rejected"], "a passing failure stays quiet"


# -- through the daemon ----------------------------------------------------------------------------------------

def test_the_running_daemon_notifies_a_result_and_a_rejected_file(tmp_path: Path, emulator: Any,
                                                                   receiver: Receiver) -> None:
    """`audiodrop run` with a webhook: a transcript's result.done (signed, with its result path) and a
    rejection's recording.rejected arrive at a real receiver, each once."""
    from tests import media
    from tests.harness import DaemonProcess

    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET + "\n")
    folder = tmp_path / "d"
    daemon = DaemonProcess(folder, base_url=emulator.base_url,
                           watch=[{"path": str(folder / "inbox"), "prompts": ["transcribe"]}],
                           webhooks=[{"name": "receiver", "url": receiver.url, "secret_file": str(secret_file)}])
    daemon.start()
    try:
        media.make_tone(daemon.inbox / "standup.wav", 3.0)
        (daemon.inbox / "notes.mp3").write_bytes(b"this is not audio at all" * 100)
        received = receiver.wait_for(2, timeout=90)
        events = {request.headers["X-Audiodrop-Event"]: request for request in received}
        assert set(events) == {"result.done", "recording.rejected"}, daemon.log()[-3000:]
        done = events["result.done"]
        assert notify.verify(SECRET.encode(), done.headers["X-Audiodrop-Timestamp"], done.body,
                             done.headers["X-Audiodrop-Signature"], now=time.time())
        data = json.loads(done.body)["data"]
        assert data["recordings"] == ["standup.wav"] and Path(data["result_path"]).is_file()
        rejected = json.loads(events["recording.rejected"].body)["data"]
        assert rejected["name"] == "notes.mp3" and rejected["error"]
    finally:
        daemon.stop()
    assert len(receiver.requests) == 2  # nothing sent twice
