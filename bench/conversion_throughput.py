"""Conversion throughput: a batch of short recordings through the daemon vs. the same ffprobe + ffmpeg commands
run bare with `xargs -P2`.

Three modes in one invocation, on the same files, repeated --rounds times (default 2) in alternating order
(bare, daemon, daemon+emulator, then the reverse); the fastest round of each mode is shown:
  1. bare: for each file `ffprobe` (daemon.transcode.probe_args) then `ffmpeg` (daemon.transcode.convert_args,
     Opus 16k), written as one shell line per file and run with `xargs -d '\\n' -n 1 -P <workers> sh -c`;
  2. the daemon WITHOUT an API key (conversion.workers = <workers>, everything else default): uploads wait, so
     the run isolates intake + conversion; the whole batch is copied into the inbox at once and the times come
     from the recording_events table (discovered -> converting -> converted);
  3. the daemon WITH a key against the loopback emulator (in this process; files are ACTIVE at finalize, so no
     PROCESSING wait is simulated): the full pipeline, drop -> last `active`.
"""

from __future__ import annotations

import argparse
import random
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    API_KEY,
    Clip,
    Daemon,
    HostLoad,
    children_cpu_now,
    cpu_seconds,
    fmt,
    header,
    make_clips,
    make_master,
    median,
    memory_mib,
    print_table,
)
from daemon.pipeline import transcode

MODULE = "bench.conversion_throughput"
KINDS = ("wav", "m4a", "mp3")


def bare_line(source: Path, output: Path) -> str:
    """One file's work as the daemon does it, as a shell line: the probe, then the conversion."""
    probe = shlex.join(transcode.probe_args(source))
    convert = shlex.join(transcode.convert_args(source, output, transcode.FORMATS["opus"]))
    return f"{probe} >/dev/null && {convert} >/dev/null"


def run_bare(clips: list[Clip], folder: Path, workers: int) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    commands = folder / "commands.txt"
    commands.write_text("".join(bare_line(c.path, folder / (c.path.stem + ".ogg")) + "\n" for c in clips))
    argv = ["xargs", "-d", "\\n", "-n", "1", "-P", str(workers), "sh", "-c"]
    shell = f"{shlex.join(argv)} < {shlex.quote(str(commands))}"
    cpu0 = children_cpu_now()
    load = HostLoad()
    start = time.perf_counter()
    with open(commands, "rb") as stdin:
        subprocess.run(argv, stdin=stdin, check=True)
    wall = time.perf_counter() - start
    outputs = [folder / (c.path.stem + ".ogg") for c in clips]
    missing = [p.name for p in outputs if not p.is_file()]
    if missing:
        raise RuntimeError(f"bare run did not produce {missing}")
    cpu = children_cpu_now() - cpu0
    return {"wall": wall, "cpu_children": cpu, "cpu_own": 0.0, "shell": shell, "other": load.other_cores(cpu),
            "example": commands.read_text().split("\n")[0], "out_bytes": sum(p.stat().st_size for p in outputs)}


