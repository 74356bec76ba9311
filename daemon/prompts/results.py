"""Prompt results as files: one name per result that never clobbers another's, and atomic writes.

Owns the results folder: the naming rule, the claim that reserves a name for one prompt, the atomic write of a
result and its metadata (temp file, fsync, os.replace, mode 0640) and the small markdown header. Must not import
google.genai, sqlalchemy or watchdog.

Naming rule. A result is "<recordings>.<template><ext>" with its metadata in "<same>.meta.json"; the metadata
names the prompt that owns the pair ("prompt_id"). A prompt takes the first of these names it already owns
(a re-run overwrites only its own files) or else the first that is free, where free means neither file exists:
  1. "interview.transcribe.md"            the plain name, for the first prompt to ask for it
  2. "interview.transcribe.42.md"         the prompt id appended, unique by construction
  3. "interview.transcribe.42.2.md", ...  only if a strange template name made (2) collide too
A name is claimed by creating its metadata file with O_EXCL, so two workers can never pick the same one. A file
without readable metadata (the user's own, or a damaged one) is never ours to overwrite.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from daemon import atomic
from daemon.prompts.chunking import format_clock

EXTENSIONS = {"markdown": ".md", "text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}
META_SUFFIX = ".meta.json"
FILE_MODE = 0o640  # operators in the daemon's group read results; nobody else does
TEMP_MARKER = ".partial-"  # hidden temp files: the watcher ignores dotfiles, remove_stale_temps sweeps them
MAX_NAME_BYTES = 150  # the recordings part; with template, id and suffix the name stays under 255 bytes
MAX_TEMPLATE_BYTES = 60
MAX_CANDIDATES = 20

# Path separators and the characters SMB/Windows shares refuse (results folders live on such shares too).
_UNSAFE = frozenset('/\\<>:"|?*')
# Joiners that some scripts (Persian, Indic) need; every other format character (bidi overrides, zero-width
# spaces, soft hyphens) only hides what a name really says.
_KEPT_FORMAT = frozenset("\u200c\u200d")
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,5}$")
_FREE = object()


def sanitize_name(name: str, *, max_bytes: int = MAX_NAME_BYTES, fallback: str = "recording") -> str:
    """A safe file-name part: no separators, controls or newlines, no leading "-" or ".", unicode kept (NFC)."""
    chars = []
    for ch in unicodedata.normalize("NFC", name):
        category = unicodedata.category(ch)
        if category in ("Cc", "Zs", "Zl", "Zp"):
            chars.append(" ")  # tabs, newlines and odd spaces become one plain space
        elif category == "Cf" and ch not in _KEPT_FORMAT:
            continue
        elif category == "Cs" or ch in _UNSAFE:
            chars.append("_")  # lone surrogates (undecodable bytes in a source name) cannot be written as UTF-8
        else:
            chars.append(ch)
    cleaned = " ".join("".join(chars).split())
    # Leading "-" reads as an option to shell tools, leading "." hides the file; trailing dots and spaces
    # vanish on SMB shares.
    cleaned = _cap_bytes(cleaned.lstrip("-. "), max_bytes).rstrip(". ")
    return cleaned or fallback


def _cap_bytes(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")  # never cut a character in half


def result_stem(recording_names: list[str], template: str | None) -> str:
    """ "interview 2026-11-25.transcribe" for one recording; "a + b + 3 more.summarize" for many."""
    names = [_EXTENSION.sub("", name) or name for name in recording_names] or ["recording"]
    if len(names) > 3:
        names = [*names[:2], f"{len(names) - 2} more"]
    recordings = sanitize_name(" + ".join(names))
    label = sanitize_name(template or "prompt", max_bytes=MAX_TEMPLATE_BYTES, fallback="prompt")
    return f"{recordings}.{label}"


def candidate_stems(stem: str, prompt_id: int) -> list[str]:
    """The names a prompt may take, in order of preference (see the module docstring)."""
    return [stem, f"{stem}.{prompt_id}"] + [f"{stem}.{prompt_id}.{n}" for n in range(2, MAX_CANDIDATES)]


def result_paths(
    results_dir: Path, *, recording_names: list[str], template: str | None, prompt_id: int, output_format: str
) -> tuple[Path, Path]:
    """The (text, metadata) paths for a prompt's result, claimed for it; see the naming rule above."""
    if output_format not in EXTENSIONS:
        raise ValueError(f"output_format must be one of {', '.join(EXTENSIONS)}, got {output_format!r}")
    results_dir.mkdir(parents=True, exist_ok=True)
    extension = EXTENSIONS[output_format]
    slots = [(results_dir / f"{name}{extension}", results_dir / f"{name}{META_SUFFIX}")
             for name in candidate_stems(result_stem(recording_names, template), prompt_id)]
    for text_path, meta_path in slots:
        if _owner(text_path, meta_path) == prompt_id:
            return text_path, meta_path
    for text_path, meta_path in slots:
        if _owner(text_path, meta_path) is _FREE and _claim(text_path, meta_path, prompt_id):
            return text_path, meta_path
    raise FileExistsError(f"no free result name for prompt {prompt_id} in {results_dir} after {len(slots)} tries")


def _owner(text_path: Path, meta_path: Path) -> object:
    """The prompt id that owns a name, _FREE if neither file exists, or None if it belongs to someone else."""
    if not os.path.lexists(text_path) and not os.path.lexists(meta_path):
        return _FREE
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    owner = data.get("prompt_id") if isinstance(data, dict) else None
    return owner if isinstance(owner, int) and not isinstance(owner, bool) else None


