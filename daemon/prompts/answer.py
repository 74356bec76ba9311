"""The answer to a prompt: which audio goes, in how many calls, and the answer put on the recording's own timeline.

The audio of a prompt over one recording travels as the remote file (the Files API), the compact copy inline, or
pieces cut locally: a --from/--to span, or the chunks of a long transcript. With trimming on (prompts.trim), the
prompt sees a timeline with the long silences cut out: its pieces are cut from the compact copy through the trim
map (one encode, never a copy of a copy), and every timestamp of the answer is mapped back through it, so
[01:02:03] is the same moment in the original file. The map is stored with the prompt before the first call, so
a retry cuts the same pieces and keeps the chunks already answered.

A transcript that stops early with a normal finish (the model answered 9 of 73 minutes) gets its missing tail
asked for on its own and stitched on; only what still fails is flagged. In a chunked transcript every chunk is told
the speakers heard so far (and the names given with ask --speakers), and its labels are aligned to the earlier
chunks by the lines both hold in their overlap.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from daemon.config import Settings
from daemon.context import Context
from daemon.errors import NotReady, PermanentError, Truncated
from daemon.gemini import FilePart, Generation, InlinePart
from daemon.pipeline import copies, lifecycle, transcode
from daemon.prompts import chunking, speakers, trimming
from daemon.prompts.generation import Job, RateLimiter, generate
from daemon.prompts.queue import planned_delivery
from db.models import Prompt, PromptPart, PromptRecording, Recording
from db.session import session_scope
from db.states import PromptState as P
from db.states import RecordingState as S

log = logging.getLogger(__name__)

TOTALS = ("prompt_tokens", "audio_tokens", "output_tokens", "thinking_tokens", "cached_tokens")
MIN_CHUNK_SECONDS = 120.0
# A transcript whose timestamps stop this far before the end of its audio is missing its tail...
MISSING_TAIL_SECONDS = 60.0
# ... which is asked for on its own, at most this many times (each stitched on, each a billed call).
TAIL_ATTEMPTS = 2
TAIL_OVERLAP_SECONDS = 10.0


@dataclass(frozen=True)
class Timeline:
    """The audio a prompt hears for one recording: the compact copy as it is, or with its long silences cut out
    (`trim_map`). Times given to `piece` are on this timeline; `to_recording` moves an answer's stamps back."""

    recording: Recording
    copy: Path
    fmt: transcode.OutputFormat
    duration: float
    trim_map: trimming.TrimMap | None = None

    def to_recording(self, text: str) -> tuple[str, list[str]]:
        if self.trim_map is None:
            return text, []
        moved = trimming.map_timestamps(text, self.trim_map)
        return moved.text, moved.notes

    def to_timeline(self, seconds: float) -> float:
        """A time of the recording on this timeline."""
        return seconds if self.trim_map is None else self.trim_map.to_trimmed(seconds)


def answer(ctx: Context, job: Job, limiter: RateLimiter) -> tuple[str, dict[str, Any]]:
    """The model's answer for the job, on the recordings' own timeline, and its metadata."""
    prompt, recordings = job.prompt, job.recordings
    rejected = [r for r in recordings if r.state == S.REJECTED]
    if rejected:
        raise PermanentError(f"recording {rejected[0].id} was rejected: {rejected[0].error}")
    not_converted = [r for r in recordings if not r.converted_path or r.duration_seconds is None]
    if not_converted:
        raise NotReady(f"recording {not_converted[0].id} is not converted yet ({not_converted[0].state})")
    delivery = planned_delivery(ctx.settings, prompt, recordings, shared=_shared(ctx, job))
    if delivery == "files":
        parts: list[FilePart | InlinePart | str] = [FilePart(r.remote_uri or "", r.converted_mime or "")
                                                    for r in _ready_remote(ctx, job)]
        seconds = sum(r.duration_seconds or 0 for r in recordings)
        generation = generate(ctx, job, [*parts], limiter, audio_seconds=seconds, text=with_names(prompt))
        if len(recordings) > 1 or prompt.template != "transcribe":
            return generation.text, _meta(generation, delivery="files")
        # One recording's transcript: its tail, if missing, is cut from the compact copy and sent inline.
        copy = copies.local(ctx, recordings[0])
        if copy is None:  # the answer is billed already: keep it as it is rather than fail for want of a tail
            return generation.text, _meta(generation, delivery="files")
        timeline = Timeline(recordings[0], copy,
                            transcode.FORMATS[recordings[0].converted_format or ctx.settings.conversion.format],
                            recordings[0].duration_seconds or 0.0, None)
        return _complete(ctx, job, timeline, generation.text, _meta(generation, delivery="files"), 0.0,
                         timeline.duration, limiter)
    timeline = _timeline(ctx, job, recordings[0])
    if timeline.trim_map is None and delivery == "trimmed":  # trimming would not save enough
        job.prompt.trim = False
        return answer(ctx, job, limiter)
    text, meta = _on_timeline(ctx, job, timeline, delivery, limiter)
    text, notes = timeline.to_recording(text)
    if timeline.trim_map is not None:
        meta["trimmed_seconds"] = timeline.trim_map.saved_seconds
        meta["fixes"] = [*meta["fixes"], *notes]
    return text, meta


