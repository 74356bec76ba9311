"""Chunk plans, clock times, transcript parsing and stitching (daemon/chunking.py): pure functions, no I/O."""

from __future__ import annotations

import doctest
import math
from itertools import pairwise

import pytest

from daemon.prompts import chunking
from daemon.prompts.chunking import (
    MAX_PROMPT_SECONDS,
    Chunk,
    Line,
    coverage,
    format_clock,
    offset_timestamps,
    parse_clock,
    parse_transcript,
    plan_chunks,
    stitch,
)

HOUR = 3600.0


def assert_plan_is_sound(plan: list[Chunk], duration: float, chunk_seconds: float, overlap: float,
                         max_prompt: float = MAX_PROMPT_SECONDS) -> None:
    assert [chunk.index for chunk in plan] == list(range(len(plan)))
    assert plan[0].start == 0 and plan[-1].end == duration
    for chunk in plan:
        assert chunk.seconds <= max_prompt
        assert chunk.seconds <= chunk_seconds * 1.1 + 2
        assert chunk.start == int(chunk.start)
    for before, after in pairwise(plan):
        assert before.end - after.start >= overlap  # each join is overlapped, so no word falls between chunks
        assert before.end - after.start <= overlap + 2
    if len(plan) > 1:
        assert min(chunk.seconds for chunk in plan) >= chunk_seconds / 4  # never a sliver


# --- planning ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("duration", [1.0, 60.0, 1200.0, 1320.0])
def test_a_recording_no_longer_than_a_chunk_and_its_slack_is_one_chunk(duration: float) -> None:
    assert plan_chunks(duration) == [Chunk(0, 0.0, duration)]


def test_a_recording_just_past_the_slack_is_split_into_two_equal_halves_not_a_chunk_and_a_sliver() -> None:
    plan = plan_chunks(1400.0)
    assert [(chunk.start, chunk.end) for chunk in plan] == [(0.0, 705.0), (695.0, 1400.0)]


def test_a_three_hour_recording_is_planned_into_about_twenty_minute_chunks_that_overlap() -> None:
    plan = plan_chunks(3 * HOUR, chunk_seconds=1200, overlap_seconds=10)
    assert len(plan) == 9
    assert all(1190 <= chunk.seconds <= 1215 for chunk in plan)
    assert_plan_is_sound(plan, 3 * HOUR, 1200, 10)


@pytest.mark.parametrize("duration", [1321.0, 1500.0, 2500.5, 3599.0, 3601.0, 5 * HOUR + 7, 9.5 * HOUR, 26 * HOUR])
@pytest.mark.parametrize(("chunk_seconds", "overlap"), [(1200.0, 10.0), (900.0, 0.0), (1800.0, 30.0)])
def test_every_plan_covers_the_recording_with_overlapping_chunks_and_no_slivers(
    duration: float, chunk_seconds: float, overlap: float
) -> None:
    plan = plan_chunks(duration, chunk_seconds=chunk_seconds, overlap_seconds=overlap)
    assert_plan_is_sound(plan, duration, chunk_seconds, overlap)


# 28.5 h - 20.5 s makes three chunks of a fractional 9.5 h less 0.17 s, which whole-second rounding would push over.
@pytest.mark.parametrize("duration", [9.5 * HOUR + 1, 10 * HOUR, 19 * HOUR, 28.5 * HOUR - 20.5, 40 * HOUR])
def test_recordings_longer_than_nine_and_a_half_hours_are_always_split_whatever_the_chunk_length(
    duration: float,
) -> None:
    plan = plan_chunks(duration, chunk_seconds=12 * HOUR, overlap_seconds=10)
    assert len(plan) >= 2
    assert all(chunk.seconds <= MAX_PROMPT_SECONDS for chunk in plan)
    assert plan[-1].end == duration


def test_exactly_nine_and_a_half_hours_fits_in_one_prompt_when_chunks_are_that_long() -> None:
    assert plan_chunks(9.5 * HOUR, chunk_seconds=12 * HOUR) == [Chunk(0, 0.0, 9.5 * HOUR)]


