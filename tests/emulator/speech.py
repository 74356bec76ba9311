"""Speech-aware fake transcripts: where the speech is, who speaks (by pitch), and a deterministic
pseudo-text per stretch of speech.

Why: a client that cuts long recordings into overlapping chunks must match the model's lines in
the overlaps and reconcile speaker numbers that restart in every request. A fake model that
invents a line every 30 s cannot exercise that; this one answers what is actually in the audio:

* decode with ffmpeg to 8 kHz mono s16le (speech energy and pitch live below 4 kHz, and half the
  samples halve the pure-Python work; the standard library has no vector maths);
* an energy detector on 25 ms frames: a frame is speech when it is above a threshold relative to
  the part's own loudness (30 dB below its loud frames, at least 6 dB above its noise floor);
  gaps shorter than 0.5 s join segments, segments shorter than 0.2 s are dropped;
* syllable nuclei = energy peaks that stand at least 6 dB above the valleys around them; at the
  five loudest nuclei the fundamental frequency is estimated by normalised autocorrelation on a
  40 ms window (70-400 Hz, voiced when the correlation peak is >= 0.5); a segment's pitch is the
  median over those that are voiced;
* a speaker *cluster* is a fixed pitch band ('low' below ``split_hz``, else 'high'), so the same
  voice gets the same cluster in every request and every chunk (the ground truth for tests);
* the text is one pseudo-syllable per nucleus, drawn from a generator seeded with the segment's
  pitch band and its syllable count only. Finer features (per-syllable pitch or length) flip when a
  chunk is cut elsewhere and re-encoded; these two do not: on two voices re-encoded to Opus 16 kbps
  and cut at five offsets, 29 of 31 overlapping lines came out identical. A miss (one syllable more
  or less) gets an unrelated text, so a client should pair overlap lines by time and speaker as
  well as by text, as it must with a real model. Different stretches with the same voice and the
  same syllable count share a text too; their times tell them apart.

Analyses are cached by content digest (sha256 of the bytes), so repeated prompts over the same
file or the same inline bytes decode once.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from operator import mul
from pathlib import Path

RATE = 8000
FRAME = 200                    # 25 ms at 8 kHz
FRAME_SECONDS = FRAME / RATE
MIN_GAP_FRAMES = 20            # gaps < 0.5 s join segments
MIN_SPEECH_FRAMES = 8          # segments < 0.2 s are dropped
SILENCE_DB = 30.0              # loud frames below -60 dBFS: the part is silent
PITCH_WINDOW = 320             # 40 ms at 8 kHz
MIN_F0, MAX_F0 = 70.0, 400.0
VOICED_NCCF = 0.5
DEFAULT_SPLIT_HZ = 165.0       # between typical low (male) and high (female) voices
MAX_SYLLABLES = 40             # per line, so a long monologue does not explode the answer
PITCH_NUCLEI = 5               # F0 is estimated at the loudest nuclei only: it is the costly part


@dataclass(frozen=True)
class Segment:
    """One stretch of speech: seconds from the start of the audio part, its speaker cluster
    ('low'/'high' pitch band), median F0 in Hz (None when no nucleus was voiced) and pseudo-text."""

    start: float
    end: float
    cluster: str
    f0: float | None
    text: str


@dataclass
class _Nucleus:
    frame: int
    db: float
    f0: float | None = None


@dataclass
class _Cache:
    lock: threading.Lock = field(default_factory=threading.Lock)
    entries: OrderedDict = field(default_factory=OrderedDict)
    key_locks: dict = field(default_factory=dict)
    decodes: int = 0


_CACHE = _Cache()
_CACHE_SIZE = 256


# ---- public API ------------------------------------------------------------------------------
def analyse_audio(path: str | os.PathLike, split_hz: float = DEFAULT_SPLIT_HZ) -> list[tuple[float, float, str]]:
    """(start, end, speaker_cluster) for every speech segment of an audio file. Cluster ids are
    fixed pitch bands ('low'/'high'), stable across files, chunks and requests: the ground truth a
    test compares a client's reconciled speaker labels with."""
    return [(s.start, s.end, s.cluster) for s in analyse_file(path, split_hz=split_hz)]


def analyse_file(path: str | os.PathLike, digest: str | None = None,
                 split_hz: float = DEFAULT_SPLIT_HZ) -> list[Segment]:
    """Segments of an audio file, cached by content digest (computed when not given)."""
    if digest is None:
        digest = file_digest(path)
    return _cached((digest, split_hz), lambda: _analyse_samples(decode(path), split_hz))


