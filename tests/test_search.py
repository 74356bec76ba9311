"""Full-text search over prompt results (daemon.prompts.search, `audiodrop search` and `audiodrop open`), on a
real database made by the real migrations: SQLite (FTS5) always, PostgreSQL (tsvector) when its binaries exist."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

import migrations
from daemon.config import load_settings
from daemon.prompts import results, search
from db.models import Prompt, PromptRecording, Recording
from db.session import alembic_config, make_engine, make_sessionmaker, upgrade_to_head
from db.states import PromptState, RecordingState
from tests.conftest import T0, write_config
from tests.harness import run_cli
from tests.pg import PostgresServer, database_name_for

TRANSCRIPT = """[00:00:05] Speaker 1: Good morning, welcome to the planning meeting.
[00:01:23] Speaker 2: The budget for next quarter is not final.
Still waiting on the Café order from Müller.

[01:02:03] Speaker 1: Rock and roll never dies, said the manager near the door.
"""
SUMMARY = "- The team discussed the budget.\n- Café orders were late.\n"


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file made by the real migrations, once; each test gets a copy (migrating takes a second)."""
    path = tmp_path_factory.mktemp("search") / "template.db"
    upgrade_to_head(path)
    return path


@pytest.fixture(scope="module")
def postgres_template(postgres_server: PostgresServer) -> Iterator[str]:
    """A PostgreSQL database made by the real migrations, once; each test gets a copy (CREATE DATABASE TEMPLATE)."""
    name = database_name_for("search_template")
    postgres_server.create_database(name)
    config = Config()
    config.set_main_option("script_location", migrations.__path__[0])
    config.set_main_option("sqlalchemy.url", postgres_server.url(name))
    command.upgrade(config, "head")
    yield name
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a migrated database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "search.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        engine = make_engine(path)
        yield make_sessionmaker(engine)
        engine.dispose()
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = database_name_for(request.node.name)
    server.create_database(name, template=request.getfixturevalue("postgres_template"))
    engine = create_engine(server.url(name))
    yield make_sessionmaker(engine)
    engine.dispose()
    server.drop_database(name)


def add_recording(session: Session, name: str = "meeting.wav", created_at: object = T0) -> int:
    recording = Recording(state=RecordingState.ACTIVE, source_path=f"/srv/inbox/{name}", source_size=1,
                          source_mtime_ns=1, last_change_at=T0, created_at=created_at, state_changed_at=T0)
    session.add(recording)
    session.flush()
    return recording.id


def add_prompt(session: Session, answer: str | None, recording_ids: list[int], *, template: str = "transcribe",
               finished_at: object = T0, state: PromptState = PromptState.DONE, result_path: str | None = None,
               index: bool = True) -> int:
    """A prompt stored through the models (as store_answer leaves it), then indexed as its hook does."""
    prompt = Prompt(state=state, template=template, prompt_text="Transcribe", model="gemini-2.5-flash",
                    created_at=T0, finished_at=finished_at, result_text=answer, result_path=result_path)
    prompt.recordings = [PromptRecording(recording_id=rid, position=n) for n, rid in enumerate(recording_ids)]
    session.add(prompt)
    session.flush()
    if index:
        search.index_prompt(session, prompt.id)
    return prompt.id


def found(session: Session, query: str, **filters: object) -> list[tuple[int, float | None]]:
    return [(hit.prompt_id, hit.timestamp_seconds) for hit in search.search(session, query, **filters)]  # type: ignore[arg-type]


# --- finding lines ---------------------------------------------------------------------------------------------


def test_a_transcript_line_is_found_with_its_time_speaker_recording_and_marked_words(
        db: sessionmaker[Session]) -> None:
    with db() as session:
        rid = add_recording(session, "weekly sync.m4a")
        pid = add_prompt(session, TRANSCRIPT, [rid], result_path="/results/weekly sync.transcribe.md")
        session.commit()
        [hit] = search.search(session, "budget")
    assert (hit.prompt_id, hit.recording_ids, hit.template) == (pid, (rid,), "transcribe")
    assert (hit.timestamp_seconds, hit.speaker, hit.line) == (83.0, "Speaker 2", 1)
    assert hit.snippet == "The **budget** for next quarter is not final."
    assert hit.recording_names == ("weekly sync.m4a",)
    assert (hit.finished_at, hit.result_path) == (T0, "/results/weekly sync.transcribe.md")


