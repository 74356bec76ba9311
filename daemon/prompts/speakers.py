"""Speaker labels that stay the same across chunk borders.

A model numbers speakers by first appearance within each prompt, so "Speaker 2" of the third chunk may be
"Speaker 1" of the first. This module maps each chunk's labels onto the labels established so far by the lines
both chunks hold in their overlap, writes the note that asks the next prompt to keep them, and scores a
labelling against the truth. Pure: no I/O and no clock; it must not import google.genai, sqlalchemy or watchdog.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from difflib import SequenceMatcher

from daemon.prompts.chunking import Chunk, Line, format_clock, parse_transcript, render_line

TOLERANCE_SECONDS = 1.5  # two chunks place the same words this close (whole-second stamps, a model's drift)
AGREEMENT_TOLERANCE_SECONDS = 3.0  # a transcript's line is paired with the truth's this far apart at most
SAME_TEXT = 0.6  # similarity from which two overlap lines count as the same words
SURE_TEXT = 0.9  # the same sentence (12 characters or more): believed up to three tolerances apart, since each
SURE_SPREAD = 3.0  # chunk's stamps drift on their own and whole seconds round down (seen: 2-3 s between chunks)
# Evidence weights. A matched pair of overlap lines weighs 0.3-1.0 (short "yes"-like lines the least), so any
# match outweighs the two hints, which only decide what the overlap leaves open.
CONTINUITY_HINT = 0.25  # whoever spoke at the border in the earlier chunk opens the next (no lines matched)
IDENTITY_HINT = 0.2  # the prompt asked to keep the labels, so a reused label is likely the same voice ...
IDENTITY_EVIDENT = 0.28  # ... more likely when the chunk's labels are not numbered 1, 2, 3 by first appearance
NOTE_MAX_CHARS = 700

_GENERIC = re.compile(r"(?P<word>[^\W\d_]+(?:[ _-][^\W\d_]+){0,2})(?P<sep>[ _-]?)(?P<number>\d{1,4})")


@dataclass(frozen=True, slots=True)
class _Said:
    """One labelled line and the continuation lines after it."""

    seconds: float
    speaker: str
    text: str


# --- aligning one chunk's labels -------------------------------------------------------------------------


def align(
    previous: list[Line], current: list[Line], overlap: tuple[float, float], *, tolerance: float = TOLERANCE_SECONDS
) -> dict[str, str]:
    """The current chunk's labels mapped to the labels established in previous (both on one timeline).

    Lines of both in the overlap that were said within tolerance seconds of each other with similar words vote
    for their labels being one voice; the strongest votes win, one to one. Without a matching line, the speaker
    at the border and the labels themselves (the prompt asked to keep them) decide. A label left over becomes
    an established one only when the chunk evidently renumbered (its own name went to another voice); else it
    is a new voice and gets the next free number. Names ("Ana") are kept as they are.
    >>> from daemon.prompts.chunking import parse_transcript
    >>> before = parse_transcript("[00:19:55] Speaker 1: So that is settled.\\n[00:19:58] Speaker 2: Good, next.")
    >>> after = parse_transcript("[00:19:58] Speaker 1: Good, next.\\n[00:20:30] Speaker 2: I disagree.")
    >>> align(before, after, (1195.0, 1205.0))
    {'Speaker 1': 'Speaker 2', 'Speaker 2': 'Speaker 1'}
    """
    said_before, said_now = _said(previous), _said(current)
    labels = list(dict.fromkeys(said.speaker for said in said_now))
    established = list(dict.fromkeys(said.speaker for said in said_before))
    if not established:  # the first chunk sets the labels
        return {label: label for label in labels}
    mapping = {label: label for label in labels if not _GENERIC.fullmatch(label)}
    matches = _match_votes(said_before, said_now, overlap, tolerance)
    _assign(mapping, matches, labels, established)
    _assign(mapping, _hint_votes(said_before, said_now, overlap, tolerance, matched=bool(matches)), labels, established)
    last_heard = {said.speaker: said.seconds for said in said_before}
    claimed = set(mapping.values())
    spare = sorted((label for label in established if label not in claimed and _GENERIC.fullmatch(label)),
                   key=lambda label: -last_heard[label])
    for label in labels:
        if label not in mapping:
            # Its own name went to another voice, so the chunk renumbered: it takes a label left over, the voice
            # heard last first (likely to speak again first). A label never established is a new voice.
            reuse = label in established and spare
            mapping[label] = spare.pop(0) if reuse else _next_label(label, set(mapping.values()) | set(established))
    return {label: mapping[label] for label in labels}


def _assign(mapping: dict[str, str], votes: dict[tuple[str, str], float], labels: list[str],
            established: list[str]) -> None:
    """The strongest votes first, one to one: each label and each target at most once."""
    claimed = set(mapping.values())
    for (label, target), _ in sorted(
        votes.items(), key=lambda item: (-item[1], labels.index(item[0][0]), established.index(item[0][1]))
    ):
        if label not in mapping and target not in claimed:
            mapping[label] = target
            claimed.add(target)


def relabel(lines: list[Line], mapping: dict[str, str]) -> list[Line]:
    """The lines with their speakers renamed by mapping (others unchanged); a renamed line's raw is redrawn."""
    relabelled = []
    for line in lines:
        target = mapping.get(line.speaker) if line.speaker is not None else None
        if target is None or target == line.speaker:
            relabelled.append(line)
            continue
        moved = replace(line, speaker=target)
        relabelled.append(replace(moved, raw=_render(moved)))
    return relabelled


