"""ffprobe and ffmpeg: probe a recording, convert it (or an exact span of it) to a compact mono file.

The only module that runs ffmpeg or ffprobe. Argument lists are built by pure functions (ffmpeg-python for
ffmpeg) and run by one runner, `_run`, with a time limit. Output is written under a hidden temporary name in the
destination's folder and renamed into place only after its duration has been checked against the source's.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import secrets
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import atomic
from daemon.errors import RejectedInput, TranscodeError, TransientError


@dataclass(frozen=True)
class OutputFormat:
    """One output encoding: what the daemon uploads, and the ffmpeg output options that make it."""

    name: str
    extension: str
    mime_type: str
    muxer: str
    codec_options: tuple[tuple[str, str], ...]  # ffmpeg output options after the common mono/mapping ones


FORMATS: dict[str, OutputFormat] = {
    # 16 kHz input to libopus: wideband is all speech needs, and it is smaller than 48 kHz (7.33 vs 7.53 MB/h).
    # compression_level 5 (default 10) cut encoding time from 50 s to 28 s per hour with no measured WER loss.
    "opus": OutputFormat("opus", ".ogg", "audio/ogg", "ogg", (
        ("acodec", "libopus"), ("audio_bitrate", "16k"), ("ar", "16000"), ("compression_level", "5"))),
    # The documented "OGG Vorbis" type; libvorbis cannot reach 16 kbps above 16 kHz.
    "vorbis": OutputFormat("vorbis", ".ogg", "audio/ogg", "ogg", (
        ("acodec", "libvorbis"), ("audio_bitrate", "16k"), ("ar", "16000"))),
    # 24k, not 16k: MP3 at 16 kbps measured 55-66 % WER (unintelligible); 24k matches Opus.
    "mp3": OutputFormat("mp3", ".mp3", "audio/mp3", "mp3", (
        ("acodec", "libmp3lame"), ("audio_bitrate", "24k"), ("ar", "16000"))),
}


@dataclass(frozen=True)
class ProbeResult:
    duration_seconds: float | None
    duration_is_estimate: bool  # ffprobe guessed the length from the bitrate (raw ADTS AAC, AMR, ...)
    audio_codec: str
    channels: int
    sample_rate: int
    container: str


@dataclass(frozen=True)
class Conversion:
    path: Path  # the final destination
    size_bytes: int
    mime_type: str
    format: str  # OutputFormat.name
    duration_seconds: float  # decoded length of the output, from ffmpeg's own progress report
    source_duration_seconds: float | None  # what the output should last: the probed source, or the cut span
    warning: str | None  # set when the file converted but not cleanly (part lost, decoding errors)


# Raw elementary streams have no header giving their length: ffprobe divides the size by the bitrate.
ESTIMATED_DURATION_CONTAINERS = frozenset({"aac", "amr", "amrnb", "amrwb", "ac3", "eac3", "dts"})
TOLERANCE = 0.01  # share of the source duration the output may lack; encoder delay/padding is ~20-40 ms
ESTIMATE_TOLERANCE = 0.04  # measured: ffprobe's guesses ran 0.8-3.4 % long on hour-long files
TOLERANCE_FLOOR = 0.25  # seconds; short clips differ by up to a frame or two of codec padding
ESTIMATE_TOLERANCE_FLOOR = 0.5  # seconds; a bitrate guess on a clip of a few seconds can be ~6 % off
NOTHING_USABLE = 1.0  # seconds: less than this from a longer (or unknown) source means nothing was decodable
DECODE_ERRORS_EXIT = 69  # ffmpeg's status when over 2/3 of the packets failed to decode (-max_error_rate)
SLOWEST_SPEED = 5.0  # x real time assumed for the timeout; Opus measured 72-127x, the slow static build 33x
MIN_TIMEOUT = 120.0
UNKNOWN_DURATION_TIMEOUT = 3 * 3600.0
PARTIAL_MARKER = ".partial-"
_POINTER = re.compile(r"\[[^\]\n]* @ 0x[0-9a-fA-F]+\] ?")
# Told how many seconds of audio a conversion has written so far (for progress bars).
Progress = Callable[[float], None]


# ---- pure parts: argument lists, parsing, judging -------------------------------------------------------------

def media_url(path: Path) -> str:
    """Absolute and 'file:'-prefixed, so names starting with '-' or containing ':' are never read as options."""
    return "file:" + os.path.abspath(path)


def probe_args(source: Path, ffprobe: str = "ffprobe") -> tuple[str, ...]:
    """The argv of ffmpeg.probe(source, v="error"), which itself has no time limit."""
    return (ffprobe, "-show_format", "-show_streams", "-of", "json", "-v", "error", media_url(source))


def convert_args(source: Path, output: Path, fmt: OutputFormat, *, ffmpeg: str = "ffmpeg",
                 start: float | None = None, length: float | None = None) -> tuple[str, ...]:
    """First audio stream only, no metadata, mono; `-progress pipe:1` reports the decoded duration on stdout."""
    import ffmpeg as ffmpeg_python  # here, not at the top: an idle daemon need not hold it in memory

    span = {} if start is None else {"ss": f"{start:.6f}", "t": f"{length:.6f}"}  # input options: exact seek
    stream = ffmpeg_python.input(media_url(source), **span).output(
        media_url(output), map="0:a:0", vn=None, sn=None, dn=None, map_metadata=-1, ac=1, format=fmt.muxer,
        fflags="+bitexact", **dict(fmt.codec_options))  # bitexact: the same audio gives the same bytes
    stream = stream.global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-nostats", "-progress", "pipe:1")
    return tuple(stream.overwrite_output().compile(cmd=ffmpeg))


def conversion_timeout(duration_seconds: float | None) -> float:
    """Generous: a limit that kills a healthy conversion would make it fail the same way on every retry."""
    if duration_seconds is None:
        return UNKNOWN_DURATION_TIMEOUT
    return max(MIN_TIMEOUT, 60.0 + duration_seconds / SLOWEST_SPEED)


def stderr_lines(stderr: str, *urls: str) -> list[str]:
    """Non-empty stderr lines without the '[mp3 @ 0x55..]' pointers or the file's URL prefix."""
    for url in urls:  # replace before splitting: a file name may itself contain a newline
        stderr = stderr.replace(url + ": ", "")
    return [line for line in (_POINTER.sub("", raw).strip() for raw in stderr.splitlines()) if line]


