"""Speakers across chunk borders (issue 12): in a chunked transcript, is "Speaker 2" of the third chunk the same
voice as in the first? The figure is speakers.agreement: the share of the recording's utterances (placed by this
script, so the truth is known) whose line in the transcript carries the right voice, up to one renaming for the
whole recording. Goal: >= 95 % of lines keep their label across chunk borders.

Two paths, in one run:

* **emulator**: conversations of two espeak-ng voices of clearly different pitch (en-us -p 20, about 80 Hz, and
  en-us -p 80, about 140 Hz), one utterance after another with silences between them, assembled sample-exact,
  so each utterance's start is known. The real daemon (`python -m daemon run`, tests/harness.DaemonProcess) with
  `prompts.chunk_seconds` small (default 120 s), its default overlap and `[trimming] enabled = true` (its
  default settings otherwise) transcribes each recording in chunks (`ask --template transcribe`, with `--trim`
  and/or `--no-trim`: see `--trim` below) against the emulator in `transcript="speech"` mode, which hears
  the speech in each chunk, tells voices apart by median F0 (`speaker_split_hz` 110 here) and numbers them by
  first appearance in each request, as a model that ignores the "keep these labels" note does. Scored: the daemon's
  result file (relabelled, stitched, and with trimming mapped back to the recording's timeline) and the same
  chunk answers (the emulator's log) stitched with their raw labels (trimmed: placed on the trimmed timeline,
  stitched, then mapped back with trimming.map_timestamps and the prompt's stored trim map). The emulator knows
  two pitch bands only ('low'/'high'), so it cannot tell a third voice apart: 3 and 4 voices are measured on
  the synthetic path only.
* **synthetic**: the same kind of conversation with 2, 3 and 4 voices over `--seeds` seeds (utterance lengths
  from the word count), the chunk answers built in-process by tests/test_speakers.py's `answer()` (times a
  little off, voices numbered by first appearance) and `kept_labels()` (a model that mostly keeps the note's
  labels: 30 % of chunks swap two, 20 % ignore the note), then relabelled and stitched as the daemon does, or
  stitched raw. Unlike the tests, a chunk also hears the end of an utterance its start cut (its last words,
  at the chunk's start), as the emulator and a real model do.

`--trim both` (the default) transcribes each recording twice, untrimmed and trimmed (the daemon's default for
transcripts): trimming cuts most of the long silences, so fewer chunk overlaps hold only silence.

    .venv/bin/python -m bench.speakers                       # about 2.5 min on 2 busy cores
    .venv/bin/python -m bench.speakers --trim on             # the daemon's default only
    .venv/bin/python -m bench.speakers --minutes 20 --seeds 200 --recordings 6
    .venv/bin/python -m bench.speakers --long-pauses 0       # no silence of 6-18 s anywhere
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
import wave
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    API_KEY,
    ESPEAK,
    SPEECH_TEXT,
    HostLoad,
    cpu_seconds,
    header,
    percentile,
    print_table,
    wait_until,
)
from daemon.config import PromptSettings
from daemon.prompts.chunking import Chunk, Line, parse_transcript, plan_chunks, stitch
from daemon.prompts.speakers import AGREEMENT_TOLERANCE_SECONDS, agreement, on_timeline, relabel_chunks
from daemon.prompts.trimming import TrimMap, map_timestamps
from tests.harness import DaemonProcess, run_cli
from tests.test_speakers import answer, kept_labels

MODULE = "bench.speakers"
GOAL = 0.95
VOICES = {"en-us -p 20": ["-v", "en-us", "-p", "20"], "en-us -p 80": ["-v", "en-us", "-p", "80"]}
SPLIT_HZ = 110.0  # between the two voices' median F0 (72-93 Hz and 130-154 Hz over SENTENCES)
SENTENCES = [s.strip() + "." for s in SPEECH_TEXT.replace("?", ".").split(".") if s.strip()]
REPLIES = ["Yes.", "Right.", "I agree.", "Okay, go on.", "Sounds good to me.", "No, not yet."]
TEXTS = SENTENCES + REPLIES
REPLY_SHARE = 0.2  # of utterances: a short reply rather than a sentence
SWITCH = 0.55  # the next utterance is another voice's
LONG_PAUSE = 0.05  # a silence of 6-18 s after an utterance (else 0.9-1.5 s within a turn, 1-3 s between turns);
# --long-pauses changes it
SECONDS_PER_WORD = 0.36  # espeak-ng at 165 words a minute: the synthetic path's utterance lengths
TRIM_MODES = {"both": ("off", "on"), "on": ("on",), "off": ("off",)}  # --trim: the emulator path's runs, in order


@dataclass(frozen=True)
class Said:
    """One utterance: where it starts on the recording's timeline, whose voice, which of TEXTS, how long."""

    start: float
    voice: str
    item: int
    seconds: float