def relabel_chunks(pieces: list[tuple[Chunk, str]], *, tolerance: float = TOLERANCE_SECONDS) -> list[tuple[Chunk, str]]:
    """Each chunk's answer (times relative to its chunk, as stitch takes them) with its labels aligned to the
    chunks before it; stitch the result. Chunk by chunk, so a label established early is kept to the end.
    """
    done: list[tuple[Chunk, str]] = []
    so_far: list[Line] = []
    previous: Chunk | None = None
    for chunk, text in sorted(pieces, key=lambda piece: (piece[0].start, piece[0].index)):
        lines = parse_transcript(text)
        overlap = (chunk.start, previous.end if previous is not None else chunk.start)
        lines = relabel(lines, align(so_far, on_timeline(lines, chunk.start), overlap, tolerance=tolerance))
        so_far.extend(on_timeline(lines, chunk.start))
        done.append((chunk, "\n".join(_render(line) for line in lines)))
        previous = chunk
    return done


def on_timeline(lines: list[Line], offset_seconds: float) -> list[Line]:
    """A chunk's lines moved onto the recording's timeline (its start added to every timestamp)."""
    return [line if line.seconds is None else replace(line, seconds=line.seconds + offset_seconds) for line in lines]


def _said(lines: list[Line]) -> list[_Said]:
    said: list[_Said] = []
    open_line = False
    for line in lines:
        if line.seconds is not None:
            open_line = bool(line.speaker)
            if line.speaker:
                said.append(_Said(line.seconds, line.speaker, line.text))
        elif open_line and line.text.strip():
            said[-1] = replace(said[-1], text=f"{said[-1].text} {line.text.strip()}")
    return said


def _match_votes(
    before: list[_Said], now: list[_Said], overlap: tuple[float, float], tolerance: float
) -> dict[tuple[str, str], float]:
    """Evidence from the overlap that a current label (first) is an established one (second)."""
    votes: dict[tuple[str, str], float] = {}
    for earlier, later, similarity in _matched_lines(*_near(before, now, overlap, tolerance), tolerance):
        weight = similarity * (0.5 + 0.5 * min(1.0, _informative(earlier, later)))
        votes[(later.speaker, earlier.speaker)] = votes.get((later.speaker, earlier.speaker), 0.0) + weight
    return votes


