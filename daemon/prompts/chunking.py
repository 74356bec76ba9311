"""Splitting a long recording into prompt-sized chunks, and stitching the chunks' answers into one timeline.

Owns the chunk plan (length by output budget, overlap, no slivers, never past the 9.5-hour prompt limit), clock
times for the CLI (``--from 02:30``), reading the timestamped lines models write, and repairing them while
stitching: overlap duplicates, times that run backwards, times past the end. Pure: no I/O and no clock; it must
not import google.genai, sqlalchemy or watchdog.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field, replace

MAX_PROMPT_SECONDS = 9.5 * 3600  # Gemini: at most 9.5 hours of audio in one prompt, all files together
CHUNK_SLACK = 0.10  # a chunk may run 10 % over chunk_seconds rather than leave a sliver for another prompt
SILENT_CLAMP_SECONDS = 1.0  # whole-second stamps overshoot a fractional end by rounding; that is no error


@dataclass(frozen=True)
class Chunk:
    """One span of the recording sent as one prompt; start and end are seconds on the recording's timeline."""

    index: int
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Line:
    """One line of a model's answer. `seconds` is None for a line without a timestamp (it continues the one before)."""

    seconds: float | None
    speaker: str | None
    text: str
    raw: str


@dataclass(frozen=True)
class Stitched:
    """A transcript on the recording's timeline; `fixes` says in words what was corrected (empty: nothing)."""

    text: str
    lines: list[Line]
    fixes: list[str]
    duplicates_dropped: int = 0


# --- planning ----------------------------------------------------------------------------------------------


def plan_chunks(
    duration_seconds: float,
    *,
    chunk_seconds: float = 1200.0,
    overlap_seconds: float = 10.0,
    max_prompt_seconds: float = MAX_PROMPT_SECONDS,
) -> list[Chunk]:
    """Equal chunks of at most chunk_seconds (+10 %) overlapping by at least overlap_seconds.

    The recording is divided evenly rather than cut into fixed lengths plus a remainder, so the last chunk is
    never a sliver. Boundaries are whole seconds (start rounded down, end up), which only widens the overlaps.
    >>> [(c.start, c.end) for c in plan_chunks(2500, chunk_seconds=1200, overlap_seconds=10)]
    [(0.0, 1255.0), (1245.0, 2500.0)]
    """
    _check_plan(duration_seconds, chunk_seconds, overlap_seconds, max_prompt_seconds)
    longest = min(chunk_seconds * (1 + CHUNK_SLACK), max_prompt_seconds)
    if duration_seconds <= longest:
        return [Chunk(0, 0.0, float(duration_seconds))]
    longest = min(longest, max_prompt_seconds - 2)  # room for the whole-second rounding of both ends
    count = max(2, math.ceil((duration_seconds - overlap_seconds) / (longest - overlap_seconds) - 1e-9))
    length = (duration_seconds + (count - 1) * overlap_seconds) / count
    step = length - overlap_seconds
    ends = [min(duration_seconds, math.ceil(index * step + length)) for index in range(count - 1)]
    return [Chunk(index, float(math.floor(index * step)), float(end))
            for index, end in enumerate([*ends, duration_seconds])]