def schedule(rng: random.Random, voices: Sequence[str], total: float, length: Callable[[str, int], float],
             long_pause: float = LONG_PAUSE) -> list[Said]:
    """A conversation of `total` seconds: each voice reads SENTENCES in its own order, with short replies in
    between; a voice often keeps the floor for a few utterances, and now and then nobody speaks for a while."""
    orders = {voice: rng.sample(range(len(SENTENCES)), len(SENTENCES)) for voice in voices}
    spoken = dict.fromkeys(voices, 0)
    said: list[Said] = []
    seconds, voice = rng.uniform(0.5, 2.0), rng.choice(list(voices))
    while True:
        if rng.random() < REPLY_SHARE:
            item = len(SENTENCES) + rng.randrange(len(REPLIES))
        else:
            item = orders[voice][spoken[voice] % len(SENTENCES)]
            spoken[voice] += 1
        duration = length(voice, item)
        if seconds + duration > total - 0.5:
            return said
        said.append(Said(round(seconds, 3), voice, item, duration))
        seconds += duration
        switch = rng.random() < SWITCH
        if switch:
            voice = rng.choice([other for other in voices if other != voice])
        if rng.random() < long_pause:
            seconds += rng.uniform(6.0, 18.0)
        else:
            seconds += rng.uniform(1.0, 3.0) if switch else rng.uniform(0.9, 1.5)


def truth_of(said: list[Said]) -> list[tuple[float, str]]:
    return [(item.start, item.voice) for item in said]


# --- scoring -----------------------------------------------------------------------------------------------


@dataclass
class Score:
    lines: int  # utterances placed (the truth)
    chunks: int
    renumbered: int  # chunks after the first in which a voice heard before came with another raw label
    empty: int  # borders whose overlap no utterance starts in (on the timeline sent)
    without: float  # agreement, chunk answers stitched with their own labels
    with_: float  # agreement, relabelled (speakers.relabel_chunks) then stitched, as the daemon does


def stitched_back(pieces: list[tuple[Chunk, str]], duration: float, trim_map: TrimMap | None) -> list[Line]:
    """The chunk answers stitched as they are, on the recording's timeline (mapped back through trim_map)."""
    stitched = stitch(pieces, duration)
    return stitched.lines if trim_map is None else parse_transcript(map_timestamps(stitched.text, trim_map).text)


def score(truth: list[tuple[float, str]], pieces: list[tuple[Chunk, str]], duration: float,
          relabelled: list[Line] | None = None, trim_map: TrimMap | None = None) -> Score:
    """truth: on the recording's timeline; pieces and duration: on the timeline sent, the trimmed one when
    trim_map is given. relabelled: the daemon's own result (else relabel_chunks + stitch here, which is what the
    daemon runs, mapped back through trim_map as the daemon does)."""
    if relabelled is None:
        relabelled = stitched_back(relabel_chunks(pieces), duration, trim_map)
    sent = truth if trim_map is None else [(trim_map.to_trimmed(seconds), voice) for seconds, voice in truth]
    plan = sorted((chunk for chunk, _ in pieces), key=lambda chunk: chunk.start)
    empty = sum(not any(later.start <= seconds <= earlier.end for seconds, _ in sent)
                for earlier, later in zip(plan, plan[1:], strict=False))
    return Score(len(truth), len(pieces), renumbered_chunks(sent, pieces), empty,
                 agreement(truth, stitched_back(pieces, duration, trim_map)),
                 agreement(truth, relabelled))