def _hint_votes(
    before: list[_Said], now: list[_Said], overlap: tuple[float, float], tolerance: float, *, matched: bool
) -> dict[tuple[str, str], float]:
    """What decides when the overlap does not: who spoke at the border (only when no line matched), and the
    labels themselves, since the prompt asked to keep them (a model that swapped two keeps the others)."""
    votes: dict[tuple[str, str], float] = {}
    near_before, near_now = _near(before, now, overlap, tolerance)
    if not matched and near_now:
        border = _speaker_at(near_before, near_now[0].seconds + tolerance)
        if border is not None:
            votes[(near_now[0].speaker, border)] = CONTINUITY_HINT
    labels = list(dict.fromkeys(said.speaker for said in now))
    hint = IDENTITY_HINT if _numbered_by_appearance(labels) else IDENTITY_EVIDENT
    established = {said.speaker for said in before}
    for label in labels:
        if label in established:
            votes[(label, label)] = votes.get((label, label), 0.0) + hint
    return votes


def _near(
    before: list[_Said], now: list[_Said], overlap: tuple[float, float], tolerance: float
) -> tuple[list[_Said], list[_Said]]:
    low, high = min(overlap) - SURE_SPREAD * tolerance, max(overlap) + SURE_SPREAD * tolerance
    near_before = sorted((said for said in before if low <= said.seconds <= high), key=lambda said: said.seconds)
    return near_before, [said for said in now if low <= said.seconds <= high]


def _matched_lines(before: list[_Said], now: list[_Said], tolerance: float) -> list[tuple[_Said, _Said, float]]:
    """One-to-one pairs of overlap lines with similar words said within tolerance (the same sentence: within
    three), the best pairs first (equal words: the closer in time)."""
    times = [said.seconds for said in before]
    candidates = []
    for j, later in enumerate(now):
        for i in range(bisect_left(times, later.seconds - SURE_SPREAD * tolerance), len(before)):
            distance = abs(times[i] - later.seconds)
            if times[i] > later.seconds + SURE_SPREAD * tolerance:
                break
            similarity = _similarity(before[i].text, later.text)
            sure = similarity >= SURE_TEXT and _informative(before[i], later) >= 0.5
            if similarity >= SAME_TEXT and (distance <= tolerance or sure):
                candidates.append((similarity - 0.1 * distance / max(tolerance, 1e-9), i, j, similarity))
    used_before: set[int] = set()
    used_now: set[int] = set()
    pairs = []
    for _, i, j, similarity in sorted(candidates, key=lambda candidate: (-candidate[0], candidate[1], candidate[2])):
        if i not in used_before and j not in used_now:
            used_before.add(i)
            used_now.add(j)
            pairs.append((before[i], now[j], similarity))
    return pairs


def _similarity(a: str, b: str) -> float:
    """1.0 for the same words (case and punctuation aside), 0.9 when one holds the other (a line cut at the
    chunk's edge), else difflib's ratio over the first 200 characters."""
    a, b = _normalized(a), _normalized(b)
    if not a or not b:
        return 0.0
    if a == b:
        return 1.0
    shorter, longer = sorted((a, b), key=len)
    if len(shorter) >= 12 and shorter in longer:
        return 0.9
    return SequenceMatcher(None, a[:200], b[:200], autojunk=False).ratio()


def _informative(a: _Said, b: _Said) -> float:
    """How much a match says: "yes" is said by anyone, a sentence of 24 characters or more by one voice."""
    return min(len(_normalized(a.text)), len(_normalized(b.text))) / 24


def _normalized(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(ch if ch.isalnum() else " " for ch in folded).split())


def _speaker_at(before: list[_Said], seconds: float) -> str | None:
    """Who was speaking at seconds in the earlier chunks' overlap: the last label heard there by then."""
    heard = [said for said in before if said.seconds <= seconds]
    return max(heard, key=lambda said: said.seconds).speaker if heard else None


