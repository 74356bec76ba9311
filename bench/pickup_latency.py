"""Pickup latency: from the moment a new file is complete in the inbox to the start of its conversion.

The daemon runs with its DEFAULT intake settings (intake.close_quiet_seconds = 1.0, settle_seconds = 5.0,
scan_interval_seconds = 60; the intake job ticks every 0.25 s) and no API key, so nothing but intake and
conversion runs. One file at a time, each written only after the previous one is converted, with a random pause
so the files fall at different points of the 0.25 s tick:

  * written in place: open(inbox/name, "wb"), write, close(); t0 = time.time() right after close(). The watcher
    sees the close-after-write, and the file must then stay quiet close_quiet_seconds.
  * moved in: written in a staging folder on the same filesystem, then os.rename() into the inbox; t0 right
    after the rename. A rename brings no close event, so the file must stay unchanged settle_seconds.

Latency = the `discovered -> converting` event's timestamp (recording_events, UTC) - t0. The `-> discovered`
event splits it into "seen" (event delivery + the next intake tick) and the quiet wait.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Clip,
    Daemon,
    HostLoad,
    cpu_seconds,
    header,
    make_clips,
    make_master,
    median,
    percentile,
    print_table,
    wait_until,
)
from daemon.config import IntakeSettings

MODULE = "bench.pickup_latency"
KINDS = ("wav", "m4a", "mp3", "flac", "ogg")


def _path_id(daemon: Daemon, path: Path) -> int | None:
    rows = daemon.db.query("SELECT id FROM recordings WHERE source_path = ?", str(path))
    return rows[0][0] if rows else None


def measure(daemon: Daemon, clips: list[Clip], staging: Path | None, rng: random.Random) -> list[dict[str, float]]:
    """Drop the clips one by one (written in place, or renamed in from `staging`); one sample per clip."""
    samples = []
    for clip in clips:
        time.sleep(rng.uniform(0.3, 0.8))  # a random phase against the intake tick
        target = daemon.inbox / clip.path.name
        data = clip.path.read_bytes()
        if staging is None:
            with open(target, "wb") as stream:
                stream.write(data)
            t0 = time.time()
        else:
            staged = staging / clip.path.name
            with open(staged, "wb") as stream:
                stream.write(data)
            os.rename(staged, target)
            t0 = time.time()
        recording = wait_until(lambda: _path_id(daemon, target), 30, 0.02, f"{target.name} discovered")

        def state() -> str | None:
            rows = daemon.db.query("SELECT state FROM recordings WHERE id = ?", recording)
            return rows[0][0] if rows and rows[0][0] not in ("discovered", "converting") else None

        final = wait_until(state, 60, 0.05, f"{target.name} converted")
        if final != "converted":
            raise RuntimeError(f"{target.name} ended {final}:\n{daemon.log_tail()}")
        events = daemon.db.events()[recording]
        samples.append({"seen": events["discovered"] - t0, "pickup": events["discovered:converting"] - t0,
                        "quiet": events["discovered:converting"] - events["discovered"]})
    return samples


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--close-files", type=int, default=30, help="files written in place (default 30)")
    parser.add_argument("--rename-files", type=int, default=10, help="files renamed into the inbox (default 10)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each clip (default 4)")
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args(argv)
    options = ["--close-files", str(args.close_files), "--rename-files", str(args.rename_files),
               "--seconds", f"{args.seconds:g}", "--seed", str(args.seed)]
    header("pickup latency: file complete -> conversion starts (default intake settings)", MODULE, options)
    defaults = IntakeSettings()
    print(f"intake defaults: close_quiet_seconds {defaults.close_quiet_seconds:g}, settle_seconds "
          f"{defaults.settle_seconds:g}, scan_interval_seconds {defaults.scan_interval_seconds:g}; "
          "intake tick 0.25 s; no API key", flush=True)

    work = Path(tempfile.mkdtemp(prefix="audiodrop-bench-pickup-"))
    try:
        total = args.close_files + args.rename_files
        master = make_master(work / "src")
        clips = make_clips(master, work / "src",
                           [(f"memo{i:03d}", args.seconds, KINDS[i % len(KINDS)]) for i in range(total)], args.seed)
        staging = work / "staging"
        staging.mkdir()
        rng = random.Random(args.seed)
        daemon = Daemon(work / "daemon")  # default config: no [intake] or [conversion] table at all
        with daemon:
            time.sleep(1.0)
            load = HostLoad()
            own0, children0 = cpu_seconds(daemon.pid)
            started = time.monotonic()
            close = measure(daemon, clips[:args.close_files], None, rng)
            rename = measure(daemon, clips[args.close_files:], staging, rng)
            own1, children1 = cpu_seconds(daemon.pid)
            other = load.other_cores(own1 - own0 + children1 - children0)
            elapsed = time.monotonic() - started

        def row(name: str, floor: float, samples: list[dict[str, Any]]) -> list[Any]:
            pickup = [s["pickup"] for s in samples]
            return [name, len(samples), floor, median([s["seen"] for s in samples]),
                    median([s["quiet"] for s in samples]), median(pickup), percentile(pickup, 95), max(pickup),
                    max(pickup) - floor]

        rows = [row("written in place (close event)", defaults.close_quiet_seconds, close)]
        if rename:
            rows.append(row("renamed in (settle, no close)", defaults.settle_seconds, rename))
        print_table(f"latency in seconds from close()/rename() to `discovered -> converting` "
                    f"(p95: linear interpolation; other load {other:.2f} cores during the {elapsed:.0f} s run)",
                    ["path", "n", "rule s", "median seen", "median quiet", "median", "p95", "max",
                     "max over rule"], rows)
        summary = {"close_median": median([s["pickup"] for s in close]),
                   "close_p95": percentile([s["pickup"] for s in close], 95),
                   "close_max": max(s["pickup"] for s in close)}
        line = (f"summary: written in place: median {summary['close_median']:.2f} s, p95 "
                f"{summary['close_p95']:.2f} s, max {summary['close_max']:.2f} s (rule "
                f"{defaults.close_quiet_seconds:g} s)")
        if rename:
            summary.update(rename_median=median([s["pickup"] for s in rename]),
                           rename_p95=percentile([s["pickup"] for s in rename], 95),
                           rename_max=max(s["pickup"] for s in rename))
            line += (f"; renamed in: median {summary['rename_median']:.2f} s, p95 {summary['rename_p95']:.2f} s, "
                     f"max {summary['rename_max']:.2f} s (rule {defaults.settle_seconds:g} s)")
        print("\n" + line, flush=True)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
