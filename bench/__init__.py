"""Benchmarks of audiodrop: scripts that print figures (not tests). `python -m bench.run_all` runs them all;
each also runs alone, e.g. `python -m bench.pickup_latency`. See bench/README.md."""
