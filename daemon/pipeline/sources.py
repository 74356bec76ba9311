"""What becomes of a source file once its recording is done: kept (the default), moved to a folder, or deleted, as
its drop folder says (the [[watch]] table's source_action, source_when and move_to, or the folder's profile).

Engine work (`SourceKind`), run only by the node that owns the folder. A recording is due once its folder's moment
has come: `converted` (its compact copy is stored) or `prompts_done` (every prompt over it has a stored answer; a
failed one keeps the source). It is crash-safe: the intent (and, for a move, the destination) is committed first,
then the file is acted on, then the outcome is committed; a restart finishes an intent by looking for the file at
its old and its new place. Only the very file that was taken is touched (same device, inode, size and mtime as
recorded): a file changed or replaced since is left alone, with a warning in the recording's history. A move never
overwrites (a taken name gets a numbered suffix). Must not import google.genai.

    NULL --(folder keeps sources)--> keep
    NULL --(intent committed)--> move | delete --(file acted on, outcome committed)--> moved | deleted | kept
"""

from __future__ import annotations

import ctypes
import enum
import errno
import hashlib
import logging
import os
import shutil
import stat
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, false, func, or_, select, update
from sqlalchemy.orm import Session

from daemon import profiles
from daemon.config import Settings, inside_folder
from daemon.context import Context, ContextKind
from daemon.engine import Claim, SweepKind
from daemon.errors import SourceChanged
from daemon.pipeline import lifecycle
from db.models import AudioCopy, Prompt, PromptRecording, Recording
from db.session import rowcount, session_scope
from db.states import PromptState as P
from db.states import RecordingState as S

log = logging.getLogger(__name__)


class Step(enum.StrEnum):
    """`Recording.source_action`: what was decided for the source file, and what became of it."""

    KEEP = "keep"
    """The folder keeps its sources: nothing is done (the default)."""
    MOVE = "move"
    """Intent, committed before the file is touched: it is being moved to `source_moved_to`."""
    DELETE = "delete"
    """Intent, committed before the file is touched: it is being deleted."""
    MOVED = "moved"
    """Done: the file is at `source_moved_to`."""
    DELETED = "deleted"
    """Done: the file is gone."""
    KEPT = "kept"
    """An intent given up: the file changed, was replaced or vanished, or could not be moved; it was left alone."""


INTENTS = (Step.MOVE, Step.DELETE)
# A recording's compact copy is stored and no upload holds it: its source may be acted on (uploading and processing
# recordings wait for the upload to end, so the two kinds of work never contend for one row).
SETTLED = (S.CONVERTED, S.ACTIVE, S.EXPIRED)
CLASH_ATTEMPTS = 5
MOVE_TEMPORARY = ".audiodrop-move-{id}"  # hidden: intake never takes it
DELETE_TEMPORARY = ".audiodrop-delete-{id}"
HASH_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class Taken:
    """What the daemon took, as recorded: the only file it may act on, and what was decided for it."""

    recording_id: int
    path: Path
    watch_root: str | None
    size: int
    mtime_ns: int
    dev: int | None
    ino: int | None
    sha256: str | None
    converted_path: str | None
    converted_sha256: str | None
    step: str | None
    moved_to: str | None


@dataclass(frozen=True)
class Outcome:
    step: Step
    reason: str
    moved_to: Path | None = None


@dataclass(frozen=True)
class Plan:
    """Which drop folders act on their sources, and when (from the settings and profiles in force now)."""

    on_converted: tuple[str, ...]
    on_answers: tuple[str, ...]

    @property
    def acting(self) -> tuple[str, ...]:
        return self.on_converted + self.on_answers


def plan(settings: Settings) -> Plan:
    converted: list[str] = []
    answers: list[str] = []
    for watch in settings.watches:
        rules = profiles.rules_for(settings, watch)
        if rules.source_action == "keep":
            continue
        # A folder that runs no prompts has nothing to wait for.
        (answers if rules.source_when == "prompts_done" and rules.prompts else converted).append(str(watch.path))
    return Plan(tuple(converted), tuple(answers))


