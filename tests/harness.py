"""End-to-end helpers: the daemon as a real subprocess with a temporary config, and the CLI as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.pipeline.transcode import dying_with_parent
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-7f3a9c2e51b8d4"
# Every daemon a test started, so that conftest.py can stop the ones a failing test left running.
started_daemons: list[DaemonProcess] = []


def wait_until(condition: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2,
               message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


class DaemonProcess:
    """`audiodrop run` in a subprocess, its log in a file next to the config."""

    def __init__(self, folder: Path, *, base_url: str | None, api_key: str | None = API_KEY,
                 test_timings: bool = True, **config: Any) -> None:
        self.folder = folder
        gemini = dict(config.pop("gemini", {}))
        if base_url:
            gemini["base_url"] = base_url
        self.config_path = write_config(folder, test_timings=test_timings, **({"gemini": gemini} if gemini else {}),
                                        **config)
        self.inbox = folder / "inbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "daemon.log"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL", "AUDIODROP_CONFIG")}
        if api_key:
            self.env["GEMINI_API_KEY"] = api_key
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        started = datetime.now(UTC)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(self.config_path)],
                                        cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=dying_with_parent(signal.SIGTERM))
        log.close()
        started_daemons.append(self)
        # Ready once it has written a heartbeat (the lock alone is taken before migrations run). On SQLite the
        # node's row is read straight from the file: a CLI start costs half a second of CPU on each look.
        def ready() -> bool:
            rows = self._sqlite("SELECT pid, heartbeat_at FROM nodes WHERE pid = ?", self.process.pid) \
                if self._on_sqlite() else None
            if rows is not None:
                return bool(rows) and rows[0][1] is not None
            daemon = self.cli("status", "--json")["daemon"]
            beat = daemon["heartbeat_at"]
            return daemon["pid"] == self.process.pid and beat is not None and \
                datetime.fromisoformat(beat.replace("Z", "+00:00")) >= started

        wait_until(lambda: self.exited() or ready(), 30, message="the daemon to start")
        assert not self.exited(), self.log()
        return self

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self, timeout: float = 20) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> Any:
        result = run_cli(self.config_path, *args, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"audiodrop {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return json.loads(result.stdout) if "--json" in args else result

    def files(self) -> list[dict[str, Any]]:
        return self.cli("files", "--json")

    def states(self) -> list[str]:
        """The recordings' states straight from the database (read-only): for waits that must notice a
        state within a fraction of a second, which starting the CLI cannot promise on a busy machine."""
        database = self.folder / "state" / "audiodrop.db"
        if not database.exists():
            return []
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as connection:
            return [row[0] for row in connection.execute("SELECT state FROM recordings ORDER BY id")]

    def events(self) -> list[dict[str, Any]]:
        """Every recording's history straight from the database (read-only), oldest first: recording id, from,
        to, reason and time (ISO text) of each event. For checks over many recordings, where a `show` per
        recording would start the CLI once each."""
        database = self.folder / "state" / "audiodrop.db"
        if not database.exists():
            return []
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as connection:
            connection.row_factory = sqlite3.Row
            return [dict(row) for row in connection.execute(
                "SELECT recording_id, from_state, to_state, reason, at FROM recording_events ORDER BY id")]

    def _on_sqlite(self) -> bool:
        return "database_url" not in self.config_path.read_text(encoding="utf-8")

    def _sqlite(self, statement: str, *params: Any) -> list[tuple[Any, ...]] | None:
        """Rows from the daemon's SQLite file, read-only; None while it has no such table yet."""
        database = self.folder / "state" / "audiodrop.db"
        if not database.exists():
            return None
        try:
            with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as connection:
                return list(connection.execute(statement, params))
        except sqlite3.OperationalError:
            return None

    def wait_for_states(self, expected: dict[str, int] | Callable[[list[dict[str, Any]]], bool],
                        timeout: float = 90) -> list[dict[str, Any]]:
        """Until `files --json` holds `expected` (counts by state, or a test on the items). The CLI is asked again
        only when the recordings' rows changed since it was last asked (read straight from the SQLite file)."""
        seen: list[Any] = [object()]

        def reached() -> list[dict[str, Any]] | None:
            assert not self.exited(), "daemon exited:\n" + self.log()[-4000:]
            rows = self._sqlite("SELECT * FROM recordings ORDER BY id") if self._on_sqlite() else None
            if rows is not None and rows == seen[0]:
                return None
            seen[0] = rows if rows is not None else object()
            items = self.files()
            if callable(expected):
                return items if expected(items) else None
            counts: dict[str, int] = {}
            for item in items:
                counts[item["state"]] = counts.get(item["state"], 0) + 1
            return items if counts == expected else None

        try:
            return wait_until(reached, timeout, 0.3, message=f"states {expected}")
        except AssertionError:
            summary = [(i["id"], Path(i["source_path"]).name, i["state"], i["error"]) for i in self.files()]
            raise AssertionError(f"states never reached {expected}: {summary}\n--- log tail ---\n"
                                 f"{self.dump_threads()[-12000:]}") from None

    def dump_threads(self) -> str:
        """The log, after asking the daemon to print every thread's stack into it (faulthandler on SIGUSR1)."""
        if self.process is not None and not self.exited():
            before = len(self.log())
            self.process.send_signal(signal.SIGUSR1)
            try:
                wait_until(lambda: "most recent call first" in self.log()[before:], 5, 0.05, message="the stacks")
            except AssertionError:
                pass  # a diagnosis: the log as it is
        return self.log()


def run_cli(config_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args, "--config", str(config_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def count_states(items: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item["state"]] = counts.get(item["state"], 0) + 1
    return counts
