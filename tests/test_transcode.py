"""daemon.pipeline.transcode against the real ffmpeg/ffprobe, on real files made in tmp_path by tests/media.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from daemon.errors import RejectedInput, TranscodeError, TransientError
from daemon.pipeline import transcode
from daemon.pipeline.transcode import FORMATS, convert, cut, probe
from tests import media

pytestmark = pytest.mark.skipif(not (shutil.which("ffmpeg") and shutil.which("ffprobe")), reason="needs ffmpeg")
OPUS = FORMATS["opus"]


def leftovers(folder: Path, *inputs: Path) -> list[str]:
    """Every file under `folder` except the inputs, hidden temporary files included."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p not in inputs)


def kbps(path: Path, seconds: float) -> float:
    return path.stat().st_size * 8 / seconds / 1000


# name -> (maker, real length of the sound in seconds)
INPUTS = {
    "wav16_44k1_stereo.wav": (lambda p: media.make_tone(p, channels=2, rate=44100, codec="pcm_s16le"), 4.0),
    "wav24_48k_stereo.wav": (lambda p: media.make_tone(p, channels=2, rate=48000, codec="pcm_s24le"), 4.0),
    "six_channel_51.wav": (lambda p: media.make_tone(p, channels=6, rate=48000, codec="pcm_s24le"), 4.0),
    "song.mp3": (lambda p: media.make_tone(p, channels=2, rate=44100, bitrate="128k"), 4.0),
    "memo.m4a": (lambda p: media.make_tone(p, channels=2, rate=44100), 4.0),
    "raw_adts.aac": (lambda p: media.make_tone(p, channels=2, rate=44100, codec="aac", fmt="adts"), 4.0),
    "vorbis.ogg": (lambda p: media.make_tone(p, channels=2, rate=44100, codec="libvorbis"), 4.0),
    "voice.opus": (lambda p: media.make_tone(p, channels=2, rate=48000), 4.0),
    "browser.webm": (lambda p: media.make_tone(p, channels=2, rate=48000), 4.0),
    "studio.flac": (lambda p: media.make_tone(p, channels=2, rate=48000, sample_fmt="s32"), 4.0),
    "mac.aiff": (lambda p: media.make_tone(p, channels=2, rate=44100), 4.0),
    "windows.wma": (lambda p: media.make_tone(p, channels=2, rate=44100), 4.0),
    "phone.amr": (media.make_amr, 4.0),
    "meeting.mp4": (media.make_video, 4.0),  # its video track runs 0.5 s longer than the sound
    "with_cover.mp3": (media.make_mp3_with_cover, 4.0),
    "crashed_recorder.wav": (media.make_wav_with_unknown_size, 4.0),
}


@pytest.mark.parametrize("name", INPUTS)
def test_every_input_kind_converts_to_mono_opus_of_the_same_length(tmp_path, name):
    make, seconds = INPUTS[name]
    source = make(tmp_path / name)
    destination = tmp_path / "out" / "recording.ogg"

    result = convert(source, destination, OPUS)

    assert result.path == destination and destination.stat().st_size == result.size_bytes
    assert (result.mime_type, result.format, result.warning) == ("audio/ogg", "opus", None)
    back = media.ffprobe_audio(destination)
    assert (back["codec"], back["channels"], back["streams"]) == ("opus", 1, 1)
    # 0.15 s: encoders pad the last frame (WMA's 2048-sample frames decode to 4.1 s here)
    assert result.duration_seconds == pytest.approx(seconds, abs=0.15)
    assert back["duration"] == pytest.approx(seconds, abs=0.15)
    assert 13 <= kbps(destination, back["duration"]) <= 20  # Opus VBR: 16k is an average; a plain tone needs less
    assert leftovers(tmp_path, source) == ["recording.ogg"]


def test_speech_from_espeak_converts(tmp_path):
    source = media.make_speech(tmp_path / "dictation.wav")
    spoken = media.ffprobe_audio(source)["duration"]

    result = convert(source, tmp_path / "dictation.ogg", OPUS)

    assert result.warning is None
    assert result.duration_seconds == pytest.approx(spoken, abs=0.1)
    assert media.ffprobe_audio(result.path)["channels"] == 1


