"""Hostile inputs through the running daemon: each ends rejected with a reason naming the file, or converted
and uploaded; the daemon keeps running and nothing is taken that should not be."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests import media
from tests.harness import DaemonProcess, wait_until


def test_bad_inputs_are_rejected_with_a_reason_and_good_ones_with_odd_names_go_through(
        tmp_path: Path, daemon: DaemonProcess) -> None:
    made = tmp_path / "made"
    made.mkdir()
    bad = {
        "empty.wav": media.make_empty(made / "empty.wav"),
        "notes.wav": media.make_not_audio(made / "notes.wav"),
        "tiny.mp3": media.make_tiny_mp3(made / "tiny.mp3"),
        "interview.m4a": media.make_m4a_without_moov(made / "interview.m4a"),
        "screen.mp4": media.make_video_only(made / "screen.mp4"),
    }
    odd_names = ["with spaces.wav", "quotes \"double\" and 'single'.wav", "ünïcödé 日本語.wav", "new\nline.wav",
                 "-leading dash.wav", "colon:in name.wav", "dollar $HOME `x`.wav"]
    good = {name: media.make_tone(made / f"good{i}.wav", 1.0 + i * 0.1) for i, name in enumerate(odd_names)}
    truncated = media.make_truncated_mp3(made / "cut.mp3", seconds=30.0, keep=0.3)
    secret = media.make_tone(tmp_path / "outside secret.wav", 1.0)

    daemon.start()
    for name, path in {**bad, **good, "cut.mp3": truncated}.items():
        shutil.copy(path, daemon.inbox / name)
    os.symlink(secret, daemon.inbox / "escape.wav")
    (daemon.inbox / "download.wav.part").write_bytes(good[odd_names[0]].read_bytes())
    (daemon.inbox / ".hidden.wav").write_bytes(b"x")

    items = daemon.wait_for_states({"rejected": len(bad), "active": len(good) + 1}, timeout=90)
    by_name = {Path(i["source_path"]).name: i for i in items}
    assert "escape.wav" not in by_name and "download.wav.part" not in by_name and ".hidden.wav" not in by_name
    reasons = {name: by_name[name]["error"] for name in bad}
    assert reasons["empty.wav"] == "empty.wav: the file is empty (0 bytes)"
    assert reasons["screen.mp4"].startswith("screen.mp4: no audio stream")
    for name, reason in reasons.items():
        assert reason.startswith(name + ":"), reason
    assert "moov" in reasons["interview.m4a"] or "not a readable audio file" in reasons["interview.m4a"]
    cut = by_name["cut.mp3"]
    assert cut["warning"] and "%" in cut["warning"]
    assert cut["duration_seconds"] < 20
    # The partial download becomes a recording once renamed to its final name.
    os.rename(daemon.inbox / "download.wav.part", daemon.inbox / "download.wav")
    wait_until(lambda: any(Path(i["source_path"]).name == "download.wav" and i["state"] == "active"
                           or "download.wav" in str(daemon.cli("show", str(i["id"]), "--json")["duplicates"])
                           for i in daemon.files()), 30, message="the renamed download")
    assert not daemon.exited()


def test_retry_of_a_rejected_file_after_it_is_fixed(tmp_path: Path, daemon: DaemonProcess) -> None:
    daemon.start()
    media.make_not_audio(daemon.inbox / "fixme.wav")
    items = daemon.wait_for_states({"rejected": 1})
    assert daemon.cli("retry", str(items[0]["id"])).stdout.startswith(f"recording {items[0]['id']} queued")
    # Not fixed: rejected again, with the same reason.
    recording_id = str(items[0]["id"])
    items = daemon.wait_for_states(lambda xs: xs[0]["state"] == "rejected" and
                                   len(daemon.cli("show", recording_id, "--json")["history"]) >= 5)
    assert "not a readable audio file" in items[0]["error"]
    moves = [event["to"] for event in daemon.cli("show", recording_id, "--json")["history"]]
    assert moves.count("rejected") == 2, moves  # once, and once more after the retry
    missing = str(items[0]["id"] + 1)
    refused = daemon.cli("retry", missing, check=False)
    assert refused.returncode == 1 and f"no recording with id {missing}" in refused.stderr