def test_a_line_without_a_timestamp_continues_the_line_before(db: sessionmaker[Session]) -> None:
    with db() as session:
        add_prompt(session, "Transcript of the meeting\n" + TRANSCRIPT, [add_recording(session)])
        [waiting] = search.search(session, "waiting")
        [heading] = search.search(session, "meeting transcript")
    assert (waiting.timestamp_seconds, waiting.speaker, waiting.line) == (83.0, "Speaker 2", 3)
    assert (heading.timestamp_seconds, heading.speaker, heading.line) == (None, None, 0)


def test_a_summary_is_one_row_without_a_time(db: sessionmaker[Session]) -> None:
    with db() as session:
        pid = add_prompt(session, SUMMARY, [add_recording(session)], template="summarize")
        assert search.rows_for(SUMMARY) == [search.Row(0, None, None, SUMMARY.strip())]
        [hit] = search.search(session, "budget late")  # words of two lines of one summary
    assert (hit.prompt_id, hit.template, hit.timestamp_seconds, hit.speaker) == (pid, "summarize", None, None)
    assert "**budget**" in hit.snippet and "\n" not in hit.snippet


def test_accents_and_case_are_ignored(db: sessionmaker[Session]) -> None:
    with db() as session:
        add_prompt(session, TRANSCRIPT, [add_recording(session)])
        for query, marked in [("cafe", "**Café**"), ("CAFÉ", "**Café**"), ("café", "**Café**"),
                              ("Cafe\u0301", "**Café**"), ("muller", "**Müller**"), ("MÜLLER", "**Müller**")]:
            hits = search.search(session, query)
            assert [(hit.timestamp_seconds, hit.line) for hit in hits] == [(83.0, 2)], query
            assert marked in hits[0].snippet, query


def test_words_without_accents_in_the_text_are_found_by_accented_queries(db: sessionmaker[Session]) -> None:
    with db() as session:
        add_prompt(session, "[00:00:01] Speaker 1: We met at the cafe on Resume Street.", [add_recording(session)])
        assert len(search.search(session, "Café résumé")) == 1


def test_a_phrase_needs_its_words_together_and_in_order(db: sessionmaker[Session]) -> None:
    with db() as session:
        add_prompt(session, TRANSCRIPT, [add_recording(session)])
        assert found(session, '"next quarter"') == [(1, 83.0)]
        assert found(session, '"quarter next"') == []
        assert found(session, '"budget quarter"') == []
        assert found(session, "budget quarter") == [(1, 83.0)]  # bare words: anywhere in the line


def test_a_star_makes_a_prefix(db: sessionmaker[Session]) -> None:
    with db() as session:
        add_prompt(session, TRANSCRIPT, [add_recording(session)])
        assert found(session, "budg") == []
        assert found(session, "budg*") == [(1, 83.0)]
        assert found(session, '"next quart*"') == [(1, 83.0)]
        assert "**Rock**" in search.search(session, "ro*")[0].snippet


def test_operator_words_are_plain_words(db: sessionmaker[Session]) -> None:
    with db() as session:
        add_prompt(session, TRANSCRIPT, [add_recording(session)])
        assert found(session, "rock AND roll") == [(1, 3723.0)]  # "and" is in the line
        assert found(session, "NEAR door") == [(1, 3723.0)]
        assert found(session, "budget OR rock") == []  # "or" is not
        assert found(session, "NOT budget") == [(1, 83.0)]


