"""The `audiodrop` command. Status commands read the database directly and read-only (WAL lets them run while
the daemon writes); the only writes are a retry request and, later, queued prompts. Heavy imports (the SDK,
watchdog, APScheduler) stay inside `run`, so status answers at once."""

from __future__ import annotations

import fcntl
import json
import sys
from collections.abc import Callable
from typing import Any

import click
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from daemon.config import Settings, load_settings
from daemon.errors import ConfigError, DaemonError
from db.session import describe_failure, is_fleet, make_engine, make_sessionmaker, open_engine
from db.states import PromptState, RecordingState

STATES = [state.value for state in RecordingState]
PROMPT_STATES = [state.value for state in PromptState]


def config_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help="Configuration file (default: $AUDIODROP_CONFIG, then "
                             "$XDG_CONFIG_HOME/audiodrop/config.toml).")(function)


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON only.")(function)


def fail(message: str) -> None:
    click.echo(f"audiodrop: {message}", err=True)
    sys.exit(1)


def settings_or_exit(config_path: str | None) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as err:
        fail(str(err))
        raise  # unreachable


def open_session(settings: Settings, *, write: bool = False) -> Session | None:
    """A session on the daemon's database, or None when the daemon has never run (exit 1, one clear line, when
    a fleet's database cannot be used)."""
    if not is_fleet(settings.database_url):
        if not settings.database_path.exists():
            return None
        return make_sessionmaker(make_engine(settings.database_path, readonly=not write))()
    engine = open_engine(settings.database_path, settings.database_url, readonly=not write)
    try:
        with engine.connect() as connection:
            if not connection.execute(text("SELECT to_regclass('alembic_version')")).scalar():
                return None
    except SQLAlchemyError as err:
        fail(describe_failure(err, settings.database_url)[0])
    return make_sessionmaker(engine)()


def open_row(settings: Settings, model: type[Any], row_id: int, noun: str, *,
             write: bool = False) -> tuple[Session, Any]:
    """A session and one row by id, or exit 1 with "no recording with id N" (and why, if no database yet)."""
    session = open_session(settings, write=write)
    if session is None:
        fail(f"no {noun} with id {row_id} (the daemon has not run yet)")
    assert session is not None
    row = session.get(model, row_id)
    if row is None:
        session.close()
        fail(f"no {noun} with id {row_id}")
    return session, row


def lock_holder(settings: Settings) -> int | None:
    """The pid holding the state_dir lock (a daemon, or `audiodrop process`), or None when nobody does."""
    try:
        with open(settings.lock_path, encoding="ascii") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                content = handle.read().strip()
                return int(content) if content.isdigit() else -1
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None
    except OSError:
        return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="audiodrop")
def main() -> None:
    """audiodrop: converts recordings dropped in watched folders and uploads them to the Gemini API."""


@main.command(name="run")
@config_option
def run_command(config_path: str | None) -> None:
    """Run the daemon in the foreground (what the systemd unit starts)."""
    from daemon import logs
    from daemon.service import Daemon

    settings = settings_or_exit(config_path)
    logs.setup(settings.log_level)
    try:
        Daemon(settings, config_path).run()
    except DaemonError as err:
        fail(str(err))


@main.command(name="doctor")
@config_option
@json_option
@click.option("--offline", is_flag=True, help="Skip the check that talks to the Gemini API.")
def doctor_command(config_path: str | None, as_json: bool, offline: bool) -> None:
    """Check ffmpeg, the configuration, the database, the API key and the API, inotify limits and disk space."""
    from daemon.cli import doctor as checks

    settings = settings_or_exit(config_path)
    results = checks.run_checks(settings, api=not offline)
    if as_json:
        click.echo(json.dumps([result.__dict__ for result in results], indent=2))
    else:
        click.echo(checks.render(results))
    if any(result.status == "fail" for result in results):
        sys.exit(1)


@main.command(name="process")
@config_option
@json_option
@click.argument("paths", metavar="FILE...", nargs=-1, required=True)
@click.option("--template", "-t", "templates", multiple=True, help="A template to run on each file (repeatable).")
@click.option("--prompt", "-p", "prompt_text", help="Your own prompt text, run on each file.")
@click.option("--no-upload", is_flag=True, help="Convert only; upload nothing.")
def process_command(config_path: str | None, as_json: bool, paths: tuple[str, ...], templates: tuple[str, ...],
            prompt_text: str | None, no_upload: bool) -> None:
    """Convert, upload and prompt the named files now, with progress bars. While the daemon runs, the files are
    handed to it and followed to the end (Ctrl-C stops following; the daemon goes on); otherwise this command
    does the work itself."""
    from daemon.cli import process as pipeline

    settings = settings_or_exit(config_path)
    try:
        code = pipeline.main(settings, list(paths), templates=list(templates), prompt_text=prompt_text,
                             upload=not no_upload, as_json=as_json)
    except DaemonError as err:
        fail(str(err))
    sys.exit(code)


# The commands of the other modules register themselves on `main` when imported.
from daemon.cli import ask, search, status  # noqa: E402,F401

if __name__ == "__main__":
    main()
