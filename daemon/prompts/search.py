"""Full-text search over prompt results: owns the search index (the table `search_lines`, made by migration 0008),
keeping it in step with the answers, and the query language. Pure database code: no network, no files; it must
not import google.genai or watchdog.

The index holds one row per line of a transcript (its time on the recording's timeline and its speaker, so a hit
can say where in the recording it was said) and one row per other answer (a summary: no time). A row's key is
`prompt_id << LINE_BITS | line`, so a prompt's rows are replaced by a range delete. SQLite keeps them in an FTS5
table (tokenizer unicode61 with remove_diacritics 2) ranked by bm25; PostgreSQL (fleet mode) in a table with a
tsvector column under a GIN index, ranked by ts_rank_cd, its text folded here (lower case, accents off) so that
no server extension is needed. Ties in rank go to the newest prompt.

Query syntax (`audiodrop search`): words, all of which must occur in the same line (or the same summary); case
and accents are ignored ("cafe" finds "Café"). `"a few words"` in double quotes is a phrase (the words next to
each other, in order); a word or phrase ending in `*` is a prefix (`budg*`, `"next quart*"`). Anything else
(parentheses, colons, `-`, `^`, NEAR, AND, OR, NOT) is no operator: punctuation separates words and the others
are words like any other. A word joined by punctuation ("l'été", "co-op") is searched as a phrase, the way the
index splits it; an unclosed quote runs to the end. At most MAX_TERMS terms of MAX_WORDS words each are used;
a query with no words at all finds nothing.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    Select,
    Text,
    TextClause,
    column,
    exists,
    func,
    literal_column,
    select,
    table,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from daemon.prompts.chunking import parse_transcript
from db.models import Prompt, PromptRecording, Recording
from db.states import PromptState

log = logging.getLogger(__name__)

TABLE = "search_lines"
LINE_BITS = 20  # lines per result a key can tell apart (a million; answers have a few thousand at most)
MAX_TERMS = 32
MAX_WORDS = 32
SNIPPET_WORDS = 24
MARKS = ("**", "**")  # around a matched word in a snippet (Markdown bold)
TS_CONFIG = "simple"  # PostgreSQL: no stemming, no stop words; folding is done here

_WORD = re.compile(r"[^\W_]+")  # letters and digits, as unicode61 splits them
_LINES = table(TABLE, column("prompt_id", Integer), column("line", Integer), column("seconds", Float),
               column("speaker", Text), column("text", Text))


@dataclass(frozen=True)
class Term:
    """One term of a query: a word, or a phrase of several; `prefix` if its last word is a prefix."""

    words: tuple[str, ...]
    prefix: bool = False


@dataclass(frozen=True)
class Row:
    """One row of the index: `line` is the 0-based line of the result text it comes from."""

    line: int
    seconds: float | None
    speaker: str | None
    text: str


@dataclass(frozen=True)
class RecordingRef:
    id: int
    name: str
    created_at: datetime


@dataclass(frozen=True)
class Hit:
    """One matching line (or summary). `timestamp_seconds` is on the recording's timeline (None for a summary),
    `line` the 0-based line of the result text, `snippet` the text with matched words between MARKS."""

    prompt_id: int
    template: str | None
    timestamp_seconds: float | None
    speaker: str | None
    snippet: str
    line: int
    recordings: tuple[RecordingRef, ...]
    finished_at: datetime | None
    result_path: str | None

    @property
    def recording_ids(self) -> tuple[int, ...]:
        return tuple(recording.id for recording in self.recordings)

    @property
    def recording_names(self) -> tuple[str, ...]:
        return tuple(recording.name for recording in self.recordings)


# --- the query language ------------------------------------------------------------------------------------


def fold(text: str) -> str:
    """Lower case without accents ("Café" -> "cafe"), as the index compares words."""
    decomposed = unicodedata.normalize("NFD", text)
    return unicodedata.normalize("NFC", "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower())


def parse_query(query: str) -> list[Term]:
    """The terms of a user's query (see the module docstring); never raises."""
    terms = []
    for index, part in enumerate(query.split('"')):
        chunks = [part] if index % 2 else part.split()  # odd parts were inside quotes
        for chunk in chunks:
            words = tuple(fold(word) for word in _WORD.findall(chunk))[:MAX_WORDS]
            if words:
                terms.append(Term(words, prefix=chunk.rstrip().endswith("*")))
    return terms[:MAX_TERMS]


