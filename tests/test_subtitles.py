"""Subtitles (daemon/subtitles.py): cue timing, line breaks, escaping; every file read back by srt and webvtt-py."""

from __future__ import annotations

import doctest
import html
import random
import re
from datetime import timedelta
from itertools import pairwise

import pytest
import srt
import webvtt

from daemon.prompts import subtitles
from daemon.prompts.chunking import Line, parse_transcript
from daemon.prompts.subtitles import Cue, cues, to_srt, to_vtt

HOUR = 3600.0
MILLISECOND = timedelta(milliseconds=1)


def lines_of(text: str) -> list[Line]:
    return parse_transcript(text)


def checked_srt(lines: list[Line], duration: float) -> list[srt.Subtitle]:
    """The SRT file, read back by the srt package and checked against every rule; its subtitles."""
    text = to_srt(lines, duration)
    subs = list(srt.parse(text))
    assert srt.compose(subs, reindex=False, strict=True) == text  # nothing was lost or read two ways
    assert [sub.index for sub in subs] == list(range(1, len(subs) + 1))
    assert text.count("-->") == len(subs)
    spans = [(sub.start.total_seconds(), sub.end.total_seconds()) for sub in subs]
    assert_timeline(spans, duration)
    for sub in subs:
        rows = sub.content.split("\n")
        assert 1 <= len(rows) <= 2 and all(0 < len(row) <= 42 and row == row.strip() for row in rows), rows
        assert "<" not in sub.content and ">" not in sub.content
    return subs


def checked_vtt(lines: list[Line], duration: float) -> list[webvtt.Caption]:
    """The WebVTT file, read back strictly by webvtt-py and checked against every rule; its captions."""
    text = to_vtt(lines, duration)
    assert text.startswith("WEBVTT\n")
    document = webvtt.from_string(text, strict=True)
    assert document.content == text
    captions = list(document.captions)
    assert text.count("-->") == len(captions)
    spans = [(c.start_time.in_milliseconds() / 1000, c.end_time.in_milliseconds() / 1000) for c in captions]
    assert_timeline(spans, duration)
    for caption in captions:
        rows = [html.unescape(row) for row in caption.text.split("\n")]
        assert 1 <= len(rows) <= 2 and all(0 < len(row) <= 42 for row in rows), rows
        assert all(re.search(r"&(?!amp;|lt;|gt;)", raw) is None for raw in caption.lines)
    return captions


def assert_timeline(spans: list[tuple[float, float]], duration: float) -> None:
    for start, end in spans:
        assert 0 <= start < end <= duration + 1e-9, (start, end, duration)
    for (_, end), (start, _) in pairwise(spans):
        assert end <= start  # monotonic, and no cue overlaps the next


def checked(lines: list[Line], duration: float) -> list[Cue]:
    """Both files checked, and both agree with cues() on count, times and speakers."""
    found = cues(lines, duration)
    subs, captions = checked_srt(lines, duration), checked_vtt(lines, duration)
    assert len(found) == len(subs) == len(captions)
    for cue, sub, caption in zip(found, subs, captions, strict=True):
        assert round(cue.start * 1000) == sub.start // MILLISECOND == caption.start_time.in_milliseconds()
        assert round(cue.end * 1000) == sub.end // MILLISECOND == caption.end_time.in_milliseconds()
        if cue.speaker:
            assert caption.voice == html.escape(cue.speaker, quote=False)
            assert sub.content.startswith(subtitles._srt_escape(subtitles._short_label(cue.speaker)) + ": ")
        else:
            assert caption.voice is None
    return found


def words_of(found: list[Cue]) -> list[str]:
    return " ".join(cue.text for cue in found).split()


def letters_of(texts: list[str]) -> str:
    """The text without white space: a word too long for a line is cut, so words are no unit to compare."""
    return "".join("".join(texts).split())


# --- timing ------------------------------------------------------------------------------------------------