@pytest.mark.parametrize(("fmt", "codec", "rate", "low", "high"), [
    ("opus", "opus", 48000, 14, 20),  # Opus always decodes at 48 kHz; it was fed 16 kHz
    ("vorbis", "vorbis", 16000, 12, 22),
    ("mp3", "mp3", 16000, 22, 27),
])
def test_each_output_format_reads_back_as_mono_with_its_codec(tmp_path, fmt, codec, rate, low, high):
    source = media.make_tone(tmp_path / "in.wav", 8.0, channels=2, rate=48000)
    output = FORMATS[fmt]

    result = convert(source, tmp_path / f"out{output.extension}", output)

    back = media.ffprobe_audio(result.path)
    assert (back["codec"], back["channels"], back["sample_rate"]) == (codec, 1, rate)
    assert result.path.suffix == output.extension and result.mime_type == output.mime_type
    assert result.duration_seconds == pytest.approx(8.0, abs=0.1)
    assert low <= kbps(result.path, back["duration"]) <= high


def test_probe_reports_the_first_audio_stream(tmp_path):
    info = probe(media.make_tone(tmp_path / "x.wav", 3.0, channels=6, rate=48000))
    assert (info.duration_seconds, info.channels, info.sample_rate, info.audio_codec) == (3.0, 6, 48000, "pcm_s16le")
    assert not info.duration_is_estimate
    assert probe(media.make_amr(tmp_path / "x.amr")).duration_is_estimate


def test_a_cover_picture_is_not_video(tmp_path):
    info = probe(media.make_mp3_with_cover(tmp_path / "album.mp3"))
    assert info.audio_codec == "mp3"


# ---- hostile input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "make", "message"), [
    ("x.wav", media.make_empty, "x.wav: the file is empty (0 bytes)"),
    ("notes.wav", media.make_not_audio,
     "notes.wav: not a readable audio file (ffprobe: Invalid data found when processing input)"),
    ("cut.mp3", media.make_tiny_mp3, "cut.mp3: not a readable audio file (ffprobe: Failed to read frame size"),
    ("interview.m4a", media.make_m4a_without_moov,
     "interview.m4a: not a readable audio file (ffprobe: moov atom not found)"),
    ("interview.mp4", media.make_video_only, "interview.mp4: no audio stream (ffprobe found only video)"),
    ("noise.mp3", media.make_undecodable_mp3, "noise.mp3: no audio could be decoded (ffmpeg: Header missing)"),
])
def test_unusable_input_is_rejected_with_a_readable_reason(tmp_path, name, make, message):
    source = make(tmp_path / name)

    with pytest.raises(RejectedInput) as caught:
        convert(source, tmp_path / "out.ogg", OPUS)

    assert str(caught.value).startswith(message)
    assert "@ 0x" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert caught.value.hint  # says what to do
    assert leftovers(tmp_path, source) == []


def test_a_vanished_file_is_not_rejected_but_reported_as_missing(tmp_path):
    with pytest.raises(FileNotFoundError):  # the caller waits for it again rather than rejecting it
        convert(tmp_path / "gone.wav", tmp_path / "out.ogg", OPUS)


def test_a_truncated_mp3_converts_what_survives_with_a_warning(tmp_path):
    source = media.make_truncated_mp3(tmp_path / "long.mp3", seconds=60.0, keep=0.2)

    result = convert(source, tmp_path / "long.ogg", OPUS)

    assert result.duration_seconds == pytest.approx(12.0, abs=0.5)
    assert result.source_duration_seconds == pytest.approx(60.0, abs=0.2)
    found = re.fullmatch(r"only ([\d.]+) s of the 60\.\d s the header announces could be decoded \((\d+) %\)",
                         result.warning or "")
    assert found and float(found[1]) == pytest.approx(12.0, abs=0.5) and 19 <= int(found[2]) <= 21
    assert media.ffprobe_audio(result.path)["duration"] == pytest.approx(12.0, abs=0.5)


