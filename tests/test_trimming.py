"""daemon.prompts.trimming: the plan and the time map as pure functions, and the real ffmpeg runs on espeak-ng speech
placed with silent gaps of known position and length (the truth is where each sentence was put)."""

from __future__ import annotations

import array
import importlib.util
import math
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.errors import RejectedInput, TranscodeError, TransientError
from daemon.pipeline.transcode import FORMATS, convert, opened
from daemon.prompts import trimming
from daemon.prompts.chunking import parse_transcript
from daemon.prompts.trimming import Segment, Span, TrimMap, map_timestamps, plan

FFMPEG = shutil.which("ffmpeg")
ESPEAK = shutil.which("espeak-ng")
needs_ffmpeg = pytest.mark.skipif(not (FFMPEG and shutil.which("ffprobe")), reason="needs ffmpeg")
needs_speech = pytest.mark.skipif(not (FFMPEG and ESPEAK), reason="needs ffmpeg and espeak-ng")
HAS_WEBRTC = importlib.util.find_spec("webrtcvad") is not None
DETECTORS = [pytest.param("webrtc", marks=pytest.mark.skipif(not HAS_WEBRTC, reason="needs webrtcvad-wheels")),
             "silencedetect"]
RATE = 16000


def synthetic() -> TrimMap:
    """60 s recording, speech at 9-21 s and 49-56 s, cut with a 1 s pause: segments 9-21 and 49-56."""
    return plan([Span(10, 20), Span(50, 55)], 60, min_silence_seconds=2, keep_pause_seconds=1,
                pad_seconds=0.5)


# ---- the plan and the map, pure --------------------------------------------------------------------------------

def test_plan_cuts_long_silences_down_to_the_pause_and_pads_the_speech():
    trim_map = synthetic()

    assert trim_map.segments == (Segment(9.0, 21.0, 0.0), Segment(49.0, 56.0, 12.0))
    assert (trim_map.trimmed_duration, trim_map.saved_seconds, trim_map.is_identity) == (19.0, 41.0, False)


def test_short_pauses_are_kept_whole_and_overlapping_pads_merge():
    trim_map = plan([Span(1, 5), Span(6.9, 10), Span(10.2, 11)], 11, min_silence_seconds=2, keep_pause_seconds=1,
                    pad_seconds=0.3)

    assert trim_map.is_identity and trim_map.segments == (Segment(0.0, 11.0, 0.0),)


def test_speech_at_the_very_start_and_end_keeps_both_edges():
    trim_map = plan([Span(0, 3), Span(40, 45)], 45, pad_seconds=0.3, keep_pause_seconds=1, min_silence_seconds=2)

    assert trim_map.segments[0].start == 0 and trim_map.segments[-1].end == 45
    assert trim_map.to_original(0) == 0 and trim_map.to_original(trim_map.trimmed_duration) == 45


def test_a_recording_without_speech_keeps_only_one_pause():
    assert plan([], 3600).segments == (Segment(0.0, trimming.KEEP_PAUSE_SECONDS, 0.0),)
    assert plan([], 1.0).is_identity  # too short to hold a long silence


@pytest.mark.parametrize("settings", [dict(min_silence_seconds=1, keep_pause_seconds=1),
                                      dict(pad_seconds=-1), dict(keep_pause_seconds=math.nan)])
def test_plan_refuses_settings_that_would_not_shorten_anything(settings):
    with pytest.raises(ValueError):
        plan([Span(1, 2)], 10, **settings)


def test_to_original_is_exact_inside_segments_and_round_trips():
    trim_map = synthetic()

    for trimmed in (0.0, 0.25, 5.0, 11.49, 12.0, 12.001, 15.5, 18.999):
        assert trim_map.to_trimmed(trim_map.to_original(trimmed)) == pytest.approx(trimmed, abs=1e-9)
    assert trim_map.to_original(5.0) == 14.0 and trim_map.to_original(15.5) == 52.5


