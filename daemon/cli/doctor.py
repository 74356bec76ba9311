"""`audiodrop doctor`: can the daemon run here? Each check is a small function that returns a Check, and every
problem says what to do about it. Checks only look: nothing is created, migrated or uploaded (a file created and
removed at once tests that state_dir and results_dir are writable). The API key never appears in a result.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Settings, Watch, find_api_key
from daemon.errors import AuthError, DaemonError, OfflineError, TransientError
from daemon.pipeline.transcode import FORMATS
from daemon.pipeline.watcher import NETWORK_FILESYSTEMS, filesystem_type, should_poll

OK, WARNING, FAIL = "ok", "warning", "fail"
LOW_DISK_BYTES = 1_000_000_000
TOOL_TIMEOUT_SECONDS = 10.0
API_TIMEOUT_SECONDS = 10.0
WALK_BUDGET_SECONDS = 1.0  # counting folders for inotify stops here and says "at least"
INOTIFY = Path("/proc/sys/fs/inotify")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warning | fail
    detail: str
    hint: str | None = None


def run_checks(settings: Settings, *, api: bool = True) -> list[Check]:
    """Every check, in a fixed order; a check that crashes becomes a failure instead of stopping the rest."""
    key, key_source = find_api_key(settings)
    steps: list[tuple[str, Callable[[], Check | list[Check]]]] = [
        ("config", lambda: check_config(settings)),
        ("ffmpeg", lambda: check_tool("ffmpeg", settings.conversion.ffmpeg, required_encoders(settings))),
        ("ffprobe", lambda: check_tool("ffprobe", settings.conversion.ffprobe)),
        *((f"watch {w.path}", lambda w=w: check_watch(w, settings)) for w in settings.watches),
        ("state_dir", lambda: check_writable("state_dir", settings.state_dir)),
        ("results_dir", lambda: check_writable("results_dir", settings.results_dir)),
        ("disk space", lambda: check_disk(settings)),
        ("database", lambda: check_database(settings)),
        ("api key", lambda: check_api_key(settings, key, key_source)),
    ]
    if api and key:
        steps.append(("api", lambda: check_api(settings, key)))
    steps.append(("inotify", lambda: check_inotify(settings)))
    results: list[Check] = []
    for name, step in steps:
        try:
            produced = step()
        except Exception as err:  # a doctor that crashes helps nobody
            produced = Check(name, FAIL, f"the check itself failed: {type(err).__name__}: {err}",
                             "please report this as a bug in audiodrop doctor")
        results.extend(produced if isinstance(produced, list) else [produced])
    return [_scrub(check, key) for check in results]


def render(checks: list[Check]) -> str:
    marks = {OK: "ok  ", WARNING: "WARN", FAIL: "FAIL"}
    lines = []
    for check in checks:
        lines.append(f"{marks[check.status]}  {check.name}: {check.detail}")
        if check.hint:
            lines.append(f"      -> {check.hint}")
    counts = {status: sum(c.status == status for c in checks) for status in (OK, WARNING, FAIL)}
    lines.append(f"\n{counts[OK]} ok, {counts[WARNING]} warning(s), {counts[FAIL]} failure(s)")
    return "\n".join(lines)


def _scrub(check: Check, key: str | None) -> Check:
    if not key or len(key) < 6:  # too short to replace without mangling ordinary words
        return check
    hint = check.hint.replace(key, "[API key]") if check.hint else None
    return Check(check.name.replace(key, "[API key]"), check.status, check.detail.replace(key, "[API key]"), hint)


# -- ffmpeg, ffprobe, configuration ------------------------------------------------------------------------


def required_encoders(settings: Settings) -> list[str]:
    """The ffmpeg encoders of conversion.format and conversion.fallback_format (libopus and libvorbis by default)."""
    names = (settings.conversion.format, settings.conversion.fallback_format)
    return list(dict.fromkeys(dict(FORMATS[name].codec_options)["acodec"] for name in names))


def _output(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=TOOL_TIMEOUT_SECONDS)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise OSError(f"exit status {result.returncode}: {last}")
    return result.stdout


def check_tool(name: str, command: str, encoders: list[str] | None = None) -> Check:
    setting = f"conversion.{name}"
    path = shutil.which(command)
    if path is None:
        return Check(name, FAIL, f"{command!r} was not found",
                     f"install it with `sudo apt-get install ffmpeg`, or set {setting} to the full path of a {name}")
    try:
        version = _output(path, "-hide_banner", "-version").partition("\n")[0].split(" Copyright")[0]
        listed = _output(path, "-hide_banner", "-encoders") if encoders else ""
    except (OSError, subprocess.SubprocessError) as err:
        return Check(name, FAIL, f"{path} does not run ({err})",
                     f"reinstall it (`sudo apt-get install --reinstall ffmpeg`) or set {setting} to a working {name}")
    detail = f"{version or 'unknown version'} at {path}"
    if not encoders:
        return Check(name, OK, detail)
    available = {line.split()[1] for line in listed.splitlines() if len(line.split()) > 1}
    missing = [encoder for encoder in encoders if encoder not in available]
    if missing:
        return Check(name, FAIL, f"{detail} lacks the {' and '.join(missing)} encoder(s) that conversion needs",
                     "install Debian's ffmpeg (`sudo apt-get install ffmpeg`, built with libopus and libvorbis), "
                     "or choose a conversion.format and fallback_format this ffmpeg can encode")
    return Check(name, OK, f"{detail}, with {' and '.join(encoders)}")


def check_config(settings: Settings) -> Check:
    where = f"loaded {settings.source}" if settings.source else "no configuration file, using the defaults"
    return Check("config", OK, f"{where}: {len(settings.watches)} drop folder(s), state in {settings.state_dir}")


# -- folders and disk ------------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _creatable(path: Path) -> str | None:
    """None when `path` could be created (mkdir -p), else why not."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable for {getpass.getuser()}"
    return None


