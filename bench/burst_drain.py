"""Burst drain: 2,000 distinct short recordings land in the inbox at once; how fast does the daemon take them
all to `active`, and how quickly does `audiodrop status --json` answer while it does?

The daemon runs with its default config, an API key and the loopback emulator (in this process). The files are
1 s 16 kHz mono WAVs, each with different content (no duplicate merging), written straight into the inbox. The
drain rate is files per second from the first write to the last `active`; status is run every few seconds during
the drain as a subprocess (what a user or a monitoring script pays), and its wall time is recorded.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import (
    API_KEY,
    PYTHON,
    ROOT,
    Daemon,
    HostLoad,
    cpu_seconds,
    header,
    median,
    memory_mib,
    percentile,
    print_table,
)
from bench.idle_footprint import make_tiny_files

MODULE = "bench.burst_drain"


def status_time(daemon: Daemon) -> float:
    started = time.perf_counter()
    subprocess.run([PYTHON, "-m", "daemon", "status", "--json", "--config", str(daemon.config_path)], cwd=ROOT,
                   env=daemon.env, capture_output=True, check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--status-every", type=float, default=5.0, help="seconds between status calls")
    args = parser.parse_args(argv)
    options = ["--files", str(args.files), "--status-every", f"{args.status_every:g}"]
    header(f"burst drain: {args.files} files dropped at once -> active (default config, API key, emulator)",
           MODULE, options)

    from tests.emulator import Emulator

    work = Path(tempfile.mkdtemp(prefix="audiodrop-bench-burst-"))
    try:
        with Emulator(api_key=API_KEY, data_dir=work / "emulator", processing_polls=0) as emulator:
            daemon = Daemon(work / "daemon", api_key=API_KEY, base_url=emulator.base_url)
            with daemon:
                idle_status = [status_time(daemon) for _ in range(3)]
                load = HostLoad()
                own0, children0 = cpu_seconds(daemon.pid)
                started = time.time()
                written = make_tiny_files(daemon.inbox, args.files, work)
                during: list[float] = []
                peak = 0.0
                while True:
                    counts = daemon.db.counts()
                    done = counts.get("active", 0) + counts.get("rejected", 0) + counts.get("failed", 0)
                    if done >= args.files:
                        break
                    if daemon.exited():
                        raise RuntimeError(f"the daemon exited:\n{daemon.log_tail()}")
                    if time.time() - started > 3600:
                        raise TimeoutError(f"not drained after an hour: {counts}")
                    during.append(status_time(daemon))
                    peak = max(peak, memory_mib(daemon.pid)["VmRSS"])
                    time.sleep(args.status_every)
                drained = time.time() - started
                own1, children1 = cpu_seconds(daemon.pid)
                other = load.other_cores(own1 - own0 + children1 - children0)
                counts = daemon.db.counts()
                uploads = emulator.stats.uploads_completed
        rows = [["files", args.files, "-"], ["written in s", written, "-"], ["drained in s", drained, "-"],
                ["files per second", args.files / drained, "-"],
                ["daemon CPU s (own + ffmpeg)", own1 - own0 + children1 - children0, "-"],
                ["peak RSS MiB (sampled)", peak, "-"], ["uploads completed", uploads, "-"],
                ["status --json s, idle (median of 3)", median(idle_status), "-"],
                ["status --json s, during the drain (median / p95 / max)", median(during),
                 f"{percentile(during, 95):.3f} / {max(during):.3f}"]]
        print_table(f"burst drain (final counts {counts}; other load {other:.2f} cores)", ["figure", "value", "more"],
                    rows)
        summary = {"files_per_s": args.files / drained, "drain_s": drained, "status_median_s": median(during),
                   "status_max_s": max(during), "status_idle_s": median(idle_status)}
        print(f"\nsummary: {args.files} files drained in {drained:.0f} s ({args.files / drained:.1f} files/s); "
              f"status --json {median(during):.2f} s median, {max(during):.2f} s max during the drain "
              f"({median(idle_status):.2f} s idle)", flush=True)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