def _check_plan(duration: float, chunk: float, overlap: float, max_prompt: float) -> None:
    for name, value in (("duration_seconds", duration), ("chunk_seconds", chunk), ("max_prompt_seconds", max_prompt)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if not (math.isfinite(overlap) and 0 <= overlap < min(chunk, max_prompt) / 2):
        raise ValueError(f"overlap_seconds must be at least 0 and under half a chunk, got {overlap!r}")
    if max_prompt <= 2 * overlap + 2:
        raise ValueError(f"max_prompt_seconds {max_prompt!r} leaves no room beside an overlap of {overlap!r}")


# --- clock times -------------------------------------------------------------------------------------------

_CLOCK = re.compile(r"(?:(?P<h>\d+):(?P<hm>[0-5]?\d)|(?P<m>\d+)):(?P<s>[0-5]\d(?:\.\d+)?)")
_SECONDS = re.compile(r"\d+(?:\.\d+)?s?")
# Every part carries its unit: "1h30" is refused (30 minutes or 30 seconds?) rather than guessed.
_UNITS = re.compile(r"(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?")


def parse_clock(text: str) -> float:
    """Seconds from "90", "90s", "02:30", "1:02:03" or "1h2m3s" (the CLI's --from and --to)."""
    cleaned = "".join(str(text).split()).lower()
    if _SECONDS.fullmatch(cleaned):
        return float(cleaned.removesuffix("s"))
    clock = _CLOCK.fullmatch(cleaned)
    if clock:
        minutes = int(clock["hm"] if clock["h"] is not None else clock["m"])
        return int(clock["h"] or 0) * 3600 + minutes * 60 + float(clock["s"])
    units = _UNITS.fullmatch(cleaned)
    if cleaned and units:
        return sum(float(units[key] or 0) * scale for key, scale in (("h", 3600), ("m", 60), ("s", 1)))
    raise ValueError(
        f"{text!r} is not a time: write seconds (90 or 90s), MM:SS (02:30), HH:MM:SS (1:02:03) or 1h2m3s"
    )


def format_clock(seconds: float) -> str:
    """ "HH:MM:SS", rounded down to the second (a line that starts at 83.7 s is said at 00:01:23)."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"a clock time must be a finite number of seconds >= 0, got {seconds!r}")
    whole = math.floor(seconds + 1e-6)  # 1199.9999999 from offset arithmetic is 00:20:00, not 00:19:59
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


# --- reading model output ----------------------------------------------------------------------------------

_STAMP = r"\d{1,3}(?::[0-5]?\d)?:[0-5]\d(?:[.,]\d{1,3})?"
_STAMPED_LINE = re.compile(
    rf"""^\s*(?:[-*•]\s+)?(?:\*\*|__)?                                  # a list bullet, bold
    (?:[\[(]\s*(?P<a>{_STAMP})(?:\s*[-–—~]\s*{_STAMP})?\s*[\])]        # [01:23], (01:23), [01:23 - 01:30]
      |(?P<b>{_STAMP})(?=\s*(?:\*\*|__)?\s*[-–—|]))                    # 01:23 - text (needs the dash)
    (?:\*\*|__)?\s*(?:[-–—|:]\s*)?(?P<rest>.*)$""",
    re.VERBOSE,
)
# "Speaker 1: ", "**Speaker 1:** ", "**Speaker 1**: ", "主持人：" (a full-width colon); at most 40 characters.
_SPEAKER = re.compile(
    r"^(?:\*\*|__)?(?P<label>[^\s:*_][^:：*\n]{0,39}?)(?:\*\*|__)?\s*[:：](?:\*\*|__)?\s*(?P<text>.*)$"
)


def parse_transcript(text: str) -> list[Line]:
    """Every line of a model's answer, blank ones included; a leading timestamp and speaker label are split off.

    Timestamps: [00:01:23], [01:23], (01:23), [01:23 - 01:30] (the start is kept) and "01:23 - ". Only a
    timestamp at the start of a line counts; times inside prose are left alone.
    """
    return [_parse_line(raw) for raw in text.splitlines()]


def _parse_line(raw: str) -> Line:
    match = _STAMPED_LINE.match(raw)
    if not match:
        return Line(None, None, raw.strip(), raw)
    seconds = _stamp_seconds(match["a"] or match["b"])
    rest = match["rest"].strip()
    speaker = _SPEAKER.match(rest)
    if speaker and _looks_like_speaker(speaker["label"]):
        return Line(seconds, speaker["label"].strip(), speaker["text"].strip(), raw)
    return Line(seconds, None, rest, raw)


def _stamp_seconds(stamp: str) -> float:
    parts = stamp.replace(",", ".").split(":")
    return sum(float(part) * 60.0**power for power, part in enumerate(reversed(parts)))


def _looks_like_speaker(label: str) -> bool:
    """"Speaker 1", "Dr. Jane Smith", "SPEAKER_00", "主持人"; not "I said" or "10" (text that has a colon)."""
    words = label.split()
    return (
        0 < len(words) <= 4
        and any(ch.isalpha() for ch in label)
        and not any(word[0].islower() for word in words)
        and "//" not in label
    )


def render_line(line: Line) -> str:
    if line.seconds is None:
        return line.text
    label = f"{line.speaker}: " if line.speaker else ""
    return f"[{format_clock(line.seconds)}] {label}{line.text}".rstrip()


# --- stitching ---------------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """What stitching corrected, counted as it goes and told in words at the end."""

    past_recording: int = 0
    past_chunk: dict[Chunk, int] = field(default_factory=dict)
    backwards: int = 0
    duplicates: int = 0


def stitch(pieces: list[tuple[Chunk, str]], duration_seconds: float, *, same_line_seconds: float = 5.0) -> Stitched:
    """One transcript from each chunk's answer (timestamps relative to its chunk), on the recording's timeline.

    In a chunk's leading overlap (before the previous chunk's end + same_line_seconds) a line is a duplicate
    and dropped when it is timed before the last timestamp kept from earlier chunks, or when its words match
    a line of the previous chunk said within same_line_seconds of it. Lines without a timestamp share the fate of
    the line they continue. Then times are clamped to their chunk's end and the recording's end, and a time earlier
    than the line before it is moved up to that line's time; each kind of correction is listed in `fixes`.
    """
    tally = _Tally()
    kept: list[Line] = []
    previous: Chunk | None = None
    gaps = []
    for chunk, text in sorted(pieces, key=lambda piece: (piece[0].start, piece[0].index)):
        if previous is not None and chunk.start > previous.end:
            gaps.append(f"nothing covers {format_clock(previous.end)}-{format_clock(chunk.start)}: a chunk is missing")
        kept.extend(_place_chunk(chunk, text, duration_seconds, previous, kept, tally, same_line_seconds))
        previous = chunk
    rendered = "\n".join(render_line(line) for line in kept)
    return Stitched(
        text=rendered + "\n" if rendered else "",
        lines=kept,
        fixes=gaps + _describe(tally, duration_seconds),
        duplicates_dropped=tally.duplicates,
    )


def offset_timestamps(
    text: str, offset_seconds: float, duration_seconds: float, *, span_seconds: float | None = None
) -> Stitched:
    """An answer about a span cut from the recording (ask --from/--to), moved onto the recording's timeline.

    The model saw only the span, so its times start at 0; they are shifted by offset_seconds and clamped to the
    span's end (when span_seconds is given) and to the recording's end.
    """
    if not (0 <= offset_seconds <= duration_seconds):
        raise ValueError(f"offset {offset_seconds!r} lies outside the recording (0-{duration_seconds!r} s)")
    end = duration_seconds if span_seconds is None else min(offset_seconds + span_seconds, duration_seconds)
    return stitch([(Chunk(0, offset_seconds, end), text)], duration_seconds)


def coverage(lines: list[Line], duration_seconds: float, *, start_seconds: float = 0.0) -> float:
    """How far into the recording (or a span starting at start_seconds) the timestamps reach, from 0.0 to 1.0.

    A transcript that stops early (output truncated, or the model gave up after 9 of 73 minutes) scores low.
    """
    if duration_seconds <= start_seconds:
        raise ValueError(f"duration {duration_seconds!r} must be after the start {start_seconds!r}")
    stamps = [line.seconds for line in lines if line.seconds is not None]
    if not stamps:
        return 0.0
    return min(max(max(stamps) - start_seconds, 0.0) / (duration_seconds - start_seconds), 1.0)


def _place_chunk(
    chunk: Chunk, text: str, duration: float, previous: Chunk | None, kept: list[Line], tally: _Tally, window: float
) -> list[Line]:
    """This chunk's lines on the global timeline, minus the duplicates of the previous chunk's tail."""
    tail = [line for line in kept if line.seconds is not None and line.seconds >= chunk.start - window]
    # Duplicates are judged against what earlier chunks left (fixed here); order against the running last line.
    earlier_last = last = next((line.seconds for line in reversed(kept) if line.seconds is not None), None)
    placed: list[Line] = []
    dropping = False
    for line in parse_transcript(text.strip("\n")):
        if line.seconds is None:
            if not dropping:
                placed.append(line)
            continue
        seconds = _clamp_to_end(chunk.start + line.seconds, chunk, duration, tally)
        in_overlap = previous is not None and seconds < previous.end + window
        dropping = in_overlap and _is_duplicate(seconds, line, tail, earlier_last, window)
        if dropping:
            tally.duplicates += 1
            continue
        if last is not None and seconds < last:
            seconds = last  # a time running backwards is a model error; keep the order it was said in
            tally.backwards += 1
        placed.append(replace(line, seconds=seconds))
        last = seconds
    return placed


def _clamp_to_end(seconds: float, chunk: Chunk, duration: float, tally: _Tally) -> float:
    limit = min(chunk.end, duration)
    if seconds <= limit:
        return seconds
    if seconds - limit > SILENT_CLAMP_SECONDS:
        if limit >= duration:
            tally.past_recording += 1
        else:
            tally.past_chunk[chunk] = tally.past_chunk.get(chunk, 0) + 1
    return limit


def _is_duplicate(seconds: float, line: Line, tail: list[Line], last: float | None, window: float) -> bool:
    if last is not None and seconds < last:
        return True
    return any(
        other.seconds is not None and abs(other.seconds - seconds) <= window and _same_words(other.text, line.text)
        for other in tail
    )


def _same_words(a: str, b: str) -> bool:
    """Equal once case and punctuation are ignored, or one is the start or end of the other (a line cut at the
    chunk's edge); speaker labels are not compared, since each chunk numbers its speakers afresh."""
    a, b = _normalized(a), _normalized(b)
    if not a or not b:
        return False
    shorter, longer = sorted((a, b), key=len)
    return shorter == longer or (len(shorter) >= 12 and (longer.startswith(shorter) or longer.endswith(shorter)))


def _normalized(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(ch if ch.isalnum() else " " for ch in folded).split())


def _describe(tally: _Tally, duration: float) -> list[str]:
    fixes = []
    if tally.past_recording:
        fixes.append(f"{_count(tally.past_recording, 'timestamp')} past the end of the recording clamped to "
                     f"{format_clock(duration)}")
    for chunk, count in sorted(tally.past_chunk.items(), key=lambda item: item[0].start):
        fixes.append(f"{_count(count, 'timestamp')} past the end of the chunk {format_clock(chunk.start)}-"
                     f"{format_clock(chunk.end)} clamped to {format_clock(chunk.end)}")
    if tally.backwards:
        fixes.append(f"{_count(tally.backwards, 'timestamp')} earlier than the line before moved forward to it")
    return fixes


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