def test_segment_boundaries_map_to_the_segment_that_starts_there():
    trim_map = synthetic()

    assert trim_map.to_original(12.0) == 49.0  # the junction belongs to the following segment
    assert trim_map.to_original(19.0) == 56.0  # the very end
    assert trim_map.to_original(25.0) == 60.0  # past the end: clamped to the recording


def test_a_time_in_the_first_half_of_a_cut_pause_goes_to_the_start_of_the_next_segment():
    trim_map = synthetic()

    assert trim_map.to_original(11.4999) == pytest.approx(20.4999)  # before the pause: exact
    assert [trim_map.to_original(t) for t in (11.5, 11.9, 11.999)] == [49.0, 49.0, 49.0]
    assert trim_map.pause_before(11.7) == trim_map.segments[1] and trim_map.pause_before(12.2) is None


def test_to_trimmed_puts_a_cut_time_where_the_cut_is():
    trim_map = synthetic()

    assert [trim_map.to_trimmed(t) for t in (0.0, 9.0, 30.0, 49.0, 58.0)] == [0.0, 0.0, 12.0, 12.0, 19.0]


def test_the_identity_map_changes_nothing():
    trim_map = plan([Span(0.2, 29.9)], 30)

    assert trim_map.is_identity and trim_map.saved_seconds == 0
    assert all(trim_map.to_original(t) == t for t in (0, 0.5, 17.25, 30))
    assert map_timestamps("[00:00:17] Speaker 1: hi", trim_map).text == "[00:00:17] Speaker 1: hi"


def test_the_map_survives_json_and_refuses_anything_else():
    trim_map = synthetic()

    assert TrimMap.from_json(trim_map.to_json()) == trim_map
    for broken in ("{}", "[1, 2]", '{"version": 1, "duration": 10, "keep_pause_seconds": 1, "segments": '
                   '[[0, 5, 0], [4, 8, 5]]}', "not json"):
        with pytest.raises(ValueError):
            TrimMap.from_json(broken)


# ---- timestamps in answers ---------------------------------------------------------------------------------------

TRANSCRIPT = """\
[00:00:00] Speaker 1: Good morning.
[00:00:05] Speaker 2: Morning, shall we start?
**[00:13]** Speaker 1: Yes, the budget first.
- [00:15 - 00:17] Speaker 2: It is over by a tenth.
00:18 - Speaker 1: Then we cut travel.
Nothing else was said at 00:18 in prose.
Summary: the budget is discussed at [00:00:13] (see also (00:15))."""


def test_map_timestamps_moves_every_stamp_to_the_recording_and_keeps_its_style():
    remapped = map_timestamps(TRANSCRIPT, synthetic())

    assert remapped.text.splitlines() == [
        "[00:00:09] Speaker 1: Good morning.",
        "[00:00:14] Speaker 2: Morning, shall we start?",
        "**[00:50]** Speaker 1: Yes, the budget first.",
        "- [00:52 - 00:54] Speaker 2: It is over by a tenth.",
        "00:55 - Speaker 1: Then we cut travel.",
        "Nothing else was said at 00:18 in prose.",
        "Summary: the budget is discussed at [00:00:50] (see also (00:52)).",
    ]
    assert remapped.notes == []


def test_map_timestamps_agrees_with_how_chunking_reads_the_stamps():
    trim_map = synthetic()
    before = [line.seconds for line in parse_transcript(TRANSCRIPT)]
    after = [line.seconds for line in parse_transcript(map_timestamps(TRANSCRIPT, trim_map).text)]

    assert after == [None if s is None else math.floor(trim_map.to_original(s + 0.5)) for s in before]


def test_a_stamp_inside_a_cut_pause_is_placed_at_the_next_speech_and_reported():
    remapped = map_timestamps("[00:00:11] Speaker 2: So.\n[00:00:30] Speaker 1: Bye.", synthetic())

    assert remapped.text == "[00:00:49] Speaker 2: So.\n[00:01:00] Speaker 1: Bye."
    assert len(remapped.notes) == 2
    assert "00:00:11 fell inside a cut pause; placed at 00:00:49" in remapped.notes[0]
    assert "past the end" in remapped.notes[1]


