"""Make real test recordings with ffmpeg and espeak-ng (short clips, so a test suite stays fast), and read them back.

Every maker writes the file at `path`, returns the path, and raises if the tool fails. They are shared by every
test that needs audio; none of them uses daemon code, so they can be used to check it.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
FFPROBE = shutil.which("ffprobe") or "ffprobe"
ESPEAK = shutil.which("espeak-ng") or "espeak-ng"
LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}
SPEECH = "Hello. This is a short test recording for the audio drop daemon. It should survive conversion."


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; raise with its stderr if it fails."""
    result = subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                            capture_output=True, text=True, timeout=60)
    if result.returncode:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {result.stderr.strip()}")


def _abs(path: Path) -> str:
    return "file:" + str(Path(path).absolute())


def _encode(path: Path, inputs: list[str], codec: str | None, fmt: str | None, bitrate: str | None,
            sample_fmt: str | None, extra: tuple[str, ...]) -> Path:
    args = [*inputs]
    args += ["-c:a", codec] if codec else []
    args += ["-b:a", bitrate] if bitrate else []
    args += ["-sample_fmt", sample_fmt] if sample_fmt else []
    args += ["-f", fmt] if fmt else []
    ffmpeg(*args, *extra, _abs(path))
    return path


def tone_source(seconds: float, channels: int = 1, rate: int = 16000) -> list[str]:
    """A lavfi input: a different sine per channel plus a little noise, so encoders behave as on real sound."""
    waves = "|".join(f"0.3*sin({220 * (n + 1)}*2*PI*t)+0.05*(random({n})-0.5)" for n in range(channels))
    return ["-f", "lavfi", "-i", f"aevalsrc={waves}:s={rate}:d={seconds}:c={LAYOUTS.get(channels, 'mono')}"]


def make_tone(path: Path, seconds: float = 4.0, *, codec: str | None = None, fmt: str | None = None,
              channels: int = 1, rate: int = 16000, bitrate: str | None = None, sample_fmt: str | None = None,
              extra: tuple[str, ...] = ()) -> Path:
    """A tone in any codec/container ffmpeg can write; without `codec`/`fmt` ffmpeg picks by the extension."""
    return _encode(path, tone_source(seconds, channels, rate), codec, fmt, bitrate, sample_fmt, extra)


def make_speech(path: Path, text: str = SPEECH, *, voice: str = "en-us", codec: str | None = None) -> Path:
    """espeak-ng reading `text` (22.05 kHz mono WAV), re-encoded when `path` is not a .wav."""
    wav = path if path.suffix == ".wav" and codec is None else path.with_name(path.name + ".speech.wav")
    subprocess.run([ESPEAK, "-v", voice, "-w", str(wav), text], check=True, capture_output=True, timeout=60)
    if wav != path:
        _encode(path, ["-i", _abs(wav)], codec, None, None, None, ())
        wav.unlink()
    return path


def make_video(path: Path, seconds: float = 4.0, *, audio: bool = True) -> Path:
    """A small H.264 MP4, with an AAC track or none; its video runs 0.5 s longer than its sound."""
    video = ["-f", "lavfi", "-i", f"testsrc=s=160x120:r=10:d={seconds + 0.5}"]
    sound = tone_source(seconds, 2, 44100) if audio else []
    maps = ["-map", "0:v", *(["-map", "1:a", "-c:a", "aac"] if audio else [])]
    ffmpeg(*video, *sound, *maps, "-c:v", "libx264", "-preset", "ultrafast", _abs(path))
    return path


def make_video_only(path: Path, seconds: float = 2.0) -> Path:
    return make_video(path, seconds, audio=False)


def make_mp3_with_cover(path: Path, seconds: float = 4.0) -> Path:
    """An MP3 whose ID3 tag holds a JPEG cover: ffprobe lists it as an mjpeg video stream (attached_pic)."""
    cover = ["-f", "lavfi", "-i", "color=c=red:s=64x64:d=1"]
    ffmpeg(*tone_source(seconds, 2, 44100), *cover, "-map", "0:a", "-map", "1:v", "-frames:v", "1",
           "-c:a", "libmp3lame", "-b:a", "128k", "-c:v", "mjpeg", "-disposition:v", "attached_pic",
           "-id3v2_version", "3", _abs(path))
    return path


