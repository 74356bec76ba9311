"""Intake: which files in a drop folder are candidates, when a file is completely written, and the reconcile
scan that finds whatever arrived while the daemon was down or whose event was missed.

Watcher events are only hints; this module decides. A file becomes a `discovered` recording when first seen
and is claimed for conversion (discovered -> converting) once it is settled: quiet for `close_quiet_seconds`
after a close-after-write event, or for `settle_seconds` without one (files renamed or moved in, polled
mounts), and no process holds it open for writing.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from daemon import lifecycle
from daemon.config import IntakeSettings, Settings, Watch
from daemon.lifecycle import RecordingState
from db.models import Recording, SourceAlias

log = logging.getLogger(__name__)

# Names that writers use while a file is incomplete; taken only once renamed to their final name.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".opdownload", ".!qb", ".swp")
PARTIAL_PREFIXES = ("~$", ".")


@dataclass(frozen=True)
class Candidate:
    """A regular file in a drop folder that passes every filter."""

    path: Path
    watch: Watch
    size: int
    mtime_ns: int


def is_ignored_name(name: str) -> bool:
    """Hidden files, partial downloads and temporary names (including the daemon's own temp files)."""
    lowered = name.lower()
    return lowered.startswith(PARTIAL_PREFIXES) or lowered.endswith(PARTIAL_SUFFIXES)


def matches_patterns(relative: str, watch: Watch) -> bool:
    name = os.path.basename(relative)
    included = any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) for p in watch.include)
    excluded = any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) for p in watch.exclude)
    return included and not excluded


def is_settled(*, closed_after_write: bool, last_change_at: datetime, now: datetime, intake: IntakeSettings) -> bool:
    quiet = (now - last_change_at).total_seconds()
    return quiet >= (intake.close_quiet_seconds if closed_after_write else intake.settle_seconds)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def watch_for(path: Path, settings: Settings) -> Watch | None:
    """The watch whose folder holds `path` (the deepest one), or None when the path is not ours to take."""
    path = Path(os.path.abspath(path))
    best: Watch | None = None
    for watch in settings.watches:
        root = Path(os.path.abspath(watch.path))
        if not _inside(path, root) or path == root:
            continue
        relative = path.relative_to(root)
        if not watch.recursive and len(relative.parts) > 1:
            continue
        if best is None or len(str(root)) > len(str(best.path)):
            best = watch
    return best


def candidate(path: Path, settings: Settings) -> Candidate | None:
    """`path` as a candidate recording, or None if it is filtered out (logging why when it matters)."""
    path = Path(os.path.abspath(path))
    watch = watch_for(path, settings)
    if watch is None:
        return None
    root = Path(os.path.abspath(watch.path))
    relative = path.relative_to(root)
    if any(is_ignored_name(part) for part in relative.parts):
        return None
    if not matches_patterns(relative.as_posix(), watch):
        return None
    # Never take the daemon's own output, even when state_dir or results_dir lies inside a drop folder.
    if any(_inside(path, excluded) or _inside(path.resolve(), excluded) for excluded in settings.excluded_dirs()):
        return None
    try:
        if path.is_symlink():
            target = path.resolve()
            if not _inside(target, root.resolve()):
                log.warning("%s: symlink to %s, outside the drop folder %s; not followed", path, target, root)
                return None
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return Candidate(path=path, watch=watch, size=info.st_size, mtime_ns=info.st_mtime_ns)


def is_known(session: Session, found: Candidate) -> bool:
    """Whether this exact file (path, size, mtime) was already taken as a recording or as a duplicate."""
    key = (str(found.path), found.size, found.mtime_ns)
    recording = session.scalar(
        select(Recording.id).where(Recording.source_path == key[0], Recording.source_size == key[1],
                                   Recording.source_mtime_ns == key[2]).limit(1)
    )
    if recording is not None:
        return True
    alias = session.scalar(
        select(SourceAlias.id).where(SourceAlias.path == key[0], SourceAlias.size == key[1],
                                     SourceAlias.mtime_ns == key[2]).limit(1)
    )
    return alias is not None


def observe(session: Session, found: Candidate, *, closed: bool, now: datetime) -> None:
    """Record a sighting of a candidate file: a new recording, or a change to one still being written."""
    pending = session.scalar(
        select(Recording).where(Recording.source_path == str(found.path),
                                Recording.state == RecordingState.DISCOVERED.value).limit(1)
    )
    if pending is None:
        if not is_known(session, found):
            lifecycle.discover(session, path=str(found.path), size=found.size, mtime_ns=found.mtime_ns,
                               watch_root=str(found.watch.path), closed_after_write=closed, now=now)
            log.info("%s: found, waiting for it to be complete", found.path)
        return
    changed = (pending.source_size, pending.source_mtime_ns) != (found.size, found.mtime_ns)
    if changed:
        # Still being written: start the quiet period again; a close event counts only after the last change.
        values = dict(source_size=found.size, source_mtime_ns=found.mtime_ns, last_change_at=now,
                      closed_after_write=closed)
    elif closed and not pending.closed_after_write:
        values = dict(closed_after_write=True)
    else:
        return
    session.execute(update(Recording).where(Recording.id == pending.id).values(**values)
                    .execution_options(synchronize_session=False))


def scan(settings: Settings) -> list[Candidate]:
    """Every candidate file under every watch folder (the reconcile scan's view of the truth)."""
    found: list[Candidate] = []
    for watch in settings.watches:
        found.extend(scan_folder(Path(os.path.abspath(watch.path)), settings))
    return found


def scan_folder(folder: Path, settings: Settings) -> list[Candidate]:
    """Every candidate file under `folder` (a watch folder or a folder inside one)."""
    found: list[Candidate] = []
    excluded = settings.excluded_dirs()
    if not folder.is_dir():
        return found
    for directory, subdirs, files in os.walk(folder, followlinks=False):
        here = Path(directory)
        subdirs[:] = [d for d in subdirs if not is_ignored_name(d) and (here / d).resolve() not in excluded]
        for name in files:
            item = candidate(here / name, settings)
            if item is not None:
                found.append(item)
    return found


def open_for_writing(path: Path) -> bool:
    """Whether any process we can see holds `path` open for writing (a recorder that pauses between writes)."""
    target = str(path)
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return False
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != target:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as info:
                    flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
            except (OSError, StopIteration, ValueError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                return True
    return False
