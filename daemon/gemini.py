"""The only module that imports google.genai: a narrow client for the Files API and prompts, and the one
place where SDK and transport errors become the daemon's own (daemon.errors).

The SDK's defaults are dangerous for a daemon (no timeout, no retry; RetryInfo ignored), so both are set
here explicitly. 429s are not retried by the SDK: the daemon decides (a storage-quota 429 means "free
space", a rate-limit 429 carries a delay worth honouring).
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from daemon.config import GeminiSettings
from daemon.errors import (
    AuthError,
    GenerationTimeout,
    OfflineError,
    PermanentError,
    RemoteFileGone,
    StorageQuotaFull,
    TransientError,
    UnsupportedFormat,
)

if TYPE_CHECKING:
    from google import genai
    from google.genai import types

log = logging.getLogger(__name__)

# Every file we upload carries "audiodrop-<instance>-" in its display name; files without it are never touched.
DISPLAY_PREFIX = "audiodrop-"
# A RetryInfo delay longer than this is not a real delay (the storage quota's is about 2^63 s).
SANE_RETRY_SECONDS = 3600.0
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RemoteFile:
    name: str
    uri: str
    mime_type: str
    size_bytes: int
    state: str  # PROCESSING, ACTIVE, FAILED
    expires_at: datetime | None
    display_name: str | None
    sha256_hex: str | None
    error: str | None = None


@dataclass(frozen=True)
class FilePart:
    uri: str
    mime_type: str


@dataclass(frozen=True)
class InlinePart:
    data: bytes
    mime_type: str


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # STOP, MAX_TOKENS, SAFETY, RECITATION, OTHER, ... or NONE when the answer has none
    prompt_tokens: int | None
    audio_tokens: int | None
    output_tokens: int | None
    model_version: str | None
    thinking_tokens: int | None = None  # billed as output, not part of the text
    cached_tokens: int | None = None  # cachedContentTokenCount: the part of prompt_tokens read from a cache
    cached_audio_tokens: int | None = None  # the AUDIO entry of cacheTokensDetails (None: not given)


def _contents(parts: list[FilePart | InlinePart | str]) -> list[types.Part]:
    from google.genai import types

    built = []
    for part in parts:
        if isinstance(part, FilePart):
            built.append(types.Part.from_uri(file_uri=part.uri, mime_type=part.mime_type))
        elif isinstance(part, InlinePart):
            built.append(types.Part.from_bytes(data=part.data, mime_type=part.mime_type))
        else:
            built.append(types.Part.from_text(text=part))
    return built


def display_prefix(instance_id: str) -> str:
    return f"{DISPLAY_PREFIX}{instance_id}-"


def display_name_for(instance_id: str, recording_id: int, sha256: str) -> str:
    """Marks a remote file as this installation's and names its recording; never the user's file name
    (which may be non-ASCII or private)."""
    return f"{display_prefix(instance_id)}{recording_id}-{sha256[:16]}"


def _sha256_hex(value: str | None) -> str | None:
    # The server sends base64 of the lowercase hex digest text, not of the raw digest.
    if not value:
        return None
    try:
        decoded = base64.b64decode(value).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", decoded) else None


def _remote(file: types.File) -> RemoteFile:
    state = file.state.value if file.state is not None else "STATE_UNSPECIFIED"
    error = file.error.message if file.error is not None else None
    return RemoteFile(
        name=file.name or "",
        uri=file.uri or "",
        mime_type=file.mime_type or "",
        size_bytes=int(file.size_bytes or 0),
        state=state,
        expires_at=file.expiration_time,
        display_name=file.display_name,
        sha256_hex=_sha256_hex(file.sha256_hash),
        error=error,
    )


def _retry_delay(details: Any) -> float | None:
    """The RetryInfo delay of an error body, if any and sane."""
    error = details.get("error", {}) if isinstance(details, dict) else {}
    for item in error.get("details", []) or []:
        if isinstance(item, dict) and item.get("@type", "").endswith("google.rpc.RetryInfo"):
            match = re.fullmatch(r"(\d+(?:\.\d+)?)s", str(item.get("retryDelay", "")))
            if match:
                seconds = float(match.group(1))
                return seconds if seconds <= SANE_RETRY_SECONDS else None
    return None


def _is_storage_quota(err: Any) -> bool:
    text = f"{err.message} {err.details}"
    return "file_storage_bytes" in text or "FileStorageBytesPerProject" in text


def translate(err: BaseException, *, subject: str) -> Exception:
    """The daemon error for an SDK or transport error; `subject` names what was being done."""
    import httpx2
    from google.genai import errors as genai_errors

    if isinstance(err, httpx2.ConnectError):
        return OfflineError(f"{subject}: the Gemini API cannot be reached ({err})",
                            "check the network; everything waits and resumes by itself")
    if isinstance(err, httpx2.TimeoutException):
        return TransientError(f"{subject}: timed out ({type(err).__name__})", "retried automatically")
    if isinstance(err, httpx2.TransportError):
        return TransientError(f"{subject}: connection lost ({type(err).__name__}: {err})", "retried automatically")
    if isinstance(err, genai_errors.APIError):
        code, status, message = err.code, err.status or "", (err.message or "").strip()
        described = f"{code} {status}: {message}".strip(": ")
        if code == 403 and "may not exist" in message:
            return RemoteFileGone(f"{subject}: the remote file is gone ({described})", "it is uploaded again")
        if code in (401, 403) or "API key" in message or "API_KEY" in str(err.details):
            return AuthError(f"{subject}: the API key was refused ({described})",
                             "set a valid key in GEMINI_API_KEY, gemini.api_key_file or the gemini-api-key credential")
        if code == 429 and _is_storage_quota(err):
            return StorageQuotaFull(f"{subject}: the project's Files API storage is full ({described})",
                                    "audiodrop frees space by deleting its own unneeded uploads")
        if code in TRANSIENT_STATUS:
            return TransientError(f"{subject}: {described or 'server error'}", "retried automatically",
                                  retry_after=_retry_delay(err.details), status=code)
        if code == 400 and "mime type" in message.lower():
            return UnsupportedFormat(f"{subject}: the API refused the format ({described})",
                                     "the recording is re-encoded to the fallback format")
        return PermanentError(f"{subject}: the API refused the request ({described})",
                              "fix the cause, then run `audiodrop retry ID`")
    if isinstance(err, ValueError) and "upload" in str(err).lower():
        return TransientError(f"{subject}: upload not finalized ({err})", "retried automatically")
    return err if isinstance(err, Exception) else RuntimeError(str(err))


@contextmanager
def convert_api_errors(subject: str) -> Iterator[None]:
    import httpx2
    from google.genai import errors as genai_errors

    try:
        yield
    except (genai_errors.APIError, httpx2.HTTPError, ValueError) as err:
        translated = translate(err, subject=subject)
        if translated is err:
            raise
        raise translated from err


def generation_of(response: types.GenerateContentResponse) -> Generation:
    """A generateContent answer (direct, or one of a batch's) as the daemon keeps it."""
    candidate = response.candidates[0] if response.candidates else None
    reason = candidate.finish_reason.value if candidate is not None and candidate.finish_reason else "NONE"
    usage = response.usage_metadata

    def audio_of(details: list[types.ModalityTokenCount] | None) -> int | None:
        if not details:
            return None
        return sum(d.token_count or 0 for d in details if d.modality is not None and d.modality.value == "AUDIO")

    text = ""
    if candidate is not None and candidate.content is not None and candidate.content.parts:
        text = "".join(part.text or "" for part in candidate.content.parts if not part.thought)
    return Generation(text=text, finish_reason=reason,
                      prompt_tokens=usage.prompt_token_count if usage else None,
                      audio_tokens=audio_of(usage.prompt_tokens_details) if usage else None,
                      output_tokens=usage.candidates_token_count if usage else None,
                      model_version=response.model_version,
                      thinking_tokens=usage.thoughts_token_count if usage else None,
                      cached_tokens=usage.cached_content_token_count if usage else None,
                      cached_audio_tokens=audio_of(usage.cache_tokens_details) if usage else None)


# -- the Batch API (daemon.prompts.batch) -------------------------------------------------------------------------
# A job's states as the SDK names them, without the JOB_STATE_ prefix. PARTIALLY_SUCCEEDED (Vertex only) carries
# answers like SUCCEEDED; the others end a job without any.
BATCH_FINISHED = frozenset({"SUCCEEDED", "PARTIALLY_SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"})


@dataclass(frozen=True)
class BatchRequest:
    """One generateContent request of a Batch API job; `key` travels as its metadata and names its answer."""

    key: str
    parts: list[FilePart | InlinePart | str]
    system_instruction: str | None = None
    max_output_tokens: int | None = None
    thinking_budget: int | None = None


@dataclass(frozen=True)
class BatchAnswer:
    """One request's outcome: its generation, or its own error (google.rpc.Status: gRPC code and message)."""

    generation: Generation | None
    error: str | None = None
    code: int | None = None


@dataclass(frozen=True)
class BatchJob:
    name: str
    state: str  # PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED, ... (see BATCH_FINISHED)
    display_name: str | None
    answers: dict[str, BatchAnswer]  # by request key; a request without an answer is missing
    error: str | None = None
    by_order: int = 0  # answers matched to requests by their position, for want of metadata

    @property
    def finished(self) -> bool:
        return self.state in BATCH_FINISHED


def match_answers(keys: list[str], answers: list[tuple[str | None, BatchAnswer]]) -> tuple[dict[str, BatchAnswer],
                                                                                          int]:
    """Answers to the requests they belong to. Each answer names its request by the key in its metadata; the
    service has been seen to return inlined answers out of order (python-genai #1909) and, now and then, without
    their metadata. Answers without a key are given, in order, to the requests not answered by key, and only when
    their numbers agree: order is the one clue left, and it is right only if the service kept the order. Returns
    the answers by key and how many were matched by position."""
    matched: dict[str, BatchAnswer] = {}
    unlabelled: list[BatchAnswer] = []
    for key, answer in answers:
        if key is None:
            unlabelled.append(answer)
        elif key in keys and key not in matched:
            matched[key] = answer  # an unknown or repeated key names no request of ours: left out
    rest = [key for key in keys if key not in matched]
    if unlabelled and len(unlabelled) == len(rest):
        matched.update(zip(rest, unlabelled, strict=True))
        return matched, len(rest)
    return matched, 0


def _batch_job(job: types.BatchJob, keys: list[str]) -> BatchJob:
    state = job.state.value.removeprefix("JOB_STATE_") if job.state is not None else "STATE_UNSPECIFIED"
    answers: list[tuple[str | None, BatchAnswer]] = []
    for item in (job.dest.inlined_responses if job.dest is not None else None) or []:
        key = (item.metadata or {}).get("key")
        if item.response is not None:
            answers.append((key, BatchAnswer(generation_of(item.response))))
        else:
            status = item.error
            answers.append((key, BatchAnswer(None, status.message if status else "the request has no answer",
                                             status.code if status else None)))
    matched, by_order = match_answers(keys, answers)
    return BatchJob(name=job.name or "", state=state, display_name=job.display_name, answers=matched,
                    error=job.error.message if job.error is not None else None, by_order=by_order)


class ApiClient(Protocol):
    """What the daemon asks of the Gemini API: the seam the context injects (GeminiClient in the daemon, a fake in
    tests that cannot reach the emulator's behaviour any other way)."""

    def warm(self) -> None: ...
    def upload(self, path: Path, *, mime_type: str, display_name: str,
               progress: Callable[[int], None] | None = None) -> RemoteFile: ...
    def get(self, name: str) -> RemoteFile: ...
    def delete(self, name: str) -> None: ...
    def list_files(self) -> list[RemoteFile]: ...
    def generate(self, model: str, parts: list[FilePart | InlinePart | str], *,
                 system_instruction: str | None = None, max_output_tokens: int | None = None,
                 thinking_budget: int | None = None, timeout_seconds: float | None = None) -> Generation: ...
    def count_tokens(self, model: str, parts: list[FilePart | InlinePart | str]) -> int: ...
    def create_batch(self, model: str, requests: list[BatchRequest], display_name: str) -> str: ...
    def get_batch(self, name: str, keys: list[str]) -> BatchJob: ...
    def find_batch(self, display_name: str, *, newest: int = 200) -> str | None: ...
    def cancel_batch(self, name: str) -> None: ...
    def delete_batch(self, name: str) -> None: ...
    def close(self) -> None: ...


class GeminiClient:
    """Files API and prompts over the real SDK, with explicit timeouts and retries. The SDK (about 40 MB of
    memory) is imported at the first call, so a daemon with no API work to do never loads it."""

    def __init__(self, api_key: str, settings: GeminiSettings, *, attempts: int = 3) -> None:
        self.settings = settings
        self._api_key = api_key
        self._attempts = attempts
        self._made: genai.Client | None = None
        self._lock = threading.Lock()

    @property
    def _client(self) -> genai.Client:
        with self._lock:
            if self._made is None:
                from google import genai
                from google.genai import types

                options: dict[str, Any] = {
                    "timeout": int(self.settings.request_timeout_seconds * 1000),
                    # 429 is left out on purpose: the daemon treats storage and rate 429s differently.
                    "retry_options": types.HttpRetryOptions(attempts=self._attempts, initial_delay=1.0,
                                                            max_delay=8.0,
                                                            http_status_codes=[408, 500, 502, 503, 504]),
                }
                if self.settings.base_url:
                    options["base_url"] = self.settings.base_url
                if self.settings.api_version:
                    options["api_version"] = self.settings.api_version
                self._made = genai.Client(api_key=self._api_key, http_options=types.HttpOptions(**options))
            return self._made

    def warm(self) -> None:
        """Load the SDK now: a request counted against a rate limit must leave at once, not a second later."""
        self._client  # noqa: B018 (the property imports and builds the client)

    def upload(self, path: Path, *, mime_type: str, display_name: str,
               progress: Callable[[int], None] | None = None) -> RemoteFile:
        """`progress`: told the bytes handed to the SDK so far (it sends each chunk of up to 8 MB as it reads it)."""
        from google.genai import types

        from daemon.counting_reader import CountingReader

        # An open file object, not a path: the SDK puts a path's basename in a header, which breaks on
        # non-ASCII names. The MIME type is always explicit (guessing is host-dependent).
        config = types.UploadFileConfig(
            mime_type=mime_type,
            display_name=display_name,
            http_options=types.HttpOptions(timeout=int(self.settings.upload_timeout_seconds * 1000)),
        )
        with convert_api_errors(f"upload of {path.name}"), open(path, "rb") as stream:
            source = stream if progress is None else CountingReader(stream, progress)
            return _remote(self._client.files.upload(file=source, config=config))

    def get(self, name: str) -> RemoteFile:
        with convert_api_errors(f"files.get {name}"):
            return _remote(self._client.files.get(name=name))

    def delete(self, name: str) -> None:
        with convert_api_errors(f"files.delete {name}"):
            self._client.files.delete(name=name)

    def list_files(self) -> list[RemoteFile]:
        with convert_api_errors("files.list"):
            return [_remote(f) for f in self._client.files.list(config={"page_size": 100})]

    def generate(self, model: str, parts: list[FilePart | InlinePart | str], *,
                 system_instruction: str | None = None, max_output_tokens: int | None = None,
                 thinking_budget: int | None = None, timeout_seconds: float | None = None) -> Generation:
        """One generateContent call. Its time limit is its own (long answers take minutes), and the SDK never
        re-sends it after a timeout: each attempt may be billed, so the caller decides (GenerationTimeout)."""
        import httpx2
        from google.genai import types

        thinking = types.ThinkingConfig(thinking_budget=thinking_budget) if thinking_budget is not None else None
        limit = timeout_seconds or self.settings.request_timeout_seconds
        # attempts=1: the SDK would re-send a timed-out request too (it cannot tell a timeout from a 5xx here).
        http = types.HttpOptions(timeout=int(limit * 1000), retry_options=types.HttpRetryOptions(attempts=1))
        config = types.GenerateContentConfig(system_instruction=system_instruction,
                                             max_output_tokens=max_output_tokens, thinking_config=thinking,
                                             http_options=http)
        try:
            with convert_api_errors(f"prompt to {model}"):
                response = self._client.models.generate_content(model=model, contents=_contents(parts),
                                                                config=config)
        except TransientError as err:
            if isinstance(err.__cause__, httpx2.TimeoutException):
                raise GenerationTimeout(f"prompt to {model}: no answer within {limit:g} s",
                                        "prompts.generate_timeout_seconds is the time limit of one generation") \
                    from err.__cause__
            raise
        return generation_of(response)

    def count_tokens(self, model: str, parts: list[FilePart | InlinePart | str]) -> int:
        with convert_api_errors(f"countTokens on {model}"):
            return int(self._client.models.count_tokens(model=model, contents=_contents(parts)).total_tokens or 0)

    # -- the Batch API -----------------------------------------------------------------------------------------

    def create_batch(self, model: str, requests: list[BatchRequest], display_name: str) -> str:
        """Create a Batch API job of inlined requests; its name ("batches/..."). Sent once: a create whose answer
        is lost may still have made the job, which the caller finds again by `display_name` (find_batch)."""
        from google.genai import types

        inlined = []
        for request in requests:
            thinking = types.ThinkingConfig(thinking_budget=request.thinking_budget) \
                if request.thinking_budget is not None else None
            config = types.GenerateContentConfig(system_instruction=request.system_instruction,
                                                 max_output_tokens=request.max_output_tokens, thinking_config=thinking)
            inlined.append(types.InlinedRequest(contents=[types.Content(role="user", parts=_contents(request.parts))],
                                                metadata={"key": request.key}, config=config))
        options = types.CreateBatchJobConfig(display_name=display_name, http_options=types.HttpOptions(
            retry_options=types.HttpRetryOptions(attempts=1)))
        with convert_api_errors(f"batches.create on {model}"):
            job = self._client.batches.create(model=model, src=inlined, config=options)
        return job.name or ""

    def get_batch(self, name: str, keys: list[str]) -> BatchJob:
        """A job's state and, once it has them, its answers by request key (`keys`: the requests' keys, in the
        order they were sent)."""
        with convert_api_errors(f"batches.get {name}"):
            return _batch_job(self._client.batches.get(name=name), keys)

    def find_batch(self, display_name: str, *, newest: int = 200) -> str | None:
        """The name of the job with this display name among the `newest` jobs, if one is there."""
        with convert_api_errors("batches.list"):
            for index, job in enumerate(self._client.batches.list(config={"page_size": 50})):
                if job.display_name == display_name:
                    return job.name
                if index + 1 >= newest:
                    break
        return None

    def cancel_batch(self, name: str) -> None:
        with convert_api_errors(f"batches.cancel {name}"):
            self._client.batches.cancel(name=name)

    def delete_batch(self, name: str) -> None:
        with convert_api_errors(f"batches.delete {name}"):
            self._client.batches.delete(name=name)

    def close(self) -> None:
        with self._lock:
            if self._made is not None:
                self._made.close()