def test_a_damaged_mp3_converts_with_a_warning_naming_the_decoding_problems(tmp_path):
    source = media.make_damaged_mp3(tmp_path / "damaged.mp3", seconds=10.0, damage=4096)  # ~0.5 s at 64 kbps

    result = convert(source, tmp_path / "damaged.ogg", OPUS)

    assert result.duration_seconds == pytest.approx(9.5, abs=0.3)
    assert result.warning and result.warning.startswith("only 9.5 s of the 10.0 s")
    assert "decoding problem(s), e.g. Header missing" in result.warning


def test_ffmpeg_failing_on_a_probeable_file_is_a_transcode_error(tmp_path):
    # libvorbis cannot encode 8 kbps at 16 kHz ("encoder setup failed"): a real ffmpeg failure.
    impossible = transcode.OutputFormat("vorbis", ".ogg", "audio/ogg", "ogg",
                                        (("acodec", "libvorbis"), ("audio_bitrate", "8k"), ("ar", "16000")))
    source = media.make_tone(tmp_path / "ok.wav", 2.0)
    (tmp_path / "out.ogg").write_bytes(b"previous good output")

    with pytest.raises(TranscodeError, match=r"^ok.wav: ffmpeg could not convert it \(encoder setup failed\)"):
        convert(source, tmp_path / "out.ogg", impossible)

    assert (tmp_path / "out.ogg").read_bytes() == b"previous good output"  # never replaced by a failed run
    assert leftovers(tmp_path, source) == ["out.ogg"]


@pytest.mark.parametrize("name", [
    "name with spaces ünïcödé 日本語 \"dq\" 'sq'.wav",
    "line\nbreak.wav",
    "-leading dash.wav",
    "colon:in name.wav",
    "dollar $HOME `x`.wav",
])
def test_awkward_file_names_work_for_source_and_destination(tmp_path, name):
    source = media.make_tone(tmp_path / name, 2.0)
    destination = tmp_path / (name[:-4] + ".ogg")

    assert convert(source, destination, OPUS).duration_seconds == pytest.approx(2.0, abs=0.1)
    assert destination.is_file()


def test_relative_names_that_look_like_options_or_protocols_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    media.make_tone(tmp_path / "-dash.wav", 1.0)
    media.make_tone(tmp_path / "pipe:1.wav", 1.0)

    assert convert(Path("-dash.wav"), Path("-out.ogg"), OPUS).path == tmp_path / "-out.ogg"
    assert convert(Path("pipe:1.wav"), Path("pipe:2.ogg"), OPUS).path == tmp_path / "pipe:2.ogg"
    assert (tmp_path / "-out.ogg").is_file() and (tmp_path / "pipe:2.ogg").is_file()


def test_a_timeout_kills_ffmpeg_and_leaves_nothing_behind(tmp_path):
    source = media.make_tone(tmp_path / "long.wav", 600.0)  # ~5 s of encoding; the limit is 0.5 s

    with pytest.raises(TransientError, match=r"^long.wav: ffmpeg did not finish within 0.5 s"):
        convert(source, tmp_path / "long.ogg", OPUS, timeout=0.5)

    assert leftovers(tmp_path, source) == []


def test_a_probe_timeout_is_transient(tmp_path):
    source = media.make_tone(tmp_path / "a.wav", 1.0)
    with pytest.raises(TransientError, match=r"^a.wav: ffprobe did not finish within 0.001 s"):
        probe(source, timeout=0.001)


def test_a_missing_ffmpeg_is_transient_and_named(tmp_path):
    source = media.make_tone(tmp_path / "a.wav", 1.0)
    with pytest.raises(TransientError, match=r"^a.wav: cannot run '/nowhere/ffmpeg'"):
        convert(source, tmp_path / "a.ogg", OPUS, ffmpeg="/nowhere/ffmpeg")
    assert leftovers(tmp_path, source) == []


