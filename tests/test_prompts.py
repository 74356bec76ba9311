"""The prompt queue in process (daemon/prompts/queue.py, runner.py): what `ask` may queue and what it refuses, the token
estimate, watch-folder prompts, the requests-per-minute limit, and how a chunked transcript survives a rate limit.
The end-to-end behaviour (daemon, SDK, emulator) is in test_prompts_e2e.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from daemon.context import Context
from daemon.errors import QueueError, TransientError
from daemon.gemini import Generation
from daemon.pipeline import lifecycle
from daemon.prompts import chunking
from daemon.prompts import lifecycle as prompt_lifecycle
from daemon.prompts import runner as prompt_runner
from daemon.prompts.queue import enqueue, enqueue_watch_prompts, estimate_audio_tokens, request_for
from db.models import Prompt, PromptRecording, Recording
from tests import media
from tests.conftest import T0

HOUR = 3600.0


@pytest.fixture
def settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    return make_settings(
        watch=[{"path": str(tmp_path / "inbox"), "prompts": ["transcribe", "minutes"]},
               {"path": str(tmp_path / "quiet")}],
        templates={"minutes": {"prompt": "Write the minutes.", "model": "gemini-2.5-pro",
                               "system_instruction": "Be brief.", "output_format": "text"}},
        prompts={"requests_per_minute": 3, "chunk_seconds": 2.0, "chunk_overlap_seconds": 0.5},
    )


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as opened:
        yield opened


def add_recording(session: Session, name: str = "a.wav", *, seconds: float | None = 60.0, state: str = "converted",
                  root: str = "/in", error: str | None = None) -> Recording:
    recording = lifecycle.discover(session, path=f"{root}/{name}", size=10, mtime_ns=1, watch_root=root,
                                   closed_after_write=True, now=T0)
    recording.state, recording.duration_seconds, recording.error = state, seconds, error
    session.flush()
    return recording


def queue(session: Session, settings: Settings, ids: list[int], **kwargs: Any) -> Prompt:
    return enqueue(session, request_for(settings, ids, **kwargs), now=T0)


# --- the estimate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "tokens"), [(0, 0), (1, 32), (1.01, 33), (59.5, 1904), (60, 1920),
                                                 (HOUR, 115_200), (9.5 * HOUR, 1_094_400)])
def test_the_estimate_is_32_tokens_a_second_rounded_up(seconds: float, tokens: int) -> None:
    assert estimate_audio_tokens(seconds) == tokens


def test_a_queued_prompt_carries_the_estimate_for_all_its_recordings(session: Session, settings: Settings) -> None:
    a, b = add_recording(session, "a.wav", seconds=90.5), add_recording(session, "b.wav", seconds=30.0)
    prompt = queue(session, settings, [b.id, a.id], prompt_text="Compare.")
    assert prompt.state == "queued" and prompt.estimated_audio_tokens == math.ceil(120.5 * 32)
    links = session.scalars(select(PromptRecording).where(PromptRecording.prompt_id == prompt.id)
                            .order_by(PromptRecording.position)).all()
    assert [link.recording_id for link in links] == [b.id, a.id], "the order asked for is kept"


def test_a_recording_not_converted_yet_may_be_asked_about_without_an_estimate(session: Session,
                                                                              settings: Settings) -> None:
    waiting = add_recording(session, seconds=None, state="discovered")
    prompt = queue(session, settings, [waiting.id], template="summarize")
    assert prompt.state == "queued" and prompt.estimated_audio_tokens is None


# --- templates ---------------------------------------------------------------------------------------------


def test_a_template_brings_its_prompt_model_system_instruction_and_output_format(settings: Settings) -> None:
    request = request_for(settings, [1], template="minutes")
    assert (request.prompt_text, request.model, request.system_instruction, request.output_format) == \
        ("Write the minutes.", "gemini-2.5-pro", "Be brief.", "text")
    builtin = request_for(settings, [1], template="transcribe")
    assert builtin.prompt_text.startswith("Transcribe this recording verbatim.")
    assert builtin.model == settings.gemini.model and builtin.output_format == "markdown"
    assert request_for(settings, [1], template="minutes", model="gemini-2.5-flash-lite").model == \
        "gemini-2.5-flash-lite"


def test_a_free_prompt_uses_the_configured_model_and_markdown(settings: Settings) -> None:
    request = request_for(settings, [1], prompt_text="Who speaks?")
    assert (request.prompt_text, request.template, request.model, request.output_format) == \
        ("Who speaks?", None, "gemini-2.5-flash", "markdown")


def test_an_unknown_template_is_refused_naming_the_known_ones(settings: Settings) -> None:
    with pytest.raises(QueueError, match=r"no template named 'minuets' \(known: minutes, summarize, transcribe\)"):
        request_for(settings, [1], template="minuets")


@pytest.mark.parametrize("both", [True, False])
def test_exactly_one_of_a_template_and_a_prompt_text(settings: Settings, both: bool) -> None:
    with pytest.raises(QueueError, match="either a template or a prompt text"):
        request_for(settings, [1], template="transcribe" if both else None, prompt_text="Also." if both else None)


# --- what is refused ---------------------------------------------------------------------------------------


def test_a_rejected_recording_cannot_be_prompted_and_the_reason_is_given(session: Session,
                                                                         settings: Settings) -> None:
    bad = add_recording(session, "notes.wav", state="rejected", seconds=None,
                        error="notes.wav: not an audio file (no audio stream)")
    with pytest.raises(QueueError, match=rf"recording {bad.id} was rejected \(notes.wav: not an audio file"):
        queue(session, settings, [bad.id], template="transcribe")


@pytest.mark.parametrize(("ids", "message"), [([], "at least one recording"), ([99], "no recording with id 99"),
                                              ([1, 1], "named twice")])
def test_missing_unknown_or_repeated_recordings_are_refused(session: Session, settings: Settings, ids: list[int],
                                                            message: str) -> None:
    add_recording(session)
    with pytest.raises(QueueError, match=message):
        queue(session, settings, ids, template="summarize")


def test_more_than_nine_and_a_half_hours_in_one_prompt_is_refused(session: Session, settings: Settings) -> None:
    a, b = add_recording(session, "a.wav", seconds=5 * HOUR), add_recording(session, "b.wav", seconds=5 * HOUR)
    with pytest.raises(QueueError, match=r"10\.0 hours of audio is more than the 9.5 hours one prompt may hold"):
        queue(session, settings, [a.id, b.id], template="summarize")
    with pytest.raises(QueueError, match="9.5 hours"):
        queue(session, settings, [a.id, b.id], template="transcribe")  # two recordings are never split


def test_exactly_nine_and_a_half_hours_fits(session: Session, settings: Settings) -> None:
    a, b = add_recording(session, "a.wav", seconds=5 * HOUR), add_recording(session, "b.wav", seconds=4.5 * HOUR)
    assert queue(session, settings, [a.id, b.id], template="summarize").estimated_audio_tokens == 1_094_400


def test_a_single_long_recording_may_be_transcribed_because_it_is_split_but_not_summarized(
        session: Session, settings: Settings) -> None:
    day = add_recording(session, "day.wav", seconds=10 * HOUR)
    transcribe = queue(session, settings, [day.id], template="transcribe")
    assert transcribe.state == "queued" and transcribe.estimated_audio_tokens == 1_152_000
    with pytest.raises(QueueError, match="10.0 hours"):
        queue(session, settings, [day.id], template="summarize")
    with pytest.raises(QueueError, match="10.0 hours"):
        queue(session, settings, [day.id], prompt_text="Transcribe this.")  # only the transcribe template splits


# --- spans -------------------------------------------------------------------------------------------------


def test_a_span_is_estimated_by_its_own_length(session: Session, settings: Settings) -> None:
    talk = add_recording(session, seconds=240.0)
    prompt = queue(session, settings, [talk.id], template="transcribe", span=(150.0, 209.0))
    assert (prompt.span_start_seconds, prompt.span_end_seconds) == (150.0, 209.0)
    assert prompt.estimated_audio_tokens == 59 * 32


def test_a_span_past_the_end_is_estimated_up_to_the_end(session: Session, settings: Settings) -> None:
    talk = add_recording(session, seconds=240.0)
    assert queue(session, settings, [talk.id], template="transcribe", span=(200.0, 400.0)) \
        .estimated_audio_tokens == 40 * 32


def test_a_span_without_an_end_runs_to_the_end_and_stores_no_infinite_time(session: Session,
                                                                           settings: Settings) -> None:
    talk = add_recording(session, seconds=100.0)
    prompt = queue(session, settings, [talk.id], template="transcribe", span=(60.0, math.inf))
    assert (prompt.span_start_seconds, prompt.span_end_seconds) == (60.0, None)
    assert prompt.estimated_audio_tokens == 40 * 32
    unconverted = add_recording(session, "new.wav", seconds=None, state="discovered")
    later = queue(session, settings, [unconverted.id], template="transcribe", span=(60.0, math.inf))
    assert later.state == "queued" and later.estimated_audio_tokens is None and later.span_end_seconds is None


@pytest.mark.parametrize(("span", "message"), [
    ((30.0, 10.0), r"the span 00:00:30-00:00:10 is empty"),
    ((30.0, 30.0), r"is empty"),
    ((300.0, 400.0), r"the span starts after the end of the recording \(00:04:00\)"),
])
def test_an_empty_or_misplaced_span_is_refused(session: Session, settings: Settings, span: tuple[float, float],
                                               message: str) -> None:
    talk = add_recording(session, seconds=240.0)
    with pytest.raises(QueueError, match=message):
        queue(session, settings, [talk.id], template="transcribe", span=span)


def test_a_span_applies_to_one_recording(session: Session, settings: Settings) -> None:
    a, b = add_recording(session, "a.wav"), add_recording(session, "b.wav")
    with pytest.raises(QueueError, match="apply to one recording"):
        queue(session, settings, [a.id, b.id], template="transcribe", span=(0.0, 10.0))


def test_a_span_of_a_long_recording_is_held_to_nine_and_a_half_hours(session: Session, settings: Settings) -> None:
    day = add_recording(session, "day.wav", seconds=12 * HOUR)
    assert queue(session, settings, [day.id], template="transcribe", span=(HOUR, 2 * HOUR)).state == "queued"
    # A span is cut and sent whole, never split: so even transcribe is held to the limit.
    with pytest.raises(QueueError, match=r"10\.0 hours"):
        queue(session, settings, [day.id], template="transcribe", span=(HOUR, 11 * HOUR))


# --- watch-folder prompts ----------------------------------------------------------------------------------


def test_a_watch_folders_prompts_are_queued_once_per_recording(session: Session, settings: Settings,
                                                               tmp_path: Path) -> None:
    recording = add_recording(session, root=str(tmp_path / "inbox"))
    enqueue_watch_prompts(session, settings, recording, now=T0)
    enqueue_watch_prompts(session, settings, recording, now=T0)  # converted again: nothing new
    queued = session.scalars(select(Prompt).order_by(Prompt.id)).all()
    assert [(p.template, p.model) for p in queued] == [("transcribe", "gemini-2.5-flash"),
                                                       ("minutes", "gemini-2.5-pro")]
    quiet = add_recording(session, "b.wav", root=str(tmp_path / "quiet"))
    enqueue_watch_prompts(session, settings, quiet, now=T0)
    assert len(session.scalars(select(Prompt)).all()) == 2, "a folder without prompts queues none"


# --- the requests-per-minute limit -------------------------------------------------------------------------


class FakeClock:
    """The injected clock: time moves only when a test (or the fake model) moves it."""

    def __init__(self) -> None:
        self.current = T0

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ctx(settings: Settings, sessions: sessionmaker[Session], clock: FakeClock) -> Context:
    return Context(settings=settings, sessions=sessions, client=None, clock=clock, holder="test")


def test_requests_per_minute_are_counted_per_model_over_a_sliding_minute(
        clock: FakeClock, sessions: sessionmaker[Session]) -> None:
    limiter = prompt_runner.RateLimiter(sessions, clock, per_minute=3)
    for _ in range(3):  # at 0, 10 and 20 s
        assert limiter.take("flash") == 0.0
        clock.advance(10)
    assert limiter.take("flash") == pytest.approx(31.0), "the fourth waits for the first to age out (+1 s margin)"
    assert limiter.take("pro") == 0.0, "another model has its own limit"
    clock.advance(31)  # 61 s after the first
    assert limiter.take("flash") == 0.0
    assert limiter.take("flash") == pytest.approx(10.0), "only one slot came free"


# --- chunked transcripts under a rate limit ----------------------------------------------------------------


class FakeClient:
    """Answers every chunk at once with one line, or raises what `fail` says for a given call number."""

    def __init__(self, clock: FakeClock, fail: Callable[[int], Exception | None] = lambda n: None) -> None:
        self.clock, self.fail, self.calls = clock, fail, 0

    def warm(self) -> None:
        pass

    def generate(self, model: str, parts: list[Any], **_: Any) -> Generation:
        self.calls += 1
        self.clock.advance(1.0)  # a quick model: a second per chunk
        error = self.fail(self.calls)
        if error is not None:
            raise error
        return Generation(text="[00:00:00] Speaker 1: hello", finish_reason="STOP", prompt_tokens=100,
                          audio_tokens=64, output_tokens=8, model_version="emulated")


def chunked_prompt(session: Session, settings: Settings, tmp_path: Path) -> tuple[Prompt, int]:
    """A transcribe over a 7-s recording, which the settings (2-s chunks) plan as four chunks."""
    audio = media.make_tone(tmp_path / "seven.ogg", 7.0, codec="libopus")
    recording = add_recording(session, "seven.ogg", seconds=7.0, state="active")
    recording.converted_path, recording.converted_format, recording.converted_mime = str(audio), "opus", "audio/ogg"
    prompt = queue(session, settings, [recording.id], template="transcribe")
    session.commit()
    chunks = len(chunking.plan_chunks(7.0, chunk_seconds=2.0, overlap_seconds=0.5))
    return prompt, chunks


def run_until_done(sessions: sessionmaker[Session], ctx: Context, prompt_id: int, clock: FakeClock,
                   minutes: float, recheck: float = 10.0) -> str:
    """Claim and run the prompt again and again, as the engine does when it is due, for `minutes` of (fake)
    time; every 10 s here comes to the same as waking at each due time, in fewer runs (each run cuts audio)."""
    limiter = prompt_runner.RateLimiter(sessions, clock, ctx.settings.prompts.requests_per_minute)
    deadline = clock.now() + timedelta(minutes=minutes)
    while clock.now() < deadline:
        with sessions() as session, session.begin():
            due = session.get(Prompt, prompt_id).next_attempt_at  # type: ignore[union-attr]
            token = None if due and due > clock.now() else prompt_lifecycle.claim(
                session, prompt_id, now=clock.now(), holder="test", until=clock.now() + timedelta(minutes=1))
        if token is not None:
            prompt_runner.run_prompt(ctx, prompt_id, token, limiter)
        with sessions() as session:
            state = session.get(Prompt, prompt_id).state  # type: ignore[union-attr]
        if state != "queued":
            return state
        clock.advance(recheck)
    return "queued"


def test_a_chunked_transcript_with_no_more_chunks_than_the_rate_limit_completes(
        settings: Settings, sessions: sessionmaker[Session], session: Session, ctx: Context,
        clock: FakeClock, tmp_path: Path) -> None:
    client = FakeClient(clock)
    ctx.client = client  # type: ignore[assignment]
    prompt, chunks = chunked_prompt(session, settings, tmp_path)
    with sessions() as other, other.begin():
        other.get(Prompt, prompt.id).chunk_seconds = 3.0  # type: ignore[union-attr]
    expected = len(chunking.plan_chunks(7.0, chunk_seconds=3.0, overlap_seconds=0.5))
    assert expected <= settings.prompts.requests_per_minute < chunks

    assert run_until_done(sessions, ctx, prompt.id, clock, minutes=1) == "done"
    assert client.calls == expected


def test_a_chunked_transcript_with_more_chunks_than_the_rate_limit_still_completes(
        settings: Settings, sessions: sessionmaker[Session], session: Session, ctx: Context,
        clock: FakeClock, tmp_path: Path) -> None:
    client = FakeClient(clock)
    ctx.client = client  # type: ignore[assignment]
    prompt, chunks = chunked_prompt(session, settings, tmp_path)
    assert chunks == 4 > settings.prompts.requests_per_minute == 3

    state = run_until_done(sessions, ctx, prompt.id, clock, minutes=3)

    assert state == "done", f"still {state} after 3 minutes and {client.calls} requests for {chunks} chunks"


def test_a_rate_limit_on_a_late_chunk_does_not_resend_the_chunks_already_answered(
        settings: Settings, sessions: sessionmaker[Session], session: Session, ctx: Context,
        clock: FakeClock, tmp_path: Path) -> None:
    prompt, _ = chunked_prompt(session, settings, tmp_path)
    with sessions() as other, other.begin():
        other.get(Prompt, prompt.id).chunk_seconds = 3.0  # type: ignore[union-attr]
    chunks = len(chunking.plan_chunks(7.0, chunk_seconds=3.0, overlap_seconds=0.5))
    rate_limited = TransientError("prompt to gemini-2.5-flash: 429 RESOURCE_EXHAUSTED", "retried automatically",
                                  retry_after=1.0)
    client = FakeClient(clock, fail=lambda n: rate_limited if n == chunks else None)  # the last chunk, once
    ctx.client = client  # type: ignore[assignment]

    assert run_until_done(sessions, ctx, prompt.id, clock, minutes=3) == "done"
    assert client.calls == chunks + 1, "only the rate-limited chunk is sent again"
