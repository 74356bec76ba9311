"""The CLI for scripts: `--json` on every command that prints, `result --format`, the filters of `files` and
`prompts` (the same rows in the table and in --json), and errors as one clear line with the documented exit
status. Run in-process with click's runner on a real database made by the real migrations."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import srt
import webvtt
from click.testing import CliRunner, Result

from daemon.cli import main
from daemon.config import load_settings
from daemon.prompts import results
from db.models import Prompt, PromptRecording, Recording
from db.session import make_engine, make_sessionmaker, upgrade_to_head
from db.states import PromptState as P
from db.states import RecordingState as S
from tests.conftest import T0, write_config

TRANSCRIPT = """[00:00:01] Speaker 1: Good morning, this is the standup.
[00:00:04] Speaker 2: The release waits for the budget.
[00:00:09] Speaker 1: Then we meet again on Friday.
"""
SUMMARY = "- The release waits for the budget.\n- The team meets again on Friday.\n"
DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def template_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database made by the real migrations, once; each test gets a copy (migrating takes a second)."""
    path = tmp_path_factory.mktemp("cli") / "template.db"
    upgrade_to_head(path)
    return path


@pytest.fixture
def cli(tmp_path: Path, template_database: Path) -> Callable[..., Result]:
    """`audiodrop ARGS --config ...` in-process, on a state holding three recordings and three prompts:

    1 inbox/standup.wav  active    (day 0)  prompts 1 transcribe done (timestamped), 2 summarize done (day 1)
    2 made/memo.wav      failed    (day 1)  prompt 3 transcribe failed (day 2)
    3 inbox/sub/odd.wav  rejected  (day 2)
    """
    config = write_config(tmp_path)
    settings = load_settings(config)
    settings.state_dir.mkdir(parents=True)
    shutil.copy(template_database, settings.database_path)
    inbox, made = tmp_path / "inbox", tmp_path / "made"
    engine = make_engine(settings.database_path)
    with make_sessionmaker(engine)() as session:
        standup = add_recording(session, inbox / "standup.wav", S.ACTIVE, T0, watch_root=inbox, duration=12.0)
        memo = add_recording(session, made / "memo.wav", S.FAILED, T0 + DAY, error="memo.wav: the upload failed")
        add_recording(session, inbox / "sub" / "odd.wav", S.REJECTED, T0 + 2 * DAY, watch_root=inbox,
                      error="odd.wav: no audio stream")
        add_prompt(session, standup, "transcribe", P.DONE, T0, TRANSCRIPT)
        add_prompt(session, standup, "summarize", P.DONE, T0 + DAY, SUMMARY)
        add_prompt(session, memo, "transcribe", P.FAILED, T0 + 2 * DAY, None, error="the recording failed")
        session.commit()
    engine.dispose()
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(main, [*args, "--config", str(config)], env={"COLUMNS": "200"})

    return run


def add_recording(session: Any, path: Path, state: S, created_at: Any, *, watch_root: Path | None = None,
                  duration: float | None = None, error: str | None = None) -> int:
    recording = Recording(state=state, source_path=str(path), source_size=1, source_mtime_ns=1, last_change_at=T0,
                          created_at=created_at, state_changed_at=created_at, error=error,
                          watch_root=str(watch_root) if watch_root else None, duration_seconds=duration)
    session.add(recording)
    session.flush()
    return recording.id


def add_prompt(session: Any, recording_id: int, template: str, state: P, created_at: Any, answer: str | None,
               error: str | None = None) -> int:
    """A prompt as the runner leaves it: the answer and the metadata its result files are written from."""
    recording = session.get(Recording, recording_id)
    prompt = Prompt(state=state, template=template, prompt_text=f"{template} it", model="gemini-2.5-flash",
                    created_at=created_at, finished_at=created_at, result_text=answer, error=error)
    prompt.recordings = [PromptRecording(recording_id=recording_id, position=0)]
    session.add(prompt)
    session.flush()
    if answer is not None:
        prompt.result_meta = json.dumps({
            "prompt_id": prompt.id, "recordings": [Path(recording.source_path).name], "recording_ids": [recording_id],
            "template": template, "model": "gemini-2.5-flash", "finished_at": "2026-11-25T12:00:00Z",
            "prompt_tokens": 400, "audio_tokens": 384, "output_tokens": 52, "finish_reason": "STOP"})
    return prompt.id