HOSTILE = ['"', '""', "(", ")", "(budget", "budget)", "budget AND", "OR", "NOT", "AND OR NOT", "NEAR(budget final)",
           "NEAR(budget final, 2)", "*", "**", "budget**", "^budget", "-budget", "+budget", "text:budget",
           "speaker:budget", "{text speaker}:budget", '"unclosed phrase', 'a"b"c', "'; DROP TABLE prompts; --",
           "\x00budget", "budget\x00", "\\", "%", "_", "🙂", "🙂 budget", "日本語", "\u200b", " \t\n ", "",
           "budget " * 5000, "x" * 100_000, '"' * 999, "(" * 999 + "budget", "budget" + "*" * 999,
           " ".join(f'"{n}"' for n in range(1000))]


def test_hostile_queries_never_raise(db: sessionmaker[Session]) -> None:
    with db() as session:
        add_prompt(session, TRANSCRIPT, [add_recording(session)])
        session.commit()
        for query in HOSTILE:
            hits = search.search(session, query)
            assert all(hit.prompt_id == 1 for hit in hits), query
        assert session.scalar(text("SELECT count(*) FROM prompts")) == 1
        assert found(session, '"next quarter"') == [(1, 83.0)]  # the session is still usable


def test_queries_keep_only_their_words(db: sessionmaker[Session]) -> None:
    assert search.parse_query('(budget) NEAR/2 "next  quart*" l\'été -x') == [
        search.Term(("budget",)), search.Term(("near", "2")),
        search.Term(("next", "quart"), prefix=True), search.Term(("l", "ete")), search.Term(("x",))]
    assert search.parse_query('"" () * -') == []
    assert len(search.parse_query("word " * 1000)) == search.MAX_TERMS
    with db() as session:
        add_prompt(session, TRANSCRIPT, [add_recording(session)])
        assert search.search(session, "") == []
        assert search.search(session, "()") == []


# --- filters and order -----------------------------------------------------------------------------------------


def test_filters_by_template_recording_and_the_recordings_dates(db: sessionmaker[Session]) -> None:
    with db() as session:
        monday = add_recording(session, "monday.wav", created_at=T0)
        friday = add_recording(session, "friday.wav", created_at=T0 + timedelta(days=4))
        on_monday = add_prompt(session, TRANSCRIPT, [monday])
        on_friday = add_prompt(session, TRANSCRIPT, [friday])
        summary = add_prompt(session, SUMMARY, [monday, friday], template="summarize")
        assert {pid for pid, _ in found(session, "budget")} == {on_monday, on_friday, summary}
        assert {pid for pid, _ in found(session, "budget", template="summarize")} == {summary}
        assert {pid for pid, _ in found(session, "budget", template="transcribe")} == {on_monday, on_friday}
        assert {pid for pid, _ in found(session, "budget", recording_id=monday)} == {on_monday, summary}
        assert {pid for pid, _ in found(session, "budget", since=T0 + timedelta(days=1))} == {on_friday, summary}
        assert {pid for pid, _ in found(session, "budget", until=T0 + timedelta(days=1))} == {on_monday, summary}
        assert found(session, "budget", recording_id=999) == []
        assert len(search.search(session, "budget", limit=2)) == 2
        assert search.search(session, "budget", limit=0) == []


def test_only_done_prompts_are_found(db: sessionmaker[Session]) -> None:
    with db() as session:
        rid = add_recording(session)
        add_prompt(session, TRANSCRIPT, [rid], state=PromptState.FAILED)
        add_prompt(session, None, [rid], state=PromptState.QUEUED)
        assert found(session, "budget") == []


def test_the_better_match_comes_first_then_the_newer_prompt(db: sessionmaker[Session]) -> None:
    with db() as session:
        rid = add_recording(session)
        diluted = add_prompt(session, "[00:00:01] Speaker 1: the budget " + "and so on " * 30, [rid])
        older = add_prompt(session, "[00:00:09] Speaker 1: budget budget", [rid], finished_at=T0)
        newer = add_prompt(session, "[00:00:09] Speaker 1: budget budget", [rid], finished_at=T0 + timedelta(hours=1))
        assert [pid for pid, _ in found(session, "budget")] == [newer, older, diluted]


