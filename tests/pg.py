"""A throwaway PostgreSQL cluster for tests, and the pytest fixtures around it.

One cluster per test process (per xdist worker), started on first use: `initdb` into a temporary directory
of its own, the server listening on 127.0.0.1 on a free port with its unix socket in that directory, fsync
off. As root (initdb and postgres refuse root) the cluster belongs to the `postgres` system user of
Debian's package (its processes started with setpriv: see _as_owner). Every test that asks for
`postgres_url` gets a database of its own, dropped afterwards.

The server dies with the test process:
- the fixture (and an atexit hook) stop it and remove its directory;
- the postmaster is our direct child, started under `setpriv --pdeathsig QUIT`: if the test process is
  killed (SIGKILL, os._exit of pytest-timeout's thread method), the kernel sends the postmaster SIGQUIT
  (immediate shutdown, its backends with it);
- a directory left behind by a killed process is removed by the next cluster started on this machine
  (`sweep_stale_clusters`).

    server = PostgresServer(); server.start()
    server.create_database("t1"); engine = create_engine(server.url("t1"), pool_pre_ping=True)
    server.restart("immediate")   # a crash: same port; committed data survives (fsync is off, but the OS lives)
    server.close()                # stop and remove the directory
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import leaks

SUPERUSER = "audiodrop"
SYSTEM_USER = "postgres"
DIR_PREFIX = "audiodrop-pg-"
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"

# Settings suited to tests, written into postgresql.conf (ALTER SYSTEM, i.e. set_config, overrides them).
# Not synchronous_commit=off: a stop("immediate") would then lose the transactions committed in the last
# few hundred ms (seen here: a table created just before the crash was gone), which is not what a crash
# test means to simulate.
TEST_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",  # safe as long as the machine does not crash: a killed server loses nothing
    "full_page_writes": "off",
    "max_connections": "200",
    "jit": "off",
    "ssl": "off",
    "timezone": "UTC",
    "log_timezone": "UTC",
    "logging_collector": "off",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}

_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SETTING = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def find_bindir() -> Path | None:
    """The directory of `postgres` and `initdb`: $AUDIODROP_PG_BINDIR, else the newest Debian version under
    /usr/lib/postgresql/*/bin, else (other distributions) the PATH."""
    override = os.environ.get("AUDIODROP_PG_BINDIR")
    candidates = [override] if override else sorted(
        glob.glob(DEBIAN_BIN_GLOB), key=lambda p: [int(x) for x in re.findall(r"\d+", p)] or [0])[::-1]
    for candidate in candidates:
        if (Path(candidate) / "postgres").is_file() and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    if not override and shutil.which("postgres") and shutil.which("initdb"):
        return Path(shutil.which("initdb")).resolve().parent  # type: ignore[arg-type]
    return None


def _is_root() -> bool:
    return os.geteuid() == 0


def unavailable_reason() -> str | None:
    """Why the fixtures must skip, or None. Only a non-root machine without the binaries skips: as root,
    `make test` installs Debian's postgresql, so missing binaries are an error (raised by start())."""
    if find_bindir() is None and not _is_root():
        return (f"PostgreSQL binaries not found under {DEBIAN_BIN_GLOB} nor on PATH "
                "(`make test` installs Debian's postgresql; or set AUDIODROP_PG_BINDIR)")
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_start_time(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/PID/stat): a pid plus this names one process even
    after pids are reused. None if there is no such process or it is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def process_alive(pid: int) -> bool:
    """True if the process runs (a zombie waiting for its parent to reap it does not count)."""
    return _proc_start_time(pid) is not None


def _base_dir() -> Path:
    """Where cluster directories go: the temp dir, if the postgres user can reach it, else /tmp."""
    base = Path(os.environ.get("AUDIODROP_PG_TMPDIR") or tempfile.gettempdir())
    if _is_root():
        for part in [base, *base.parents]:
            try:
                if not part.stat().st_mode & 0o001:
                    return Path("/tmp")
            except OSError:
                return Path("/tmp")
    return base


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def sweep_stale_clusters(base: Path | None = None) -> list[Path]:
    """Remove the cluster directories of test processes that no longer run (killed before they could clean
    up), after killing a postmaster that might still run in one. Returns the directories removed."""
    removed = []
    for folder in (base or _base_dir()).glob(DIR_PREFIX + "*"):
        owner = folder / "owner"
        try:
            pid_text, _, started = owner.read_text().partition(" ")
            if _proc_start_time(int(pid_text)) == started.strip():
                continue  # its test process still runs
        except (OSError, ValueError):
            try:  # no owner file yet: a cluster being created right now, unless it is old
                if time.time() - folder.stat().st_mtime < 120:
                    continue
            except OSError:
                continue
        pid = _postmaster_pid(folder / "data")
        try:
            ours = bool(pid) and str(folder).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            ours = False
        if pid and ours:
            try:
                os.kill(pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


# pdeathsig fires when the *thread* that started the child ends. Servers started from another thread (a
# test restarting the server from a threading.Timer, say) are therefore started from this one long-lived
# thread, so that they do not die when that thread does.
_launcher_lock = threading.Lock()
_launcher: Any = None
leaks.outlives_tests(threads="pg-launcher")  # kept for the whole session, on purpose


def _popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    global _launcher
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(argv, **kwargs)
    import concurrent.futures
    with _launcher_lock:
        if _launcher is None:
            _launcher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-launcher")
    return _launcher.submit(subprocess.Popen, argv, **kwargs).result()


_live_servers: set[PostgresServer] = set()  # strong references: atexit closes what a test forgot


@atexit.register
def _close_live_servers() -> None:
    for server in list(_live_servers):
        server.close()


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, for tests. Superuser `audiodrop`, trust auth."""

    def __init__(self, settings: dict[str, Any] | None = None, *, bindir: Path | None = None) -> None:
        self.settings = {**TEST_SETTINGS, **{k: _literal(v) for k, v in (settings or {}).items()}}
        self.bindir = bindir or find_bindir()
        self.dir: Path | None = None
        self.port: int | None = None
        self.timings: dict[str, float] = {}  # seconds: initdb, start, stop, restart, create_database
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._conf_base = ""
        self._changed_settings: set[str] = set()
        self._lock = threading.RLock()

    # -- paths ---------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.dir is not None, "cluster not created yet: call start()"
        return self.dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.dir is not None, "cluster not created yet: call start()"
        return self.dir

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "cluster not created yet: call start()"
        return self.dir / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._proc.pid if self.is_running() else None

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Create the cluster on first call, then start the server (no-op if it runs). The first start picks
        a free port; later starts reuse it, so clients reconnect to the same address."""
        with self._lock:
            if self.is_running():
                return
            if self.dir is None:
                self._create_cluster()
            first = self.port is None
            for attempt in range(5):
                if self.port is None or (first and attempt):
                    self.port = _free_port()
                try:
                    self._launch(timeout)
                    return
                except _PortInUse:
                    if not first:
                        raise RuntimeError(f"port {self.port} taken while PostgreSQL was down") from None
            raise RuntimeError("no free port for PostgreSQL after 5 attempts")

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server: "fast" (clean: backends end, checkpoint), "immediate" (a crash: recovery at the
        next start) or "smart" (waits for clients to disconnect). The directory stays, for start()."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            began = time.monotonic()
            if proc.poll() is None:
                try:
                    proc.send_signal(_SIGNALS[mode])
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._proc = None
            if self._log:
                self._log.close()
                self._log = None
            self.timings["stop"] = time.monotonic() - began

    def restart(self, mode: str = "fast") -> None:
        """stop(mode) then start(): an outage ("fast") or a crash ("immediate") of the database server."""
        began = time.monotonic()
        self.stop(mode)
        self.start()
        self.timings["restart"] = time.monotonic() - began

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop the server at once and remove its directory. Idempotent."""
        with self._lock:
            self.stop("immediate")
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
                self.port = None
            _live_servers.discard(self)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addresses -----------------------------------------------------------------------------------
    def url(self, dbname: str = "postgres", *, host: str = "127.0.0.1", port: int | None = None) -> str:
        """SQLAlchemy URL over TCP; pass port=proxy.port to go through a TcpProxy."""
        return f"postgresql+psycopg://{SUPERUSER}@{host}:{port or self.port}/{dbname}"

    def conninfo(self, dbname: str = "postgres", *, host: str = "127.0.0.1", port: int | None = None) -> str:
        """libpq connection string (for psycopg.connect) over TCP."""
        return f"host={host} port={port or self.port} user={SUPERUSER} dbname={dbname}"

    # -- administration (over the unix socket, so a TcpProxy in between does not matter) --------------
    def execute(self, sql: str, params: Any = None, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement in autocommit on a fresh connection; the rows it returns, if any."""
        import psycopg
        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=dbname,
                             autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(sql, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL (several statements, psql meta-commands) through the psql binary; its unaligned,
        tuples-only output. Raises RuntimeError on any error."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
             "-p", str(self.port), "-U", SUPERUSER, "-d", dbname, "-f", "-"],
            input=sql.encode(), capture_output=True, env=env, timeout=60)
        if result.returncode:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
        return result.stdout.decode().rstrip("\n")

    def create_database(self, name: str, template: str = "template1", strategy: str = "file_copy") -> None:
        """An empty database. FILE_COPY (copy the files, then a checkpoint) took 17-20 ms here, 60 ms after
        writes; WAL_LOG (PostgreSQL 15's default) 35-40 ms."""
        if strategy not in ("file_copy", "wal_log"):
            raise ValueError(f"bad strategy {strategy!r}")
        began = time.monotonic()
        self.execute(f'CREATE DATABASE "{_identifier(name)}" TEMPLATE "{_identifier(template)}" '
                     f"STRATEGY {strategy}")
        self.timings["create_database"] = time.monotonic() - began

    def drop_database(self, name: str) -> None:
        """Drop it, terminating the connections still open to it (WITH (FORCE), PostgreSQL 13+)."""
        self.execute(f'DROP DATABASE IF EXISTS "{_identifier(name)}" WITH (FORCE)')

    def databases(self) -> list[str]:
        """The databases other than postgres and the templates."""
        return [r[0] for r in self.execute(
            "SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1') "
            "ORDER BY datname")]

    def set_config(self, **params: Any) -> None:
        """Server-wide settings at run time: ALTER SYSTEM SET, then reload; returns once new connections see
        them. None resets a setting. A setting that needs a restart (max_connections, shared_buffers, ...)
        restarts the server (fast). Booleans become on/off, numbers take the setting's default unit."""
        for name, value in params.items():
            if not _SETTING.fullmatch(name):
                raise ValueError(f"bad setting name {name!r}")
            if value is None:
                self.execute(f"ALTER SYSTEM RESET {name}")
            else:
                self.execute(f"ALTER SYSTEM SET {name} = {_quote(_literal(value))}")
            self._changed_settings.add(name)
        self._reload()

    def reset_config(self) -> None:
        """Undo every set_config (ALTER SYSTEM RESET)."""
        if self._changed_settings:
            self.set_config(**dict.fromkeys(sorted(self._changed_settings)))
            self._changed_settings.clear()

    def _reload(self) -> None:
        (loaded,), = self.execute("SELECT pg_conf_load_time()")
        self.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while self.execute("SELECT pg_conf_load_time()")[0][0] <= loaded:  # the postmaster reloads asynchronously
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not reload its configuration within 10 s")
            time.sleep(0.01)
        # 'setting could not be applied' means: needs a restart (done below)
        bad = self.execute("SELECT name, sourcefile, sourceline, error FROM pg_file_settings "
                           "WHERE error IS NOT NULL AND error <> 'setting could not be applied'")
        if bad:
            raise ValueError(f"invalid settings: {bad}")
        if self.execute("SELECT name FROM pg_settings WHERE pending_restart"):
            self.restart("fast")

    # -- internals -----------------------------------------------------------------------------------
    @staticmethod
    def _as_owner(argv: list[str], deathsig: str) -> list[str]:
        """argv run as the postgres user (when we are root), killed by `deathsig` if we die.

        setpriv rather than runuser: runuser stays in between as the parent (so a kill of the child we
        started, on Ctrl-C, would leave the real process running), and a change of user after
        PR_SET_PDEATHSIG cancels it; setpriv changes user, then sets it, then execs: one process."""
        setpriv = shutil.which("setpriv")
        if _is_root():
            if not setpriv:
                raise RuntimeError("setpriv (util-linux) is needed to run PostgreSQL as root")
            return [setpriv, f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups",
                    "--pdeathsig", deathsig, "--", *argv]
        return [setpriv, "--pdeathsig", deathsig, "--", *argv] if setpriv else argv

    def _server_argv(self) -> list[str]:
        # SIGQUIT to the postmaster: immediate shutdown, its backends with it.
        return self._as_owner([str(self.bindir / "postgres"), "-D", str(self.data_dir)], "QUIT")

    def _create_cluster(self) -> None:
        if self.bindir is None:
            raise RuntimeError(f"PostgreSQL binaries not found under {DEBIAN_BIN_GLOB}: run `make test` "
                               "(it installs Debian's postgresql) or apt-get install postgresql")
        base = _base_dir()
        sweep_stale_clusters(base)
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=base))
        _live_servers.add(self)
        me = os.getpid()
        (self.dir / "owner").write_text(f"{me} {_proc_start_time(me)}\n")
        if _is_root():
            import pwd
            try:
                entry = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise RuntimeError(f"no {SYSTEM_USER!r} system user (Debian's postgresql creates it)") from None
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        began = time.monotonic()
        result = subprocess.run(self._as_owner(
            [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--no-sync",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions"], "KILL"),
            capture_output=True, cwd=self.dir, timeout=120)
        if result.returncode:
            raise RuntimeError(f"initdb failed: {(result.stdout + result.stderr).decode(errors='replace')}")
        self.timings["initdb"] = time.monotonic() - began
        self._conf_base = (self.data_dir / "postgresql.conf").read_text()

    def _write_conf(self) -> None:
        settings = {**self.settings, "port": str(self.port), "unix_socket_directories": str(self.socket_dir)}
        lines = "".join(f"{name} = {_quote(value)}\n" for name, value in settings.items())
        (self.data_dir / "postgresql.conf").write_text(self._conf_base + "\n# audiodrop tests\n" + lines)

    def _launch(self, timeout: float) -> None:
        self._write_conf()
        began = time.monotonic()
        self._log = open(self.log_path, "ab")
        self._proc = _popen(self._server_argv(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                            cwd=self.dir, start_new_session=True)
        deadline = began + timeout
        while True:
            try:
                lines = (self.data_dir / "postmaster.pid").read_text().split("\n")
            except OSError:
                lines = []
            if len(lines) > 7 and lines[0] == str(self._proc.pid) and lines[7].strip() == "ready":
                break
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop("immediate")
                log = self._log_tail()
                if "could not bind" in log or "could not create any TCP/IP sockets" in log:
                    raise _PortInUse()
                raise RuntimeError(f"PostgreSQL did not start; the end of {self.log_path}:\n{log}")
            time.sleep(0.005)
        self.timings["start"] = time.monotonic() - began

    def _log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""


class _PortInUse(Exception):
    pass


def _identifier(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad database name {name!r}")
    return name


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def database_name_for(test_name: str) -> str:
    """A database name that says which test made it: t_<test name>_<random>, at most 63 bytes."""
    stem = re.sub(r"[^a-z0-9_]+", "_", test_name.lower()).strip("_")[:48]
    return f"t_{stem}_{secrets.token_hex(3)}"


# -- fixtures: conftest.py imports postgres_server and postgres_url from here ----------------------------

@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """This process's cluster (one per xdist worker), started by the first test that asks for it."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer()
    leaks.outlives_tests(processes=lambda: {server.pid})  # the cluster serves every test of the session
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for this test, as a SQLAlchemy URL (postgresql+psycopg://...); dropped
    afterwards, with the connections the test left open. A test that stopped the server or changed its
    settings (set_config) gets them restored for the next one."""
    server = postgres_server
    server.start()  # no-op unless an earlier test left it stopped
    name = database_name_for(request.node.name)
    server.create_database(name)
    yield server.url(name)
    server.start()
    server.reset_config()
    server.drop_database(name)
