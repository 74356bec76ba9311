"""Subtitles (SRT and WebVTT) from a stitched transcript on the recording's own timeline.

Owns cue timing (a line shows until the next one starts, or for its reading time), line breaking (at most two
lines of 42 columns a cue) and each format's escaping. Pure: no I/O and no clock; it must not import
google.genai, sqlalchemy or watchdog.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from itertools import groupby, pairwise

from daemon.errors import NoTimestamps
from daemon.prompts.chunking import Line, parse_transcript

MAX_LINE_COLUMNS = 42  # what players and broadcasters expect; a wide (CJK, emoji) character takes two columns
MAX_LINES_PER_CUE = 2
READING_CHARS_PER_SECOND = 15.0
MIN_CUE_MS = 1_000  # reading time bounds, used when the next line is far away; a crowded line gets less
MAX_CUE_MS = 7_000
MAX_LABEL_COLUMNS = 20  # a longer name is shortened in SRT's "Name: " prefix, which shares the first line

_NO_SPEECH = re.compile(r"[\[(]\s*no speech\s*[\])]\.?", re.IGNORECASE)
_JOINERS = frozenset("\u200d\ufe0e\ufe0f")  # zero-width joiner and emoji presentation selectors
# Bidi embeddings, overrides and isolates: a player lays out right-to-left text without them, and one left open
# would turn the rest of the cue around.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True, slots=True)
class Cue:
    """One subtitle: seconds on the recording's timeline (start < end), the speaker (None: unlabelled) and at
    most two lines joined by "\\n", unescaped and without the label (room for SRT's "Label: " is kept)."""

    start: float
    end: float
    speaker: str | None
    text: str


@dataclass(frozen=True, slots=True)
class _Piece:
    """What becomes one cue: a page of a line's text, and how long it takes to read."""

    speaker: str | None
    text: str
    reading_ms: int


@dataclass(slots=True)
class _Group:
    """The pieces that the transcript puts at the same millisecond; they share the time until the next group."""

    start_ms: int
    pieces: list[_Piece]


# --- public ------------------------------------------------------------------------------------------------


def cues(lines: list[Line], duration_seconds: float) -> list[Cue]:
    """The cues of a transcript, in order, none overlapping another or running past the recording's end.

    >>> from daemon.prompts.chunking import parse_transcript
    >>> cues(parse_transcript("[00:00:01] Speaker 1: Hi.\\n[00:00:02] Speaker 2: Hello!"), 60)
    ... # doctest: +NORMALIZE_WHITESPACE
    [Cue(start=1.0, end=2.0, speaker='Speaker 1', text='Hi.'),
     Cue(start=2.0, end=3.0, speaker='Speaker 2', text='Hello!')]
    """
    if not (math.isfinite(duration_seconds) and duration_seconds >= 0):
        raise ValueError(f"duration_seconds must be a finite number >= 0, got {duration_seconds!r}")
    duration_ms = math.floor(duration_seconds * 1000 + 1e-6)
    groups = [
        _Group(start_ms, [piece for _, speaker, text in entries for piece in _pieces(speaker, text)])
        for start_ms, entries in groupby(_entries(lines, duration_ms), key=lambda entry: entry[0])
    ]
    return _place(_make_room(groups, duration_ms), duration_ms)


def to_srt(lines: list[Line], duration_seconds: float) -> str:
    """A SubRip file: cues numbered from 1, "HH:MM:SS,mmm" times, the speaker as a "Speaker 1: " prefix."""
    blocks = []
    for number, cue in enumerate(cues(lines, duration_seconds), start=1):
        text = _srt_escape(cue.text)
        if cue.speaker:
            text = f"{_srt_escape(_short_label(cue.speaker))}: {text}"
        blocks.append(f"{number}\n{_stamp(cue.start, ',')} --> {_stamp(cue.end, ',')}\n{text}\n\n")
    return "".join(blocks)


def to_vtt(lines: list[Line], duration_seconds: float) -> str:
    """A WebVTT file: the header, "HH:MM:SS.mmm" times, the speaker as a voice span (<v Speaker 1>)."""
    blocks = ["WEBVTT\n"]
    for cue in cues(lines, duration_seconds):
        voice = f"<v {_vtt_escape(cue.speaker)}>" if cue.speaker else ""
        blocks.append(f"{_stamp(cue.start, '.')} --> {_stamp(cue.end, '.')}\n{voice}{_vtt_escape(cue.text)}\n")
    return "\n".join(blocks)


# --- reading the transcript --------------------------------------------------------------------------------


def _entries(lines: list[Line], duration_ms: int) -> list[tuple[int, str | None, str]]:
    """(start, speaker, text) per timestamped line, continuation lines joined in, times repaired as stitch does.

    A time earlier than the line before moves up to it, a time past the end is clamped to the end. Lines before
    the first timestamp are dropped (a preamble such as "Here is the transcript:"), and so is "[no speech]".
    A line with a timestamp and no words is kept: it ends the cue before it.
    """
    entries: list[tuple[int, str | None, list[str]]] = []
    last = 0
    for line in lines:
        text = _clean(line.text)
        words = [] if _NO_SPEECH.fullmatch(text) else [text] if text else []
        if line.seconds is None:
            if entries:
                entries[-1][2].extend(words)
            continue
        if not math.isnan(line.seconds):
            last = max(last, round(min(max(line.seconds, 0.0), duration_ms / 1000) * 1000))
        entries.append((min(last, duration_ms), _clean(line.speaker or "") or None, words))
    return [(start, speaker, " ".join(words)) for start, speaker, words in entries]


def _clean(text: str) -> str:
    """One line of text: NFC, control characters gone, runs of white space (line breaks too) one space."""
    normal = unicodedata.normalize("NFC", text)
    kept = "".join(" " if unicodedata.category(ch) == "Cc" else "" if ch in _BIDI_CONTROLS else ch for ch in normal)
    return " ".join(kept.split())


# --- line breaking -----------------------------------------------------------------------------------------


def _pieces(speaker: str | None, text: str) -> list[_Piece]:
    prefix = _columns(_short_label(speaker)) + 2 if speaker else 0
    return [_Piece(speaker, page, _reading_ms(page)) for page in _pages(text, prefix)]


def _pages(text: str, prefix: int) -> list[str]:
    """The text broken into lines at word boundaries, two lines a page. The lines are balanced: the narrowest
    measure (the prefix counted on first lines) that needs no more lines than 42 columns do, so no page ends on
    a lonely word."""
    words = [(word, _columns(word)) for word in text.split()]
    if not words:
        return []
    count = len(_wrap(words, prefix, MAX_LINE_COLUMNS))
    low, high = prefix + 2, MAX_LINE_COLUMNS  # a first line keeps room for one wide character
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if len(_wrap(words, prefix, middle)) <= count else (middle + 1, high)
    lines = _wrap(words, prefix, high)
    return ["\n".join(lines[index : index + MAX_LINES_PER_CUE]) for index in range(0, len(lines), MAX_LINES_PER_CUE)]


def _budget(index: int, prefix: int, measure: int) -> int:
    """Columns for a line: the first line of each page leaves room for SRT's "Label: " prefix."""
    return measure - (prefix if index % MAX_LINES_PER_CUE == 0 else 0)


def _wrap(words: list[tuple[str, int]], prefix: int, measure: int) -> list[str]:
    """Greedy line filling of (word, columns); a word wider than a whole line (a URL, CJK text without spaces)
    is cut where it must."""
    lines: list[str] = []
    current, width = "", 0
    for word, word_width in words:
        while word:
            budget = _budget(len(lines), prefix, measure)
            if width + (1 if current else 0) + word_width <= budget:
                width += (1 if current else 0) + word_width
                current, word = (f"{current} {word}" if current else word), ""
            elif current and word_width <= _budget(len(lines) + 1, prefix, measure):
                lines.append(current)
                current, width = "", 0
            else:
                head = _fit(word, budget - width - (1 if current else 0), force=not current)
                if head:
                    current, word = (f"{current} {head}" if current else head), word[len(head) :]
                    word_width -= _columns(head)
                lines.append(current)
                current, width = "", 0
    return [*lines, current] if current else lines


def _fit(word: str, room: int, *, force: bool) -> str:
    """The longest start of word within room columns that does not split a character from its marks or joiners;
    with force, at least one character (an absurd run of combining marks is cut anyway)."""
    used = cut = whole = 0
    for index, ch in enumerate(word):
        used += _char_columns(ch)
        if used > room:
            break
        whole = index + 1
        if index + 1 == len(word) or _breakable(word, index + 1):
            cut = index + 1
    return word[: cut or (max(whole, 1) if force else 0)]


def _breakable(word: str, index: int) -> bool:
    ch = word[index]
    return not (unicodedata.combining(ch) or ch in _JOINERS or word[index - 1] in _JOINERS)


def _columns(text: str) -> int:
    return len(text) if text.isascii() else sum(_char_columns(ch) for ch in text)


def _char_columns(ch: str) -> int:
    """Two for wide characters (CJK, emoji), else one: a combining mark counts one, which only errs on the
    safe side and keeps every line at most 42 characters long as well as 42 columns wide."""
    return 1 if ch < "\u1100" else 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def _reading_ms(page: str) -> int:
    seconds = _columns(page.replace("\n", " ")) / READING_CHARS_PER_SECOND
    return min(max(round(seconds * 1000), MIN_CUE_MS), MAX_CUE_MS)


def _short_label(label: str | None) -> str:
    label = label or ""
    if _columns(label) <= MAX_LABEL_COLUMNS:
        return label
    return _fit(label, MAX_LABEL_COLUMNS - 1, force=True).rstrip() + "…"


# --- timing ------------------------------------------------------------------------------------------------


def _make_room(groups: list[_Group], duration_ms: int) -> list[_Group]:
    """Every group gets at least a millisecond a piece before the next group (or the end of the recording).

    Only the last group is ever short of time in practice: lines stamped at (or clamped to) the end. They move
    back to be read before the end, no earlier than the group before them needs; with no room even so, they
    join the group before. A group crowded by the next one (timestamps a few ms apart) shares its time with it.
    """
    groups = [_Group(group.start_ms, list(group.pieces)) for group in groups]
    index = 0
    while index < len(groups):
        group = groups[index]
        limit = groups[index + 1].start_ms if index + 1 < len(groups) else duration_ms
        if limit - group.start_ms >= len(group.pieces):
            index += 1
        elif index + 1 < len(groups):
            group.pieces.extend(groups.pop(index + 1).pieces)
        elif index == 0:
            group.start_ms = max(0, duration_ms - sum(piece.reading_ms for piece in group.pieces))
            del group.pieces[duration_ms - group.start_ms :]  # more cues than milliseconds: no way to show them
            index += 1
        elif _pull_back(groups[index - 1], group, duration_ms):
            index += 1
        else:
            groups[index - 1].pieces.extend(groups.pop(index).pieces)
            index -= 1
    return groups


def _pull_back(before: _Group, last: _Group, duration_ms: int) -> bool:
    """Move the last group back so it can be read before the end; False when the group before leaves no room."""
    start = max(before.start_ms + len(before.pieces), duration_ms - sum(piece.reading_ms for piece in last.pieces))
    if start > duration_ms - len(last.pieces):
        return False
    last.start_ms = start
    return True


def _place(groups: list[_Group], duration_ms: int) -> list[Cue]:
    """Each group's pieces, in order, over the time until the next group or their reading time if that is
    shorter; the time is shared in proportion to reading time (so to length, with the 1 s floor for short ones)."""
    placed: list[Cue] = []
    for index, group in enumerate(groups):
        limit = groups[index + 1].start_ms if index + 1 < len(groups) else duration_ms
        weights = [piece.reading_ms for piece in group.pieces]
        span = min(limit - group.start_ms, sum(weights))
        for piece, (start, end) in zip(group.pieces, _share(span, weights), strict=True):
            begin, finish = (group.start_ms + start) / 1000, (group.start_ms + end) / 1000
            placed.append(Cue(begin, finish, piece.speaker, piece.text))
    return placed


def _share(span: int, weights: list[int]) -> list[tuple[int, int]]:
    """Consecutive (start, end) offsets covering span in proportion to weight, one millisecond each at least
    (span must allow that); with span equal to the weights' sum, each gets exactly its weight."""
    total, running = sum(weights), 0
    bounds = [0]
    for weight in weights:
        running += weight
        bounds.append(max(bounds[-1] + 1, (span * running + total // 2) // total))
    bounds[-1] = span
    for index in range(len(bounds) - 2, 0, -1):
        bounds[index] = min(bounds[index], bounds[index + 1] - 1)
    return list(pairwise(bounds))


# --- writing -----------------------------------------------------------------------------------------------


def _stamp(seconds: float, separator: str) -> str:
    hours, rest = divmod(round(seconds * 1000), 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


def _srt_escape(text: str) -> str:
    """SRT has no escapes, and players read <i>-style tags and {\\an8}-style overrides in it: angle brackets
    become look-alike quotes (which also breaks up a "-->"), and a brace before a backslash a parenthesis."""
    return re.sub(r"\{(?=\\)", "(", text.replace("<", "\u2039").replace(">", "\u203a"))


def _vtt_escape(text: str) -> str:
    """WebVTT's character references; escaping ">" also keeps "-->" out of the cue text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render(text: str, fmt: str, durations: list[float | None], *, prompt_id: int) -> str:
    """A stored transcript as `fmt` ("srt" or "vtt"); `durations` are its recordings' lengths (the last cue ends
    by then). NoTimestamps when no line starts with a [00:01:23] stamp."""
    lines = parse_transcript(text)
    stamps = [line.seconds for line in lines if line.seconds is not None]
    if not stamps:
        raise NoTimestamps(f"prompt {prompt_id}'s result has no timestamps (lines starting with [00:01:23]), so it "
                           "cannot become subtitles; a transcript has them (--template transcribe)")
    known = [d for d in durations if d is not None]
    duration = sum(known) if known and len(known) == len(durations) else max(stamps) + MAX_CUE_MS / 1000
    duration = max(duration, max(stamps))
    return to_srt(lines, duration) if fmt == "srt" else to_vtt(lines, duration)