def check_watch(watch: Watch, settings: Settings) -> Check:
    name, path = f"watch {watch.path}", watch.path
    if path.exists():
        if not path.is_dir():
            return Check(name, FAIL, "is a file, not a folder", "point this [[watch]] path at a folder")
        try:
            with os.scandir(path) as entries:
                next(entries, None)
        except OSError as err:
            return Check(name, FAIL, f"cannot be read ({err.strerror})",
                         f"give the user that runs the daemon read access, e.g. `sudo chmod -R o+rX {path}`")
        state = "readable"
    else:
        why_not = _creatable(path)
        if why_not:
            return Check(name, FAIL, f"does not exist and cannot be created: {why_not}",
                         f"create it (`sudo mkdir -p {path}`) and let the daemon's user read it")
        if settings.source is not None:
            # As the watcher does: a configured folder that is missing may be a share not mounted yet.
            return Check(name, WARNING, "does not exist: the daemon waits for it (it may be a share not mounted "
                         "yet) and watches it once it appears", f"create it: `mkdir -p {path}`")
        state = "does not exist yet; the daemon creates it at start (the default drop folder)"
    kind = filesystem_type(Path(os.path.abspath(path))) or "unknown filesystem"
    if not should_poll(watch):
        if kind in NETWORK_FILESYSTEMS or kind.startswith("fuse"):  # poll = false on a network mount
            return Check(name, WARNING, f"{state}; {kind} mount watched with inotify, which sees no changes made "
                         f"on other machines: they are found only by the scan every "
                         f"{settings.intake.scan_interval_seconds:.0f} s", "remove `poll = false` from this [[watch]]")
        return Check(name, OK, f"{state}; {kind}, watched with inotify")
    why = "poll = true" if watch.poll else f"a {kind} mount, where inotify sees no changes"
    return Check(name, OK, f"{state}; polled every {settings.intake.poll_interval_seconds:g} s ({why})")


def check_writable(name: str, path: Path) -> Check:
    if not path.exists():
        why_not = _creatable(path)
        if why_not:
            return Check(name, FAIL, f"{path} does not exist and cannot be created: {why_not}",
                         f"create it for the daemon's user (`sudo install -d -o {getpass.getuser()} {path}`), "
                         f"or set {name} to a folder that user can write")
        return Check(name, OK, f"{path} does not exist yet; the daemon creates it at start")
    if not path.is_dir():
        return Check(name, FAIL, f"{path} is a file, not a folder", f"move the file away or set {name} elsewhere")
    try:
        handle, probe = tempfile.mkstemp(dir=path, prefix=".audiodrop-doctor-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        return Check(name, FAIL, f"{path} is not writable ({err.strerror})",
                     f"let the daemon's user write it (`sudo chown -R {getpass.getuser()} {path}`), "
                     f"or set {name} to a folder that user can write")
    return Check(name, OK, f"{path} is writable")


def check_disk(settings: Settings) -> Check:
    free = shutil.disk_usage(_existing_ancestor(settings.state_dir)).free
    detail = f"{free / 1e9:.1f} GB free for {settings.state_dir}"
    if free < LOW_DISK_BYTES:
        return Check("disk space", WARNING, detail + " (under 1 GB)",
                     "converted copies (about 7 MB per hour of audio) and the database live in state_dir: "
                     "free some space, or move state_dir to a larger disk")
    return Check("disk space", OK, detail)


