"""Prompts end to end: `audiodrop run` as a subprocess, the real SDK talking to the emulator, the CLI asking.

Templates and watch-folder prompts, one request over several recordings, files that expired or are about to,
the inline and Files paths, cut-off answers retried bigger and then split, a three-hour transcript stitched on
one timeline, --from/--to spans, result files that never overwrite each other, a 429 storm under the
requests-per-minute limit, --dry-run, and the CLI's errors.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from daemon.prompts import chunking
from tests import media
from tests.emulator import ApiError, Emulator, Fault, GenerateRecord
from tests.harness import API_KEY, DaemonProcess, run_cli, wait_until

TRANSCRIBE_PROMPT_START = "Transcribe this recording verbatim."
STAMP = re.compile(r"^\[(?:(\d+):)?(\d{2}):(\d{2})\]")


# --- fixtures and helpers (the `emulator` fixture is conftest's) ---------------------------------------------


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Every daemon a test starts is stopped at its end, pass or fail."""
    started: list[DaemonProcess] = []
    yield started
    for process in started:
        if process.process is not None and not process.exited():
            process.stop()


@pytest.fixture
def start(tmp_path: Path, daemons: list[DaemonProcess]) -> Callable[..., DaemonProcess]:
    def start_daemon(emu: Emulator | None, *, watch_prompts: list[str] | None = None,
                     **config: Any) -> DaemonProcess:
        """`audiodrop run` with these config overrides; without an emulator it has no API key and no API."""
        folder = tmp_path / "d"
        if watch_prompts is not None:
            config["watch"] = [{"path": str(folder / "inbox"), "prompts": watch_prompts}]
        process = DaemonProcess(folder, base_url=emu.base_url if emu else None,
                                api_key=API_KEY if emu else None, **config)
        daemons.append(process)
        return process.start()

    return start_daemon