def test_stamps_past_an_hour_gain_hours_and_fractions_keep_their_digits():
    trim_map = plan([Span(10, 20), Span(4000, 4010)], 4020, min_silence_seconds=2, keep_pause_seconds=1,
                    pad_seconds=0)

    assert map_timestamps("[00:11.25] x [00:12.250]", trim_map).text == "[01:06:39.75] x [01:06:40.750]"


# ---- the subprocess: environment and time limit ------------------------------------------------------------------

@pytest.mark.parametrize("detector", ["silencedetect", "webrtc"])
def test_the_ffmpeg_process_gets_no_secrets(tmp_path, monkeypatch, detector):
    for variable, value in (("GEMINI_API_KEY", "s3cr3t-1"), ("GOOGLE_API_KEY", "s3cr3t-2"),
                            ("AUDIODROP_DATABASE_URL", "postgresql+psycopg://u:s3cr3t-3@h/db"),
                            ("CREDENTIALS_DIRECTORY", "/run/credentials/s3cr3t-4")):
        monkeypatch.setenv(variable, value)
    spy = tmp_path / "ffmpeg"
    spy.write_text(f"#!/bin/sh\nenv > '{tmp_path}/env.txt'\nexit 1\n")
    spy.chmod(0o755)
    recording = tmp_path / "x.ogg"
    recording.write_bytes(b"OggS")

    with pytest.raises(RejectedInput):
        trimming.detect_speech(recording, detector=detector, ffmpeg=str(spy))

    seen = (tmp_path / "env.txt").read_text()
    assert "PATH=" in seen and "s3cr3t" not in seen


@pytest.mark.parametrize("script", ["exec sleep 30", "exec >&-\nexec sleep 30"], ids=["silent", "stdout closed"])
def test_a_hanging_ffmpeg_is_killed_at_the_time_limit(tmp_path, script):
    hang = tmp_path / "ffmpeg"
    hang.write_text(f"#!/bin/sh\n{script}\n")
    hang.chmod(0o755)
    recording = tmp_path / "x.ogg"
    recording.write_bytes(b"OggS")

    with pytest.raises(TransientError, match="did not finish within 0.3 s"):
        trimming.detect_speech(recording, detector="silencedetect", ffmpeg=str(hang), timeout=0.3)


def test_the_cut_takes_its_codec_options_from_the_output_format(tmp_path):
    argv = trimming.trim_args(tmp_path / "in.ogg", tmp_path / "-out.ogg", "[0:a:0]anull[trimmed]")

    for key, value in (("-acodec", "libopus"), ("-b:a", trimming.TRIM_BITRATE), ("-ar", "16000"),
                       ("-compression_level", "5")):
        assert argv[argv.index(key) + 1] == value
    assert f"file:{tmp_path}/-out.ogg" in argv and "[trimmed]" in argv


def test_at_bitrate_changes_only_the_bitrate():
    opus = FORMATS["opus"]

    changed = trimming.at_bitrate(opus, "32k")

    assert dict(changed.codec_options) == {**dict(opus.codec_options), "audio_bitrate": "32k"}
    assert (changed.name, changed.extension, changed.mime_type, changed.muxer) == (
        opus.name, opus.extension, opus.mime_type, opus.muxer)
    assert trimming.TRIM_FORMAT == trimming.at_bitrate(opus, trimming.TRIM_BITRATE)


# ---- real recordings ------------------------------------------------------------------------------------------------

SENTENCES = ["Good morning, shall we start with the budget for next year?",
             "The travel costs went up again, mostly because of hotels.",
             "Then we ask the finance team for a new estimate by Friday.",
             "Thank you all, that is everything for today."]


@dataclass
class Recording:
    master: Path  # the "recorder's" file, 48 kHz WAV
    copy: Path  # the compact copy, Opus 16k in Ogg
    duration: float
    speech: list[Span]  # where each sentence was put (first to last audible sample)