def _fts5_query(terms: Sequence[Term]) -> str:
    """FTS5 syntax: every term a double-quoted string (words are letters and digits only, so nothing in them
    can be read as an operator), implicitly ANDed."""
    return " ".join('"' + " ".join(term.words) + '"' + ("*" if term.prefix else "") for term in terms)


def _tsquery(terms: Sequence[Term]) -> str:
    """PostgreSQL to_tsquery syntax: quoted lexemes, <-> between the words of a phrase, & between terms."""
    def lexeme(word: str, last: bool, prefix: bool) -> str:
        return "'" + word.replace("'", "''") + "'" + (":*" if last and prefix else "")

    return " & ".join("(" + " <-> ".join(lexeme(word, i == len(term.words) - 1, term.prefix)
                                         for i, word in enumerate(term.words)) + ")" for term in terms)


# --- rows of the index -------------------------------------------------------------------------------------


def rows_for(result_text: str) -> list[Row]:
    """A transcript's lines (any line starting with a timestamp makes it one), else the whole answer as one row.
    A line without a timestamp continues the one before: it gets that line's time and speaker."""
    normalized = unicodedata.normalize("NFC", result_text)
    lines = parse_transcript(normalized)
    if not any(line.seconds is not None for line in lines):
        return [Row(0, None, None, normalized.strip())] if normalized.strip() else []
    rows, seconds, speaker = [], None, None
    for offset, line in enumerate(lines[: 1 << LINE_BITS]):
        if line.seconds is not None:
            seconds, speaker = line.seconds, line.speaker
        if line.text.strip():
            rows.append(Row(offset, seconds, speaker, line.text.strip()))
    return rows


def _key_range(prompt_id: int) -> dict[str, int]:
    return {"low": prompt_id << LINE_BITS, "high": ((prompt_id + 1) << LINE_BITS) - 1}


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


_INSERT = {
    "sqlite": text(f"INSERT INTO {TABLE} (rowid, text, speaker, prompt_id, line, seconds) "
                   "VALUES (:key, :text, :speaker, :prompt_id, :line, :seconds)"),
    "postgresql": text(f"INSERT INTO {TABLE} (id, prompt_id, line, seconds, speaker, text, document) "
                       f"VALUES (:key, :prompt_id, :line, :seconds, :speaker, :text, to_tsvector('{TS_CONFIG}', "
                       ":folded))"),
}
_DELETE = {
    "sqlite": text(f"DELETE FROM {TABLE} WHERE rowid BETWEEN :low AND :high"),
    "postgresql": text(f"DELETE FROM {TABLE} WHERE id BETWEEN :low AND :high"),
}


def remove_prompt(session: Session, prompt_id: int) -> None:
    """Take a prompt's rows out of the index."""
    session.execute(_DELETE["postgresql" if _is_postgres(session) else "sqlite"], _key_range(prompt_id))


def _replace_rows(session: Session, prompt_id: int) -> int:
    """The prompt's rows, replaced by those of its current answer (none unless it is done)."""
    remove_prompt(session, prompt_id)
    answer = session.execute(select(Prompt.result_text).where(
        Prompt.id == prompt_id, Prompt.state == PromptState.DONE)).scalar_one_or_none()
    rows = rows_for(answer) if answer else []
    if rows:
        base = prompt_id << LINE_BITS
        params = [{"key": base + row.line, "prompt_id": prompt_id, "line": row.line, "seconds": row.seconds,
                   "speaker": row.speaker, "text": row.text, "folded": " ".join(_WORD.findall(fold(row.text)))}
                  for row in rows]
        session.execute(_INSERT["postgresql" if _is_postgres(session) else "sqlite"], params)
    return len(rows)