def main_reason(stderr: str, *urls: str) -> str:
    """The most telling line: the last one a component ([mp3 @ ...]) wrote, else the last line."""
    tagged = stderr_lines("\n".join(raw for raw in stderr.splitlines() if _POINTER.search(raw)), *urls)
    return (tagged or stderr_lines(stderr, *urls) or ["no message"])[-1].rstrip(".")


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def parse_probe(data: dict[str, Any], name: str) -> ProbeResult:
    """ffprobe's JSON -> ProbeResult; RejectedInput when there is nothing to convert."""
    streams = data.get("streams", [])
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not audio:
        raise RejectedInput(f"{name}: no audio stream ({_found(streams)})",
                            "Drop the audio recording itself, or extract its sound track first.")
    stream, fmt = audio[0], data.get("format", {})
    # The audio stream's own length first: a video track may run longer than the sound.
    duration = _number(stream.get("duration")) or _number(fmt.get("duration"))
    if duration is not None and duration <= 0:
        raise RejectedInput(f"{name}: the audio lasts 0 seconds", "Nothing was recorded; check the recorder.")
    container = fmt.get("format_name", "")
    return ProbeResult(duration, container in ESTIMATED_DURATION_CONTAINERS, stream.get("codec_name", "unknown"),
                       int(stream.get("channels") or 0), int(_number(stream.get("sample_rate")) or 0), container)


def _found(streams: list[dict[str, Any]]) -> str:
    kinds = sorted({"a cover picture" if s.get("disposition", {}).get("attached_pic") else s.get("codec_type", "?")
                    for s in streams})
    return f"ffprobe found only {' and '.join(kinds)}" if kinds else "ffprobe found no streams at all"


def decoded_seconds(progress: str) -> float | None:
    """The last out_time_us of ffmpeg's -progress report: how much audio really came out."""
    numbers = (_number(line[len("out_time_us="):]) for line in progress.splitlines()
               if line.startswith("out_time_us="))
    values = [value for value in numbers if value is not None]
    return values[-1] / 1e6 if values else None


def tolerance(expected: float, is_estimate: bool) -> float:
    if is_estimate:
        return max(ESTIMATE_TOLERANCE_FLOOR, expected * ESTIMATE_TOLERANCE)
    return max(TOLERANCE_FLOOR, expected * TOLERANCE)