def test_a_cue_ends_at_the_next_line_when_it_is_near_and_after_its_reading_time_when_far() -> None:
    found = checked(lines_of("[00:00:01] Speaker 1: We should start now, everyone is here.\n"
                             "[00:00:03] Speaker 2: Agreed.\n[00:01:00] Speaker 1: Done."), 120)
    assert [(cue.start, cue.end) for cue in found] == [(1.0, 3.0), (3.0, 4.0), (60.0, 61.0)]


def test_reading_time_is_at_most_seven_seconds_a_cue_and_at_least_one() -> None:
    text = " ".join(["word"] * 13)  # 64 characters (two lines): 4.3 s at 15 a second
    found = checked(lines_of(f"[00:00:00] Speaker 1: Hi\n[00:00:10] Speaker 1: {text}"), 600)
    assert found[0].end - found[0].start == 1.0
    assert found[1].end - found[1].start == pytest.approx(64 / 15, abs=0.001)
    long = checked(lines_of("[00:00:00] Speaker 1: " + " ".join(["abcdefghij"] * 40)), 600)
    assert len(long) > 1
    assert all(cue.end - cue.start <= 7.0 for cue in long)


def test_no_cue_runs_past_the_end_of_the_recording() -> None:
    found = checked(lines_of("[00:00:58] Speaker 1: A sentence long enough to need several seconds to read."), 59.5)
    assert found[-1].end == 59.5


def test_lines_with_the_same_start_are_nudged_one_after_the_other_each_keeping_its_own_cue() -> None:
    found = checked(lines_of("[00:00:10] Speaker 1: Yes.\n[00:00:10] Speaker 2: No.\n[00:00:11] Speaker 1: Why?"), 60)
    assert [(cue.speaker, cue.text, cue.start, cue.end) for cue in found] == [
        ("Speaker 1", "Yes.", 10.0, 10.5), ("Speaker 2", "No.", 10.5, 11.0), ("Speaker 1", "Why?", 11.0, 12.0)]


def test_lines_without_a_timestamp_continue_the_cue_before_and_a_preamble_is_dropped() -> None:
    found = checked(lines_of("Here is the transcript:\n[00:00:01] Speaker 1: First part\nsecond part\n\n"
                             "[00:00:04] Speaker 2: Other"), 60)
    assert [(cue.speaker, cue.text) for cue in found] == [("Speaker 1", "First part second part"),
                                                          ("Speaker 2", "Other")]


def test_times_that_run_backwards_are_moved_up_to_the_line_before_as_stitch_does() -> None:
    found = checked(lines_of("[00:00:10] Speaker 1: Ten.\n[00:00:05] Speaker 2: Five?\n[00:00:20] Speaker 1: Twenty."),
                    60)
    assert [(cue.text, cue.start) for cue in found] == [("Ten.", 10.0), ("Five?", 11.0), ("Twenty.", 20.0)]


def test_stamps_past_the_end_are_shown_just_before_the_end_not_dropped() -> None:
    found = checked(lines_of("[00:00:05] Speaker 1: Early.\n[00:05:00] Speaker 2: Late one.\n"
                             "[00:06:00] Speaker 1: Later still."), 30)
    assert [cue.text for cue in found] == ["Early.", "Late one.", "Later still."]
    assert found[1].start == 28.0 and found[-1].end == 30.0


def test_a_stamped_line_without_words_ends_the_cue_before_it() -> None:
    found = checked(lines_of("[00:00:00] Speaker 1: " + "talk " * 20 + "\n[00:00:02] [no speech]"), 60)
    assert found[-1].end == 2.0


def test_a_long_line_becomes_consecutive_cues_sharing_its_time_in_proportion_to_length() -> None:
    text = " ".join(f"word{index}" for index in range(60))
    found = checked(lines_of(f"[00:00:00] Speaker 1: {text}\n[00:00:20] Speaker 2: Next."), 60)
    speaker_one = [cue for cue in found if cue.speaker == "Speaker 1"]
    assert len(speaker_one) >= 3 and speaker_one[0].start == 0 and speaker_one[-1].end == 20.0
    assert words_of(speaker_one) == text.split()
    rates = [len(cue.text) / (cue.end - cue.start) for cue in speaker_one]
    assert max(rates) / min(rates) < 1.3  # each cue's share of the 20 s follows its length


