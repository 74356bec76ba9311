"""Fleet mode on PostgreSQL: N short recordings drained through conversion and upload by one node, then by a fleet
of nodes sharing one database; the fleet-wide rate limit and storage quota as the emulator saw them; what each
node costs when idle (CPU, RSS, PostgreSQL connections).

A throwaway PostgreSQL cluster (tests/pg.py) serves a fresh database to each run, and a fresh loopback emulator
(in this process) serves each run with a small storage quota, so that the shared ledger has to evict. Each node is
`python -m daemon run` with its own drop folder and state folder, the daemon's defaults for everything else (intake
timings, conversion workers = cores, 2 upload workers), and the same `database_url`, tagged with
`application_name=audiodrop-NODE` so that pg_stat_activity can tell the nodes' connections apart (a label only).

1. **1 node**: all N files (distinct 2-5 s 16 kHz mono WAV tones, made once and copied) land in its inbox at once.
2. **fleet** (`--nodes`, default 3): the same files split evenly over the nodes' inboxes (conversion stays with the
   node of the drop folder; uploads run anywhere). Drain = the first copy to the last recording uploaded (active,
   or expired after an eviction for quota).
3. Then, with the fleet still running, `--prompts` transcribe prompts are queued with `audiodrop ask` (round robin
   over the nodes' configs) under `requests_per_minute` = `--rpm`: the emulator's request log gives the most
   generate calls in any 60 s window.
4. Each run ends with an idle window (`--idle-seconds`): CPU % of a core and RSS per node, and its PostgreSQL
   connections (pg_stat_activity, by application_name and state).

On 2 cores the fleet's nodes share the same two cores (conversion workers = 2 per node), so the ratio says what
the coordination costs and whether anything serialises, not what 3 machines would gain.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    API_KEY,
    PYTHON,
    ROOT,
    HostLoad,
    cpu_seconds,
    ffmpeg,
    header,
    memory_mib,
    print_table,
    wait_until,
)
from daemon.pipeline.transcode import dying_with_parent
from tests.harness import DaemonProcess

MODULE = "bench.fleet"
DONE_STATES = ("active", "expired", "failed", "rejected")


# ---- input audio ------------------------------------------------------------------------------------------------


def make_files(folder: Path, count: int) -> list[Path]:
    """`count` distinct 16 kHz mono WAV tones of 2-5 s: four masters made with ffmpeg's lavfi, then copied with two
    samples changed per file (new content for the daemon's duplicate merging, same cost to convert)."""
    folder.mkdir(parents=True, exist_ok=True)
    masters = []
    for seconds in (2, 3, 4, 5):
        path = folder / f"master-{seconds}s.wav"
        ffmpeg("-f", "lavfi", "-i", f"aevalsrc=0.3*sin({180 + 60 * seconds}*2*PI*t)*sin(2*t)+0.04*(random(0)-0.5):"
               f"s=16000:d={seconds}", "-c:a", "pcm_s16le", str(path))
        masters.append(bytearray(path.read_bytes()))
    files = []
    for index in range(count):
        data = masters[index % len(masters)]
        data[-8:-4] = index.to_bytes(4, "little")
        path = folder / f"memo-{index:04d}.wav"
        path.write_bytes(data)
        files.append(path)
    return files


# ---- the nodes --------------------------------------------------------------------------------------------------


class Node(DaemonProcess):
    """One daemon of the fleet: the test harness's config and environment, its readiness read from PostgreSQL."""

    def __init__(self, folder: Path, name: str, url: str, base_url: str, *, rpm: int, storage_limit: int) -> None:
        super().__init__(folder, base_url=base_url, api_key=API_KEY, test_timings=False,
                         database_url=f"{url}?application_name=audiodrop-{name}",
                         gemini={"storage_limit_bytes": storage_limit, "storage_headroom_bytes": 0},
                         prompts={"requests_per_minute": rpm}, service={"node_name": name})
        self.name = name

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([PYTHON, "-m", "daemon", "run", "--config", str(self.config_path)],
                                            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=dying_with_parent(signal.SIGTERM))

    def cpu(self) -> float:
        own, children = cpu_seconds(self.pid)
        return own + children

    def stop(self, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class Database:
    """Queries on one database of the throwaway cluster (a fresh connection each: they are few and short)."""

    def __init__(self, server: Any, name: str) -> None:
        self.server = server
        self.name = name

    def rows(self, sql: str, params: Any = None) -> list[tuple]:
        return self.server.execute(sql, params, dbname=self.name)

    def done(self) -> int:
        try:
            return self.rows("SELECT count(*) FROM recordings WHERE state IN ('active', 'expired', 'failed', "
                             "'rejected')")[0][0]
        except Exception:  # the schema is not there yet
            return 0

    def counts(self) -> dict[str, int]:
        return {state: n for state, n in self.rows("SELECT state::text, count(*) FROM recordings GROUP BY 1")}

    def connections(self) -> dict[str, dict[str, int]]:
        """Per node: its connections to the server by state (active, idle, idle in transaction)."""
        result: dict[str, dict[str, int]] = {}
        for app, state, n in self.server.execute(
                "SELECT application_name, coalesce(state, '?'), count(*) FROM pg_stat_activity "
                "WHERE application_name LIKE 'audiodrop-%' GROUP BY 1, 2"):
            result.setdefault(app.removeprefix("audiodrop-"), {})[state] = n
        return result


def postgres_cpu(pid: int | None) -> float:
    """CPU s of the PostgreSQL server: the postmaster, its reaped backends and the ones alive now."""
    if pid is None:
        return 0.0
    own, reaped = cpu_seconds(pid)
    total = own + reaped
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                total += sum(int(v) for v in fields[11:13]) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    return total


def start_nodes(nodes: Sequence[Node], db: Database, timeout: float = 120) -> float:
    """Start every node at once; ready when each has heartbeated with its own pid. Returns the time it took."""
    began = time.monotonic()
    for node in nodes:
        node.launch()

    def ready() -> bool:
        for node in nodes:
            if node.exited():
                raise RuntimeError(f"node {node.name} exited at start:\n{node.log()[-4000:]}")
        try:
            beats = {name: pid for name, pid in db.rows(
                "SELECT name, pid FROM nodes WHERE heartbeat_at IS NOT NULL AND stopped_at IS NULL")}
        except Exception:
            return False
        return all(beats.get(node.name) == node.pid for node in nodes)

    wait_until(ready, timeout, 0.2, "the nodes to start")
    return time.monotonic() - began


def copy_in(files: Sequence[Path], nodes: Sequence[Node]) -> None:
    """Split the files over the nodes' inboxes (round robin), copied at once, two writers at a time."""
    def one(item: tuple[int, Path]) -> None:
        index, path = item
        shutil.copyfile(path, nodes[index % len(nodes)].inbox / path.name)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, enumerate(files)))


