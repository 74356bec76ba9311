"""generateContent / countTokens / streamGenerateContent: request parsing, token counting,
fake transcripts and response bodies."""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import speech
from .faults import ApiError

if TYPE_CHECKING:
    from .caches import CachedContent
    from .server import Emulator

DEFAULT_SUPPORTED_MIME_TYPES = frozenset({
    "audio/wav", "audio/x-wav", "audio/mp3", "audio/mpeg", "audio/aiff", "audio/x-aiff", "audio/aac",
    "audio/ogg", "audio/flac", "audio/opus", "audio/webm", "audio/mp4", "audio/m4a", "text/plain",
})
MAX_AUDIO_SECONDS = 9.5 * 3600
MAX_INPUT_TOKENS = 1_048_576
TRANSCRIPT_STYLES = ("segments", "speech")
CACHED_CONTENT_CONFLICT = (
    "CachedContent can not be used with GenerateContent request setting system_instruction, tools or "
    "tool_config.\n\nProposed fix: move those values to CachedContent from GenerateContent request.")
_SNAKE = re.compile(r"_([a-z0-9])")


def camelize(obj: Any) -> Any:
    """Recursively turn snake_case dict keys into camelCase (the API accepts both)."""
    if isinstance(obj, dict):
        return {(_SNAKE.sub(lambda m: m.group(1).upper(), k) if isinstance(k, str) and not k.startswith("@") else k):
                camelize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [camelize(v) for v in obj]
    return obj


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def b64decode_any(data: str) -> bytes:
    """Standard or URL-safe alphabet, padding optional."""
    s = re.sub(r"\s+", "", data).replace("-", "+").replace("_", "/").rstrip("=")
    return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)


