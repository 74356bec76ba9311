"""The Batch API (batchGenerateContent) as google-genai 3.3.0 speaks it in Developer-API mode.

Wire protocol, from the SDK source (google/genai/batches.py, _transformers.py) [S]:

* ``batches.create(model=M, src=[...] | "files/x", config={"display_name": D})`` ->
  ``POST /{v}/models/M:batchGenerateContent`` with
  ``{"batch": {"displayName": D, "inputConfig": {"requests": {"requests": [{"request": {...},
  "metadata": {...}}]}}}}`` or ``{"batch": {"inputConfig": {"fileName": "files/x"}, ...}}``.
* ``batches.get(name="batches/ID")`` -> ``GET /{v}/batches/ID`` (the SDK refuses names that do not
  match ``batches/...``); ``batches.list`` -> ``GET /{v}/batches?pageSize=N`` and reads
  ``operations`` / ``nextPageToken``; ``batches.cancel`` -> ``POST /{v}/batches/ID:cancel`` (the body
  is ignored); ``batches.delete`` -> ``DELETE /{v}/batches/ID``.
* The answer is a long-running Operation. The SDK reads only ``name`` and ``metadata``:
  ``metadata.displayName/state/createTime/updateTime/endTime/model`` and ``metadata.output``
  (``inlinedResponses.inlinedResponses[]`` of ``{response, metadata, error}``, or ``responsesFile``),
  and maps ``BATCH_STATE_X`` to ``JOB_STATE_X`` (t_job_state). It never reads ``error`` or
  ``done`` in this mode, so ``BatchJob.error`` stays None for a failed batch.

Real output [R]: python-genai issue #1323 (a list answer: ``@type ...v1main.GenerateContentBatch``,
``batchStats`` with int64 counts as strings, ``createTime`` with 9 digits), cookbook
quickstarts/Batch_mode.ipynb (ids are 36 chars [a-z0-9], a file job's results are
``files/batch-<id>``, each result line is ``{"response": {...}, "key": "..."}`` with the usual
``usageMetadata``, "the list API currently doesn't return inlined_responses"), bifrost PR #4904 (the
Operation also carries ``done`` and ``response.inlinedResponses.inlinedResponses[]`` /
``response.responsesFile``), kaibo PR #8 (cancel is immediately terminal), python-genai #1909
(inlined responses may come back out of request order: ``batch_shuffle_seed``) and a forum report
that inlined responses may lack ``metadata`` (``batch_echo_metadata=False``).
Assumptions [A]: the ``error`` Status of a failed request carries the gRPC code of the error
generateContent would have answered (403 -> 7 PERMISSION_DENIED); unknown batch -> 404 NOT_FOUND;
cancel of a finished batch -> 400 FAILED_PRECONDITION; responses file MIME ``application/jsonl``.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import string
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .faults import ApiError
from .files import rfc3339
from .generate import GenerateRecord, camelize, new_response_id

if TYPE_CHECKING:
    from .server import Emulator

TYPE_BATCH = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
TYPE_OUTPUT = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
PENDING, RUNNING, SUCCEEDED = "BATCH_STATE_PENDING", "BATCH_STATE_RUNNING", "BATCH_STATE_SUCCEEDED"
FAILED, CANCELLED, EXPIRED = "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
GRPC_CODES = {"CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
              "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
              "ABORTED": 10, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14, "UNAUTHENTICATED": 16}
_ID_ALPHABET = string.ascii_lowercase + string.digits


def batch_not_found(name: str) -> ApiError:
    return ApiError(404, f"Batch {name} not found.", "NOT_FOUND")   # [A] wording


@dataclass
class BatchRequest:
    """One request of a batch and, once the batch ran, its outcome: ``record`` (what the model saw
    and answered), ``response`` (GenerateContentResponse JSON) or ``error`` (google.rpc.Status JSON)
    with ``http_status`` = the status generateContent would have answered."""

    index: int
    body: dict
    key: str | None = None             # file input: the line's "key"
    metadata: dict | None = None       # inline input: the request's "metadata"
    parse_error: str | None = None     # file input: a line that is not a request
    record: GenerateRecord | None = None
    response: dict | None = None
    error: dict | None = None
    http_status: int | None = None

    @property
    def ok(self) -> bool:
        return self.response is not None


@dataclass
class Batch:
    """A batch job. ``state`` is a BATCH_STATE_* name; ``source`` is "inline" or "file"."""

    id: str
    model: str
    api_version: str
    display_name: str | None
    source: str
    input_file: str | None
    requests: list[BatchRequest]
    create_time: datetime
    update_time: datetime
    state: str = PENDING
    end_time: datetime | None = None
    polls: int = 0                     # batches.get calls seen while not finished
    polls_left: int | None = None
    run_at: datetime | None = None
    output_file: str | None = None
    error: dict | None = None
    order: list[int] | None = None     # shuffled answer order (batch_shuffle_seed)
    deleted: bool = False              # batches.delete: gone for the API, kept for introspection
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return f"batches/{self.id}"

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def stats(self) -> dict:
        """batchStats: int64 counts as strings, zero counts omitted (proto3 JSON)."""
        total = len(self.requests)
        ok = sum(1 for r in self.requests if r.ok)
        failed = sum(1 for r in self.requests if r.error is not None)
        pending = total - ok - failed if self.state in (PENDING, RUNNING) else 0
        out = {"requestCount": total, "successfulRequestCount": ok, "failedRequestCount": failed,
               "pendingRequestCount": pending}
        return {k: str(v) for k, v in out.items() if v}


class BatchStore:
    """Batches by id. ``lock`` guards the dictionary; each batch's own lock serialises its run."""

    def __init__(self, emu: "Emulator") -> None:
        self.emu = emu
        self.lock = threading.RLock()
        self.by_id: dict[str, Batch] = {}
        self.all_batches: list[Batch] = []

    # ---- create ----------------------------------------------------------------------------
    def create(self, version: str, model: str, body: dict) -> Batch:
        emu = self.emu
        if emu.models is not None and model not in emu.models:
            raise ApiError(404, f"models/{model} is not found for API version {version}, or is not "
                           "supported for batchGenerateContent.")
        batch = camelize(body).get("batch")
        if not isinstance(batch, dict):
            raise ApiError(400, "* BatchGenerateContentRequest.batch: batch is required\n")
        config = batch.get("inputConfig") or {}
        if "fileName" in config:
            source, input_file = "file", str(config["fileName"])
            requests = self._file_requests(input_file)
        else:
            source, input_file = "inline", None
            requests = self._inline_requests(config)
        now = emu.clock.now()
        with self.lock:
            b = Batch(self._new_id(), model, version, batch.get("displayName"), source, input_file,
                      requests, now, now)
            polls, secs = emu.batch_polls, emu.batch_seconds
            b.polls_left = polls if polls is not None and polls >= 0 else None
            b.run_at = now + timedelta(seconds=secs) if secs is not None else None
            self.by_id[b.id] = b
            self.all_batches.append(b)
        with emu._store.lock:
            emu._stats.batches_created += 1
        return b

    @staticmethod
    def _inline_requests(config: dict) -> list[BatchRequest]:
        items = ((config.get("requests") or {}).get("requests")) or []
        if not items:
            raise ApiError(400, "* BatchGenerateContentRequest.batch.input_config: requests must not be empty\n")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
                raise ApiError(400, f"Invalid value at 'batch.input_config.requests.requests[{i}].request'.")
            out.append(BatchRequest(i, item["request"], metadata=item.get("metadata")))
        return out

    def _file_requests(self, ref: str) -> list[BatchRequest]:
        """The input file must exist and be ACTIVE now (403 / 400 as for generateContent); each
        JSONL line is {"key": ..., "request": {...}}; a bad line fails only its own request."""
        store = self.emu._store
        with store.lock:
            data = store.for_use(ref).path.read_bytes()
        out = []
        for line in data.decode("utf-8", "replace").splitlines():
            if not line.strip():
                continue
            req = BatchRequest(len(out), {})
            try:
                item = json.loads(line)
                req.key = str(item.get("key")) if item.get("key") is not None else None
                if not isinstance(item.get("request"), dict):
                    raise ValueError("the line has no \"request\" object")
                req.body = item["request"]
            except (ValueError, AttributeError) as e:
                req.parse_error = f"Invalid JSON payload received. {e}"
            out.append(req)
        if not out:
            raise ApiError(400, f"The input file {ref} contains no requests.")
        return out

    def _new_id(self) -> str:
        taken = {b.id for b in self.all_batches}
        while True:
            bid = "".join(secrets.choice(_ID_ALPHABET) for _ in range(36))
            if bid not in taken:
                return bid

    # ---- lookups -----------------------------------------------------------------------------
    def lookup(self, bid: str) -> Batch:
        bid = bid.rsplit("batches/", 1)[-1]
        with self.lock:
            b = self.by_id.get(bid)
        if b is None:
            raise batch_not_found(f"batches/{bid}")
        return b

    def get(self, bid: str) -> Batch:
        b = self.lookup(bid)
        self.refresh(b, polled=True)
        return b

    def list(self, page_size: int, token: str | None) -> dict:
        with self.lock:
            ordered = sorted(self.by_id.values(), key=lambda b: (b.create_time, b.id), reverse=True)
        for b in ordered:
            self.refresh(b, polled=False)
        page_size = min(page_size if page_size > 0 else 10, 1000)
        start = int(base64.urlsafe_b64decode(token.encode()).decode()) if token else 0
        page = ordered[start:start + page_size]
        out: dict[str, Any] = {}
        if page:
            out["operations"] = [self.operation(b, listing=True) for b in page]
        if start + page_size < len(ordered):
            out["nextPageToken"] = base64.urlsafe_b64encode(str(start + page_size).encode()).decode()
        return out

    def delete(self, bid: str) -> None:
        """Like Operations.delete: the client loses interest; a running batch is not cancelled."""
        b = self.lookup(bid)
        with self.lock:
            self.by_id.pop(b.id, None)
            b.deleted = True

    def cancel(self, bid: str) -> Batch:
        b = self.lookup(bid)
        self.refresh(b, polled=False)
        with b.lock:
            if b.done:
                raise ApiError(400, f"Batch {b.name} is already in state {b.state} and cannot be cancelled.",
                               "FAILED_PRECONDITION")   # [A]
            self._finish(b, CANCELLED)
        return b

    # ---- progress ----------------------------------------------------------------------------
    def refresh(self, b: Batch, polled: bool) -> None:
        """Advance a batch: it runs when batch_seconds have passed on the emulator clock or after
        batch_polls non-final batches.get answers (whichever comes first); a batch still pending
        or running after batch_expire_seconds expires."""
        with b.lock:
            if b.done:
                return
            now = self.emu.clock.now()
            due = b.run_at is not None and now >= b.run_at
            if not due and (now - b.create_time).total_seconds() >= self.emu.batch_expire_seconds:
                self._finish(b, EXPIRED)
                return
            if not due and polled and b.polls_left is not None:
                if b.polls_left > 0:
                    b.polls_left -= 1
                else:
                    due = True
            if due:
                self._run(b)
                return
            if polled:
                b.polls += 1
            self._progress_state(b, now)

    def _progress_state(self, b: Batch, now: datetime) -> None:
        """PENDING, then RUNNING from the second poll (batch_polls) or from half-way (batch_seconds)."""
        half_way = b.run_at is not None and now >= b.create_time + (b.run_at - b.create_time) / 2
        by_polls = b.polls_left is not None and b.polls > 1
        state = RUNNING if (by_polls or half_way) else PENDING
        if state != b.state:
            b.state, b.update_time = state, now

    def run_now(self, b: Batch) -> None:
        with b.lock:
            if not b.done:
                self._run(b)

    def fail(self, b: Batch, message: str) -> None:
        with b.lock:
            if not b.done:
                b.error = {"code": 13, "message": message}
                self._finish(b, FAILED)

    def expire(self, b: Batch) -> None:
        with b.lock:
            if not b.done:
                self._finish(b, EXPIRED)

    def _finish(self, b: Batch, state: str) -> None:
        now = self.emu.clock.now()
        b.state, b.update_time, b.end_time = state, now, now

    def _run(self, b: Batch) -> None:
        """Answer every request exactly as generateContent would, now (caller holds b.lock)."""
        b.state = RUNNING
        for req in b.requests:
            self._answer(b, req)
        seed = self.emu.batch_shuffle_seed
        if seed is not None:
            b.order = list(range(len(b.requests)))
            random.Random(seed).shuffle(b.order)
        if b.source == "file":
            lines = []
            for req in b.requests:
                line: dict[str, Any] = {"response": req.response} if req.ok else {"error": req.error}
                if req.key is not None:
                    line["key"] = req.key
                lines.append(json.dumps(line))
            fid = f"batch-{b.id}"
            with self.emu._store.lock:
                self.emu._store.add_generated(fid, ("\n".join(lines) + "\n").encode(), "application/jsonl",
                                              b.api_version)
            b.output_file = f"files/{fid}"
        self._finish(b, SUCCEEDED)

    def _answer(self, b: Batch, req: BatchRequest) -> None:
        emu = self.emu
        gen = emu._generator
        try:
            if req.parse_error:
                raise ApiError(400, req.parse_error)
            rec = gen.build_record("batchGenerateContent", b.api_version, b.model, req.body)
            gen.enforce_limits(rec)
            gen.answer(rec)
            req.record = rec
            req.response = gen.response(rec, rec.response_text or "", rec.finish_reason, rec.usage or {},
                                        new_response_id())
        except ApiError as e:
            req.http_status = e.code
            req.error = {"code": GRPC_CODES.get(e.status, 2), "message": e.message}
            if e.details:
                req.error["details"] = e.details
        except Exception:
            emu._internal_error(traceback.format_exc())
            req.http_status, req.error = 500, {"code": 13, "message": "Internal error encountered."}

    # ---- JSON ----------------------------------------------------------------------------------
    def operation(self, b: Batch, listing: bool = False) -> dict:
        """The Operation JSON; listing=True leaves out inlined responses, as the real list does."""
        meta: dict[str, Any] = {"@type": TYPE_BATCH, "model": f"models/{b.model}"}
        if b.display_name:
            meta["displayName"] = b.display_name
        meta["createTime"] = rfc3339(b.create_time, nanos=True)
        meta["updateTime"] = rfc3339(b.update_time)
        if b.end_time is not None:
            meta["endTime"] = rfc3339(b.end_time)
        meta["batchStats"] = b.stats()
        meta["state"] = b.state
        meta["name"] = b.name
        op: dict[str, Any] = {"name": b.name, "metadata": meta}
        output = self._output(b, listing) if b.state == SUCCEEDED else None
        if output is not None:
            meta["output"] = output
        if b.done:
            op["done"] = True
            if b.error:
                op["error"] = b.error
            elif output:
                op["response"] = {"@type": TYPE_OUTPUT, **output}
        return op

    def _output(self, b: Batch, listing: bool) -> dict:
        if b.source == "file":
            return {"responsesFile": b.output_file}
        if listing:
            return {}
        order = b.order or list(range(len(b.requests)))
        items = []
        for i in order:
            req = b.requests[i]
            item: dict[str, Any] = {"response": req.response} if req.ok else {"error": req.error}
            if req.metadata is not None and self.emu.batch_echo_metadata:
                item["metadata"] = req.metadata
            items.append(item)
        return {"inlinedResponses": {"inlinedResponses": items}}


__all__ = ["Batch", "BatchRequest", "BatchStore", "CANCELLED", "EXPIRED", "FAILED", "PENDING", "RUNNING",
           "SUCCEEDED", "TERMINAL"]