def _answered() -> ColumnElement[bool]:
    """Every prompt over the recording has a stored answer, and there is at least one."""
    linked = select(PromptRecording.prompt_id).where(PromptRecording.recording_id == Recording.id) \
        .correlate(Recording).scalar_subquery()
    return and_(exists().where(Prompt.id.in_(linked), Prompt.state == P.DONE),
                ~exists().where(Prompt.id.in_(linked), Prompt.state != P.DONE))


def due(settings_plan: Plan) -> ColumnElement[bool]:
    """Recordings whose source is to be acted on now: an intent not yet finished (whatever the folder says now:
    a half-done move is always finished), or a fresh one whose folder's moment has come."""
    fresh = Recording.source_action.is_(None) & Recording.state.in_(SETTLED)
    moments: list[ColumnElement[bool]] = []
    if settings_plan.on_converted:
        moments.append(Recording.watch_root.in_(settings_plan.on_converted))
    if settings_plan.on_answers:
        moments.append(Recording.watch_root.in_(settings_plan.on_answers) & _answered())
    return Recording.source_action.in_(INTENTS) | (fresh & or_(false(), *moments))


class SourceKind(ContextKind):
    """Engine work: a due recording's source file is kept, moved or deleted."""

    name = "source"


    def _mine(self) -> ColumnElement[bool]:
        return lifecycle.on_node(self.ctx.node, fleet=self.ctx.fleet)

    def claim(self, session: Session, now: datetime, limit: int) -> list[Claim]:
        query = (select(Recording.id, Recording.state)
                 .where(self._mine(), lifecycle.is_free(now), due(plan(self.ctx.settings)))
                 .order_by(Recording.id).limit(limit).with_for_update(skip_locked=True))
        claims = []
        for recording_id, state in session.execute(query).all():
            token = lifecycle.claim(session, recording_id, expected=state, now=now, holder=self.ctx.holder,
                                    until=self.lease(now))
            if token is not None:
                claims.append(Claim(self.name, Recording, recording_id, token))
        return claims

    def next_due(self, session: Session, now: datetime) -> datetime | None:
        return None  # finished conversions and answers wake it (see `sweep_kind`)

    def run(self, claim: Claim) -> None:
        try:
            handle(self.ctx, claim.key, claim.token)
        except Exception:
            # The claim is kept: it lapses after service.lease_seconds and the work is tried again then.
            log.exception("recording %s: unexpected error while acting on its source file", claim.key)
        finally:
            self.ctx.wake("upload", "convert")  # a row this held may be what they wait for

    def mark_kept(self, session: Session, now: datetime) -> int:
        """Recordings of folders that keep their sources are decided at once ("keep", no history row), so a folder
        given "move" or "delete" later acts on what arrives from then on, never on its past. Returns how many
        recordings are due for this kind now (the engine's sweep wakes it when there are)."""
        current = plan(self.ctx.settings)
        session.execute(update(Recording).where(
            Recording.source_action.is_(None), Recording.state.in_(SETTLED), self._mine(), lifecycle.is_free(now),
            or_(Recording.watch_root.is_(None), Recording.watch_root.not_in(current.acting)))
            .values(source_action=Step.KEEP.value, source_done_at=now).execution_options(synchronize_session=False))
        return session.scalar(select(func.count()).select_from(Recording)
                              .where(self._mine(), lifecycle.is_free(now), due(current))) or 0

    def sweep_kind(self) -> SweepKind:
        """Looks after every finished piece of work (as the other sweeps do) whether a source became due, since a
        conversion or an answer is what makes one due."""
        return SweepKind("sources", self.mark_kept, lambda _session, _now: None, lambda: self.ctx.wake(self.name))


# -- one recording --------------------------------------------------------------------------------------------


def handle(ctx: Context, recording_id: int, token: int) -> None:
    """Decide and record the intent (if not yet done), act on the file, record the outcome; each write fenced by
    the claim's token."""
    taken = _read(ctx, recording_id, token)
    if taken is None:
        return
    if taken.step is None:
        taken = _begin(ctx, taken, token)
        if taken is None:
            return
    if taken.step == Step.MOVE:
        outcome = _move(ctx, taken, token)
    elif taken.step == Step.DELETE:
        outcome = _delete(taken)
    else:
        return
    if outcome is not None:
        _finish(ctx, taken, token, outcome)