def make_truncated_mp3(path: Path, seconds: float = 60.0, keep: float = 0.2) -> Path:
    """An MP3 whose Xing header announces `seconds`, cut to the first `keep` share of its bytes (mid-frame)."""
    make_tone(path, seconds, codec="libmp3lame", bitrate="32k", channels=1, rate=16000)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) + 1])
    return path


def make_undecodable_mp3(path: Path, seconds: float = 60.0) -> Path:
    """A valid MP3 header (announcing `seconds`) followed by random bytes: probes fine, decodes to nothing."""
    make_tone(path, seconds, codec="libmp3lame", bitrate="32k")
    noise = random.Random(7).randbytes(len(path.read_bytes()))
    path.write_bytes(path.read_bytes()[:1500] + noise)
    return path


def make_damaged_mp3(path: Path, seconds: float = 10.0, damage: int = 4096) -> Path:
    """An MP3 with `damage` random bytes overwriting its middle: decodes with errors, the rest survives."""
    make_tone(path, seconds, codec="libmp3lame", bitrate="64k", channels=2, rate=44100)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + damage] = random.Random(5).randbytes(damage)
    path.write_bytes(bytes(data))
    return path


def make_tiny_mp3(path: Path, size: int = 100) -> Path:
    """The first `size` bytes of an MP3: the tag and part of the first frame."""
    make_tone(path, 1.0, codec="libmp3lame")
    path.write_bytes(path.read_bytes()[:size])
    return path


def make_m4a_without_moov(path: Path, seconds: float = 4.0) -> Path:
    """An M4A whose index (the moov atom, written last without +faststart) was cut off, as by an interrupted copy."""
    make_tone(path, seconds, codec="aac", fmt="ipod")
    data = path.read_bytes()
    moov = data.rfind(b"moov")
    assert moov > len(data) // 2, "expected the moov atom at the end"
    path.write_bytes(data[: moov - 4])
    return path


def make_wav_with_unknown_size(path: Path, seconds: float = 4.0) -> Path:
    """A WAV whose RIFF and data sizes are 0xFFFFFFFF, as a streaming recorder leaves them when it crashes."""
    make_tone(path, seconds, codec="pcm_s16le", rate=16000)
    data = bytearray(path.read_bytes())
    data[4:8] = b"\xff\xff\xff\xff"
    data[data.index(b"data") + 4 : data.index(b"data") + 8] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    return path


def make_amr(path: Path, seconds: float = 4.0) -> Path:
    """AMR-NB assembled by hand (Debian's ffmpeg can decode AMR but has no encoder): 12.2 kbps frames of noise.

    File magic, then one 32-byte frame per 20 ms: a header byte (mode 7 << 3 | quality bit) and 31 payload bytes.
    """
    rng = random.Random(1)
    frames = b"".join(b"\x3c" + rng.randbytes(31) for _ in range(round(seconds / 0.02)))
    path.write_bytes(b"#!AMR\n" + frames)
    return path


def make_not_audio(path: Path) -> Path:
    path.write_text("Meeting notes, not a recording.\n" * 20)
    return path


def make_empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def ffprobe_audio(path: Path) -> dict:
    """What ffprobe reads back from a file: the first audio stream's codec, channels, rate, and the duration."""
    result = subprocess.run([FFPROBE, "-v", "error", "-show_format", "-show_streams", "-of", "json", _abs(path)],
                            capture_output=True, text=True, timeout=60, check=True)
    data = json.loads(result.stdout)
    stream = next(s for s in data["streams"] if s["codec_type"] == "audio")
    return {"codec": stream["codec_name"], "channels": stream["channels"], "sample_rate": int(stream["sample_rate"]),
            "duration": float(data["format"]["duration"]), "streams": len(data["streams"])}
