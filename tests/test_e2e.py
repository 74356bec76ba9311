"""The whole pipeline as a user runs it: `audiodrop run` as a subprocess, recordings dropped into its folder,
the real SDK uploading to the emulator, the CLI reporting."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

from tests import media
from tests.emulator import Emulator
from tests.harness import DaemonProcess, count_states, run_cli, wait_until

SUPPORTED_UPLOAD_TYPES = {"audio/ogg", "audio/mp3", "audio/wav", "audio/flac", "audio/aac", "audio/aiff"}


def make_inputs(folder: Path) -> dict[str, Path]:
    """A dozen recordings in different formats, each with its own content."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {
        "wav 44.1k stereo": media.make_tone(folder / "meeting.wav", 3.0, channels=2, rate=44100),
        "wav 24-bit 48k": media.make_tone(folder / "hi-res.wav", 2.5, rate=48000, codec="pcm_s24le"),
        "wav 5.1": media.make_tone(folder / "surround.wav", 2.0, channels=6, rate=48000),
        "mp3": media.make_tone(folder / "memo.mp3", 3.5, channels=2, rate=44100),
        "m4a": media.make_tone(folder / "voice memo.m4a", 3.0, rate=44100),
        "ogg vorbis": media.make_tone(folder / "field.ogg", 2.0, rate=44100, codec="libvorbis"),
        "opus": media.make_tone(folder / "call.opus", 2.5, rate=48000),
        "flac": media.make_tone(folder / "studio.flac", 3.0, channels=2, rate=48000),
        "aiff": media.make_tone(folder / "old mac.aiff", 2.0, rate=22050),
        "webm": media.make_tone(folder / "browser.webm", 2.0, rate=48000, codec="libopus"),
        "wma": media.make_tone(folder / "legacy.wma", 2.0, rate=44100),
        "mp4 video": media.make_video(folder / "screen recording.mp4", 3.0),
        "speech": media.make_speech(folder / "ünïcödé 'quoted' speech.wav"),
    }
    return made


def copy_slowly(source: Path, destination: Path, pieces: int = 8, pause: float = 0.35) -> None:
    """A writer that appends in pieces, opening and closing the file each time, over a few seconds."""
    data = source.read_bytes()
    step = len(data) // pieces + 1
    for start in range(0, len(data), step):
        with open(destination, "ab") as stream:
            stream.write(data[start:start + step])
        time.sleep(pause)


def test_a_dozen_recordings_become_active_mono_16kbps_files(tmp_path: Path, emulator: Emulator,
                                                            daemon: DaemonProcess) -> None:
    sources = make_inputs(tmp_path / "made")
    slow_source = media.make_tone(tmp_path / "made" / "slow.wav", 6.0, channels=2, rate=48000)
    daemon.start()
    for path in sources.values():
        shutil.copy(path, daemon.inbox / path.name)
    writer = threading.Thread(target=copy_slowly, args=(slow_source, daemon.inbox / "slow.wav"))
    writer.start()
    writer.join()

    # A part the slow writer left closed long enough may be taken on its own; the longer file then replaces it
    # (rejected, "the file grew") and its remote copy is deleted.
    def settled(items: list[dict[str, Any]]) -> bool:
        active = [i for i in items if i["state"] == "active"]
        parts = [i for i in items if i["state"] != "active"]
        return len(active) == len(sources) + 1 and all("the file grew" in (i["error"] or "") for i in parts) \
            and len(emulator.files) == len(active)

    everything = daemon.wait_for_states(settled, timeout=120)
    items = [item for item in everything if item["state"] == "active"]

    by_name = {Path(item["source_path"]).name: item for item in items}
    assert set(by_name) == {p.name for p in sources.values()} | {"slow.wav"}
    remote_files = {f.name: f for f in emulator.files}
    assert len(remote_files) == len(items)  # nothing left uploaded twice
    for name, item in by_name.items():
        source = tmp_path / "made" / name
        stored = remote_files[item["remote"]["name"]]
        probed = media.ffprobe_audio(stored.path)
        source_seconds = float(media.ffprobe_audio(source)["duration"])
        assert probed["channels"] == 1, name
        assert stored.mime_type in SUPPORTED_UPLOAD_TYPES, name
        kbps = stored.size_bytes * 8 / float(probed["duration"]) / 1000
        assert 8 < kbps < 24, f"{name}: {kbps:.1f} kbps"
        # Video tracks run longer than their sound: compare with the audio stream when there is one.
        assert abs(float(probed["duration"]) - source_seconds) < 0.6, name
        assert item["remote"]["expires_at"].endswith("Z")
        assert item["converted"]["mime_type"] == stored.mime_type
        assert stored.display_name.startswith("audiodrop-")
        assert name not in stored.display_name
    # The slowly written file ends as one recording of the whole file. (A conversion started between two writes
    # is abandoned when the next write changes the file, and starts over.)
    slow = daemon.cli("show", str(by_name["slow.wav"]["id"]), "--json")
    moves = [(e["to"], e["reason"]) for e in slow["history"]]
    assert [to for to, _ in moves].count("converted") == 1, moves
    assert all("changed" in reason for to, reason in moves[1:] if to == "discovered"), moves
    assert abs(slow["duration_seconds"] - 6.0) < 0.2

    status = daemon.cli("status", "--json")
    assert status["recordings"]["active"] == len(items)
    assert status["storage"]["used_bytes"] == sum(f.size_bytes for f in emulator.files)
    assert status["daemon"]["running"] is True
    assert daemon.stop() == 0