def _on_timeline(ctx: Context, job: Job, timeline: Timeline, delivery: str,
                 limiter: RateLimiter) -> tuple[str, dict[str, Any]]:
    """The answer with its stamps on the timeline's own clock."""
    prompt = job.prompt
    start, end = 0.0, timeline.duration
    if prompt.span_start_seconds is not None:
        start = timeline.to_timeline(prompt.span_start_seconds)
        if prompt.span_end_seconds is not None:
            end = min(end, timeline.to_timeline(prompt.span_end_seconds))
        delivery = "span"
    chunk_seconds = prompt.chunk_seconds or ctx.settings.prompts.chunk_seconds
    if delivery != "span" and _chunked(ctx, prompt, timeline, chunk_seconds):
        return _chunked_answer(ctx, job, timeline, chunk_seconds, limiter)
    if delivery == "inline" and timeline.trim_map is None:
        data = timeline.copy.read_bytes()
        audio = InlinePart(data, timeline.recording.converted_mime or timeline.fmt.mime_type)
    else:
        audio = _piece(ctx, job, timeline, start, end, 0)
    generation = generate(ctx, job, [audio], limiter, audio_seconds=end - start, text=with_names(prompt))
    placed = chunking.offset_timestamps(generation.text, start, timeline.duration, span_seconds=end - start) \
        if start or delivery == "span" or timeline.trim_map is not None else None
    text, fixes = (placed.text, placed.fixes) if placed is not None else (generation.text, [])
    meta = _meta(generation, delivery="span" if delivery == "span" else "inline", fixes=fixes)
    return _complete(ctx, job, timeline, text, meta, start, end, limiter)


def _chunked(ctx: Context, prompt: Prompt, timeline: Timeline, chunk_seconds: float) -> bool:
    """Transcripts longer than a chunk go in chunks; so does any trimmed audio too large to send inline."""
    if prompt.template == "transcribe" and timeline.duration > chunk_seconds * 1.1:
        return True
    if timeline.trim_map is None:
        return False
    bytes_per_second = (timeline.recording.converted_bytes or 0) / max(timeline.recording.duration_seconds or 1, 1)
    return math.ceil(timeline.duration * bytes_per_second * 4 / 3) + 8192 > ctx.settings.prompts.inline_limit_bytes


def _complete(ctx: Context, job: Job, timeline: Timeline, text: str, meta: dict[str, Any], start: float,
              end: float, limiter: RateLimiter) -> tuple[str, dict[str, Any]]:
    """A transcript on the timeline's clock, over [start, end], completed to its end (see _fill_tail); what still
    misses is flagged, and the coverage is kept."""
    if job.prompt.template != "transcribe":
        return text, meta
    text, tails, warning = _fill_tail(ctx, job, timeline, text, origin=0.0, start=start, end=end,
                                      limiter=limiter, label="")
    for tail in tails:
        _add_usage(meta, tail)
    if tails:
        meta["tails"] = len(tails)
    if warning:
        meta["warnings"] = [*meta.get("warnings", []), warning]
    meta["coverage"] = round(chunking.coverage(chunking.parse_transcript(text), end, start_seconds=start), 3) \
        if end > start else 1.0
    return text, meta


