"""Process discipline of the running daemon: signals, reload, folders that come and go."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests import media
from tests.emulator import Emulator
from tests.harness import DaemonProcess, wait_until


@pytest.mark.slow
def test_sigterm_during_a_long_conversion_abandons_it_at_once_and_it_resumes(tmp_path: Path,
                                                                               emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, conversion={"workers": 1})
    # A stop timeout far longer than the conversion (ten minutes of audio take ffmpeg 5-20 s): a daemon that
    # waited for a conversion at a stop would finish this one before it exits. A conversion is cheap to start
    # again, so it must be abandoned at once instead.
    daemon.env["AUDIODROP_STOP_TIMEOUT"] = "600"
    long_one = media.make_tone(tmp_path / "long.wav", 600.0)
    daemon.start()
    long_one.rename(daemon.inbox / "long.wav")
    wait_until(lambda: daemon.states() == ["converting"], 30, 0.05, message="the conversion to start")
    assert daemon.stop(timeout=120) == 0
    assert daemon.states() == ["converting"], "the daemon waited for the conversion before it exited"
    assert "abandoned 1 task(s) in flight, they resume at the next start" in daemon.log()
    daemon.start()
    [item] = daemon.wait_for_states({"active": 1}, timeout=120)
    assert abs(item["duration_seconds"] - 600) < 1
    reasons = [event["reason"] for event in daemon.cli("show", str(item["id"]), "--json")["history"]]
    assert any("the conversion was interrupted" in reason for reason in reasons), reasons
    daemon.stop()


def test_sighup_reloads_the_configuration_and_a_bad_one_is_refused(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    daemon.start()
    config = daemon.config_path.read_text()
    second = tmp_path / "second inbox"
    second.mkdir()
    daemon.config_path.write_text(config.replace("watch = [", f"watch = [\n    {{ path = {str(second)!r} }},", 1))
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in daemon.log(), 10, message="the reload")
    media.make_tone(second / "new folder.wav", 1.0)
    daemon.wait_for_states({"active": 1})

    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "\nnot_a_key = 1\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration not reloaded" in daemon.log(), 10, message="the refusal")
    assert "not_a_key: unknown key" in daemon.log()
    daemon.config_path.write_text(good)  # the CLI reads the same file
    media.make_tone(second / "still watched.wav", 1.2)
    daemon.wait_for_states({"active": 2})
    assert daemon.stop() == 0


@pytest.mark.slow
def test_an_unmounted_folder_is_shown_and_watched_again_when_it_returns(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    daemon.start()
    away = tmp_path / "unmounted"
    daemon.inbox.rename(away)
    status = wait_until(lambda: (s := daemon.cli("status", "--json"))["daemon"]["unavailable_folders"] and s, 20,
                        message="status to show the folder unavailable")
    assert status["daemon"]["unavailable_folders"][0].startswith(str(daemon.inbox))
    media.make_tone(away / "recorded meanwhile.wav", 1.0)
    away.rename(daemon.inbox)
    daemon.wait_for_states({"active": 1}, timeout=60)
    wait_until(lambda: daemon.cli("status", "--json")["daemon"]["unavailable_folders"] == [], 20,
               message="status to show the folder available again")
    media.make_tone(daemon.inbox / "after.wav", 1.3)
    daemon.wait_for_states({"active": 2})
    daemon.stop()
