"""The real watchdog observer on real folders: which hints reach intake."""

from __future__ import annotations

import os
import queue
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.pipeline import watcher as watcher_module
from daemon.pipeline.watcher import Hint, Watcher, filesystem_type


@pytest.fixture
def watching(tmp_path: Path, settings: Settings) -> Iterator[tuple[Path, queue.Queue[Hint]]]:
    (tmp_path / "inbox").mkdir()
    hints: queue.Queue[Hint] = queue.Queue()
    watcher = Watcher(settings, hints)
    watcher.start()
    yield tmp_path / "inbox", hints
    watcher.stop()


def wait_for(hints: queue.Queue[Hint], matches: Callable[[Hint], bool], timeout: float = 5.0) -> Hint:
    while True:
        hint = hints.get(timeout=timeout)
        if matches(hint):
            return hint


def test_close_after_write_is_reported(watching: tuple[Path, queue.Queue[Hint]]) -> None:
    inbox, hints = watching
    (inbox / "memo.wav").write_bytes(b"RIFF")
    hint = wait_for(hints, lambda h: h.closed)
    assert hint.path == inbox / "memo.wav"


def test_rename_from_a_partial_name_reports_the_final_name(watching: tuple[Path, queue.Queue[Hint]]) -> None:
    inbox, hints = watching
    (inbox / "talk.wav.part").write_bytes(b"RIFF")
    os.rename(inbox / "talk.wav.part", inbox / "talk.wav")
    hint = wait_for(hints, lambda h: h.path.name == "talk.wav")
    assert not hint.closed


def test_a_folder_moved_in_asks_for_a_rescan(tmp_path: Path, watching: tuple[Path, queue.Queue[Hint]]) -> None:
    inbox, hints = watching
    outside = tmp_path / "album"
    outside.mkdir()
    (outside / "one.mp3").write_bytes(b"x")
    os.rename(outside, inbox / "album")
    hint = wait_for(hints, lambda h: h.rescan)
    assert hint.path == inbox / "album"


def test_filesystem_type_takes_the_longest_mount_point_holding_the_path() -> None:
    root = filesystem_type(Path("/"))
    assert root  # "/" is always mounted
    assert filesystem_type(Path("/proc/self/status")) == "proc"  # under both "/" and "/proc": the longer wins
    assert filesystem_type(Path("/procfake/x")) == root  # "/proc" is a prefix of the string, not of the path


def test_a_network_share_mounted_over_a_drop_folder_is_polled_from_then_on(
        tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    mounted = {"kind": "ext4"}
    monkeypatch.setattr(watcher_module, "filesystem_type", lambda path: mounted["kind"])
    hints: queue.Queue[Hint] = queue.Queue()
    watcher = Watcher(settings, hints)
    watcher.start()
    try:
        assert watcher.polled == {inbox: False}
        (inbox / "local.wav").write_bytes(b"RIFF")
        assert wait_for(hints, lambda h: h.closed).path == inbox / "local.wav"  # inotify's close-after-write

        mounted["kind"] = "nfs4"  # a share mounted over the folder: inotify would see nothing written there
        watcher.check()
        assert watcher.polled == {inbox: True}
        assert wait_for(hints, lambda h: h.rescan).path == inbox
        (inbox / "from the share.wav").write_bytes(b"RIFF")
        assert wait_for(hints, lambda h: h.path.name == "from the share.wav").created  # still watched, now...
        assert watcher.observers[True].is_alive()  # ...by the polling observer
    finally:
        watcher.stop()


def test_a_folder_that_disappears_is_reported_and_watched_again_when_it_returns(
        tmp_path: Path, watching: tuple[Path, queue.Queue[Hint]], settings: Settings) -> None:
    inbox, hints = watching
    # The fixture's watcher is a different object; drive a second one to observe check() directly.
    second_hints: queue.Queue[Hint] = queue.Queue()
    watcher = Watcher(settings, second_hints)
    watcher.start()
    try:
        assert watcher.check() == {}
        shutil.rmtree(inbox)
        assert list(watcher.check()) == [inbox]
        inbox.mkdir()
        assert watcher.check() == {}
        assert wait_for(second_hints, lambda h: h.rescan).path == inbox
        (inbox / "after.wav").write_bytes(b"RIFF")
        assert wait_for(second_hints, lambda h: h.closed).path == inbox / "after.wav"
    finally:
        watcher.stop()


def test_a_missing_configured_folder_is_not_created(tmp_path: Path, settings: Settings) -> None:
    watcher = Watcher(settings, queue.Queue())
    watcher.start()
    try:
        assert list(watcher.check()) == [tmp_path / "inbox"]
        assert not (tmp_path / "inbox").exists()
    finally:
        watcher.stop()


def test_a_dead_observer_is_replaced(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "inbox").mkdir()
    hints: queue.Queue[Hint] = queue.Queue()
    watcher = Watcher(settings, hints)
    watcher.start()
    try:
        native = watcher.observers[False]
        native.stop()
        native.join(5)
        assert not watcher.alive()
        watcher.check()
        assert watcher.alive() and watcher.observers[False] is not native
        (tmp_path / "inbox" / "x.wav").write_bytes(b"RIFF")
        assert wait_for(hints, lambda h: h.closed).path.name == "x.wav"
    finally:
        watcher.stop()


def test_polled_folders_see_new_files_without_inotify(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = make_settings(watch=[{"path": str(inbox), "poll": True}])
    hints: queue.Queue[Hint] = queue.Queue()
    watcher = Watcher(settings, hints)
    watcher.start()
    try:
        (inbox / "share.wav").write_bytes(b"RIFF")
        hint = wait_for(hints, lambda h: h.path.name == "share.wav")
        assert not hint.closed  # polling never sees a close: the settle period decides
    finally:
        watcher.stop()