def test_a_lower_prompt_limit_is_respected() -> None:
    plan = plan_chunks(3 * HOUR, chunk_seconds=HOUR, overlap_seconds=10, max_prompt_seconds=1800)
    assert all(chunk.seconds <= 1800 for chunk in plan)
    assert_plan_is_sound(plan, 3 * HOUR, HOUR, 10, max_prompt=1800)


@pytest.mark.parametrize(
    "arguments",
    [
        {"duration_seconds": 0},
        {"duration_seconds": -5},
        {"duration_seconds": math.nan},
        {"duration_seconds": math.inf},
        {"duration_seconds": 100, "chunk_seconds": 0},
        {"duration_seconds": 100, "overlap_seconds": -1},
        {"duration_seconds": 100, "chunk_seconds": 20, "overlap_seconds": 10},
        {"duration_seconds": 100, "max_prompt_seconds": 20, "overlap_seconds": 9},
    ],
)
def test_a_plan_with_impossible_arguments_is_refused(arguments: dict) -> None:
    with pytest.raises(ValueError):
        plan_chunks(**arguments)


# --- clock times -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90), ("90s", 90), ("1.5", 1.5), ("02:30", 150), ("2:30", 150), ("75:00", 4500),
        ("1:02:03", 3723), ("01:02:03", 3723), ("02:30.5", 150.5), ("1h2m3s", 3723), ("1h", 3600),
        ("2m30s", 150), ("45m", 2700), (" 1h 2m ", 3720), ("0", 0),
    ],
)
def test_parse_clock_reads_the_forms_the_cli_accepts(text: str, seconds: float) -> None:
    assert parse_clock(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", "1:60", "2:3", "1:02:60", "1:60:00", "1h30", "1h2h", "h", "nan",
                                  "1:2:3:4", "90x"])
def test_parse_clock_refuses_anything_else_and_says_which_forms_work(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a time: write seconds .* MM:SS .* HH:MM:SS .* 1h2m3s"):
        parse_clock(text)


@pytest.mark.parametrize(("seconds", "text"), [(0, "00:00:00"), (83.7, "00:01:23"), (3723, "01:02:03"),
                                                (1199.9999999, "00:20:00"), (100 * HOUR, "100:00:00")])
def test_format_clock_writes_hours_minutes_and_seconds_rounded_down(seconds: float, text: str) -> None:
    assert format_clock(seconds) == text


@pytest.mark.parametrize("seconds", [0, 1, 59, 60, 3599, 3600, 3723, 35999, 36000, 9.5 * HOUR, 123456])
def test_format_clock_and_parse_clock_round_trip(seconds: float) -> None:
    assert parse_clock(format_clock(seconds)) == seconds


@pytest.mark.parametrize("seconds", [-1, math.nan, math.inf])
def test_format_clock_refuses_negative_and_infinite_times(seconds: float) -> None:
    with pytest.raises(ValueError):
        format_clock(seconds)


# --- parsing model output ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds", "speaker", "text"),
    [
        ("[00:01:23] Speaker 1: hello there", 83, "Speaker 1", "hello there"),
        ("[01:23] Speaker 2: hi", 83, "Speaker 2", "hi"),
        ("(01:23) plain words", 83, None, "plain words"),
        ("01:23 - Speaker A: dash form", 83, "Speaker A", "dash form"),
        ("1:02:03 — em dash", 3723, None, "em dash"),
        ("**[00:02:00] Speaker 1:** bold", 120, "Speaker 1", "bold"),
        ("- [00:03:00] **Interviewer**: in a list", 180, "Interviewer", "in a list"),
        ("[00:10 - 00:15] Dr. Jane Smith: a range keeps its start", 10, "Dr. Jane Smith", "a range keeps its start"),
        ("[00:05:00.500] SPEAKER_00: fractions", 300.5, "SPEAKER_00", "fractions"),
        ("[00:04:02] 主持人：你好", 242, "主持人", "你好"),
        ("[00:04:00] I said: no way", 240, None, "I said: no way"),
        ("[00:04:01] 10:30 is when we start", 241, None, "10:30 is when we start"),
        ("[00:04:05] [no speech]", 245, None, "[no speech]"),
        ("[75:30] past the hour in minutes", 4530, None, "past the hour in minutes"),
    ],
)
def test_parse_transcript_splits_timestamp_and_speaker_from_the_text(
    raw: str, seconds: float, speaker: str | None, text: str
) -> None:
    assert parse_transcript(raw) == [Line(seconds, speaker, text, raw)]