def idle_window(nodes: Sequence[Node], seconds: float) -> dict[str, dict[str, float]]:
    before = {node.name: node.cpu() for node in nodes}
    started = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    return {node.name: {"cpu_pct": 100 * (node.cpu() - before[node.name]) / wall,
                        "rss": memory_mib(node.pid)["VmRSS"], "threads": memory_mib(node.pid)["Threads"]}
            for node in nodes}


def queue_prompts(nodes: Sequence[Node], recording_ids: Sequence[int]) -> float:
    """One `audiodrop ask ID -t transcribe` per recording, round robin over the nodes' configs, two at a time.
    Returns the time the CLI calls took."""
    started = time.monotonic()

    def one(item: tuple[int, int]) -> None:
        index, rid = item
        node = nodes[index % len(nodes)]
        result = subprocess.run([PYTHON, "-m", "daemon", "ask", str(rid), "-t", "transcribe", "--config",
                                 str(node.config_path)], cwd=ROOT, env=node.env, capture_output=True, text=True,
                                timeout=120)
        if result.returncode:
            raise RuntimeError(f"ask {rid} on {node.name} failed: {result.stderr}")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, enumerate(recording_ids)))
    return time.monotonic() - started


# ---- one run ----------------------------------------------------------------------------------------------------


def run(server: Any, work: Path, files: Sequence[Path], count: int, args: argparse.Namespace) -> dict[str, Any]:
    from tests.emulator import Emulator

    label = f"{count} node" + ("s" if count > 1 else "")
    name = f"bench_fleet_{count}_{os.getpid()}"
    server.create_database(name)
    db = Database(server, name)
    folder = work / f"run-{count}"
    result: dict[str, Any] = {"label": label, "nodes": count}
    try:
        with Emulator(api_key=API_KEY, data_dir=folder / "emulator", processing_polls=0,
                      storage_limit_bytes=args.storage_limit) as emulator:
            names = ["node-1"] if count == 1 else [f"node-{i + 1}" for i in range(count)]
            nodes = [Node(folder / n, n, server.url(name), emulator.base_url, rpm=args.rpm,
                          storage_limit=args.storage_limit) for n in names]
            try:
                result["start_s"] = start_nodes(nodes, db)
                print(f"{label}: started in {result['start_s']:.1f} s; dropping {len(files)} files", flush=True)
                load = HostLoad()
                cpu0 = {node.name: node.cpu() for node in nodes}
                pg0 = postgres_cpu(server.pid)
                started = time.time()
                copy_in(files, nodes)
                result["copied_s"] = time.time() - started
                last_report = time.monotonic()
                while db.done() < len(files):
                    for node in nodes:
                        if node.exited():
                            raise RuntimeError(f"node {node.name} exited:\n{node.log()[-4000:]}")
                    if time.time() - started > args.timeout:
                        raise TimeoutError(f"{label}: not drained after {args.timeout:g} s: {db.counts()}")
                    if time.monotonic() - last_report > 30:
                        print(f"  {time.time() - started:.0f} s: {db.counts()}", flush=True)
                        last_report = time.monotonic()
                    time.sleep(0.25)
                result["drain_s"] = time.time() - started
                pg_cpu = postgres_cpu(server.pid) - pg0
                node_cpu = {node.name: node.cpu() - cpu0[node.name] for node in nodes}
                result["other"] = load.other_cores(sum(node_cpu.values()) + pg_cpu)
                result["node_cpu"] = node_cpu
                result["pg_cpu"] = pg_cpu
                result["counts"] = db.counts()
                (converted,) = db.rows("SELECT extract(epoch FROM max(at)) FROM recording_events "
                                       "WHERE to_state = 'converted'")[0]
                result["converted_s"] = float(converted) - started if converted is not None else math.nan
                result["converted_by"] = dict(db.rows("SELECT node, count(*) FROM recordings GROUP BY 1"))
                result["evicted"] = db.rows("SELECT count(*) FROM recording_events WHERE from_state = 'active' "
                                            "AND to_state = 'expired'")[0][0]
                result["uploads"] = len(emulator.all_files)
                result["distinct_uploads"] = len({f.display_name for f in emulator.all_files})
                result["high_water"] = emulator.stats.high_water_bytes
                result["converted_bytes"] = db.rows("SELECT coalesce(sum(converted_bytes), 0) FROM recordings")[0][0]
                print(f"{label}: drained in {result['drain_s']:.1f} s ({result['counts']})", flush=True)

                if args.prompts and count > 1:
                    ids = [rid for (rid,) in db.rows("SELECT id FROM recordings WHERE state = 'active' ORDER BY id "
                                                     "DESC LIMIT %s", (args.prompts,))]
                    first_generate = time.time()
                    result["ask_s"] = queue_prompts(nodes, ids)
                    wait_until(lambda: db.rows("SELECT count(*) FROM prompts WHERE state IN ('done', 'failed')")
                               [0][0] >= len(ids), args.timeout, 0.5, f"{len(ids)} prompts")
                    result["prompts"] = len(ids)
                    result["prompts_s"] = time.time() - first_generate
                    result["prompt_states"] = dict(db.rows("SELECT state::text, count(*) FROM prompts GROUP BY 1"))
                    result["peak_rpm"] = emulator.requests_in_window(60, route="generate")
                    result["generate_calls"] = len([r for r in emulator.stats.requests if r.route == "generate"])
                    result["peak_any_rpm"] = emulator.requests_in_window(60, route="any")
                    print(f"{label}: {len(ids)} prompts done in {result['prompts_s']:.1f} s", flush=True)

                time.sleep(5)  # let the last wake-ups and lease renewals settle
                result["idle"] = idle_window(nodes, args.idle_seconds)
                result["connections"] = db.connections()
                result["max_connections"] = int(server.execute("SHOW max_connections")[0][0])
            finally:
                for node in nodes:
                    node.stop()
    finally:
        try:
            server.drop_database(name)
        except Exception as err:  # reported, not fatal: the cluster goes away at the end anyway
            print(f"(could not drop {name}: {err})")
    return result