# ---- cutting a span -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["long.wav", "long.mp3"])
def test_cut_converts_exactly_the_span(tmp_path, name):
    source = media.make_tone(tmp_path / name, 10.0)

    middle = cut(source, tmp_path / "middle.ogg", OPUS, 2.5, 6.0)
    tail = cut(source, tmp_path / "tail.ogg", OPUS, 8.0, 20.0)  # past the end: clipped, not a warning

    assert (middle.duration_seconds, middle.source_duration_seconds) == (pytest.approx(3.5, abs=0.05), 3.5)
    assert media.ffprobe_audio(middle.path)["duration"] == pytest.approx(3.5, abs=0.05)
    assert tail.duration_seconds == pytest.approx(2.0, abs=0.1) and tail.warning is None
    assert leftovers(tmp_path, source) == ["middle.ogg", "tail.ogg"]


def test_cut_refuses_an_empty_or_outside_span(tmp_path):
    source = media.make_tone(tmp_path / "a.wav", 2.0)
    for start, end in [(1.0, 1.0), (3.0, 4.0), (-1.0, 1.0)]:
        with pytest.raises(ValueError):
            cut(source, tmp_path / "a.ogg", OPUS, start, end)


# ---- pure parts ---------------------------------------------------------------------------------------------

def test_the_ffmpeg_command_maps_one_audio_stream_and_strips_everything_else():
    argv = transcode.convert_args(Path("/in/-x.wav"), Path("/out/y.ogg"), OPUS)
    pairs = set(zip(argv, argv[1:]))
    assert argv[0] == "ffmpeg" and "-xerror" not in argv
    assert {("-map", "0:a:0"), ("-map_metadata", "-1"), ("-ac", "1"), ("-acodec", "libopus"), ("-b:a", "16k"),
            ("-i", "file:/in/-x.wav"), ("-f", "ogg"), ("-progress", "pipe:1")} <= pairs
    assert {"-vn", "-sn", "-dn", "-nostdin", "-y"} <= set(argv) and argv.count("file:/out/y.ogg") == 1
    assert transcode.probe_args(Path("/in/a:b.wav"))[-1] == "file:/in/a:b.wav"


@pytest.mark.parametrize(("returncode", "produced", "errors", "outcome"), [
    (0, 60.0, [], None),
    (0, 59.5, [], None),  # within 1 %
    (69, 59.5, ["Header missing"], "ffmpeg reported 1 decoding problem(s), e.g. Header missing"),
    (0, 30.0, [], "only 30.0 s of the 60.0 s the header announces could be decoded (50 %)"),
    (0, 0.4, [], RejectedInput),  # a few garbage frames from a 60 s header are nothing
    (1, 30.0, ["Error writing trailer"], TranscodeError),  # a failed run is only kept when it is complete
    (1, 0.0, ["Conversion failed!"], TranscodeError),
    (1, 40.0, ["Error writing trailer of x.ogg: No space left on device"], TransientError),
])
def test_a_finished_run_is_judged_by_its_output(returncode, produced, errors, outcome):
    reason = errors[-1] if errors else "no message"
    judge = lambda: transcode.assess("x.mp3", returncode, produced, 60.0, False, errors, reason)  # noqa: E731
    if isinstance(outcome, type):
        with pytest.raises(outcome, match="^x.mp3: "):
            judge()
    else:
        assert judge() == outcome


def test_conversion_timeout_is_generous():
    assert transcode.conversion_timeout(10) == 120
    assert transcode.conversion_timeout(3600) >= 10 * 50  # 10x the measured 50 s per hour
    assert transcode.conversion_timeout(None) >= transcode.conversion_timeout(9.5 * 3600) / 3


def test_stale_partials_are_swept(tmp_path):
    (tmp_path / ".a.ogg.partial-0123ab.ogg").write_bytes(b"x")
    (tmp_path / "a.ogg").write_bytes(b"kept")
    assert [p.name for p in transcode.remove_stale_partials(tmp_path)] == [".a.ogg.partial-0123ab.ogg"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.ogg"]
