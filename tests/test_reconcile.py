"""Reconciliation against the emulator, through the real SDK: the server's list corrects the database."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google import genai
from google.genai import types
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from daemon.context import Context
from daemon.gemini import GeminiClient, display_name_for
from daemon.pipeline import lifecycle, remote
from daemon.pipeline.lifecycle import RecordingState as S
from db import queries
from db.models import DaemonState, Recording
from db.session import session_scope
from tests import media
from tests.emulator import Emulator
from tests.harness import API_KEY

INSTANCE = "ab12cd34"


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    with Emulator(api_key=API_KEY, data_dir=tmp_path / "emulator", processing_polls=0) as emu:
        yield emu


@pytest.fixture
def ctx(settings: Settings, sessions: sessionmaker[Session], emulator: Emulator) -> Iterator[Context]:
    from dataclasses import replace

    gemini = replace(settings.gemini, base_url=emulator.base_url)
    client = GeminiClient(API_KEY, gemini)
    context = Context(settings=replace(settings, gemini=gemini), sessions=sessions, client=client,
                      instance_id=INSTANCE)
    with sessions() as session:
        session.add(DaemonState(id=1, instance_id=INSTANCE))
        session.commit()
    yield context
    client.close()


@pytest.fixture
def sdk(emulator: Emulator) -> Iterator[genai.Client]:
    with genai.Client(api_key=API_KEY, http_options=types.HttpOptions(base_url=emulator.base_url)) as client:
        yield client


def converted_recording(session: Session, folder: Path, name: str, state: S = S.CONVERTED) -> Recording:
    audio = media.make_tone(folder / f"{name}.ogg", 1.0, codec="libopus")
    recording = lifecycle.discover(session, path=str(folder / name), size=1, mtime_ns=1, watch_root=str(folder),
                                   closed_after_write=True, now=media_now())
    lifecycle.advance(session, recording.id, expected=S.DISCOVERED, to=S.CONVERTING, now=media_now())
    sha = hashlib.sha256(audio.read_bytes()).hexdigest()
    lifecycle.advance(session, recording.id, expected=S.CONVERTING, to=S.CONVERTED, now=media_now(),
                      converted_path=str(audio), converted_bytes=audio.stat().st_size, converted_mime="audio/ogg",
                      converted_sha256=sha, sha256=sha)
    session.commit()
    session.refresh(recording)
    return recording


def media_now() -> datetime:
    return datetime.now(UTC)


def drain_deletions(ctx: Context) -> None:
    """Run the queued remote deletions, as the engine's delete work does."""
    kind = remote.DeleteKind(ctx, lambda now: now + timedelta(minutes=1))
    with session_scope(ctx.sessions) as session:
        claims = kind.claim(session, ctx.now(), 100)
    for claim in claims:
        kind.run(claim)


def test_an_upload_that_finished_before_a_crash_is_adopted(ctx: Context, sdk: genai.Client, tmp_path: Path,
                                                           sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        recording = converted_recording(session, tmp_path, "memo")
        path = Path(recording.converted_path or "")
    with open(path, "rb") as stream:
        sdk.files.upload(file=stream, config={"mime_type": "audio/ogg",
                                              "display_name": display_name_for(INSTANCE, recording.id, "x")})
    remote.reconcile(ctx)
    with sessions() as session:
        adopted = session.get(Recording, recording.id)
        assert adopted is not None and adopted.state == "active"
        assert adopted.remote_name and adopted.remote_expires_at


def test_orphans_of_ours_are_deleted_and_other_files_are_never_touched(ctx: Context, sdk: genai.Client,
                                                                       tmp_path: Path, emulator: Emulator,
                                                                       sessions: sessionmaker[Session]) -> None:
    audio = media.make_tone(tmp_path / "x.ogg", 1.0, codec="libopus")
    for display_name in (display_name_for(INSTANCE, 999, "nobody"), "someone else's file",
                         display_name_for("otherinst", 1, "another audiodrop")):
        with open(audio, "rb") as stream:
            sdk.files.upload(file=stream, config={"mime_type": "audio/ogg", "display_name": display_name})
    remote.reconcile(ctx)
    assert len(emulator.files) == 3, "reconcile only queues deletions: no network call inside its transaction"
    drain_deletions(ctx)
    assert sorted(f.display_name for f in emulator.files) == [display_name_for("otherinst", 1, "another audiodrop"),
                                                              "someone else's file"]
    with sessions() as session:
        state = session.get(DaemonState, 1)
        assert state is not None and state.foreign_bytes == 2 * audio.stat().st_size


def test_a_file_gone_from_the_server_becomes_expired(ctx: Context, sdk: genai.Client, tmp_path: Path,
                                                     sessions: sessionmaker[Session]) -> None:
    from daemon.pipeline import upload as uploader

    with sessions() as session:
        recording = converted_recording(session, tmp_path, "talk")
        token = lifecycle.claim(session, recording.id, expected=S.CONVERTED, to=S.UPLOADING, now=media_now(),
                                holder="test", until=media_now() + timedelta(minutes=1),
                                upload_display_name=display_name_for(INSTANCE, recording.id, "x"))
        session.commit()
    assert token is not None
    uploader.upload_recording(ctx, recording.id, token)
    with sessions() as session:
        name = session.get(Recording, recording.id).remote_name  # type: ignore[union-attr]
    sdk.files.delete(name=name)
    remote.reconcile(ctx)
    with sessions() as session:
        gone = session.get(Recording, recording.id)
        assert gone is not None and gone.state == "expired"
        assert session.scalars(select(Recording.id)).all() == [recording.id]
        assert "gone from the server" in gone.events[-1].reason


def test_an_upload_that_finishes_while_the_list_is_read_is_not_taken_for_gone(
        ctx: Context, sdk: genai.Client, tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    """The database is read before files.list: an upload finishing in between is not marked gone."""
    from daemon.pipeline import upload as uploader

    with sessions() as session:
        recording = converted_recording(session, tmp_path, "late")
        token = lifecycle.claim(session, recording.id, expected=S.CONVERTED, to=S.UPLOADING, now=media_now(),
                                holder="test", until=media_now() + timedelta(minutes=1),
                                upload_display_name=display_name_for(INSTANCE, recording.id, "x"))
        session.commit()
    assert ctx.client is not None and token is not None
    real_list = ctx.client.list_files

    def list_while_the_upload_finishes() -> list:  # type: ignore[type-arg]
        listed = real_list()  # the server's answer is read first...
        uploader.upload_recording(ctx, recording.id, token)  # ...then the upload finishes and is recorded
        return listed

    ctx.client.list_files = list_while_the_upload_finishes  # type: ignore[method-assign]
    remote.reconcile(ctx)
    with sessions() as session:
        current = session.get(Recording, recording.id)
        assert current is not None and current.state in ("processing", "active"), [e.reason for e in current.events]
        assert queries.ours_bytes(session) == current.remote_bytes
