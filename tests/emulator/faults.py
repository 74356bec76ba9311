"""Error bodies (google.rpc.Status JSON, verbatim where known) and fault injection.

Every error the emulator produces is an :class:`ApiError`; the HTTP layer renders it.
Message texts marked [A] in gemini-api.md are plausible guesses, the others are real.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Any

RATE_LIMIT_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. "
    "For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)
HELP_DETAIL = {
    "@type": "type.googleapis.com/google.rpc.Help",
    "links": [{"description": "Learn more about Gemini API quotas",
               "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}],
}
NEVER_RETRY_DELAY = "9223372036854775807s"

# HTTP code -> (google.rpc status name, default message)
STATUS_TABLE: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 access "
          "token, login cookie or other valid authentication credential. See "
          "https://developers.google.com/identity/sign-in/web/devconsole-project."),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Requested entity was not found."),
    409: ("ABORTED", "The operation was aborted."),
    429: ("RESOURCE_EXHAUSTED", RATE_LIMIT_MESSAGE),
    499: ("CANCELLED", "The operation was cancelled."),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report in "
          "https://developers.generativeai.google/guide/troubleshooting"),
    501: ("UNIMPLEMENTED", "Method not implemented."),
    502: ("UNAVAILABLE", "The service is currently unavailable."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}

HTML_502 = """<!DOCTYPE html>
<html lang=en>
  <meta charset=utf-8>
  <meta name=viewport content="initial-scale=1, minimum-scale=1, width=device-width">
  <title>Error 502 (Server Error)!!1</title>
  <a href=//www.google.com/><span id=logo aria-label=Google></span></a>
  <p><b>502.</b> <ins>That\u2019s an error.</ins>
  <p>The server encountered a temporary error and could not complete your request.<p>Please try again in 30 seconds.  <ins>That\u2019s all we know.</ins>
"""

HTML_404 = """<!DOCTYPE html>
<html lang=en>
  <meta charset=utf-8>
  <title>Error 404 (Not Found)!!1</title>
  <p><b>404.</b> <ins>That\u2019s an error.</ins>
  <p>The requested URL <code>{path}</code> was not found on this server.  <ins>That\u2019s all we know.</ins>
