"""Idle footprint: the daemon's memory (VmRSS, VmHWM from /proc/PID/status) and CPU (utime + stime of
/proc/PID/stat, as % of one core) while it has nothing to do.

The daemon runs with its default config and an API key against the loopback emulator (in this process), because
with a key its upload and processing jobs query the database every tick; without one they return at once.

  1. empty inbox: a 30 s window starting 5 s after start (between the start-up scan and the next one at 60 s);
  2. 1,000 already-processed files: 1,000 distinct 1 s WAVs are written into the inbox and processed to
     `active` (timed: a by-product figure for tiny files), then a 60 s window, which holds exactly one reconcile
     scan (scan_interval_seconds = 60, the default). The 1 s samples show the scan as a spike;
  3. a history of expired recordings (default 5,000, seeded through daemon.lifecycle in a fresh state folder;
     every uploaded recording ends `expired` after 48 h and keeps its row and compact copy): a 30 s window,
     with an empty inbox, 8 s after start;
  4. the scan alone: `python -c` calling daemon.intake.scan (the folder walk and per-file filters), and the same
     plus intake.observe per file on a read-only session, which is what the daemon's scan job does.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    API_KEY,
    PYTHON,
    ROOT,
    Daemon,
    HostLoad,
    Seed,
    cpu_seconds,
    ffmpeg,
    header,
    median,
    memory_mib,
    print_table,
    seed_recordings,
)

MODULE = "bench.idle_footprint"

SCAN_TIMER = """
import statistics, sys, time
from datetime import UTC, datetime
from daemon.pipeline import intake
from daemon.config import load_settings
from db.session import make_engine, make_sessionmaker
settings = load_settings(sys.argv[1])
session = make_sessionmaker(make_engine(settings.database_path, readonly=True))()
walk, full = [], []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); found = intake.scan(settings); walk.append(time.perf_counter() - t)
    t = time.perf_counter()
    for item in intake.scan(settings):
        intake.observe(session, item, closed=False, now=datetime.now(UTC), settings=settings)
    session.rollback(); full.append(time.perf_counter() - t)
print(len(found), walk[0], statistics.median(walk), full[0], statistics.median(full))
"""


def sample(pid: int, seconds: float, step: float = 1.0) -> dict[str, Any]:
    """CPU of `pid` (and any children it reaped) over a window, in `step` slices."""
    load = HostLoad()
    start = time.monotonic()
    first = previous = sum(cpu_seconds(pid))
    slices = []
    for n in range(1, int(seconds / step) + 1):
        time.sleep(max(0.0, start + n * step - time.monotonic()))
        now = sum(cpu_seconds(pid))
        slices.append(now - previous)
        previous = now
    wall = time.monotonic() - start
    used = previous - first
    return {"wall": wall, "cpu_s": used, "pct": 100 * used / wall, "median_pct": 100 * median(slices) / step,
            "max_pct": 100 * max(slices) / step, "spike_s": max(slices) - median(slices),
            "other": load.other_cores(used), "memory": memory_mib(pid)}


def run_history(work: Path, base_url: str, count: int, seconds: float) -> dict[str, Any]:
    """An idle daemon whose database holds `count` expired recordings (sources gone from the inbox, compact
    copies of 1 kB kept in state_dir/converted)."""
    import hashlib
    import os

    daemon = Daemon(work / "daemon-history", api_key=API_KEY, base_url=base_url)
    converted = daemon.state_dir / "converted"
    converted.mkdir(parents=True)
    seeds = []
    for i in range(count):
        digest = hashlib.sha256(f"history {i}".encode()).hexdigest()
        copy = converted / f"{digest[:24]}.ogg"
        copy.write_bytes(os.urandom(1000))
        seeds.append(Seed(work / "gone" / f"memo-{i:05d}.m4a", copy, 1000, digest))
    seed_recordings(daemon, seeds, until="expired", days_ago=3)
    with daemon:
        time.sleep(max(0.0, daemon.ready_at + 8 - time.time()))
        result = sample(daemon.pid, seconds)
        counts = daemon.db.counts()
    if counts != {"expired": count}:
        raise RuntimeError(f"the history changed while idle: {counts}")
    return result


def claim_rates(events: dict[int, dict[str, float]], window: int = 200) -> str:
    """Conversions claimed per second while the queue was long (the first `window` claims) and short (the last):
    a claim's cost that grows with the queue shows as a lower rate at first."""
    parts = []
    for label, key in (("conversions", "discovered:converting"), ("uploads", "converted:uploading")):
        times = sorted(e[key] for e in events.values() if key in e)
        if len(times) >= 2 * window:
            first = (window - 1) / (times[window - 1] - times[0])
            last = (window - 1) / (times[-1] - times[-window])
            parts.append(f"{label} started per second, first {window}: {first:.1f}, last {window}: {last:.1f}")
    return "; ".join(parts)