# --- keeping the index in step ---------------------------------------------------------------------------------


def test_indexing_a_prompt_again_replaces_its_rows(db: sessionmaker[Session]) -> None:
    with db() as session:
        rid = add_recording(session)
        first = add_prompt(session, TRANSCRIPT, [rid])
        neighbour = add_prompt(session, TRANSCRIPT, [rid])
        prompt = session.get(Prompt, first)
        assert prompt is not None
        prompt.result_text = "[00:00:42] Speaker 1: An entirely different answer."
        session.flush()
        assert search.index_prompt(session, first) == 1
        assert found(session, "budget") == [(neighbour, 83.0)]
        assert found(session, "entirely") == [(first, 42.0)]
        search.remove_prompt(session, first)
        assert found(session, "entirely") == []
        assert len(found(session, "budget")) == 1


def test_rebuild_restores_an_index_whose_content_was_deleted(db: sessionmaker[Session]) -> None:
    with db() as session:
        rid = add_recording(session)
        add_prompt(session, TRANSCRIPT, [rid])
        add_prompt(session, SUMMARY, [rid], template="summarize")
        add_prompt(session, "[00:00:01] Speaker 1: never indexed budget", [rid], index=False)
        session.commit()
        session.execute(text(f"DELETE FROM {search.TABLE}"))
        session.commit()
        assert found(session, "budget") == []
        assert search.needs_rebuild(session)
        assert search.rebuild(session) == 4 + 1 + 1
        session.commit()
    with db() as session:
        assert sorted(found(session, "budget")) == [(1, 83.0), (2, None), (3, 1.0)]
        assert not search.needs_rebuild(session)


def test_a_broken_index_never_costs_the_answer(db: sessionmaker[Session]) -> None:
    with db() as session:
        session.execute(text(f"DROP TABLE {search.TABLE}"))
        pid = add_prompt(session, TRANSCRIPT, [add_recording(session)])  # index_prompt logs and returns 0
        session.commit()
    with db() as session:
        stored = session.get(Prompt, pid)
        assert stored is not None and stored.result_text == TRANSCRIPT


def test_the_migration_indexes_the_answers_stored_before_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    command.upgrade(alembic_config(path), "0007")
    engine = make_engine(path)
    with engine.begin() as connection:  # revision 0007's columns, as they were
        connection.execute(text("INSERT INTO prompts (id, state, template, prompt_text, model, output_format, "
                                "attempts, created_at, result_text) VALUES (7, 'done', 'transcribe', 'Transcribe', "
                                "'gemini-2.5-flash', 'markdown', 0, '2026-11-25 12:00:00.000000', :answer)"),
                           {"answer": TRANSCRIPT})
    upgrade_to_head(path)
    with make_sessionmaker(engine)() as session:
        assert found(session, "budget") == [(7, 83.0)]
    engine.dispose()


# --- the command line ------------------------------------------------------------------------------------------


def run_all(config: Path, *calls: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
    """`python -m daemon ... --config` for each call, side by side (each start costs about half a second)."""
    env = {**os.environ, "COLUMNS": "200"}
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: run_cli(config, *args, env=env), calls))


@pytest.fixture
def cli_config(tmp_path: Path) -> Path:
    """A configuration whose database holds a transcript (with its result file) and a summary (file not yet
    written)."""
    config = write_config(tmp_path)
    settings = load_settings(config)
    upgrade_to_head(settings.database_path)
    engine = make_engine(settings.database_path)
    metadata = {"prompt_id": 1, "recordings": ["weekly sync.m4a"], "template": "transcribe", "finished_at": T0}
    text_path, meta_path = results.result_paths(settings.results_dir, recording_names=["weekly sync.m4a"],
                                                template="transcribe", prompt_id=1, output_format="markdown")
    results.write_result(text_path, meta_path, results.render_markdown("weekly sync.m4a", TRANSCRIPT, metadata),
                         metadata)
    with make_sessionmaker(engine)() as session:
        rid = add_recording(session, "weekly sync.m4a")
        add_prompt(session, TRANSCRIPT, [rid], result_path=str(text_path))
        add_prompt(session, SUMMARY, [rid], template="summarize", finished_at=T0 + timedelta(hours=1))
        session.commit()
    engine.dispose()
    return config