def assess(name: str, returncode: int, produced: float, expected: float | None, is_estimate: bool,
           errors: list[str], reason: str) -> str | None:
    """Judge a finished ffmpeg run by what it produced (`produced` seconds), not by its exit status.

    Returns a warning for a file that converted but not cleanly; raises when there is nothing worth keeping."""
    if any("No space left on device" in line for line in errors):
        raise TransientError(f"{name}: no space left on the disk for the converted file",
                             "Free some space in the state folder; the conversion is retried by itself.")
    short = expected is not None and produced < expected - tolerance(expected, is_estimate)
    unverified = short or expected is None
    if returncode not in (0, DECODE_ERRORS_EXIT) and (unverified or produced <= 0):
        raise TranscodeError(f"{name}: ffmpeg could not convert it ({reason})",
                             f"ffmpeg exited with status {returncode} ({' | '.join(errors[-3:]) or reason}). Check the "
                             "file plays; retry it, and if it fails again report it with the file.")
    if produced <= 0 or (unverified and produced < NOTHING_USABLE):
        raise RejectedInput(f"{name}: no audio could be decoded" + (f" (ffmpeg: {reason})" if errors else ""),
                            "The file is corrupt or holds no sound; re-export or re-copy it from the recorder.")
    notes = []
    if short and expected:
        announced = "ffprobe estimates" if is_estimate else "the header announces"
        notes.append(f"only {produced:.1f} s of the {expected:.1f} s {announced} could be decoded "
                     f"({100 * produced / expected:.0f} %)")
    if errors:
        notes.append(f"ffmpeg reported {len(errors)} decoding problem(s), e.g. {reason}")
    return "; ".join(notes) or None