def _fill_tail(ctx: Context, job: Job, timeline: Timeline, text: str, *, origin: float, start: float, end: float,
               limiter: RateLimiter, label: str) -> tuple[str, list[Generation], str | None]:
    """A model sometimes stops a transcript early with a normal finish (9 of 73 minutes). When the stamps of
    `text` stop more than MISSING_TAIL_SECONDS before `end`, the missing tail is asked for on its own (from a
    little before the last stamp) and stitched on; at most TAIL_ATTEMPTS times, and not again once a tail adds
    nothing. `text`'s stamps count from `origin` on the timeline (a chunk's start; 0 for a whole transcript),
    and so do `start` and `end`. Returns the text, the tails' generations and a warning if it still stops early."""
    prompt = job.prompt
    tails: list[Generation] = []
    reached = tails_from = _last_stamp(text, start)
    while end - reached > MISSING_TAIL_SECONDS and end - start >= MIN_CHUNK_SECONDS:
        if len(tails) == TAIL_ATTEMPTS or (tails and reached <= tails_from):
            warning = (f"the transcript{label}'s timestamps stop at {chunking.format_clock(origin + reached)} of "
                       f"{chunking.format_clock(origin + end)} even after asking for the rest on its own: its end "
                       "may be missing (or the recording ends in silence)")
            log.warning("prompt %d: %s", prompt.id, warning)
            return text, tails, warning
        tails_from = reached
        tail_start = max(start, reached - TAIL_OVERLAP_SECONDS)
        log.info("prompt %d: the transcript%s stops at %s of %s; asking for the rest on its own", prompt.id, label,
                 chunking.format_clock(origin + reached), chunking.format_clock(origin + end))
        note = (f"{with_names(prompt)}\n(This is the end of a longer recording: timestamps start at 00:00:00 at the "
                "beginning of this part.)")
        audio = _piece(ctx, job, timeline, origin + tail_start, origin + end, 900 + len(tails))
        tail = generate(ctx, job, [audio], limiter, audio_seconds=end - tail_start, text=note)
        tails.append(tail)
        text = chunking.stitch([(chunking.Chunk(0, 0.0, reached), text),
                                (chunking.Chunk(1, tail_start, end), tail.text)], end).text
        reached = _last_stamp(text, start)
    return text, tails, None


def _last_stamp(text: str, default: float) -> float:
    return max((line.seconds for line in chunking.parse_transcript(text) if line.seconds is not None),
               default=default)


def _add_usage(meta: dict[str, Any], generation: Generation) -> None:
    for key in TOTALS:
        meta[key] = (meta.get(key) or 0) + (getattr(generation, key) or 0)