def _numbered_by_appearance(labels: list[str]) -> bool:
    """True when the generic labels run 1, 2, 3 (or 0, 1, 2) in order of first appearance: what a model that
    renumbers writes, and what one that kept the labels may also write. Other orders show it kept them."""
    numbers = [int(match["number"]) for match in map(_GENERIC.fullmatch, labels) if match]
    return numbers in (list(range(1, len(numbers) + 1)), list(range(len(numbers))))


def _next_label(label: str, taken: set[str]) -> str:
    """A new voice: the label's own form ("Speaker 7", "SPEAKER_07") numbered past every label taken."""
    match = _GENERIC.fullmatch(label)
    if match is None:
        return label
    word, separator, digits = match["word"], match["sep"], match["number"]
    same_form = (_GENERIC.fullmatch(other) for other in taken)
    numbers = [int(other["number"]) for other in same_form if other and other["word"].casefold() == word.casefold()]
    number = max(numbers, default=0) + 1
    width = len(digits) if digits.startswith("0") else 1
    while f"{word}{separator}{number:0{width}d}" in taken:
        number += 1
    return f"{word}{separator}{number:0{width}d}"


def _render(line: Line) -> str:
    """render_line, keeping a fractional timestamp's milliseconds (parse_transcript reads "[00:01:02.500]")."""
    if line.seconds is None or float(line.seconds).is_integer():
        return render_line(line)
    label = f"{line.speaker}: " if line.speaker else ""
    millis = round(line.seconds * 1000) % 1000
    return f"[{format_clock(line.seconds)}.{millis:03d}] {label}{line.text}".rstrip()


# --- scoring ----------------------------------------------------------------------------------------------


def agreement(
    truth: list[tuple[float, str]], labelled: list[Line], *, tolerance: float = AGREEMENT_TOLERANCE_SECONDS
) -> float:
    """The share of truth's lines (seconds, true speaker) whose line in labelled carries the same voice, up to one
    renaming for the whole recording (the labels are names for voices; which name is arbitrary). Lines are paired
    in order by time within tolerance; a truth line with no labelled line counts as wrong. 1.0 for no truth.
    >>> from daemon.prompts.chunking import parse_transcript
    >>> agreement([(0, "A"), (5, "B"), (9, "A")], parse_transcript("[00:00] S2: hi\\n[00:05] S1: yo\\n[00:09] S1: ok"))
    0.6666666666666666
    """
    if not truth:
        return 1.0
    spoken = sorted(((line.seconds, line.speaker) for line in labelled if line.seconds is not None and line.speaker),
                    key=lambda item: item[0])
    pairs: Counter[tuple[str, str]] = Counter()
    index = 0
    for seconds, true in sorted(truth, key=lambda item: item[0]):
        while index < len(spoken) and spoken[index][0] < seconds - tolerance:
            index += 1
        if index < len(spoken) and spoken[index][0] <= seconds + tolerance:
            pairs[(true, spoken[index][1])] += 1
            index += 1
    return _best_renaming(pairs) / len(truth)


def _best_renaming(pairs: Counter[tuple[str, str]]) -> int:
    """The most pairs one-to-one renaming can make agree: an exact assignment over subsets of the smaller side
    (at most 12 labels; more than that falls back to taking the largest counts first)."""
    rows = sorted({a for a, _ in pairs})
    columns = sorted({b for _, b in pairs})
    if len(columns) > len(rows):
        rows, columns = columns, rows
        pairs = Counter({(b, a): count for (a, b), count in pairs.items()})
    if len(columns) > 12:
        return _greedy_renaming(pairs)
    best: dict[int, int] = {0: 0}
    for row in rows:
        for used, score in list(best.items()):
            for bit, column in enumerate(columns):
                if not used & 1 << bit and pairs[(row, column)]:
                    key = used | 1 << bit
                    best[key] = max(best.get(key, 0), score + pairs[(row, column)])
    return max(best.values())


