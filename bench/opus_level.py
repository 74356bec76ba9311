"""Opus 16k mono at compression_level 0, 5 and 10: encoding time per hour of audio, size per hour and the word
error rate of an offline recognizer, on one generated speech set.

The set is bench.trimming's material: sentences read by flite's four voices with short pauses between
turns (no long silences), mixed with a quiet pink-noise bed (-50 dBFS RMS) into a 48 kHz stereo 24-bit master,
as a recorder would deliver it. Each level is encoded `--runs` times with the daemon's own argument list
(daemon.pipeline.transcode.convert_args with FORMATS["opus"], only compression_level changed), one ffmpeg at a time;
the table shows the median run, with the fastest and slowest in brackets. WER: pocketsphinx 5.1.1 + jiwer on the
decoded output, as in shared/transcoding.md section 4.

    .venv/bin/python -m bench.opus_level                 # 15 minutes of speech, 3 runs: about 5 minutes
    .venv/bin/python -m bench.opus_level --minutes 10 --runs 5
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bench.common import FFMPEG, header, median, print_table
from bench.trimming import BEDS, ESPEAK_VOICES, FLITE, FLITE_VOICES, make_material, recognize, wer
from daemon.pipeline import transcode

LEVELS = ("0", "5", "10")
# flite's voices: pocketsphinx hears espeak-ng's badly (47 % WER on the lossless master in a first run), which
# drowns the differences this measures.
ENGINES = [("flite", voice) for voice in FLITE_VOICES] if FLITE else [("espeak", voice) for voice in ESPEAK_VOICES]


def with_level(level: str) -> transcode.OutputFormat:
    opus = transcode.FORMATS["opus"]
    options = tuple((k, v) for k, v in opus.codec_options if k != "compression_level")
    return replace(opus, codec_options=(*options, ("compression_level", level)))


def encode(source: Path, output: Path, level: str) -> tuple[float, float]:
    """One conversion with the daemon's argv; returns (wall seconds, CPU seconds of ffmpeg)."""
    argv = transcode.convert_args(source, output, with_level(level), ffmpeg=FFMPEG)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def spread(values: Sequence[float], digits: int = 1) -> str:
    return f"{median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    header("Opus 16k compression levels", "bench.opus_level", sys.argv[1:] if argv is None else list(argv))
    with tempfile.TemporaryDirectory(prefix="bench-opus-") as temp:
        folder = Path(temp)
        material = make_material(folder, "speech", BEDS["room"], minutes=args.minutes, silence_share=0.0,
                                 seed=args.seed, engines=ENGINES)
        hours = material.duration / 3600
        print(f"\nmaterial: {material.duration / 60:.1f} min, {len(material.words)} words, voices "
              f"{', '.join(voice for _, voice in ENGINES)}, "
              f"{len(material.turns)} turns, master {material.master.stat().st_size / 1e6:.0f} MB "
              "(48 kHz stereo 24-bit WAV)")
        reference, _ = recognize(material.master)
        rows = []
        timings: dict[str, list[tuple[float, float]]] = {level: [] for level in LEVELS}
        for run in range(args.runs):  # levels take turns, so a busy neighbour hurts them alike
            for level in LEVELS if run % 2 == 0 else reversed(LEVELS):
                timings[level].append(encode(material.master, folder / f"level{level}.ogg", level))
        for level in LEVELS:
            output = folder / f"level{level}.ogg"
            walls, cpus = [w for w, _ in timings[level]], [c for _, c in timings[level]]
            size = output.stat().st_size
            words, _ = recognize(output)
            rows.append([level, spread([w / hours for w in walls]), spread([c / hours for c in cpus]),
                         f"{material.duration / median(walls):.0f}", f"{size / 1e6 / hours:.2f}",
                         f"{size * 8 / material.duration / 1000:.1f}", wer(material.words, words)])
        print_table(f"Opus 16k mono, compression_level; {args.runs} runs each, median (min-max); "
                    f"load average at the end {os.getloadavg()[0]:.2f}",
                    ["level", "wall s per hour", "CPU s per hour", "x real time", "MB per hour", "kbps",
                     "WER (sub/del/ins)"], rows)
        print(f"\nWER of the master itself (lossless, 48 kHz stereo): {wer(material.words, reference)}")
    fastest = min(LEVELS, key=lambda level: median([w for w, _ in timings[level]]))
    print(f"summary: fastest level {fastest}; see the WER and MB per hour columns for what it costs")


if __name__ == "__main__":
    main()