def probe_duration(path: str | os.PathLike) -> float | None:
    """Audio duration in seconds measured by ffprobe, or None when it cannot tell."""
    ffprobe = shutil.which("ffprobe") or "/usr/bin/ffprobe"
    for entry in ("format=duration", "stream=duration"):
        try:
            out = subprocess.run([ffprobe, "-v", "error", "-show_entries", entry, "-of",
                                  "default=noprint_wrappers=1:nokey=1", os.fspath(path)],
                                 capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        for line in out.split():
            try:
                value = float(line)
            except ValueError:
                continue
            if math.isfinite(value) and value >= 0:
                return round(value, 6)
    return None


def clock_stamp(seconds: int) -> str:
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:02d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


@dataclass
class PartRecord:
    kind: str                          # "text" | "file" | "inline"
    text: str | None = None
    file_name: str | None = None       # "files/abc123def456" for kind == "file"
    mime_type: str | None = None
    data: bytes | None = None          # inline bytes
    audio_seconds: float | None = None
    modality: str = "TEXT"
    tokens: int = 0
    path: Path | None = None           # bytes on disk: the uploaded file, or a cache's own copy
    digest: str | None = None          # sha256 hex of the bytes (file, inline) or of the text
    cached: bool = False               # part of an explicit cache (cachedContent)

    def prefix_key(self) -> tuple:
        """Identity for implicit caching: files by name, inline data and text by content."""
        if self.kind == "file":
            return ("file", self.file_name)
        return (self.kind, self.digest)


@dataclass
class GenerateRecord:
    method: str                        # generateContent | streamGenerateContent | countTokens
    model: str
    parts: list[PartRecord]
    generation_config: dict
    system_instruction: str | None
    audio_seconds: float
    raw: dict = field(repr=False, default_factory=dict)
    time: datetime | None = None
    response_text: str | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    cached_content: str | None = None  # "cachedContents/..." named by the request
    cached_tokens: dict[str, int] = field(default_factory=dict)   # cache hit, by modality
    cache_kind: str | None = None      # "explicit" | "implicit" when cached_tokens is set
    speech: list | None = None         # speech mode: [(part label, [speech.Segment])] analysed

    @property
    def text(self) -> str | None:
        return self.response_text

    @property
    def stream(self) -> bool:
        return self.method == "streamGenerateContent"

    @property
    def prompt_text(self) -> str:
        return "\n".join(p.text for p in self.parts if p.kind == "text" and p.text)

    @property
    def file_names(self) -> list[str]:
        return [p.file_name for p in self.parts if p.kind == "file" and p.file_name]

    def tokens_by_modality(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.system_instruction:
            out["TEXT"] = text_tokens(self.system_instruction)
        for p in self.parts:
            out[p.modality] = out.get(p.modality, 0) + p.tokens
        return out


class Generator:
    def __init__(self, emu: "Emulator") -> None:
        self.emu = emu

    # ---- request -> record ---------------------------------------------------------------
    def build_record(self, method: str, version: str, model: str, body: dict) -> GenerateRecord:
        emu = self.emu
        if emu.models is not None and model not in emu.models:
            raise ApiError(404, f"models/{model} is not found for API version {version}, or is not "
                           f"supported for {method}. Call ListModels to see the list of available "
                           "models and their supported methods.")
        body = camelize(body)
        if method == "countTokens" and "generateContentRequest" in body:
            body = body["generateContentRequest"]
        cache = self._cached_content(body, model)
        parts = self.parse_contents(body.get("contents"))
        system = self.parse_system(body.get("systemInstruction"))
        rec = GenerateRecord(method=method, model=model, parts=parts,
                             generation_config=body.get("generationConfig") or {},
                             system_instruction=system, audio_seconds=0.0, raw=body, time=emu.clock.now())
        if cache is not None:
            rec.parts = list(cache.parts) + parts
            rec.system_instruction = cache.system_instruction
            rec.cached_content, rec.cached_tokens, rec.cache_kind = cache.name, dict(cache.by_modality), "explicit"
        rec.audio_seconds = round(sum(p.audio_seconds or 0.0 for p in rec.parts), 6)
        return rec

    def _cached_content(self, body: dict, model: str) -> "CachedContent | None":
        """The explicit cache a request names (cachedContent), after the real API's checks."""
        name = body.get("cachedContent")
        if not name:
            return None
        if any(body.get(k) for k in ("systemInstruction", "tools", "toolConfig")):
            raise ApiError(400, CACHED_CONTENT_CONFLICT)
        cache = self.emu._caches.for_use(str(name))
        if cache.model != f"models/{model}":
            raise ApiError(400, f"Model used by GenerateContent request (models/{model}) and CachedContent "
                           f"({cache.model}) has to be the same.")
        return cache

    def parse_contents(self, contents: Any, required: bool = True) -> list[PartRecord]:
        """contents[] -> PartRecords (file checks, MIME checks, token counts)."""
        if isinstance(contents, dict):
            contents = [contents]
        if not contents:
            if required:
                raise ApiError(400, "* GenerateContentRequest.contents: contents is not specified\n")
            return []
        parts: list[PartRecord] = []
        for ci, content in enumerate(camelize(contents)):
            for pi, part in enumerate((content or {}).get("parts") or []):
                rec = self._part(part, f"contents[{ci}].parts[{pi}]")
                if rec is not None:
                    parts.append(rec)
        return parts

    @staticmethod
    def parse_system(si: Any) -> str | None:
        si = camelize(si)
        if isinstance(si, dict):
            return "\n".join(p.get("text", "") for p in si.get("parts") or [] if isinstance(p, dict)) or None
        if isinstance(si, str):
            return si
        return None

    def _check_mime(self, mime: str | None) -> str:
        base = (mime or "").split(";")[0].strip().lower()
        if base not in self.emu.supported_mime_types:
            raise ApiError(400, f"Unsupported MIME type: {mime}")
        return base

    def _part(self, part: dict, where: str) -> PartRecord | None:
        if not isinstance(part, dict):
            raise ApiError(400, f"Invalid JSON payload received. Invalid value at '{where}'.")
        if "text" in part:
            text = str(part["text"])
            return PartRecord("text", text=text, tokens=text_tokens(text),
                              digest=hashlib.sha256(text.encode()).hexdigest())
        if "fileData" in part:
            fd = part["fileData"] or {}
            uri = fd.get("fileUri")
            if not uri:
                raise ApiError(400, f"* GenerateContentRequest.{where}.file_data.file_uri: "
                               "file_uri is required\n")
            store = self.emu._store
            with store.lock:
                f = store.for_use(uri)
            mime = self._check_mime(fd.get("mimeType") or f.mime_type)
            rec = PartRecord("file", file_name=f.name, mime_type=mime, path=f.path, digest=f.sha256_hex)
            if mime.startswith("audio/"):
                if f.duration_seconds is None:
                    f.duration_seconds = probe_duration(f.path)
                if f.duration_seconds is None:
                    raise ApiError(400, f"Unable to process input audio of {f.name}: the file "
                                   "could not be decoded as audio.")
                self._audio(rec, f.duration_seconds)
            else:
                self._other(rec, f.size_bytes)
            return rec
        if "inlineData" in part:
            idata = part["inlineData"] or {}
            try:
                data = b64decode_any(idata.get("data") or "")
            except (binascii.Error, ValueError):
                raise ApiError(400, f"Invalid value at '{where}.inline_data.data' (TYPE_BYTES), "
                               "Base64 decoding failed.")
            mime = self._check_mime(idata.get("mimeType"))
            rec = PartRecord("inline", mime_type=mime, data=data, digest=hashlib.sha256(data).hexdigest())
            if mime.startswith("audio/"):
                fd_, tmp = tempfile.mkstemp(prefix="inline-", dir=self.emu._store.data_dir)
                try:
                    with os.fdopen(fd_, "wb") as out:
                        out.write(data)
                    seconds = probe_duration(tmp)
                finally:
                    os.unlink(tmp)
                if seconds is None:
                    raise ApiError(400, "Unable to process input audio: the inline data could not "
                                   "be decoded as audio.")
                self._audio(rec, seconds)
            else:
                self._other(rec, len(data))
            return rec
        return None  # parts the emulator does not model (function calls, thoughts...) are ignored

    def _audio(self, rec: PartRecord, seconds: float) -> None:
        rec.audio_seconds = seconds
        rec.modality = "AUDIO"
        rec.tokens = math.ceil(seconds * self.emu.token_rate - 1e-9)

    @staticmethod
    def _other(rec: PartRecord, size: int) -> None:
        major = (rec.mime_type or "text/plain").split("/")[0]
        rec.modality = "TEXT" if major == "text" else major.upper()
        rec.tokens = math.ceil(size / 4) if major == "text" else 258

    def enforce_limits(self, rec: GenerateRecord) -> None:
        emu = self.emu
        if rec.audio_seconds > emu.max_audio_seconds:
            raise ApiError(400, f"The request contains {rec.audio_seconds:g} seconds of audio, more than "
                           f"the maximum of {emu.max_audio_seconds:g} seconds "
                           f"({emu.max_audio_seconds / 3600:g} hours) per prompt.")
        total = sum(rec.tokens_by_modality().values())
        if total > emu.max_input_tokens:
            raise ApiError(400, f"The input token count ({total}) exceeds the maximum number of "
                           f"tokens allowed ({emu.max_input_tokens}).")

    # ---- record -> answer ------------------------------------------------------------------
    def default_text(self, rec: GenerateRecord) -> str:
        """The fake model's answer: with audio, a transcript (emu.transcript: "segments" invents a
        line every 30 s; "speech" follows the speech actually in the audio); without, an echo."""
        audio_parts = [p for p in rec.parts if p.modality == "AUDIO"]
        if audio_parts and self.emu.transcript == "speech":
            return self.speech_text(rec, audio_parts)
        lines: list[str] = []
        for k, p in enumerate(audio_parts, 1):
            label = p.file_name or f"inline audio {k}"
            for i in range(max(1, math.ceil((p.audio_seconds or 0) / 30))):
                lines.append(f"[{clock_stamp(i * 30)}] Speaker {i % 2 + 1}: segment {i + 1} of {label}")
        if not lines:
            lines.append(f"Emulated reply to: {rec.prompt_text[:200]}")
        return "\n".join(lines)

    def speech_text(self, rec: GenerateRecord, audio_parts: list[PartRecord]) -> str:
        """One line per speech segment of each audio part (see speech.py); analyses are cached."""
        parts = []
        for k, p in enumerate(audio_parts, 1):
            segments = speech.segments_of(p.path, p.data, p.digest, self.emu.speaker_split_hz,
                                          self.emu._store.data_dir)
            parts.append((p.file_name or f"inline audio {k}", segments))
        rec.speech = parts
        return speech.transcript(parts)

    def answer(self, rec: GenerateRecord) -> None:
        """Fill rec.response_text / finish_reason / usage (responder hook, then max tokens)."""
        if rec.method != "countTokens":
            self.emu._caches.apply_implicit(rec)
        reply = self.emu.responder(rec) if self.emu.responder else None
        finish = "STOP"
        if isinstance(reply, tuple):
            reply, finish = reply
        text = self.default_text(rec) if reply is None else str(reply)
        thoughts = self.thoughts(rec)
        budget = rec.generation_config.get("maxOutputTokens")
        if budget is not None and thoughts + text_tokens(text) > int(budget):
            # Thinking comes first and eats the same budget: the visible answer gets what is left.
            text, finish = text[: max(int(budget) - thoughts, 0) * 4], "MAX_TOKENS"
        rec.response_text, rec.finish_reason = text, finish
        rec.usage = self.usage(rec, text_tokens(text), thoughts)

    def thoughts(self, rec: GenerateRecord) -> int:
        """Thinking tokens for this request: the emulator's thinking_tokens, capped by a thinkingBudget."""
        config = rec.generation_config.get("thinkingConfig") or {}
        budget = config.get("thinkingBudget")
        if budget is not None and int(budget) == 0 and "pro" in rec.model:
            raise ApiError(400, "Budget 0 is invalid. This model only works in thinking mode.")
        if budget is None or int(budget) < 0:
            return self.emu.thinking_tokens
        return min(self.emu.thinking_tokens, int(budget))

    @staticmethod
    def prompt_details(rec: GenerateRecord) -> tuple[int, list[dict]]:
        by = rec.tokens_by_modality()
        if not by:
            by = {"TEXT": 0}
        details = [{"modality": m, "tokenCount": n} for m, n in sorted(by.items(), key=lambda kv: kv[0] != "TEXT")]
        return sum(by.values()), details

    def usage(self, rec: GenerateRecord, out_tokens: int, thoughts: int = 0) -> dict:
        prompt, details = self.prompt_details(rec)
        usage: dict[str, Any] = {"promptTokenCount": prompt}
        if out_tokens:
            usage["candidatesTokenCount"] = out_tokens
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        usage["totalTokenCount"] = prompt + out_tokens + thoughts
        if rec.cached_tokens:
            # promptTokenCount still counts the cached tokens; this says how many of them were cached
            usage["cachedContentTokenCount"] = sum(rec.cached_tokens.values())
        usage["promptTokensDetails"] = details
        if rec.cached_tokens:
            cached = sorted(rec.cached_tokens.items(), key=lambda kv: kv[0] != "TEXT")
            usage["cacheTokensDetails"] = [{"modality": m, "tokenCount": n} for m, n in cached]
        if out_tokens:
            usage["candidatesTokensDetails"] = [{"modality": "TEXT", "tokenCount": out_tokens}]
        return usage

    @staticmethod
    def response(rec: GenerateRecord, text: str, finish: str | None, usage: dict, response_id: str) -> dict:
        content: dict[str, Any] = {"role": "model"}
        if text:
            content["parts"] = [{"text": text}]
        cand: dict[str, Any] = {"content": content}
        if finish:
            cand["finishReason"] = finish
        return {"candidates": [cand], "usageMetadata": usage, "modelVersion": rec.model,
                "responseId": response_id}

    def stream_events(self, rec: GenerateRecord) -> list[dict]:
        """Split the answer into up to three SSE events; finishReason and full usage on the last."""
        text = rec.response_text or ""
        lines = text.splitlines(keepends=True) or [text]
        n = min(3, len(lines))
        if n == 1 and len(text) >= 3:
            cut = [0, len(text) // 3, 2 * len(text) // 3, len(text)]
            pieces = [text[cut[i]:cut[i + 1]] for i in range(3)]
        else:
            size = math.ceil(len(lines) / n)
            pieces = ["".join(lines[i:i + size]) for i in range(0, len(lines), size)]
        rid = new_response_id()
        prompt, details = self.prompt_details(rec)
        events = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            usage = rec.usage if last else {"promptTokenCount": prompt, "totalTokenCount": prompt,
                                            "promptTokensDetails": details}
            events.append(self.response(rec, piece, rec.finish_reason if last else None, usage, rid))
        return events


def new_response_id() -> str:
    return secrets.token_urlsafe(17)[:23]


def count_tokens_body(rec: GenerateRecord) -> dict:
    total, details = Generator.prompt_details(rec)
    return {"totalTokens": total, "promptTokensDetails": details}


__all__ = ["DEFAULT_SUPPORTED_MIME_TYPES", "GenerateRecord", "Generator", "PartRecord"]