def speak(text: str, folder: Path) -> array.array:
    wav = folder / "tts.wav"
    subprocess.run([ESPEAK, "-v", "en-us", "-w", str(wav), text], check=True, capture_output=True, timeout=30)
    raw = subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(wav), "-ac", "1", "-ar", str(RATE),
                          "-f", "s16le", "-"], check=True, capture_output=True, timeout=30).stdout
    samples = array.array("h", raw)
    loud = max(map(abs, samples)) // 100
    first = next(i for i, x in enumerate(samples) if abs(x) > loud)
    last = len(samples) - next(i for i, x in enumerate(reversed(samples)) if abs(x) > loud)
    return samples[first:last]


def make_recording(folder: Path, gaps: list[float], *, lead: float = 0.0, tail: float = 0.0,
                   noise_db: float | None = -50.0) -> Recording:
    """The sentences in turn with `gaps` seconds of silence between them, over a quiet pink-noise bed."""
    folder.mkdir(parents=True, exist_ok=True)
    track, speech = array.array("h", bytes(2 * round(lead * RATE))), []
    for index, text in enumerate(SENTENCES[:len(gaps) + 1]):
        start = len(track) / RATE
        track.extend(speak(text, folder))
        speech.append(Span(start, len(track) / RATE))
        track.frombytes(bytes(2 * round((gaps[index] if index < len(gaps) else tail) * RATE)))
    return save(folder, track, speech, noise_db)


def save(folder: Path, track: array.array, speech: list[Span], noise_db: float | None) -> Recording:
    dry, master = folder / "dry.wav", folder / "master.wav"
    with wave.open(str(dry), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(RATE)
        out.writeframes(track.tobytes())
    noise = [] if noise_db is None else [
        "-f", "lavfi", "-i", f"anoisesrc=color=pink:seed=3:r={RATE}:amplitude={10 ** (noise_db / 20) / 0.1966:.6f}",
        "-filter_complex", "amix=inputs=2:duration=first:normalize=0"]
    subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-y", "-i", str(dry), *noise, "-ar", "48000",
                    str(master)], check=True, timeout=30)
    result = convert(master, folder / "copy.ogg", FORMATS["opus"])
    return Recording(master, result.path, result.duration_seconds, speech)


@pytest.fixture(scope="module")
def meeting(tmp_path_factory) -> Recording:
    """Speech from the first sample to the last, with gaps of 8 s, 1 s (kept) and 12 s."""
    return make_recording(tmp_path_factory.mktemp("meeting"), [8.0, 1.0, 12.0])


def probed_seconds(path: Path) -> float:
    return float(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                                 str(path)], capture_output=True, text=True, check=True).stdout)


def inside(span: Span, segments: tuple[Segment, ...], slack: float = 0.01) -> bool:
    return any(s.start - slack <= span.start and span.end <= s.end + slack for s in segments)


@needs_speech
@pytest.mark.parametrize("detector", DETECTORS)
def test_speech_is_never_cut_and_the_trimmed_copy_lasts_as_planned(meeting, tmp_path, detector):
    speech = trimming.detect_speech(meeting.copy, detector=detector, threshold_db=-30)
    trim_map = plan(speech, meeting.duration)

    result = trimming.trim(meeting.copy, tmp_path / "trimmed.ogg", trim_map)

    assert all(inside(span, trim_map.segments) for span in meeting.speech), (meeting.speech, trim_map)
    assert len(trim_map.segments) == 3 and trim_map.saved_seconds > 15  # the 8 s and 12 s gaps, not the 1 s one
    assert result.duration_seconds == pytest.approx(trim_map.trimmed_duration, abs=0.1)
    assert probed_seconds(result.path) == pytest.approx(trim_map.trimmed_duration, abs=0.1)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "trimmed.ogg"]  # no temporary file left