def analyse_bytes(data: bytes, digest: str | None = None, split_hz: float = DEFAULT_SPLIT_HZ,
                  tmp_dir: str | os.PathLike | None = None) -> list[Segment]:
    """Segments of in-memory audio (inline parts): written to a temp file for ffmpeg, which needs
    to seek in some containers."""
    digest = digest or hashlib.sha256(data).hexdigest()

    def run() -> list[Segment]:
        fd, tmp = tempfile.mkstemp(prefix="speech-", dir=tmp_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            return _analyse_samples(decode(tmp), split_hz)
        finally:
            os.unlink(tmp)
    return _cached((digest, split_hz), run)


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def decode_count() -> int:
    """How many times audio was actually decoded (tests check that the cache works)."""
    return _CACHE.decodes


def decode(path: str | os.PathLike) -> array:
    """Mono 8 kHz signed 16-bit samples of any file ffmpeg can read (empty when it cannot)."""
    ffmpeg = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
    with _CACHE.lock:
        _CACHE.decodes += 1
    try:
        out = subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-i", os.fspath(path), "-ac", "1",
                              "-ar", str(RATE), "-f", "s16le", "-"],
                             capture_output=True, timeout=600).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = b""
    samples = array("h")
    samples.frombytes(out[: len(out) // 2 * 2])
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


# ---- cache -----------------------------------------------------------------------------------
def _cached(key: tuple, compute) -> list[Segment]:
    with _CACHE.lock:
        if key in _CACHE.entries:
            _CACHE.entries.move_to_end(key)
            return _CACHE.entries[key]
        key_lock = _CACHE.key_locks.setdefault(key, threading.Lock())
    with key_lock:                       # one decode per content, even for concurrent requests
        with _CACHE.lock:
            if key in _CACHE.entries:
                return _CACHE.entries[key]
        result = compute()
        with _CACHE.lock:
            _CACHE.entries[key] = result
            _CACHE.key_locks.pop(key, None)
            while len(_CACHE.entries) > _CACHE_SIZE:
                _CACHE.entries.popitem(last=False)
        return result


# ---- analysis --------------------------------------------------------------------------------
def _analyse_samples(samples: array, split_hz: float) -> list[Segment]:
    db = frame_levels(samples)
    found: list[tuple[int, int, float | None, int]] = []     # first, last frame, F0, syllables
    for first, last in speech_runs(db):
        nuclei = _nuclei(db, first, last)
        for n in sorted(nuclei, key=lambda n: -n.db)[:PITCH_NUCLEI]:
            n.f0 = estimate_f0(samples, n.frame * FRAME + FRAME // 2)
        voiced = sorted(n.f0 for n in nuclei if n.f0 is not None)
        found.append((first, last, voiced[len(voiced) // 2] if voiced else None, len(nuclei)))
    bands = _bands([f0 for _, _, f0, _ in found], split_hz)
    return [Segment(round(first * FRAME_SECONDS, 3), round((last + 1) * FRAME_SECONDS, 3), band, f0,
                    pseudo_text(band, syllables))
            for (first, last, f0, syllables), band in zip(found, bands)]


def frame_levels(samples: array) -> list[float]:
    """Level of each 25 ms frame in dB re one LSB (0 dB = digital silence, ~90 dB = full scale).
    Every other sample is enough for a level and halves the work."""
    out = []
    half = FRAME // 2
    for i in range(len(samples) // FRAME):
        f = samples[i * FRAME:(i + 1) * FRAME:2]
        out.append(10.0 * math.log10(sum(map(mul, f, f)) / half + 1.0))
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def speech_runs(db: list[float]) -> list[tuple[int, int]]:
    """(first, last) frame index of each speech segment."""
    if not db:
        return []
    noise = _percentile(db, 0.10)
    active = [v for v in db if v > noise + 6.0]
    if len(active) < MIN_SPEECH_FRAMES:
        return []
    loud = _percentile(active, 0.95)
    if loud < SILENCE_DB:
        return []
    threshold = min(max(loud - 30.0, noise + 6.0), loud - 10.0)
    runs: list[list[int]] = []
    for i, v in enumerate(db):
        if v < threshold:
            continue
        if runs and i - runs[-1][1] - 1 < MIN_GAP_FRAMES:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs if b - a + 1 >= MIN_SPEECH_FRAMES]


def _nuclei(db: list[float], first: int, last: int, hysteresis: float = 6.0) -> list[_Nucleus]:
    """Energy peaks inside a segment that rise at least ``hysteresis`` dB above the valleys
    around them (a peak picker with hysteresis, on a 3-frame moving average). 6 dB keeps the count
    stable when the audio is re-encoded (3 dB gave a different count for a fifth of the lines)."""
    smooth = [sum(db[max(first, i - 1):min(last, i + 1) + 1]) / (min(last, i + 1) - max(first, i - 1) + 1)
              for i in range(first, last + 1)]
    peaks: list[_Nucleus] = []
    best_i, best_v, valley = 0, smooth[0], smooth[0]
    rising = True
    for i, v in enumerate(smooth):
        if rising:
            if v > best_v:
                best_i, best_v = i, v
            elif v < best_v - hysteresis:
                peaks.append(_Nucleus(first + best_i, best_v))
                rising, valley = False, v
        elif v < valley:
            valley = v
        elif v > valley + hysteresis:
            rising, best_i, best_v = True, i, v
    if rising:
        peaks.append(_Nucleus(first + best_i, best_v))
    return peaks


def estimate_f0(samples: array, centre: int) -> float | None:
    """F0 in Hz at a sample position by normalised autocorrelation (coarse at 4 kHz, refined at
    8 kHz with parabolic interpolation), or None when the frame is not voiced."""
    lo = max(0, centre - PITCH_WINDOW // 2)
    x = samples[lo:lo + PITCH_WINDOW]
    if len(x) < PITCH_WINDOW:
        return None
    mean = sum(x) / len(x)
    x = [v - mean for v in x]
    coarse = x[::2]
    lags = range(int(RATE / 2 / MAX_F0), int(RATE / 2 / MIN_F0) + 1)
    scores = _nccf(coarse, lags)
    if not scores:
        return None
    top = max(scores.values())
    if top < VOICED_NCCF:
        return None
    # the shortest lag that is a local maximum close to the best one (avoids octave-down errors)
    lag = next(k for k in lags if scores[k] >= 0.85 * top and scores[k] >= scores.get(k - 1, -1)
               and scores[k] >= scores.get(k + 1, -1))
    fine = _nccf(x, range(2 * lag - 3, 2 * lag + 4))
    best = max(fine, key=fine.get)
    left, right = fine.get(best - 1), fine.get(best + 1)
    shift = 0.0
    if left is not None and right is not None:
        denom = left - 2 * fine[best] + right
        shift = 0.5 * (left - right) / denom if denom else 0.0
    period = best + max(-0.5, min(0.5, shift))
    f0 = RATE / period
    return round(f0, 1) if MIN_F0 <= f0 <= MAX_F0 else None


def _nccf(x: list[float], lags: range) -> dict[int, float]:
    n = len(x)
    cum = [0.0]
    for v in x:
        cum.append(cum[-1] + v * v)
    out = {}
    for lag in lags:
        if lag <= 0 or lag >= n - 8:
            continue
        e1, e2 = cum[n - lag], cum[n] - cum[lag]
        if e1 <= 0 or e2 <= 0:
            out[lag] = 0.0
            continue
        out[lag] = sum(map(mul, x[:n - lag], x[lag:])) / math.sqrt(e1 * e2)
    return out


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def pseudo_text(band: str, syllables: int) -> str:
    """Deterministic pseudo-words: one syllable per nucleus (at most MAX_SYLLABLES), words of one
    to three syllables, all drawn from a generator seeded with (band, syllable count)."""
    rng = random.Random(f"{band}:{syllables}")
    words: list[str] = []
    left = max(1, min(syllables, MAX_SYLLABLES))
    while left:
        size = min(left, rng.choice((1, 2, 2, 3)))
        words.append("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(size)))
        left -= size
    return " ".join(words)


def _bands(f0s: list[float | None], split_hz: float) -> list[str]:
    """Pitch band per segment; an unvoiced segment joins the nearest voiced one before it (else
    after it, else 'low'), which is stable because it only looks inside one audio part."""
    bands = [None if f0 is None else ("low" if f0 < split_hz else "high") for f0 in f0s]
    out = []
    for i, band in enumerate(bands):
        if band is None:
            before = [b for b in bands[:i] if b]
            after = [b for b in bands[i + 1:] if b]
            band = before[-1] if before else after[0] if after else "low"
        out.append(band)
    return out


# ---- transcript lines ------------------------------------------------------------------------
def stamp(seconds: float) -> str:
    """[HH:MM:SS], rounded to the nearest second (half up)."""
    total = int(math.floor(seconds + 0.5))
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"[{h:02d}:{m:02d}:{s:02d}]"


def transcript(parts: list[tuple[str, list[Segment]]]) -> str:
    """The answer for a request's audio parts, in order: one line per segment,
    '[HH:MM:SS] Speaker N: text', speakers numbered by first appearance in the request; a part
    without speech answers '[no speech]'. Several parts get a header line naming each part."""
    numbers: dict[str, int] = {}
    lines: list[str] = []
    for k, (label, segments) in enumerate(parts, 1):
        if len(parts) > 1:
            lines.append(f"Audio {k} of {len(parts)} ({label}):")
        if not segments:
            lines.append("[no speech]")
        for s in segments:
            n = numbers.setdefault(s.cluster, len(numbers) + 1)
            lines.append(f"{stamp(s.start)} Speaker {n}: {s.text}")
    return "\n".join(lines)


def segments_of(path: Path | None, data: bytes | None, digest: str | None, split_hz: float,
                tmp_dir: Path | None = None) -> list[Segment]:
    """Analysis of one audio part, from its file (uploaded or cached copy) or its inline bytes."""
    if path is not None and Path(path).exists():
        return analyse_file(path, digest, split_hz)
    if data is not None:
        return analyse_bytes(data, digest, split_hz, tmp_dir)
    return []


__all__ = ["Segment", "analyse_audio", "analyse_bytes", "analyse_file", "decode", "decode_count",
           "estimate_f0", "frame_levels", "pseudo_text", "speech_runs", "stamp", "transcript"]
