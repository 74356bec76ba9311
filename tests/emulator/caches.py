"""Context caching: explicit caches (cachedContents) and implicit prefix caching.

Sources for the behaviour modelled here (see also /work/shared/gemini-api.md):

* Minimum cache size per model: https://ai.google.dev/gemini-api/docs/caching ("The minimum input
  token count for context caching": Gemini 2.5 Flash 1024, Gemini 2.5 Pro 4096; some localised
  copies of the page say 2,048 for both). A forum report (discuss.ai.google.dev/t/178942) quotes
  the API's own refusal for caches.create: ``400 INVALID_ARGUMENT: Cached content is too small.
  total_token_count=1006, min_total_token_count=1024`` (gemini-2.5-flash) and 2,048 for
  gemini-2.5-flash-lite. The emulator takes the minimum from ``Emulator.cache_min_tokens``.
* The resource JSON and usage: cookbook quickstarts/rest/Caching_REST.ipynb (real output):
  ``name: cachedContents/<12 chars>``, ``model: models/...``, ``displayName: ""`` when unset,
  ``expireTime`` with 9 fractional digits, ``usageMetadata.totalTokenCount``; a generateContent
  answer's ``promptTokenCount`` includes the cached tokens and ``cachedContentTokenCount`` says how
  many; delete answers ``{}``; the default TTL is one hour; PATCH with ``{"ttl": "300s"}`` moves
  ``expireTime`` and ``updateTime``.
* Errors quoted verbatim in public code: a missing or expired cache answers 403
  ``CachedContent not found (or permission denied)``; a request that sets systemInstruction,
  tools or toolConfig together with cachedContent answers 400 ``CachedContent can not be used with
  GenerateContent request setting system_instruction, tools or tool_config.`` and a model
  mismatch 400 ``Model used by GenerateContent request (models/A) and CachedContent (models/B) has
  to be the same.``
* Implicit caching (same docs page): on by default for Gemini 2.5 and newer, "put large and common
  contents at the beginning of your prompt", "send requests with similar prefix in a short amount
  of time"; hits are reported in ``usage_metadata`` (cachedContentTokenCount). The emulator models
  a hit as: the same model, and the leading parts of the request (system instruction, then parts in
  order; text by content, files by URI, inline data by bytes) equal to those of an earlier
  successful request within ``implicit_cache_seconds`` on the emulator clock, worth at least the
  model's minimum. The exact real policy (token-level prefixes, eviction) is not public [A].
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import string
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .faults import ApiError
from .files import rfc3339

if TYPE_CHECKING:
    from .generate import GenerateRecord, PartRecord
    from .server import Emulator

DEFAULT_CACHE_MIN_TOKENS = {"flash-lite": 2048, "flash": 1024, "pro": 4096}
DEFAULT_TTL_SECONDS = 3600.0
_ID_ALPHABET = string.ascii_lowercase + string.digits
_DURATION = re.compile(r"^\s*(\d+(?:\.\d{1,9})?)s\s*$")
_VERSION = re.compile(r"gemini-(\d+)(?:\.(\d+))?")


def cache_not_found() -> ApiError:
    return ApiError(403, "CachedContent not found (or permission denied)", "PERMISSION_DENIED")


def min_cache_tokens(table: dict[str, int], model: str) -> int:
    """The minimum for a model: the longest key of ``table`` contained in the model id wins
    ("flash-lite" before "flash"); unknown families use the smallest minimum."""
    for key in sorted(table, key=len, reverse=True):
        if key in model:
            return table[key]
    return min(table.values()) if table else 0


def implicit_caching_applies(model: str) -> bool:
    """Implicit caching is documented for Gemini 2.5 and newer; other names (tests' own model ids)
    are treated as new models."""
    m = _VERSION.search(model)
    if not m:
        return True
    return (int(m.group(1)), int(m.group(2) or 0)) >= (2, 5)


def parse_ttl(value: Any) -> float:
    m = _DURATION.match(str(value))
    if not m:
        raise ApiError(400, f"Invalid value at 'cached_content.ttl' (type.googleapis.com/google.protobuf."
                       f"Duration), \"{value}\"")
    return float(m.group(1))


def parse_time(value: Any) -> datetime:
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"Invalid value at 'cached_content.expire_time' (type.googleapis.com/google."
                       f"protobuf.Timestamp), \"{value}\"")
    if when.tzinfo is None:
        raise ApiError(400, f"Invalid value at 'cached_content.expire_time', \"{value}\"")
    return when


@dataclass
class CachedContent:
    """One explicit cache. ``parts`` are the cached request parts (file parts point at a hard link
    kept in the emulator's data dir, so the cache outlives the uploaded file, like the real one);
    ``tokens`` is usageMetadata.totalTokenCount; ``by_modality`` splits it for cacheTokensDetails."""

    id: str
    model: str                       # "models/gemini-2.5-flash"
    display_name: str
    create_time: datetime
    update_time: datetime
    expire_time: datetime
    parts: list["PartRecord"]
    system_instruction: str | None
    tokens: int
    by_modality: dict[str, int]
    uses: int = 0
    deleted_at: datetime | None = None
    delete_reason: str | None = None  # "deleted" | "expired"

    @property
    def name(self) -> str:
        return f"cachedContents/{self.id}"

    def to_json(self) -> dict:
        return {"name": self.name, "model": self.model, "createTime": rfc3339(self.create_time),
                "updateTime": rfc3339(self.update_time), "expireTime": rfc3339(self.expire_time, nanos=True),
                "displayName": self.display_name, "usageMetadata": {"totalTokenCount": self.tokens}}


@dataclass
class _PrefixEntry:
    time: datetime
    model: str
    keys: tuple
    tokens: tuple
    modalities: tuple


@dataclass
class CacheStore:
    """Explicit caches and the implicit-prefix memory. Methods take ``self.lock`` themselves."""

    emu: "Emulator"
    lock: threading.RLock = field(default_factory=threading.RLock)
    by_id: dict[str, CachedContent] = field(default_factory=dict)
    all_caches: list[CachedContent] = field(default_factory=list)
    recent: list[_PrefixEntry] = field(default_factory=list)

    # ---- explicit caches -------------------------------------------------------------------
    def sweep(self) -> None:
        now = self.emu.clock.now()
        for cid, c in list(self.by_id.items()):
            if now >= c.expire_time:
                self._remove(c, c.expire_time, "expired")

    def _remove(self, c: CachedContent, when: datetime, reason: str) -> None:
        self.by_id.pop(c.id, None)
        c.deleted_at, c.delete_reason = when, reason
        for p in c.parts:
            if p.path is not None:
                Path(p.path).unlink(missing_ok=True)

    def create(self, body: dict, version: str = "v1beta") -> CachedContent:
        """caches.create: parse and count like generateContent, enforce the minimum size."""
        emu = self.emu
        model = str(body.get("model") or "")
        if not model:
            raise ApiError(400, "* CreateCachedContentRequest.cached_content.model: model is required\n")
        model_id = model.split("/", 1)[1] if model.startswith("models/") else model
        if emu.models is not None and model_id not in emu.models:
            raise ApiError(404, f"models/{model_id} is not found for API version {version}, or is not "
                           "supported for createCachedContent.")
        gen = emu._generator
        parts = gen.parse_contents(body.get("contents"), required=False)
        system = gen.parse_system(body.get("systemInstruction"))
        by: dict[str, int] = {}
        if system:
            from .generate import text_tokens
            by["TEXT"] = text_tokens(system)
        for p in parts:
            by[p.modality] = by.get(p.modality, 0) + p.tokens
        total = sum(by.values())
        minimum = min_cache_tokens(emu.cache_min_tokens, model_id)
        if total < minimum:
            raise ApiError(400, f"Cached content is too small. total_token_count={total}, "
                           f"min_total_token_count={minimum}")
        now = emu.clock.now()
        expire = self._expiry(body, now) or now + timedelta(seconds=DEFAULT_TTL_SECONDS)
        with self.lock:
            self.sweep()
            cid = self._new_id()
            kept = [self._keep(cid, i, p) for i, p in enumerate(parts)]
            c = CachedContent(cid, f"models/{model_id}", str(body.get("displayName") or ""), now, now, expire,
                              kept, system, total, by)
            self.by_id[cid] = c
            self.all_caches.append(c)
            return c

    def _keep(self, cid: str, index: int, part: "PartRecord") -> "PartRecord":
        """A cached part keeps its own copy of the bytes (a hard link when possible)."""
        kept = replace(part, cached=True)
        if part.path is not None:
            folder = self.emu._store.data_dir / "caches"
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{cid}-{index}"
            try:
                os.link(part.path, target)
            except OSError:
                shutil.copyfile(part.path, target)
            kept.path = target
        return kept

    def _expiry(self, body: dict, now: datetime) -> datetime | None:
        if body.get("ttl") is not None:
            return now + timedelta(seconds=parse_ttl(body["ttl"]))
        if body.get("expireTime") is not None:
            return parse_time(body["expireTime"])
        return None

    def _new_id(self) -> str:
        taken = {c.id for c in self.all_caches}
        while True:
            cid = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
            if cid not in taken:
                return cid

    def lookup(self, ref: str) -> CachedContent:
        with self.lock:
            self.sweep()
            cid = ref.rsplit("cachedContents/", 1)[-1]
            c = self.by_id.get(cid)
            if c is None:
                raise cache_not_found()
            return c

    def for_use(self, ref: str) -> CachedContent:
        c = self.lookup(ref)
        with self.lock:
            c.uses += 1
        return c

    def update(self, ref: str, body: dict) -> CachedContent:
        c = self.lookup(ref)
        now = self.emu.clock.now()
        expire = self._expiry(body, now)
        with self.lock:
            if expire is not None:
                c.expire_time = expire
            c.update_time = now
            return c

    def delete(self, ref: str) -> None:
        c = self.lookup(ref)
        with self.lock:
            self._remove(c, self.emu.clock.now(), "deleted")

    def list(self, page_size: int, token: str | None) -> dict:
        with self.lock:
            self.sweep()
            page_size = min(page_size if page_size > 0 else 10, 1000)
            ordered = sorted(self.by_id.values(), key=lambda c: (c.create_time, c.id), reverse=True)
            start = _decode_token(token)
            page = ordered[start:start + page_size]
            out: dict[str, Any] = {}
            if page:
                out["cachedContents"] = [c.to_json() for c in page]
            if start + page_size < len(ordered):
                out["nextPageToken"] = base64.urlsafe_b64encode(
                    json.dumps(start + page_size).encode()).decode()
            return out

    # ---- implicit caching ------------------------------------------------------------------
    def apply_implicit(self, rec: "GenerateRecord") -> None:
        """Report a hit when the request's leading parts repeat an earlier request's (see the module
        docstring), then remember this request's prefix for later ones."""
        emu = self.emu
        window = emu.implicit_cache_seconds
        if not window or rec.cached_tokens or not implicit_caching_applies(rec.model):
            return
        keys, tokens, modalities = prefix_elements(rec)
        now = emu.clock.now()
        with self.lock:
            self.recent = [e for e in self.recent if (now - e.time).total_seconds() <= window][-1000:]
            shared = max((_shared(e, rec.model, keys) for e in self.recent), default=0)
            if shared and sum(tokens[:shared]) >= min_cache_tokens(emu.cache_min_tokens, rec.model):
                by: dict[str, int] = {}
                for m, n in zip(modalities[:shared], tokens[:shared]):
                    by[m] = by.get(m, 0) + n
                rec.cached_tokens, rec.cache_kind = by, "implicit"
            self.recent.append(_PrefixEntry(now, rec.model, keys, tokens, modalities))


def prefix_elements(rec: "GenerateRecord") -> tuple[tuple, tuple, tuple]:
    """The request as the model sees it, in order: system instruction, then each part.
    Identity: text by content hash, files by name, inline data by bytes hash."""
    from .generate import text_tokens
    keys: list = []
    tokens: list[int] = []
    modalities: list[str] = []
    if rec.system_instruction:
        keys.append(("system", hashlib.sha256(rec.system_instruction.encode()).hexdigest()))
        tokens.append(text_tokens(rec.system_instruction))
        modalities.append("TEXT")
    for p in rec.parts:
        keys.append(p.prefix_key())
        tokens.append(p.tokens)
        modalities.append(p.modality)
    return tuple(keys), tuple(tokens), tuple(modalities)


def _shared(entry: _PrefixEntry, model: str, keys: tuple) -> int:
    if entry.model != model:
        return 0
    n = 0
    for a, b in zip(entry.keys, keys):
        if a != b:
            break
        n += 1
    return n


def _decode_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        return int(json.loads(base64.urlsafe_b64decode(token.encode())))
    except Exception:
        raise ApiError(400, "Invalid page token.")


__all__ = ["CacheStore", "CachedContent", "DEFAULT_CACHE_MIN_TOKENS", "cache_not_found",
           "implicit_caching_applies", "min_cache_tokens"]