@needs_speech
@pytest.mark.parametrize("source", ["copy", "master"])
def test_the_default_trimmed_copy_lasts_as_planned_at_the_measured_bitrate(meeting, tmp_path, source):
    """The runner cuts the compact copy; the original recording (the same timeline) gives the same length."""
    trim_map = plan(trimming.detect_speech(meeting.copy, detector="silencedetect", threshold_db=-30),
                    meeting.duration)

    result = trimming.trim(getattr(meeting, source), tmp_path / "trimmed.ogg", trim_map)

    assert (result.format, result.mime_type) == ("opus", "audio/ogg")
    assert result.duration_seconds == pytest.approx(trim_map.trimmed_duration, abs=0.1)
    assert probed_seconds(result.path) == pytest.approx(trim_map.trimmed_duration, abs=0.1)
    kbps = result.size_bytes * 8 / 1000 / trim_map.trimmed_duration  # Opus is VBR: near the nominal rate
    assert kbps == pytest.approx(float(trimming.TRIM_BITRATE.removesuffix("k")), rel=0.4)


@needs_speech
@pytest.mark.skipif(not HAS_WEBRTC, reason="needs webrtcvad-wheels")
def test_an_open_descriptor_is_read_and_named_by_its_label(meeting, tmp_path):
    broken = tmp_path / "b.ogg"
    broken.write_bytes(b"OggS" + bytes(range(256)) * 40)
    with open(meeting.copy, "rb") as good, open(broken, "rb") as bad:
        trim_map = plan(trimming.detect_speech(opened(good.fileno()), label="meeting.ogg"), meeting.duration)
        result = trimming.trim(opened(good.fileno()), tmp_path / "trimmed.ogg", trim_map, label="meeting.ogg")
        with pytest.raises(RejectedInput, match="^recorder take 3.ogg: no audio"):
            trimming.detect_speech(opened(bad.fileno()), detector="silencedetect", label="recorder take 3.ogg")

    assert len(trim_map.segments) == 3
    assert result.duration_seconds == pytest.approx(trim_map.trimmed_duration, abs=0.1)


@needs_speech
@pytest.mark.skipif(not HAS_WEBRTC, reason="needs webrtcvad-wheels")
def test_speech_found_in_the_trimmed_copy_maps_back_to_where_it_was_said(meeting, tmp_path):
    trim_map = plan(trimming.detect_speech(meeting.copy), meeting.duration)
    trimming.trim(meeting.copy, tmp_path / "trimmed.ogg", trim_map)

    found = [trim_map.to_original(span.start) for span in trimming.detect_speech(tmp_path / "trimmed.ogg")]

    for span in meeting.speech:
        assert min(abs(start - span.start) for start in found) < 0.5


@needs_speech
def test_a_recording_without_long_silence_gets_the_identity_map(tmp_path):
    recording = make_recording(tmp_path, [0.6, 1.2])

    trim_map = plan(trimming.detect_speech(recording.copy, detector="silencedetect", threshold_db=-30),
                    recording.duration)

    assert trim_map.is_identity


@needs_ffmpeg
@pytest.mark.parametrize("detector", DETECTORS)
def test_a_silent_recording_is_cut_to_one_pause(tmp_path, detector):
    recording = save(tmp_path, array.array("h", bytes(2 * 20 * RATE)), [], noise_db=-60)

    trim_map = plan(trimming.detect_speech(recording.copy, detector=detector), recording.duration)
    result = trimming.trim(recording.copy, tmp_path / "trimmed.ogg", trim_map)

    assert trim_map.segments == (Segment(0.0, trimming.KEEP_PAUSE_SECONDS, 0.0),)
    assert result.duration_seconds == pytest.approx(trimming.KEEP_PAUSE_SECONDS, abs=0.1)


@needs_speech
def test_a_one_second_file_is_sent_whole(tmp_path):
    track = speak("Yes.", tmp_path)
    recording = save(tmp_path, track + array.array("h", bytes(2 * (RATE - len(track)))), [], noise_db=None)

    speech = trimming.detect_speech(recording.copy, detector="silencedetect")

    assert speech and plan(speech, recording.duration).is_identity


