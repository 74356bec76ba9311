"""The PostgreSQL test fixtures (tests/pg.py) and the network proxy (tests/netproxy.py) do what they say."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402

from tests.netproxy import TcpProxy  # noqa: E402
from tests.pg import PostgresServer, process_alive, sweep_stale_clusters, unavailable_reason  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], Any], timeout: float = 5.0, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(0.02)
    return value


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn in a thread; its result or exception lands in the dict."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        began = time.monotonic()
        try:
            outcome["result"] = fn()
        except Exception as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def give_up(conn: Any) -> None:
    """A client-side timeout: shut the connection's socket down under psycopg's feet."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def dbname_of(url: str) -> str:
    return make_url(url).database  # type: ignore[return-value]


# -- a database per test ---------------------------------------------------------------------------------

@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_fresh_database(postgres_server: PostgresServer, postgres_url: str, run: int) -> None:
    name = dbname_of(postgres_url)
    assert name.startswith("t_test_each_test_gets_a_fresh_database")
    # the databases of earlier tests (one cluster per worker, tests one after the other) were dropped
    assert [db for db in postgres_server.databases() if db.startswith("t_")] == [name]
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar() == 0
            conn.execute(text("CREATE TABLE marker (run int)"))
            conn.execute(text("INSERT INTO marker VALUES (:run)"), {"run": run})
    finally:
        engine.dispose()


