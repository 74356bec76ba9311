"""Full-text search over prompt results: query latency of daemon.prompts.search over 100 hours of transcripts.

Material is made at run time, seeded: a vocabulary of a few thousand words (English function words first, then
made-up words, some with accents) drawn with a Zipf law; one-hour transcripts of speaker turns ("[HH:MM:SS]
Speaker N: ...") at about 150 words a minute (pauses included), turns of 3-60 words (log-normal, 19 on average),
plus a five-bullet summary of each. They are stored through db.models in a database made by the real
migrations, the index is built (`search.rebuild`, as `audiodrop search --rebuild` does), and the queries run
through `search.search` on a read-only engine, as the CLI opens it (snippets and recording names included;
process start-up is not, see the "cli" line). Query kinds: a common word, a rare word, two words of one line,
a quoted phrase, a prefix*, an accented word typed without accents, a word with a template or recording
filter, and queries that find nothing or are made of operators.

    .venv/bin/python -m bench.search                  # 100 hours, 200 queries: 10-15 s on 2 busy cores
    .venv/bin/python -m bench.search --hours 10 --queries 50
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import PYTHON, ROOT, HostLoad, header, percentile, print_table
from daemon.config import load_settings
from daemon.prompts import search
from daemon.prompts.chunking import format_clock
from db.models import Prompt, PromptRecording, Recording
from db.session import make_engine, make_sessionmaker, upgrade_to_head
from db.states import PromptState, RecordingState
from tests.conftest import write_config

MODULE = "bench.search"
GOAL_P95_MS = 50.0
WORDS_PER_MINUTE = 160  # while speaking; with the pauses between turns, about 150 a minute
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
FUNCTION_WORDS = (
    "the and to of a i that you it in is we was so for this on but they have be with what not are just like "
    "know think if do at all can there as one about or yeah right from he she would my me well our an no them "
    "will going get very more then some people because really time now which out when up how also their who"
).split()
SYLLABLES = [c + v for c in "bcdfghjklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ie")]
ACCENTED = {"e": "é", "u": "ü", "a": "à", "o": "ô", "i": "ï"}


@dataclass
class Corpus:
    vocabulary: list[str]
    weights: list[float]  # cumulative, for random.choices
    transcripts: list[str]
    summaries: list[str]
    lines: list[list[str]]  # the words of some lines, for queries that must hit


def make_vocabulary(size: int, rng: random.Random) -> list[str]:
    words = list(dict.fromkeys(FUNCTION_WORDS))
    seen = set(words)
    while len(words) < size:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 2, 3, 3, 4))))
        if rng.random() < 0.06:
            vowel = next((v for v in ACCENTED if v in word), None)
            word = word.replace(vowel, ACCENTED[vowel], 1) if vowel else word
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def make_corpus(hours: int, vocabulary_size: int, seed: int) -> Corpus:
    rng = random.Random(seed)
    vocabulary = make_vocabulary(vocabulary_size, rng)
    weights = list(_cumulative([1 / (rank + 1) ** 1.07 for rank in range(len(vocabulary))]))
    corpus = Corpus(vocabulary, weights, [], [], [])
    for _ in range(hours):
        corpus.transcripts.append(_transcript(corpus, rng))
        bullets = [f"- {_sentence(_words(corpus, rng, rng.randint(10, 22)))}" for _ in range(5)]
        corpus.summaries.append("\n".join(bullets) + "\n")
    return corpus


def _cumulative(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def _words(corpus: Corpus, rng: random.Random, count: int) -> list[str]:
    return rng.choices(corpus.vocabulary, cum_weights=corpus.weights, k=count)


def _sentence(words: list[str]) -> str:
    return (words[0].capitalize() + " " + " ".join(words[1:])).strip() + "."


def _transcript(corpus: Corpus, rng: random.Random) -> str:
    """One hour of speaker turns, timed at WORDS_PER_MINUTE with short pauses between turns."""
    lines, seconds, speakers = [], rng.uniform(0, 3), rng.randint(2, 4)
    while seconds < 3600:
        count = min(60, max(3, round(rng.lognormvariate(math.log(16), 0.6))))
        words = _words(corpus, rng, count)
        if rng.random() < 0.02:
            corpus.lines.append(words)
        lines.append(f"[{format_clock(seconds)}] Speaker {rng.randint(1, speakers)}: {_sentence(words)}")
        seconds += count * 60 / WORDS_PER_MINUTE + rng.uniform(0.1, 0.6)
    return "\n".join(lines) + "\n"


# --- storing and indexing ----------------------------------------------------------------------------------


def store(database: Path, corpus: Corpus) -> None:
    """Recordings and their done transcribe and summarize prompts, through the models, not yet indexed."""
    sessions = make_sessionmaker(make_engine(database))
    with sessions() as session:
        for hour, (transcript, summary) in enumerate(zip(corpus.transcripts, corpus.summaries, strict=True)):
            found = T0 + timedelta(hours=hour * 7)
            recording = Recording(state=RecordingState.EXPIRED, source_path=f"/srv/inbox/meeting-{hour:03d}.m4a",
                                  source_size=1, source_mtime_ns=1, last_change_at=found, created_at=found,
                                  state_changed_at=found, duration_seconds=3600.0)
            session.add(recording)
            session.flush()
            for template, answer in (("transcribe", transcript), ("summarize", summary)):
                prompt = Prompt(state=PromptState.DONE, template=template, prompt_text=template,
                                model="gemini-2.5-flash", created_at=found, finished_at=found + timedelta(hours=1),
                                result_text=answer, result_path=f"/results/meeting-{hour:03d}.{template}.md")
                prompt.recordings = [PromptRecording(recording_id=recording.id, position=0)]
                session.add(prompt)
        session.commit()


def build_index(database: Path) -> tuple[int, float, list[float]]:
    """Rows indexed, the rebuild's seconds, and the seconds of re-indexing one transcript (the hook's cost)."""
    sessions = make_sessionmaker(make_engine(database))
    with sessions() as session:
        started = time.perf_counter()
        rows = search.rebuild(session)
        session.commit()
        rebuild_seconds = time.perf_counter() - started
        hook = []
        for _ in range(5):
            started = time.perf_counter()
            search.index_prompt(session, 1)
            session.commit()
            hook.append(time.perf_counter() - started)
    return rows, rebuild_seconds, hook


def index_bytes(database: Path) -> tuple[int, int]:
    """Bytes of the index's tables (dbstat, else the FTS5 shadow tables' page counts) and of the whole file."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        try:
            size = db.execute("SELECT sum(pgsize) FROM dbstat WHERE name LIKE ?", (f"{search.TABLE}%",)).fetchone()[0]
        except sqlite3.OperationalError:
            size = None
    if size is None:
        size = -1
    return int(size), database.stat().st_size + _size(database.with_name(database.name + "-wal"))


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# --- queries -----------------------------------------------------------------------------------------------