# ---- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recordings", type=int, default=300, help="recordings drained in each run (default 300)")
    parser.add_argument("--nodes", type=int, default=3, help="nodes of the fleet run (default 3)")
    parser.add_argument("--prompts", type=int, default=20, help="transcribe prompts queued on the fleet (0: none)")
    parser.add_argument("--rpm", type=int, default=10, help="prompts.requests_per_minute of every node")
    parser.add_argument("--storage-limit", type=int, default=1_000_000,
                        help="storage_limit_bytes of the emulator and the nodes (default 1,000,000: smaller than "
                             "the batch, so the shared ledger evicts)")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="idle window after each run")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a drain after this long")
    args = parser.parse_args(argv)
    options = ["--recordings", str(args.recordings), "--nodes", str(args.nodes), "--prompts", str(args.prompts),
               "--rpm", str(args.rpm), "--storage-limit", str(args.storage_limit),
               "--idle-seconds", f"{args.idle_seconds:g}"]
    header(f"fleet: {args.recordings} recordings drained by 1 node vs {args.nodes} nodes on one PostgreSQL "
           "(conversion + upload to the emulator)", MODULE, options)

    from tests.pg import PostgresServer, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"skipped: {reason}")
        return {}
    work = Path(tempfile.mkdtemp(prefix="audiodrop-bench-fleet-"))
    server = PostgresServer()
    try:
        began = time.monotonic()
        server.start()
        version = server.execute("SHOW server_version")[0][0]
        files = make_files(work / "files", args.recordings)
        source_bytes = sum(f.stat().st_size for f in files)
        print(f"PostgreSQL {version} up and {len(files)} files ({source_bytes / 1e6:.1f} MB of WAV) made in "
              f"{time.monotonic() - began:.1f} s", flush=True)
        single = run(server, work, files, 1, args)
        fleet = run(server, work, files, args.nodes, args)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)

    runs = [single, fleet]
    print_table(f"drain: {args.recordings} recordings of 2-5 s, drop -> every recording uploaded (active, or "
                "expired after an eviction)",
                ["run", "drain s", "rec/s", "ratio vs 1 node", "last converted s", "converted per node",
                 "uploads (distinct)", "evictions", "node CPU s", "PG CPU s", "other load"],
                [[r["label"], r["drain_s"], args.recordings / r["drain_s"], single["drain_s"] / r["drain_s"],
                  r["converted_s"], " / ".join(str(r["converted_by"].get(n, 0)) for n in sorted(r["converted_by"])),
                  f"{r['uploads']} ({r['distinct_uploads']})", r["evicted"], sum(r["node_cpu"].values()),
                  r["pg_cpu"], r["other"]] for r in runs])
    rows = [[r["label"], "storage high-water vs storage_limit_bytes", f"{r['high_water']:,} B",
             f"{args.storage_limit:,} B", f"{100 * r['high_water'] / args.storage_limit:.1f}%",
             f"converted copies total {r['converted_bytes']:,} B"] for r in runs]
    if "peak_rpm" in fleet:
        rows.append([fleet["label"], "generate calls in the busiest 60 s vs requests_per_minute",
                     fleet["peak_rpm"], args.rpm, f"{100 * fleet['peak_rpm'] / args.rpm:.0f}%",
                     f"{fleet['prompts']} prompts, {fleet['generate_calls']} generate calls in "
                     f"{fleet['prompts_s']:.0f} s (asks took {fleet['ask_s']:.0f} s); {fleet['prompt_states']}; "
                     f"all requests' busiest 60 s: {fleet['peak_any_rpm']}"])
    print_table("fleet-wide limits as the emulator saw them", ["run", "figure", "seen", "limit", "of limit", "more"],
                rows)
    idle_rows = []
    for r in runs:
        for node, figures in sorted(r["idle"].items()):
            conns = r["connections"].get(node, {})
            idle_rows.append([r["label"], node, figures["cpu_pct"], figures["rss"], int(figures["threads"]),
                              sum(conns.values()), ", ".join(f"{k} {v}" for k, v in sorted(conns.items())) or "-"])
    print_table(f"idle after draining ({args.idle_seconds:g} s window; PostgreSQL connections from pg_stat_activity "
                f"at its end; max_connections {fleet['max_connections']})",
                ["run", "node", "CPU % of a core", "RSS MiB", "threads", "PG connections", "by state"], idle_rows)

    ratio = single["drain_s"] / fleet["drain_s"]
    fleet_idle = list(fleet["idle"].values())
    conns = [sum(c.values()) for c in fleet["connections"].values()]
    summary = {"drain_1_s": single["drain_s"], f"drain_{args.nodes}_s": fleet["drain_s"], "speedup": ratio,
               "peak_rpm": float(fleet.get("peak_rpm", math.nan)), "rpm_limit": float(args.rpm),
               "high_water_pct": 100 * max(r["high_water"] for r in runs) / args.storage_limit,
               "idle_cpu_pct_max": max(f["cpu_pct"] for f in fleet_idle),
               "idle_rss_mib_max": max(f["rss"] for f in fleet_idle),
               "pg_conns_per_node_max": float(max(conns, default=0))}
    print(f"\nsummary: {args.recordings} recordings drained in {single['drain_s']:.0f} s by 1 node, "
          f"{fleet['drain_s']:.0f} s by {args.nodes} (x{ratio:.2f}); busiest minute "
          f"{fleet.get('peak_rpm', '-')} generate calls (limit {args.rpm}); storage high-water "
          f"{summary['high_water_pct']:.0f}% of the limit; idle per node <= {summary['idle_cpu_pct_max']:.1f}% CPU, "
          f"<= {summary['idle_rss_mib_max']:.0f} MiB, <= {max(conns, default=0)} PG connections", flush=True)
    return summary


if __name__ == "__main__":
    main()