def run_daemon(clips: list[Clip], folder: Path, workers: int, emulator: Any | None) -> dict[str, Any]:
    daemon = Daemon(folder, api_key=API_KEY if emulator else None,
                    base_url=emulator.base_url if emulator else None, conversion={"workers": workers})
    target = "active" if emulator else "converted"
    n = len(clips)
    with daemon:
        time.sleep(1.0)  # past the start-up scan and the first ticks
        own0, children0 = cpu_seconds(daemon.pid)
        load = HostLoad()
        drop = time.time()
        for clip in clips:  # a copy: each file gets a close-after-write event (the quick intake path)
            shutil.copyfile(clip.path, daemon.inbox / clip.path.name)
        copied = time.time()
        daemon.wait_for_counts(lambda c: c.get(target, 0) + c.get("rejected", 0) + c.get("failed", 0) >= n,
                               timeout=900, interval=0.1, what=f"{n} recordings {target}")
        own1, children1 = cpu_seconds(daemon.pid)
        other = load.other_cores(own1 - own0 + children1 - children0)
        memory = memory_mib(daemon.pid)
        events = daemon.db.events()
        recordings = daemon.db.recordings()
        counts = daemon.db.counts()
    if counts.get(target, 0) != n:
        raise RuntimeError(f"not every recording reached {target}: {counts}\n{daemon.log_tail()}")
    claimed = [e["discovered:converting"] for e in events.values()]
    converted = [e["converting:converted"] for e in events.values()]
    steps = [e["converting:converted"] - e["discovered:converting"] for e in events.values()]
    quiet = [e["discovered:converting"] - e["discovered"] for e in events.values()]
    result = {
        "drop": drop, "copy_s": copied - drop,
        "first_discovered": min(e["discovered"] for e in events.values()) - drop,
        "first_claim": min(claimed) - drop,
        "last_converted": max(converted) - drop,
        "claim_to_converted": max(converted) - min(claimed),
        "step_median": median(steps), "step_sum": sum(steps), "quiet_median": median(quiet),
        "cpu_own": own1 - own0, "cpu_children": children1 - children0, "other": other,
        "hwm": memory["VmHWM"], "rss": memory["VmRSS"],
        "out_bytes": sum(r["converted_bytes"] or 0 for r in recordings.values()),
        "log": daemon.log_path,
    }
    result["utilisation"] = result["step_sum"] / (workers * result["claim_to_converted"])
    if emulator:
        result["last_active"] = max(e["active"] for e in events.values()) - drop
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=60)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2, help="conversion.workers and xargs -P (default 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-emulator", action="store_true", help="skip the full-pipeline run")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of every mode, alternating the order; the fastest of each is shown (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed) for inspection")
    args = parser.parse_args(argv)
    options = ["--files", str(args.files), "--min-seconds", f"{args.min_seconds:g}",
               "--max-seconds", f"{args.max_seconds:g}", "--workers", str(args.workers), "--seed", str(args.seed),
               "--rounds", str(args.rounds),
               *(["--no-emulator"] if args.no_emulator else [])]
    header("conversion throughput: daemon vs bare ffprobe+ffmpeg with xargs", MODULE, options)

    work = Path(tempfile.mkdtemp(prefix="audiodrop-bench-conv-"))
    try:
        rng = random.Random(args.seed)
        specs = [(f"rec{i:03d}", round(rng.uniform(args.min_seconds, args.max_seconds), 2), KINDS[i % len(KINDS)])
                 for i in range(args.files)]
        made = time.perf_counter()
        master = make_master(work / "src")
        clips = make_clips(master, work / "src", specs, args.seed, workers=args.workers)
        made = time.perf_counter() - made
        audio = sum(c.seconds for c in clips)
        by_kind = {k: [c for c in clips if c.kind == k] for k in KINDS}
        print(f"inputs: {len(clips)} files, {audio:,.1f} s of audio ({master.kind}), made in {made:.1f} s: "
              + ", ".join(f"{len(v)} {k} ({sum(c.path.stat().st_size for c in v) / 1e6:.1f} MB)"
                          for k, v in by_kind.items()))
        print(f"work folder: {work}" + ("" if args.keep else " (removed at the end; --keep keeps it)"), flush=True)

        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "no key": [], "emulator": []}
        order = ["bare", "no key"] + ([] if args.no_emulator else ["emulator"])
        for round_no in range(args.rounds):  # bare, daemon, daemon+emulator, then the reverse, and so on
            for mode in order if round_no % 2 == 0 else order[::-1]:
                if mode == "bare":
                    result = run_bare(clips, work / f"bare-{round_no}", args.workers)
                    wall = result["wall"]
                elif mode == "no key":
                    result = run_daemon(clips, work / f"daemon-nokey-{round_no}", args.workers, None)
                    wall = result["last_converted"]
                else:
                    from tests.emulator import Emulator

                    with Emulator(api_key=API_KEY, data_dir=work / f"emulator-{round_no}",
                                  processing_polls=0) as emulator:
                        result = run_daemon(clips, work / f"daemon-emulator-{round_no}", args.workers, emulator)
                    wall = result["last_active"]
                result["key_wall"] = wall
                runs[mode].append(result)
                print(f"round {round_no + 1}, {mode}: {wall:.2f} s (other load {result['other']:.2f} cores)",
                      flush=True)
        # The fastest round of each mode: the one least disturbed by anything else on the machine.
        bare = min(runs["bare"], key=lambda r: r["key_wall"])
        conv = min(runs["no key"], key=lambda r: r["key_wall"])
        full = min(runs["emulator"], key=lambda r: r["key_wall"]) if runs["emulator"] else None
        print(f"bare: {bare['shell']}\n  first line: {bare['example']}", flush=True)

        bare_cpu = bare["cpu_children"]

        def row(mode: str, wall: float, run: dict[str, Any], daemon: bool = True) -> list[Any]:
            cpu = run["cpu_children"] + run["cpu_own"]
            return [mode, len(clips), audio, wall, audio / wall, run["cpu_children"],
                    run["cpu_own"] if daemon else None, run["other"], f"{wall / bare['wall']:.2f}",
                    f"{cpu / bare_cpu:.2f}"]

        rows = [
            row(f"bare probe+ffmpeg, xargs -P{args.workers}", bare["wall"], bare, daemon=False),
            row("daemon, no key: drop -> last converted", conv["last_converted"], conv),
            row("daemon, no key: first claim -> last converted", conv["claim_to_converted"], conv),
        ]
        if full:
            rows += [row("daemon + emulator: drop -> last converted", full["last_converted"], full),
                     row("daemon + emulator: drop -> last active", full["last_active"], full)]
        print_table(f"throughput, fastest of {args.rounds} round(s) per mode (wall from the events table; CPU s of "
                    "ffmpeg+ffprobe and of the daemon's own Python; other load = cores busy with unrelated "
                    "processes, should be ~0; CPU ratio = all CPU s against bare, which a busy machine skews less)",
                    ["mode", "files", "audio s", "wall s", "x real time", "CPU ffmpeg s", "CPU daemon s",
                     "other load", "wall ratio", "CPU ratio"], rows)

        detail = [["first file discovered after the drop", conv["first_discovered"],
                   full["first_discovered"] if full else None],
                  ["first claim (discovered -> converting) after the drop", conv["first_claim"],
                   full["first_claim"] if full else None],
                  ["median wait in discovered (quiet + queue)", conv["quiet_median"],
                   full["quiet_median"] if full else None],
                  ["median per-file step, converting -> converted", conv["step_median"],
                   full["step_median"] if full else None],
                  [f"bare per-file (wall x {args.workers} / files)", bare["wall"] * args.workers / len(clips), None],
                  ["worker utilisation (sum of steps / workers / span)", conv["utilisation"],
                   full["utilisation"] if full else None],
                  ["daemon Python CPU per file, ms", 1000 * conv["cpu_own"] / len(clips),
                   1000 * full["cpu_own"] / len(clips) if full else None],
                  ["copying the batch into the inbox", conv["copy_s"], full["copy_s"] if full else None],
                  ["daemon peak RSS, MiB (VmHWM)", conv["hwm"], full["hwm"] if full else None],
                  ["output bytes (bare: %s)" % fmt(bare["out_bytes"]), conv["out_bytes"],
                   full["out_bytes"] if full else None]]
        print_table("where the daemon's time goes (seconds unless stated)", ["figure", "no key", "emulator"], detail)

        summary = {"conversion_ratio": conv["last_converted"] / bare["wall"],
                   "conversion_cpu_ratio": (conv["cpu_children"] + conv["cpu_own"]) / bare_cpu,
                   "conversion_ratio_from_claim": conv["claim_to_converted"] / bare["wall"],
                   "bare_x_realtime": audio / bare["wall"], "daemon_x_realtime": audio / conv["last_converted"]}
        line = (f"summary: daemon/bare = {summary['conversion_ratio']:.2f} (drop -> converted), "
                f"{summary['conversion_ratio_from_claim']:.2f} (first claim -> converted), "
                f"{summary['conversion_cpu_ratio']:.2f} in CPU s; "
                f"{summary['bare_x_realtime']:.0f}x vs {summary['daemon_x_realtime']:.0f}x real time")
        if full:
            summary["pipeline_ratio"] = full["last_active"] / bare["wall"]
            line += f"; full pipeline to active/bare = {summary['pipeline_ratio']:.2f}"
        print("\n" + line, flush=True)
        return summary
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