@pytest.mark.parametrize("raw", ["continuation of the line before", "10:30 the meeting starts", "Note: prose",
                                 "  ", "Here is the transcript:"])
def test_lines_without_a_leading_timestamp_keep_none(raw: str) -> None:
    [line] = parse_transcript(raw)
    assert line.seconds is None and line.speaker is None and line.text == raw.strip() and line.raw == raw


# --- stitching ---------------------------------------------------------------------------------------------

Utterance = tuple[float, str, str]  # (true time on the recording, speaker, words)


def fake_answers(plan: list[Chunk], utterances: list[Utterance]) -> list[tuple[Chunk, list[str]]]:
    """What a model returns for each chunk: every utterance it hears, stamped relative to the chunk's start.

    The copy of an overlap line in the later chunk is stamped 2 s off and written differently (case,
    punctuation, a renumbered speaker), as models do."""
    answers = []
    for number, chunk in enumerate(plan):
        lines = []
        for seconds, speaker, words in utterances:
            if not chunk.start <= seconds <= chunk.end:
                continue
            relative = round(seconds - chunk.start)
            if number and seconds <= plan[number - 1].end:
                relative, speaker, words = relative + 2, "Speaker 9", words.upper() + "!"
            lines.append(f"[{format_clock(relative)}] {speaker}: {words}")
        answers.append((chunk, lines))
    return answers


def test_a_three_hour_recording_stitches_into_one_correct_timeline() -> None:
    duration = 3 * HOUR
    plan = plan_chunks(duration)
    utterances = [(float(t), f"Speaker {1 + t // 30 % 2}", f"utterance {t // 30} about topic {t % 7}")
                  for t in range(0, int(duration), 30)]
    answers = fake_answers(plan, utterances)
    overlap_copies = sum(1 for seconds, _, _ in utterances
                         for before, after in pairwise(plan) if after.start <= seconds <= before.end)
    assert overlap_copies >= len(plan) - 1  # every join really repeats a line

    # One stamp in chunk 4 runs 45 s backwards; the last line is stamped ten minutes past the end.
    chunk4, lines4 = answers[3]
    backwards_index = 10
    moved = lines4[backwards_index]
    true_relative = parse_clock(moved[1:9])
    lines4[backwards_index] = f"[{format_clock(true_relative - 45)}]{moved[10:]}"
    last_chunk, last_lines = answers[-1]
    last_lines[-1] = f"[{format_clock(last_chunk.seconds + 600)}]{last_lines[-1][10:]}"

    stitched = stitch([(chunk, "\n".join(lines)) for chunk, lines in answers], duration)

    assert [line.text for line in stitched.lines] == [words for _, _, words in utterances]
    assert [line.speaker for line in stitched.lines] == [speaker for _, speaker, _ in utterances]
    assert stitched.duplicates_dropped == overlap_copies
    backwards_global = chunk4.start + true_relative
    for line, (seconds, _, _) in zip(stitched.lines, utterances, strict=True):
        if seconds == backwards_global:
            assert line.seconds == backwards_global - 30  # clamped to the line before it
        elif seconds == utterances[-1][0]:
            assert line.seconds == duration
        else:
            assert line.seconds == seconds
    times = [line.seconds for line in stitched.lines]
    assert times == sorted(times) and max(times) <= duration
    assert stitched.fixes == [
        "1 timestamp past the end of the recording clamped to 03:00:00",
        "1 timestamp earlier than the line before moved forward to it",
    ]
    rendered = stitched.text.splitlines()
    assert len(rendered) == len(utterances)
    assert rendered[0] == "[00:00:00] Speaker 1: utterance 0 about topic 0"
    assert rendered[41] == "[00:20:30] Speaker 2: utterance 41 about topic 5"
    assert coverage(stitched.lines, duration) == 1.0


