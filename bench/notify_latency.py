"""Notification latency: from the commit that stores a result (and records its result.done event in the outbox) to
the moment a webhook receiver has the signed POST.

A minimal work engine runs in this process with only the notify work (daemon.notify.OutboxKind, its two workers)
on a real SQLite database migrated to head, and a real HTTP receiver (http.server on 127.0.0.1) answers 200.
Each result is a done prompt inserted together with notify.result_done() in one transaction, as the prompt
runner does; t0 is stamped by the first after_commit listener, so it is the commit itself, and the receiver
stamps the request's arrival (time.monotonic in both, one process).

  * one at a time: each result after the previous one arrived and a random pause of 0-50 ms, so the engine is
    idle, waiting to be woken: the latency of a single notification.
  * burst: results committed back to back, each in its own transaction, as fast as the database takes them:
    the notify work queues and its two workers drain the queue.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from bench.common import header, median, percentile, print_table
from daemon import notify
from daemon.clock import SystemClock
from daemon.engine import Engine
from db.models import Prompt
from db.session import make_engine, make_sessionmaker, session_scope, upgrade_to_head
from db.states import PromptState

MODULE = "bench.notify_latency"
RESULT = "# Weekly planning\n\n- The release moves by one week.\n- Twelve open bugs, three serious.\n"


class Receiver:
    """Answers 200 to every POST and stamps when each delivery key first arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["Content-Length"]))
                now = time.monotonic()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver.cond:
                    receiver.arrived.setdefault(self.headers["X-Audiodrop-Delivery"], now)
                    receiver.cond.notify_all()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def wait_for(self, keys: list[str], timeout: float = 30.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: all(key in self.arrived for key in keys), timeout):
                raise RuntimeError(f"{sum(k not in self.arrived for k in keys)} notification(s) never arrived")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Host:
    """What daemon.context.Context gives the notify work."""

    settings: Any
    sessions: sessionmaker[Session]
    holder: str = "bench"
    wake: Callable[..., None] = lambda *kinds, at=None: None

    def now(self) -> datetime:
        return datetime.now(UTC)


def store_result(host: Host, number: int) -> tuple[str, float]:
    """One done prompt and its result.done event, committed together; its key and the commit's time."""
    with session_scope(host.sessions) as session:
        now = host.now()
        prompt = Prompt(state=PromptState.DONE, template="summarize", prompt_text="Summarize.", model="m",
                        created_at=now, finished_at=now, result_text=RESULT, output_tokens=42,
                        result_path=f"/results/memo{number:04d}.summarize.md")
        session.add(prompt)
        session.flush()
        notify.result_done(session, host, prompt.id, now=now)
        key = f"prompt-{prompt.id}-done"
        session.info["bench_commit"] = None  # stamped by the first after_commit listener
    committed: float = session.info["bench_commit"]
    return key, committed


def one_at_a_time(host: Host, receiver: Receiver, count: int, rng: random.Random) -> list[float]:
    latencies = []
    for number in range(count):
        time.sleep(rng.uniform(0.0, 0.05))
        key, committed = store_result(host, number)
        receiver.wait_for([key])
        latencies.append(receiver.arrived[key] - committed)
    return latencies


def burst(host: Host, receiver: Receiver, count: int) -> tuple[list[float], float, float]:
    """The latencies, the time the commits took, and the time to the last arrival."""
    stored = [store_result(host, 100_000 + number) for number in range(count)]
    keys = [key for key, _ in stored]
    receiver.wait_for(keys)
    first = stored[0][1]
    return ([receiver.arrived[key] - committed for key, committed in stored], stored[-1][1] - first,
            max(receiver.arrived[key] for key in keys) - first)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="results stored one at a time (default 200)")
    parser.add_argument("--burst", type=int, default=200, help="results stored back to back (default 200)")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    options = ["--count", str(args.count), "--burst", str(args.burst), "--seed", str(args.seed)]
    header("notification latency: result committed -> webhook receiver has it", MODULE, options)
    work = Path(tempfile.mkdtemp(prefix="audiodrop-bench-notify-"))
    receiver = Receiver()
    try:
        database = work / "audiodrop.db"
        upgrade_to_head(database)
        sql = make_engine(database)
        hook = SimpleNamespace(url=receiver.url, name="bench", secret="bench-secret", secret_file=None, events=(),
                               timeout_seconds=5.0)
        host = Host(SimpleNamespace(webhooks=(hook,), notify=SimpleNamespace(on_result=(), desktop=False)),
                    make_sessionmaker(sql))
        engine = Engine(host.sessions, SystemClock(), host.holder, [notify.OutboxKind(host, lease)],
                        [notify.OutboxSweeper()])
        host.wake = engine.wake

        def stamp(session: Session) -> None:
            if "bench_commit" in session.info:
                session.info["bench_commit"] = time.monotonic()

        event.listen(Session, "after_commit", stamp, insert=True)  # before notify's own listener wakes the engine
        engine.start()
        try:
            single = one_at_a_time(host, receiver, args.count, random.Random(args.seed))
            queued, committing, draining = burst(host, receiver, args.burst)
        finally:
            engine.stop(5.0)
            event.remove(Session, "after_commit", stamp)
            sql.dispose()
        rows = [[name, len(values), median(values) * 1000, percentile(values, 95) * 1000, max(values) * 1000, span]
                for name, values, span in (("one at a time (engine idle)", single, "-"),
                                           ("burst", queued, f"{committing * 1000:.0f} / {draining * 1000:.0f}"))]
        print_table("latency in milliseconds from the commit to the receiver (p95: linear interpolation); burst: "
                    "ms the commits took / ms to the last arrival", ["scenario", "n", "p50 ms", "p95 ms", "max ms",
                                                                     "commits / drained ms"], rows)
        summary = {"p50_ms": median(single) * 1000, "p95_ms": percentile(single, 95) * 1000,
                   "burst_p50_ms": median(queued) * 1000, "burst_p95_ms": percentile(queued, 95) * 1000}
        print(f"\nsummary: one at a time p50 {summary['p50_ms']:.1f} ms, p95 {summary['p95_ms']:.1f} ms; burst of "
              f"{args.burst} p50 {summary['burst_p50_ms']:.1f} ms, p95 {summary['burst_p95_ms']:.1f} ms", flush=True)
        return summary
    finally:
        receiver.close()
        shutil.rmtree(work, ignore_errors=True)


def lease(now: datetime) -> datetime:
    return now + timedelta(seconds=60)


if __name__ == "__main__":
    main()