def prompts_of(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return daemon.cli("prompts", "--json")


def query(daemon: DaemonProcess, statement: str, *params: Any) -> list[dict[str, Any]]:
    """Rows from the daemon's database, read-only: waiting loops poll here, which is far cheaper than
    starting the CLI a few times a second (the assertions themselves go through the CLI)."""
    uri = f"file:{daemon.folder / 'state' / 'audiodrop.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(statement, params)]


def wait_recordings(daemon: DaemonProcess, expected: dict[str, int] | Callable[[list[dict[str, Any]]], Any],
                    timeout: float = 60) -> list[dict[str, Any]]:
    """Wait until the recordings' states count `expected` (or `expected(rows)` holds); then `files --json`."""
    def reached() -> bool:
        assert not daemon.exited(), "daemon exited:\n" + daemon.log()[-4000:]
        rows = query(daemon, "SELECT id, state, duration_seconds, error FROM recordings ORDER BY id")
        if callable(expected):
            return bool(expected(rows))
        return Counter(row["state"] for row in rows) == Counter(expected)

    try:
        wait_until(reached, timeout, 0.2, message=f"recordings {expected}")
    except AssertionError as err:
        if "daemon exited" in str(err):
            raise
        rows = query(daemon, "SELECT id, source_path, state, error FROM recordings ORDER BY id")
        raise AssertionError(f"recordings never reached {expected}: {rows}\n--- log tail ---\n"
                             f"{daemon.log()[-6000:]}") from None
    return daemon.files()


def wait_for_prompts(daemon: DaemonProcess, count: int, timeout: float = 60,
                     states: tuple[str, ...] = ("done",)) -> list[dict[str, Any]]:
    """`count` prompts, every one in one of `states` (a failed one ends the wait early with its error);
    then `prompts --json`."""
    def finished() -> bool:
        assert not daemon.exited(), "daemon exited:\n" + daemon.log()[-4000:]
        rows = query(daemon, "SELECT id, state, error FROM prompts ORDER BY id")
        failed = [row for row in rows if row["state"] == "failed" and "failed" not in states]
        assert not failed, f"prompt failed: {failed}\n--- log tail ---\n{daemon.log()[-4000:]}"
        return len(rows) == count and all(row["state"] in states for row in rows)

    try:
        wait_until(finished, timeout, 0.2, message=f"{count} prompt(s) in {states}")
    except AssertionError as err:
        if "prompt failed" in str(err) or "daemon exited" in str(err):
            raise
        rows = query(daemon, "SELECT id, state, waiting_for, error FROM prompts ORDER BY id")
        raise AssertionError(f"prompts never reached {states}: {rows}\n--- log tail ---\n"
                             f"{daemon.log()[-6000:]}") from None
    return prompts_of(daemon)


def ask(daemon: DaemonProcess, *args: str, timeout: float = 45) -> dict[str, Any]:
    """`audiodrop ask ... --wait --json`, which must succeed (the harness gives a CLI call 60 s)."""
    return daemon.cli("ask", *args, "--wait", "--timeout", str(timeout), "--json")


def by_name(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {Path(item["source_path"]).name: item for item in daemon.files()}


def stamps(text: str) -> list[float]:
    """The leading [HH:MM:SS] or [MM:SS] of every line, in seconds."""
    found = []
    for line in text.splitlines():
        match = STAMP.match(line.strip())
        if match:
            hours, minutes, seconds = (int(group or 0) for group in match.groups())
            found.append(hours * 3600 + minutes * 60 + seconds)
    return found


def history(daemon: DaemonProcess, recording_id: int) -> list[dict[str, Any]]:
    return daemon.cli("show", str(recording_id), "--json")["history"]


def generate_arrivals(emu: Emulator) -> list[float]:
    """The monotonic time each generateContent request arrives at the emulator, 429s included.

    The emulator's request log has no times, so its fault hook (which sees every request as it arrives, before
    any answer) is wrapped here, in the test."""
    arrivals: list[float] = []
    original = emu._pick_fault

    def pick_fault(route: str) -> Fault | None:
        if route == "generate":
            arrivals.append(time.monotonic())
        return original(route)

    emu._pick_fault = pick_fault  # type: ignore[method-assign]
    return arrivals


def generate_statuses(emu: Emulator) -> list[int | None]:
    return [request.status for request in emu.stats.requests if ":generateContent" in request.path]


def max_in_window(times: list[float], window: float) -> int:
    ordered = sorted(times)
    return max((sum(1 for t in ordered[i:] if t - start < window) for i, start in enumerate(ordered)), default=0)


def audio_tokens(record: GenerateRecord) -> int:
    return sum(part.tokens for part in record.parts if part.modality == "AUDIO")


def sql(daemon: DaemonProcess, statement: str, *params: Any) -> None:
    with sqlite3.connect(daemon.folder / "state" / "audiodrop.db") as connection:
        connection.execute(statement, params)


# --- rate limits -------------------------------------------------------------------------------------------
# (The two slowest tests, the 429 storm and the three-hour transcript, come first: with -n 2 they start at once
# on both workers and the short tests fill in around them.)


@pytest.mark.slow
def test_a_storm_of_429s_is_absorbed_within_the_requests_per_minute_limit(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    rpm, count = 4, 4
    arrivals = generate_arrivals(emulator)
    # seed 3 answers the daemon's generate requests 429 . 429 . | . 429 429 . : eight requests for four prompts
    storm = emulator.add_fault(Fault(route="generate", kind="status", status=429, probability=0.5, seed=3,
                                     retry_delay="1s"))
    daemon = start(emulator, watch_prompts=["transcribe"], prompts={"requests_per_minute": rpm})
    for index in range(count):
        media.make_tone(tmp_path / f"call {index}.wav", 2.0 + index * 0.1).rename(daemon.inbox / f"call {index}.wav")
    waiting = wait_until(lambda: next((p["waiting_for"] for p in query(daemon, "SELECT waiting_for FROM prompts")
                                       if "rate limit" in (p["waiting_for"] or "")), None), 40,
                         message="a prompt to wait for the rate limit")

    items = wait_for_prompts(daemon, count, timeout=150)

    assert all(p["state"] == "done" and p["error"] is None and p["finish_reason"] == "STOP" for p in items)
    assert f"at most {rpm} requests a minute to gemini-2.5-flash" in waiting
    statuses = generate_statuses(emulator)
    assert statuses.count(429) == storm.injected == 4 and statuses.count(200) == count == len(statuses) - 4
    busiest = max_in_window(arrivals, 59.5)  # half a second for the way from the daemon's clock to the emulator
    assert busiest <= rpm, f"{busiest} requests within a minute"
    span = arrivals[-1] - arrivals[0]
    print(f"429 storm: {count} prompts, {storm.injected} 429s injected, {len(arrivals)} requests over {span:.0f} s, "
          f"at most {busiest} in any 60-s window (limit {rpm})")


def test_a_rate_limit_429_waits_the_delay_its_retry_info_asks_for(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    arrivals = generate_arrivals(emulator)
    fault = emulator.add_fault(Fault(route="generate", kind="status", status=429, times=1, retry_delay="10s"))
    daemon = start(emulator)
    media.make_tone(tmp_path / "memo.wav", 2.0).rename(daemon.inbox / "memo.wav")
    [recording] = wait_recordings(daemon, {"active": 1})
    rid = str(recording["id"])

    item = ask(daemon, rid, "--template", "summarize")

    assert item["state"] == "done" and item["error"] is None and fault.injected == 1
    assert generate_statuses(emulator) == [429, 200] and len(arrivals) == 2
    gap = arrivals[1] - arrivals[0]
    # RetryInfo said 10 s (the daemon adds up to 25 % jitter); without it the first backoff would be 5-6.25 s. A
    # lower bound only: a busy machine makes the gap longer, never shorter.
    assert gap >= 10.0, gap


# --- long recordings and spans -----------------------------------------------------------------------------


def make_long_mp3(folder: Path, seconds: int) -> Path:
    """A long, quiet MP3 made fast: one minute encoded once, copied end to end by the concat demuxer (-c copy).
    Quiet, because encoders are quickest on it: converting and cutting three hours stays within seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    minute = folder / "minute.mp3"
    media.ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "60", "-c:a", "libmp3lame", "-b:a", "32k",
                 str(minute))
    listing = folder / "list.txt"
    listing.write_text("".join(f"file '{minute}'\n" for _ in range(math.ceil(seconds / 60))))
    long = folder / "all day.mp3"
    media.ffmpeg("-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", "-t", str(seconds), str(long))
    return long


def speech_responder(plans: dict[str, list[chunking.Chunk]], every: int) -> Callable[[GenerateRecord], str]:
    """A model that hears someone speak every `every` seconds (utterance n at n*every s on the recording's
    timeline) and, asked about part k of a chunked transcript, answers the utterances inside that chunk with
    times relative to the chunk's start, as a real model would."""
    def respond(record: GenerateRecord) -> str:
        match = re.search(r"part (\d+) of (\d+)", record.prompt_text)
        assert match, record.prompt_text
        chunk = plans["plan"][int(match.group(1)) - 1]
        assert int(match.group(2)) == len(plans["plan"])
        assert abs(record.audio_seconds - chunk.seconds) < 0.5, (record.audio_seconds, chunk)
        first = math.ceil(chunk.start / every)
        lines = [f"[{chunking.format_clock(n * every - chunk.start)}] Speaker {n % 3 + 1}: utterance number {n}"
                 for n in range(first, math.ceil(chunk.end / every)) if n * every < chunk.end]
        return "\n".join(lines)

    return respond


@pytest.mark.slow
def test_a_three_hour_recording_is_transcribed_in_chunks_on_one_timeline(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    chunk_seconds, every = 1800.0, 7
    # MP3 is the quickest of the daemon's formats to encode (the conversion and every cut chunk are encodes).
    daemon = start(emulator, conversion={"format": "mp3"}, prompts={"chunk_seconds": chunk_seconds})
    make_long_mp3(tmp_path / "made", 3 * 3600).rename(daemon.inbox / "all day.mp3")
    [recording] = wait_recordings(daemon, lambda xs: len(xs) == 1 and xs[0]["duration_seconds"], timeout=90)
    rid = str(recording["id"])
    duration = recording["duration_seconds"]
    assert abs(duration - 10800) < 2
    plans = {"plan": chunking.plan_chunks(duration, chunk_seconds=chunk_seconds, overlap_seconds=10.0)}
    emulator.responder = speech_responder(plans, every)

    daemon.cli("ask", rid, "--template", "transcribe")
    [item] = wait_for_prompts(daemon, 1, timeout=120)

    plan = plans["plan"]
    assert item["delivery"] == "chunks" and item["chunks"] == len(plan) == 6
    records = emulator.generate_requests
    assert sorted(int(re.search(r"part (\d+)", r.prompt_text).group(1)) for r in records) == \
        list(range(1, len(plan) + 1)), "each chunk sent once"
    assert all(r.file_names == [] for r in records), "chunks are cut locally and sent inline"
    text = daemon.cli("result", str(item["id"])).stdout
    lines = [line for line in text.splitlines() if line.strip()]
    said = [int(re.search(r"utterance number (\d+)$", line).group(1)) for line in lines]
    times = stamps(text)
    spoken = math.ceil(duration / every)
    assert said == list(range(spoken)), "every utterance once, in order: the overlaps' repeats dropped"
    assert times == [n * every for n in said], "each line at its own time on the recording's timeline"
    assert times == sorted(times) and times[0] == 0
    assert duration - chunk_seconds < times[-1] < duration
    sent = sum(len(r.response_text.splitlines()) for r in records)
    meta = json.loads(Path(item["result_path"]).with_name("all day.transcribe.meta.json").read_text())
    assert meta["chunks"] == len(plan) and meta["delivery"] == "chunks" and meta["fixes"] == []
    assert meta["audio_tokens"] == sum(audio_tokens(r) for r in records) > duration * 32
    print(f"3-hour transcript: {len(plan)} chunks, {sent} lines answered, {len(lines)} kept, "
          f"{sent - len(lines)} overlap repeats dropped, fixes {meta['fixes']}")


def test_a_from_to_span_is_cut_locally_and_its_timestamps_land_on_the_recordings_timeline(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    daemon = start(emulator)
    media.make_tone(tmp_path / "talk.wav", 240.0).rename(daemon.inbox / "talk.wav")
    [recording] = wait_recordings(daemon, {"active": 1})
    rid = str(recording["id"])

    item = ask(daemon, rid, "--template", "transcribe", "--from", "02:30", "--to", "03:29")

    [record] = emulator.generate_requests
    assert abs(record.audio_seconds - 59.0) < 0.1 and record.file_names == []
    assert item["delivery"] == "span" and item["span"] == {"from_seconds": 150.0, "to_seconds": 209.0}
    assert item["tokens"]["estimated_audio"] == 59 * 32
    text = daemon.cli("result", str(item["id"])).stdout
    assert stamps(text) == [150, 180]  # the model's 00:00 and 00:30, moved by the span's start
    assert text.startswith("[00:02:30] Speaker 1: segment 1 of inline audio 1")
    markdown = Path(item["result_path"]).read_text()
    assert "- Span: 00:02:30-00:03:29" in markdown


def test_a_span_from_a_time_to_the_end_of_the_recording(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    daemon = start(emulator)
    media.make_tone(tmp_path / "talk.wav", 100.0).rename(daemon.inbox / "talk.wav")
    [recording] = wait_recordings(daemon, {"active": 1})
    rid = str(recording["id"])

    result = run_cli(daemon.config_path, "ask", rid, "--template", "transcribe", "--from", "01:00", "--wait",
                     "--timeout", "45", "--json", env=daemon.env)

    assert result.returncode == 0, result.stderr
    item = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    [record] = emulator.generate_requests
    assert abs(record.audio_seconds - 40.0) < 0.1
    assert item["state"] == "done" and item["span"] == {"from_seconds": 60.0, "to_seconds": None}
    assert stamps(daemon.cli("result", str(item["id"])).stdout) == [60, 90]
    assert "- Span: 00:01:00-end" in Path(item["result_path"]).read_text()


# --- templates, watch folders and result files -------------------------------------------------------------


def test_watch_folder_prompts_run_on_each_new_recording_and_write_markdown_and_metadata(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    daemon = start(emulator, watch_prompts=["transcribe", "summarize", "actions"],
                   templates={"actions": {"prompt": "List the action items.", "model": "gemini-2.5-pro",
                                          "system_instruction": "Answer tersely.", "output_format": "text"}})
    media.make_tone(tmp_path / "standup 2026-11-25.wav", 3.0).rename(daemon.inbox / "standup 2026-11-25.wav")

    items = wait_for_prompts(daemon, 3)

    results = daemon.folder / "results"
    stem = "standup 2026-11-25"
    assert sorted(p.name for p in results.iterdir()) == sorted([
        f"{stem}.actions.meta.json", f"{stem}.actions.txt", f"{stem}.summarize.md", f"{stem}.summarize.meta.json",
        f"{stem}.transcribe.md", f"{stem}.transcribe.meta.json"])
    [recording] = daemon.files()
    by_template = {item["template"]: item for item in items}
    records = emulator.generate_requests
    assert len(records) == 3, "each prompt is sent once"
    tokens_spent = {"prompt": 0, "audio": 0, "output": 0, "thinking": 0, "cached": 0}
    for template, item in by_template.items():
        assert item["recording_ids"] == [recording["id"]] and item["error"] is None
        assert item["delivery"] in ("inline", "files")
        record = next(r for r in records if r.prompt_text == item["prompt"])
        text_path = Path(item["result_path"])
        meta = json.loads(text_path.with_name(text_path.name.rsplit(".", 1)[0] + ".meta.json").read_text())
        assert meta["prompt_id"] == item["id"] and meta["recordings"] == ["standup 2026-11-25.wav"]
        assert meta["template"] == template and meta["finish_reason"] == "STOP"
        assert meta["model"] == record.model
        # The token usage the API reported, as the API reported it.
        assert meta["audio_tokens"] == audio_tokens(record) == math.ceil(record.audio_seconds * 32 - 1e-9)
        assert meta["prompt_tokens"] == record.usage["promptTokenCount"] > meta["audio_tokens"]
        assert meta["output_tokens"] == record.usage["candidatesTokenCount"] > 0
        assert (item["tokens"]["prompt"], item["tokens"]["audio"], item["tokens"]["output"]) == \
            (meta["prompt_tokens"], meta["audio_tokens"], meta["output_tokens"])
        assert abs(item["tokens"]["estimated_audio"] - 96) <= 1  # 3 s at 32 tokens a second
        for key in tokens_spent:
            tokens_spent[key] += meta[f"{key}_tokens"] or 0
        assert daemon.cli("result", str(item["id"])).stdout.strip() == record.response_text.strip()
    transcript = (results / f"{stem}.transcribe.md").read_text()
    assert transcript.startswith(f"# {stem}.wav\n")
    assert f"- Recording: {stem}.wav" in transcript and "- Template: transcribe" in transcript
    assert "- Finish reason: STOP" in transcript and "- Model: gemini-2.5-flash" in transcript
    assert re.search(r"^\[00:00\] Speaker 1: segment 1 of ", transcript, re.M)
    # The user's template: its own model and system instruction, plain text without a markdown header.
    actions = next(r for r in records if r.prompt_text == "List the action items.")
    assert actions.model == "gemini-2.5-pro" and actions.system_instruction == "Answer tersely."
    assert (results / f"{stem}.actions.txt").read_text() == actions.response_text
    assert by_template["actions"]["model"] == "gemini-2.5-pro"
    assert daemon.cli("status", "--json")["tokens_today"] == tokens_spent
    assert daemon.cli("status", "--json")["prompts"] == {"queued": 0, "running": 0, "done": 3, "failed": 0}


def test_ask_over_two_recordings_waits_for_both_and_sends_one_request_naming_both_files(
        tmp_path: Path, start: Callable[..., DaemonProcess]) -> None:
    # Files stay PROCESSING for a few polls, so the prompt is queued before both are ACTIVE.
    with Emulator(api_key=API_KEY, data_dir=tmp_path / "emulator", processing_polls=8) as emulator:
        daemon = start(emulator, gemini={"processing_poll_seconds": 0.3})
        media.make_tone(tmp_path / "interview part 1.wav", 2.0).rename(daemon.inbox / "interview part 1.wav")
        media.make_tone(tmp_path / "interview part 2.wav", 3.0).rename(daemon.inbox / "interview part 2.wav")
        wait_recordings(daemon, lambda xs: len(xs) == 2 and all(x["duration_seconds"] for x in xs))
        first, second = by_name(daemon)["interview part 1.wav"], by_name(daemon)["interview part 2.wav"]
        daemon.cli("ask", str(first["id"]), str(second["id"]), "--prompt", "Compare the two parts.")
        waiting = wait_until(lambda: (p := query(daemon, "SELECT state, waiting_for FROM prompts")[0])["state"]
                             != "queued" or p["waiting_for"], 20, 0.1, message="the prompt to wait or run")
        item = wait_for_prompts(daemon, 1)[0]
        remote = by_name(daemon)

        assert emulator.stats.generate_calls == 1, "sent before every file was ACTIVE, or sent more than once"
        [record] = emulator.generate_requests
        assert record.file_names == [remote["interview part 1.wav"]["remote"]["name"],
                                     remote["interview part 2.wav"]["remote"]["name"]]
        assert "Compare the two parts." in record.prompt_text
        assert abs(record.audio_seconds - 5.0) < 0.2
        assert item["delivery"] == "files" and item["recording_ids"] == [first["id"], second["id"]]
        if isinstance(waiting, str):
            assert "waiting for recording" in waiting and "uploaded" in waiting
        result = Path(item["result_path"])
        assert result.name == "interview part 1 + interview part 2.prompt.md"
        assert "- Recordings: interview part 1.wav, interview part 2.wav" in result.read_text()
        assert item["tokens"]["audio"] == audio_tokens(record)


# --- files that are gone or about to expire ----------------------------------------------------------------


def test_a_prompt_for_a_file_the_server_forgot_succeeds_after_a_re_upload_without_an_error(
        emulator: Emulator, start: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    daemon = start(emulator, prompts={"inline": "never"})
    media.make_tone(tmp_path / "memo.wav", 2.0).rename(daemon.inbox / "memo.wav")
    [before] = wait_recordings(daemon, {"active": 1})
    rid = str(before["id"])
    # The server forgets the file (48 h pass on its clock) while the daemon still believes it ACTIVE.
    emulator.clock.advance(49 * 3600)
    assert emulator.files == []

    item = ask(daemon, rid, "--template", "summarize")

    assert item["state"] == "done" and item["error"] is None and item["delivery"] == "files"
    after = by_name(daemon)["memo.wav"]
    assert after["state"] == "active" and after["remote"]["name"] != before["remote"]["name"]
    [record] = emulator.generate_requests
    assert record.file_names == [after["remote"]["name"]]
    refused = [r for r in emulator.stats.requests if ":generateContent" in r.path and r.status == 403]
    assert len(refused) == 1, "the one request with the forgotten file"
    changes = [(e["from"], e["to"], e["reason"]) for e in history(daemon, int(rid))]
    gone = next(i for i, c in enumerate(changes) if c[1] == "expired")
    assert "403" in changes[gone][2] and before["remote"]["name"] in changes[gone][2]
    assert [c[1] for c in changes[gone:]] == ["expired", "uploading", "processing", "active"] or \
        [c[1] for c in changes[gone:]] == ["expired", "uploading", "active"]
    assert changes[gone + 1][2] == "uploading again"
    assert daemon.cli("prompts", "--json")[0]["error"] is None


def test_a_file_expiring_within_the_margin_is_uploaded_again_before_the_prompt_uses_it(
        tmp_path: Path, start: Callable[..., DaemonProcess]) -> None:
    with Emulator(api_key=API_KEY, data_dir=tmp_path / "emulator", ttl_seconds=2 * 3600) as emulator:
        emulator.clock.advance(-1.5 * 3600)  # the first upload expires half an hour from now
        daemon = start(emulator, prompts={"inline": "never"}, gemini={"expiry_margin_seconds": 3600})
        media.make_tone(tmp_path / "memo.wav", 2.0).rename(daemon.inbox / "memo.wav")
        [before] = wait_recordings(daemon, {"active": 1})
        rid = str(before["id"])
        emulator.clock.advance(1.5 * 3600)  # a re-upload now lives two hours

        item = ask(daemon, rid, "--template", "summarize")

        assert item["state"] == "done" and item["error"] is None
        [record] = emulator.generate_requests
        after = by_name(daemon)["memo.wav"]
        assert record.file_names == [after["remote"]["name"]] != [before["remote"]["name"]]
        assert emulator.stats.generate_calls == 1, "the expiring file was never sent"
        reasons = [e["reason"] for e in history(daemon, int(rid))]
        assert any(r == f"expires within the margin; uploading again for prompt {item['id']}" for r in reasons)


def test_a_small_expired_recording_goes_inline_and_a_large_one_is_uploaded_again(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    limit = 30_000
    daemon = start(emulator, prompts={"inline_limit_bytes": limit}, gemini={"reconcile_interval_seconds": 1})
    media.make_tone(tmp_path / "small.wav", 2.0).rename(daemon.inbox / "small.wav")
    media.make_tone(tmp_path / "large.wav", 30.0).rename(daemon.inbox / "large.wav")
    wait_recordings(daemon, {"active": 2})
    files = by_name(daemon)
    small, large = files["small.wav"], files["large.wav"]
    assert math.ceil(small["converted"]["bytes"] * 4 / 3) + 4096 + 200 < limit < large["converted"]["bytes"] * 4 / 3
    emulator.clock.advance(49 * 3600)
    wait_recordings(daemon, {"expired": 2}, timeout=30)  # the reconciliation noticed both are gone

    inline = ask(daemon, str(small["id"]), "--template", "summarize")

    assert inline["delivery"] == "inline" and inline["state"] == "done"
    record = emulator.generate_requests[-1]
    assert record.file_names == [] and [p.kind for p in record.parts if p.modality == "AUDIO"] == ["inline"]
    assert abs(record.audio_seconds - 2.0) < 0.1

    files_path = ask(daemon, str(large["id"]), "--template", "summarize")

    assert files_path["delivery"] == "files" and files_path["state"] == "done"
    again = by_name(daemon)["large.wav"]
    assert emulator.generate_requests[-1].file_names == [again["remote"]["name"]] != [large["remote"]["name"]]
    assert "uploading again" in [e["reason"] for e in history(daemon, large["id"])]


def test_a_recording_sent_inline_is_not_uploaded_again(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    daemon = start(emulator, gemini={"reconcile_interval_seconds": 1})
    media.make_tone(tmp_path / "small.wav", 2.0).rename(daemon.inbox / "small.wav")
    [recording] = wait_recordings(daemon, {"active": 1})
    rid = str(recording["id"])
    emulator.clock.advance(49 * 3600)
    wait_recordings(daemon, {"expired": 1}, timeout=30)
    uploads = emulator.stats.uploads_started
    # A model that takes 2.5 s to answer: the uploader's one-second ticks see the prompt running.
    emulator.add_fault(Fault(route="generate", kind="slow", delay=2.5))

    item = ask(daemon, rid, "--template", "summarize")
    # Stopped, the daemon can decide nothing more: whatever it did while the prompt ran is in the database.
    assert daemon.stop() == 0

    assert item["delivery"] == "inline"
    assert emulator.stats.uploads_started == uploads, "uploaded again although the prompt went inline"
    assert by_name(daemon)["small.wav"]["state"] == "expired"
    moves = [event["to"] for event in history(daemon, recording["id"])]
    assert "uploading" not in moves[moves.index("expired"):], moves


# --- a format the API refuses ---------------------------------------------------------------------------------


def test_a_refused_format_is_converted_to_the_fallback_even_when_the_original_is_gone(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    # MP3 as the chosen format and an API that refuses audio/mpeg at generateContent (uploads take anything).
    emulator.supported_mime_types = {m for m in emulator.supported_mime_types if m not in ("audio/mpeg", "audio/mp3")}
    daemon = start(emulator, conversion={"format": "mp3", "fallback_format": "vorbis"})
    for name, seconds in (("kept.wav", 4.0), ("deleted.wav", 4.5)):
        media.make_tone(tmp_path / name, seconds).rename(daemon.inbox / name)
    wait_recordings(daemon, {"active": 2})
    kept, deleted = sorted(daemon.files(), key=lambda item: Path(item["source_path"]).name != "kept.wav")
    assert kept["converted"]["format"] == deleted["converted"]["format"] == "mp3"
    mp3_copies = {Path(kept["converted"]["path"]), Path(deleted["converted"]["path"])}
    (daemon.inbox / "deleted.wav").unlink()  # the user cleaned up the drop folder after the upload

    item = ask(daemon, str(kept["id"]), str(deleted["id"]), "--prompt", "Compare the two tones.", timeout=50)

    assert item["state"] == "done" and item["error"] is None
    assert emulator.stats.generate_calls == 2, "one refused request, then one that was answered"
    [answered] = emulator.generate_requests
    assert [part.mime_type for part in answered.parts if part.modality == "AUDIO"] == ["audio/ogg"] * 2
    after = {item["id"]: item for item in daemon.files()}
    for before in (kept, deleted):
        now = after[before["id"]]
        assert now["state"] == "active" and now["converted"]["format"] == "vorbis", now
        assert now["sha256"] == before["sha256"], "the recording keeps its identity"
        assert abs(now["duration_seconds"] - before["duration_seconds"]) < 0.2
    history = [event["reason"] for event in daemon.cli("show", str(deleted["id"]), "--json")["history"]]
    assert any("from the kept compact copy (the original file is gone)" in reason for reason in history), history
    assert not any(path.exists() for path in mp3_copies), "the refused copies are removed"
    assert {f.mime_type for f in emulator.files} == {"audio/ogg"}, "the refused uploads are deleted remotely"


@pytest.mark.slow
def test_a_model_that_keeps_failing_with_500_internal_hands_the_prompt_to_the_fallback_model(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    def broken_on_audio(rec: GenerateRecord) -> None:
        if "flash-lite" in rec.model:
            raise ApiError(500, "Internal error encountered.")

    emulator.responder = broken_on_audio
    daemon = start(emulator, prompts={"fallback_after": 2},
                   templates={"quick": {"prompt": "Summarize this.", "model": "gemini-3.1-flash-lite"}})
    media.make_tone(tmp_path / "memo.wav", 3.0).rename(daemon.inbox / "memo.wav")
    [recording] = wait_recordings(daemon, {"active": 1})

    item = ask(daemon, str(recording["id"]), "--template", "quick", timeout=50)

    assert item["state"] == "done" and item["model"] == "gemini-2.5-flash", item
    assert item["requested_model"] == "gemini-3.1-flash-lite"
    [answered] = emulator.generate_requests
    assert "flash-lite" not in answered.model
    meta = json.loads(Path(item["result_path"]).with_name("memo.quick.meta.json").read_text())
    assert meta["model"] == "gemini-2.5-flash" and meta["requested_model"] == "gemini-3.1-flash-lite"
    assert "gemini-3.1-flash-lite kept failing with 500 INTERNAL" in meta["warnings"][0]
    assert "answered 500 INTERNAL 2 times in a row; sending it to gemini-2.5-flash" in daemon.log()


# --- cut-off answers ---------------------------------------------------------------------------------------


def test_a_cut_off_transcript_is_retried_with_a_bigger_budget_then_split_and_completed(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    # Five minutes: the emulator's transcript (a line per 30 s) needs ~120 output tokens whole, ~70 per half.
    daemon = start(emulator, prompts={"max_output_tokens": 30, "max_output_tokens_limit": 100})
    media.make_tone(tmp_path / "lecture.wav", 300.0).rename(daemon.inbox / "lecture.wav")
    [recording] = wait_recordings(daemon, lambda xs: len(xs) == 1 and xs[0]["duration_seconds"])
    rid = str(recording["id"])

    item = ask(daemon, rid, "--template", "transcribe")

    attempts = [(r.generation_config.get("maxOutputTokens"), round(r.audio_seconds), r.finish_reason)
                for r in emulator.generate_requests]
    assert [a[0] for a in attempts] == [30, 60, 100, 100, 100]
    assert [a[2] for a in attempts] == ["MAX_TOKENS"] * 3 + ["STOP"] * 2
    assert all(a[1] == 300 for a in attempts[:3]), attempts
    assert all(150 <= a[1] <= 160 for a in attempts[3:]), attempts  # two halves with a 10 s overlap
    assert item["state"] == "done" and item["delivery"] == "chunks" and item["chunks"] == 2
    assert item["finish_reason"] == "STOP" and item["error"] is None
    # The halves are 0-155 s and 145-300 s; each answers a line every 30 s of its own audio. The second half's
    # first line (145 s) repeats the overlap and is dropped; the rest land on the recording's timeline.
    times = stamps(daemon.cli("result", str(item["id"])).stdout)
    assert times == [0, 30, 60, 90, 120, 150, 175, 205, 235, 265, 295]


@pytest.mark.parametrize(("thinking_budget", "budgets_sent", "thoughts"), [
    (None, [2048], 1024),              # the default budget: thinking leaves room for the answer
    (-1, [2048, 4096, 8192], 5000),    # left to the model: it thinks 5000 tokens and cuts the answer off twice
])
def test_thinking_is_held_to_its_budget_so_it_does_not_eat_the_answer(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess], thinking_budget: int | None,
        budgets_sent: list[int], thoughts: int) -> None:
    emulator.thinking_tokens = 5000
    settings: dict[str, Any] = {"max_output_tokens": 2048}
    if thinking_budget is not None:
        settings["thinking_budget"] = thinking_budget
    daemon = start(emulator, prompts=settings)
    media.make_tone(tmp_path / "memo.wav", 3.0).rename(daemon.inbox / "memo.wav")
    [recording] = wait_recordings(daemon, lambda xs: len(xs) == 1 and xs[0]["duration_seconds"])

    item = ask(daemon, str(recording["id"]), "--template", "transcribe")

    sent = emulator.generate_requests
    assert [r.generation_config.get("maxOutputTokens") for r in sent] == budgets_sent
    expected_config = None if thinking_budget == -1 else {"thinkingBudget": 1024}
    assert {str(r.generation_config.get("thinkingConfig")) for r in sent} == {str(expected_config)}
    assert item["state"] == "done"
    meta = json.loads(Path(item["result_path"]).with_name("memo.transcribe.meta.json").read_text())
    assert meta["thinking_tokens"] == thoughts == item["tokens"]["thinking"]
    # Today's tokens count every answer, the cut-off ones too: each was billed.
    today = daemon.cli("status", "--json")["tokens_today"]
    assert today["thinking"] == thoughts * len(sent)
    assert today["output"] == sum(r.usage.get("candidatesTokenCount", 0) for r in sent)
    assert f"(+{thoughts * len(sent)} thinking)" in daemon.cli("status").stdout
    assert f" out (+{thoughts:,} thinking)" in Path(item["result_path"]).read_text()


def test_a_transcript_that_stops_early_gets_its_missing_tail_asked_for_on_its_own_and_stitched_on(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    # The model stops after the first minute of a four-minute recording with a normal finish; asked for the
    # rest on its own, it answers it whole.
    def responder(rec: GenerateRecord) -> str:
        seconds = rec.audio_seconds
        if seconds > 200:
            return "[00:00:00] Speaker 1: Good morning.\n[00:01:00] Speaker 2: Hello."
        return "\n".join(f"[00:{t // 60:02d}:{t % 60:02d}] Speaker 2: part at {t} s" for t in range(0, int(seconds), 30))
    emulator.responder = responder
    daemon = start(emulator)
    media.make_tone(tmp_path / "meeting.wav", 240.0).rename(daemon.inbox / "meeting.wav")
    [recording] = wait_recordings(daemon, lambda xs: len(xs) == 1 and xs[0]["duration_seconds"])

    item = ask(daemon, str(recording["id"]), "--template", "transcribe")

    assert item["state"] == "done"
    requests = emulator.generate_requests
    assert len(requests) == 2 and 185 <= requests[1].audio_seconds <= 195  # from 10 s before the last stamp
    text = Path(item["result_path"]).read_text()
    meta = json.loads(Path(item["result_path"]).with_name("meeting.transcribe.meta.json").read_text())
    assert meta["coverage"] > 0.85 and meta["tails"] == 1 and not meta.get("warnings")
    found = stamps(text.split("---", 1)[1])
    assert found == sorted(found) and found[0] == 0 and 200 <= found[-1] <= 240
    assert meta["audio_tokens"] == sum(audio_tokens(r) for r in requests)  # the tail is billed, and counted


def test_a_transcript_that_still_stops_early_after_its_tail_is_asked_for_is_flagged(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    emulator.responder = lambda rec: "[00:00:00] Speaker 1: Good morning.\n[00:00:20] Speaker 2: Hello."
    daemon = start(emulator)
    media.make_tone(tmp_path / "meeting.wav", 240.0).rename(daemon.inbox / "meeting.wav")
    [recording] = wait_recordings(daemon, lambda xs: len(xs) == 1 and xs[0]["duration_seconds"])

    item = ask(daemon, str(recording["id"]), "--template", "transcribe")

    assert item["state"] == "done"
    assert len(emulator.generate_requests) == 3  # the answer, then two tails: bounded, each is billed
    meta = json.loads(Path(item["result_path"]).with_name("meeting.transcribe.meta.json").read_text())
    assert meta["coverage"] < 0.5 and meta["tails"] == 2
    [warning] = meta["warnings"]
    assert "even after asking for the rest on its own" in warning
    assert f"- Warning: {warning}" in Path(item["result_path"]).read_text()


def test_a_transcript_can_also_be_written_as_srt_and_webvtt_on_the_recordings_timeline(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    import srt
    import webvtt

    daemon = start(emulator, templates={"subtitles": {"prompt": "Transcribe this recording verbatim, with "
                                                                "[HH:MM:SS] timestamps.",
                                                      "output_format": "srt", "formats": ["vtt"]},
                                        "transcribe": {"formats": ["srt"]}})
    media.make_tone(tmp_path / "talk.wav", 30.0).rename(daemon.inbox / "talk.wav")
    [recording] = wait_recordings(daemon, lambda xs: len(xs) == 1 and xs[0]["duration_seconds"])

    subtitled = ask(daemon, str(recording["id"]), "--template", "subtitles")
    transcript = ask(daemon, str(recording["id"]), "--template", "transcribe")

    results = daemon.folder / "results"
    assert Path(subtitled["result_path"]).name == "talk.subtitles.srt"
    assert Path(transcript["result_path"]).name == "talk.transcribe.md"
    for path in (results / "talk.subtitles.srt", results / "talk.transcribe.srt"):
        cues = list(srt.parse(path.read_text()))
        assert cues and all(c.start < c.end for c in cues)
        assert all(a.end <= b.start for a, b in zip(cues, cues[1:], strict=False))
        assert cues[-1].end.total_seconds() <= recording["duration_seconds"] + 0.001
    captions = webvtt.read(str(results / "talk.subtitles.vtt"))
    assert len(captions) == len(list(srt.parse((results / "talk.subtitles.srt").read_text())))
    meta = json.loads((results / "talk.subtitles.meta.json").read_text())
    assert meta["extra_files"] == [str(results / "talk.subtitles.vtt")]
    assert daemon.cli("result", str(transcript["id"]), "--format", "vtt", check=True).stdout.startswith("WEBVTT")


def test_an_answer_that_stays_cut_off_or_empty_fails_with_the_reason_and_result_names_the_state(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    daemon = start(emulator, prompts={"max_output_tokens": 4, "max_output_tokens_limit": 8})
    media.make_tone(tmp_path / "memo.wav", 3.0).rename(daemon.inbox / "memo.wav")
    [recording] = wait_recordings(daemon, lambda xs: len(xs) == 1 and xs[0]["duration_seconds"])
    rid = str(recording["id"])

    cut = daemon.cli("ask", rid, "--template", "transcribe", "--wait", "--timeout", "45", check=False)

    assert cut.returncode == 1
    [prompt] = prompts_of(daemon)
    pid = prompt["id"]
    assert f"prompt {pid} failed: the answer stopped early (finish reason MAX_TOKENS), even with 8 output " \
           "tokens" in cut.stderr
    assert [r.generation_config["maxOutputTokens"] for r in emulator.generate_requests] == [4, 8]
    shown = daemon.cli("result", str(pid), check=False)
    assert shown.returncode == 1 and f"prompt {pid} is failed: the answer stopped early" in shown.stderr
    assert shown.stdout == ""

    emulator.responder = lambda record: ""  # an empty answer with finish reason STOP
    empty = daemon.cli("ask", rid, "--prompt", "Anything?", "--wait", "--timeout", "45", check=False)
    assert empty.returncode == 1 and "the answer was empty (finish reason STOP)" in empty.stderr
    assert not list((daemon.folder / "results").glob("*.md")), "no result file for a failed prompt"

    daemon.stop()
    queued = daemon.cli("ask", rid, "--template", "summarize", "--json")  # the daemon is stopped: it waits
    shown = daemon.cli("result", str(queued["id"]), check=False)
    assert shown.returncode == 1 and f"prompt {queued['id']} is queued" in shown.stderr
    assert [p["state"] for p in prompts_of(daemon)] == ["failed", "failed", "queued"]


# --- result files never overwrite each other ---------------------------------------------------------------


@pytest.mark.slow
def test_two_recordings_with_the_same_name_keep_their_own_results_and_a_rerun_rewrites_only_its_own(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    daemon = start(emulator, watch_prompts=["transcribe"])
    (daemon.inbox / "monday").mkdir()
    (daemon.inbox / "tuesday").mkdir()
    media.make_tone(tmp_path / "a.m4a", 2.0).rename(daemon.inbox / "monday" / "Recording.m4a")
    items = wait_for_prompts(daemon, 1)
    media.make_tone(tmp_path / "b.m4a", 40.0).rename(daemon.inbox / "tuesday" / "Recording.m4a")
    items = wait_for_prompts(daemon, 2)

    results = daemon.folder / "results"
    first, second = items
    assert Path(first["result_path"]).name == "Recording.transcribe.md"
    assert Path(second["result_path"]).name == f"Recording.transcribe.{second['id']}.md"
    for item in items:
        meta = json.loads(Path(item["result_path"].removesuffix(".md") + ".meta.json").read_text())
        assert meta["prompt_id"] == item["id"] and meta["recording_ids"] == item["recording_ids"]
        assert daemon.cli("result", str(item["id"])).stdout.strip() in Path(item["result_path"]).read_text()
    assert len(stamps(Path(first["result_path"]).read_text())) == 1   # 2 s: one line
    assert len(stamps(Path(second["result_path"]).read_text())) == 2  # 40 s: two lines
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.iterdir()}

    # The first prompt runs again, as after a kill -9 between writing its file and recording it as done.
    daemon.stop()
    sql(daemon, "UPDATE prompts SET state = 'running' WHERE id = ?", first["id"])
    daemon.start()
    again = wait_for_prompts(daemon, 2)

    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.iterdir()}
    assert set(after) == set(before), "the re-run took no new name"
    assert again[0]["result_path"] == first["result_path"] and again[0]["finished_at"] != first["finished_at"]
    assert after["Recording.transcribe.meta.json"] != before["Recording.transcribe.meta.json"]
    for name in (f"Recording.transcribe.{second['id']}.md", f"Recording.transcribe.{second['id']}.meta.json"):
        assert after[name] == before[name], f"{name} was touched by another prompt's re-run"
    assert len(emulator.generate_requests) == 3


# --- tokens and the CLI ------------------------------------------------------------------------------------


def test_dry_run_shows_the_estimate_and_the_apis_count_and_queues_nothing(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    daemon = start(emulator)
    media.make_tone(tmp_path / "memo.wav", 4.5).rename(daemon.inbox / "memo.wav")
    [recording] = wait_recordings(daemon, {"active": 1})
    rid = str(recording["id"])

    report = daemon.cli("ask", rid, "--template", "transcribe", "--dry-run", "--json")

    assert report["estimated_audio_tokens"] == math.ceil(recording["duration_seconds"] * 32)
    [counted] = emulator.count_tokens_requests
    assert report["api_total_tokens"] == sum(counted.tokens_by_modality().values())
    assert report["api_total_tokens"] == audio_tokens(counted) + math.ceil(len(counted.prompt_text) / 4)
    assert counted.file_names == [recording["remote"]["name"]]
    assert counted.prompt_text.startswith(TRANSCRIBE_PROMPT_START)
    assert prompts_of(daemon) == [] and emulator.generate_requests == []
    assert daemon.cli("status", "--json")["prompts"] == {"queued": 0, "running": 0, "done": 0, "failed": 0}
    text = daemon.cli("ask", rid, "--template", "transcribe", "--dry-run")
    assert f"estimated_audio_tokens: {report['estimated_audio_tokens']}" in text.stdout

    without_key = {k: v for k, v in daemon.env.items() if k != "GEMINI_API_KEY"}
    offline = run_cli(daemon.config_path, "ask", rid, "--template", "transcribe", "--dry-run", "--json",
                      env=without_key)
    assert offline.returncode == 0, offline.stderr
    estimate = json.loads(offline.stdout)
    assert estimate["api_total_tokens"] is None and "estimate only" in estimate["api_note"]
    assert estimate["estimated_audio_tokens"] == report["estimated_audio_tokens"]
    assert len(emulator.count_tokens_requests) == 2 and prompts_of(daemon) == []

    # A span is counted as the piece the prompt will send: cut locally, inline, two seconds of audio.
    span = daemon.cli("ask", rid, "--template", "transcribe", "--from", "00:01", "--to", "00:03", "--dry-run", "--json")
    counted = emulator.count_tokens_requests[-1]
    assert counted.file_names == [] and abs(counted.audio_seconds - 2.0) < 0.1
    assert span["estimated_audio_tokens"] == 64 and span["api_total_tokens"] == audio_tokens(counted) + math.ceil(
        len(counted.prompt_text) / 4)
    assert prompts_of(daemon) == [] and emulator.generate_requests == []


def test_dry_run_counts_a_recording_that_is_not_uploaded_from_its_compact_copy(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    emulator.add_fault(Fault(route="upload_start", kind="status", status=503, probability=1.0))  # uploads down
    daemon = start(emulator)
    media.make_tone(tmp_path / "memo.wav", 3.0).rename(daemon.inbox / "memo.wav")
    [recording] = wait_recordings(daemon, lambda xs: len(xs) == 1 and xs[0]["state"] in ("converted", "failed"))

    report = daemon.cli("ask", str(recording["id"]), "--prompt", "Who speaks?", "--dry-run", "--json")

    [counted] = emulator.count_tokens_requests
    assert counted.file_names == [] and abs(counted.audio_seconds - recording["duration_seconds"]) < 0.1
    assert report["api_total_tokens"] == audio_tokens(counted) + math.ceil(len("Who speaks?") / 4)
    assert report["estimated_audio_tokens"] == math.ceil(recording["duration_seconds"] * 32) and not emulator.files


def test_ask_refuses_bad_requests_with_usage_errors_and_clear_messages(
        tmp_path: Path, start: Callable[..., DaemonProcess]) -> None:
    daemon = start(None, templates={"minutes": {"prompt": "Write the minutes."}})  # no key: nothing is sent
    media.make_tone(tmp_path / "memo.wav", 2.0).rename(daemon.inbox / "memo.wav")
    media.make_not_audio(daemon.inbox / "notes.wav")
    items = wait_recordings(daemon, {"converted": 1, "rejected": 1})
    good = next(i["id"] for i in items if i["state"] == "converted")
    bad = next(i["id"] for i in items if i["state"] == "rejected")

    def ask_fails(*args: str) -> tuple[int, str]:
        result = daemon.cli("ask", *args, check=False)
        assert result.stdout == ""
        return result.returncode, result.stderr

    code, message = ask_fails(str(good))
    assert code == 2 and "--template" in message and "--prompt" in message
    code, message = ask_fails(str(good), "--template", "transcribe", "--prompt", "Also this")
    assert code == 2 and "exactly one of --template NAME or --prompt TEXT" in message
    code, message = ask_fails(str(good), "--template", "minuets")
    assert code == 1 and "no template named 'minuets' (known: minutes, summarize, transcribe)" in message
    code, message = ask_fails(str(bad), "--template", "transcribe")
    assert code == 1 and f"recording {bad} was rejected" in message
    missing = max(good, bad) + 1
    code, message = ask_fails(str(missing), "--template", "transcribe")
    assert code == 1 and f"no recording with id {missing}" in message
    code, message = ask_fails(str(good), "--template", "transcribe", "--from", "00:30", "--to", "00:10")
    assert code == 1 and "empty" in message
    assert prompts_of(daemon) == [], "nothing refused was queued"

    queued = daemon.cli("ask", str(good), "--template", "minutes", "--json")
    assert queued["state"] == "queued" and queued["prompt"] == "Write the minutes."
    shown = daemon.cli("result", str(queued["id"]), check=False)
    assert shown.returncode == 1 and f"prompt {queued['id']} is queued" in shown.stderr
    unknown = daemon.cli("result", str(queued["id"] + 1), check=False)
    assert unknown.returncode == 1 and f"no prompt with id {queued['id'] + 1}" in unknown.stderr


def test_a_daily_budget_holds_prompts_back_and_ask_force_goes_past_it_once(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    """Audio priced at $0.10 a token: a 3-s recording (96 tokens) costs about $9.60 to ask about, so a $15 day
    has room for one answer. The second prompt waits, saying why and until when, with nothing lost; the
    third, asked with --force, runs; the ledger's dollars are in status and in each prompt."""
    daemon = start(emulator, daily_budget_usd=15.0,
                   prices={"gemini-2.5-flash": {"audio_input_per_million": 100_000.0, "input_per_million": 0.3,
                                                "output_per_million": 2.5}},
                   prompts={"max_output_tokens": 1000})
    media.make_tone(tmp_path / "note.wav", 3.0).rename(daemon.inbox / "note.wav")
    [recording] = wait_recordings(daemon, lambda xs: len(xs) == 1 and xs[0]["state"] == "active")
    rid = str(recording["id"])

    first = ask(daemon, rid, "--template", "summarize")
    assert first["state"] == "done" and 9.5 <= first["cost_usd"] <= 9.9
    second = daemon.cli("ask", rid, "--prompt", "List the action items.", "--json")
    waiting = wait_until(lambda: next((p for p in prompts_of(daemon) if p["id"] == second["id"]
                                       and p["waiting_for"] and "budget" in p["waiting_for"]), None), 30)
    assert waiting["state"] == "queued" and "daily" in waiting["waiting_for"]
    assert re.search(r"until \d{4}-\d\d-\d\d 00:00 UTC", waiting["waiting_for"])  # the next UTC midnight
    forced = ask(daemon, rid, "--prompt", "Who spoke first?", "--force")
    assert forced["state"] == "done"
    assert len(emulator.generate_requests) == 2  # the held-back prompt was never sent
    cost = daemon.cli("status", "--json")["cost"]
    assert cost["daily_budget_usd"] == 15.0
    assert cost["today_usd"] == pytest.approx(first["cost_usd"] + forced["cost_usd"], abs=1e-6)
    assert cost["month_usd"] >= cost["today_usd"]
    held = next(p for p in prompts_of(daemon) if p["id"] == second["id"])
    assert held["state"] == "queued" and held["cost_usd"] is None
