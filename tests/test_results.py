"""Result files (daemon/results.py): the naming rule, name collisions, hostile names and atomic writes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from daemon.prompts import results
from daemon.prompts.results import (
    MAX_NAME_BYTES,
    remove_stale_temps,
    render_markdown,
    result_paths,
    result_stem,
    sanitize_name,
    write_result,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def paths_for(folder: Path, prompt_id: int, names: list[str] | None = None, template: str | None = "transcribe",
              output_format: str = "markdown") -> tuple[Path, Path]:
    return result_paths(folder, recording_names=names or ["Recording.m4a"], template=template,
                        prompt_id=prompt_id, output_format=output_format)


def write(folder: Path, prompt_id: int, text: str, names: list[str] | None = None) -> tuple[Path, Path]:
    text_path, meta_path = paths_for(folder, prompt_id, names)
    write_result(text_path, meta_path, text, {"prompt_id": prompt_id, "finished_at": T0})
    return text_path, meta_path


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if results.TEMP_MARKER in path.name)


# --- names -------------------------------------------------------------------------------------------------


def test_a_result_is_named_after_the_recording_without_its_extension_and_the_template() -> None:
    assert result_stem(["interview 2026-11-25.m4a"], "transcribe") == "interview 2026-11-25.transcribe"
    assert result_stem(["notes"], None) == "notes.prompt"


def test_a_result_over_several_recordings_names_the_first_two_and_counts_the_rest() -> None:
    assert result_stem(["a.wav", "b.mp3"], "summarize") == "a + b.summarize"
    assert result_stem(["a.wav", "b.wav", "c.wav", "d.wav", "e.wav"], "summarize") == "a + b + 3 more.summarize"


@pytest.mark.parametrize(("output_format", "extension"), [("markdown", ".md"), ("text", ".txt"), ("json", ".json")])
def test_the_extension_follows_the_output_format_and_metadata_sits_beside_in_meta_json(
    tmp_path: Path, output_format: str, extension: str
) -> None:
    text_path, meta_path = paths_for(tmp_path, 7, ["talk.ogg"], output_format=output_format)
    assert text_path == tmp_path / f"talk.transcribe{extension}"
    assert meta_path == tmp_path / "talk.transcribe.meta.json"


def test_an_unknown_output_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="markdown, text, json"):
        paths_for(tmp_path, 1, output_format="html")


def test_two_recordings_both_named_recording_m4a_never_overwrite_each_others_results(tmp_path: Path) -> None:
    first = write(tmp_path, 1, "first recording's words")
    second = write(tmp_path, 2, "second recording's words")
    assert first[0].name == "Recording.transcribe.md"
    assert second[0].name == "Recording.transcribe.2.md"
    assert first[0].read_text() == "first recording's words"
    assert second[0].read_text() == "second recording's words"


def test_re_running_a_prompt_overwrites_only_its_own_file(tmp_path: Path) -> None:
    first = write(tmp_path, 1, "v1 of prompt 1")
    second = write(tmp_path, 2, "v1 of prompt 2")
    assert write(tmp_path, 2, "v2 of prompt 2") == second
    assert write(tmp_path, 1, "v2 of prompt 1") == first
    assert first[0].read_text() == "v2 of prompt 1"
    assert second[0].read_text() == "v2 of prompt 2"


def test_a_name_is_claimed_before_anything_is_written_so_concurrent_prompts_cannot_share_it(tmp_path: Path) -> None:
    a = paths_for(tmp_path, 10)
    b = paths_for(tmp_path, 11)
    assert a != b
    assert json.loads(a[1].read_text()) == {"prompt_id": 10, "state": "pending"}
    assert paths_for(tmp_path, 10) == a  # the claim is the prompt's own: a retry finds it again


def test_a_file_the_user_put_in_the_results_folder_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "Recording.transcribe.md").write_text("my own notes")
    (tmp_path / "Recording.transcribe.9.meta.json").write_text("{not json")  # damaged: not ours either
    text_path, _ = write(tmp_path, 9, "model output")
    assert text_path.name == "Recording.transcribe.9.2.md"
    assert (tmp_path / "Recording.transcribe.md").read_text() == "my own notes"


def test_a_template_name_that_mimics_a_prompt_id_cannot_take_that_prompts_file(tmp_path: Path) -> None:
    write(tmp_path, 41, "prompt 41", names=["x.wav"])  # takes x.transcribe.md
    taken_by_42 = write(tmp_path, 42, "prompt 42", names=["x.wav"])
    assert taken_by_42[0].name == "x.transcribe.42.md"
    odd = result_paths(tmp_path, recording_names=["x.wav"], template="transcribe.42", prompt_id=44,
                       output_format="markdown")
    assert odd[0].name == "x.transcribe.42.44.md"
    assert taken_by_42[0].read_text() == "prompt 42"


def test_a_unicode_name_is_kept_and_normalized_to_one_form(tmp_path: Path) -> None:
    name = unicodedata.normalize("NFD", "Интервью Zoë 東京 🎙 ٢٠٢٦.m4a")
    text_path, _ = write(tmp_path, 3, "x", names=[name])
    assert text_path.name == "Интервью Zoë 東京 🎙 ٢٠٢٦.transcribe.md"
    assert unicodedata.is_normalized("NFC", text_path.name)


HOSTILE = [
    "../../etc/passwd", "/etc/shadow", "-rf --no-preserve-root", ".bashrc", "...", "..", "a\nb\rc\td", "nul\x00byte",
    "bell\x07 esc\x1b[31m", "\u202etxt.exe", "zero\u200bwidth", "con:name?<>|*\"", "back\\slash", "   ", "",
    "trailing dots...", "\udcff undecodable", "—" * 300, "😀" * 100, "a" * 1000,
]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_recording_name_becomes_a_safe_file_name_inside_the_results_folder(tmp_path: Path, name: str) -> None:
    text_path, meta_path = paths_for(tmp_path, 123456789, [name, name])
    write(tmp_path, 5, "placeholder so the next name collides", names=[name, name])
    for path in (text_path, meta_path):
        assert path.parent == tmp_path
        assert not path.name.startswith(("-", "."))
        assert "/" not in path.name and "\\" not in path.name
        assert not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in path.name)
        assert "\u202e" not in path.name and "\u200b" not in path.name
        assert len(path.name.encode()) <= 255
    write_result(text_path, meta_path, "text", {"prompt_id": 123456789})
    assert text_path.read_text() == "text"


@pytest.mark.parametrize("name", HOSTILE)
def test_sanitize_name_caps_bytes_without_splitting_a_character(name: str) -> None:
    cleaned = sanitize_name(name)
    assert 0 < len(cleaned.encode("utf-8")) <= MAX_NAME_BYTES
    assert cleaned == cleaned.strip() and not cleaned.startswith(("-", ".")) and not cleaned.endswith(".")


def test_sanitize_name_keeps_joiners_that_scripts_need() -> None:
    assert sanitize_name("می\u200cخواهم") == "می\u200cخواهم"


def test_a_recording_with_an_empty_name_still_gets_a_readable_result_name(tmp_path: Path) -> None:
    assert paths_for(tmp_path, 1, ["\n\t"], template="\x00")[0].name == "recording.prompt.md"


# --- writing -----------------------------------------------------------------------------------------------


def test_write_result_writes_the_text_and_pretty_sorted_metadata_with_utc_times(tmp_path: Path) -> None:
    text_path, meta_path = paths_for(tmp_path, 4)
    local = datetime(2026, 11, 25, 13, 30, tzinfo=timezone(timedelta(hours=1)))
    write_result(text_path, meta_path, "Grüße\n", {"prompt_id": 4, "zeta": 1, "finished_at": local, "created_at": T0,
                                                   "source": Path("/srv/in/a.m4a"), "tags": {"b", "a"}})
    assert text_path.read_text(encoding="utf-8") == "Grüße\n"
    meta_text = meta_path.read_text(encoding="utf-8")
    meta = json.loads(meta_text)
    assert meta == {"prompt_id": 4, "zeta": 1, "finished_at": "2026-11-25T12:30:00Z",
                    "created_at": "2026-11-25T12:00:00Z", "source": "/srv/in/a.m4a", "tags": ["a", "b"]}
    assert list(meta) == sorted(meta)
    assert meta_text.startswith('{\n  "created_at"') and meta_text.endswith("}\n")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_result_files_are_mode_0640_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        text_path, meta_path = paths_for(tmp_path, 4)
        claimed_mode = stat.S_IMODE(meta_path.stat().st_mode)
        write_result(text_path, meta_path, "x", {"prompt_id": 4})
    finally:
        os.umask(old)
    assert claimed_mode == 0o640
    assert stat.S_IMODE(text_path.stat().st_mode) == 0o640
    assert stat.S_IMODE(meta_path.stat().st_mode) == 0o640


def test_a_failed_rename_keeps_the_old_result_whole_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text_path, meta_path = write(tmp_path, 1, "old text")

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        write_result(text_path, meta_path, "new text", {"prompt_id": 1, "finished_at": T0})
    assert text_path.read_text() == "old text"
    assert json.loads(meta_path.read_text())["prompt_id"] == 1
    assert leftovers(tmp_path) == []


def test_a_crash_between_the_text_and_its_metadata_leaves_two_whole_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text_path, meta_path = write(tmp_path, 1, "old text")
    real_replace = os.replace

    def fail_on_metadata(src: str, dst: str) -> None:
        if str(dst).endswith(".meta.json"):
            raise KeyboardInterrupt  # even an interrupt removes the temp file
        real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", fail_on_metadata)
    with pytest.raises(KeyboardInterrupt):
        write_result(text_path, meta_path, "new text", {"prompt_id": 1, "finished_at": T0 + timedelta(hours=1)})
    assert text_path.read_text() == "new text"
    assert json.loads(meta_path.read_text()) == {"prompt_id": 1, "finished_at": "2026-11-25T12:00:00Z"}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        ({"prompt_id": 1, "bad": object()}, TypeError),
        ({"prompt_id": 1, "at": datetime(2026, 11, 25, 12, 0)}, ValueError),  # noqa: DTZ001 (naive on purpose)
        ({"prompt_id": 1, "ratio": float("nan")}, ValueError),
        ({"no_prompt_id": True}, ValueError),
    ],
)
def test_metadata_that_cannot_be_written_fails_before_any_file_is_touched(
    tmp_path: Path, metadata: dict, error: type[Exception]
) -> None:
    text_path, meta_path = paths_for(tmp_path, 1)
    claim = meta_path.read_text()
    with pytest.raises(error):
        write_result(text_path, meta_path, "text", metadata)
    assert not text_path.exists()
    assert meta_path.read_text() == claim
    assert leftovers(tmp_path) == []


def test_stale_temp_files_from_a_killed_write_are_swept_and_results_are_kept(tmp_path: Path) -> None:
    text_path, _ = write(tmp_path, 1, "kept")
    stale = tmp_path / f".{text_path.name}{results.TEMP_MARKER}abc123.tmp"
    stale.write_text("half a resu")
    assert remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and text_path.read_text() == "kept"


# --- markdown ----------------------------------------------------------------------------------------------


def test_render_markdown_puts_a_short_header_above_the_text() -> None:
    page = render_markdown("interview 2026-11-25", "[00:00:01] Speaker 1: hello\n", {
        "recordings": ["interview 2026-11-25.m4a"], "template": "transcribe", "model": "gemini-2.5-flash",
        "prompt_id": 42, "finished_at": T0, "prompt_tokens": 115_300, "audio_tokens": 115_200,
        "output_tokens": 9_876, "finish_reason": "STOP",
    })
    assert page == (
        "# interview 2026-11-25\n\n"
        "- Recording: interview 2026-11-25.m4a\n"
        "- Template: transcribe\n"
        "- Model: gemini-2.5-flash\n"
        "- Prompt: #42\n"
        "- Date: 2026-11-25 12:00 UTC\n"
        "- Tokens: 115,300 in (115,200 audio), 9,876 out\n"
        "- Finish reason: STOP\n"
        "\n---\n\n"
        "[00:00:01] Speaker 1: hello\n"
    )


def test_render_markdown_flags_an_incomplete_answer_shows_the_span_and_the_corrections() -> None:
    page = render_markdown("two\nlines", "text", {
        "recordings": ["a.wav", "b.wav"], "finish_reason": "MAX_TOKENS", "span_start_seconds": 150.0,
        "span_end_seconds": 209.0, "fixes": ["1 timestamp past the end of the recording clamped to 00:03:29"],
    })
    assert page.startswith("# two lines\n\n- Recordings: a.wav, b.wav\n")
    assert "- Span: 00:02:30-00:03:29\n" in page
    assert "- Finish reason: MAX_TOKENS (the answer may be incomplete)\n" in page
    assert "- Corrections: 1 timestamp past the end of the recording clamped to 00:03:29\n" in page
    assert "Template" not in page and "Tokens" not in page


def test_result_modules_import_no_sdk_database_or_watcher_library() -> None:
    code = ("import sys, daemon.prompts.chunking, daemon.prompts.results, daemon.prompts.subtitles, "
            "daemon.prompts.speakers; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'google', 'sqlalchemy', 'watchdog', 'db'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