# --- line breaking and escaping ----------------------------------------------------------------------------


def test_lines_break_at_word_boundaries_into_balanced_lines() -> None:
    found = checked(lines_of("[00:00:00] Speaker 1: The quick brown fox jumps over the lazy dog again"), 60)
    assert found[0].text == "The quick brown fox\njumps over the lazy dog again"  # the first line holds "Speaker 1: "


def test_a_word_longer_than_a_line_is_cut_and_cjk_text_without_spaces_is_broken_by_width() -> None:
    url = "https://example.org/" + "a" * 120
    found = checked(lines_of(f"[00:00:00] Speaker 1: see {url}"), 60)
    assert "".join(" ".join(cue.text.split("\n")) for cue in found).replace(" ", "") == f"see{url}"
    chinese = "我们今天讨论的是一个非常重要的问题关于人工智能在医疗领域的应用以及它可能带来的伦理挑战" * 2
    cjk = checked(lines_of(f"[00:00:00] 主持人: {chinese}"), 60)
    assert "".join(cue.text.replace("\n", "") for cue in cjk) == chinese
    assert all(subtitles._columns(row) <= 42 - 5 for cue in cjk for row in cue.text.split("\n")[:1])


def test_srt_escapes_markup_and_arrows_and_vtt_uses_character_references() -> None:
    lines = lines_of("[00:00:01] Speaker 1: if a < b && c > d --> go {\\an8} <i>x</i>")
    srt_text, vtt_text = to_srt(lines, 60), to_vtt(lines, 60)
    (sub,) = checked_srt(lines, 60)
    assert "-->" not in sub.content and "{\\" not in sub.content and "\u2039i\u203ax\u2039/i\u203a" in sub.content
    (caption,) = checked_vtt(lines, 60)
    assert html.unescape(caption.raw_text.removeprefix("<v Speaker 1>")).replace("\n", " ") == (
        "if a < b && c > d --> go {\\an8} <i>x</i>")
    assert srt_text.count("-->") == vtt_text.count("-->") == 1


def test_speakers_are_an_srt_prefix_and_a_vtt_voice_and_unlabelled_lines_have_neither() -> None:
    lines = lines_of("[00:00:01] Ana & Co: Hello.\n[00:00:03] Just narration here.\n"
                     "[00:00:05] Maximilian Alexander Von Humboldt: A very long name indeed.")
    found = checked(lines, 60)
    assert [cue.speaker for cue in found] == ["Ana & Co", None, "Maximilian Alexander Von Humboldt"]
    assert "<v Ana &amp; Co>Hello." in to_vtt(lines, 60)
    assert "\nMaximilian Alexande…: A" in to_srt(lines, 60)  # 20 columns at most: the prefix shares a line


# --- hostile inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "[no speech]", "[No speech]\n", "\n\n", "Speaker 1: no timestamps\nat all"])
def test_no_timed_speech_gives_valid_empty_files(text: str) -> None:
    assert checked(lines_of(text), 60) == []
    assert to_srt(lines_of(text), 60) == "" and to_vtt(lines_of(text), 60) == "WEBVTT\n"


def test_a_zero_length_recording_gives_empty_files_and_a_negative_one_is_refused() -> None:
    assert checked(lines_of("[00:00:00] Speaker 1: Hi"), 0) == []
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="duration_seconds"):
            cues([], bad)


