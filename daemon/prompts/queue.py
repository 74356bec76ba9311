"""The prompt queue: what may be queued (a template or a text over recordings, within the 9.5-hour limit), the
drop folders' own prompts, how a prompt's audio will travel, and which remote copies the queue still needs.
Database only: no network, no ffmpeg."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload

from daemon import profiles
from daemon.config import Settings, Template
from daemon.errors import QueueError
from daemon.prompts import chunking, lifecycle
from db.models import Prompt, PromptRecording, Recording
from db.states import PromptState as P
from db.states import RecordingState as S

AUDIO_TOKENS_PER_SECOND = 32
MAX_PROMPT_SECONDS = chunking.MAX_PROMPT_SECONDS


def estimate_audio_tokens(seconds: float) -> int:
    return math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)


@dataclass(frozen=True)
class Request:
    recording_ids: list[int]
    prompt_text: str
    template: str | None
    model: str
    system_instruction: str | None
    output_format: str
    span: tuple[float, float] | None = None
    trim: bool = False
    batch: bool = False
    extra_formats: tuple[str, ...] = ()
    speakers: tuple[str, ...] = ()
    force_budget: bool = False


# Trimming is on by default for the answers whose worth is the words said: transcripts and summaries.
TRIMMED_BY_DEFAULT = ("transcribe", "summarize")


def trims(settings: Settings, template: Template | None, name: str | None) -> bool:
    """Whether a prompt cuts long silences: the template's `trim`, else on for transcripts and summaries when
    trimming.enabled (a folder profile may decide otherwise before this is asked)."""
    if template is not None and template.trim is not None:
        return template.trim
    return settings.trimming.enabled and name in TRIMMED_BY_DEFAULT


def request_for(settings: Settings, recording_ids: list[int], *, template: str | None = None,
                prompt_text: str | None = None, model: str | None = None,
                span: tuple[float, float] | None = None, trim: bool | None = None, batch: bool | None = None,
                speakers: tuple[str, ...] = (), force_budget: bool = False) -> Request:
    """A prompt request from a template name or a free text (exactly one of them). `trim` and `batch` None: as
    the template says."""
    if (template is None) == (prompt_text is None):
        raise QueueError("give either a template or a prompt text")
    chosen: Template | None = None
    if template is not None:
        if template not in settings.templates:
            raise QueueError(f"no template named {template!r} (known: {', '.join(sorted(settings.templates))})")
        chosen = settings.templates[template]
    text = chosen.prompt if chosen else str(prompt_text)
    return Request(recording_ids=recording_ids, prompt_text=text, template=template,
                   model=model or (chosen.model if chosen and chosen.model else settings.gemini.model),
                   system_instruction=chosen.system_instruction if chosen else None,
                   output_format=chosen.output_format if chosen else "markdown", span=span,
                   trim=trims(settings, chosen, template) if trim is None else trim,
                   batch=(chosen.batch if chosen else False) if batch is None else batch,
                   extra_formats=chosen.formats if chosen else (), speakers=speakers, force_budget=force_budget)


def check(session: Session, request: Request) -> int | None:
    """Check a request against its recordings and the 9.5-hour limit (QueueError says what is wrong). Returns the
    estimated audio tokens, when the recordings' durations are known."""
    if not request.recording_ids:
        raise QueueError("name at least one recording")
    if len(set(request.recording_ids)) != len(request.recording_ids):
        raise QueueError("a recording is named twice")
    recordings = [session.get(Recording, rid) for rid in request.recording_ids]
    for rid, recording in zip(request.recording_ids, recordings, strict=True):
        if recording is None:
            raise QueueError(f"no recording with id {rid}")
        if recording.state == S.REJECTED:
            raise QueueError(f"recording {rid} was rejected ({recording.error}); it cannot be prompted")
    durations = [r.duration_seconds for r in recordings if r is not None]
    seconds = None if None in durations else float(sum(d or 0 for d in durations))
    if request.span is not None:
        start, end = request.span
        if len(recordings) != 1:
            raise QueueError("--from/--to apply to one recording")
        if not 0 <= start < end:
            raise QueueError(f"the span {chunking.format_clock(start)}-{chunking.format_clock(end)} is empty")
        if seconds is not None and start >= seconds:
            raise QueueError(f"the span starts after the end of the recording ({chunking.format_clock(seconds)})")
        # --from without --to runs to the end of the recording (an infinite end), unknown until it is converted.
        if seconds is not None or math.isfinite(end):
            seconds = min(end, seconds if seconds is not None else end) - start
    splittable = request.template == "transcribe" and len(recordings) == 1 and request.span is None
    if seconds is not None and seconds > MAX_PROMPT_SECONDS and not splittable:
        raise QueueError(f"{seconds / 3600:.1f} hours of audio is more than the 9.5 hours one prompt may hold; "
                         "ask over fewer recordings or a --from/--to span")
    return estimate_audio_tokens(seconds) if seconds is not None else None


def enqueue(session: Session, request: Request, *, now: datetime, reason: str = "queued") -> Prompt:
    """Queue a prompt after checking its recordings and the 9.5-hour limit."""
    estimate = check(session, request)
    prompt = Prompt(state=P.QUEUED, template=request.template, prompt_text=request.prompt_text,
                    system_instruction=request.system_instruction, model=request.model,
                    output_format=request.output_format,
                    span_start_seconds=request.span[0] if request.span else None,
                    span_end_seconds=request.span[1] if request.span and math.isfinite(request.span[1]) else None,
                    estimated_audio_tokens=estimate, created_at=now, attempts=0, trim=request.trim,
                    batch=request.batch, extra_formats=",".join(request.extra_formats) or None,
                    speakers="\n".join(request.speakers) or None, force_budget=request.force_budget)
    session.add(prompt)
    session.flush()
    for position, rid in enumerate(request.recording_ids):
        session.add(PromptRecording(prompt_id=prompt.id, recording_id=rid, position=position))
    lifecycle.created(session, prompt, now=now, reason=reason)
    session.flush()
    return prompt