def _chunked_answer(ctx: Context, job: Job, timeline: Timeline, chunk_seconds: float,
                    limiter: RateLimiter) -> tuple[str, dict[str, Any]]:
    """Each chunk's answer is kept in the database as soon as it arrives, so a retry (after a 429, a crash, a
    cut-off chunk) sends only the chunks not yet answered, and bills their audio once. Each chunk is told the
    speakers heard so far; their labels are aligned across the overlaps before stitching."""
    prompt = job.prompt
    plan = chunking.plan_chunks(timeline.duration, chunk_seconds=chunk_seconds,
                                overlap_seconds=ctx.settings.prompts.chunk_overlap_seconds)
    with session_scope(ctx.sessions) as session:
        kept = {(part.start_seconds, part.end_seconds): part for part in session.scalars(
            select(PromptPart).where(PromptPart.prompt_id == prompt.id))}
        session.expunge_all()
    pieces: list[tuple[chunking.Chunk, str]] = []
    totals = dict.fromkeys(TOTALS, 0)
    model_version = None
    for chunk in plan:
        part = kept.get((chunk.start, chunk.end))
        if part is None:
            audio = _piece(ctx, job, timeline, chunk.start, chunk.end, chunk.index)
            heard = [line for done, text in speakers.relabel_chunks(pieces)
                     for line in speakers.on_timeline(chunking.parse_transcript(text), done.start)]
            known = speakers.known_speakers_note(heard, names=_names(prompt))
            note = (f"{prompt.prompt_text}\n(This is part {chunk.index + 1} of {len(plan)}: timestamps start at "
                    "00:00:00 at the beginning of this part.)" + (f"\n{known}" if known else ""))
            generation = generate(ctx, job, [audio], limiter, audio_seconds=chunk.seconds, text=note)
            if prompt.template == "transcribe":
                generation = _completed_chunk(ctx, job, timeline, chunk, generation, limiter)
            part = _keep_part(ctx, job, chunk, generation)
        pieces.append((chunk, part.text))
        model_version = part.model_version
        for key in TOTALS:
            totals[key] += getattr(part, key, 0) or 0
    stitched = chunking.stitch(speakers.relabel_chunks(pieces), timeline.duration)
    final = Generation(text=stitched.text, finish_reason="STOP", model_version=model_version, **totals)
    meta = _meta(final, delivery="chunks", chunks=len(plan), fixes=stitched.fixes)
    lines = chunking.parse_transcript(stitched.text)
    meta["coverage"] = round(chunking.coverage(lines, timeline.duration), 3)
    reached = _last_stamp(stitched.text, 0.0)
    if prompt.template == "transcribe" and timeline.duration - reached > MISSING_TAIL_SECONDS:
        meta["warnings"] = [f"the transcript's timestamps stop at {chunking.format_clock(reached)} of "
                            f"{chunking.format_clock(timeline.duration)} even after asking for the rest on its own: "
                            "its end may be missing (or the recording ends in silence)"]
    return stitched.text, meta


def _completed_chunk(ctx: Context, job: Job, timeline: Timeline, chunk: chunking.Chunk, generation: Generation,
                     limiter: RateLimiter) -> Generation:
    """A chunk's transcript completed to the chunk's end, its tails' tokens added to the chunk's."""
    text, tails, _warning = _fill_tail(ctx, job, timeline, generation.text, origin=chunk.start, start=0.0,
                                       end=chunk.seconds, limiter=limiter, label=f" of part {chunk.index + 1}")
    if not tails:
        return generation
    sums: dict[str, Any] = {key: (getattr(generation, key) or 0) + sum(getattr(t, key) or 0 for t in tails)
                            for key in TOTALS}
    return replace(generation, text=text, **sums)


def _keep_part(ctx: Context, job: Job, chunk: chunking.Chunk, generation: Generation) -> PromptPart:
    part = PromptPart(prompt_id=job.prompt.id, start_seconds=chunk.start, end_seconds=chunk.end,
                      text=generation.text, model_version=generation.model_version, created_at=ctx.now(),
                      **{key: getattr(generation, key) or 0 for key in TOTALS if key != "cached_tokens"})
    try:
        with session_scope(ctx.sessions) as session:
            session.add(part)
            session.flush()
            session.expunge(part)
    except IntegrityError:
        pass  # an earlier run of this prompt kept the same chunk a moment ago; the text is the one in hand
    return part


def _names(prompt: Prompt) -> list[str]:
    return [name for name in (prompt.speakers or "").splitlines() if name.strip()]


def with_names(prompt: Prompt) -> str:
    """The prompt's text, with the speakers' names when `ask --speakers` gave them (the batch lane sends it too)."""
    names = _names(prompt)
    if not names:
        return prompt.prompt_text
    return f"{prompt.prompt_text}\nThe participants' names, given by the user: {', '.join(names)}."


def _meta(generation: Generation, *, delivery: str, chunks: int | None = None,
          fixes: list[str] | None = None) -> dict[str, Any]:
    return {"delivery": delivery, "finish_reason": generation.finish_reason, "model_version": generation.model_version,
            "prompt_tokens": generation.prompt_tokens, "audio_tokens": generation.audio_tokens,
            "output_tokens": generation.output_tokens, "thinking_tokens": generation.thinking_tokens,
            "cached_tokens": generation.cached_tokens, "chunks": chunks, "fixes": fixes or []}


