"""Intake: which files in a drop folder are candidates, when a file is completely written, and the catch-up scan
that finds whatever arrived while the daemon was down or whose event was missed.

Watcher events are only hints; this module decides. A file becomes a `discovered` recording when first seen and
is claimed for conversion once it is settled (daemon.lifecycle.settled): quiet for `close_quiet_seconds` after a
writer closed it (or after it was renamed or moved in while no process held it open for writing), or quiet for
`settle_seconds` without such a sign (polled network folders). A file a process still holds open for writing is
never taken. Every file is handled in its own transaction: one bad name or vanished file fails only itself.
A file renamed or moved within or between drop folders is followed: it stays the same recording.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from daemon import profiles
from daemon.config import IntakeSettings, Settings, Watch
from daemon.pipeline import lifecycle
from db.models import Recording, SourceAlias
from db.session import advisory_lock, is_fleet, session_scope
from db.states import RecordingState as S

log = logging.getLogger(__name__)

# Names that writers use while a file is incomplete; taken only once renamed to their final name.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".opdownload", ".!qb", ".swp")
PARTIAL_PREFIXES = ("~$", ".")
LOOKUP_BATCH = 500
# A file known to be complete is recorded as quiet since this long ago, so it is taken without a quiet period.
COMPLETE_AGO = timedelta(hours=1)


@dataclass(frozen=True)
class Candidate:
    """A regular file in a drop folder that passes every filter."""

    path: Path
    watch: Watch
    size: int
    mtime_ns: int
    dev: int
    ino: int


def is_ignored_name(name: str) -> bool:
    """Hidden files, partial downloads and temporary names (including the daemon's own temp files), and a drop
    folder's profile (.audiodrop.toml, at any depth: it is read as settings, never taken as a recording)."""
    lowered = name.lower()
    return lowered.startswith(PARTIAL_PREFIXES) or lowered.endswith(PARTIAL_SUFFIXES) or lowered == \
        profiles.PROFILE_NAME


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


def storable_name(path: Path | str) -> str | None:
    """None if the path can be stored and shown as text; else why not (a name that is not valid UTF-8)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    return None


def printable(path: Path | str) -> str:
    """The path as text, with bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def candidate(path: Path, settings: Settings) -> Candidate | None:
    """`path` as a candidate recording, or None if it is filtered out (logging why when it matters).

    Every path is resolved against its drop folder's resolved root: a symlink, or a folder replaced by a
    symlink, that leads out of the drop folder is never followed."""
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
    try:
        resolved, real_root = path.resolve(), root.resolve()
        # Never the daemon's own output, even when state_dir or results_dir lies inside a drop folder.
        if any(_inside(path, excluded) or _inside(resolved, excluded) for excluded in settings.excluded_dirs()):
            return None
        if not _inside(resolved, real_root):
            log.warning("%s: symlink to %s, outside the drop folder %s; not followed", printable(path),
                        printable(resolved), root)
            return None
        info = os.stat(path)
    except (OSError, RuntimeError):  # vanished, unreadable, or a symlink loop
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return Candidate(path=path, watch=watch, size=info.st_size, mtime_ns=info.st_mtime_ns, dev=info.st_dev,
                     ino=info.st_ino)


def _mine(settings: Settings) -> ColumnElement[bool]:
    """The recordings of this node's drop folders (in a fleet, the same path on another machine is another file)."""
    return lifecycle.on_node(settings.service.node_name, fleet=is_fleet(settings.database_url))


def _one_at_a_time(session: Session, settings: Settings) -> None:
    """The watcher's thread and the catch-up scan may see one file at once: under PostgreSQL's READ COMMITTED both
    would find no row and both insert one, so a node's sightings are serialized (SQLite writes one at a time)."""
    advisory_lock(session, f"intake:{settings.service.node_name}")


def _known(session: Session, found: Candidate, settings: Settings) -> bool:
    """Whether this exact file (path, size, mtime) was already taken as a recording or as a duplicate."""
    key = (str(found.path), found.size, found.mtime_ns)
    if session.scalar(select(Recording.id).where(Recording.source_path == key[0], Recording.source_size == key[1],
                                                 Recording.source_mtime_ns == key[2], _mine(settings))
                      .limit(1)) is not None:
        return True
    return session.scalar(select(SourceAlias.id).where(SourceAlias.path == key[0], SourceAlias.size == key[1],
                                                       SourceAlias.mtime_ns == key[2]).limit(1)) is not None


def observe(session: Session, found: Candidate, *, closed: bool, now: datetime, settings: Settings,
            complete: bool = False) -> Recording | None:
    """Record a sighting of a candidate file: a new recording, a change to one still being written, or a file
    moved while the daemon was not looking (same filesystem identity, size and mtime: followed).

    `closed`: a writer just closed it. `complete`: it is known complete now (renamed or moved in while no process
    held it open for writing), so it is taken without waiting for the quiet period."""
    _one_at_a_time(session, settings)
    path = str(found.path)
    pending = session.scalar(select(Recording).where(Recording.source_path == path, _mine(settings),
                                                     Recording.state == S.DISCOVERED).limit(1))
    quiet_since = now - COMPLETE_AGO if complete else now
    if pending is None:
        if _known(session, found, settings):
            return None
        moved = _moved_here(session, found, settings)
        if moved is not None:
            lifecycle.follow_move(session, moved.id, path=path, watch_root=str(found.watch.path), size=found.size,
                                  mtime_ns=found.mtime_ns, now=now)
            log.info("%s: recording %d, moved here; following it", path, moved.id)
            return moved
        earlier = session.scalar(select(Recording.id).where(Recording.source_path == path, _mine(settings),
                                                            Recording.state != S.DISCOVERED)
                                 .order_by(Recording.id.desc()).limit(1))
        recording = lifecycle.discover(session, path=path, size=found.size, mtime_ns=found.mtime_ns, dev=found.dev,
                                       ino=found.ino, watch_root=str(found.watch.path),
                                       closed_after_write=closed or complete, now=now, last_change_at=quiet_since,
                                       supersedes_id=earlier, node=settings.service.node_name)
        log.info("%s: found, waiting for it to be complete", path)
        return recording
    changed = (pending.source_size, pending.source_mtime_ns) != (found.size, found.mtime_ns)
    if changed:
        # Still being written: the quiet period starts again; a close counts only after the last change.
        values = {"source_size": found.size, "source_mtime_ns": found.mtime_ns, "source_dev": found.dev,
                      "source_ino": found.ino, "last_change_at": quiet_since, "closed_after_write": closed or complete}
    elif (closed or complete) and not pending.closed_after_write:
        values = {"closed_after_write": True, "last_change_at": quiet_since if complete else pending.last_change_at}
    else:
        return pending
    session.execute(update(Recording).where(Recording.id == pending.id).values(**values)
                    .execution_options(synchronize_session=False))
    return pending


def _moved_here(session: Session, found: Candidate, settings: Settings) -> Recording | None:
    """A recording whose source file is this one under another name: same device, inode, size and mtime, and
    nothing left at the old path."""
    rows = session.scalars(select(Recording).where(Recording.source_dev == found.dev,
                                                   Recording.source_ino == found.ino,
                                                   Recording.source_size == found.size,
                                                   Recording.source_mtime_ns == found.mtime_ns,
                                                   _mine(settings))).all()
    for recording in rows:
        if recording.source_path != str(found.path) and not os.path.lexists(recording.source_path):
            return recording
    return None


def moved(session: Session, source: Path, found: Candidate | None, *, now: datetime, settings: Settings) -> bool:
    """A rename or move event: the recording whose source was `source` now lives at `found` (or, when `found` is
    None, left the drop folders or became a name that is not taken). True if a recording followed the move."""
    _one_at_a_time(session, settings)
    recording = session.scalar(select(Recording).where(Recording.source_path == str(source), _mine(settings))
                               .order_by(Recording.id.desc()).limit(1))
    if recording is None:
        return False
    if found is None:
        if recording.state == S.DISCOVERED and lifecycle.forget(session, recording.id):
            log.info("%s: moved away before it was complete; forgotten", source)
        return False
    if _known(session, found, settings):
        return False
    lifecycle.follow_move(session, recording.id, path=str(found.path), watch_root=str(found.watch.path),
                          size=found.size, mtime_ns=found.mtime_ns, now=now)
    session.execute(update(Recording).where(Recording.id == recording.id)
                    .values(source_dev=found.dev, source_ino=found.ino).execution_options(synchronize_session=False))
    log.info("%s: recording %d moved to %s; following it", source, recording.id, found.path)
    return True


def refuse_name(session: Session, path: Path, watch: Watch, why: str, *, now: datetime, settings: Settings) -> None:
    """A file that cannot be taken as it is named: one rejected recording (shown with an escaped name) that says
    what to do, created once."""
    _one_at_a_time(session, settings)
    shown = printable(path)
    if session.scalar(select(Recording.id).where(Recording.source_path == shown, _mine(settings)).limit(1)) \
            is not None:
        return
    error = f"{os.path.basename(shown)}: {why}, so it cannot be stored or shown safely; rename the file (for example " \
            "with convmv) and it is taken at once"
    lifecycle.discover(session, path=shown, size=0, mtime_ns=0, watch_root=str(watch.path), closed_after_write=False,
                       now=now, state=S.REJECTED, error=error, reason=f"refused {shown}: {why}",
                       node=settings.service.node_name)
    log.warning("%s", error)


def take(sessions: sessionmaker[Session], path: Path, settings: Settings, *, now: datetime, closed: bool = False,
         moved_from: Path | None = None, created: bool = False) -> Recording | None:
    """Handle one path an event named, in its own transaction; errors are logged with the file's name and end
    there. Returns the recording it touched, if any.

    `closed`: a writer closed it. `moved_from`: renamed or moved here within the drop folders. `created`: a new
    name, written here or moved in from elsewhere; with no process holding it open for writing, it was moved in
    (a writer holds a file it creates until it closes it), and counts as closed."""
    try:
        if profiles.is_profile(path) or (moved_from is not None and profiles.is_profile(moved_from)):
            profiles.refresh(settings)  # a folder profile appeared, changed or went: settings, never a recording
            if profiles.is_profile(path):
                return None
        watch = watch_for(path, settings)
        why = storable_name(path)
        if why is not None:
            if watch is not None and not any(is_ignored_name(part) for part in printable(path).split("/")):
                with session_scope(sessions) as session:
                    refuse_name(session, path, watch, why, now=now, settings=settings)
            return None
        found = candidate(path, settings)
        # A file renamed or moved into place with no process holding it open for writing is complete.
        complete = found is not None and not closed and moved_from is not None and not open_for_writing(found.path)
        if found is not None and created and not closed and moved_from is None:
            closed = not open_for_writing(found.path)
        with session_scope(sessions) as session:
            if moved_from is not None and storable_name(moved_from) is None \
                    and moved(session, moved_from, found, now=now, settings=settings):
                return None
            if found is None:
                return None
            return observe(session, found, closed=closed, now=now, complete=complete, settings=settings)
    except OperationalError:
        raise  # the database is down: the caller keeps the hint and tries again
    except Exception:
        log.exception("%s: could not be taken in; it is looked at again at the next scan", printable(path))
        return None


def scan(settings: Settings) -> list[Candidate]:
    """Every candidate file under every watch folder (the catch-up scan's view of the truth)."""
    found: list[Candidate] = []
    for watch in settings.watches:
        found.extend(scan_folder(Path(os.path.abspath(watch.path)), settings))
    return found


def scan_folder(folder: Path, settings: Settings) -> list[Candidate]:
    """Every candidate file under `folder` (a watch folder or a folder inside one), never leaving the resolved
    drop folder through a symlink."""
    watch = watch_for(folder / "x", settings)
    if watch is None or not folder.is_dir():
        return []
    real_root = Path(os.path.abspath(watch.path)).resolve()
    if not _inside(folder.resolve(), real_root):
        log.warning("%s: leads outside the drop folder %s (a symlink); not scanned", folder, watch.path)
        return []
    found: list[Candidate] = []
    excluded = settings.excluded_dirs()
    for directory, subdirs, files in os.walk(folder, followlinks=False):
        here = Path(directory)
        subdirs[:] = [d for d in subdirs if not is_ignored_name(d) and (here / d).resolve() not in excluded]
        for name in files:
            item = candidate(here / name, settings)
            if item is not None:
                found.append(item)
    return found


def unknown(session: Session, found: Iterable[Candidate], settings: Settings) -> Iterator[Candidate]:
    """The candidates that are not exactly (path, size, mtime) a file already taken: what a scan must look at.
    Reads the known files in batches, so a scan costs a few queries however many files the folders hold."""
    batch: list[Candidate] = []
    for item in found:
        batch.append(item)
        if len(batch) >= LOOKUP_BATCH:
            yield from _unknown_batch(session, batch, settings)
            batch = []
    if batch:
        yield from _unknown_batch(session, batch, settings)


def _unknown_batch(session: Session, batch: list[Candidate], settings: Settings) -> Iterator[Candidate]:
    paths = [str(item.path) for item in batch]
    known = set(session.execute(select(Recording.source_path, Recording.source_size, Recording.source_mtime_ns)
                                .where(Recording.source_path.in_(paths), Recording.state != S.DISCOVERED,
                                       _mine(settings))).all())
    known |= set(session.execute(select(SourceAlias.path, SourceAlias.size, SourceAlias.mtime_ns)
                                 .where(SourceAlias.path.in_(paths))).all())
    for item in batch:
        if (str(item.path), item.size, item.mtime_ns) not in known:
            yield item


def scan_and_observe(sessions: sessionmaker[Session], settings: Settings, *, now: datetime,
                     folder: Path | None = None) -> int:
    """The catch-up scan: every file not yet taken is observed, each in its own transaction. A file that has
    not changed for `settle_seconds` and that no process holds open for writing is complete at once (it was
    there while the daemon was down). Returns how many files were observed."""
    if folder is None:
        profiles.refresh(settings)  # a profile whose change no event reported is read again here
    items = scan_folder(folder, settings) if folder is not None else scan(settings)
    unnamed = [item for item in items if storable_name(item.path) is not None]
    for item in unnamed:  # each refused on its own; they never reach a query with the others
        take(sessions, item.path, settings, now=now)
    with session_scope(sessions) as session:
        fresh = list(unknown(session, (item for item in items if storable_name(item.path) is None), settings))
    settle_ns = settings.intake.settle_seconds * 1e9
    for item in fresh:
        old_enough = now.timestamp() * 1e9 - item.mtime_ns >= settle_ns
        try:
            complete = old_enough and not open_for_writing(item.path)
            with session_scope(sessions) as session:
                observe(session, item, closed=False, now=now, complete=complete, settings=settings)
        except OperationalError:
            raise
        except Exception:
            log.exception("%s: could not be taken in; it is looked at again at the next scan", printable(item.path))
    return len(fresh)


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