def index_prompt(session: Session, prompt_id: int) -> int:
    """Replace a prompt's rows in the index, in the caller's transaction (the one that stores its answer); the
    number of rows. The index can be rebuilt, an answer cannot be had again without paying for it: a database
    error here is logged and leaves the answer to be stored without its rows (`audiodrop search --rebuild`)."""
    try:
        with session.begin_nested():
            return _replace_rows(session, prompt_id)
    except DBAPIError as err:
        log.warning("prompt %d: not added to the search index (%s); `audiodrop search --rebuild` adds it",
                    prompt_id, err.orig)
        return 0


def rebuild(session: Session) -> int:
    """The whole index made again from the stored answers, in the caller's transaction; the number of rows."""
    session.execute(text(f"DELETE FROM {TABLE}"))
    ids = session.scalars(select(Prompt.id).where(Prompt.state == PromptState.DONE,
                                                  Prompt.result_text.is_not(None)).order_by(Prompt.id)).all()
    total = sum(_replace_rows(session, prompt_id) for prompt_id in ids)
    if not _is_postgres(session):
        session.execute(text(f"INSERT INTO {TABLE} ({TABLE}) VALUES ('optimize')"))  # one b-tree: faster queries
    return total


def needs_rebuild(session: Session) -> bool:
    """True if the index is empty while answers are stored (a database restored without it, say): a search
    that finds nothing then says how to fill it."""
    if session.execute(text(f"SELECT 1 FROM {TABLE} LIMIT 1")).first() is not None:
        return False
    return session.scalar(select(Prompt.id).where(Prompt.state == PromptState.DONE,
                                                  Prompt.result_text.is_not(None)).limit(1)) is not None


def is_index_table(name: str | None) -> bool:
    """The index's tables (on SQLite the FTS5 table and its shadow tables): made by migration 0008, not by the
    models, so a comparison of the schema with the models leaves them out."""
    return name is not None and (name == TABLE or name.startswith(TABLE + "_"))


# --- searching ---------------------------------------------------------------------------------------------


def search(session: Session, query: str, *, template: str | None = None, recording_id: int | None = None,
           since: datetime | None = None, until: datetime | None = None, limit: int = 50,
           marks: tuple[str, str] = MARKS) -> list[Hit]:
    """The best `limit` hits for `query` (syntax: see the module docstring) by rank, ties to the newest prompt.
    Filters: the prompt's template, one of its recordings, and the time its recordings were found (`since` <=
    created_at < `until`, tz-aware)."""
    terms = parse_query(query)
    if not terms or limit <= 0:
        return []
    statement = _filtered(_ranked(session, terms), template, recording_id, since, until).limit(limit)
    found = session.execute(statement).all()
    prompts = _prompts(session, {row.prompt_id for row in found})
    return [Hit(prompt_id=row.prompt_id, template=prompt.template, timestamp_seconds=row.seconds,
                speaker=row.speaker, snippet=snippet(row.text, terms, marks), line=row.line,
                recordings=prompt.recordings, finished_at=prompt.finished_at, result_path=prompt.result_path)
            for row in found if (prompt := prompts.get(row.prompt_id))]


def _ranked(session: Session, terms: Sequence[Term]) -> Select[Any]:
    """Matching rows, best first: bm25 (FTS5's `rank`, lower is better) or ts_rank_cd; ties go to the newest
    prompt (the highest key). No join unless a filter needs one: the index holds only done prompts (done is
    final), and ranking every match of a common word through a join cost half again as much."""
    if _is_postgres(session):
        query = func.to_tsquery(literal_column(f"'{TS_CONFIG}'::regconfig"), _tsquery(terms))
        document: ColumnElement[Any] = literal_column(f"{TABLE}.document")
        matches: ColumnElement[Any] | TextClause = document.op("@@")(query)
        rank: ColumnElement[Any] = func.ts_rank_cd(document, query, 1).desc()  # 1: shorter lines first
        key: ColumnElement[Any] = literal_column(f"{TABLE}.id")
    else:
        matches = text(f"{TABLE} MATCH :fts5").bindparams(fts5=_fts5_query(terms))
        rank = literal_column(f"{TABLE}.rank")
        key = literal_column(f"{TABLE}.rowid")
    return (select(_LINES.c.prompt_id, _LINES.c.line, _LINES.c.seconds, _LINES.c.speaker, _LINES.c.text)
            .where(matches).order_by(rank, key.op(">>")(LINE_BITS).desc(), key))