def ok(result: Result) -> str:
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    return result.stdout


def ids(result: Result) -> list[int]:
    return [item["id"] for item in json.loads(ok(result))]


def one_line_error(result: Result, status: int) -> str:
    assert result.exit_code == status, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- --json everywhere ------------------------------------------------------------------------------------------


def test_every_command_that_prints_has_json() -> None:
    printing = {name for name in main.commands if name != "run"}  # `run` is the daemon: it prints only its log
    assert {name for name in printing if not any(p.name == "as_json" for p in main.commands[name].params)} == set()


def test_status_json_keeps_the_fields_scripts_rely_on(cli: Callable[..., Result]) -> None:
    report = json.loads(ok(cli("status", "--json")))
    assert {"daemon", "nodes", "recordings", "prompts", "storage", "next_expiry", "tokens_today"} <= set(report)
    assert report["recordings"]["active"] == 1 and report["recordings"]["rejected"] == 1
    assert report["prompts"] == {"queued": 0, "running": 0, "done": 2, "failed": 1}
    assert {"used_bytes", "limit_bytes"} <= set(report["storage"])
    assert {"running", "pid", "node"} <= set(report["daemon"]) and report["daemon"]["running"] is False


def test_retry_json_prints_the_item_as_files_and_prompts_show_it(cli: Callable[..., Result]) -> None:
    recording = json.loads(ok(cli("retry", "2", "--json")))
    assert recording["id"] == 2 and recording["state"] == "discovered" and recording["error"] is None
    assert set(recording) == set(json.loads(ok(cli("files", "--json")))[1])
    prompt = json.loads(ok(cli("retry", "3", "--prompt", "--json")))
    assert (prompt["id"], prompt["state"], prompt["error"]) == (3, "queued", None)
    assert set(prompt) == set(json.loads(ok(cli("prompts", "--json")))[2])
    assert prompt["history"][-1]["reason"] == "retry requested from the command line"
    # A prompt that is not failed cannot be queued again; a recording that is not failed or rejected neither.
    refused = one_line_error(cli("retry", "1", "--prompt", "--json"), 1)
    assert refused == "audiodrop: prompt 1 is done; only a failed prompt can be queued again"
    assert one_line_error(cli("retry", "1"), 1).startswith("audiodrop: recording 1 is active; only failed")


# --- result in every format ---------------------------------------------------------------------------------


def test_result_prints_a_transcript_in_every_format(cli: Callable[..., Result]) -> None:
    assert ok(cli("result", "1")) == TRANSCRIPT
    assert ok(cli("result", "1", "--format", "text")) == TRANSCRIPT
    meta = json.loads(ok(cli("result", "1", "--format", "json")))
    assert meta["text"] == TRANSCRIPT and meta["prompt_id"] == 1 and meta["template"] == "transcribe"
    # Markdown as the .md result file is written: the same header and answer.
    markdown = ok(cli("result", "1", "--format", "markdown"))
    assert markdown == results.render_markdown("standup.wav", TRANSCRIPT, {k: v for k, v in meta.items()
                                                                           if k != "text"})
    assert markdown.startswith("# standup.wav\n") and "- Template: transcribe" in markdown
    assert markdown.endswith(TRANSCRIPT)
    cues = list(srt.parse(ok(cli("result", "1", "--format", "srt"))))
    assert [(c.start.total_seconds(), " ".join(c.content.split())) for c in cues] == [
        (1.0, "Speaker 1: Good morning, this is the standup."), (4.0, "Speaker 2: The release waits for the budget."),
        (9.0, "Speaker 1: Then we meet again on Friday.")]
    assert cues[-1].end.total_seconds() <= 12.0  # never past the recording's end
    vtt = webvtt.from_buffer(io.StringIO(ok(cli("result", "1", "--format", "vtt"))))
    assert [caption.start for caption in vtt] == ["00:00:01.000", "00:00:04.000", "00:00:09.000"]


def test_result_json_holds_the_prompt_and_the_content_in_the_format_asked(cli: Callable[..., Result]) -> None:
    report = json.loads(ok(cli("result", "1", "--format", "vtt", "--json")))
    assert (report["id"], report["state"], report["template"], report["format"]) == (1, "done", "transcribe", "vtt")
    assert report["content"].startswith("WEBVTT\n") and report["recording_ids"] == [1]
    plain = json.loads(ok(cli("result", "2", "--json")))
    assert (plain["format"], plain["content"]) == ("text", SUMMARY)


