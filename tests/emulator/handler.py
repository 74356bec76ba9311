"""HTTP layer: a threaded HTTP/1.1 keep-alive server, routing, auth, fault application and
rendering of every answer (one write per response, always with Content-Length or chunked)."""

from __future__ import annotations

import email.utils
import json
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from .faults import HTML_404, HTML_502, ApiError, Fault, api_key_invalid, api_key_missing
from .files import CHUNK_GRANULARITY, rfc3339
from .generate import camelize, count_tokens_body, new_response_id

if TYPE_CHECKING:
    from .server import Emulator

_V = r"(?P<v>[^/_][^/]*)"
_ROUTES = [
    ("upload", re.compile(r"^/upload/(?P<v>[^/]+)/files$")),
    ("files_download", re.compile(r"^/(?:download/)?" + _V + r"/files/(?P<id>[^/:]+):download$")),
    ("files_list", re.compile(r"^/" + _V + r"/files$")),
    ("files_item", re.compile(r"^/" + _V + r"/files/(?P<id>[^/]+)$")),
    ("model", re.compile(r"^/" + _V + r"/models/(?P<m>[^/:]+):(?P<op>generateContent|"
                         r"streamGenerateContent|countTokens|batchGenerateContent)$")),
    ("caches", re.compile(r"^/" + _V + r"/cachedContents$")),
    ("caches_item", re.compile(r"^/" + _V + r"/cachedContents/(?P<id>[^/:]+)$")),
    ("batches", re.compile(r"^/" + _V + r"/batches$")),
    ("batches_item", re.compile(r"^/" + _V + r"/batches/(?P<id>[^/:]+)(?P<cancel>:cancel)?$")),
    ("control", re.compile(r"^/_emulator/(?P<c>[a-z]+)$")),
]
_OP_ROUTE = {"generateContent": "generate", "streamGenerateContent": "stream", "countTokens": "count_tokens",
             "batchGenerateContent": "batch_create"}
_BATCH_CONTROL_USAGE = ('POST /_emulator/batches {"action": "finish"} | '
                        '{"action": "fail"|"expire", "name": "batches/...", "message": "..."}')
# (route kind, HTTP method) -> route name used by faults, logs and handlers
_METHOD_ROUTE = {
    ("files_list", "GET"): "files_list", ("files_item", "GET"): "files_get",
    ("files_item", "DELETE"): "files_delete", ("files_download", "GET"): "files_download",
    ("caches", "POST"): "caches_create", ("caches", "GET"): "caches_list",
    ("caches_item", "GET"): "caches_get", ("caches_item", "PATCH"): "caches_update",
    ("caches_item", "DELETE"): "caches_delete", ("batches", "GET"): "batches_list",
    ("batches_item", "GET"): "batches_get", ("batches_item", "DELETE"): "batches_delete",
}


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


class _Dropped(Exception):
    """The connection was closed without an answer (fault, client gone, shutdown)."""


class Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], emu: "Emulator") -> None:
        self.emu = emu
        self.closing = threading.Event()
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn() (a DNS lookup)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            if self.closing.is_set():
                self.shutdown_request(request)
                return
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def kill_connections(self) -> None:
        self.closing.set()
        with self.conns_lock:
            conns = list(self.conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return
        self.emu._internal_error(traceback.format_exc())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        return "UploadServer" if getattr(self, "path", "").startswith("/upload/") else "scaffolding on HTTPServer2"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.emu.verbose:
            sys.stderr.write("emulator: " + (format % args) + "\n")

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    # ---- plumbing ----------------------------------------------------------------------------
    @property
    def emu(self) -> "Emulator":
        return self.server.emu

    def _dispatch(self) -> None:
        self._status: int | None = None
        self._route = "unknown"
        self._arrived = time.time()
        self._model: str | None = None
        try:
            self._left = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._left = 0
        try:
            try:
                self._handle()
            except ApiError as e:
                if self._route == "upload_chunk":   # answered "final": the session is over
                    self.emu._store.abort_session(self._query.get("upload_id", ""))
                self._send_error(e)
        except _NoMore:
            pass
        except (_Dropped, OSError):
            self.close_connection = True
        except Exception:
            self.emu._internal_error(traceback.format_exc())
            if self._status is None:
                try:
                    self._send_error(ApiError(500))
                except OSError:
                    self.close_connection = True
        finally:
            if self._status is None:
                self._log(None)

    def _log(self, status: int | None) -> None:
        """Record the request before its answer goes out, so a client never sees an answer
        that the logs do not show yet."""
        self._status = status
        if self._route != "control":
            self.emu._log_request(self.command, self.path, status, self._arrived, self._model, self._route)
        self.log_message('"%s %s" %s', self.command, self.path, status)

    def _read(self, limit: int | None = None) -> bytes:
        n = self._left if limit is None else min(limit, self._left)
        data = self.rfile.read(n) if n else b""
        self._left -= len(data)
        if len(data) < n:
            raise _Dropped()
        return data

    def _drain(self) -> None:
        while self._left > 0:
            if not self._read(1 << 20):
                raise _Dropped()

    def _json_body(self) -> dict:
        raw = self._read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"Invalid JSON payload received. {e}")
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid JSON payload received. Expected an object.")
        return body

    def _send(self, code: int, body: bytes = b"", ctype: str | None = "application/json; charset=UTF-8",
              headers: dict[str, str] | None = None) -> None:
        self._drain()
        lines = [f"HTTP/1.1 {code} {_phrase(code)}"]
        hdrs = {}
        if ctype:
            hdrs["Content-Type"] = ctype
        hdrs.update(headers or {})
        hdrs.update({"Vary": "Origin, X-Origin, Referer", "Date": email.utils.formatdate(usegmt=True),
                     "Server": self.version_string(), "Content-Length": str(len(body))})
        if self.close_connection:
            hdrs["Connection"] = "close"
        lines += [f"{k}: {v}" for k, v in hdrs.items()]
        self._log(code)
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _send_json(self, obj: Any, code: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj, indent=2).encode() + b"\n", headers=headers)

    def _upload_headers(self, status: str) -> dict[str, str]:
        return {"X-Goog-Upload-Status": status} if self._route in ("upload_start", "upload_chunk") else {}

    def _send_error(self, e: ApiError) -> None:
        hdrs = self._upload_headers("final")
        if e.html is not None:
            self._send(e.code, e.html.encode(), "text/html; charset=UTF-8", hdrs)
        elif e.plain:
            self._send(e.code, e.message.encode(), "text/plain; charset=utf-8", hdrs)
        else:
            self._send_json(e.body(), e.code, hdrs)

    def _abort(self, reset: bool) -> None:
        """Close the connection with no answer; reset=True sends an RST instead of a FIN."""
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        raise _Dropped()

    # ---- request handling --------------------------------------------------------------------
    def _handle(self) -> None:
        path, _, qs = self.path.partition("?")
        path = unquote(path)
        self._query = {k: v[-1] for k, v in parse_qs(qs).items()}
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ApiError(411, "Length Required", "INVALID_ARGUMENT", plain=True)
        for kind, rx in _ROUTES:
            m = rx.match(path)
            if m:
                break
        else:
            raise ApiError(404, html=HTML_404.format(path=path))
        p = m.groupdict()
        method = self.command
        if kind == "control":
            return self._control(p["c"], method)
        route = self._route_name(kind, method, p)
        if route is None:
            raise ApiError(404, html=HTML_404.format(path=path))
        self._route, self._model = route, p.get("m")
        fault = self.emu._pick_fault(self._route)
        if fault is not None:
            self._apply_fault(fault, p.get("m") or "gemini-2.5-flash")
        if self._route != "upload_chunk":
            key = self.headers.get("x-goog-api-key") or self._query.get("key")
            if not key:
                raise api_key_missing()
            if self.emu.api_key is not None and key != self.emu.api_key:
                raise api_key_invalid()
        getattr(self, "_r_" + self._route)(p)

    def _route_name(self, kind: str, method: str, p: dict) -> str | None:
        if kind == "upload":
            if method != "POST":
                return None
            return "upload_chunk" if "upload_id" in self._query else "upload_start"
        if kind == "model":
            return _OP_ROUTE[p["op"]] if method == "POST" else None
        if kind == "batches_item" and p.get("cancel"):
            return "batches_cancel" if method == "POST" else None
        return _METHOD_ROUTE.get((kind, method))

    def _apply_fault(self, fault: Fault, model: str) -> None:
        if fault.kind == "hold":
            if not self.emu._hold(fault.timeout, self.server.closing):
                self._abort(reset=False)
            return  # then answer normally
        if fault.kind == "slow":
            if self.server.closing.wait(fault.delay):
                self._abort(reset=False)
            return  # then answer normally
        if fault.kind == "drop":
            if self._route == "upload_chunk":
                self._read(max(1, min(self._left // 2, 1 << 20)) if self._left else 0)
                self._abort(reset=True)
            self._drain()
            self._abort(reset=False)
        if fault.kind == "non_json_502":
            raise ApiError(502, html=HTML_502)
        if fault.kind == "no_upload_status":
            self._send_json(ApiError(503).body(), 503)
            raise _Dropped() if self.close_connection else _NoMore()
        raise fault.error(model)

    # ---- Files API ---------------------------------------------------------------------------
    def _r_upload_start(self, p: dict) -> None:
        cmd = (self.headers.get("X-Goog-Upload-Command") or "").lower()
        proto = (self.headers.get("X-Goog-Upload-Protocol") or "").lower()
        body = self._json_body()
        if proto != "resumable" or cmd != "start":
            raise ApiError(400, "Only the resumable upload protocol (X-Goog-Upload-Protocol: resumable, "
                           "X-Goog-Upload-Command: start) is supported by this endpoint.")
        session = self.emu._store.start_upload(p["v"], self.headers, body)
        host = self.headers.get("Host") or f"{self.server.server_name}:{self.server.server_port}"
        url = f"http://{host}/upload/{p['v']}/files?upload_id={session.upload_id}&upload_protocol=resumable"
        self._send(200, b"", None, {
            "X-Goog-Upload-Status": "active", "X-Goog-Upload-URL": url, "X-Goog-Upload-Control-URL": url,
            "X-Goog-Upload-Chunk-Granularity": str(CHUNK_GRANULARITY),
            "X-GUploader-UploadID": session.upload_id})

    def _r_upload_chunk(self, p: dict) -> None:
        store = self.emu._store
        upload_id = self._query.get("upload_id", "")
        commands = {c.strip() for c in (self.headers.get("X-Goog-Upload-Command") or "").lower().split(",")}
        with store.lock:
            session = store.sessions.get(upload_id)
        if session is None:
            raise ApiError(404, f"No active upload session for upload_id {upload_id!r}.", plain=True)
        with session.lock:
            if "query" in commands:
                return self._send(200, b"", None, {"X-Goog-Upload-Status": session.status,
                                                   "X-Goog-Upload-Size-Received": str(session.received)})
            if "cancel" in commands:
                with store.lock:
                    session.status = "cancelled"
                    store.sessions.pop(upload_id, None)
                session.tmp_path.unlink(missing_ok=True)
                return self._send(200, b"", None, {"X-Goog-Upload-Status": "cancelled"})
            length = self._left
            finalize = "finalize" in commands
            try:
                offset = int(self.headers.get("X-Goog-Upload-Offset", ""))
            except ValueError:
                offset = -1
            self.emu._log_chunk(upload_id, offset, length, self.headers.get("X-Goog-Upload-Command", ""))
            if "upload" not in commands:
                raise ApiError(400, "Invalid X-Goog-Upload-Command.", plain=True)
            if offset != session.received:
                raise ApiError(400, f"Invalid request. According to our records, we have received "
                               f"{session.received} bytes, but the client sent offset {offset}.",
                               plain=True)
            if not finalize and length % CHUNK_GRANULARITY:
                raise ApiError(400, f"The client sent {length} bytes, which is not a multiple of "
                               f"the {CHUNK_GRANULARITY} byte chunk granularity.", plain=True)
            declared = session.declared_size
            if declared is not None and session.received + length > declared:
                raise ApiError(400, f"The client sent more bytes ({session.received + length}) than "
                               f"declared in X-Goog-Upload-Header-Content-Length ({declared}).",
                               plain=True)
            if not store.write_chunk(session, self.rfile, length):
                self._left = 0
                raise _Dropped()
            self._left = 0
            if not finalize:
                return self._send(200, b"", None, {"X-Goog-Upload-Status": "active"})
            f = store.finalize(session)
            with store.lock:
                body = {"file": f.to_json()}
            self._send_json(body, 200, {"X-Goog-Upload-Status": "final",
                                        "X-GUploader-UploadID": session.upload_id})

    def _r_files_list(self, p: dict) -> None:
        try:
            size = int(self._query.get("pageSize", "10"))
        except ValueError:
            raise ApiError(400, f"Invalid value at 'page_size' (TYPE_INT32), \"{self._query['pageSize']}\"")
        store = self.emu._store
        with store.lock:
            out = store.list(size, self._query.get("pageToken"))
        self._send_json(out)

    def _r_files_get(self, p: dict) -> None:
        store = self.emu._store
        with store.lock:
            body = store.get(p["id"]).to_json()
        self._send_json(body)

    def _r_files_delete(self, p: dict) -> None:
        store = self.emu._store
        with store.lock:
            store.delete(p["id"])
        self._send_json({})

    def _r_files_download(self, p: dict) -> None:
        store = self.emu._store
        with store.lock:
            f = store.download(p["id"])
            data = f.path.read_bytes()
            mime = f.mime_type
        self._send(200, data, mime)

    # ---- explicit caches ---------------------------------------------------------------------
    def _r_caches_create(self, p: dict) -> None:
        if self._left > self.emu.inline_limit_bytes:
            raise ApiError(400, f"Request payload size exceeds the limit: {self.emu.inline_limit_bytes} bytes.")
        self._send_json(self.emu._caches.create(camelize(self._json_body()), p["v"]).to_json())

    def _r_caches_list(self, p: dict) -> None:
        self._send_json(self.emu._caches.list(self._page_size(), self._query.get("pageToken")))

    def _r_caches_get(self, p: dict) -> None:
        self._send_json(self.emu._caches.lookup(p["id"]).to_json())

    def _r_caches_update(self, p: dict) -> None:
        body = camelize(self._json_body())
        self._send_json(self.emu._caches.update(p["id"], body).to_json())

    def _r_caches_delete(self, p: dict) -> None:
        self.emu._caches.delete(p["id"])
        self._send_json({})

    # ---- batches -----------------------------------------------------------------------------
    def _r_batch_create(self, p: dict) -> None:
        emu = self.emu
        if self._left > emu.inline_limit_bytes:
            raise ApiError(400, f"Request payload size exceeds the limit: {emu.inline_limit_bytes} bytes.")
        b = emu._batches.create(p["v"], p["m"], self._json_body())
        self._send_json(emu._batches.operation(b))

    def _r_batches_get(self, p: dict) -> None:
        store = self.emu._batches
        self._send_json(store.operation(store.get(p["id"])))

    def _r_batches_list(self, p: dict) -> None:
        self._send_json(self.emu._batches.list(self._page_size(), self._query.get("pageToken")))

    def _r_batches_cancel(self, p: dict) -> None:
        self._drain()
        self.emu._batches.cancel(p["id"])
        self._send_json({})

    def _r_batches_delete(self, p: dict) -> None:
        self.emu._batches.delete(p["id"])
        self._send_json({})

    def _page_size(self) -> int:
        try:
            return int(self._query.get("pageSize", "10"))
        except ValueError:
            raise ApiError(400, f"Invalid value at 'page_size' (TYPE_INT32), \"{self._query['pageSize']}\"")

    # ---- models ------------------------------------------------------------------------------
    def _model_record(self, p: dict):
        emu = self.emu
        with emu._store.lock:
            if self._route == "count_tokens":
                emu._stats.count_tokens_calls += 1
            else:
                emu._stats.generate_calls += 1
        if self._left > emu.inline_limit_bytes:
            raise ApiError(400, f"Request payload size exceeds the limit: {emu.inline_limit_bytes} bytes.")
        body = self._json_body()
        return emu._generator.build_record(p["op"], p["v"], p["m"], body)

    def _r_count_tokens(self, p: dict) -> None:
        rec = self._model_record(p)
        self.emu._record_generate(rec)
        self._send_json(count_tokens_body(rec))

    def _r_generate(self, p: dict) -> None:
        gen = self.emu._generator
        rec = self._model_record(p)
        gen.enforce_limits(rec)
        gen.answer(rec)
        self.emu._record_generate(rec)
        self._send_json(gen.response(rec, rec.response_text or "", rec.finish_reason, rec.usage or {},
                                     new_response_id()))

    def _r_stream(self, p: dict) -> None:
        gen = self.emu._generator
        rec = self._model_record(p)
        gen.enforce_limits(rec)
        gen.answer(rec)
        self.emu._record_generate(rec)
        self._drain()
        head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Content-Disposition: attachment",
                "Transfer-Encoding: chunked", "Vary: Origin, X-Origin, Referer",
                f"Date: {email.utils.formatdate(usegmt=True)}", f"Server: {self.version_string()}"]
        self._log(200)
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
        for event in gen.stream_events(rec):
            data = ("data: " + json.dumps(event) + "\r\n\r\n").encode()
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    # ---- control endpoints (no API key) ------------------------------------------------------
    def _control(self, what: str, method: str) -> None:
        emu = self.emu
        self._route = "control"
        body = self._json_body() if method in ("POST", "PUT") else {}
        if what == "state" and method == "GET":
            return self._send_json(emu.state_json())
        if what == "clock" and method == "POST":
            if "advance" in body:
                emu.clock.advance(float(body["advance"]))
            if "set" in body:
                from datetime import datetime
                emu.clock.set(datetime.fromisoformat(str(body["set"]).replace("Z", "+00:00")))
            return self._send_json({"now": rfc3339(emu.clock.now())})
        if what == "faults":
            if method == "POST":
                try:
                    fault = Fault.from_json(body)
                except (TypeError, ValueError) as e:
                    raise ApiError(400, str(e))
                emu.add_fault(fault)
                return self._send_json(fault.to_json())
            if method == "DELETE":
                emu.clear_faults()
                return self._send_json({})
            if method == "GET":
                return self._send_json({"faults": [f.to_json() for f in emu.faults]})
        if what == "batches" and method == "POST":
            return self._send_json(self._batch_control(body))
        if what == "holds" and method == "POST":
            return self._send_json({"released": emu.release_holds()})
        if what == "offline" and method == "POST":
            seconds = float(body.get("seconds", 0))
            self.close_connection = True
            self._send_json({"offlineSeconds": seconds})
            emu._offline_for(seconds)
            return None
        raise ApiError(404, html=HTML_404.format(path=self.path))

    def _batch_control(self, body: dict) -> dict:
        """Drive batches from outside the process: finish all, or fail/expire one by name."""
        emu, action = self.emu, body.get("action")
        if action == "finish":
            return {"finished": emu.finish_batches()}
        if action in ("fail", "expire") and body.get("name"):
            try:
                if action == "fail":
                    emu.fail_batch(str(body["name"]), str(body.get("message") or "Batch failed."))
                else:
                    emu.expire_batch(str(body["name"]))
            except KeyError:
                raise ApiError(404, f"Batch {body['name']} not found.")
            return {"name": body["name"], "action": action}
        raise ApiError(400, "Usage: " + _BATCH_CONTROL_USAGE)


class _NoMore(_Dropped):
    """An answer was sent by a fault; stop handling this request (connection stays open)."""
