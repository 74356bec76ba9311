"""kill -9 at the worst moments, then a restart: nothing lost, nothing converted or uploaded twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import media
from tests.emulator import Emulator, Fault
from tests.harness import DaemonProcess, wait_until


@pytest.mark.slow
def test_kill_during_conversion_then_restart(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, conversion={"workers": 1})
    long_one = media.make_tone(tmp_path / "long.wav", 600.0, channels=2, rate=48000)
    daemon.start()
    long_one.rename(daemon.inbox / "long.wav")
    wait_until(lambda: "converting" in daemon.states(), 30, 0.05,
               message="the conversion to start")
    daemon.kill()
    converted_dir = tmp_path / "d" / "state" / "converted"

    daemon.start()
    items = daemon.wait_for_states({"active": 1}, timeout=120)
    assert abs(items[0]["duration_seconds"] - 600.0) < 1
    assert len(emulator.all_files) == 1
    # The killed conversion's temporary output is gone; only the final copy remains.
    assert [p.name for p in converted_dir.iterdir()] == [Path(items[0]["converted"]["path"]).name]
    history = daemon.cli("show", str(items[0]["id"]), "--json")["history"]
    assert any("the conversion was interrupted" in event["reason"] for event in history)
    daemon.stop()


def test_kill_during_upload_then_restart_uploads_nothing_twice(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    # The server holds the upload's last chunk until the daemon is dead, then finishes it: exactly a lost reply.
    emulator.add_fault(Fault(route="upload_chunk", kind="hold", times=1))
    daemon.start()
    media.make_tone(daemon.inbox / "memo.wav", 2.0)
    wait_until(lambda: emulator.held_requests == 1, 30, 0.05, message="the last chunk to reach the server")
    daemon.kill()
    assert emulator.release_holds() == 1
    wait_until(lambda: emulator.stats.uploads_completed == 1, 30, message="the server to finish the upload")

    daemon.start()
    items = daemon.wait_for_states({"active": 1})
    assert len(emulator.all_files) == 1
    assert items[0]["remote"]["name"] == emulator.all_files[0].name
    history = daemon.cli("show", str(items[0]["id"]), "--json")["history"]
    assert [e["to"] for e in history if e["from"] != e["to"]].count("uploading") == 1
    daemon.stop()


def test_kill_before_the_upload_reached_the_server_uploads_once_after_restart(tmp_path: Path,
                                                                              emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    # The server holds the upload's first request until the daemon is dead: it never learnt where to send the bytes.
    emulator.add_fault(Fault(route="upload_start", kind="hold", times=1))
    daemon.start()
    media.make_tone(daemon.inbox / "memo.wav", 2.0)
    wait_until(lambda: emulator.held_requests == 1, 30, 0.05, message="the upload's start to reach the server")
    daemon.kill()
    assert emulator.release_holds() == 1
    daemon.start()
    [item] = daemon.wait_for_states({"active": 1})
    assert len(emulator.files) == 1 and emulator.stats.uploads_completed == 1
    assert item["remote"]["name"] == emulator.files[0].name
    daemon.stop()


def test_no_ffmpeg_outlives_a_killed_daemon(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, conversion={"workers": 1})
    long_one = media.make_tone(tmp_path / "long.wav", 600.0, channels=2, rate=48000)
    daemon.start()
    long_one.rename(daemon.inbox / "long.wav")
    wait_until(lambda: "converting" in daemon.states(), 30, 0.05,
               message="the conversion to start")
    wait_until(lambda: _ffmpeg_children_of(daemon.process.pid), 10, 0.05, message="ffmpeg to start")
    assert _ffmpeg_writing_into(tmp_path)
    converted = tmp_path / "d" / "state" / "converted"
    [partial] = wait_until(lambda: [p for p in converted.glob(".*.partial-*") if p.stat().st_size], 30, 0.05,
                           message="ffmpeg to start writing")
    daemon.kill()
    # A surviving ffmpeg would go on to the end of the file (600 s of audio take it 5-20 s) and then exit too:
    # gone is not enough, its output must have stopped mid-file.
    wait_until(lambda: not _ffmpeg_writing_into(tmp_path), 60, 0.05, message="ffmpeg to die with the daemon")
    assert not _ogg_finished(partial), "ffmpeg outlived the daemon and finished the conversion"


def _ogg_finished(path: Path) -> bool:
    """Whether an Ogg file ends with its end-of-stream page, which ffmpeg writes only when it runs to the end."""
    data = path.read_bytes()
    last = data.rfind(b"OggS")
    return last >= 0 and len(data) > last + 5 and bool(data[last + 5] & 0x04)


def _ffmpeg_children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if "ffmpeg" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(child))
    return found


def _ffmpeg_writing_into(folder: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ffmpeg" in cmdline and str(folder) in cmdline:
            found.append(int(proc.name))
    return found