def _read(ctx: Context, recording_id: int, token: int) -> Taken | None:
    with session_scope(ctx.sessions) as session:
        r = session.get(Recording, recording_id)
        if r is None or r.claim_token != token:
            return None
        return Taken(r.id, Path(r.source_path), r.watch_root, r.source_size, r.source_mtime_ns, r.source_dev,
                     r.source_ino, r.sha256, r.converted_path, r.converted_sha256, r.source_action, r.source_moved_to)


def _begin(ctx: Context, taken: Taken, token: int) -> Taken | None:
    """What the folder wants done, recorded before anything is touched. None when there is nothing more to do."""
    rules = profiles.rules_for(ctx.settings, taken.watch_root)
    if rules.source_action == "keep":
        _finish(ctx, taken, token, Outcome(Step.KEEP, ""))
        return None
    problem = _unsafe(ctx, taken)
    destination: Path | None = None
    if problem is None and rules.source_action == "move":
        if rules.move_to is None:
            problem = "the folder moves sources but names no move_to"
        else:
            destination = _free_name(rules.move_to / _relative(taken))
            problem = _not_outside(ctx.settings, destination)
    if problem is not None:
        _finish(ctx, taken, token, Outcome(Step.KEPT, f"source: {taken.path} is kept: {problem}"))
        return None
    step = Step.MOVE if destination is not None else Step.DELETE
    what = f"moving {taken.path} to {destination}" if destination else f"deleting {taken.path}"
    if not _record(ctx, taken, token, expected=None, reason=f"source: {what} (the folder's source_action)",
                   source_action=step.value, source_moved_to=str(destination) if destination else None):
        return None
    return replace(taken, step=step.value, moved_to=str(destination) if destination else None)


def _unsafe(ctx: Context, taken: Taken) -> str | None:
    """Why the source must not be touched at all, if it must not."""
    if taken.dev is None or taken.ino is None:
        return "no identity of the file was recorded when it was taken, so it cannot be told from another"
    if taken.converted_path and os.path.isfile(taken.converted_path):
        return None
    if ctx.fleet and taken.converted_sha256:
        with session_scope(ctx.sessions) as session:
            if session.scalar(select(AudioCopy.piece).where(AudioCopy.sha256 == taken.converted_sha256).limit(1)) \
                    is not None:
                return None
    return "no compact copy of it is stored"


def _not_outside(settings: Settings, destination: Path) -> str | None:
    clash = inside_folder(destination, [Path(os.path.abspath(w.path)) for w in settings.watches])
    if clash is not None:
        return f"{destination} is inside the drop folder {clash}, where it would be taken again"
    return None


def _relative(taken: Taken) -> Path:
    """The file's place in its drop folder, kept under move_to (subfolders included)."""
    if taken.watch_root:
        try:
            return taken.path.relative_to(taken.watch_root)
        except ValueError:
            pass
    return Path(taken.path.name)


def _free_name(destination: Path) -> Path:
    """`destination`, or the first of NAME.2.EXT, NAME.3.EXT ... that nothing holds yet."""
    if not os.path.lexists(destination):
        return destination
    stem, suffix = (destination.stem, destination.suffix) if destination.stem else (destination.name, "")
    number = 2
    while os.path.lexists(candidate := destination.with_name(f"{stem}.{number}{suffix}")):
        number += 1
    return candidate


def _record(ctx: Context, taken: Taken, token: int, *, expected: str | None, reason: str, **values: Any) -> bool:
    """Write the intent (compare-and-set on the recorded step and the claim's token) with its history row."""
    now = ctx.now()
    step = Recording.source_action.is_(None) if expected is None else Recording.source_action == expected
    with session_scope(ctx.sessions) as session:
        result = session.execute(update(Recording).where(Recording.id == taken.recording_id,
                                                         Recording.claim_token == token, step)
                                 .values(**values).execution_options(synchronize_session=False))
        if not rowcount(result):
            return False
        lifecycle.note(session, taken.recording_id, now=now, reason=reason)
    log.info("recording %d: %s", taken.recording_id, reason)
    return True