# -- the audio ------------------------------------------------------------------------------------------------

def _timeline(ctx: Context, job: Job, recording: Recording) -> Timeline:
    """The recording as this prompt hears it; with trimming on, the trim map is made (and stored with the prompt)
    on the first run and read back on the next ones."""
    fmt = transcode.FORMATS[recording.converted_format or ctx.settings.conversion.format]
    copy = _copy_of(ctx, recording)
    duration = recording.duration_seconds or 0.0
    prompt = job.prompt
    if not prompt.trim:
        return Timeline(recording, copy, fmt, duration)
    if prompt.trim_map:
        stored = trimming.TrimMap.from_json(prompt.trim_map)
        return Timeline(recording, copy, fmt, stored.trimmed_duration, stored)
    trim_map = plan_trim(ctx.settings, copy, duration)
    with session_scope(ctx.sessions) as session:
        if trim_map is None:
            session.execute(update(Prompt).where(Prompt.id == prompt.id, Prompt.claim_token == job.token)
                            .values(trim=False, trim_map=None, trimmed_seconds=0.0))
            return Timeline(recording, copy, fmt, duration)
        session.execute(update(Prompt).where(Prompt.id == prompt.id, Prompt.claim_token == job.token)
                        .values(trim_map=trim_map.to_json(), trimmed_seconds=trim_map.saved_seconds))
    log.info("prompt %d: %s of silence cut from %s of audio", prompt.id,
             chunking.format_clock(trim_map.saved_seconds), chunking.format_clock(duration))
    return Timeline(recording, copy, fmt, trim_map.trimmed_duration, trim_map)


def plan_trim(settings: Settings, copy: Path, duration: float) -> trimming.TrimMap | None:
    """Where the speech is in the compact copy, and which silences to cut; None when that saves too little."""
    spans = trimming.detect_speech(copy, ffmpeg=settings.conversion.ffmpeg, duration_seconds=duration)
    options = settings.trimming
    trim_map = trimming.plan(spans, duration, min_silence_seconds=options.min_silence_seconds,
                             keep_pause_seconds=options.keep_pause_seconds, pad_seconds=options.pad_seconds)
    if trim_map.is_identity or trim_map.saved_seconds < options.min_saving_seconds:
        return None
    return trim_map


def window(trim_map: trimming.TrimMap, start: float, end: float) -> trimming.TrimMap:
    """The part of a trim map that plays [start, end) of the trimmed timeline, as a map of its own (its
    trimmed timeline starts at 0): cutting it from the compact copy gives exactly that piece."""
    segments, position = [], 0.0
    for segment in trim_map.segments:
        first, last = max(start, segment.trimmed_start), min(end, segment.trimmed_end)
        if last - first <= 1e-6:
            continue
        begin = segment.start + (first - segment.trimmed_start)
        segments.append(trimming.Segment(round(begin, 3), round(begin + (last - first), 3), round(position, 3)))
        position += round(begin + (last - first), 3) - round(begin, 3)
    return replace(trim_map, segments=tuple(segments))


def _piece(ctx: Context, job: Job, timeline: Timeline, start: float, end: float, index: int) -> InlinePart:
    """[start, end) of the timeline, cut locally from the compact copy (through the trim map when trimming), as
    inline audio."""
    folder = ctx.settings.state_dir / "pieces"
    folder.mkdir(parents=True, exist_ok=True)
    settings = ctx.settings.conversion
    destination = folder / f"prompt{job.prompt.id}-{index}{timeline.fmt.extension}"
    try:
        if timeline.trim_map is None:
            transcode.cut(timeline.copy, destination, timeline.fmt, start, end, ffmpeg=settings.ffmpeg,
                          ffprobe=settings.ffprobe)
            mime = timeline.recording.converted_mime or timeline.fmt.mime_type
        else:
            made = trimming.trim(timeline.copy, destination, window(timeline.trim_map, start, end),
                                 ffmpeg=settings.ffmpeg)
            mime = made.mime_type
        data = destination.read_bytes()
    finally:
        destination.unlink(missing_ok=True)
    if math.ceil(len(data) * 4 / 3) + 4096 > ctx.settings.prompts.inline_limit_bytes:
        raise Truncated(f"a {end - start:.0f} s piece is too large to send inline")
    return InlinePart(data, mime)