def test_drop_database_terminates_open_connections(postgres_server: PostgresServer) -> None:
    postgres_server.create_database("dropped_while_in_use")
    with psycopg.connect(postgres_server.conninfo("dropped_while_in_use"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        postgres_server.drop_database("dropped_while_in_use")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert "dropped_while_in_use" not in postgres_server.databases()


def test_settings_psql_and_set_config(postgres_server: PostgresServer, postgres_url: str) -> None:
    assert postgres_server.psql(
        "SHOW fsync; SHOW full_page_writes; SHOW max_connections; SHOW idle_in_transaction_session_timeout"
    ).split("\n") == ["off", "off", "200", "0"]
    assert postgres_server.psql("SELECT current_user, current_database()", dbname_of(postgres_url)) \
        == f"audiodrop|{dbname_of(postgres_url)}"
    with pytest.raises(RuntimeError, match="no_such_table"):
        postgres_server.psql("SELECT * FROM no_such_table")
    postgres_server.set_config(idle_in_transaction_session_timeout="1s")
    try:
        with psycopg.connect(postgres_server.conninfo(dbname_of(postgres_url))) as conn:
            assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("1s",)
    finally:
        postgres_server.reset_config()
    assert postgres_server.execute("SHOW idle_in_transaction_session_timeout") == [("0",)]


# -- outages and crashes of the server -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_and_the_pool_recovers(postgres_server: PostgresServer, postgres_url: str, mode: str) -> None:
    engine = create_engine(postgres_url, pool_pre_ping=True, pool_size=5)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE kept (n int)"))
            conn.execute(text("INSERT INTO kept VALUES (1)"))
        pooled = [engine.connect() for _ in range(3)]
        old_pids = {c.execute(text("SELECT pg_backend_pid()")).scalar() for c in pooled}
        for c in pooled[1:]:
            c.close()  # back into the pool, soon dead
        held = pooled[0]  # checked out across the outage
        postgres_server.restart(mode)
        with pytest.raises(OperationalError):
            held.execute(text("SELECT 1"))
        held.close()
        again = [engine.connect() for _ in range(3)]  # pre-ping replaces the dead pooled connections
        try:
            new_pids = {c.execute(text("SELECT pg_backend_pid()")).scalar() for c in again}
            assert not new_pids & old_pids
            assert again[0].execute(text("SELECT count(*) FROM kept")).scalar() == 1  # committed data survives
        finally:
            for c in again:
                c.close()
    finally:
        engine.dispose()


def test_a_test_that_leaves_the_server_stopped_does_not_break_the_next(postgres_server: PostgresServer) -> None:
    postgres_server.stop("immediate")
    assert not postgres_server.is_running()
    # postgres_url (and the next test) start it again; here, directly:
    postgres_server.start()
    assert postgres_server.execute("SELECT 1") == [(1,)]


# -- the network: partition, heal, cut -------------------------------------------------------------------

@contextmanager
def client_through(proxy: TcpProxy, conninfo: str) -> Iterator[tuple[Any, Callable[..., Any]]]:
    """A psycopg connection through the proxy, and `spawn` to run calls in threads. On the way out the proxy
    cuts every connection first and the threads are joined, then the connection is closed: a thread still
    waiting on the frozen network holds the connection's lock (psycopg's own `with` would wait for it
    forever on a failed assertion: its rollback takes the lock)."""
    conn = psycopg.connect(conninfo, autocommit=True)
    threads: list[threading.Thread] = []

    def spawn(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
        thread, outcome = in_thread(fn)
        threads.append(thread)
        return thread, outcome

    try:
        yield conn, spawn
    finally:
        proxy.cut()
        for thread in threads:
            thread.join(10)
        conn.close()


def test_partition_freezes_until_a_client_timeout_then_heal(postgres_server: PostgresServer, postgres_url: str,
                                                            tcp_proxy: Callable[[str, int], TcpProxy]) -> None:
    proxy = tcp_proxy("127.0.0.1", postgres_server.port)
    through_proxy = postgres_server.conninfo(dbname_of(postgres_url), port=proxy.port)
    with client_through(proxy, through_proxy) as (conn, spawn):
        conn.execute("SET statement_timeout = '1s'")
        backend = conn.info.backend_pid
        query, outcome = spawn(lambda: conn.execute("SELECT pg_sleep(30)"))
        wait_for(lambda: postgres_server.execute(
            "SELECT state FROM pg_stat_activity WHERE pid = %s", (backend,)) == [("active",)], message="query")
        proxy.partition()
        connecting, connect_outcome = spawn(lambda: psycopg.connect(through_proxy, connect_timeout=2).close())

        # The server cancels the query after 1 s, but its error is frozen in the network: the client hangs.
        wait_for(lambda: postgres_server.execute(
            "SELECT state FROM pg_stat_activity WHERE pid = %s", (backend,)) == [("idle",)], message="timeout")
        query.join(1.0)
        assert query.is_alive()
        # A new connection is accepted by the proxy, then fails on libpq's connect_timeout (2 s at least).
        connecting.join(5)
        assert isinstance(connect_outcome.get("error"), psycopg.OperationalError), connect_outcome
        assert 1.9 < connect_outcome["seconds"] < 6
        # Only a client-side timeout ends the wait.
        give_up(conn)
        query.join(5)
        assert isinstance(outcome.get("error"), psycopg.OperationalError), outcome

    proxy.heal()
    with psycopg.connect(through_proxy, connect_timeout=5) as conn:
        assert conn.execute("SELECT 42").fetchone() == (42,)


def test_heal_delivers_what_the_partition_held_back(postgres_server: PostgresServer, postgres_url: str,
                                                    tcp_proxy: Callable[[str, int], TcpProxy]) -> None:
    proxy = tcp_proxy("127.0.0.1", postgres_server.port)
    through_proxy = postgres_server.conninfo(dbname_of(postgres_url), port=proxy.port)

    def connect_and_query() -> Any:
        with psycopg.connect(through_proxy, connect_timeout=10) as new:
            return new.execute("SELECT 7").fetchone()

    with client_through(proxy, through_proxy) as (conn, spawn):
        proxy.partition()
        query, outcome = spawn(lambda: conn.execute("SELECT 42").fetchone())
        connecting, connect_outcome = spawn(connect_and_query)
        wait_for(lambda: proxy.connection_count == 2, message="the second client to reach the proxy")
        query.join(0.5)
        assert query.is_alive() and connecting.is_alive()
        proxy.heal()
        query.join(5)
        connecting.join(5)
        assert outcome.get("result") == (42,), outcome
        assert connect_outcome.get("result") == (7,), connect_outcome


def test_cut_breaks_every_connection_of_a_busy_pool(postgres_server: PostgresServer, postgres_url: str,
                                                    tcp_proxy: Callable[[str, int], TcpProxy]) -> None:
    proxy = tcp_proxy("127.0.0.1", postgres_server.port)
    dbname = dbname_of(postgres_url)
    engine = create_engine(postgres_server.url(dbname, port=proxy.port), pool_pre_ping=True, pool_size=20,
                           max_overflow=0, connect_args={"connect_timeout": 5})
    try:
        def wait_at_the_gate() -> None:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock_shared(7)"))
                conn.execute(text("SELECT pg_advisory_unlock_shared(7)"))

        def busy() -> None:
            """20 queries through the proxy, all running at once: each waits at a lock the test holds until the
            server sees all 20 waiting (one after the other, there would never be more than one)."""
            with psycopg.connect(postgres_server.conninfo(dbname), autocommit=True) as gate:
                gate.execute("SELECT pg_advisory_lock(7)")
                threads = [in_thread(wait_at_the_gate) for _ in range(20)]
                wait_for(lambda: postgres_server.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event = 'advisory'",
                    (dbname,)) == [(20,)], 30, "20 queries waiting at the same time")
                gate.execute("SELECT pg_advisory_unlock(7)")
            for thread, outcome in threads:
                thread.join(30)
                assert "error" not in outcome and not thread.is_alive(), outcome

        busy()
        assert proxy.connection_count == 20
        held = engine.connect()
        held.execute(text("SELECT 1"))
        old = postgres_server.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,))
        assert old == [(20,)]

        proxy.cut()
        with pytest.raises(OperationalError):
            held.execute(text("SELECT 1"))
        held.close()
        wait_for(lambda: postgres_server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)) == [(0,)],
            message="the server to see the connections go")
        busy()  # pre-ping replaced every pooled connection
    finally:
        engine.dispose()