def _claim(text_path: Path, meta_path: Path, prompt_id: int) -> bool:
    """Reserve a free name by creating its metadata file exclusively; False if another worker got there first."""
    if os.path.lexists(text_path):
        return False
    try:
        descriptor = os.open(meta_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), FILE_MODE)  # O_CREAT's mode is narrowed by the umask
        json.dump({"prompt_id": prompt_id, "state": "pending"}, handle)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())  # a claim that vanishes in a power cut could be claimed twice
    return True


def write_result(text_path: Path, meta_path: Path, text: str, metadata: Mapping[str, Any]) -> None:
    """Write the result and then its metadata, each atomically: a reader sees the old file or the whole new one.

    Both are encoded before anything touches the disk, so unserializable metadata or a naive datetime fails
    with no file changed. The metadata is written last because it is the record that the result is complete,
    and it must carry "prompt_id": the naming rule reads it to know whose file this is.
    """
    if not isinstance(metadata.get("prompt_id"), int):
        raise ValueError("metadata must hold the integer prompt_id that owns this result")
    meta_bytes = (json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False,
                             default=_json_value) + "\n").encode("utf-8")
    text_bytes = text.encode("utf-8")
    atomic.write(text_path, text_bytes, marker=TEMP_MARKER, mode=FILE_MODE)
    atomic.write(meta_path, meta_bytes, marker=TEMP_MARKER, mode=FILE_MODE)


def write_text(path: Path, text: str) -> None:
    """A file beside a result (its subtitles), written atomically like the result itself."""
    atomic.write(path, text.encode("utf-8"), marker=TEMP_MARKER, mode=FILE_MODE)


def _json_value(value: Any) -> Any:
    """JSON for what metadata holds beyond plain types: times as ISO 8601 UTC ("...Z"), paths as strings."""
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r} in result metadata: pass a tz-aware UTC time")
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"result metadata holds a {type(value).__name__} ({value!r}), which JSON cannot store")


def remove_stale_temps(results_dir: Path) -> list[Path]:
    """Delete temp files left by a write that was killed (kill -9, power cut); call at start-up."""
    return atomic.sweep(results_dir, TEMP_MARKER)


def render_markdown(title: str, text: str, metadata: Mapping[str, Any]) -> str:
    """A markdown file: the title, a short list of what produced the result, a rule, then the text.

    Reads these metadata keys when present (the prompts table's column names): recordings, template, model,
    prompt_id, finished_at (else created_at), span_start_seconds/span_end_seconds, prompt_tokens, audio_tokens,
    output_tokens, cached_tokens, cost_usd, trimmed_seconds, finish_reason, fixes, warnings.
    """
    header = [f"# {_one_line(title) or 'Result'}", ""]
    header += [f"- {label}: {value}" for label, value in _header_fields(metadata) if value]
    return "\n".join(header) + "\n\n---\n\n" + text.strip("\n") + "\n"


def _header_fields(metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    recordings = metadata.get("recordings") or []
    names = [recordings] if isinstance(recordings, str) else list(recordings)
    finish = metadata.get("finish_reason")
    return [
        ("Recording" if len(names) == 1 else "Recordings", ", ".join(_one_line(str(name)) for name in names)),
        ("Template", _one_line(str(metadata.get("template") or ""))),
        ("Model", _one_line(str(metadata.get("model") or ""))),
        ("Prompt", f"#{metadata['prompt_id']}" if metadata.get("prompt_id") is not None else ""),
        ("Date", _date(metadata.get("finished_at") or metadata.get("created_at"))),
        ("Span", _span(metadata.get("span_start_seconds"), metadata.get("span_end_seconds"))),
        ("Tokens", _tokens(metadata)),
        ("Cost", f"${metadata['cost_usd']:.4f}" if metadata.get("cost_usd") is not None else ""),
        ("Trimmed", f"{metadata['trimmed_seconds']:.0f} s of silence not sent (times are the recording's own)"
         if metadata.get("trimmed_seconds") else ""),
        ("Finish reason", f"{finish}" + ("" if finish in (None, "STOP") else " (the answer may be incomplete)")
         if finish else ""),
        ("Corrections", "; ".join(_one_line(str(fix)) for fix in metadata.get("fixes") or [])),
        ("Warning", "; ".join(_one_line(str(warning)) for warning in metadata.get("warnings") or [])),
    ]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _date(value: Any) -> str:
    if isinstance(value, datetime):
        _json_value(value)  # refuses a naive time, as the metadata file does
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return _one_line(str(value)) if value else ""


def _span(start: float | None, end: float | None) -> str:
    if start is None and end is None:
        return ""
    return f"{format_clock(start or 0.0)}-{format_clock(end) if end is not None else 'end'}"


def _tokens(metadata: Mapping[str, Any]) -> str:
    prompt, audio, output = (metadata.get(key) for key in ("prompt_tokens", "audio_tokens", "output_tokens"))
    parts = []
    if prompt is not None:
        cached = metadata.get("cached_tokens")
        parts.append(f"{prompt:,} in" + (f" ({audio:,} audio)" if audio is not None else "")
                     + (f", {cached:,} cached" if cached else ""))
    if output is not None:
        thinking = metadata.get("thinking_tokens")
        parts.append(f"{output:,} out" + (f" (+{thinking:,} thinking)" if thinking else ""))
    return ", ".join(parts)