def make_tiny_files(folder: Path, count: int, work: Path) -> float:
    """`count` distinct 1 s 16 kHz mono WAVs written straight into `folder`; returns the time taken."""
    base = work / "base.wav"
    ffmpeg("-f", "lavfi", "-i", "anoisesrc=color=pink:amplitude=0.1:sample_rate=16000:seed=3", "-t", "1",
           "-c:a", "pcm_s16le", str(base))
    data = bytearray(base.read_bytes())
    start = time.monotonic()
    for i in range(count):
        data[-8:-4] = i.to_bytes(4, "little")  # two samples differ: new content, so no duplicate merging
        with open(folder / f"memo-{i:04d}.wav", "wb") as stream:
            stream.write(data)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="empty-inbox window (default 30)")
    parser.add_argument("--scan-window", type=float, default=60.0, help="window holding one scan (default 60)")
    parser.add_argument("--scan-repeats", type=int, default=5)
    parser.add_argument("--expired", type=int, default=5000, help="expired recordings in scenario 3 (0: skip)")
    args = parser.parse_args(argv)
    options = ["--files", str(args.files), "--idle-seconds", f"{args.idle_seconds:g}",
               "--scan-window", f"{args.scan_window:g}", "--scan-repeats", str(args.scan_repeats),
               "--expired", str(args.expired)]
    header("idle footprint: memory and CPU of an idle daemon (default config, API key, emulator)", MODULE, options)

    from tests.emulator import Emulator

    work = Path(tempfile.mkdtemp(prefix="audiodrop-bench-idle-"))
    try:
        with Emulator(api_key=API_KEY, data_dir=work / "emulator") as emulator:
            daemon = Daemon(work / "daemon", api_key=API_KEY, base_url=emulator.base_url)
            with daemon:
                started = daemon.ready_at
                at_start = memory_mib(daemon.pid)
                time.sleep(max(0.0, started + 5 - time.time()))
                empty = sample(daemon.pid, args.idle_seconds)
                print(f"empty inbox: {empty['pct']:.2f} % of a core over {empty['wall']:.0f} s", flush=True)

                written = make_tiny_files(daemon.inbox, args.files, work)
                dropped = time.time()
                daemon.wait_for_counts(lambda c: c.get("active", 0) + c.get("rejected", 0) + c.get("failed", 0)
                                       >= args.files, timeout=1200, interval=0.5, what=f"{args.files} active")
                processed = time.time() - dropped
                counts = daemon.db.counts()
                print(f"{args.files} files written in {written:.1f} s and processed to active in {processed:.1f} s "
                      f"({args.files / processed:.1f} files/s): {counts}", flush=True)
                print(claim_rates(daemon.db.events()), flush=True)
                time.sleep(5)  # the last uploads' follow-up ticks
                after = memory_mib(daemon.pid)
                full = sample(daemon.pid, args.scan_window)

                timer = [PYTHON, "-c", SCAN_TIMER, str(daemon.config_path), str(args.scan_repeats)]
                shown = shlex.join([Path(PYTHON).name, "-c", "<SCAN_TIMER in bench/idle_footprint.py>",
                                    str(daemon.config_path), str(args.scan_repeats)])
                out = subprocess.run(timer, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
                found, walk_first, walk_median, full_first, full_median = int(out[0]), *map(float, out[1:])
            log = daemon.log_tail(100_000)
            history = run_history(work, emulator.base_url, args.expired, args.idle_seconds) if args.expired else None
        errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]

        rows = [
            ["just started (ready)", "-", at_start["VmRSS"], at_start["VmHWM"], at_start["Threads"], "-", "-", "-",
             "-"],
            [f"empty inbox, {empty['wall']:.0f} s", 0, empty["memory"]["VmRSS"], empty["memory"]["VmHWM"],
             empty["memory"]["Threads"], empty["pct"], empty["median_pct"], empty["max_pct"], empty["other"]],
            [f"{args.files} processed files, just after", args.files, after["VmRSS"], after["VmHWM"],
             after["Threads"], "-", "-", "-", "-"],
            [f"{args.files} processed files, {full['wall']:.0f} s incl. 1 scan", args.files,
             full["memory"]["VmRSS"], full["memory"]["VmHWM"], full["memory"]["Threads"], full["pct"],
             full["median_pct"], full["max_pct"], full["other"]],
        ]
        if history:
            rows.append([f"{args.expired} expired recordings, {history['wall']:.0f} s", 0, history["memory"]["VmRSS"],
                         history["memory"]["VmHWM"], history["memory"]["Threads"], history["pct"],
                         history["median_pct"], history["max_pct"], history["other"]])
        print_table("idle daemon (RSS/HWM in MiB; CPU in % of one core: whole window, median 1 s slice, max 1 s "
                    "slice; other load in cores)",
                    ["state", "files", "RSS MiB", "HWM MiB", "threads", "CPU %", "median 1 s %", "max 1 s %",
                     "other load"], rows)
        print_table(f"one reconcile scan of {found} files, timed in a separate process ({args.scan_repeats} runs; "
                    f"{shown})",
                    ["what", "first s", "median s", "per file ms"],
                    [["intake.scan (walk + filters)", walk_first, walk_median, 1000 * walk_median / max(found, 1)],
                     ["+ intake.observe per file (the daemon's scan job)", full_first, full_median,
                      1000 * full_median / max(found, 1)],
                     ["spike seen in the daemon's 1 s slices (CPU s above the median slice)", "-", full["spike_s"],
                      "-"]])
        if errors:
            print(f"\nNOTE: the daemon log holds {len(errors)} ERROR/Traceback line(s), e.g. {errors[0]}")
        summary = {"idle_empty_cpu_pct": empty["pct"], "idle_empty_rss_mib": empty["memory"]["VmRSS"],
                   "idle_files_cpu_pct": full["pct"], "idle_files_rss_mib": full["memory"]["VmRSS"],
                   "hwm_mib": full["memory"]["VmHWM"], "scan_s": full_median}
        if history:
            summary.update(idle_expired_cpu_pct=history["pct"], idle_expired_rss_mib=history["memory"]["VmRSS"])
        print(f"\nsummary: idle {empty['pct']:.2f} % CPU / {empty['memory']['VmRSS']:.0f} MiB RSS empty; "
              f"{full['pct']:.2f} % CPU / {full['memory']['VmRSS']:.0f} MiB RSS (peak {full['memory']['VmHWM']:.0f}) "
              f"with {args.files} processed files; one scan of them {full_median * 1000:.0f} ms "
              f"({walk_median * 1000:.0f} ms of it the folder walk)"
              + (f"; {history['pct']:.2f} % CPU / {history['memory']['VmRSS']:.0f} MiB RSS with {args.expired} expired "
                 "recordings" if history else ""), flush=True)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
