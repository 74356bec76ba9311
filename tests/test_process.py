"""`audiodrop process FILE...`: the whole pipeline without a daemon, run as a user runs it (a subprocess, the real
SDK against the emulator), sharing the daemon's database so `files`, `show` and `prompts` see the results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests import media
from tests.emulator import Emulator
from tests.harness import DaemonProcess, run_cli


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


def test_process_is_refused_while_the_daemon_runs_on_the_same_state_dir(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url).start()
    source = media.make_tone(made(tmp_path) / "later.wav", 1.5)
    try:
        refused = daemon.cli("process", str(source), check=False)
        assert refused.returncode == 1
        state_dir = tmp_path / "d" / "state"
        assert f"the daemon is running on {state_dir}: drop the files into a watch folder" in refused.stderr
        assert "audiodrop ask" in refused.stderr
        assert daemon.files() == []
    finally:
        assert daemon.stop() == 0
    # Once the daemon has stopped, the lock is free and the same command goes through.
    run = daemon.cli("process", str(source), check=False)
    assert run.returncode == 0, run.stderr
    assert [f["state"] for f in daemon.files()] == ["active"]


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
