"""Shared fixtures: a config file written to a temporary folder, and a real migrated SQLite database; and two
checks around every test: nothing it started is left running, and no emulator it started broke."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings, load_settings
from db.session import make_engine, make_sessionmaker, upgrade_to_head
from tests import leaks

# PostgreSQL and the TCP proxy for the fleet tests: fixtures that start nothing until a test asks for them.
pytest_plugins = ["tests.pg", "tests.netproxy"]

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def write_config(folder: Path, *, test_timings: bool = True, **overrides: Any) -> Path:
    """A complete config: one drop folder, state in the temp folder, and (`test_timings`) fast intake timings;
    without them, the daemon's defaults for everything not given (what the benchmarks measure)."""
    data: dict[str, Any] = {
        "state_dir": str(folder / "state"),
        "results_dir": str(folder / "results"),
        "watch": [{"path": str(folder / "inbox")}],
    }
    if test_timings:
        data["intake"] = {"close_quiet_seconds": 0.3, "settle_seconds": 1.0, "scan_interval_seconds": 2.0,
                          "poll_interval_seconds": 0.5}
        data["gemini"] = {"processing_poll_seconds": 0.2}
        # Most tests play tones, which hold no speech: trimming would cut them to a second. Its own tests turn it on.
        data["trimming"] = {"enabled": False}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return load_settings(write_config(tmp_path, **overrides))

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.database_path)
    engine = make_engine(settings.database_path)
    yield make_sessionmaker(engine)
    engine.dispose()


CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
def _nothing_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test that leaves a thread (a watchdog observer, an emulator, an engine...) or a child process (a
    daemon, ffmpeg) running once its fixtures are torn down, as watchdog's `_no_thread_leaks` does. What existed
    before the test is not its doing; what a session fixture keeps on purpose registers with tests/leaks.py.
    Whatever is left is stopped, so that it cannot disturb the tests that follow; after a test that failed
    anyway (and so skipped its own clean-up) that is all, the failure says what went wrong."""
    from tests import harness

    before = leaks.snapshot()
    harness.started_daemons.clear()
    yield
    daemons = [daemon for daemon in harness.started_daemons if not daemon.exited()]
    for daemon in daemons:
        try:
            daemon.stop(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
    harness.started_daemons.clear()
    left = leaks.left_behind(before)
    leaks.stop(left.processes)
    if request.node.stash.get(CALL_FAILED, False):
        return
    found = [f"daemon {daemon.process.pid if daemon.process else '?'} of {daemon.config_path} (stop() it)"
             for daemon in daemons]
    if left:
        found.append(left.describe())
    if found:
        pytest.fail("left running after the test:\n" + "\n".join(found), pytrace=False)


@pytest.fixture(autouse=True)
def _emulators_report_no_internal_errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every emulator a test starts (a fixture, a `with Emulator(...)` block) must end without an internal error
    (a traceback in the emulator, answered 500): a 500 the daemon then retries would otherwise pass unnoticed."""
    from tests.emulator import Emulator

    started: list[Emulator] = []
    original = Emulator.start

    def start(self: Emulator) -> str:
        started.append(self)
        return original(self)

    monkeypatch.setattr(Emulator, "start", start)
    yield
    broken = {emulator.base_url: emulator.internal_errors for emulator in started if emulator.internal_errors}
    assert broken == {}, "the emulator broke (its tracebacks):\n" + "\n".join(
        error for errors in broken.values() for error in errors)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Any]:
    """The loopback Gemini emulator with the harness's API key; fails the test if the emulator itself broke."""
    from tests.emulator import Emulator
    from tests.harness import API_KEY

    with Emulator(api_key=API_KEY, data_dir=tmp_path / "emulator") as emu:
        yield emu
        assert emu.internal_errors == []


@pytest.fixture
def daemon(tmp_path: Path, emulator: Any) -> Iterator[Any]:
    """A daemon (not yet started) pointed at the emulator; stopped at the end if still running."""
    from tests.harness import DaemonProcess

    process = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    yield process
    if process.process and not process.exited():
        process.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests go first: spread over the workers early, they do not leave one worker running alone
    at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
