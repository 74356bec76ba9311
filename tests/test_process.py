"""`audiodrop process FILE...`: the whole pipeline for some files, run as a user runs it (a subprocess, the real
SDK against the emulator), sharing the daemon's database so `files`, `show` and `prompts` see the results. Without
a daemon it does the work itself; beside a running daemon it hands the files over and follows them. Its progress
(seconds of audio converted, bytes uploaded) is written by the pipeline and read back by the bars."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

from daemon.cli.progress import Row, totals
from daemon.config import GeminiSettings
from daemon.gemini import GeminiClient
from daemon.pipeline import transcode
from tests import media
from tests.emulator import Emulator
from tests.emulator.faults import Fault
from tests.harness import API_KEY, ROOT, DaemonProcess, run_cli, wait_until


def made(tmp_path: Path) -> Path:
    folder = tmp_path / "made"
    folder.mkdir(exist_ok=True)
    return folder


def converting_events(setup: DaemonProcess, recording_id: int) -> int:
    history = setup.cli("show", str(recording_id), "--json")["history"]
    return sum(1 for event in history if event["to"] == "converting" and event["from"] != "converting")


def test_process_converts_uploads_and_transcribes_the_good_files_and_names_the_bad_one(
        tmp_path: Path, emulator: Emulator) -> None:
    setup = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)  # config and env only; no daemon runs
    meeting = media.make_tone(made(tmp_path) / "meeting.wav", 3.0, channels=2, rate=44100)
    memo = media.make_tone(made(tmp_path) / "memo.mp3", 2.5, channels=2, rate=44100)
    notes = media.make_not_audio(made(tmp_path) / "notes.wav")

    run = setup.cli("process", str(meeting), str(memo), str(notes), "--template", "transcribe", check=False)

    assert run.returncode == 1, run.stderr
    assert "audiodrop: notes.wav: not a readable audio file" in run.stderr
    printed = {line.split(": ", 1)[1] for line in run.stdout.splitlines() if line.startswith("  transcribe: ")}
    prompts = setup.cli("prompts", "--json")
    assert [p["state"] for p in prompts] == ["done", "done"]
    assert printed == {p["result_path"] for p in prompts}
    for path in printed:
        assert "Speaker 1" in Path(path).read_text()  # the emulator's transcript, written as a result file
    # Plain progress lines on stderr when it is not a terminal.
    assert "meeting.wav: active" in run.stderr and "memo.mp3: transcribe: done" in run.stderr
    files = {Path(f["source_path"]).name: f for f in setup.files()}
    assert {name: f["state"] for name, f in files.items()} == {"meeting.wav": "active", "memo.mp3": "active",
                                                               "notes.wav": "rejected"}
    assert files["notes.wav"]["error"].startswith("notes.wav: not a readable audio file")
    assert sorted(f.name for f in emulator.files) == sorted(f["remote"]["name"] for f in files.values()
                                                            if f["remote"])
    for stored in emulator.files:
        assert media.ffprobe_audio(stored.path)["channels"] == 1

    # Again, as a script would: the file is reused (nothing converted or uploaded again), JSON only on stdout.
    again = run_cli(setup.config_path, "process", str(meeting), "--json", env=setup.env)
    assert again.returncode == 0 and again.stderr == ""
    summary = json.loads(again.stdout)
    assert [(f["path"], f["state"], f["reused"]) for f in summary["files"]] == [(str(meeting), "active", True)]
    assert emulator.stats.uploads_started == 2
    assert converting_events(setup, files["meeting.wav"]["id"]) == 1


def test_process_without_a_key_converts_and_says_the_uploads_wait(tmp_path: Path, emulator: Emulator) -> None:
    setup = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, api_key=None)
    source = media.make_tone(made(tmp_path) / "voice memo.m4a", 2.0, channels=2, rate=44100)

    run = setup.cli("process", str(source), check=False)

    assert run.returncode == 0, run.stderr
    assert "no API key" in run.stderr and "uploads" in run.stderr and "wait for a key" in run.stderr
    [item] = setup.files()
    assert item["state"] == "converted" and item["remote"] is None
    assert media.ffprobe_audio(Path(item["converted"]["path"]))["channels"] == 1
    assert emulator.stats.requests == []
    # Asking for a transcript without a key cannot succeed: exit 1, nothing queued, nothing converted again.
    asked = setup.cli("process", str(source), "--template", "transcribe", check=False)
    assert asked.returncode == 1 and "no API key" in asked.stderr
    assert setup.cli("prompts", "--json") == []
    assert converting_events(setup, item["id"]) == 1


def test_the_same_file_given_twice_or_copied_is_converted_once(tmp_path: Path) -> None:
    setup = DaemonProcess(tmp_path / "d", base_url=None, api_key=None)
    source = media.make_tone(made(tmp_path) / "a.wav", 2.0)
    copy = shutil.copy(source, made(tmp_path) / "copy of a.wav")

    run = setup.cli("process", str(source), f"{made(tmp_path)}/./a.wav", str(copy), check=False)

    assert run.returncode == 0, run.stderr
    [item] = setup.files()
    assert converting_events(setup, item["id"]) == 1
    duplicates = [d["path"] for d in setup.cli("show", str(item["id"]), "--json")["duplicates"]]
    assert sorted([item["source_path"], *duplicates]) == sorted([str(source), str(copy)])  # either may come first
    assert len(list((tmp_path / "d" / "state" / "converted").iterdir())) == 1
    # A second run reuses it as well.
    again = json.loads(run_cli(setup.config_path, "process", str(copy), str(source), "--json", env=setup.env).stdout)
    assert [(f["id"], f["reused"]) for f in again["files"]] == [(item["id"], True), (item["id"], True)]
    assert converting_events(setup, item["id"]) == 1


def test_a_file_inside_a_drop_folder_gets_the_folders_prompts_once(tmp_path: Path, emulator: Emulator) -> None:
    inbox = tmp_path / "d" / "inbox"
    setup = DaemonProcess(tmp_path / "d", base_url=emulator.base_url,  # config and env only; no daemon runs
                          watch=[{"path": str(inbox), "prompts": ["summarize"]}])
    inbox.mkdir(parents=True, exist_ok=True)
    inside = media.make_tone(inbox / "standup.wav", 2.0)
    outside = media.make_tone(made(tmp_path) / "memo.wav", 2.5)

    run = setup.cli("process", str(inside), str(outside), "--template", "summarize", "--template", "transcribe",
                    "--json")

    done = {(Path(f["path"]).name, p["template"]) for f in run["files"] for p in f["prompts"]}
    assert done == {("standup.wav", "summarize"), ("standup.wav", "transcribe"),
                    ("memo.wav", "summarize"), ("memo.wav", "transcribe")}
    prompts = setup.cli("prompts", "--json")
    assert sorted(p["template"] for p in prompts) == ["summarize", "summarize", "transcribe", "transcribe"]
    assert all(p["state"] == "done" for p in prompts), prompts
    # Without --template the folder's own prompt still runs for a file in the folder, and none for one outside.
    another = media.make_tone(inbox / "retro.wav", 3.0)
    run = setup.cli("process", str(another), "--json")
    [item] = run["files"]
    assert [p["template"] for p in item["prompts"]] == ["summarize"] and item["prompts"][0]["state"] == "done"


# --- beside a running daemon --------------------------------------------------------------------------------------


def start_process(setup: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    """`audiodrop process ARGS` in the background (stderr is not a terminal: progress comes as lines)."""
    return subprocess.Popen([sys.executable, "-m", "daemon", "process", *args, "--config", str(setup.config_path)],
                            cwd=ROOT, env=setup.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def progress_rows(setup: DaemonProcess) -> list[tuple[Any, ...]]:
    """(state, progress_seconds, progress_bytes, converted_bytes) of each recording, read-only from the database."""
    with closing(sqlite3.connect(f"file:{setup.folder / 'state' / 'audiodrop.db'}?mode=ro", uri=True,
                                 timeout=10)) as connection:
        return connection.execute("SELECT state, progress_seconds, progress_bytes, converted_bytes FROM recordings "
                                  "ORDER BY id").fetchall()


def test_process_hands_the_files_to_the_running_daemon_and_follows_them_to_their_results(
        tmp_path: Path, emulator: Emulator) -> None:
    inbox = tmp_path / "d" / "inbox"
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url,
                           watch=[{"path": str(inbox), "prompts": ["summarize"]}]).start()
    try:
        outside = media.make_tone(made(tmp_path) / "memo.wav", 2.0)
        inside = media.make_tone(inbox / "standup.wav", 2.5)  # the daemon's anyway: its watcher sees it too

        run = run_cli(daemon.config_path, "process", str(outside), str(inside), "--template", "transcribe", "--json",
                      env=daemon.env)

        assert (run.returncode, run.stderr) == (0, "")
        report = json.loads(run.stdout)
        assert (report["handled_by"], report["interrupted"], report["failed"]) == ("daemon", False, 0)
        files = {Path(f["path"]).name: f for f in report["files"]}
        assert {name: (f["state"], f["error"]) for name, f in files.items()} == {
            "memo.wav": ("active", None), "standup.wav": ("active", None)}
        ran = {(name, p["template"], p["state"]) for name, f in files.items() for p in f["prompts"]}
        assert ran == {("memo.wav", "transcribe", "done"), ("standup.wav", "transcribe", "done"),
                       ("standup.wav", "summarize", "done")}  # the folder's prompt too, once
        assert all(Path(p["result_path"]).is_file() for f in files.values() for p in f["prompts"])
        # The daemon did the work (this command only followed it): its log has the conversions and the answers.
        log = daemon.log()
        assert "memo.wav: converted to opus" in log and "standup.wav: converted to opus" in log
        assert all(f"prompt {p['id']} done" in log for f in files.values() for p in f["prompts"])
        assert len(daemon.files()) == 2 and len(daemon.cli("prompts", "--json")) == 3
        assert emulator.stats.uploads_started == 2
    finally:
        assert daemon.stop() == 0
    # The daemon stopped: the same command does the work itself again.
    later = media.make_tone(made(tmp_path) / "later.wav", 1.5)
    alone = json.loads(run_cli(daemon.config_path, "process", str(later), "--json", env=daemon.env).stdout)
    assert (alone["handled_by"], [f["state"] for f in alone["files"]]) == ("process", ["active"])


def test_a_long_recordings_progress_moves_while_the_daemon_converts_and_uploads_it(
        tmp_path: Path, emulator: Emulator) -> None:
    # ffmpeg reading at the speed of playback: 5 s of audio take 5 s to convert, reported twice a second.
    slow = tmp_path / "ffmpeg-at-playback-speed"
    slow.write_text(f'#!/bin/sh\nexec {media.FFMPEG} -re "$@"\n')
    slow.chmod(0o755)
    emulator.add_fault(Fault(route="upload_chunk", kind="hold", times=1))  # the upload's bytes wait at the server
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, conversion={"ffmpeg": str(slow)}).start()
    process = None
    try:
        source = media.make_tone(made(tmp_path) / "long.wav", 5.0)
        process = start_process(daemon, str(source))
        seen: list[tuple[Any, ...]] = []

        def uploading() -> bool:
            seen.extend(progress_rows(daemon))
            return bool(seen) and seen[-1][0] == "uploading" and emulator.held_requests == 1

        wait_until(uploading, 60, 0.05, message="the upload to reach the server")
        converting = [row[1] for row in seen if row[0] == "converting" and row[1]]
        assert len(set(converting)) >= 3, seen  # it moved, in steps, before the state changed
        assert converting == sorted(converting) and 0 < converting[0] < converting[-1] < 5.0
        _state, _seconds, sent, size = seen[-1]
        assert sent == size > 0  # every byte handed to the SDK, the state still uploading
        [item] = daemon.files()
        assert item["progress"] == {"uploaded_bytes": size}
        assert emulator.release_holds() == 1
        _out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "long.wav: converting" in err and "long.wav: active" in err
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.communicate()
        emulator.release_holds()
        assert daemon.stop() == 0


def test_ctrl_c_stops_following_and_leaves_the_work_to_the_daemon(tmp_path: Path, emulator: Emulator) -> None:
    emulator.add_fault(Fault(route="generate", kind="hold", times=1))
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url).start()
    try:
        source = media.make_tone(made(tmp_path) / "call.wav", 2.0)
        process = start_process(daemon, str(source), "--template", "transcribe")
        wait_until(lambda: emulator.held_requests == 1, 30, 0.05, message="the transcript to be asked for")

        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=20)

        assert process.returncode == 130, err
        assert "stopped following; the daemon goes on with 1 file(s)" in err and "Traceback" not in err
        assert emulator.release_holds() == 1
        [prompt] = wait_until(lambda: [p for p in daemon.cli("prompts", "--json") if p["result_path"]], 30,
                              message="the daemon to finish the transcript")
        assert prompt["state"] == "done" and "Speaker 1" in Path(prompt["result_path"]).read_text()
        assert [f["state"] for f in daemon.files()] == ["active"]
    finally:
        emulator.release_holds()
        assert daemon.stop() == 0


def test_beside_a_daemon_without_a_key_process_says_what_the_daemon_waits_for(tmp_path: Path,
                                                                             emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, api_key=None).start()
    try:
        source = media.make_tone(made(tmp_path) / "memo.wav", 1.5)
        refused = daemon.cli("process", str(source), "--no-upload", check=False)
        assert refused.returncode == 1 and "--no-upload works only while it is stopped" in refused.stderr
        assert daemon.files() == []

        run = daemon.cli("process", str(source), "--template", "transcribe", check=False)

        assert run.returncode == 1  # the transcript asked for is not there yet
        assert "the daemon waits: no API key" in run.stderr
        assert [f["state"] for f in daemon.files()] == ["converted"]
        # The prompt stays queued with the daemon, which runs it once it has a key.
        assert [(p["template"], p["state"]) for p in daemon.cli("prompts", "--json")] == [("transcribe", "queued")]
        assert emulator.stats.requests == []
    finally:
        assert daemon.stop() == 0


# --- the progress parts on their own ----------------------------------------------------------------------------


def test_the_bars_count_seconds_of_audio_and_bytes_so_a_long_recording_moves_them() -> None:
    two_hours = 7200.0
    base = Row(key="a", name="interview.m4a", state="discovered", duration=two_hours, progress_seconds=None,
               converted_bytes=None, progress_bytes=None, uploads=True, expected_prompts=1)
    small = Row(key="b", name="memo.wav", state="active", duration=60.0, progress_seconds=None,
                converted_bytes=120_000, progress_bytes=None, uploads=True, prompts=[(1, "transcribe", "done")])
    waiting = totals([base, small])
    assert (waiting.converted_seconds, waiting.audio_seconds) == (60.0, 7260.0)
    assert waiting.upload_bytes == 120_000 + two_hours * 2036.0 and waiting.uploaded_bytes == 120_000
    assert (waiting.prompts_finished, waiting.prompts) == (1, 2)
    halfway = totals([Row(**{**base.__dict__, "state": "converting", "progress_seconds": 3600.0}), small])
    assert halfway.converted_seconds == 3660.0
    sending = totals([Row(**{**base.__dict__, "state": "uploading", "converted_bytes": 14_000_000,
                             "progress_bytes": 8_388_608}), small])
    assert sending.converted_seconds == 7260.0 and sending.uploaded_bytes == 120_000 + 8_388_608
    assert sending.upload_bytes == 14_120_000
    rejected = totals([Row(**{**base.__dict__, "state": "rejected"})])
    assert rejected.upload_bytes == 0 and rejected.converted_seconds == two_hours


def test_a_conversion_reports_the_seconds_converted_as_ffmpeg_goes(tmp_path: Path) -> None:
    slow = tmp_path / "ffmpeg-at-playback-speed"
    slow.write_text(f'#!/bin/sh\nexec {media.FFMPEG} -re "$@"\n')
    slow.chmod(0o755)
    source = media.make_tone(tmp_path / "tone.wav", 2.0)
    reported: list[float] = []

    result = transcode.convert(source, tmp_path / "tone.ogg", transcode.FORMATS["opus"], ffmpeg=str(slow),
                               progress=reported.append)

    assert len(reported) >= 3 and reported == sorted(reported) and reported[0] < 1.0
    assert abs(reported[-1] - result.duration_seconds) < 0.1 and abs(result.duration_seconds - 2.0) < 0.1


def test_an_upload_reports_the_bytes_handed_to_the_sdk(tmp_path: Path, emulator: Emulator) -> None:
    copy = tmp_path / "copy.ogg"
    copy.write_bytes(bytes(range(256)) * 400)
    reported: list[int] = []
    client = GeminiClient(API_KEY, GeminiSettings(base_url=emulator.base_url))
    try:
        uploaded = client.upload(copy, mime_type="audio/ogg", display_name="audiodrop-test-1",
                                 progress=reported.append)
    finally:
        client.close()
    assert reported == [102_400] and uploaded.size_bytes == 102_400
