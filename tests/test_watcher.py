"""The real watchdog observer on real folders: which hints reach intake."""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.watcher import Hint, Watcher, filesystem_type


@pytest.fixture
def watching(tmp_path: Path, settings: Settings) -> Iterator[tuple[Path, queue.Queue[Hint]]]:
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


def test_local_folders_are_not_network_mounts(tmp_path: Path) -> None:
    assert filesystem_type(tmp_path) not in {"nfs", "cifs", ""}