def _filtered(statement: Select[Any], template: str | None, recording_id: int | None, since: datetime | None,
              until: datetime | None) -> Select[Any]:
    if template is None and recording_id is None and since is None and until is None:
        return statement
    statement = statement.join_from(_LINES, Prompt, Prompt.id == _LINES.c.prompt_id)
    if template is not None:
        statement = statement.where(Prompt.template == template)
    if recording_id is not None:
        statement = statement.where(exists().where(PromptRecording.prompt_id == Prompt.id,
                                                   PromptRecording.recording_id == recording_id))
    if since is not None or until is not None:
        found = exists().where(PromptRecording.prompt_id == Prompt.id, Recording.id == PromptRecording.recording_id)
        if since is not None:
            found = found.where(Recording.created_at >= since)
        if until is not None:
            found = found.where(Recording.created_at < until)
        statement = statement.where(found)
    return statement


@dataclass(frozen=True)
class _About:
    template: str | None
    finished_at: datetime | None
    result_path: str | None
    recordings: tuple[RecordingRef, ...]


def _prompts(session: Session, prompt_ids: set[int]) -> dict[int, _About]:
    """What a hit tells of its prompt, and the prompt's recordings in order (a name is the source file's name);
    a prompt that is gone (its rows left behind on SQLite, which has no cascade into FTS5) is not there."""
    if not prompt_ids:
        return {}
    recordings: dict[int, list[RecordingRef]] = {}
    rows = session.execute(select(PromptRecording.prompt_id, Recording.id, Recording.source_path, Recording.created_at)
                           .join(Recording, Recording.id == PromptRecording.recording_id)
                           .where(PromptRecording.prompt_id.in_(prompt_ids))
                           .order_by(PromptRecording.prompt_id, PromptRecording.position))
    for prompt_id, rid, path, created_at in rows:
        recordings.setdefault(prompt_id, []).append(RecordingRef(rid, _file_name(path), created_at))
    prompts = session.execute(select(Prompt.id, Prompt.template, Prompt.finished_at, Prompt.result_path)
                              .where(Prompt.id.in_(prompt_ids), Prompt.state == PromptState.DONE))
    return {pid: _About(template, finished_at, path, tuple(recordings.get(pid, ())))
            for pid, template, finished_at, path in prompts}


def _file_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def snippet(line: str, terms: Sequence[Term], marks: tuple[str, str] = MARKS, width: int = SNIPPET_WORDS) -> str:
    """Up to `width` words of `line` around its first match, matched words between `marks`, "…" where cut,
    on one line."""
    words = list(_WORD.finditer(line))
    exact = {word for term in terms for word in (term.words[:-1] if term.prefix else term.words)}
    prefixes = tuple(term.words[-1] for term in terms if term.prefix)
    matched = [fold(word.group()) in exact or fold(word.group()).startswith(prefixes) for word in words]
    first = matched.index(True) if True in matched else 0
    start = max(0, min(first - width // 3, len(words) - width))
    end = min(len(words), start + width)
    pieces, position = [], words[start].start() if start and words else 0
    for word, hit in zip(words[start:end], matched[start:end], strict=True):
        pieces += [line[position:word.start()], *((marks[0], word.group(), marks[1]) if hit else (word.group(),))]
        position = word.end()
    pieces.append(line[position:] if end == len(words) else "")
    shown = " ".join("".join(pieces).split())
    return ("…" if start else "") + shown + ("…" if end < len(words) else "")