# -- database --------------------------------------------------------------------------------------------


def check_database(settings: Settings) -> Check:
    """Read-only: the schema revision against the newest migration this audiodrop knows."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from db.session import alembic_config, check_integrity, head_revision, is_fleet, make_engine, schema_revision

    if is_fleet(settings.database_url):
        return check_fleet_database(settings)
    path, head = settings.database_path, head_revision()
    if not path.exists():
        return Check("database", OK, f"{path} does not exist yet; the daemon creates it at its first start")
    try:
        check_integrity(path)
    except DaemonError as err:
        return Check("database", FAIL, err.title, err.hint)
    engine = make_engine(path, readonly=True)
    try:
        revision = schema_revision(engine)
        tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    except SQLAlchemyError as err:
        return Check("database", FAIL, f"{path} cannot be read: {getattr(err, 'orig', None) or err}",
                     f"restore it from a backup, or move it aside (`mv {path} {path}.broken`) so the daemon starts "
                     "a new one")
    finally:
        engine.dispose()
    if revision == head:
        return Check("database", OK, f"{path} is at the newest schema ({head})")
    if revision is None and tables:
        return Check("database", FAIL, f"{path} has audiodrop's tables but no schema revision: the next start "
                     "would fail trying to create them again",
                     f"restore it from a backup, or move it aside (`mv {path} {path}.broken`) so the daemon starts "
                     "a new one")
    try:
        if revision is not None:
            ScriptDirectory.from_config(alembic_config(path)).get_revision(revision)
    except CommandError:
        return Check("database", FAIL, f"{path} is at schema {revision}, which this audiodrop does not know "
                     "(written by a newer version?)", "run the audiodrop version that wrote it, or upgrade this one")
    return Check("database", WARNING, f"{path} is at schema {revision or 'none (empty)'}, behind {head}: "
                 "it will be migrated at next start", f"nothing to do; to keep a copy first: `cp {path} {path}.bak`")


def check_fleet_database(settings: Settings) -> Check:
    """Fleet mode: the PostgreSQL database answers, its schema is one this audiodrop knows, and this machine's
    clock is close to the database's (leases are judged by the database's clock; a skew only shows in logs)."""
    from sqlalchemy.exc import SQLAlchemyError

    from daemon.nodes import DatabaseClock
    from db.session import describe_failure, head_revision, known_revisions, open_engine, place, schema_revision

    engine = open_engine(settings.database_path, settings.database_url, readonly=True)
    try:
        revision = schema_revision(engine)
        with engine.connect() as connection:
            from sqlalchemy.orm import Session

            skew = DatabaseClock().measure(Session(bind=connection))
    except SQLAlchemyError as err:
        message, _ = describe_failure(err, settings.database_url)
        return Check("database", FAIL, message, "check database_url (or $AUDIODROP_DATABASE_URL) and that the "
                                                "server runs and accepts this machine")
    finally:
        engine.dispose()
    head = head_revision()
    if revision is not None and revision not in known_revisions():
        return Check("database", FAIL, f"the fleet's database is at schema {revision}, newer than this audiodrop "
                     f"knows ({head})", "upgrade audiodrop on this node to the version the other nodes run")
    detail = (f"the fleet's database ({place(settings.database_url)}) answers, schema {revision or 'none yet'} "
              f"(newest {head}), clock skew {skew.total_seconds():+.2f} s")
    if abs(skew.total_seconds()) > 5:
        return Check("database", WARNING, detail, "keep this machine's clock synchronized (systemd-timesyncd or "
                                                  "chrony); leases use the database's clock, logs use this one")
    return Check("database", OK, detail)


# -- API key and API -------------------------------------------------------------------------------------


def check_api_key(settings: Settings, key: str | None, source: str) -> Check:
    key_file = settings.gemini.api_key_file
    if key:
        return Check("api key", OK, f"found in {source}")
    detail = "no API key found: recordings are converted and wait for one"
    if key_file:
        try:
            empty = not key_file.read_text(encoding="utf-8").strip()
            detail += f" (gemini.api_key_file {key_file} is empty)" if empty else ""
        except OSError as err:
            detail += f" (gemini.api_key_file {key_file} cannot be read: {err.strerror})"
    return Check("api key", WARNING, detail,
                 "export GEMINI_API_KEY=..., or set gemini.api_key_file, or for the system unit put it in "
                 "/etc/audiodrop/gemini-api-key (LoadCredential; visible only inside the service)")


def check_api(settings: Settings, key: str) -> Check:
    """One files.list through the daemon's own client, with a shorter timeout than the daemon's."""
    from daemon.gemini import DISPLAY_PREFIX, GeminiClient

    gemini = settings.gemini
    where = gemini.base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL") or "the Gemini API"
    timeout = min(gemini.request_timeout_seconds, API_TIMEOUT_SECONDS)
    client = GeminiClient(key, dataclasses.replace(gemini, request_timeout_seconds=timeout), attempts=1)
    try:
        files = client.list_files()
    except AuthError as err:
        return Check("api", FAIL, f"{where} refused the key: {err.title}",
                     f"{err.hint}; a new key comes from https://aistudio.google.com/apikey")
    except OfflineError as err:
        return Check("api", WARNING, f"{where} is not reachable: {err.title}",
                     "offline is normal: conversion goes on and uploads wait; if it should be reachable, check "
                     "the network, a proxy, or gemini.base_url")
    except TransientError as err:
        return Check("api", WARNING, f"{where} did not answer properly: {err.title}", err.hint)
    except DaemonError as err:
        return Check("api", FAIL, f"{where} refused files.list: {err.title}", err.hint or None)
    finally:
        client.close()
    ours = [f for f in files if (f.display_name or "").startswith(DISPLAY_PREFIX)]
    used = sum(f.size_bytes for f in files)
    return Check("api", OK, f"{where} answered files.list: {len(files)} file(s), {len(ours)} uploaded by audiodrop, "
                 f"{used / 1e9:.2f} of {gemini.storage_limit_bytes / 1e9:.2f} GB")


# -- inotify ---------------------------------------------------------------------------------------------


def _count_folders(watches: list[Watch]) -> tuple[int, bool]:
    """inotify needs one watch per folder of a recursive drop folder; (count, complete) within the time budget."""
    deadline = time.monotonic() + WALK_BUDGET_SECONDS
    seen: set[str] = set()  # nested drop folders share their watches
    for watch in watches:
        stack = [os.path.abspath(watch.path)]
        while stack:
            folder = stack.pop()
            if folder in seen:
                continue
            seen.add(folder)
            if not watch.recursive:
                continue
            if time.monotonic() > deadline:
                return len(seen), False
            try:
                with os.scandir(folder) as entries:
                    stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
            except OSError:
                pass
    return len(seen), True


def _sysctl(name: str, needed: int, floor: int) -> str:
    value = max(floor, 1 << (2 * needed - 1).bit_length())
    return (f"`sudo sysctl fs.inotify.{name}={value}`, and to keep it after a reboot "
            f"`echo fs.inotify.{name}={value} | sudo tee /etc/sysctl.d/90-audiodrop.conf`")


def _limit(name: str, needed: int, floor: int, what: str, scan: float) -> Check:
    check_name = f"inotify {name.removeprefix('max_user_')}"
    try:
        limit = int((INOTIFY / name).read_text())
    except (OSError, ValueError) as err:
        return Check(check_name, WARNING, f"cannot read fs.inotify.{name} ({err})",
                     "on Linux this is /proc/sys/fs/inotify; drop folders are still found by the scan")
    detail = f"{what}; fs.inotify.{name} = {limit}, shared by every program of the same user"
    if needed > limit:
        return Check(check_name, WARNING, f"{detail}: too low, so some folders get no events and new recordings "
                     f"there are found only by the scan every {scan:.0f} s",
                     f"raise it: {_sysctl(name, needed, floor)}")
    if needed > limit // 2:
        return Check(check_name, WARNING, f"{detail}: more than half of it for audiodrop alone",
                     f"raise it: {_sysctl(name, needed, floor)}")
    return Check(check_name, OK, detail)


def check_inotify(settings: Settings) -> list[Check]:
    native = [watch for watch in settings.watches if not should_poll(watch)]
    if not native:
        return [Check("inotify", OK, "not used: every drop folder is polled")]
    folders, complete = _count_folders(native)
    counted = f"{folders} folder(s) to watch"
    if not complete:
        counted = f"at least {counted} (counting stopped after {WALK_BUDGET_SECONDS:g} s)"
    scan = settings.intake.scan_interval_seconds
    # watchdog shares one inotify instance among all its watches in a process.
    return [_limit("max_user_watches", folders, 524_288, counted, scan),
            _limit("max_user_instances", 1, 512, "the daemon uses 1 instance", scan)]
