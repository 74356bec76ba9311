"""watchdog observers on the drop folders. Events become hints on a queue (a path, and whether a writer just
closed it); intake decides what they mean. Folders on network or FUSE mounts are polled, since inotify
never fires there."""

from __future__ import annotations

import logging
import os
import queue
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from daemon.config import Settings, Watch

log = logging.getLogger(__name__)

NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "sshfs"}


@dataclass(frozen=True)
class Hint:
    """Something may have happened at `path`: `closed` is a close-after-write, `rescan` a whole new folder,
    `moved_from` the old name of a file renamed or moved to `path`, `created` a new name (written here, or moved
    in from outside the drop folders)."""

    path: Path
    closed: bool = False
    rescan: bool = False
    moved_from: Path | None = None
    created: bool = False


class _Handler(FileSystemEventHandler):
    def __init__(self, hints: queue.Queue[Hint | None]) -> None:
        self.hints = hints

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileClosedEvent):
            self.hints.put(Hint(Path(os.fsdecode(event.src_path)), closed=True))
        elif isinstance(event, FileCreatedEvent):
            self.hints.put(Hint(Path(os.fsdecode(event.src_path)), created=True))
        elif isinstance(event, FileModifiedEvent):
            self.hints.put(Hint(Path(os.fsdecode(event.src_path))))
        elif isinstance(event, FileMovedEvent):
            # A rename (x.part -> x.wav) or a move within the drop folders: no close event; intake follows the
            # recording, and takes a renamed file at once when no process holds it open.
            self.hints.put(Hint(Path(os.fsdecode(event.dest_path)), moved_from=Path(os.fsdecode(event.src_path))))
        elif isinstance(event, DirMovedEvent):
            self.hints.put(Hint(Path(os.fsdecode(event.dest_path)), rescan=True))
        elif isinstance(event, DirCreatedEvent):
            # Files written into a new folder before its watch was added produce no events of their own.
            self.hints.put(Hint(Path(os.fsdecode(event.src_path)), rescan=True))


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/self/mounts (longest mount point wins)."""
    best, kind = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount_point = fields[1].replace("\\040", " ")
                if (str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")) \
                        and len(mount_point) > len(best):
                    best, kind = mount_point, fields[2]
    except OSError:
        pass
    return kind


def should_poll(watch: Watch) -> bool:
    if watch.poll is not None:
        return watch.poll
    kind = filesystem_type(Path(os.path.abspath(watch.path)))
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse")


class Watcher:
    """Owns one observer per kind (inotify, polling) and keeps every drop folder watched: a folder that
    disappears (an unmounted share) is reported unavailable and watched again when it comes back, and an
    observer thread that dies is replaced."""

    def __init__(self, settings: Settings, hints: queue.Queue[Hint | None]) -> None:
        self.settings = settings
        self.hints = hints
        self.handler = _Handler(hints)
        self.observers: dict[bool, BaseObserver] = {}
        self.handles: dict[Path, ObservedWatch] = {}
        self.polled: dict[Path, bool] = {}  # how each folder is watched now: polling (True) or inotify
        self.unavailable: dict[Path, str] = {}

    def _observer(self, poll: bool) -> BaseObserver:
        """The observer of a kind, started on first use: an idle daemon with no network folder runs no poller."""
        observer = self.observers.get(poll)
        if observer is None:
            observer = PollingObserver(timeout=self.settings.intake.poll_interval_seconds) if poll else Observer()
            observer.start()
            self.observers[poll] = observer
        return observer

    def start(self) -> None:
        self._observer(False)
        for watch in self.settings.watches:
            self._schedule(watch, announce=False)

    def _schedule(self, watch: Watch, *, announce: bool) -> None:
        path = Path(os.path.abspath(watch.path))
        if not path.is_dir() and self.settings.source is None:
            # Only the default drop folder is created; a configured one that is missing may be an unmounted share.
            path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            if path not in self.unavailable:
                log.warning("%s: drop folder is unavailable (missing or not mounted); watched again once it "
                            "comes back", path)
            self.unavailable[path] = "missing or not mounted"
            return
        poll = should_poll(watch)
        try:
            self.handles[path] = self._observer(poll).schedule(self.handler, str(path), recursive=watch.recursive)
        except OSError as err:
            self.unavailable[path] = str(err)
            log.error("%s: cannot watch (%s). If this says 'inotify watch limit reached', raise it with "
                      "`sudo sysctl fs.inotify.max_user_watches=524288`; the folder is still scanned every %.0f s",
                      path, err, self.settings.intake.scan_interval_seconds)
            return
        self.polled[path] = poll
        if self.unavailable.pop(path, None) is not None or announce:
            self.hints.put(Hint(path, rescan=True))
        log.info("watching %s (%s%s)", path, "polling" if poll else "inotify", ", recursive" if watch.recursive else "")

    def _unschedule(self, path: Path) -> None:
        handle = self.handles.pop(path, None)
        if handle is None:
            return
        for observer in self.observers.values():
            try:
                observer.unschedule(handle)
            except (KeyError, ValueError, OSError):
                pass

    def check(self) -> dict[Path, str]:
        """Re-watch folders that came back, drop ones that vanished, replace dead observers, and switch a folder
        to polling when a network share was mounted over it after it was first watched (inotify cannot see there).
        Returns the unavailable folders and why."""
        if not self.alive():
            log.error("a file-system observer stopped; starting new ones")
            self.stop()
            self.handles.clear()
            self.observers.clear()
            self.start()
            for path in list(self.handles):
                self.hints.put(Hint(path, rescan=True))
        for watch in self.settings.watches:
            path = Path(os.path.abspath(watch.path))
            handle = self.handles.get(path)
            if handle is not None and not path.is_dir():
                log.warning("%s: drop folder disappeared; watched again once it comes back", path)
                self._unschedule(path)
                self.unavailable[path] = "missing or not mounted"
            elif handle is not None and should_poll(watch) != self.polled.get(path):
                log.warning("%s: its filesystem changed (now %s); watching it by %s", path,
                            filesystem_type(path) or "unknown", "polling" if should_poll(watch) else "inotify")
                self._unschedule(path)
                self._schedule(watch, announce=True)
            elif handle is None:
                self._schedule(watch, announce=True)
        return dict(self.unavailable)

    def stop(self) -> None:
        for observer in self.observers.values():
            observer.stop()
        for observer in self.observers.values():
            if observer.is_alive():
                observer.join(timeout=5)

    def alive(self) -> bool:
        return all(observer.is_alive() for observer in self.observers.values())