@needs_ffmpeg
@pytest.mark.parametrize("detector", DETECTORS)
def test_a_corrupt_file_is_refused_with_its_name(tmp_path, detector):
    broken = tmp_path / "broken recording.ogg"
    broken.write_bytes(b"OggS" + bytes(range(256)) * 40)

    with pytest.raises(RejectedInput, match="broken recording.ogg"):
        trimming.detect_speech(broken, detector=detector)
    with pytest.raises(TranscodeError, match="broken recording.ogg"):
        trimming.trim(broken, tmp_path / "out.ogg", synthetic())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken recording.ogg"]


@needs_ffmpeg
def test_a_map_with_many_cuts_goes_through_a_graph_file(tmp_path, monkeypatch):
    monkeypatch.setattr(trimming, "INLINE_GRAPH_LIMIT", 2000)  # the real limit (60k characters) needs ~750 cuts
    recording = save(tmp_path, array.array("h", bytes(2 * 20 * RATE)), [], noise_db=-40)
    segments = tuple(Segment(i * 0.2, i * 0.2 + 0.1, i * 0.1) for i in range(100))
    trim_map = TrimMap(recording.duration, segments, 0.0)
    assert len(trimming.trim_graph(trim_map)) > trimming.INLINE_GRAPH_LIMIT

    result = trimming.trim(recording.copy, tmp_path / "trimmed.ogg", trim_map)

    assert result.duration_seconds == pytest.approx(10.0, abs=0.1)
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]  # neither the graph nor a temp copy


@needs_speech
@pytest.mark.parametrize("detector", DETECTORS)
def test_a_copy_that_ends_early_is_not_taken_for_a_long_silence(meeting, tmp_path, detector):
    truncated = tmp_path / "truncated.ogg"
    truncated.write_bytes(meeting.copy.read_bytes()[: meeting.copy.stat().st_size // 2])

    with pytest.raises(TranscodeError, match="truncated.ogg: only"):
        trimming.detect_speech(truncated, detector=detector, duration_seconds=meeting.duration)


def test_the_same_audio_gives_the_same_bytes_so_a_repeated_prompts_audio_can_be_cached(tmp_path):
    """The API's implicit cache matches a repeated prefix: a trimmed copy (or a cut piece) made again for the
    next prompt on the same recording must be byte for byte the same, which Ogg's random stream serial breaks
    unless ffmpeg writes bitexact."""
    source = tmp_path / "tone.wav"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "sine=f=300:d=8", str(source)], check=True)
    copies = [convert(source, tmp_path / f"copy{i}.ogg", FORMATS["opus"]).path for i in range(2)]
    assert copies[0].read_bytes() == copies[1].read_bytes()
    trim_map = plan([Span(0.2, 1.5), Span(6.0, 7.5)], 8.0)
    cuts = [trimming.trim(copies[0], tmp_path / f"cut{i}.ogg", trim_map).path for i in range(2)]
    assert cuts[0].read_bytes() == cuts[1].read_bytes()


# ---- through the daemon ---------------------------------------------------------------------------------------------

@needs_speech
def test_the_daemon_sends_only_the_speech_and_the_transcripts_times_are_the_recordings_own(tmp_path):
    """`audiodrop run` with trimming on: a recording that is mostly silence is uploaded whole, but its
    transcript's audio is the trimmed copy; the emulator, which hears where the speech is, stamps the trimmed
    timeline, and the result's stamps land where each sentence is in the original (within 0.5 s)."""
    from tests.emulator import Emulator
    from tests.harness import API_KEY, DaemonProcess

    recording = make_recording(tmp_path / "made", [20.0, 1.0, 25.0], lead=15.0, tail=15.0)
    with Emulator(api_key=API_KEY, data_dir=tmp_path / "emulator", transcript="speech") as emulator:
        daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, trimming={"enabled": True})
        daemon.start()
        try:
            (daemon.inbox / "meeting.wav").write_bytes(recording.master.read_bytes())
            [item] = daemon.wait_for_states({"active": 1}, timeout=60)
            dry = daemon.cli("ask", str(item["id"]), "--template", "transcribe", "--dry-run", "--json")
            asked = daemon.cli("ask", str(item["id"]), "--template", "transcribe", "--wait", "--timeout", "90",
                               "--json")
            [stored] = emulator.files
        finally:
            daemon.stop()
        [request] = emulator.generate_requests
        assert emulator.internal_errors == []
    total = recording.duration
    assert asked["state"] == "done" and asked["trimmed_seconds"] > 40
    assert dry["trimmed_audio_tokens"] < 0.62 * dry["estimated_audio_tokens"]
    assert request.audio_seconds == pytest.approx(total - asked["trimmed_seconds"], abs=0.2)
    assert stored.size_bytes == item["converted"]["bytes"]  # the uploaded compact copy stays whole
    text = Path(asked["result_path"]).read_text()
    found = [line.seconds for line in parse_transcript(text.split("---", 1)[1]) if line.seconds is not None]
    starts = [span.start for span in recording.speech]
    # Sentences 2 and 3 are 1 s apart: the emulator may hear them as one stretch.
    assert len(found) in (len(starts), len(starts) - 1)
    for seconds in found:
        assert min(abs(seconds - start) for start in starts) <= 0.5 + 0.5, (found, starts)  # whole-second stamps
    assert "- Trimmed:" in text