Query = tuple[str, str, dict[str, Any]]  # kind, text, filters


def make_queries(corpus: Corpus, count: int, hours: int, seed: int) -> list[Query]:
    rng = random.Random(seed + 1)
    vocab = corpus.vocabulary
    accented = [word for word in vocab if word != search.fold(word)] or vocab
    kinds: list[tuple[str, float, Callable[[], tuple[str, dict[str, Any]]]]] = [
        ("common word", 0.15, lambda: (rng.choice(vocab[:100]), {})),
        ("rare word", 0.15, lambda: (rng.choice(vocab[1000:]), {})),
        ("two words", 0.15, lambda: (" ".join(rng.sample(rng.choice(corpus.lines), 2)), {})),
        ("phrase", 0.15, lambda: (_phrase(rng, corpus), {})),
        ("prefix", 0.125, lambda: (rng.choice(vocab[100:1500])[:rng.choice((3, 4))] + "*", {})),
        ("accents off", 0.1, lambda: (search.fold(rng.choice(accented)), {})),
        ("filtered", 0.1, lambda: (rng.choice(vocab[50:600]), rng.choice(
            [{"template": "summarize"}, {"template": "transcribe"}, {"recording_id": rng.randint(1, hours)}]))),
        ("no hit, operators", 0.075, lambda: (rng.choice(["zzqx", 'NEAR("budget" AND (', '"unclosed ' + vocab[7],
                                               "xylophone quartz", "*", "OR NOT"]), {})),
    ]
    queries = []
    for kind, share, make in kinds:
        queries += [(kind, *make()) for _ in range(round(count * share))]
    rng.shuffle(queries)
    return queries[:count]


def _phrase(rng: random.Random, corpus: Corpus) -> str:
    words = rng.choice(corpus.lines)
    length = rng.choice((2, 3))
    start = rng.randrange(max(1, len(words) - length + 1))
    return '"' + " ".join(words[start:start + length]) + '"'