def renumbered_chunks(truth: list[tuple[float, str]], pieces: list[tuple[Chunk, str]]) -> int:
    """How many chunks gave a voice heard in an earlier chunk another raw label than it had there (each line
    paired with the utterance that starts nearest to it, within agreement's tolerance; a voice's label in a chunk
    is the one most of its lines carry)."""
    times = [seconds for seconds, _ in truth]
    first: dict[str, str] = {}
    count = 0
    for chunk, text in sorted(pieces, key=lambda piece: piece[0].start):
        votes: Counter[tuple[str, str]] = Counter()
        for line in on_timeline(parse_transcript(text), chunk.start):
            if line.seconds is None or not line.speaker or not times:
                continue
            nearest = min(range(len(times)), key=lambda index: abs(times[index] - line.seconds))
            if abs(times[nearest] - line.seconds) <= AGREEMENT_TOLERANCE_SECONDS:
                votes[(truth[nearest][1], line.speaker)] += 1
        labels: dict[str, str] = {}
        for (voice, label), _ in votes.most_common():
            labels.setdefault(voice, label)
        count += any(voice in first and first[voice] != label for voice, label in labels.items())
        for voice, label in labels.items():
            first.setdefault(voice, label)
    return count


# --- the emulator path -------------------------------------------------------------------------------------


def wav_frames(path: Path) -> tuple[bytes, int]:
    with wave.open(str(path)) as handle:
        if handle.getnchannels() != 1 or handle.getsampwidth() != 2:
            raise RuntimeError(f"{path}: expected 16-bit mono from espeak-ng")
        return handle.readframes(handle.getnframes()), handle.getframerate()


def speak_all(folder: Path) -> dict[tuple[str, int], tuple[bytes, int]]:
    """Every text of TEXTS in every voice, as 16-bit mono samples (espeak-ng, 165 words a minute)."""
    folder.mkdir(parents=True, exist_ok=True)

    def one(key: tuple[str, int]) -> tuple[tuple[str, int], tuple[bytes, int]]:
        voice, item = key
        path = folder / f"{list(VOICES).index(voice)}-{item:02d}.wav"
        subprocess.run([ESPEAK or "espeak-ng", *VOICES[voice], "-s", "165", "-w", str(path), TEXTS[item]],
                       check=True, capture_output=True, timeout=120)
        return key, wav_frames(path)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, [(voice, item) for voice in VOICES for item in range(len(TEXTS))]))


