"""Run every benchmark in turn with its default options and print their summary lines together at the end.

    python -m bench.run_all                 # all of them (about 25-30 minutes on 2 cores)
    python -m bench.run_all --only pickup_latency,upload_overhead
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

from bench.common import command_line

BENCHMARKS = ("conversion_throughput", "pickup_latency", "idle_footprint", "burst_drain", "upload_overhead", "fleet",
              "cost", "speakers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    print(f"reproduce: {command_line('bench.run_all', ['--only', ','.join(chosen)])}")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.2f} before starting: other processes share the "
              f"{os.cpu_count()} cores and skew every figure (each table shows the 'other load' it saw)")
    started = time.monotonic()
    summaries: dict[str, dict[str, float]] = {}
    for name in chosen:
        module = importlib.import_module(f"bench.{name}")
        began = time.monotonic()
        summaries[name] = module.main([])
        print(f"({name} took {time.monotonic() - began:.0f} s)", flush=True)

    print(f"\n=== all summaries ({time.monotonic() - started:.0f} s in all) ===")
    for name, figures in summaries.items():
        print(f"{name}: " + ", ".join(f"{key} {value:.3g}" for key, value in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