def run_queries(database: Path, queries: list[Query]) -> tuple[list[tuple[str, float, int]], float]:
    """Each query's kind, milliseconds and hits, after a few warm-up queries; and the first (cold) query's ms."""
    sessions = make_sessionmaker(make_engine(database, readonly=True))
    started = time.perf_counter()
    with sessions() as session:
        search.search(session, queries[0][1], **queries[0][2])
    cold = (time.perf_counter() - started) * 1000
    for _, text, filters in queries[:5]:
        with sessions() as session:
            search.search(session, text, **filters)
    timed = []
    for kind, text, filters in queries:
        started = time.perf_counter()
        with sessions() as session:
            hits = search.search(session, text, **filters)
        timed.append((kind, (time.perf_counter() - started) * 1000, len(hits)))
    return timed, cold


def cli_seconds(config: Path, runs: int) -> list[float]:
    """Wall time of `audiodrop search WORD --json`, process start-up included."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([PYTHON, "-m", "daemon", "search", "the", "--json", "--config", str(config)], cwd=ROOT,
                       capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return times


# --- report ------------------------------------------------------------------------------------------------


def report(timed: list[tuple[str, float, int]], cold: float, other_load: float) -> float:
    kinds = list(dict.fromkeys(kind for kind, _, _ in timed))
    rows = []
    for kind in [*kinds, "all"]:
        ms = [t for k, t, _ in timed if kind in (k, "all")]
        hits = [h for k, _, h in timed if kind in (k, "all")]
        rows.append([kind, len(ms), percentile(ms, 50), percentile(ms, 95), max(ms), sum(hits) / len(hits)])
    print_table(f"query latency, ms (first query, cold: {cold:.1f} ms; other load {other_load:.2f} cores)",
                ["kind", "queries", "p50", "p95", "max", "hits (mean)"], rows)
    return percentile([t for _, t, _ in timed], 95)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=int, default=100, help="hours of transcripts (one-hour recordings)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--vocabulary", type=int, default=4000, help="distinct words")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cli-runs", type=int, default=3, help="`audiodrop search` runs timed whole")
    args = parser.parse_args(argv)
    options = ["--hours", str(args.hours), "--queries", str(args.queries), "--vocabulary", str(args.vocabulary),
               "--seed", str(args.seed), "--cli-runs", str(args.cli_runs)]
    header(f"search: {args.queries} queries over {args.hours} h of transcripts (+ a summary each)", MODULE, options)
    work = Path(tempfile.mkdtemp(prefix="audiodrop-bench-search-"))
    try:
        return _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, work: Path) -> dict[str, float]:
    config = write_config(work, test_timings=False)
    database = load_settings(config).database_path
    database.parent.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(database)
    started = time.perf_counter()
    corpus = make_corpus(args.hours, args.vocabulary, args.seed)
    words = sum(len(text.split()) - 3 * text.count("\n") for text in corpus.transcripts)
    store(database, corpus)
    made = time.perf_counter() - started
    rows, rebuild_seconds, hook = build_index(database)
    index_size, file_size = index_bytes(database)
    print_table("corpus and index", ["what", "value"], [
        ["transcripts / summaries", f"{len(corpus.transcripts)} / {len(corpus.summaries)}"],
        ["transcript words (about)", f"{words:,} ({words / max(1, args.hours * 60):.0f} a minute)"],
        ["distinct words", f"{len(corpus.vocabulary):,}"],
        ["index rows", f"{rows:,}"],
        ["index size (FTS5 tables)", f"{index_size / 1e6:.1f} MB" if index_size >= 0 else "unknown (no dbstat)"],
        ["database file", f"{file_size / 1e6:.1f} MB"],
        ["made and stored in", f"{made:.1f} s"],
        ["rebuild (whole index)", f"{rebuild_seconds:.2f} s"],
        ["index_prompt, one 1-hour transcript", f"{percentile(hook, 50) * 1000:.1f} ms (median of {len(hook)})"],
    ])
    load = HostLoad()
    timed, cold = run_queries(database, make_queries(corpus, args.queries, args.hours, args.seed))
    p95 = report(timed, cold, load.other_cores(0.0))
    cli = cli_seconds(config, args.cli_runs) if args.cli_runs else []
    if cli:
        print(f"cli: `audiodrop search the --json`, start-up included: median {percentile(cli, 50) * 1000:.0f} ms")
    all_ms = [t for _, t, _ in timed]
    print(f"summary: p50 {percentile(all_ms, 50):.1f} ms, p95 {p95:.1f} ms, max {max(all_ms):.1f} ms over "
          f"{len(timed)} queries, {args.hours} h of transcripts, index {index_size / 1e6:.1f} MB; goal p95 <= "
          f"{GOAL_P95_MS:.0f} ms: {'met' if p95 <= GOAL_P95_MS else 'NOT met'}")
    return {"p50_ms": percentile(all_ms, 50), "p95_ms": p95, "max_ms": max(all_ms), "index_bytes": index_size}


if __name__ == "__main__":
    main()
