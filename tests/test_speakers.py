"""Speaker labels across chunk borders (daemon/speakers.py): align, relabel, the prompt note and agreement."""

from __future__ import annotations

import doctest
import random

import pytest

from daemon.prompts import speakers
from daemon.prompts.chunking import Chunk, Line, format_clock, parse_transcript, plan_chunks, stitch
from daemon.prompts.speakers import agreement, align, known_speakers_note, on_timeline, relabel, relabel_chunks

WORDS = ("budget timeline river table morning window station garden letter number market signal doctor "
         "history engine paper summer winter island forest bridge camera office planet mirror lesson travel "
         "coffee silver yellow quickly never always maybe really almost simple honest strange gentle").split()

Utterance = tuple[float, str, str]  # seconds on the recording's timeline, true voice, words


def conversation(rng: random.Random, voices: list[str], duration: float, *, rounds: bool = False,
                 gaps: list[tuple[float, float]] | None = None) -> list[Utterance]:
    """A conversation with no words inside the gaps. Free talk: turns of 2-12 s, a voice often keeping the floor,
    so a voice may be silent for minutes. Rounds (a panel): every voice once a round, in a new order, 2-6 s each."""
    said: list[Utterance] = []
    seconds, order = 0.0, list(voices)
    while seconds < duration - 1:
        if rounds:
            voice = order.pop(0)
            order = order or rng.sample(voices, len(voices))
        elif not said or rng.random() < 0.6:
            voice = rng.choice(voices)
        if not any(low <= seconds < high for low, high in gaps or []):
            said.append((seconds, voice, " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize()))
        seconds += rng.uniform(2.0, 6.0) if rounds else rng.uniform(2.0, 12.0)
    return said


def answer(said: list[Utterance], chunk: Chunk, rng: random.Random, *, keep: dict[str, str] | None = None,
           jitter: float = 0.8, reword_overlap_before: float | None = None) -> str:
    """What a model writes for one chunk: times relative to the chunk and a little off, voices numbered in order
    of first appearance (or, with keep, the labels it was asked to keep; new voices numbered after them)."""
    labels: dict[str, str] = dict(keep or {})
    rows = []
    for seconds, voice, words in said:
        if not chunk.start <= seconds < chunk.end:
            continue
        if voice not in labels:
            used = {int(label.split()[-1]) for label in labels.values()}
            labels[voice] = f"Speaker {next(n for n in range(1, 99) if n not in used)}"
        if reword_overlap_before is not None and seconds < reword_overlap_before:
            words = f"{rng.choice(WORDS)} {rng.choice(WORDS)} said differently"  # a model hearing it otherwise
        stamp = max(0.0, seconds - chunk.start + rng.uniform(-jitter, jitter))
        rows.append(f"[{format_clock(stamp)}] {labels[voice]}: {words}")
    return "\n".join(rows) if rows else "[no speech]"


def kept_labels(said: list[Utterance], plan: list[Chunk], rng: random.Random, *, swap: float = 0.0,
                renumber: float = 0.0) -> list[dict[str, str] | None]:
    """Per chunk, the labels a model given known_speakers_note writes: chunk 1's, except that with probability
    swap it mixes up two voices, and with probability renumber it ignores the note (None: by first appearance)."""
    first = list(dict.fromkeys(voice for seconds, voice, _ in said if seconds < plan[0].end))
    given = {voice: f"Speaker {index}" for index, voice in enumerate(first, start=1)}
    plans: list[dict[str, str] | None] = [None]
    for _ in plan[1:]:
        labels = dict(given)
        if len(labels) >= 2 and rng.random() < swap:
            one, other = rng.sample(sorted(labels), 2)
            labels[one], labels[other] = labels[other], labels[one]
        plans.append(None if rng.random() < renumber else labels)
    return plans


def consistent(said: list[Utterance], plan: list[Chunk], rng: random.Random,
               keeps: list[dict[str, str] | None] | None = None) -> float:
    """Agreement with the truth after the model's answers are relabelled and stitched."""
    pieces = [(chunk, answer(said, chunk, rng, keep=keep)) for chunk, keep in zip(plan, keeps or [None] * len(plan),
                                                                                   strict=True)]
    stitched = stitch(relabel_chunks(pieces), plan[-1].end)
    return agreement([(seconds, voice) for seconds, voice, _ in said], stitched.lines)


def truth_of(said: list[Utterance]) -> list[tuple[float, str]]:
    return [(seconds, voice) for seconds, voice, _ in said]


HOUR_IN_TEN_MINUTES = plan_chunks(3600.0, chunk_seconds=600, overlap_seconds=10)  # six chunks, 10 s overlaps
HOUR_WITH_LONG_OVERLAPS = plan_chunks(3600.0, chunk_seconds=600, overlap_seconds=60)


# --- whole recordings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_two_voices_renumbered_in_every_chunk_keep_their_labels_across_the_recording(seed: int) -> None:
    said = conversation(random.Random(seed), ["A", "B"], 3600.0)
    assert consistent(said, HOUR_IN_TEN_MINUTES, random.Random(seed)) >= 0.95


@pytest.mark.parametrize("voices", [3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_a_panel_renumbered_in_every_chunk_is_restored_when_every_voice_speaks_in_each_overlap(voices: int,
                                                                                               seed: int) -> None:
    said = conversation(random.Random(seed), [f"V{index}" for index in range(voices)], 3600.0, rounds=True)
    plan = plan_chunks(3600.0, chunk_seconds=600, overlap_seconds=30)
    assert consistent(said, plan, random.Random(seed)) >= 0.95


@pytest.mark.parametrize("voices", [3, 4])
def test_free_talk_with_a_model_that_mostly_keeps_the_noted_labels_scores_at_least_95_percent(voices: int) -> None:
    scores = []
    for seed in range(8):
        rng = random.Random(seed)
        said = conversation(rng, [f"V{index}" for index in range(voices)], 3600.0)
        keeps = kept_labels(said, HOUR_WITH_LONG_OVERLAPS, rng, swap=0.3, renumber=0.2)
        scores.append(consistent(said, HOUR_WITH_LONG_OVERLAPS, rng, keeps))
    assert sum(scores) / len(scores) >= 0.95


def test_without_relabelling_the_same_recordings_lose_their_labels() -> None:
    scores = []
    for seed in range(4):
        said = conversation(random.Random(seed), ["A", "B", "C"], 3600.0)
        pieces = [(chunk, answer(said, chunk, random.Random(seed))) for chunk in HOUR_IN_TEN_MINUTES]
        scores.append(agreement(truth_of(said), stitch(pieces, 3600.0).lines))
    assert min(scores) < 0.9  # the synthetic model does renumber, so the tests above test something


def test_a_model_that_keeps_the_labels_it_was_given_is_left_exactly_as_it_wrote() -> None:
    rng = random.Random(11)
    said = conversation(rng, ["A", "B", "C"], 3600.0)
    keeps = kept_labels(said, HOUR_IN_TEN_MINUTES, rng)
    pieces = [(chunk, answer(said, chunk, rng, keep=keep)) for chunk, keep in zip(HOUR_IN_TEN_MINUTES, keeps,
                                                                                   strict=True)]
    assert relabel_chunks(pieces) == pieces


@pytest.mark.parametrize("seed", range(4))
def test_overlaps_without_any_speech_fall_back_on_the_labels_the_model_kept(seed: int) -> None:
    gaps = [(chunk.start - 15, chunk.start + 25) for chunk in HOUR_IN_TEN_MINUTES[1:]]
    rng = random.Random(seed)
    said = conversation(rng, ["A", "B", "C"], 3600.0, gaps=gaps)
    keeps = kept_labels(said, HOUR_IN_TEN_MINUTES, rng)
    assert consistent(said, HOUR_IN_TEN_MINUTES, rng, keeps) == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_overlaps_whose_words_do_not_match_fall_back_on_who_spoke_at_the_border(seed: int) -> None:
    rng = random.Random(seed)
    said = conversation(rng, ["A", "B"], 3600.0)
    plan = HOUR_IN_TEN_MINUTES
    pieces = [(chunk, answer(said, chunk, rng, reword_overlap_before=before.end if before else None))
              for chunk, before in zip(plan, [None, *plan], strict=False)]
    assert agreement(truth_of(said), stitch(relabel_chunks(pieces), 3600.0).lines) >= 0.95


def test_a_voice_first_heard_in_the_third_chunk_gets_the_next_number_and_collides_with_none() -> None:
    rng = random.Random(5)
    plan = plan_chunks(1800.0, chunk_seconds=600, overlap_seconds=10)
    said = conversation(rng, ["A", "B"], 1800.0)
    said += [(seconds + 0.5, "C", f"New voice speaking {index} times now") for index, seconds in
             enumerate(range(int(plan[2].start) + 60, 1790, 97))]
    said.sort()
    stitched = stitch(relabel_chunks([(chunk, answer(said, chunk, rng)) for chunk in plan]), 1800.0)
    voice_of = {line.text: line.speaker for line in stitched.lines}
    new_labels = {voice_of[words] for _, voice, words in said if voice == "C" and words in voice_of}
    old_labels = {voice_of[words] for _, voice, words in said if voice != "C" and words in voice_of}
    assert new_labels == {"Speaker 3"} and old_labels == {"Speaker 1", "Speaker 2"}
    assert agreement(truth_of(said), stitched.lines) >= 0.95


def test_a_voice_silent_in_the_overlap_keeps_its_label_when_the_chunk_renumbers() -> None:
    previous = parse_transcript("[00:09:40] Speaker 1: So the bridge opens in May.\n"
                                "[00:09:52] Speaker 2: And the river crossing closes in June, right?")
    current = on_timeline(parse_transcript("[00:00:02] Speaker 1: And the river crossing closes in June, right?\n"
                                           "[00:01:10] Speaker 2: Yes, exactly, the bridge replaces it."), 590.0)
    assert align(previous, current, (590.0, 600.0)) == {"Speaker 1": "Speaker 2", "Speaker 2": "Speaker 1"}


def test_with_three_voices_a_swap_seen_in_the_overlap_leaves_the_silent_third_voice_alone() -> None:
    previous = parse_transcript("[00:09:30] Speaker 3: Let me check the numbers.\n"
                                "[00:09:40] Speaker 1: So the bridge opens in May.\n"
                                "[00:09:52] Speaker 2: And the river crossing closes in June, right?")
    current = on_timeline(parse_transcript("[00:00:02] Speaker 1: And the river crossing closes in June, right?\n"
                                           "[00:01:10] Speaker 3: The numbers look fine.\n"
                                           "[00:01:20] Speaker 2: Good."), 590.0)
    assert align(previous, current, (590.0, 600.0)) == {"Speaker 1": "Speaker 2", "Speaker 3": "Speaker 3",
                                                        "Speaker 2": "Speaker 1"}


# --- align, one chunk --------------------------------------------------------------------------------------


def test_named_speakers_are_kept_and_numbers_go_where_the_overlap_says() -> None:
    previous = parse_transcript("[00:00:50] Ana: We need the yellow paper for the office.\n"
                                "[00:00:55] Speaker 1: I will bring it tomorrow morning then.")
    current = parse_transcript("[00:00:50] Ana: We need the yellow paper for the office.\n"
                               "[00:00:56] Speaker 2: I will bring it tomorrow morning then.\n"
                               "[00:01:30] Speaker 1: Who is this?")
    assert align(previous, current, (50.0, 60.0)) == {"Ana": "Ana", "Speaker 2": "Speaker 1", "Speaker 1": "Speaker 2"}


def test_identical_short_texts_are_paired_by_time() -> None:
    previous = parse_transcript("[00:01:00] Speaker 1: Yes.\n[00:01:02] Speaker 2: Yes.")
    current = parse_transcript("[00:01:00] Speaker 2: Yes.\n[00:01:02] Speaker 1: Yes.")
    assert align(previous, current, (55.0, 65.0)) == {"Speaker 2": "Speaker 1", "Speaker 1": "Speaker 2"}


def test_a_line_cut_at_the_chunk_edge_still_matches_the_whole_line() -> None:
    previous = parse_transcript("[00:10:08] Speaker 2: The coffee machine on the third floor is")
    current = on_timeline(parse_transcript("[00:00:08] Speaker 1: The coffee machine on the third floor is broken."),
                          600.0)
    assert align(previous, current, (600.0, 610.0)) == {"Speaker 1": "Speaker 2"}


@pytest.mark.parametrize(("previous", "current", "expected"), [
    ("", "", {}),
    ("", "[00:00:01] Speaker 2: first chunk\n[00:00:05] Speaker 1: order kept", {"Speaker 2": "Speaker 2",
                                                                                "Speaker 1": "Speaker 1"}),
    ("[00:00:01] Speaker 1: hello", "", {}),
    ("[00:00:01] Speaker 1: hello", "[no speech]", {}),
    ("Speaker 1: no stamps", "Speaker 2: none here either", {}),
    ("[00:00:01] hello, nobody labelled", "[00:00:01] Speaker 1: hello, nobody labelled", {"Speaker 1": "Speaker 1"}),
])
def test_hostile_chunks_give_a_mapping_that_collides_with_nothing(previous: str, current: str,
                                                                  expected: dict[str, str]) -> None:
    assert align(parse_transcript(previous), parse_transcript(current), (0.0, 10.0)) == expected


def test_the_mapping_is_one_to_one_and_new_labels_never_take_an_established_one() -> None:
    previous = parse_transcript("\n".join(f"[00:00:{n:02d}] Speaker {n}: words of voice {n}" for n in range(1, 6)))
    current = parse_transcript("[00:01:00] Speaker 7: late\n[00:01:01] Speaker 1: one\n[00:01:02] Speaker 2: two")
    mapping = align(previous, current, (60.0, 70.0))
    assert len(set(mapping.values())) == len(mapping) == 3
    assert mapping["Speaker 7"] == "Speaker 6" and mapping["Speaker 1"] == "Speaker 1"


def test_zero_padded_labels_keep_their_form() -> None:
    previous = parse_transcript("[00:00:01] SPEAKER_00: a\n[00:00:02] SPEAKER_01: b")
    current = parse_transcript("[00:00:01] SPEAKER_00: a\n[00:00:02] SPEAKER_01: b\n[00:00:03] SPEAKER_02: c")
    assert align(previous, current, (0.0, 10.0))["SPEAKER_02"] == "SPEAKER_02"
    renumbered = parse_transcript("[00:00:01] SPEAKER_01: a\n[00:00:02] SPEAKER_00: b\n[00:00:03] SPEAKER_07: c")
    assert align(previous, renumbered, (0.0, 10.0)) == {"SPEAKER_01": "SPEAKER_00", "SPEAKER_00": "SPEAKER_01",
                                                        "SPEAKER_07": "SPEAKER_02"}


def test_relabel_renames_speakers_redraws_raw_and_leaves_other_lines_alone() -> None:
    lines = parse_transcript("**[00:01:02.500] Speaker 1:** hi\ncontinued\n[00:01:05] Narration\n[00:01:06] Ana: yo")
    out = relabel(lines, {"Speaker 1": "Speaker 2", "Ana": "Ana"})
    assert [line.speaker for line in out] == ["Speaker 2", None, None, "Ana"]
    assert out[0].raw == "[00:01:02.500] Speaker 2: hi" and out[1:] == lines[1:]
    assert parse_transcript(out[0].raw)[0] == Line(62.5, "Speaker 2", "hi", out[0].raw)


# --- the note for the next prompt --------------------------------------------------------------------------


def test_the_note_lists_each_voice_with_the_end_of_what_it_last_said_and_the_names() -> None:
    lines = parse_transcript("[00:18:00] Speaker 1: Opening words.\n[00:19:10] Speaker 2: Something \"quoted\" and "
                             "a rather long sentence that keeps going until the very end of the chunk\n"
                             "[00:19:50] Speaker 1: Closing words.")
    note = known_speakers_note(lines, names=" Ana ,Ben,,ana, Dr: Who\n")
    assert "- Speaker 1, last at 00:19:50: \"Closing words.\"" in note
    assert "- Speaker 2, last at 00:19:10: \"Something 'quoted' and a rather long sentence" in note
    assert "next number (Speaker 3)" in note and note.endswith("given by the user: Ana, Ben, Dr Who.")


def test_the_note_is_empty_with_nothing_to_say_and_names_alone_are_enough() -> None:
    assert known_speakers_note([]) == "" and known_speakers_note(parse_transcript("[no speech]")) == ""
    assert known_speakers_note([], names=["Ana", "Ben"]) == "The participants' names, given by the user: Ana, Ben."


@pytest.mark.parametrize("max_chars", [40, 120, 200, 300, 700, 5000])
def test_the_note_always_fits_max_chars_dropping_the_voices_heard_longest_ago_first(max_chars: int) -> None:
    lines = parse_transcript("\n".join(f"[00:{n:02d}:00] Speaker {n}: " + "word " * 60 for n in range(1, 9)))
    note = known_speakers_note(lines, max_chars=max_chars, names="Ana,Ben")
    assert 0 < len(note) <= max_chars
    if "Speaker 1," in note:
        assert "Speaker 8," in note


def test_the_note_quotes_the_tail_cut_at_a_word() -> None:
    assert speakers._tail("one two three four five", 12) == "…four five"
    assert speakers._tail("abcdefghijklmnop", 6) == "…lmnop"
    assert speakers._tail("short", 0) == ""


# --- agreement ---------------------------------------------------------------------------------------------


def test_agreement_forgives_one_renaming_but_not_two_voices_under_one_label() -> None:
    truth = [(0.0, "A"), (5.0, "B"), (10.0, "A"), (15.0, "B")]
    assert agreement(truth, parse_transcript("[00:00] S2: a\n[00:05] S1: b\n[00:10] S2: c\n[00:15] S1: d")) == 1.0
    assert agreement(truth, parse_transcript("[00:00] S1: a\n[00:05] S1: b\n[00:10] S1: c\n[00:15] S1: d")) == 0.5


def test_agreement_counts_a_lost_line_as_wrong_and_empty_truth_as_perfect() -> None:
    truth = [(0.0, "A"), (5.0, "B"), (10.0, "A"), (15.0, "B")]
    assert agreement(truth, parse_transcript("[00:00] S1: a\n[00:05] S2: b\n[00:10] S1: c")) == 0.75
    assert agreement(truth, []) == 0.0 and agreement([], []) == 1.0


def test_agreement_finds_the_best_renaming_for_many_voices() -> None:
    truth = [(float(n), f"V{n % 14}") for n in range(0, 280, 2)]
    shifted = [Line(seconds, f"L{(int(voice[1:]) + 3) % 14}", "x", "") for seconds, voice in truth]
    assert agreement(truth, shifted) == 1.0


def test_the_doctests_hold() -> None:
    assert doctest.testmod(speakers).failed == 0