def _copy_of(ctx: Context, recording: Recording) -> Path:
    """The recording's compact copy on this machine (in a fleet, fetched from the database if need be)."""
    path = copies.local(ctx, recording)
    if path is None:
        raise PermanentError(f"recording {recording.id}: its compact copy is gone", "run `audiodrop retry ID` on it")
    return path


def _shared(ctx: Context, job: Job) -> bool:
    ids = [r.id for r in job.recordings]
    with session_scope(ctx.sessions) as session:
        other = session.scalar(select(PromptRecording.prompt_id).join(Prompt).where(
            PromptRecording.recording_id.in_(ids), Prompt.id != job.prompt.id,
            Prompt.state.in_((P.QUEUED, P.RUNNING))).limit(1))
    return other is not None


def _ready_remote(ctx: Context, job: Job) -> list[Recording]:
    """The job's recordings if every one is ACTIVE beyond the expiry margin; otherwise start their re-upload and
    raise NotReady."""
    from datetime import timedelta

    now = ctx.now()
    margin = timedelta(seconds=ctx.settings.gemini.expiry_margin_seconds)
    waiting = []
    with session_scope(ctx.sessions) as session:
        for recording in job.recordings:
            current = session.get(Recording, recording.id)
            assert current is not None
            live = current.remote_expires_at is not None and current.remote_expires_at > now + margin
            if current.state == S.ACTIVE and live:
                current.last_needed_at = now
                continue
            if current.state == S.ACTIVE:
                lifecycle.advance(session, current.id, expected=S.ACTIVE, to=S.EXPIRED, now=now,
                                  reason=f"expires within the margin; uploading again for prompt {job.prompt.id}")
            waiting.append(f"recording {current.id} ({current.state})")
        fresh = [session.get(Recording, r.id) for r in job.recordings]
        session.expunge_all()
    if waiting:
        ctx.wake("upload")
        raise NotReady("waiting for " + ", ".join(waiting) + " to be uploaded")
    return [r for r in fresh if r is not None]


def parts_to_count(settings: Settings, prompt: Prompt, recordings: list[Recording],
                   scratch: Path) -> list[FilePart | InlinePart]:
    """The audio of a prompt as countTokens can take it without uploading anything: live remote files, else the
    compact copies inline (a --from/--to span cut locally into `scratch`). NotReady says why it cannot.
    Runs ffmpeg: call it outside any transaction."""
    parts: list[FilePart | InlinePart] = []
    inline_bytes = 0
    for recording in recordings:
        live = recording.state == S.ACTIVE and recording.remote_uri
        if live and prompt.span_start_seconds is None:
            parts.append(FilePart(recording.remote_uri or "", recording.converted_mime or ""))
            continue
        if not recording.converted_path or not os.path.exists(recording.converted_path):
            raise NotReady(f"recording {recording.id} is not converted yet")
        source = Path(recording.converted_path)
        if prompt.span_start_seconds is not None:
            fmt = transcode.FORMATS[recording.converted_format or settings.conversion.format]
            end = min(prompt.span_end_seconds if prompt.span_end_seconds is not None else math.inf,
                      recording.duration_seconds or math.inf)
            source = transcode.cut(source, scratch / f"span{fmt.extension}", fmt, prompt.span_start_seconds, end,
                                   ffmpeg=settings.conversion.ffmpeg, ffprobe=settings.conversion.ffprobe).path
        data = source.read_bytes()
        inline_bytes += math.ceil(len(data) * 4 / 3)
        if inline_bytes > settings.prompts.inline_limit_bytes:
            raise NotReady("the audio that is not uploaded is too large to count inline")
        parts.append(InlinePart(data, recording.converted_mime or "audio/ogg"))
    return parts