def test_cli_search_and_open(cli_config: Path) -> None:
    as_json, filtered, table, no_query, no_words, hostile, path, at, unwritten, bad_time = run_all(
        cli_config, ("search", "Cafe", "--json"),
        ("search", "cafe", "--template", "summarize", "--recording", "1", "--limit", "5", "--json"),
        ("search", "rock"), ("search",), ("search", '"()"'), ("search", 'NEAR("budget" AND (final', "--json"),
        ("open", "1"), ("open", "1", "--at", "00:01:00"), ("open", "2"), ("open", "1", "--at", "soon"))
    assert (as_json.returncode, as_json.stderr) == (0, "")
    hits = json.loads(as_json.stdout)
    assert sorted((h["prompt_id"], h["template"], h["timestamp"], h["time"]) for h in hits) == [
        (1, "transcribe", 83.0, "00:01:23"), (2, "summarize", None, None)]
    line = next(h for h in hits if h["prompt_id"] == 1)
    assert line["recording_ids"] == [1] and line["recordings"][0]["name"] == "weekly sync.m4a"
    assert line["snippet"] == "Still waiting on the **Café** order from Müller."
    assert (line["result_line"], line["speaker"]) == (3, "Speaker 2")
    assert [h["prompt_id"] for h in json.loads(filtered.stdout)] == [2]
    assert table.returncode == 0 and "01:02:03" in table.stdout and "Rock" in table.stdout
    assert "weekly sync.m4a" in table.stdout and "**" not in table.stdout
    assert (no_query.returncode, no_words.returncode, bad_time.returncode) == (2, 2, 2)
    assert (hostile.returncode, json.loads(hostile.stdout)) == (0, [])
    result_file = line["result_path"]
    assert (path.returncode, path.stdout.strip()) == (0, result_file)
    where, number = at.stdout.strip().rsplit(":", 1)
    lines = Path(result_file).read_text(encoding="utf-8").splitlines()
    assert where == result_file and lines[int(number) - 1].startswith("[00:01:23] Speaker 2: The budget")
    assert unwritten.returncode == 1 and "no result file" in unwritten.stderr  # the summary's is not written yet


def test_open_finds_the_line_at_or_after_a_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.cli.search import line_at

    path = tmp_path / "r.md"
    path.write_text("# weekly sync\n\n- Date: 2026-11-25 12:00 UTC\n\n---\n\n" + TRANSCRIPT, encoding="utf-8")
    assert [line_at(1, path, seconds) for seconds in (0, 5, 5.5, 83, 3723)] == [7, 7, 8, 8, 11]
    with pytest.raises(SystemExit) as exit_info:
        line_at(1, path, 7200)
    assert exit_info.value.code == 1 and "ends at 01:02:03" in capsys.readouterr().err
    path.write_text(SUMMARY, encoding="utf-8")
    with pytest.raises(SystemExit):
        line_at(1, path, 0)
    assert "no timestamps" in capsys.readouterr().err


def test_cli_rebuild_fills_the_index_again(cli_config: Path) -> None:
    engine = make_engine(load_settings(cli_config).database_path)
    with engine.begin() as connection:
        connection.execute(text(f"DELETE FROM {search.TABLE}"))
    engine.dispose()
    empty = run_cli(cli_config, "search", "budget", "--json")
    assert json.loads(empty.stdout) == [] and "--rebuild" in empty.stderr
    rebuilt = run_cli(cli_config, "search", "--rebuild", "--json")
    assert (rebuilt.returncode, json.loads(rebuilt.stdout)) == (0, {"indexed_rows": 5})
    assert len(json.loads(run_cli(cli_config, "search", "budget", "--json").stdout)) == 2
