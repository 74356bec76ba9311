"""The :class:`Emulator` object: configuration, lifecycle (start/stop/offline), faults and
the introspection API used by tests. Wire handling lives in handler.py, Files API state in
files.py, generateContent in generate.py."""

from __future__ import annotations

import bisect
import shutil
import tempfile
import threading
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from .batches import Batch, BatchStore
from .caches import DEFAULT_CACHE_MIN_TOKENS, CachedContent, CacheStore
from .faults import Fault, route_matches
from .files import Clock, FileStore, StoredFile, file_id_from, rfc3339
from .generate import (
    DEFAULT_SUPPORTED_MIME_TYPES,
    MAX_AUDIO_SECONDS,
    MAX_INPUT_TOKENS,
    TRANSCRIPT_STYLES,
    GenerateRecord,
    Generator,
)
from .handler import Server
from .speech import DEFAULT_SPLIT_HZ

ChunkLog = namedtuple("ChunkLog", "upload_id offset length command")
_RequestLogBase = namedtuple("_RequestLogBase", "method path status")


class RequestLog(_RequestLogBase):
    """(method, path-with-query, status) -- status None when the connection was dropped -- plus
    attributes that are not tuple fields, so code that unpacks three values keeps working:
    ``time`` (time.time() when the request arrived), ``model`` (model routes: the model id in the
    path) and ``route`` (the fault route name: generate, stream, files_get, batches_get, ...)."""

    time: float | None = None            # class defaults: namedtuple's _make/_replace skip __new__
    model: str | None = None
    route: str | None = None

    def __new__(cls, method: str, path: str, status: int | None, time: float | None = None,
                model: str | None = None, route: str | None = None) -> "RequestLog":
        self = super().__new__(cls, method, path, status)
        self.time, self.model, self.route = time, model, route
        return self

    def _asdict(self) -> dict:
        return {"method": self.method, "path": self.path, "status": self.status, "time": self.time,
                "model": self.model, "route": self.route}


@dataclass
class Stats:
    uploads_started: int = 0
    uploads_completed: int = 0
    deletes: int = 0
    generate_calls: int = 0
    count_tokens_calls: int = 0
    batches_created: int = 0
    used_bytes: int = 0
    high_water_bytes: int = 0
    faults_injected: int = 0
    requests: list = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["requests"] = [list(r) + [getattr(r, "time", None), getattr(r, "model", None)] for r in self.requests]
        return d