def test_same_content_twice_is_processed_once_and_a_reused_name_is_new(tmp_path: Path, emulator: Emulator,
                                                                       daemon: DaemonProcess) -> None:
    daemon.start()
    first = media.make_tone(daemon.inbox / "Recording.m4a", 2.0)
    [original] = daemon.wait_for_states({"active": 1})
    shutil.copy(first, daemon.inbox / "copy of the same.m4a")
    wait_until(lambda: daemon.cli("show", str(original["id"]), "--json")["duplicates"], 30,
               message="the duplicate to be noticed")
    # The same name reused for new audio (another length, another size) is a new recording.
    media.make_tone(tmp_path / "new.m4a", 3.0, channels=2)
    shutil.copy(tmp_path / "new.m4a", daemon.inbox / "Recording.m4a")
    items = daemon.wait_for_states({"active": 2})
    assert len(emulator.files) == 2
    assert [Path(i["source_path"]).name for i in items] == ["Recording.m4a", "Recording.m4a"]
    [new] = [i for i in items if i["id"] != original["id"]]
    assert abs(new["duration_seconds"] - 3.0) < 0.2
    shown = daemon.cli("show", str(original["id"]), "--json")
    assert [d["path"] for d in shown["duplicates"]] == [str(daemon.inbox / "copy of the same.m4a")]
    assert daemon.cli("show", str(new["id"]), "--json")["duplicates"] == []


def test_files_dropped_while_stopped_are_picked_up_at_start(tmp_path: Path, emulator: Emulator,
                                                            daemon: DaemonProcess) -> None:
    media.make_tone(daemon.inbox / "while away 1.wav", 1.5)
    (daemon.inbox / "nested" / "deeper").mkdir(parents=True)
    media.make_tone(daemon.inbox / "nested" / "deeper" / "while away 2.mp3", 1.5)
    daemon.start()
    items = daemon.wait_for_states({"active": 2})
    assert sorted(Path(i["source_path"]).name for i in items) == ["while away 1.wav", "while away 2.mp3"]


def test_without_an_api_key_everything_converts_and_waits(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "nokey", base_url=emulator.base_url, api_key=None)
    daemon.start()
    try:
        media.make_tone(daemon.inbox / "a.wav", 1.5)
        daemon.wait_for_states({"converted": 1})
        status = daemon.cli("status", "--json")
        assert "no API key" in status["daemon"]["waiting_for"]
        assert emulator.stats.uploads_started == 0
        assert "no API key found" in daemon.log()
    finally:
        daemon.stop()


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path, emulator: Emulator,
                                                          daemon: DaemonProcess) -> None:
    daemon.start()
    second = run_cli(daemon.config_path, "run", env=daemon.env)
    assert second.returncode == 1
    assert "another audiodrop daemon" in second.stderr
    assert count_states(daemon.files()) == {}
