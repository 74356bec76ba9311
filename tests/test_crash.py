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
    wait_until(lambda: [i for i in daemon.files() if i["state"] == "converting"], 30, 0.05,
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
    # The server takes its time over the upload's last chunk, so the daemon dies with the upload in flight;
    # the server then finishes it, exactly as when a reply is lost.
    emulator.add_fault(Fault(route="upload_chunk", kind="slow", delay=2.0, times=1))
    daemon.start()
    media.make_tone(daemon.inbox / "memo.wav", 2.0)
    wait_until(lambda: [i for i in daemon.files() if i["state"] == "uploading"], 30, 0.05,
               message="the upload to start")
    daemon.kill()
    wait_until(lambda: emulator.stats.uploads_completed == 1, 10, message="the server to finish the upload")

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
    emulator.add_fault(Fault(route="upload_start", kind="slow", delay=3.0, times=1))
    daemon.start()
    media.make_tone(daemon.inbox / "memo.wav", 2.0)
    wait_until(lambda: [i for i in daemon.files() if i["state"] == "uploading"], 30, 0.05,
               message="the upload to start")
    daemon.kill()
    daemon.start()
    daemon.wait_for_states({"active": 1})
    assert len(emulator.files) == 1
    daemon.stop()


def test_no_ffmpeg_outlives_a_killed_daemon(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, conversion={"workers": 1})
    long_one = media.make_tone(tmp_path / "long.wav", 600.0, channels=2, rate=48000)
    daemon.start()
    long_one.rename(daemon.inbox / "long.wav")
    wait_until(lambda: [i for i in daemon.files() if i["state"] == "converting"], 30, 0.05,
               message="the conversion to start")
    wait_until(lambda: _ffmpeg_children_of(daemon.process.pid), 10, 0.05, message="ffmpeg to start")
    orphans_before = _ffmpeg_writing_into(tmp_path)
    assert orphans_before
    daemon.kill()
    wait_until(lambda: not _ffmpeg_writing_into(tmp_path), 5, 0.05, message="ffmpeg to die with the daemon")


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