def _finish(ctx: Context, taken: Taken, token: int, outcome: Outcome) -> None:
    now = ctx.now()
    changes: dict[str, Any] = {"source_action": outcome.step.value, "source_done_at": now}
    if outcome.moved_to is not None:
        changes["source_moved_to"] = str(outcome.moved_to)
    with session_scope(ctx.sessions) as session:
        if not lifecycle.update_claimed(session, taken.recording_id, token, release=True, **changes):
            return
        if outcome.reason:
            lifecycle.note(session, taken.recording_id, now=now, reason=outcome.reason)
    if outcome.step == Step.KEPT:
        log.warning("recording %d: %s", taken.recording_id, outcome.reason)
    elif outcome.reason:
        log.info("recording %d: %s", taken.recording_id, outcome.reason)


# -- acting on the file ---------------------------------------------------------------------------------------


def _move(ctx: Context, taken: Taken, token: int) -> Outcome | None:
    """Move the file to the recorded destination, or find that it already went there (a restart after a crash).
    None when the claim was lost meanwhile."""
    source, destination = taken.path, Path(taken.moved_to or "")
    for _ in range(CLASH_ATTEMPTS):
        here = _identical(source, taken)
        if _ours_at(destination, taken):
            if here:  # copied across file systems, and the original not yet removed when the daemon stopped
                try:
                    _remove(source, taken)
                except (OSError, SourceChanged) as err:
                    return Outcome(Step.KEPT, f"source: copied {source} to {destination}, but the original could "
                                              f"not be removed ({_why(err)}); both are kept", destination)
            return Outcome(Step.MOVED, f"source: moved {source} to {destination}", destination)
        if not here:
            return Outcome(Step.KEPT, f"source: {source} {_what_changed(source, taken)}; left alone, not moved")
        if os.path.lexists(destination):  # something else took the name since the intent was recorded
            chosen = _free_name(destination)
            if not _record(ctx, taken, token, expected=Step.MOVE.value, source_moved_to=str(chosen),
                           reason=f"source: {destination} is taken; moving {source} to {chosen} instead"):
                return None
            destination = chosen
            continue
        problem = _not_outside(ctx.settings, destination)
        if problem is not None:
            return Outcome(Step.KEPT, f"source: {source} is kept: {problem}")
        try:
            destination.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            _transfer(source, destination, taken)
        except FileExistsError:
            continue  # taken at the last moment: the loop picks another name
        except SourceChanged as err:
            return Outcome(Step.KEPT, f"source: {source} {err}; left alone, not moved")
        except OSError as err:
            return Outcome(Step.KEPT, f"source: {source} could not be moved to {destination.parent} ({_why(err)}); "
                                      "the source is kept where it is")
        return Outcome(Step.MOVED, f"source: moved {source} to {destination}", destination)
    return Outcome(Step.KEPT, f"source: no free name for {source} in {destination.parent}; the source is kept")


def _delete(taken: Taken) -> Outcome:
    source = taken.path
    try:
        if _remove(source, taken):
            return Outcome(Step.DELETED, f"source: deleted {source}")
    except SourceChanged as err:
        return Outcome(Step.KEPT, f"source: {source} {err}; left alone, not deleted")
    except OSError as err:
        return Outcome(Step.KEPT, f"source: {source} could not be deleted ({_why(err)}); the source is kept")
    if not os.path.lexists(source):
        return Outcome(Step.DELETED, f"source: {source} was already gone")
    return Outcome(Step.KEPT, f"source: {source} {_what_changed(source, taken)}; left alone, not deleted")


def _transfer(source: Path, destination: Path, taken: Taken) -> None:
    """Rename within a file system (never over an existing name); across file systems, copy then remove."""
    try:
        rename_noreplace(source, destination)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        _copy_across(source, destination, taken)
        _remove(source, taken)
        return
    if not _same_inode(destination, taken):
        # Another file took the name in the instant between the check and the rename: it goes back untouched.
        try:
            rename_noreplace(destination, source)
        except OSError:
            log.error("%s: a file that is not recording %d's was moved here from %s by mistake and could not be "
                      "put back", destination, taken.recording_id, source)
        raise SourceChanged("was replaced at the moment it was to be moved")