"""


class ApiError(Exception):
    """An error answer. ``plain`` renders ``message`` as a text/plain body (upload protocol errors)."""

    def __init__(self, code: int, message: str | None = None, status: str | None = None,
                 details: list[dict] | None = None, *, plain: bool = False,
                 html: str | None = None) -> None:
        default_status, default_message = STATUS_TABLE.get(code, ("UNKNOWN", "Unknown error."))
        self.code = code
        self.status = status or default_status
        self.message = default_message if message is None else message
        self.details = details
        self.plain = plain
        self.html = html
        super().__init__(f"{code} {self.status}: {self.message}")

    def body(self) -> dict:
        err: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            err["details"] = self.details
        return {"error": err}


def permission_denied(file_id: str) -> ApiError:
    return ApiError(403, f"You do not have permission to access the File {file_id} or it may not exist.")


def not_active(file_id: str) -> ApiError:
    return ApiError(400, f"The File {file_id} is not in an ACTIVE state and usage is not allowed.",
                    "FAILED_PRECONDITION")


def api_key_invalid() -> ApiError:
    msg = "API key not valid. Please pass a valid API key."
    return ApiError(400, msg, "INVALID_ARGUMENT", [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
         "domain": "googleapis.com",
         "metadata": {"service": "generativelanguage.googleapis.com"}},
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": msg},
    ])


def api_key_missing() -> ApiError:
    return ApiError(403, "Method doesn't allow unregistered callers (callers without established "
                    "identity). Please use API Key or other form of API consumer identity to call "
                    "this API.", "PERMISSION_DENIED")


def storage_quota(limit: int) -> ApiError:
    return ApiError(429, RATE_LIMIT_MESSAGE + "\n* Quota exceeded for metric: "
                    f"generativelanguage.googleapis.com/file_storage_bytes, limit: {limit}",
                    "RESOURCE_EXHAUSTED", [
                        {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                         "violations": [{"quotaMetric": "generativelanguage.googleapis.com/file_storage_bytes",
                                         "quotaId": "FileStorageBytesPerProject",
                                         "quotaValue": str(limit)}]},
                        HELP_DETAIL,
                        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": NEVER_RETRY_DELAY},
                    ])


def rate_limited(retry_delay: str = "2s", model: str = "gemini-2.5-flash", message: str | None = None) -> ApiError:
    return ApiError(429, message or RATE_LIMIT_MESSAGE, "RESOURCE_EXHAUSTED", [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
         "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                         "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                         "quotaDimensions": {"location": "global", "model": model},
                         "quotaValue": "10"}]},
        HELP_DETAIL,
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
    ])


# Route groups: a fault or a log query naming the group matches each of its routes.
ROUTE_GROUPS: dict[str, frozenset[str]] = {
    "generate": frozenset({"generate", "stream"}),
    "batches": frozenset({"batch_create", "batches_get", "batches_list", "batches_cancel", "batches_delete"}),
    "caches": frozenset({"caches_create", "caches_get", "caches_list", "caches_update", "caches_delete"}),
}
ROUTES = frozenset({"upload_start", "upload_chunk", "files_get", "files_list", "files_delete", "files_download",
                    "generate", "stream", "count_tokens", "any"}
                   | ROUTE_GROUPS["batches"] | ROUTE_GROUPS["caches"] | set(ROUTE_GROUPS))
KINDS = frozenset({"status", "non_json_502", "drop", "slow", "no_upload_status", "hold"})


def route_matches(pattern: str, route: str | None) -> bool:
    """'any' matches every API route; a group name matches its members; else the exact name."""
    if route is None or route == "control":
        return False
    return pattern == "any" or route in ROUTE_GROUPS.get(pattern, frozenset({pattern}))


@dataclass
class Fault:
    """A failure to inject. Matching faults are checked in the order they were added; the first
    one that fires handles the request (one fault per request).

    route "generate" matches generateContent and streamGenerateContent; "stream" only the latter;
    "batches" every Batch API route (batch_create, batches_get/list/cancel/delete); "caches" every
    cachedContents route (caches_create/get/list/update/delete); "files_download" a file download;
    "any" matches every API route (never the /_emulator control endpoints).
    ``skip`` lets the first N matching requests through untouched (e.g. fail only the 2nd chunk).
    ``injected`` counts how often this fault fired.

    kinds:
      status            a JSON google.rpc.Status error with HTTP ``status`` (429 carries QuotaFailure,
                        Help and RetryInfo ``retry_delay``); on upload routes with
                        ``X-Goog-Upload-Status: final``, so the SDK raises at once.
      non_json_502      an HTML 502 (SDK: ServerError, e.status == "Bad Gateway").
      drop              close the connection with no answer (an upload chunk is cut mid-body with
                        an RST) -> a raw httpx2 TransportError in the client, never an APIError.
      slow              sleep ``delay`` seconds, then answer normally (pair with HttpOptions(timeout)).
      hold              block until ``Emulator.release_holds()`` (or ``timeout`` seconds, default 60),
                        then answer normally: a network call that hangs while the client must keep
                        working. ``Emulator.held_requests`` counts requests blocked right now.
      no_upload_status  a 503 without X-Goog-Upload-Status. On a chunk the SDK re-sends the same
                        chunk after sleeping 1 s, then 2 s, then 4 s: times=1 costs 1 s, times=3
                        costs ~7 s and ends in ServerError 503. The chunk is discarded, so the
                        re-sent chunk is accepted.
    """

    route: str = "any"
    kind: str = "status"
    status: int = 503
    times: int | None = None
    probability: float | None = None
    delay: float = 0.0
    timeout: float = 60.0
    retry_delay: str = "2s"
    seed: int | None = None
    skip: int = 0
    message: str | None = None
    injected: int = field(default=0, init=False)
    seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"unknown fault route {self.route!r}; expected one of {sorted(ROUTES)}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        self._rng = random.Random(self.seed)

    @property
    def active(self) -> bool:
        return self.times is None or self.injected < self.times

    def matches(self, route: str) -> bool:
        return route_matches(self.route, route)

    def fire(self) -> bool:
        """Called (under the emulator lock) for a matching request: decide whether to inject."""
        self.seen += 1
        if self.seen <= self.skip or not self.active:
            return False
        if self.probability is not None and self._rng.random() >= self.probability:
            return False
        self.injected += 1
        return True

    def error(self, model: str = "gemini-2.5-flash") -> ApiError:
        if self.status == 429:
            return rate_limited(self.retry_delay, model, self.message)
        return ApiError(self.status, self.message)

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["active"] = self.active
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Fault":
        allowed = {f.name for f in fields(cls) if f.init}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown Fault fields: {sorted(unknown)}")
        return cls(**d)