@needs_speech
def test_chunked_and_spanned_transcripts_of_a_trimmed_recording_keep_the_recordings_times(tmp_path):
    """The same with 15-s chunks: the trimmed timeline (about 18 s of the 88) goes in two chunks, each cut
    through its window of the trim map, and a --from/--to span is trimmed within itself; every stamp of both
    results lands on a sentence of the original."""
    from tests.emulator import Emulator
    from tests.harness import API_KEY, DaemonProcess

    recording = make_recording(tmp_path / "made", [20.0, 1.0, 25.0], lead=15.0, tail=15.0)
    starts = [span.start for span in recording.speech]
    with Emulator(api_key=API_KEY, data_dir=tmp_path / "emulator", transcript="speech") as emulator:
        daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, trimming={"enabled": True},
                               prompts={"chunk_seconds": 15.0, "chunk_overlap_seconds": 2.0})
        daemon.start()
        try:
            (daemon.inbox / "meeting.wav").write_bytes(recording.master.read_bytes())
            [item] = daemon.wait_for_states({"active": 1}, timeout=60)
            chunked = daemon.cli("ask", str(item["id"]), "--template", "transcribe", "--wait", "--timeout", "90",
                                 "--json")
            span_from = starts[1] - 5
            span_args = ("--from", f"{span_from:.0f}s", "--to", f"{starts[3] + 6:.0f}s")
            dry = daemon.cli("ask", str(item["id"]), "--template", "transcribe", *span_args, "--dry-run", "--json")
            spanned = daemon.cli("ask", str(item["id"]), "--template", "transcribe", "--from", f"{span_from:.0f}s",
                                 "--to", f"{starts[3] + 6:.0f}s", "--wait", "--timeout", "90", "--json")
        finally:
            daemon.stop()
    assert chunked["state"] == "done" and chunked["delivery"] == "chunks" and chunked["chunks"] == 2
    assert spanned["state"] == "done" and spanned["delivery"] == "span"
    # The span is trimmed within itself: its 20 s and 25 s silences (less what stays) are not counted.
    assert dry["estimated_audio_tokens"] - dry["trimmed_audio_tokens"] > 32 * 25
    # The emulator stamps each stretch of speech it hears (a sentence may be two), rounded down to the second, in
    # a piece that starts at a cut: the pause and the pad (0.8 s) before the speech plus that second are allowed.
    for result, sentences in ((chunked, recording.speech), (spanned, recording.speech[1:])):
        text = Path(result["result_path"]).read_text().split("---", 1)[1]
        found = [line.seconds for line in parse_transcript(text) if line.seconds is not None]
        assert found, text
        for seconds in found:
            assert any(s.start - 1.8 <= seconds <= s.end for s in sentences), (found, sentences)
        heard = {i for i, s in enumerate(sentences) for seconds in found if s.start - 1.8 <= seconds <= s.end}
        assert heard >= {0, len(sentences) - 1}, (found, sentences)  # from the first sentence to the last