def test_a_nine_and_a_half_hour_recording_keeps_its_hours() -> None:
    duration = 9.5 * HOUR
    lines = lines_of("[00:00:00] Speaker 1: Start.\n[09:29:58] Speaker 2: Nearly the end of it all now.\n"
                     "[09:31:00] Speaker 1: Past it.")
    found = checked(lines, duration)
    assert found[1].start == 9 * HOUR + 29 * 60 + 58 and found[-1].end == duration
    assert "\n09:29:58,000 --> " in to_srt(lines, duration) and "\n09:29:58.000 --> " in to_vtt(lines, duration)


def test_hostile_unicode_control_characters_emoji_and_combining_marks_stay_within_the_limits() -> None:
    zalgo = "Z" + "\u0301" * 60 + "algo"
    text = f"naïve café 👩‍👩‍👧‍👦 family {zalgo} \u202eRTL\u202c tab\there\x00nul\x1bESC مرحبا بالعالم"
    found = checked([Line(1.0, "Speaker 1", text, text), Line(None, None, "\r\x0b", "")], 60)
    assert "👩‍👩‍👧‍👦" in " ".join(cue.text for cue in found)
    assert not any(ch in cue.text for cue in found for ch in "\x00\x1b\t\u202e\u202c")


def test_very_long_text_is_split_into_many_cues_that_keep_every_word() -> None:
    rng = random.Random(7)
    text = " ".join(rng.choice(["a", "tiny", "medium", "considerably", "longer-words"]) for _ in range(5000))
    found = checked(lines_of(f"[00:00:00] Speaker 1: {text}\n[00:30:00] Speaker 2: Done."), 3600)
    assert words_of(found) == [*text.split(), "Done."]


def test_thousands_of_lines_on_one_second_still_give_valid_files() -> None:
    lines = [Line(5.0, f"Speaker {index % 3 + 1}", f"line {index}", "") for index in range(1500)]
    found = checked([*lines, Line(6.0, "Speaker 1", "after", "")], 10)
    assert len(found) == 1501 and found[-1].text == "after"


def test_every_line_stamped_at_the_very_end_is_pulled_back_to_be_read() -> None:
    lines = [Line(100.0, "Speaker 1", f"Sentence number {index} of the tail.", "") for index in range(3)]
    found = checked(lines, 100)
    assert len(found) == 3 and found[0].start == pytest.approx(100 - 3 * 30 / 15, abs=0.01)


def test_odd_seconds_from_callers_are_repaired_rather_than_written() -> None:
    lines = [Line(-5.0, "Speaker 1", "negative", ""), Line(float("nan"), "Speaker 2", "nan", ""),
             Line(float("inf"), "Speaker 1", "infinite", ""), Line(3.0004, "Speaker 2", "tiny", "")]
    found = checked(lines, 20)  # -5 s is 0, nan takes the time before it, inf is the end, 3 s runs backwards
    assert [(cue.text, cue.start) for cue in found] == [("negative", 0.0), ("nan", 1.0), ("infinite", 18.0),
                                                        ("tiny", 19.0)]


@pytest.mark.parametrize("seed", range(60))
def test_random_transcripts_always_give_files_the_validators_accept(seed: int) -> None:
    rng = random.Random(seed)
    duration = rng.choice([0.5, 3.0, 59.9, 600.0, 9.5 * HOUR])
    vocabulary = ["yes", "no", "a", "我们", "👍", "<b>", "&amp;", "-->", "supercalifragilistic" * 3, "e\u0301", "ok."]
    lines = []
    for _ in range(rng.randint(0, 40)):
        seconds = rng.choice([None, rng.uniform(0, duration * 1.3), float(rng.randint(0, 5))])
        speaker = rng.choice([None, "Speaker 1", "Speaker 2", "Ana"])
        text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 30)))
        lines.append(Line(seconds, speaker, text, text))
    found = checked(lines, duration)
    if duration >= 600 and found:
        entries = subtitles._entries(lines, round(duration * 1000))
        assert letters_of([cue.text for cue in found]) == letters_of([text for _, _, text in entries])  # none lost


def test_the_doctests_hold() -> None:
    assert doctest.testmod(subtitles).failed == 0