# -- nothing left behind ---------------------------------------------------------------------------------

def test_proxy_stop_leaves_no_thread(postgres_server: PostgresServer) -> None:
    before = set(threading.enumerate())
    proxy = TcpProxy("127.0.0.1", postgres_server.port)
    proxy.start()
    conns = [psycopg.connect(postgres_server.conninfo(port=proxy.port)) for _ in range(5)]
    try:
        proxy.partition()
        proxy.stop()  # while partitioned, with connections open
    finally:
        for conn in conns:
            conn.close()
    assert set(threading.enumerate()) == before
    assert not proxy.errors
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()


def test_close_stops_the_server_and_its_backends_and_removes_the_directory() -> None:
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    server = PostgresServer()
    server.start()
    pid, folder = server.pid, server.dir
    assert pid and folder and folder.is_dir()
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        children = children_of(pid)
        assert len(children) >= 5  # checkpointer, walwriter, ..., our backend
        server.close()
    assert not process_alive(pid)
    assert not any(process_alive(child) for child in children)
    assert not folder.exists()


def test_a_killed_test_process_leaves_no_server_running() -> None:
    if unavailable_reason():
        pytest.skip(unavailable_reason())
    code = ("import os, signal; from tests.pg import PostgresServer; "
            "from tests.test_pg_fixture import children_of; "
            "s = PostgresServer(); s.start(); print(s.dir, s.pid, *children_of(s.pid), flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    folder_text, *pid_texts = result.stdout.decode().split()
    folder, pids = Path(folder_text), [int(p) for p in pid_texts]
    assert len(pids) >= 5  # the postmaster, checkpointer, background writer, ...
    wait_for(lambda: not any(process_alive(pid) for pid in pids), timeout=10,
             message="the orphaned postmaster and its children to die")
    assert folder.exists()  # the killed process could not clean up: the next cluster's start does
    assert folder in sweep_stale_clusters(folder.parent)
    assert not folder.exists()