def test_result_errors_are_one_line_with_the_documented_status(cli: Callable[..., Result]) -> None:
    no_stamps = one_line_error(cli("result", "2", "--format", "srt"), 1)
    assert no_stamps.startswith("audiodrop: prompt 2's result has no timestamps")
    assert one_line_error(cli("result", "3", "--json"), 1) == "audiodrop: prompt 3 is failed: the recording failed"
    assert one_line_error(cli("result", "9"), 1) == "audiodrop: no prompt with id 9"
    assert "'doc' is not one of" in cli("result", "1", "--format", "doc").stderr
    assert cli("result", "1", "--format", "doc").exit_code == 2


# --- filters ------------------------------------------------------------------------------------------------------


def test_files_filters_combine_and_the_table_shows_the_same_rows(cli: Callable[..., Result], tmp_path: Path) -> None:
    inbox, made = str(tmp_path / "inbox"), str(tmp_path / "made")
    assert ids(cli("files", "--json")) == [1, 2, 3]
    assert ids(cli("files", "--folder", inbox, "--json")) == [1, 3]  # the drop folder, subfolders included
    assert ids(cli("files", "--folder", made, "--json")) == [2]  # any folder the files lie in
    assert ids(cli("files", "--folder", str(tmp_path / "inbox" / "sub"), "--json")) == [3]
    assert ids(cli("files", "--folder", str(tmp_path / "inb"), "--json")) == []  # whole names only
    assert ids(cli("files", "--template", "summarize", "--json")) == [1]
    assert ids(cli("files", "--template", "transcribe", "--json")) == [1, 2]
    assert ids(cli("files", "--since", "2026-11-26", "--json")) == [2, 3]
    assert ids(cli("files", "--until", "2026-11-25", "--json")) == [1]  # a date alone: that whole day
    assert ids(cli("files", "--since", "2026-11-26T12:00:00Z", "--until", "2026-11-26T12:00", "--json")) == [2]
    assert ids(cli("files", "--until", "2026-11-26T13:00:00+01:00", "--json")) == [1, 2]  # an offset is honoured
    assert ids(cli("files", "--until", "2026-11-26T12:59:59+01:00", "--json")) == [1]
    assert ids(cli("files", "--folder", inbox, "--since", "2026-11-26", "--json")) == [3]
    assert ids(cli("files", "--folder", inbox, "--state", "active", "--template", "transcribe", "--json")) == [1]
    table = ok(cli("files", "--folder", inbox))
    assert "standup.wav" in table and "odd.wav" in table and "memo.wav" not in table
    assert ok(cli("files", "--state", "converted")).strip() == "no recordings match"


def test_prompts_filters_combine_and_the_table_shows_the_same_rows(cli: Callable[..., Result],
                                                                   tmp_path: Path) -> None:
    assert ids(cli("prompts", "--folder", str(tmp_path / "made"), "--json")) == [3]
    assert ids(cli("prompts", "--folder", str(tmp_path / "inbox"), "--json")) == [1, 2]
    assert ids(cli("prompts", "--template", "transcribe", "--json")) == [1, 3]
    assert ids(cli("prompts", "--state", "done", "--json")) == [1, 2]
    assert ids(cli("prompts", "--since", "2026-11-26", "--until", "2026-11-26", "--json")) == [2]
    assert ids(cli("prompts", "--template", "transcribe", "--since", "2026-11-26", "--json")) == [3]
    assert ids(cli("prompts", "--template", "transcribe", "--state", "done", "--folder", str(tmp_path / "inbox"),
                   "--json")) == [1]
    table = ok(cli("prompts", "--template", "summarize"))
    assert "summarize" in table and "transcribe" not in table
    assert ok(cli("prompts", "--template", "minutes")).strip() == "no prompts match"


@pytest.mark.parametrize("command", ["files", "prompts"])
def test_a_bad_filter_is_a_usage_error(cli: Callable[..., Result], command: str) -> None:
    bad_date = cli(command, "--since", "yesterday", "--json")
    assert bad_date.exit_code == 2 and bad_date.stdout == ""
    assert "'yesterday' is not an ISO 8601 date or date-time" in bad_date.stderr
    bad_state = cli(command, "--state", "lost")
    assert bad_state.exit_code == 2 and "'lost' is not one of" in bad_state.stderr