def _greedy_renaming(pairs: Counter[tuple[str, str]]) -> int:
    rows: set[str] = set()
    columns: set[str] = set()
    total = 0
    for (row, column), count in pairs.most_common():
        if row not in rows and column not in columns:
            rows.add(row)
            columns.add(column)
            total += count
    return total


# --- the next prompt's note --------------------------------------------------------------------------------


def known_speakers_note(
    lines_so_far: list[Line], *, names: str | Iterable[str] | None = None, max_chars: int = NOTE_MAX_CHARS
) -> str:
    """Text for the next chunk's prompt: the labels so far, each with the end of the last thing it said (which
    the next chunk hears again in its overlap), asking the model to keep them; and the names given, if any.
    Empty when there is nothing to say. Quotes shrink, then the voices heard longest ago go, to fit max_chars.
    >>> from daemon.prompts.chunking import parse_transcript
    >>> print(known_speakers_note(parse_transcript("[00:19:50] Speaker 1: Shall we vote?\\n[00:19:58] Speaker 2: Yes."),
    ...                           names="Ana, Ben"))  # doctest: +NORMALIZE_WHITESPACE
    Speakers heard so far in this recording; keep these labels for the same voices, and give a new voice the next
    number (Speaker 3):
    - Speaker 1, last at 00:19:50: "Shall we vote?"
    - Speaker 2, last at 00:19:58: "Yes."
    The participants' names, given by the user: Ana, Ben.
    """
    said = _said(lines_so_far)
    last = {item.speaker: item for item in said}  # the latest line of each voice, in order of first appearance
    given = _names(names)
    if not last and not given:
        return ""
    by_recency = sorted(last, key=lambda label: -last[label].seconds)
    note = ""
    for count in range(len(last), -1, -1):
        kept = [item for label, item in last.items() if label in by_recency[:count]]
        for quote_chars in (120, 70, 40, 0):
            note = _note(kept, given, quote_chars, taken=set(last))
            if len(note) <= max_chars:
                return note
    return note[:max_chars].rstrip()


def _note(voices: list[_Said], names: list[str], quote_chars: int, taken: set[str]) -> str:
    parts = []
    if voices:
        form = next((voice.speaker for voice in voices if _GENERIC.fullmatch(voice.speaker)), "Speaker 0")
        new_voice = _next_label(form, taken)
        parts.append("Speakers heard so far in this recording; keep these labels for the same voices, and give a "
                     f"new voice the next number ({new_voice}):")
        for voice in voices:
            quote = _tail(voice.text, quote_chars)
            said = f': "{quote}"' if quote else ""
            parts.append(f"- {voice.speaker}, last at {format_clock(voice.seconds)}{said}")
    if names:
        parts.append(f"The participants' names, given by the user: {', '.join(names)}.")
    return "\n".join(parts)


def _tail(text: str, limit: int) -> str:
    """The end of what was said, at most limit characters, cut at a word and marked with "…"; quotes made safe."""
    clean = " ".join("".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text).split())
    clean = clean.replace('"', "'")
    if len(clean) <= limit:
        return clean
    if limit < 2:
        return ""
    cut = clean[-(limit - 1) :]
    if " " in cut and not clean[-limit].isspace():  # the cut fell inside a word: leave out the rest of it
        cut = cut.split(" ", 1)[1]
    return "…" + cut.strip()


def _names(names: str | Iterable[str] | None) -> list[str]:
    """'Ana,Ben' or ["Ana", "Ben"]: trimmed, each usable as a label (no colon, at most 40 characters), no repeats."""
    if names is None:
        return []
    raw = names.split(",") if isinstance(names, str) else list(names)
    unique: dict[str, str] = {}
    for name in raw:
        spaced = "".join(" " if unicodedata.category(ch)[0] == "C" or ch in ":\uff1a" else ch for ch in str(name))
        cleaned = " ".join(spaced.split())[:40].strip()
        if cleaned:
            unique.setdefault(cleaned.casefold(), cleaned)
    return list(unique.values())
