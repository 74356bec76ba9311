"""Files API state: fake clock, stored files, resumable upload sessions, quota and expiry.

All methods of :class:`FileStore` that touch shared state expect the caller to hold
``store.lock`` unless they say otherwise (the HTTP layer takes it around each operation).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import string
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from .faults import ApiError, not_active, permission_denied, storage_quota

if TYPE_CHECKING:
    from .server import Emulator

CHUNK_GRANULARITY = 8 * 1024 * 1024
_ID_ALPHABET = string.ascii_lowercase + string.digits
_CUSTOM_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
_URI_ID = re.compile(r"(?:^|/)files/([^/?#:]+)$")


class Clock:
    """Emulator time: real UTC time plus an adjustable offset (it keeps ticking)."""

    def __init__(self) -> None:
        self._offset = timedelta(0)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return datetime.now(timezone.utc) + self._offset

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self._offset += timedelta(seconds=seconds)
        return self.now()

    def set(self, when: datetime) -> datetime:
        if when.tzinfo is None:
            raise ValueError("Clock.set needs a timezone-aware datetime")
        with self._lock:
            self._offset = when - datetime.now(timezone.utc)
        return self.now()


def rfc3339(dt: datetime, nanos: bool = False) -> str:
    dt = dt.astimezone(timezone.utc)
    frac = f"{dt.microsecond:06d}" + ("000" if nanos else "")
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + frac + "Z"


def file_id_from(ref: str) -> str:
    """'files/abc', 'abc' or 'https://.../v1/files/abc' -> 'abc'."""
    m = _URI_ID.search(ref)
    return m.group(1) if m else ref


@dataclass
class StoredFile:
    """One uploaded file. ``path`` holds its bytes until it is deleted or expires (then the bytes
    are removed; ``deleted_at``/``delete_reason`` say when and why). Objects are live: their
    ``state`` changes as the emulator advances them."""

    name: str
    display_name: str | None
    mime_type: str
    size_bytes: int
    sha256_hex: str
    path: Path
    create_time: datetime
    update_time: datetime
    expiration_time: datetime
    state: str = "ACTIVE"
    deleted_at: datetime | None = None
    delete_reason: str | None = None      # "deleted" | "expired"
    error: dict | None = None
    api_version: str = "v1"
    duration_seconds: float | None = None  # ffprobe result, filled on first use
    polls_left: int | None = None         # files.get calls still answering PROCESSING
    processing_until: datetime | None = None
    source: str = "UPLOADED"              # "GENERATED" for a batch's responses file

    @property
    def id(self) -> str:
        return self.name.split("/", 1)[1]

    @property
    def uri(self) -> str:
        return f"https://generativelanguage.googleapis.com/{self.api_version}/files/{self.id}"

    @property
    def download_uri(self) -> str | None:
        """Only generated files can be downloaded [D]; the URI form is an assumption [A]."""
        if self.source != "GENERATED":
            return None
        return f"https://generativelanguage.googleapis.com/{self.api_version}/files/{self.id}:download?alt=media"

    @property
    def sha256_b64(self) -> str:
        return base64.b64encode(self.sha256_hex.encode()).decode()

    def to_json(self) -> dict:
        d: dict[str, Any] = {"name": self.name}
        if self.display_name:
            d["displayName"] = self.display_name
        d.update({
            "mimeType": self.mime_type,
            "sizeBytes": str(self.size_bytes),
            "createTime": rfc3339(self.create_time),
            "updateTime": rfc3339(self.update_time),
            "expirationTime": rfc3339(self.expiration_time, nanos=True),
            "sha256Hash": self.sha256_b64,
            "uri": self.uri,
            "state": self.state,
            "source": self.source,
        })
        if self.download_uri:
            d["downloadUri"] = self.download_uri
        if self.error:
            d["error"] = self.error
        return d

    def debug_json(self) -> dict:
        d = self.to_json()
        d.update({"path": str(self.path), "sha256Hex": self.sha256_hex,
                  "deletedAt": rfc3339(self.deleted_at) if self.deleted_at else None,
                  "deleteReason": self.delete_reason, "durationSeconds": self.duration_seconds})
        return d


@dataclass
class UploadSession:
    upload_id: str
    api_version: str
    mime_type: str
    declared_size: int | None
    display_name: str | None
    requested_id: str | None
    tmp_path: Path
    received: int = 0
    status: str = "active"   # active | final | cancelled
    hasher: Any = field(default_factory=hashlib.sha256)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FileStore:
    def __init__(self, emu: "Emulator") -> None:
        self.emu = emu
        self.lock = threading.RLock()
        self.data_dir = Path()
        self.by_id: dict[str, StoredFile] = {}
        self.all_files: list[StoredFile] = []
        self.sessions: dict[str, UploadSession] = {}
        self.high_water = 0

    def open(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        (data_dir / "uploads").mkdir(parents=True, exist_ok=True)
        (data_dir / "files").mkdir(parents=True, exist_ok=True)

    # ---- bookkeeping -------------------------------------------------------------------------
    def sweep(self) -> None:
        """Forget files whose expirationTime has passed on the emulator clock."""
        now = self.emu.clock.now()
        for fid, f in list(self.by_id.items()):
            if now >= f.expiration_time:
                self._remove(f, f.expiration_time, "expired")

    def _remove(self, f: StoredFile, when: datetime, reason: str) -> None:
        self.by_id.pop(f.id, None)
        f.deleted_at, f.delete_reason = when, reason
        try:
            f.path.unlink()
        except FileNotFoundError:
            pass

    def used_bytes(self) -> int:
        self.sweep()
        return sum(f.size_bytes for f in self.by_id.values())

    def _check_quota(self, size: int) -> None:
        limit = self.emu.storage_limit_bytes
        if self.used_bytes() + size > limit:
            raise storage_quota(limit)

    def _new_id(self) -> str:
        taken = {f.id for f in self.all_files}
        while True:
            fid = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
            if fid not in taken:
                return fid

    # ---- upload ------------------------------------------------------------------------------
    def start_upload(self, version: str, headers: Any, body: dict) -> UploadSession:
        meta = body.get("file") or {}
        if not isinstance(meta, dict):
            raise ApiError(400, "Invalid JSON payload received. Unknown name \"file\": expected an object.")
        size_hdr = headers.get("X-Goog-Upload-Header-Content-Length")
        size_raw = size_hdr if size_hdr is not None else meta.get("sizeBytes", meta.get("size_bytes"))
        try:
            declared = int(size_raw) if size_raw is not None else None
        except (TypeError, ValueError):
            raise ApiError(400, f"Invalid value for X-Goog-Upload-Header-Content-Length: {size_raw!r}")
        if declared is not None and declared < 0:
            raise ApiError(400, f"Invalid value for X-Goog-Upload-Header-Content-Length: {size_raw!r}")
        mime = (headers.get("X-Goog-Upload-Header-Content-Type") or meta.get("mimeType")
                or meta.get("mime_type") or "application/octet-stream")
        display = meta.get("displayName", meta.get("display_name"))
        if display is not None and len(display) > 512:
            raise ApiError(400, "* CreateFileRequest.file.display_name: display_name must be at most 512 characters.")
        requested = meta.get("name")
        req_id = None
        if requested:
            req_id = requested[len("files/"):] if requested.startswith("files/") else requested
            if not _CUSTOM_ID.match(req_id):
                raise ApiError(400, f"* CreateFileRequest.file.name: Invalid file name \"{requested}\". The "
                               "ID must be at most 40 characters of lowercase alphanumerics or dashes, "
                               "and cannot begin or end with a dash.")
        with self.lock:
            if declared is not None and declared > self.emu.max_file_bytes:
                raise ApiError(400, f"File size {declared} bytes exceeds the maximum allowed file size "
                               f"of {self.emu.max_file_bytes} bytes.")
            self._check_quota(declared or 0)
            if req_id is not None and req_id in self.by_id:
                raise ApiError(409, f"File files/{req_id} already exists.", "ALREADY_EXISTS")
            upload_id = "ABgVH8" + secrets.token_urlsafe(48)
            session = UploadSession(upload_id, version, mime, declared, display, req_id,
                                    self.data_dir / "uploads" / upload_id[-24:])
            session.tmp_path.write_bytes(b"")
            self.sessions[upload_id] = session
            self.emu._stats.uploads_started += 1
        return session

    def abort_session(self, upload_id: str) -> None:
        with self.lock:
            session = self.sessions.pop(upload_id, None)
        if session is not None:
            session.status = "final"
            session.tmp_path.unlink(missing_ok=True)

    def write_chunk(self, session: UploadSession, rfile: BinaryIO, length: int) -> bool:
        """Stream ``length`` body bytes to the session file while hashing. Caller holds session.lock.
        Returns False (and rolls the session back) when the client went away mid-body."""
        saved = session.hasher.copy()
        left = length
        with open(session.tmp_path, "ab") as out:
            while left:
                piece = rfile.read(min(left, 1 << 20))
                if not piece:
                    break
                session.hasher.update(piece)
                out.write(piece)
                left -= len(piece)
            if left:
                out.truncate(session.received)
        if left:
            session.hasher = saved
            return False
        session.received += length
        return True

    def finalize(self, session: UploadSession) -> StoredFile:
        """Turn a fully received session into a StoredFile (or raise and close the session)."""
        emu = self.emu
        with self.lock:
            session.status = "final"
            try:
                if session.declared_size is not None and session.received != session.declared_size:
                    raise ApiError(400, f"The client sent {session.received} bytes but declared "
                                   f"{session.declared_size} bytes in X-Goog-Upload-Header-Content-Length.",
                                   plain=True)
                self._check_quota(session.received)
                fid = session.requested_id or self._new_id()
                if fid in self.by_id:
                    raise ApiError(409, f"File files/{fid} already exists.", "ALREADY_EXISTS")
            except ApiError:
                session.tmp_path.unlink(missing_ok=True)
                self.sessions.pop(session.upload_id, None)
                raise
            now = emu.clock.now()
            path = self.data_dir / "files" / fid
            os.replace(session.tmp_path, path)
            f = StoredFile(name=f"files/{fid}", display_name=session.display_name,
                           mime_type=session.mime_type, size_bytes=session.received,
                           sha256_hex=session.hasher.hexdigest(), path=path, create_time=now,
                           update_time=now, expiration_time=now + timedelta(seconds=emu.ttl_seconds),
                           api_version=session.api_version)
            polls = emu.processing_polls or 0
            secs = emu.processing_seconds or 0
            if polls > 0 or secs > 0:
                f.state = "PROCESSING"
                f.polls_left = polls if polls > 0 else None
                f.processing_until = now + timedelta(seconds=secs) if secs > 0 else None
            else:
                self._finish_processing(f, now)
            self.by_id[fid] = f
            self.all_files.append(f)
            self.sessions.pop(session.upload_id, None)
            emu._stats.uploads_completed += 1
            self.high_water = max(self.high_water, self.used_bytes())
            return f

    # ---- state machine -----------------------------------------------------------------------
    def _finish_processing(self, f: StoredFile, now: datetime) -> None:
        hook: bool | str | Callable[[StoredFile], str | None] = self.emu.fail_processing
        if callable(hook):
            msg = hook(f)
        elif hook is True:
            msg = "Failed to process the uploaded file."
        else:
            msg = hook or None
        if msg:
            f.state, f.error = "FAILED", {"code": 3, "message": str(msg)}
        else:
            f.state = "ACTIVE"
        f.update_time = now

    def refresh(self, f: StoredFile, polled: bool) -> None:
        """Advance a PROCESSING file: by elapsed emulator time, and (polled=True, i.e. files.get)
        by counting polls. Whichever criterion is configured and met first wins."""
        if f.state != "PROCESSING":
            return
        now = self.emu.clock.now()
        done = f.processing_until is not None and now >= f.processing_until
        if not done and polled and f.polls_left is not None:
            if f.polls_left > 0:
                f.polls_left -= 1
            else:
                done = True
        if done:
            self._finish_processing(f, now)

    # ---- lookups -----------------------------------------------------------------------------
    def lookup(self, ref: str) -> StoredFile:
        self.sweep()
        fid = file_id_from(ref)
        f = self.by_id.get(fid)
        if f is None:
            raise permission_denied(fid)
        return f

    def get(self, fid: str) -> StoredFile:
        f = self.lookup(fid)
        self.refresh(f, polled=True)
        return f

    def for_use(self, ref: str) -> StoredFile:
        f = self.lookup(ref)
        self.refresh(f, polled=False)
        if f.state != "ACTIVE":
            raise not_active(f.id)
        return f

    def add_generated(self, fid: str, data: bytes, mime: str, api_version: str) -> StoredFile:
        """Store a file the service wrote itself (a batch's responses file): ACTIVE at once,
        source GENERATED, downloadable, counted in the project's storage like any file."""
        now = self.emu.clock.now()
        path = self.data_dir / "files" / fid
        path.write_bytes(data)
        f = StoredFile(name=f"files/{fid}", display_name=None, mime_type=mime, size_bytes=len(data),
                       sha256_hex=hashlib.sha256(data).hexdigest(), path=path, create_time=now,
                       update_time=now, expiration_time=now + timedelta(seconds=self.emu.ttl_seconds),
                       api_version=api_version, source="GENERATED")
        self.by_id[fid] = f
        self.all_files.append(f)
        self.high_water = max(self.high_water, self.used_bytes())
        return f

    def download(self, fid: str) -> StoredFile:
        f = self.lookup(fid)
        if f.source != "GENERATED":
            raise ApiError(400, "Only generated files can be downloaded; files created by upload cannot "
                           "be downloaded.")   # [A] wording; the SDK refuses such File objects itself
        return f

    def delete(self, fid: str) -> StoredFile:
        f = self.lookup(fid)
        self._remove(f, self.emu.clock.now(), "deleted")
        self.emu._stats.deletes += 1
        return f

    def list(self, page_size: int, token: str | None) -> dict:
        self.sweep()
        if page_size <= 0:
            page_size = 10
        page_size = min(page_size, 100)
        ordered = sorted(self.by_id.values(), key=lambda f: (f.create_time, f.name), reverse=True)
        if token:
            try:
                when, name = json.loads(base64.urlsafe_b64decode(token.encode()))
                after = (datetime.fromisoformat(when), name)
            except Exception:
                raise ApiError(400, "Invalid page token.")
            ordered = [f for f in ordered if (f.create_time, f.name) < after]
        page = ordered[:page_size]
        for f in page:
            self.refresh(f, polled=False)
        out: dict[str, Any] = {}
        if page:
            out["files"] = [f.to_json() for f in page]
        if len(ordered) > page_size:
            last = page[-1]
            out["nextPageToken"] = base64.urlsafe_b64encode(
                json.dumps([last.create_time.isoformat(), last.name]).encode()).decode()
        return out