def enqueue_watch_prompts(session: Session, settings: Settings, recording: Recording, *, now: datetime) -> None:
    """The prompts of the recording's drop folder (its profile's, else its [[watch]] table's), once per recording,
    each with the folder's glossary in its system instruction and the folder's say on trimming."""
    rules = profiles.rules_for(settings, recording)
    if not rules.prompts:
        return
    if session.scalar(select(PromptRecording.prompt_id).where(PromptRecording.recording_id == recording.id).limit(1)):
        return
    source = f"{rules.profile}" if rules.state == "loaded" else f"the drop folder {rules.folder}"
    for name in rules.prompts:
        request = request_for(rules.settings, [recording.id], template=name,
                              trim=profiles.trim_for(settings, recording, name))
        request = replace(request, system_instruction=with_glossary(request.system_instruction, rules.glossary))
        enqueue(session, request, now=now, reason=f"queued for {source}")


def glossary_for(settings: Settings, recording: Recording) -> str | None:
    """The glossary of the recording's drop folder (its profile's names and terms), as text for a system
    instruction; None when the folder has none."""
    return profiles.rules_for(settings, recording).glossary


def with_glossary(system_instruction: str | None, glossary: str | None) -> str | None:
    """The system instruction with the glossary after it; unchanged when there is none or it is already there (a
    prompt queued for a drop folder has it from the start)."""
    if not glossary or (system_instruction and glossary in system_instruction):
        return system_instruction
    return f"{system_instruction}\n\n{glossary}" if system_instruction else glossary


def recording_ready(session: Session, recording_id: int) -> None:
    """A recording was converted or became ACTIVE: prompts waiting for their files look again now."""
    waiting = select(PromptRecording.prompt_id).where(PromptRecording.recording_id == recording_id)
    session.execute(update(Prompt).where(Prompt.id.in_(waiting), Prompt.state == P.QUEUED, Prompt.wait_kind == "files")
                    .values(next_attempt_at=None).execution_options(synchronize_session=False))


def planned_delivery(settings: Settings, prompt: Prompt, recordings: list[Recording], *, shared: bool) -> str:
    """How the prompt's audio will travel: "trimmed", "span" and "chunks" are cut locally, "inline" goes in the
    request, "files" needs live remote copies. `shared`: another queued prompt needs the same recording."""
    single = recordings[0] if len(recordings) == 1 else None
    if prompt.batch and batch_lane_refusal(settings, prompt, recordings) is None:
        return "files"  # the Batch API lane sends the uploaded files, whole (daemon.prompts.batch)
    if single is None:
        return "files"
    if prompt.trim:
        return "trimmed"
    if prompt.span_start_seconds is not None:
        return "span"
    chunk_seconds = prompt.chunk_seconds or settings.prompts.chunk_seconds
    if prompt.template == "transcribe" and (single.duration_seconds or 0) > chunk_seconds * 1.1:
        return "chunks"
    # Inline saves a (re-)upload for a small recording whose remote copy is not live and no other prompt needs.
    request_bytes = math.ceil((single.converted_bytes or 0) * 4 / 3) + len(prompt.prompt_text.encode()) + 4096
    if settings.prompts.inline == "auto" and not shared and single.state != S.ACTIVE \
            and single.converted_bytes and request_bytes <= settings.prompts.inline_limit_bytes:
        return "inline"
    return "files"


# -- the Batch API lane (daemon.prompts.batch) ------------------------------------------------------------------

def batch_lane_refusal(settings: Settings, prompt: Prompt, recordings: list[Recording]) -> str | None:
    """Why a batch prompt cannot go through the Batch API (it then runs in the normal lane), or None. A job's
    request is one generateContent call over the uploaded files: audio cut locally (a --from/--to span, a long
    transcript's chunks) would travel inline, and a job's inlined requests share one 20 MB request."""
    if prompt.span_start_seconds is not None:
        return "a --from/--to span is cut locally and sent inline"
    seconds = sum(r.duration_seconds or 0 for r in recordings)
    chunk_seconds = prompt.chunk_seconds or settings.prompts.chunk_seconds
    if prompt.chunk_seconds is not None or (prompt.template == "transcribe" and len(recordings) == 1
                                            and seconds > chunk_seconds * 1.1):
        return f"a {seconds / 60:.0f}-minute transcript is answered in chunks"
    rejected = next((r for r in recordings if r.state == S.REJECTED), None)
    if rejected is not None:
        return f"recording {rejected.id} was rejected"
    return None


def needs_remote_copies(session: Session, settings: Settings) -> set[int]:
    """Recordings whose remote copy a queued or running prompt will use: never evicted, re-uploaded when expired.
    Every upload claim asks, so it reads in three queries however long the queue is."""
    active_prompts = session.scalars(select(Prompt).options(selectinload(Prompt.recordings))
                                     .where(Prompt.state.in_((P.QUEUED, P.RUNNING)))).all()
    users: dict[int, int] = defaultdict(int)
    for prompt in active_prompts:
        for link in prompt.recordings:
            users[link.recording_id] += 1
    by_id = {r.id: r for r in session.scalars(select(Recording).where(Recording.id.in_(users)))}
    needed: set[int] = set()
    for prompt in active_prompts:
        ids = [link.recording_id for link in prompt.recordings]
        recordings = [by_id[rid] for rid in ids if rid in by_id]
        shared = any(users[rid] > 1 for rid in ids)
        if planned_delivery(settings, prompt, recordings, shared=shared) == "files":
            needed.update(ids)
    return needed