def test_a_clean_stitch_reports_no_fixes() -> None:
    plan = plan_chunks(3000)
    utterances = [(float(t), "Speaker 1", f"line {t}") for t in range(0, 3000, 20)]
    stitched = stitch([(chunk, "\n".join(lines)) for chunk, lines in fake_answers(plan, utterances)], 3000)
    assert stitched.fixes == []
    assert [line.seconds for line in stitched.lines] == [t for t, _, _ in utterances]


def two_chunks() -> tuple[Chunk, Chunk]:
    return Chunk(0, 0.0, 1210.0), Chunk(1, 1200.0, 2400.0)


def test_an_overlap_line_is_dropped_when_its_words_match_a_line_of_the_previous_chunk_within_a_few_seconds() -> None:
    first, second = two_chunks()
    stitched = stitch([
        (first, "[00:20:03] Speaker 1: So, where were we?"),
        (second, "[00:00:06] Speaker 2: so where were we\n[00:00:20] Speaker 2: next"),
    ], 2400)
    assert [(line.seconds, line.text) for line in stitched.lines] == [(1203, "So, where were we?"), (1220, "next")]
    assert stitched.duplicates_dropped == 1 and stitched.fixes == []


def test_an_overlap_line_cut_at_the_chunks_edge_counts_as_the_same_line() -> None:
    first, second = two_chunks()
    stitched = stitch([
        (first, "[00:20:05] Speaker 1: and then we drove all the way"),
        (second, "[00:00:04] Speaker 1: and then we drove all the way home"),
    ], 2400)
    assert [line.text for line in stitched.lines] == ["and then we drove all the way"]


def test_an_overlap_line_timed_before_the_last_kept_line_is_dropped_even_with_other_words() -> None:
    first, second = two_chunks()
    stitched = stitch([
        (first, "[00:20:08] Speaker 1: last words of chunk one"),
        (second, "[00:00:02] Speaker 1: something the model misheard\n[00:00:09] Speaker 1: new words"),
    ], 2400)
    assert [line.text for line in stitched.lines] == ["last words of chunk one", "new words"]


def test_a_new_line_in_the_overlap_after_the_previous_chunks_last_line_is_kept() -> None:
    first, second = two_chunks()
    stitched = stitch([
        (first, "[00:20:01] Speaker 1: hello"),
        (second, "[00:00:07] Speaker 2: a reply the first chunk cut off"),
    ], 2400)
    assert [(line.seconds, line.text) for line in stitched.lines] == [
        (1201, "hello"), (1207, "a reply the first chunk cut off")]


def test_a_time_running_backwards_inside_the_overlap_is_clamped_not_dropped() -> None:
    first, second = two_chunks()
    stitched = stitch([
        (first, "[00:20:01] Speaker 1: hello"),
        (second, "[00:00:05] Speaker 2: first\n[00:00:03] Speaker 2: second"),
    ], 2400)
    assert [(line.seconds, line.text) for line in stitched.lines] == [(1201, "hello"), (1205, "first"),
                                                                      (1205, "second")]
    assert stitched.fixes == ["1 timestamp earlier than the line before moved forward to it"]


def test_lines_without_timestamps_follow_the_line_they_continue_whether_kept_or_dropped() -> None:
    first, second = two_chunks()
    stitched = stitch([
        (first, "[00:20:02] Speaker 1: a long sentence\nthat wraps here"),
        (second, "[00:00:02] Speaker 1: a long sentence\nthat wraps here\n[00:00:30] Speaker 1: more\nand more"),
    ], 2400)
    assert stitched.text == ("[00:20:02] Speaker 1: a long sentence\nthat wraps here\n"
                             "[00:20:30] Speaker 1: more\nand more\n")