class Emulator:
    """A loopback Gemini API (Files API, generateContent, Batch API, context caching) for the
    google-genai SDK.

    Use::

        with Emulator(api_key="test-key") as emu:          # or emu.start() ... emu.stop()
            client = genai.Client(api_key="test-key",
                                  http_options=types.HttpOptions(base_url=emu.base_url))

    Configuration (keyword arguments; each is also a plain attribute that may be changed while
    the emulator runs):
      api_key               required x-goog-api-key (None: any non-empty key). Wrong key -> 400
                            API_KEY_INVALID; missing key -> 403. Upload chunks are never checked.
      storage_limit_bytes   project quota. used + declared > limit -> 429 file_storage_bytes at upload
                            start, checked again (used + received) at finalize. In-flight uploads
                            reserve nothing, so two concurrent uploads can both start and the second
                            to finalize gets the 429 (with X-Goog-Upload-Status: final).
      max_file_bytes        declared size above it -> 400 INVALID_ARGUMENT at upload start.
      ttl_seconds           expirationTime = createTime + ttl on ``emu.clock``; afterwards the file is
                            gone (403 on get/delete/use, absent from list, bytes removed).
      processing_polls      files.get calls that still answer PROCESSING (0/None: ACTIVE at finalize;
                            the finalize answer says PROCESSING when > 0). files.list and
                            generateContent do not count as polls.
      processing_seconds    alternatively/also: PROCESSING until createTime + N s on the emulator
                            clock (whichever configured criterion is met first).
      fail_processing       False | True | "message" | callable(StoredFile) -> str | None: when it
                            yields a message the file ends FAILED with error {code: 3, message}.
      token_rate            audio tokens per second: ceil(ffprobe duration * rate) per audio part.
      inline_limit_bytes    cap on the whole generateContent/countTokens (and batchGenerateContent,
                            cachedContents.create) request body -> 400 "Request payload size exceeds
                            the limit: N bytes."
      supported_mime_types  MIME types generateContent accepts (else 400 "Unsupported MIME type: X").
                            Uploads accept any type, like the real API.
      max_audio_seconds     total audio per prompt (9.5 h) -> 400 INVALID_ARGUMENT.
      max_input_tokens      1,048,576 -> 400 "The input token count (N) exceeds ...". Note that at
                            32 tokens/s this is reached after ~9.1 h, before the 9.5 h audio cap.
      models                None (any model) or the set of model ids that exist (others -> 404).
      thinking_tokens       tokens a thinking model spends before it answers when the request sets
                            no thinkingConfig.thinkingBudget (or -1, dynamic); a budget caps them.
                            They count against maxOutputTokens, as on the real API (0: no thinking).
                            A budget of 0 on a "pro" model -> 400, as for gemini-2.5-pro.
      responder             callable(GenerateRecord) -> str | (str, finishReason) | None to choose
                            the model text (None -> the default fake transcript). It may raise
                            ApiError to answer an error. maxOutputTokens truncation still applies.
                            Batch requests call it too (rec.method == "batchGenerateContent").
      transcript            the default answer to audio: "segments" (a line every 30 s of each audio
                            part, "[MM:SS] Speaker 1|2: segment i of <part>", the historical default)
                            or "speech": one line per stretch of real speech, "[HH:MM:SS] Speaker N:
                            <pseudo-words>", speakers numbered by first appearance in the request,
                            "[no speech]" for a part without speech (see speech.py; analyses are
                            cached by content hash, an hour of audio takes a few seconds once).
      speaker_split_hz      speech mode: segments whose median F0 is below this are voice 'low',
                            others 'high' (the stable cluster ids of speech.analyse_audio).
      implicit_cache_seconds  window for implicit caching on the emulator clock (None/0: off). A
                            request whose leading parts (system instruction, then parts in order;
                            text by content, files by URI, inline data by bytes) repeat an earlier
                            successful request's for the same Gemini >= 2.5 model reports
                            cachedContentTokenCount/cacheTokensDetails for the shared parts when they
                            reach the model's minimum (cache_min_tokens).
      cache_min_tokens      {model-id substring: minimum tokens} for explicit and implicit caches;
                            the longest matching key wins (default flash-lite 2048, flash 1024,
                            pro 4096). caches.create below it -> 400 "Cached content is too small.".
                            Explicit caches live ttl (default 1 h) on the emulator clock; then
                            get/use -> 403 "CachedContent not found (or permission denied)".
      batch_polls           batches.get calls that still answer PENDING (the first) / RUNNING (the
                            rest) before the batch runs and the next get answers SUCCEEDED (None:
                            never by polls; 0: the first get). list/cancel do not count.
      batch_seconds         alternatively/also: the batch runs once this many seconds have passed on
                            the emulator clock (RUNNING from half-way); whichever comes first.
      batch_expire_seconds  a batch still PENDING/RUNNING this long after creation ends EXPIRED (48 h).
      batch_shuffle_seed    None: inlined responses in request order; an int: a seeded shuffle (the
                            real service has been seen to reorder them, python-genai #1909).
      batch_echo_metadata   inlined responses repeat each request's metadata (False: leave it out).
      data_dir              where uploaded bytes are kept (default: a temp dir, removed by stop()).
      host, port            bind address; port 0 picks a free port (kept across set_offline).
      verbose               log every request to stderr.

    Controls: ``clock`` (advance/set), ``add_fault``/``clear_faults``, ``set_offline``,
    ``finish_batches()`` (run every unfinished batch now -> SUCCEEDED; returns their names),
    ``fail_batch(name, message)`` (-> FAILED, no output), ``expire_batch(name)`` (-> EXPIRED),
    ``release_holds()`` (let every request blocked by a "hold" fault answer; returns how many).
    Out of process: POST /_emulator/batches {"action": "finish"} or {"action": "fail"|"expire",
    "name": ...}, POST /_emulator/holds.

    Introspection: ``files``, ``all_files``, ``file(ref)``, ``stats`` (snapshot; ``generate_calls``
    and ``count_tokens_calls`` count every request that passed auth and faults, including 4xx
    answers; ``requests`` is a list of RequestLog (method, path-with-query, status) with status None
    when the connection was dropped, plus attributes ``time`` (arrival, time.time()), ``model``
    (model routes) and ``route``; control endpoints are not logged), ``requests_in_window(seconds,
    route="generate", model=None)`` (the most matching requests that arrived within any window of
    that many seconds), ``generate_requests`` (successful generateContent and streamGenerateContent
    calls; batch requests are in ``batches``), ``count_tokens_requests``, ``upload_chunks``
    (upload_id, offset, length, command), ``batches`` / ``batch(name)`` (Batch records: state,
    requests with their GenerateRecord, response or error), ``caches`` / ``cache(name)`` (explicit
    caches, including deleted and expired ones), ``held_requests`` (requests blocked by a hold fault
    now), ``faults``, ``internal_errors`` (tracebacks of emulator bugs, each also answered 500).
    """

    def __init__(self, api_key: str | None = "test-key", *,
                 storage_limit_bytes: int = 21_474_836_480,
                 max_file_bytes: int = 2_147_483_648,
                 ttl_seconds: float = 48 * 3600,
                 processing_polls: int | None = 1,
                 processing_seconds: float | None = None,
                 fail_processing: bool | str | Callable[[StoredFile], str | None] = False,
                 token_rate: float = 32,
                 inline_limit_bytes: int = 20 * 1024 * 1024,
                 supported_mime_types: Iterable[str] = DEFAULT_SUPPORTED_MIME_TYPES,
                 max_audio_seconds: float = MAX_AUDIO_SECONDS,
                 max_input_tokens: int = MAX_INPUT_TOKENS,
                 models: Iterable[str] | None = None,
                 responder: Callable[[GenerateRecord], Any] | None = None,
                 thinking_tokens: int = 0,
                 transcript: str = "segments",
                 speaker_split_hz: float = DEFAULT_SPLIT_HZ,
                 implicit_cache_seconds: float | None = 300.0,
                 cache_min_tokens: dict[str, int] | None = None,
                 batch_polls: int | None = 2,
                 batch_seconds: float | None = None,
                 batch_expire_seconds: float = 48 * 3600,
                 batch_shuffle_seed: int | None = None,
                 batch_echo_metadata: bool = True,
                 data_dir: str | Path | None = None,
                 host: str = "127.0.0.1", port: int = 0,
                 verbose: bool = False) -> None:
        # configuration: plain attributes, read at use time, so tests may change them mid-run
        self.api_key = api_key
        self.storage_limit_bytes = storage_limit_bytes
        self.max_file_bytes = max_file_bytes
        self.ttl_seconds = ttl_seconds
        self.processing_polls = processing_polls
        self.processing_seconds = processing_seconds
        self.fail_processing = fail_processing
        self.token_rate = token_rate
        self.inline_limit_bytes = inline_limit_bytes
        self.supported_mime_types = {m.lower() for m in supported_mime_types}
        self.max_audio_seconds = max_audio_seconds
        self.max_input_tokens = max_input_tokens
        self.models = set(models) if models is not None else None
        self.responder = responder
        self.thinking_tokens = thinking_tokens
        if transcript not in TRANSCRIPT_STYLES:
            raise ValueError(f"transcript must be one of {TRANSCRIPT_STYLES}, not {transcript!r}")
        self.transcript = transcript
        self.speaker_split_hz = speaker_split_hz
        self.implicit_cache_seconds = implicit_cache_seconds
        self.cache_min_tokens = dict(DEFAULT_CACHE_MIN_TOKENS if cache_min_tokens is None else cache_min_tokens)
        self.batch_polls = batch_polls
        self.batch_seconds = batch_seconds
        self.batch_expire_seconds = batch_expire_seconds
        self.batch_shuffle_seed = batch_shuffle_seed
        self.batch_echo_metadata = batch_echo_metadata
        self.verbose = verbose
        self.host, self.port = host, port

        self.clock = Clock()
        self._own_dir = data_dir is None
        self._data_dir: Path | None = Path(data_dir) if data_dir is not None else None
        self._store = FileStore(self)
        self._caches = CacheStore(self)
        self._batches = BatchStore(self)
        self._generator = Generator(self)
        self._stats = Stats()
        self._faults: list[Fault] = []
        self._generate_log: list[GenerateRecord] = []
        self._count_log: list[GenerateRecord] = []
        self._chunks: list[ChunkLog] = []
        self._errors: list[str] = []
        self._life = threading.RLock()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._helpers: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._hold_lock = threading.Lock()
        self._hold_release = threading.Event()
        self._held = 0
        self._started = False
        self._offline = False

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> str:
        with self._life:
            if self._started:
                raise RuntimeError("Emulator already started")
            self._started = True
            if self._data_dir is None:
                self._data_dir = Path(tempfile.mkdtemp(prefix="gemini-emu-"))
            self._store.open(self._data_dir)
            self._listen()
            return self.base_url

    def stop(self) -> None:
        with self._life:
            self._stopping.set()
        for t in self._helpers:
            t.join()
        with self._life:
            self._close_server()
            if self._own_dir and self._data_dir is not None:
                shutil.rmtree(self._data_dir, ignore_errors=True)

    def __enter__(self) -> "Emulator":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def data_dir(self) -> Path | None:
        """Where uploaded bytes live (a temp dir created by start() unless data_dir was given)."""
        return self._data_dir

    @property
    def offline(self) -> bool:
        """True once set_offline(True) (or /_emulator/offline) has fully stopped listening."""
        return self._offline

    def set_offline(self, offline: bool) -> None:
        """True: stop listening and cut every open connection (clients get connection refused).
        False: listen again on the same port."""
        with self._life:
            if self._stopping.is_set() or not self._started:
                return
            if offline:
                self._close_server()
                self._offline = True
            elif self._server is None:
                self._listen()
                self._offline = False

    def _listen(self) -> None:
        self._server = Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"gemini-emulator-{self.port}", daemon=True)
        self._thread.start()

    def _close_server(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.kill_connections()
        server.server_close()          # joins every handler thread
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _offline_for(self, seconds: float) -> None:
        def run() -> None:
            self.set_offline(True)
            if not self._stopping.wait(seconds):
                self.set_offline(False)
        t = threading.Thread(target=run, name="gemini-emulator-offline", daemon=True)
        self._helpers = [h for h in self._helpers if h.is_alive()] + [t]
        t.start()

    # ---- faults --------------------------------------------------------------------------------
    def add_fault(self, fault: Fault) -> Fault:
        with self._store.lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._store.lock:
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        with self._store.lock:
            return list(self._faults)

    def _pick_fault(self, route: str) -> Fault | None:
        with self._store.lock:
            for fault in self._faults:
                if fault.matches(route) and fault.fire():
                    self._stats.faults_injected += 1
                    return fault
        return None

    # ---- holds -----------------------------------------------------------------------------------
    def release_holds(self) -> int:
        """Let every request blocked by a "hold" fault answer now; returns how many were held."""
        with self._hold_lock:
            released = self._held
            event, self._hold_release = self._hold_release, threading.Event()
        event.set()
        return released

    @property
    def held_requests(self) -> int:
        """Requests blocked by a "hold" fault right now."""
        with self._hold_lock:
            return self._held

    def _hold(self, timeout: float, closing: threading.Event) -> bool:
        """Block a handler until release_holds(), the fault's timeout or shutdown (-> False)."""
        with self._hold_lock:
            event = self._hold_release
            self._held += 1
        try:
            deadline = time.monotonic() + timeout
            while not event.is_set() and time.monotonic() < deadline:
                if closing.is_set() or self._stopping.is_set():
                    return False
                event.wait(0.05)      # short waits: shutdown must not wait for a release
            return not closing.is_set()
        finally:
            with self._hold_lock:
                self._held -= 1

    # ---- batches ---------------------------------------------------------------------------------
    def finish_batches(self) -> list[str]:
        """Run every PENDING/RUNNING batch now (each request answered as generateContent would
        answer it at this moment) -> SUCCEEDED. Returns the names of the batches that ran."""
        done = []
        for b in self.batches:
            if not b.done and not b.deleted:
                self._batches.run_now(b)
                done.append(b.name)
        return done

    def fail_batch(self, name: str, message: str = "Batch failed.") -> None:
        """End an unfinished batch in BATCH_STATE_FAILED with Operation.error {code: 13, message}."""
        self._batches.fail(self.batch(name), message)

    def expire_batch(self, name: str) -> None:
        """End an unfinished batch in BATCH_STATE_EXPIRED (as after 48 h pending/running)."""
        self._batches.expire(self.batch(name))

    @property
    def batches(self) -> list[Batch]:
        """Every batch ever created (deleted ones too), oldest first. Records are live."""
        with self._batches.lock:
            return list(self._batches.all_batches)

    def batch(self, name: str) -> Batch:
        """A batch by 'batches/id' or 'id' (KeyError if unknown)."""
        bid = name.rsplit("batches/", 1)[-1]
        for b in self.batches:
            if b.id == bid:
                return b
        raise KeyError(name)

    # ---- caches ----------------------------------------------------------------------------------
    @property
    def caches(self) -> list[CachedContent]:
        """Every explicit cache ever created, oldest first (delete_reason 'deleted'/'expired')."""
        with self._caches.lock:
            self._caches.sweep()
            return list(self._caches.all_caches)

    def cache(self, name: str) -> CachedContent:
        cid = name.rsplit("cachedContents/", 1)[-1]
        for c in self.caches:
            if c.id == cid:
                return c
        raise KeyError(name)

    # ---- introspection -------------------------------------------------------------------------
    @property
    def files(self) -> list[StoredFile]:
        """Files currently stored (not deleted, not expired), oldest first."""
        with self._store.lock:
            self._store.sweep()
            return sorted(self._store.by_id.values(), key=lambda f: f.create_time)

    @property
    def all_files(self) -> list[StoredFile]:
        """Every file ever finalized, including deleted (delete_reason 'deleted') and expired ones."""
        with self._store.lock:
            self._store.sweep()
            return list(self._store.all_files)

    def file(self, ref: str) -> StoredFile:
        """Look up any file ever stored by 'files/id', 'id' or uri (KeyError if unknown)."""
        fid = file_id_from(ref)
        for f in self.all_files:
            if f.id == fid:
                return f
        raise KeyError(ref)

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters."""
        with self._store.lock:
            s = Stats(**{f.name: getattr(self._stats, f.name) for f in fields(Stats)})
            s.requests = list(self._stats.requests)
            s.used_bytes = self._store.used_bytes()
            s.high_water_bytes = self._store.high_water
            return s

    def requests_in_window(self, seconds: float, route: str = "generate", model: str | None = None) -> int:
        """The largest number of logged requests matching ``route`` (a fault route or group:
        "generate", "batches", "any", ...) and ``model`` whose arrival times fit in one window of
        ``seconds`` (wall clock). E.g. assert emu.requests_in_window(60) <= 10."""
        times = sorted(r.time for r in self.stats.requests
                       if r.time is not None and route_matches(route, r.route)
                       and (model is None or r.model == model))
        best = 0
        for i, t in enumerate(times):
            best = max(best, bisect.bisect_right(times, t + seconds) - i)
        return best

    @property
    def generate_requests(self) -> list[GenerateRecord]:
        """Successful generateContent / streamGenerateContent calls, in order."""
        with self._store.lock:
            return list(self._generate_log)

    @property
    def count_tokens_requests(self) -> list[GenerateRecord]:
        with self._store.lock:
            return list(self._count_log)

    @property
    def upload_chunks(self) -> list[ChunkLog]:
        """Every upload-chunk request that reached a session: (upload_id, offset, length, command)."""
        with self._store.lock:
            return list(self._chunks)

    @property
    def internal_errors(self) -> list[str]:
        """Tracebacks of emulator bugs (each also answered 500). Tests may assert this is empty."""
        with self._store.lock:
            return list(self._errors)

    def state_json(self) -> dict:
        with self._store.lock:
            return {"now": rfc3339(self.clock.now()), "offline": self.offline,
                    "files": [f.debug_json() for f in self.files],
                    "allFiles": [f.debug_json() for f in self.all_files],
                    "stats": self.stats.as_dict(), "faults": [f.to_json() for f in self._faults],
                    "batches": [{"name": b.name, "state": b.state, "requests": len(b.requests)}
                                for b in self.batches],
                    "caches": [dict(c.to_json(), deleteReason=c.delete_reason) for c in self.caches],
                    "heldRequests": self.held_requests, "internalErrors": list(self._errors)}

    # ---- hooks for the handler -----------------------------------------------------------------
    def _log_request(self, method: str, path: str, status: int | None, arrived: float | None = None,
                     model: str | None = None, route: str | None = None) -> None:
        with self._store.lock:
            self._stats.requests.append(RequestLog(method, path, status, arrived, model, route))

    def _log_chunk(self, upload_id: str, offset: int, length: int, command: str) -> None:
        with self._store.lock:
            self._chunks.append(ChunkLog(upload_id, offset, length, command))

    def _record_generate(self, rec: GenerateRecord) -> None:
        with self._store.lock:
            (self._count_log if rec.method == "countTokens" else self._generate_log).append(rec)

    def _internal_error(self, tb: str) -> None:
        with self._store.lock:
            self._errors.append(tb)
        if self.verbose:
            import sys
            sys.stderr.write(tb)