def _copy_across(source: Path, destination: Path, taken: Taken) -> None:
    """A copy under a hidden temporary name in the destination folder, synced, with the original's mtime and
    mode, then renamed into place (never over an existing name)."""
    temporary = destination.parent / MOVE_TEMPORARY.format(id=taken.recording_id)
    temporary.unlink(missing_ok=True)
    descriptor = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not _matches(os.fstat(descriptor), taken):
            raise SourceChanged("changed since it was taken")
        with open(descriptor, "rb", closefd=False) as stream, open(temporary, "xb") as copy:
            shutil.copyfileobj(stream, copy, HASH_BLOCK)
            copy.flush()
            os.fsync(copy.fileno())
        info = os.fstat(descriptor)
        if not _matches(info, taken):
            temporary.unlink(missing_ok=True)
            raise SourceChanged("changed while it was copied")
        os.chmod(temporary, stat.S_IMODE(info.st_mode))
        os.utime(temporary, ns=(info.st_atime_ns, info.st_mtime_ns))
    finally:
        os.close(descriptor)
    try:
        rename_noreplace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_folder(destination.parent)


def _remove(source: Path, taken: Taken) -> bool:
    """Delete the taken file: renamed first to a hidden name beside it (so what is deleted is checked to be the
    very file taken, and a restart after a crash finds it there), then unlinked. False when it is not there."""
    trash = source.parent / DELETE_TEMPORARY.format(id=taken.recording_id)
    if not _identical(trash, taken):
        if not _identical(source, taken):
            return False
        rename_noreplace(source, trash)
        if not _identical(trash, taken):
            rename_noreplace(trash, source)
            raise SourceChanged("was replaced at the moment it was to be deleted")
    trash.unlink()
    _sync_folder(source.parent)
    return True


def _matches(info: os.stat_result, taken: Taken) -> bool:
    return stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns) == (
        taken.dev, taken.ino, taken.size, taken.mtime_ns)


def _identical(path: Path, taken: Taken) -> bool:
    """The file at `path` is exactly the one taken: same device, inode, size and mtime; never a symlink."""
    try:
        return _matches(os.lstat(path), taken)
    except OSError:
        return False


def _same_inode(path: Path, taken: Taken) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (taken.dev, taken.ino)


def _ours_at(destination: Path, taken: Taken) -> bool:
    """The taken file is at `destination`: moved there (same inode), or copied there across file systems (same
    size, mtime and content)."""
    if _identical(destination, taken):
        return True
    try:
        info = os.lstat(destination)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or (info.st_size, info.st_mtime_ns) != (taken.size, taken.mtime_ns) \
            or not taken.sha256:
        return False
    digest = hashlib.sha256()
    try:
        with open(destination, "rb") as stream:
            while block := stream.read(HASH_BLOCK):
                digest.update(block)
    except OSError:
        return False
    return digest.hexdigest() == taken.sha256


def _what_changed(path: Path, taken: Taken) -> str:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "is gone (removed or moved by someone else)"
    except OSError as err:
        return f"cannot be looked at ({_why(err)})"
    if not stat.S_ISREG(info.st_mode):
        return "was replaced by something that is not a regular file"
    if (info.st_dev, info.st_ino) != (taken.dev, taken.ino):
        return "was replaced by another file of the same name since it was taken"
    return "changed since it was taken"


def _why(err: BaseException) -> str:
    return (err.strerror or str(err)) if isinstance(err, OSError) else str(err)


def _sync_folder(folder: Path) -> None:
    """Make a rename or an unlink in `folder` durable."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def rename_noreplace(source: Path, destination: Path) -> None:
    """Rename atomically, never over an existing name (FileExistsError). Linux's renameat2(RENAME_NOREPLACE);
    where a file system lacks it, a hard link then an unlink; where it lacks those too, a check then a rename."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code), str(source), None, str(destination))
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError as err:
        if err.errno not in _UNSUPPORTED | {errno.EMLINK}:
            raise
    else:
        os.unlink(source)
        return
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination))
    os.rename(source, destination)