def test_a_timestamp_past_the_end_of_its_chunk_is_clamped_to_the_chunks_end_and_reported() -> None:
    first, second = two_chunks()
    stitched = stitch([(first, "[00:25:00] Speaker 1: hallucinated time"), (second, "[00:01:00] Speaker 1: ok")], 2400)
    assert [line.seconds for line in stitched.lines] == [1210, 1260]
    assert stitched.fixes == ["1 timestamp past the end of the chunk 00:00:00-00:20:10 clamped to 00:20:10"]


def test_a_timestamp_less_than_a_second_past_the_end_is_rounding_and_not_reported() -> None:
    stitched = stitch([(Chunk(0, 0.0, 100.4), "[00:01:41] Speaker 1: the end")], 100.4)
    assert stitched.lines[0].seconds == 100.4 and stitched.fixes == []


def test_pieces_given_out_of_order_are_stitched_in_timeline_order() -> None:
    first, second = two_chunks()
    stitched = stitch([(second, "[00:01:00] Speaker 1: two"), (first, "[00:01:00] Speaker 1: one")], 2400)
    assert [line.text for line in stitched.lines] == ["one", "two"]


def test_a_missing_chunk_is_reported_as_a_gap() -> None:
    plan = plan_chunks(3600)
    pieces = [(plan[0], "[00:01:00] Speaker 1: one"), (plan[2], "[00:01:00] Speaker 1: three")]
    stitched = stitch(pieces, 3600)
    assert stitched.fixes == [f"nothing covers {format_clock(plan[0].end)}-{format_clock(plan[2].start)}: "
                              "a chunk is missing"]


def test_an_empty_answer_stitches_to_empty_text() -> None:
    stitched = stitch([(Chunk(0, 0.0, 60.0), "")], 60)
    assert stitched.text == "" and stitched.lines == [] and coverage(stitched.lines, 60) == 0.0


def test_a_cut_spans_timestamps_are_mapped_back_onto_the_recordings_timeline() -> None:
    start, end = parse_clock("02:30"), parse_clock("03:29")
    answer = "Here is the transcript:\n\n[00:00:05] Speaker 1: hi\n[00:50] Speaker 2: hello\n[02:00] Speaker 1: bye"
    stitched = offset_timestamps(answer, start, 600, span_seconds=end - start)
    assert stitched.text == ("Here is the transcript:\n\n[00:02:35] Speaker 1: hi\n[00:03:20] Speaker 2: hello\n"
                             "[00:03:29] Speaker 1: bye\n")
    assert stitched.fixes == ["1 timestamp past the end of the chunk 00:02:30-00:03:29 clamped to 00:03:29"]


def test_a_cut_span_without_an_end_is_clamped_to_the_end_of_the_recording() -> None:
    stitched = offset_timestamps("[10:00] Speaker 1: far too late", 300, 600)
    assert stitched.lines[0].seconds == 600
    assert stitched.fixes == ["1 timestamp past the end of the recording clamped to 00:10:00"]


def test_an_offset_outside_the_recording_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the recording"):
        offset_timestamps("x", 700, 600)


def test_prose_without_timestamps_passes_through_an_offset_untouched() -> None:
    summary = "- point one\n- point two at 10:30\n\nDone."
    assert offset_timestamps(summary, 150, 600).text == summary + "\n"


def test_coverage_shows_a_transcript_that_stops_early() -> None:
    lines = parse_transcript("[00:00:00] Speaker 1: start\n[00:09:00] Speaker 1: and then nothing")
    assert coverage(lines, 73 * 60) == pytest.approx(9 / 73)
    assert coverage(lines, 540) == 1.0
    assert coverage(parse_transcript("no times at all"), 60) == 0.0


def test_coverage_of_a_span_is_measured_from_its_start() -> None:
    lines = [Line(150.0, None, "a", "a"), Line(180.0, None, "b", "b")]
    assert coverage(lines, 210, start_seconds=150) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        coverage(lines, 100, start_seconds=150)


def test_the_examples_in_the_docstrings_hold() -> None:
    assert doctest.testmod(chunking).failed == 0