def make_recording(path: Path, said: list[Said], clips: dict[tuple[str, int], tuple[bytes, int]], total: float
                   ) -> None:
    """The utterances at their places (to the sample), digital silence between them, `total` seconds long."""
    rate = next(iter(clips.values()))[1]
    audio = bytearray()
    for item in said:
        frames, clip_rate = clips[(item.voice, item.item)]
        if clip_rate != rate:
            raise RuntimeError("espeak-ng voices wrote different sample rates")
        audio += bytes(2 * max(0, round(item.start * rate) - len(audio) // 2))
        audio += frames
    audio += bytes(2 * max(0, round(total * rate) - len(audio) // 2))
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(bytes(audio))


def query(daemon: DaemonProcess, sql: str, *params: Any) -> list[tuple]:
    uri = f"file:{daemon.folder / 'state' / 'audiodrop.db'}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=10)) as connection:
            return connection.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []


def part_number(prompt_text: str) -> tuple[int, int] | None:
    marker = prompt_text.find("(This is part ")
    if marker < 0:
        return None
    number, _, rest = prompt_text[marker + len("(This is part "):].partition(" of ")
    return int(number), int(rest.split(":")[0])


def emulator_path(args: argparse.Namespace, work: Path, overlap: float) -> list[dict[str, Any]]:
    from tests.emulator import Emulator, speech

    started = time.monotonic()
    clips = speak_all(work / "voices")
    recordings = []
    for index in range(args.recordings):
        rng = random.Random(args.seed * 1000 + index)

        def length(voice: str, item: int) -> float:
            frames, rate = clips[(voice, item)]
            return len(frames) / 2 / rate

        said = schedule(rng, list(VOICES), args.minutes * 60.0, length, args.long_pauses)
        path = work / "made" / f"talk-{index + 1}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_recording(path, said, clips, args.minutes * 60.0)
        recordings.append({"path": path, "said": said})
    print(f"emulator path: {len(clips)} espeak-ng clips and {len(recordings)} recordings of {args.minutes:g} min "
          f"made in {time.monotonic() - started:.0f} s", flush=True)

    results = []
    with Emulator(api_key=API_KEY, data_dir=work / "emulator", processing_polls=0, transcript="speech",
                  speaker_split_hz=SPLIT_HZ) as emulator:
        # test_timings=False leaves trimming at its defaults; enabled is set all the same, since the tests' own
        # config turns it off (tests/conftest.write_config) and --trim must measure what the product does.
        daemon = DaemonProcess(work / "daemon", base_url=emulator.base_url, api_key=API_KEY, test_timings=False,
                               prompts={"chunk_seconds": args.chunk_seconds, "requests_per_minute": 60},
                               trimming={"enabled": True})
        daemon.start()
        try:
            for recording in recordings:
                shutil.copyfile(recording["path"], daemon.inbox / recording["path"].name)
            wait_until(lambda: len(query(daemon, "SELECT id FROM recordings WHERE state = 'active'"))
                       == len(recordings) or daemon.exited(), 300, 0.3, "the recordings to upload")
            if daemon.exited():
                raise RuntimeError(f"the daemon exited:\n{daemon.log()[-4000:]}")
            rows = {Path(source).name: (rid, duration, converted) for rid, source, duration, converted in query(
                daemon, "SELECT id, source_path, duration_seconds, converted_path FROM recordings")}
            for recording in recordings:
                for trim in TRIM_MODES[args.trim]:
                    results.append(_one_recording(daemon, emulator, speech, recording, rows, args, overlap, trim))
        finally:
            daemon.stop()
    return results


def _one_recording(daemon: DaemonProcess, emulator: Any, speech: Any, recording: dict[str, Any],
                   rows: dict[str, tuple], args: argparse.Namespace, overlap: float, trim: str) -> dict[str, Any]:
    """Ask for the recording's transcript (trim "on": with long silences cut, the daemon's default; "off":
    without), wait for it, and score it against the utterances placed."""
    rid, duration, converted = rows[recording["path"].name]
    assert daemon.process is not None
    pid = daemon.process.pid
    load = HostLoad()
    daemon_cpu = sum(cpu_seconds(pid))
    began = time.monotonic()
    before = len(emulator.generate_requests)
    result = run_cli(daemon.config_path, "ask", str(rid), "--template", "transcribe",
                     "--trim" if trim == "on" else "--no-trim", "--json", env=daemon.env)
    if result.returncode:
        raise RuntimeError(f"audiodrop ask exited {result.returncode}: {result.stderr.strip()}")
    prompt_id = max(pid for (pid,) in query(daemon, "SELECT id FROM prompts"))
    wait_until(lambda: query(daemon, "SELECT state FROM prompts WHERE id = ?", prompt_id)[0][0] in ("done", "failed")
               or daemon.exited(), 600, 0.3, "the transcript")
    state, result_path, result_text, error, stored_map = query(
        daemon, "SELECT state, result_path, result_text, error, trim_map FROM prompts WHERE id = ?", prompt_id)[0]
    wall = time.monotonic() - began
    other = load.other_cores(sum(cpu_seconds(pid)) - daemon_cpu)  # the emulator runs in this process
    if state != "done":
        raise RuntimeError(f"prompt {prompt_id} {state}: {error}\n{daemon.log()[-4000:]}")
    # With trimming the chunks, and the raw answers' stamps, lie on the trimmed timeline; no stored map: the
    # daemon found too little silence to cut and sent the recording whole.
    trim_map = TrimMap.from_json(stored_map) if stored_map else None
    sent = trim_map.trimmed_duration if trim_map else duration
    plan = plan_chunks(sent, chunk_seconds=args.chunk_seconds, overlap_seconds=overlap)
    answers: dict[int, str] = {}
    tails = 0
    for record in emulator.generate_requests[before:]:
        part = part_number(record.prompt_text)
        if part is None:
            tails += 1  # a missing tail asked for on its own (stitched into its chunk by the daemon)
        else:
            answers[part[0]] = record.response_text or ""
    pieces = [(chunk, answers.get(chunk.index + 1, "")) for chunk in plan]
    result_file = Path(result_path) if result_path else None
    shown = result_file.read_text() if result_file and result_file.exists() else result_text
    truth = truth_of(recording["said"])
    figures = score(truth, pieces, sent, relabelled=parse_transcript(shown), trim_map=trim_map)
    replayed = stitch(relabel_chunks(pieces), sent).text
    if trim_map is not None:
        replayed = map_timestamps(replayed, trim_map).text
    replay = replayed.strip() == (result_text or "").strip()
    copy = Path(converted) if converted and Path(converted).exists() else recording["path"]
    heard = [Line(segment.start, segment.cluster, segment.text, "")
             for segment in speech.analyse_file(copy, split_hz=SPLIT_HZ)]
    return {"name": recording["path"].name, "trim": trim if trim == "off" or trim_map else "on (no cut)",
            "sent": sent, "score": figures, "result_lines": sum(
        1 for line in parse_transcript(shown) if line.seconds is not None and line.speaker),
            "uncut": agreement(truth, heard), "replay": replay and not tails, "tails": tails,
            "wall": wall, "other": other, "chunk_seconds": plan[0].seconds if plan else 0.0}


# --- the synthetic path ------------------------------------------------------------------------------------


def synthetic_path(args: argparse.Namespace, overlap: float) -> list[dict[str, Any]]:
    total = args.minutes * 60.0
    plan = plan_chunks(total, chunk_seconds=args.chunk_seconds, overlap_seconds=overlap)
    rows = []
    for voices in (2, 3, 4):
        names = [f"V{index + 1}" for index in range(voices)]
        for model in ("renumbers every chunk", "mostly keeps the note"):
            scores = []
            for seed in range(args.seeds):
                rng = random.Random(f"{args.seed}:{voices}:{seed}")
                said = schedule(rng, names, total, lambda _voice, item: 0.3 + SECONDS_PER_WORD * len(
                    TEXTS[item].split()), args.long_pauses)
                utterances = [(item.start, item.voice, TEXTS[item.item]) for item in said]
                keeps = kept_labels(utterances, plan, rng, swap=0.3, renumber=0.2) if model.startswith("mostly") \
                    else [None] * len(plan)
                pieces = [(chunk, answer(heard_in(said, chunk), chunk, rng, keep=keep))
                          for chunk, keep in zip(plan, keeps, strict=True)]
                scores.append(score(truth_of(said), pieces, total))
            rows.append({"voices": voices, "model": model, "scores": scores})
    return rows


def heard_in(said: list[Said], chunk: Chunk) -> list[tuple[float, str, str]]:
    """What a model hears in a chunk, for answer(): the utterances that start in it, and the end of one that the
    chunk's start cut (its last words, at the chunk's start), which the previous chunk has whole."""
    heard = []
    for item in said:
        words = TEXTS[item.item].split()
        if item.start < chunk.start < item.start + item.seconds - 0.5:
            cut = min(len(words) - 1, int(len(words) * (chunk.start - item.start) / item.seconds))
            heard.append((chunk.start + 0.05, item.voice, " ".join(words[cut:])))
        elif chunk.start <= item.start < chunk.end:
            heard.append((item.start, item.voice, TEXTS[item.item]))
    return heard


# --- report ------------------------------------------------------------------------------------------------


def pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"


def report_emulator(results: list[dict[str, Any]], args: argparse.Namespace, overlap: float
                    ) -> dict[str, dict[str, float]]:
    """The table, one row per recording and run; returns per run ("off", "on") the totals over its recordings."""
    rows = []
    for item in results:
        figures: Score = item["score"]
        rows.append([item["name"], item["trim"], clock(item["sent"]), figures.lines, item["result_lines"],
                     figures.chunks, figures.chunks - 1, figures.empty, figures.renumbered, pct(figures.without),
                     pct(figures.with_), pct(item["uncut"]),
                     "yes" if item["replay"] else f"no ({item['tails']} tails)", f"{item['wall']:.0f}",
                     f"{item['other']:.2f}"])
    totals: dict[str, dict[str, float]] = {}
    for trim in TRIM_MODES[args.trim]:
        runs = [item for item in results if item["trim"].startswith(trim)]
        if not runs:
            continue
        lines = sum(item["score"].lines for item in runs)

        def weighted(value: Callable[[dict[str, Any]], float], runs: list[dict[str, Any]] = runs,
                     lines: int = lines) -> float:
            return sum(value(item) * item["score"].lines for item in runs) / max(1, lines)

        total = {"without": weighted(lambda item: item["score"].without),
                 "with": weighted(lambda item: item["score"].with_),
                 "borders": float(sum(item["score"].chunks - 1 for item in runs)),
                 "empty": float(sum(item["score"].empty for item in runs)),
                 "sent": sum(item["sent"] for item in runs)}
        totals[trim] = total
        if len(runs) > 1:
            rows.append(["all", trim, clock(total["sent"]), lines, sum(item["result_lines"] for item in runs),
                         sum(item["score"].chunks for item in runs), int(total["borders"]), int(total["empty"]),
                         sum(item["score"].renumbered for item in runs), pct(total["without"]), pct(total["with"]),
                         pct(weighted(lambda item: item["uncut"])), "", f"{sum(item['wall'] for item in runs):.0f}",
                         ""])
    sizes: dict[str, list[float]] = {}  # chunk lengths per run (trimmed: per recording, as its audio is shorter)
    for item in results:
        sizes.setdefault(item["trim"][:3].strip(), []).append(item["chunk_seconds"])
    chunk = " / ".join(f"{min(values):.0f}" + (f"-{max(values):.0f}" if round(max(values)) > round(min(values))
                                                else "") + f" s {trim}" for trim, values in sizes.items())
    print_table(f"emulator path: 2 voices (en-us -p 20 / -p 80, split at {SPLIT_HZ:g} Hz), {args.minutes:g} min "
                f"each, chunk_seconds {args.chunk_seconds:g} (chunks of {chunk}), overlap {overlap:g} s; "
                "trim on: the daemon's default trimming (chunks, overlaps and audio sent on the trimmed timeline)",
                ["recording", "trim", "audio sent", "utterances", "result lines", "chunks", "borders",
                 "empty overlaps", "renumbered", "without relabel", "with relabel", "pitch, uncut", "replay = result",
                 "wall s", "other load"], rows)
    return totals


def report_synthetic(rows: list[dict[str, Any]], args: argparse.Namespace, overlap: float) -> dict[str, float]:
    table = []
    worst: dict[str, float] = {}
    for row in rows:
        scores: list[Score] = row["scores"]
        without = [s.without for s in scores]
        with_ = [s.with_ for s in scores]
        table.append([row["voices"], row["model"], len(scores), scores[0].chunks - 1,
                      f"{sum(s.lines for s in scores) / len(scores):.0f}",
                      f"{sum(s.empty for s in scores) / len(scores):.1f}",
                      f"{sum(s.renumbered for s in scores) / len(scores):.1f}",
                      pct(sum(without) / len(without)), pct(min(without)), pct(sum(with_) / len(with_)),
                      pct(percentile(with_, 10)), pct(min(with_)),
                      f"{sum(value >= GOAL for value in with_)}/{len(with_)}"])
        if row["model"].startswith("renumbers"):  # the model the emulator plays
            worst[f"synthetic_{row['voices']}v_mean"] = sum(with_) / len(with_)
            worst[f"synthetic_{row['voices']}v_min"] = min(with_)
    print_table(f"synthetic path: {args.seeds} seeds per row, {args.minutes:g} min, chunk_seconds "
                f"{args.chunk_seconds:g}, overlap {overlap:g} s",
                ["voices", "model", "runs", "borders", "utterances", "empty overlaps", "renumbered", "without: mean", "min",
                 "with: mean", "p10", "min", f">= {GOAL:.0%}"], table)
    return worst


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="length of each conversation")
    parser.add_argument("--chunk-seconds", type=float, default=120.0, help="the daemon's prompts.chunk_seconds")
    parser.add_argument("--recordings", type=int, default=4, help="emulator path: recordings (0 skips the path)")
    parser.add_argument("--seeds", type=int, default=50, help="synthetic path: runs per row")
    parser.add_argument("--long-pauses", type=float, default=LONG_PAUSE,
                        help="share of utterances followed by a silence of 6-18 s")
    parser.add_argument("--trim", choices=list(TRIM_MODES), default="both",
                        help="emulator path: transcribe with the daemon's trimming on (its default), off, or both")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    options = ["--minutes", f"{args.minutes:g}", "--chunk-seconds", f"{args.chunk_seconds:g}", "--recordings",
               str(args.recordings), "--seeds", str(args.seeds), "--long-pauses", f"{args.long_pauses:g}", "--trim",
               args.trim, "--seed", str(args.seed)]
    header(f"speakers: labels across chunk borders, {args.minutes:g} min conversations in "
           f"{args.chunk_seconds:g} s chunks", MODULE, options)
    overlap = PromptSettings().chunk_overlap_seconds
    summary: dict[str, float] = {}
    began = time.monotonic()
    synthetic = synthetic_path(args, overlap)
    summary.update(report_synthetic(synthetic, args, overlap))
    print(f"(synthetic path: {time.monotonic() - began:.1f} s)", flush=True)
    emulator_text = "emulator path skipped"
    if args.recordings > 0 and not ESPEAK:
        emulator_text = "emulator path skipped: espeak-ng is not installed"
        print(emulator_text)
    elif args.recordings > 0:
        work = Path(tempfile.mkdtemp(prefix="audiodrop-bench-speakers-"))
        try:
            results = emulator_path(args, work, overlap)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        totals = report_emulator(results, args, overlap)
        parts = []
        for trim, total in totals.items():
            prefix = "emulator_" if trim == "off" else "emulator_trimmed_"
            summary.update({f"{prefix}without": total["without"], f"{prefix}with": total["with"],
                            f"{prefix}borders": total["borders"], f"{prefix}empty": total["empty"]})
            parts.append(f"{'trimmed' if trim == 'on' else 'untrimmed'} {pct(total['with'])} with relabeling vs "
                         f"{pct(total['without'])} without ({total['borders']:.0f} borders, {total['empty']:.0f} "
                         "with an empty overlap)")
        emulator_text = "emulator 2 voices: " + "; ".join(parts)
    renumbering = [row for row in synthetic if row["model"].startswith("renumbers")]
    synthetic_text = ", ".join(
        f"{row['voices']} voices min {pct(min(s.with_ for s in row['scores']))} mean "
        f"{pct(sum(s.with_ for s in row['scores']) / len(row['scores']))}" for row in renumbering)
    print(f"summary: {emulator_text}; synthetic, a model that renumbers every chunk ({args.seeds} seeds): "
          f"{synthetic_text}; goal >= {GOAL:.0%} of lines")
    return summary


if __name__ == "__main__":
    main()