# ---- the runner and the file handling -------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def dying_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn for subprocess: the child gets `signum` when its parent dies (a daemon killed with -9 must not
    leave ffmpeg converting for nobody; a killed test run must not leave its daemon running)."""
    def arrange() -> None:  # runs in the child, before exec
        _LIBC.prctl(PR_SET_PDEATHSIG, signum)

    return arrange


# Never handed to ffmpeg or ffprobe: they need no credentials.
SECRET_VARIABLES = frozenset({"GEMINI_API_KEY", "GOOGLE_API_KEY", "CREDENTIALS_DIRECTORY", "AUDIODROP_DATABASE_URL"})
FD_FOLDER = "/proc/self/fd/"


def opened(fd: int) -> Path:
    """The path of an open file descriptor, for the tools: a file renamed or deleted while it is converted is
    still read whole (the child inherits the descriptor under the same number)."""
    return Path(f"{FD_FOLDER}{fd}")


def child_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in SECRET_VARIABLES}


def _run(argv: tuple[str, ...], *, timeout: float, source: Path, label: str | None = None,
         progress: Progress | None = None) -> tuple[int, str, str]:
    """Run one ffmpeg/ffprobe without secrets in its environment; kill it when the time limit passes.
    `progress`: told the seconds of audio ffmpeg has written so far, as its -progress report comes.
    Returns (exit status, stdout, stderr)."""
    tool = os.path.basename(argv[0])
    name = label or source.name
    pass_fds = (int(source.name),) if str(source).startswith(FD_FOLDER) else ()
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   preexec_fn=dying_with_parent(), env=child_environment(), pass_fds=pass_fds)
    except OSError as error:
        raise TransientError(f"{name}: cannot run {argv[0]!r} ({error.strerror})",
                             "Install ffmpeg (apt-get install ffmpeg) or correct the configured path.") from error
    try:
        if progress is None:
            out, err = process.communicate(timeout=timeout)
        else:
            out, err = _read_reporting(process, timeout, progress)
    except subprocess.TimeoutExpired:
        raise TransientError(f"{name}: {tool} did not finish within {timeout:g} s",
                             "It is retried later; if it keeps timing out the machine is overloaded "
                             "or the file is unusually long.") from None
    finally:
        if process.poll() is None:  # timeout, or interrupted: never leave ffmpeg running
            process.kill()
            process.communicate()
    return process.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _read_reporting(process: subprocess.Popen[bytes], timeout: float, progress: Progress) -> tuple[bytes, bytes]:
    """communicate(), but stdout is read as it comes and each new out_time_us of ffmpeg's -progress report is
    handed to `progress` (about twice a second). Raises TimeoutExpired when the time limit passes."""
    assert process.stdout is not None and process.stderr is not None
    deadline = time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    scanned = 0  # stdout up to here has been looked at for progress lines
    with process.stdout, process.stderr, selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, out)
        selector.register(process.stderr, selectors.EVENT_READ, err)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(process.args, timeout)
            for key, _events in selector.select(left):
                block = os.read(key.fd, 1 << 16)
                if not block:
                    selector.unregister(key.fileobj)
                    continue
                key.data.extend(block)
            end = out.rfind(b"\n") + 1
            if end > scanned:
                seconds = decoded_seconds(out[scanned:end].decode("ascii", "replace"))
                scanned = end
                if seconds is not None:
                    progress(seconds)
    process.wait(timeout=max(deadline - time.monotonic(), 0.0))
    return bytes(out), bytes(err)


def probe(source: Path, *, ffprobe: str = "ffprobe", timeout: float = 60, label: str | None = None) -> ProbeResult:
    """`label`: the name to use in messages (when `source` is an open descriptor's path)."""
    source = Path(os.path.abspath(source))
    name = label or source.name
    if source.stat().st_size == 0:  # FileNotFoundError propagates: a vanished file is not a bad one
        raise RejectedInput(f"{name}: the file is empty (0 bytes)",
                            "Nothing was recorded or the copy failed; drop the file again.")
    returncode, out, err = _run(probe_args(source, ffprobe), timeout=timeout, source=source, label=name)
    if returncode != 0:
        _still_there(source)
        reason = main_reason(err, media_url(source))
        raise RejectedInput(f"{name}: not a readable audio file (ffprobe: {reason})",
                            "It may be incomplete (still copying, or the recorder stopped abruptly) or not audio; "
                            "re-copy or re-export it, then retry it.")
    return parse_probe(json.loads(out), name)


def convert(source: Path, destination: Path, fmt: OutputFormat, *, probe_result: ProbeResult | None = None,
            ffmpeg: str = "ffmpeg", ffprobe: str = "ffprobe", timeout: float | None = None,
            label: str | None = None, progress: Progress | None = None) -> Conversion:
    """Convert the whole recording; `destination` appears only once the output has been checked. `progress` is
    told the seconds converted so far while ffmpeg runs."""
    info = probe_result or probe(source, ffprobe=ffprobe, label=label)
    limit = timeout if timeout is not None else conversion_timeout(info.duration_seconds)
    return _produce(source, destination, fmt, info.duration_seconds, info.duration_is_estimate,
                    ffmpeg=ffmpeg, timeout=limit, label=label, progress=progress)


def cut(source: Path, destination: Path, fmt: OutputFormat, start: float, end: float, *,
        probe_result: ProbeResult | None = None, ffmpeg: str = "ffmpeg", ffprobe: str = "ffprobe",
        timeout: float | None = None) -> Conversion:
    """Convert exactly [start, end) seconds of the recording (clipped to its end)."""
    info = probe_result or probe(source, ffprobe=ffprobe)
    total = info.duration_seconds
    if not 0 <= start < end or (total is not None and start >= total):
        raise ValueError(f"cannot cut {start}-{end} s from {source} ({total} s long)")
    span = (end if total is None else min(end, total)) - start
    limit = timeout if timeout is not None else conversion_timeout(span)
    return _produce(source, destination, fmt, span, info.duration_is_estimate,
                    ffmpeg=ffmpeg, timeout=limit, start=start, length=end - start)


def _produce(source: Path, destination: Path, fmt: OutputFormat, expected: float | None, is_estimate: bool, *,
             ffmpeg: str, timeout: float, start: float | None = None, length: float | None = None,
             label: str | None = None, progress: Progress | None = None) -> Conversion:
    source, destination = Path(os.path.abspath(source)), Path(os.path.abspath(destination))
    temp = _temp_path(destination)
    try:
        argv = convert_args(source, temp, fmt, ffmpeg=ffmpeg, start=start, length=length)
        returncode, out, err = _run(argv, timeout=timeout, source=source, label=label, progress=progress)
        if returncode != 0:
            _still_there(source)
        urls = (media_url(source), media_url(temp))
        produced = (decoded_seconds(out) or 0.0) if temp.is_file() and temp.stat().st_size else 0.0
        warning = assess(label or source.name, returncode, produced, expected, is_estimate, stderr_lines(err, *urls),
                         main_reason(err, *urls))
        size = atomic.replace(temp, destination)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return Conversion(destination, size, fmt.mime_type, fmt.name, produced, expected, warning)


def _still_there(source: Path) -> None:
    """A file deleted or moved while ffmpeg read it is not a broken file: say so the way os does."""
    if not source.exists():
        raise FileNotFoundError(errno.ENOENT, "the file disappeared during conversion", str(source))


def _temp_path(destination: Path) -> Path:
    """A hidden, unique name beside the destination (same filesystem, so os.replace is atomic).

    Not created here: ffmpeg creates it, so it gets the usual umask permissions rather than mkstemp's 0600."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    stem = destination.name.encode()[:150].decode("utf-8", "ignore")  # stay under the 255-byte name limit
    return destination.parent / f".{stem}{PARTIAL_MARKER}{secrets.token_hex(6)}{destination.suffix}"


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete temporary outputs left by a conversion that was killed (kill -9, power cut); call at start-up."""
    return atomic.sweep(folder, PARTIAL_MARKER)
