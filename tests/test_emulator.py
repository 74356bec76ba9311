"""The Gemini API emulator, driven by the real google-genai SDK over loopback HTTP."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import httpx2
import pytest
from google import genai
from google.genai import errors, types

from tests.emulator import Emulator, Fault, analyse_audio, speech

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def wav(tmp_path_factory) -> Path:
    """3 s of 440 Hz, mono 16 kHz PCM WAV (96,078 bytes)."""
    path = tmp_path_factory.mktemp("audio") / "tone.wav"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=3", "-ac", "1", "-ar", "16000", str(path)], check=True)
    return path


def make_emu(**kw) -> Emulator:
    kw.setdefault("processing_polls", 0)
    return Emulator(api_key="test-key", **kw)


@pytest.fixture
def emu():
    e = make_emu()
    e.start()
    yield e
    e.stop()
    assert e.internal_errors == []


def sdk(emu: Emulator, key: str = "test-key", **http) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=emu.base_url, **http))


@pytest.fixture
def client(emu):
    with sdk(emu) as c:
        yield c


def raw_get(emu: Emulator, path: str) -> dict:
    req = urllib.request.Request(emu.base_url + path, headers={"x-goog-api-key": "test-key"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def control(emu: Emulator, path: str, body: dict | None = None, method: str = "POST") -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(emu.base_url + "/_emulator/" + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def upload_bytes(client: genai.Client, data: bytes, mime: str = "audio/wav", **cfg) -> types.File:
    return client.files.upload(file=io.BytesIO(data), config=dict(mime_type=mime, **cfg))


def error_detail(e: errors.APIError, type_suffix: str) -> dict:
    return next(d for d in e.details["error"]["details"] if d["@type"].endswith(type_suffix))


# ---- uploads -------------------------------------------------------------------------------------
def test_path_upload_returns_active_file_with_real_hash_and_48h_expiry(emu, client, wav):
    f = client.files.upload(file=str(wav), config={"display_name": "Tone"})
    data = wav.read_bytes()
    assert re.fullmatch(r"files/[a-z0-9]{12}", f.name)
    assert (f.display_name, f.mime_type, f.size_bytes) == ("Tone", "audio/x-wav", len(data))
    assert f.state == types.FileState.ACTIVE
    assert base64.b64decode(f.sha256_hash).decode() == hashlib.sha256(data).hexdigest()
    assert f.expiration_time - f.create_time == timedelta(hours=48)
    assert f.uri == f"https://generativelanguage.googleapis.com/v1/files/{f.name[6:]}"
    (stored,) = emu.files
    assert stored.name == f.name and stored.path.read_bytes() == data
    assert stored.sha256_hex == hashlib.sha256(data).hexdigest()
    start = emu.stats.requests[0]
    assert (start.method, start.path, start.status) == ("POST", "/upload/v1/files", 200)


def test_file_json_on_the_wire_matches_the_real_format(emu, client, wav):
    with open(wav, "rb") as fh:               # open-file upload: no display name, explicit MIME
        f = client.files.upload(file=fh, config={"mime_type": "audio/wav"})
    raw = raw_get(emu, "/v1/files/" + f.name[6:])
    assert "displayName" not in raw
    assert raw["sizeBytes"] == str(wav.stat().st_size) and raw["mimeType"] == "audio/wav"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", raw["createTime"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", raw["expirationTime"])
    assert len(raw["sha256Hash"]) == 88 and raw["source"] == "UPLOADED" and raw["state"] == "ACTIVE"
    assert emu.files[0].path.read_bytes() == wav.read_bytes()


def test_20_mib_upload_goes_in_three_chunks_and_is_hashed(emu, client, tmp_path):
    big = tmp_path / "big.bin"
    data = os.urandom(20 * MiB)
    big.write_bytes(data)
    f = client.files.upload(file=big, config={"mime_type": "audio/flac"})
    chunks = [(c.offset, c.length, c.command) for c in emu.upload_chunks]
    assert chunks == [(0, 8 * MiB, "upload"), (8 * MiB, 8 * MiB, "upload"),
                      (16 * MiB, 4 * MiB, "upload, finalize")]
    assert f.size_bytes == 20 * MiB
    assert emu.files[0].sha256_hex == hashlib.sha256(data).hexdigest()
    assert emu.stats.used_bytes == 20 * MiB


def test_zero_byte_upload(emu, client):
    f = upload_bytes(client, b"", "text/plain")
    assert f.size_bytes == 0 and f.state == types.FileState.ACTIVE
    assert [(c.offset, c.length, c.command) for c in emu.upload_chunks] == [(0, 0, "upload, finalize")]
    assert emu.files[0].sha256_hex == hashlib.sha256(b"").hexdigest()


def test_custom_name_and_duplicate_name(emu, client):
    f = upload_bytes(client, b"abc", "text/plain", name="my-id-1")
    assert f.name == "files/my-id-1"
    with pytest.raises(errors.ClientError) as ei:
        upload_bytes(client, b"abc", "text/plain", name="my-id-1")
    assert (ei.value.code, ei.value.status) == (409, "ALREADY_EXISTS")


def test_list_pages_and_delete(emu, client):
    assert raw_get(emu, "/v1/files") == {}                       # empty project: no "files" key
    names = [upload_bytes(client, bytes([i]) * 10, "text/plain").name for i in range(5)]
    listed = [f.name for f in client.files.list(config={"page_size": 2})]
    assert sorted(listed) == sorted(names) and len(listed) == 5
    list_calls = [r.path for r in emu.stats.requests if r.path.startswith("/v1/files?")]
    assert len(list_calls) == 3 and "pageToken=" in list_calls[1] and "pageToken=" in list_calls[2]
    assert "nextPageToken" not in raw_get(emu, "/v1/files?pageSize=5")
    client.files.delete(name=names[0])
    assert emu.stats.deletes == 1
    assert names[0] not in [f.name for f in client.files.list()]
    deleted = emu.file(names[0])
    assert deleted.deleted_at is not None and deleted.delete_reason == "deleted"
    with pytest.raises(errors.ClientError) as ei:
        client.files.delete(name=names[0])
    assert (ei.value.code, ei.value.status) == (403, "PERMISSION_DENIED")


def test_processing_then_active_and_failed_precondition(client, emu, wav):
    emu.processing_polls = 2
    f = client.files.upload(file=wav)
    assert f.state == types.FileState.PROCESSING           # the finalize answer itself
    with pytest.raises(errors.ClientError) as ei:
        client.models.generate_content(model="gemini-2.5-flash", contents=[f, "Transcribe"])
    assert (ei.value.code, ei.value.status) == (400, "FAILED_PRECONDITION")
    assert ei.value.message == f"The File {f.name[6:]} is not in an ACTIVE state and usage is not allowed."
    states = [client.files.get(name=f.name).state for _ in range(3)]
    assert states == [types.FileState.PROCESSING, types.FileState.PROCESSING, types.FileState.ACTIVE]
    r = client.models.generate_content(model="gemini-2.5-flash", contents=[f, "Transcribe"])
    assert f.name in r.text


def test_failed_processing_reports_error(client, emu):
    emu.processing_polls = 1
    emu.fail_processing = lambda sf: "Audio codec not supported." if sf.display_name == "bad" else None
    bad = upload_bytes(client, b"x" * 100, display_name="bad")
    good = upload_bytes(client, b"y" * 100, display_name="good")
    for _ in range(2):
        bad, good = client.files.get(name=bad.name), client.files.get(name=good.name)
    assert bad.state == types.FileState.FAILED and bad.error.message == "Audio codec not supported."
    assert good.state == types.FileState.ACTIVE and good.error is None


def test_expiry_on_clock_advance(client, emu, wav):
    f = client.files.upload(file=wav)
    emu.clock.advance(48 * 3600 - 60)
    assert client.files.get(name=f.name).state == types.FileState.ACTIVE
    emu.clock.advance(61)
    for call in (lambda: client.files.get(name=f.name), lambda: client.files.delete(name=f.name),
                 lambda: client.models.generate_content(model="gemini-2.5-flash", contents=[f, "hi"])):
        with pytest.raises(errors.ClientError) as ei:
            call()
        assert (ei.value.code, ei.value.status) == (403, "PERMISSION_DENIED")
        assert "or it may not exist" in ei.value.message
    assert list(client.files.list()) == [] and emu.files == [] and emu.stats.used_bytes == 0
    (gone,) = emu.all_files
    assert gone.delete_reason == "expired" and gone.deleted_at == gone.expiration_time


# ---- quota, limits, auth -------------------------------------------------------------------------
def test_storage_quota_429_and_high_water(wav):
    size = wav.stat().st_size
    with make_emu(storage_limit_bytes=size + 1000) as emu, sdk(emu) as client:
        first = client.files.upload(file=wav)
        small = upload_bytes(client, b"z" * 1000)
        with pytest.raises(errors.ClientError) as ei:
            client.files.upload(file=wav)
        e = ei.value
        assert (e.code, e.status) == (429, "RESOURCE_EXHAUSTED")
        assert e.message.endswith("* Quota exceeded for metric: generativelanguage.googleapis.com/"
                                  f"file_storage_bytes, limit: {size + 1000}")
        violation = error_detail(e, "QuotaFailure")["violations"][0]
        assert violation["quotaId"] == "FileStorageBytesPerProject"
        assert violation["quotaValue"] == str(size + 1000)
        assert error_detail(e, "RetryInfo")["retryDelay"] == "9223372036854775807s"
        assert len(emu.upload_chunks) == 2                       # refused at start: no bytes sent
        client.files.delete(name=first.name)
        assert emu.stats.used_bytes == 1000 and emu.stats.high_water_bytes == size + 1000
        client.files.upload(file=wav)                            # room again
        assert [f.name for f in emu.files][0] == small.name
        assert emu.internal_errors == []


def test_per_file_limit_400():
    with make_emu(max_file_bytes=1000) as emu, sdk(emu) as client:
        upload_bytes(client, b"a" * 1000)
        with pytest.raises(errors.ClientError) as ei:
            upload_bytes(client, b"a" * 1001)
        assert (ei.value.code, ei.value.status) == (400, "INVALID_ARGUMENT")
        assert ei.value.response.headers["x-goog-upload-status"] == "final"
        assert emu.stats.uploads_started == 1


def test_wrong_api_key(emu):
    with sdk(emu, key="wrong-key") as bad:
        with pytest.raises(errors.ClientError) as ei:
            list(bad.files.list())
    e = ei.value
    assert (e.code, e.status, e.message) == (400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
    assert error_detail(e, "ErrorInfo")["reason"] == "API_KEY_INVALID"


def test_any_key_mode_and_v1beta(wav):
    with Emulator(api_key=None, processing_polls=0) as emu, \
            sdk(emu, key="whatever", api_version="v1beta") as client:
        f = client.files.upload(file=wav)
        assert f.uri.endswith("/v1beta/files/" + f.name[6:])
        r = client.models.generate_content(model="gemini-2.5-flash", contents=[f, "go"])
        assert r.usage_metadata.prompt_token_count == 96 + 1
        assert {p for _, p, _ in emu.stats.requests if p.startswith("/v1beta/")}


# ---- generateContent / countTokens / stream ------------------------------------------------------
def test_generate_with_file_and_inline_audio(client, emu, wav):
    f = client.files.upload(file=wav)
    data = wav.read_bytes()
    r = client.models.generate_content(
        model="gemini-2.5-flash",
        contents=[f, types.Part.from_bytes(data=data, mime_type="audio/wav"), "Transcribe this"],
        config=types.GenerateContentConfig(system_instruction="be terse", temperature=0.0))
    by = {d.modality: d.token_count for d in r.usage_metadata.prompt_tokens_details}
    assert by == {types.MediaModality.AUDIO: 2 * 96, types.MediaModality.TEXT: 4 + 2}
    assert r.usage_metadata.total_token_count == r.usage_metadata.prompt_token_count + r.usage_metadata.candidates_token_count
    assert r.candidates[0].finish_reason == types.FinishReason.STOP
    assert r.text.splitlines() == [f"[00:00] Speaker 1: segment 1 of {f.name}",
                                   "[00:00] Speaker 1: segment 1 of inline audio 2"]
    rec = emu.generate_requests[-1]
    assert rec.file_names == [f.name] and rec.audio_seconds == 6.0
    assert rec.parts[1].data == data                               # URL-safe base64 decoded right
    assert rec.system_instruction == "be terse" and rec.generation_config["temperature"] == 0.0
    assert rec.response_text == r.text


def test_long_audio_transcript_uses_hours(client, emu, tmp_path):
    long_wav = tmp_path / "long.wav"                    # 1 h 0 min 30.5 s of silence, 3.6 MB
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "anullsrc=r=1000:cl=mono", "-t", "3630.5", "-c:a", "pcm_u8", str(long_wav)], check=True)
    f = client.files.upload(file=long_wav)
    r = client.models.generate_content(model="gemini-2.5-flash", contents=[f, "Transcribe"])
    lines = r.text.splitlines()
    assert len(lines) == 122 and lines[1] == f"[00:30] Speaker 2: segment 2 of {f.name}"
    assert lines[-1] == f"[01:00:30] Speaker 2: segment 122 of {f.name}"
    audio = [d.token_count for d in r.usage_metadata.prompt_tokens_details if d.modality == types.MediaModality.AUDIO]
    assert audio == [116176]                            # ceil(3630.5 * 32)


def test_unsupported_mime_and_configurable_set(wav):
    types_no_ogg = {"audio/wav", "audio/x-wav", "text/plain"}
    with make_emu(supported_mime_types=types_no_ogg) as emu, sdk(emu) as client:
        f = client.files.upload(file=wav, config={"mime_type": "audio/ogg"})   # upload accepts any type
        with pytest.raises(errors.ClientError) as ei:
            client.models.generate_content(model="gemini-2.5-flash", contents=[f, "x"])
        assert (ei.value.code, ei.value.status, ei.value.message) == (
            400, "INVALID_ARGUMENT", "Unsupported MIME type: audio/ogg")
        with pytest.raises(errors.ClientError, match="Unsupported MIME type: application/octet-stream"):
            client.models.generate_content(model="gemini-2.5-flash", contents=[
                types.Part.from_bytes(data=b"\0" * 10, mime_type="application/octet-stream")])
        assert emu.generate_requests == [] and emu.stats.generate_calls == 2


def test_max_tokens_truncation(client, emu):
    emu.responder = lambda rec: "word " * 100
    r = client.models.generate_content(model="gemini-2.5-flash", contents="hello",
                                       config={"max_output_tokens": 10})
    assert r.text == ("word " * 100)[:40]
    assert r.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert r.usage_metadata.candidates_token_count == 10
    emu.responder = lambda rec: None                                    # None -> default text
    r = client.models.generate_content(model="gemini-2.5-flash", contents="hello")
    assert r.text == "Emulated reply to: hello"


def test_thinking_tokens_come_out_of_the_output_budget_and_a_thinking_budget_caps_them(client, emu):
    emu.thinking_tokens = 50
    emu.responder = lambda rec: "word " * 20                           # 25 tokens of answer
    r = client.models.generate_content(model="gemini-2.5-flash", contents="hello",
                                       config={"max_output_tokens": 60})
    assert r.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert r.text == ("word " * 20)[:40]                                # 60 - 50 thinking = 10 tokens left
    assert r.usage_metadata.thoughts_token_count == 50
    r = client.models.generate_content(model="gemini-2.5-flash", contents="hello", config=types.GenerateContentConfig(
        max_output_tokens=60, thinking_config=types.ThinkingConfig(thinking_budget=20)))
    assert r.candidates[0].finish_reason == types.FinishReason.STOP and r.text == "word " * 20
    assert r.usage_metadata.thoughts_token_count == 20
    assert r.usage_metadata.total_token_count == r.usage_metadata.prompt_token_count + 25 + 20
    with pytest.raises(errors.ClientError) as refused:
        client.models.generate_content(model="gemini-2.5-pro", contents="hello", config=types.GenerateContentConfig(
            thinking_config=types.ThinkingConfig(thinking_budget=0)))
    assert refused.value.code == 400 and "only works in thinking mode" in refused.value.message


def test_count_tokens(client, emu, wav):
    f = client.files.upload(file=wav)
    r = client.models.count_tokens(model="gemini-2.5-flash", contents=[f, "Transcribe"])
    assert r.total_tokens == 96 + 3
    assert emu.stats.count_tokens_calls == 1 and emu.generate_requests == []


def test_streaming(client, emu, wav):
    f = client.files.upload(file=wav)
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash",
                                                        contents=[f, f, f, "Transcribe"]))
    assert len(chunks) == 3
    assert "".join(c.text for c in chunks) == emu.generate_requests[-1].response_text
    assert [c.candidates[0].finish_reason for c in chunks] == [None, None, types.FinishReason.STOP]
    assert chunks[-1].usage_metadata.candidates_token_count > 0
    assert emu.stats.requests[-1].path.endswith(":streamGenerateContent?alt=sse")


def test_audio_duration_and_inline_size_limits(wav):
    with make_emu(max_audio_seconds=5, inline_limit_bytes=100_000) as emu, sdk(emu) as client:
        f = client.files.upload(file=wav)
        client.models.generate_content(model="gemini-2.5-flash", contents=[f, "ok"])     # 3 s
        with pytest.raises(errors.ClientError, match="maximum of 5 seconds") as ei:
            client.models.generate_content(model="gemini-2.5-flash", contents=[f, f, "too long"])
        assert ei.value.status == "INVALID_ARGUMENT"
        part = types.Part.from_bytes(data=wav.read_bytes(), mime_type="audio/wav")   # 128 KB as base64
        with pytest.raises(errors.ClientError, match="Request payload size exceeds the limit: 100000 bytes"):
            client.models.generate_content(model="gemini-2.5-flash", contents=[part, "x"])
        assert emu.internal_errors == []


def test_async_client_round_trip(emu, wav):
    import asyncio

    async def run(client: genai.Client) -> tuple[types.File, str, list[str]]:
        f = await client.aio.files.upload(file=wav)
        stream = await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents=[f, "x"])
        text = "".join([c.text async for c in stream])
        names = [x.name async for x in await client.aio.files.list(config={"page_size": 1})]
        await client.aio.aclose()
        return f, text, names

    with sdk(emu) as client:
        f, text, names = asyncio.run(run(client))
    assert text == f"[00:00] Speaker 1: segment 1 of {f.name}" and names == [f.name]
    assert emu.files[0].path.read_bytes() == wav.read_bytes()


# ---- faults --------------------------------------------------------------------------------------
def test_fault_503_on_upload_start_then_recovers(emu, client, wav):
    emu.add_fault(Fault(route="upload_start", kind="status", status=503, times=1))
    with pytest.raises(errors.ServerError) as ei:
        client.files.upload(file=wav)
    assert (ei.value.code, ei.value.status) == (503, "UNAVAILABLE")
    assert ei.value.response.headers["x-goog-upload-status"] == "final"
    assert client.files.upload(file=wav).state == types.FileState.ACTIVE
    assert emu.stats.faults_injected == 1 and emu.stats.uploads_completed == 1


def test_fault_429_rate_limit_and_sdk_retry(emu, client):
    emu.add_fault(Fault(route="generate", status=429, times=2, retry_delay="7s"))
    with pytest.raises(errors.ClientError) as ei:
        client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert (ei.value.code, ei.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert error_detail(ei.value, "RetryInfo")["retryDelay"] == "7s"
    assert error_detail(ei.value, "QuotaFailure")["violations"][0]["quotaDimensions"]["model"] == "gemini-2.5-flash"
    retry = types.HttpOptions(retry_options=types.HttpRetryOptions(attempts=3, initial_delay=0.01, jitter=0))
    r = client.models.generate_content(model="gemini-2.5-flash", contents="hi",
                                       config={"http_options": retry})
    assert r.text == "Emulated reply to: hi"
    statuses = [s for _, p, s in emu.stats.requests if p.endswith(":generateContent")]
    assert statuses == [429, 429, 200]


def test_fault_500_on_second_chunk_stops_the_upload(emu, client):
    emu.add_fault(Fault(route="upload_chunk", status=500, skip=1, times=1))
    with pytest.raises(errors.ServerError) as ei:
        upload_bytes(client, b"\1" * (9 * MiB))
    assert (ei.value.code, ei.value.status) == (500, "INTERNAL")
    chunk_statuses = [s for m, p, s in emu.stats.requests if "upload_id=" in p]
    assert chunk_statuses == [200, 500]                 # "final" on the error: the SDK stops at once
    assert emu.files == [] and emu.stats.uploads_completed == 0


def test_fault_drop_on_upload_chunk_is_a_transport_error(emu, client):
    emu.add_fault(Fault(route="upload_chunk", kind="drop", times=1))
    with pytest.raises(httpx2.TransportError):
        upload_bytes(client, b"\2" * (2 * MiB))
    assert [s for m, p, s in emu.stats.requests if "upload_id=" in p] == [None]
    assert upload_bytes(client, b"\2" * (2 * MiB)).size_bytes == 2 * MiB     # client recovers


def test_fault_drop_on_files_list_is_not_retried_by_the_sdk(emu, client):
    emu.add_fault(Fault(route="files_list", kind="drop", times=1))
    retry = types.HttpOptions(retry_options=types.HttpRetryOptions(attempts=3, initial_delay=0.01))
    with pytest.raises(httpx2.RemoteProtocolError):            # only Connect/Timeout errors are retried
        list(client.files.list(config={"http_options": retry}))
    assert [s for m, p, s in emu.stats.requests] == [None]
    assert list(client.files.list()) == []


def test_fault_non_json_502(emu, client):
    emu.add_fault(Fault(route="files_get", kind="non_json_502"))
    with pytest.raises(errors.ServerError) as ei:
        client.files.get(name="files/abc")
    assert (ei.value.code, ei.value.status) == (502, "Bad Gateway")
    assert "That\u2019s an error." in ei.value.message


def test_fault_slow_hits_the_sdk_timeout(emu):
    emu.add_fault(Fault(route="files_get", kind="slow", delay=30.0))
    with sdk(emu, timeout=500) as client:
        with pytest.raises(httpx2.TimeoutException):    # after the delay it would be a 403 (no such file)
            client.files.get(name="files/abc")
    emu.stop()                                          # wakes the sleeping handler: it never answers
    assert [(r.route, r.status) for r in emu.stats.requests] == [("files_get", None)]


def test_fault_no_upload_status_costs_one_second_then_succeeds(emu, client):
    emu.add_fault(Fault(route="upload_chunk", kind="no_upload_status", times=1))
    f = upload_bytes(client, b"abc")
    assert f.size_bytes == 3
    chunks = [r for r in emu.stats.requests if "upload_id=" in r.path]
    assert [r.status for r in chunks] == [503, 200]
    assert chunks[1].time - chunks[0].time >= 0.9             # the SDK slept its second before re-sending


def test_fault_probability_is_reproducible_with_a_seed(emu, client):
    def pattern() -> list[bool]:
        emu.clear_faults()
        emu.add_fault(Fault(route="files_list", probability=0.5, seed=42))
        out = []
        for _ in range(16):
            try:
                list(client.files.list())
                out.append(True)
            except errors.ServerError:
                out.append(False)
        return out
    first = pattern()
    assert first == pattern() and True in first and False in first


def test_offline_then_back_on_the_same_port(emu, client):
    url = emu.base_url
    list(client.files.list())                                   # a pooled keep-alive connection
    emu.set_offline(True)
    with pytest.raises(httpx2.ConnectError):
        list(client.files.list())
    emu.set_offline(False)
    assert emu.base_url == url and list(client.files.list()) == []
    control(emu, "offline", {"seconds": 1.0})                   # out-of-process variant
    wait_for(lambda: emu.offline)
    with pytest.raises(httpx2.ConnectError):
        list(client.files.list())
    wait_for(lambda: not emu.offline)
    assert emu.base_url == url and list(client.files.list()) == []


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# ---- control endpoints, raw protocol, CLI, lifecycle ---------------------------------------------
def test_control_endpoints(emu, client, wav):
    f = client.files.upload(file=wav)
    state = control(emu, "state", method="GET")
    assert [x["name"] for x in state["files"]] == [f.name] and state["stats"]["uploads_completed"] == 1
    control(emu, "faults", {"route": "files_get", "kind": "status", "status": 500, "times": 1})
    with pytest.raises(errors.ServerError):
        client.files.get(name=f.name)
    control(emu, "faults", {"route": "files_get", "status": 503})
    control(emu, "faults", method="DELETE")
    assert client.files.get(name=f.name).name == f.name
    control(emu, "clock", {"advance": 48 * 3600 + 1})
    with pytest.raises(errors.ClientError, match="PERMISSION_DENIED"):
        client.files.get(name=f.name)


def test_chunk_protocol_is_validated(emu):
    start_headers = {"x-goog-api-key": "test-key", "X-Goog-Upload-Protocol": "resumable",
                     "X-Goog-Upload-Command": "start", "X-Goog-Upload-Header-Content-Length": str(10 * MiB),
                     "X-Goog-Upload-Header-Content-Type": "audio/wav"}
    with httpx2.Client(base_url=emu.base_url) as http:
        def start() -> str:
            r = http.post("/upload/v1beta/files", headers={**start_headers, "Host": "localhost:%d" % emu.port},
                          json={"file": {"displayName": "x"}})
            assert r.status_code == 200 and r.headers["x-goog-upload-status"] == "active"
            assert r.content == b"" and r.headers["content-length"] == "0"
            return r.headers["x-goog-upload-url"]
        url = start()
        assert url.startswith(f"http://localhost:{emu.port}/upload/v1beta/files?upload_id=")
        r = http.post(url, content=b"x" * 1000, headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"})
        assert r.status_code == 400 and r.headers["x-goog-upload-status"] == "final"
        assert r.text == "The client sent 1000 bytes, which is not a multiple of the 8388608 byte chunk granularity."
        url = start()
        r = http.post(url, content=b"x", headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "5"})
        assert r.status_code == 400 and r.headers["x-goog-upload-status"] == "final" and "offset 5" in r.text
        url = start()
        r = http.post(url, content=b"x" * 8, headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"})
        assert r.status_code == 400 and r.headers["x-goog-upload-status"] == "final"
        r = http.get("/v1/files/nope", headers={"x-goog-api-key": "test-key"})
        assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
    assert emu.files == [] and emu.stats.uploads_started == 3 and emu.stats.uploads_completed == 0


def test_cli_runs_and_prints_base_url():
    proc = subprocess.Popen([sys.executable, "-m", "tests.emulator", "--port", "0", "--api-key", "k"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        banner = "".join(iter(proc.stdout.readline, "Ctrl-C to stop.\n"))
        url = re.search(r"http://127\.0\.0\.1:\d+", banner).group(0)
        assert "export GOOGLE_GEMINI_BASE_URL=" + url in banner
        with urllib.request.urlopen(url + "/_emulator/state", timeout=5) as r:
            assert json.loads(r.read())["files"] == []
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_stop_leaves_no_threads_and_no_data(wav):
    before = set(threading.enumerate())
    emu = make_emu()
    emu.start()
    with sdk(emu) as client:
        client.files.upload(file=wav)
        data_dir = emu.data_dir
        assert any(data_dir.rglob("*"))
        emu.stop()
    assert set(threading.enumerate()) - before == set()
    assert not data_dir.exists()


# ---- request log, hold fault ---------------------------------------------------------------------
def test_request_log_keeps_three_fields_and_adds_time_model_and_route(emu, client):
    t0 = time.time()
    for model in ("gemini-2.5-flash", "gemini-2.5-flash", "gemini-2.5-pro"):
        client.models.generate_content(model=model, contents="hi")
    list(client.files.list())
    reqs = emu.stats.requests
    assert [(method, status) for method, _path, status in reqs] == [("POST", 200)] * 3 + [("GET", 200)]
    assert [r.model for r in reqs] == ["gemini-2.5-flash", "gemini-2.5-flash", "gemini-2.5-pro", None]
    assert [r.route for r in reqs] == ["generate"] * 3 + ["files_list"]
    assert t0 <= reqs[0].time <= reqs[1].time <= reqs[-1].time <= time.time()
    assert emu.requests_in_window(60) == 3 and emu.requests_in_window(60, model="gemini-2.5-pro") == 1
    assert emu.requests_in_window(60, route="any") == 4 and emu.requests_in_window(60, route="batches") == 0
    assert isinstance(control(emu, "state", method="GET")["stats"]["requests"][0][3], float)


def test_requests_in_window_counts_the_busiest_window():
    emu = make_emu()
    for t in (1000.0, 1030.0, 1059.0, 1061.0, 1200.0):       # arrival times, as the handler logs them
        emu._log_request("POST", "/v1/models/m:generateContent", 200, t, "m", "generate")
    emu._log_request("POST", "/v1/models/m:streamGenerateContent?alt=sse", 200, 1062.0, "m", "stream")
    emu._log_request("GET", "/v1/files", 200, 1031.0, None, "files_list")
    assert emu.requests_in_window(60) == 4                   # 1030, 1059, 1061, 1062
    assert emu.requests_in_window(60, route="stream") == 1
    assert emu.requests_in_window(10) == 3 and emu.requests_in_window(1000, route="any") == 7


def test_hold_fault_blocks_one_call_until_released_while_others_go_on(emu, client):
    emu.add_fault(Fault(route="generate", kind="hold", times=1))
    result: dict = {}
    held = threading.Thread(target=lambda: result.setdefault(
        "r", client.models.generate_content(model="gemini-2.5-flash", contents="held")))
    held.start()
    wait_for(lambda: emu.held_requests == 1)
    assert list(client.files.list()) == []                      # the client keeps working meanwhile
    assert client.models.generate_content(model="gemini-2.5-flash", contents="next").text == "Emulated reply to: next"
    assert "r" not in result and held.is_alive()
    assert emu.release_holds() == 1
    held.join(5)
    assert result["r"].text == "Emulated reply to: held" and emu.held_requests == 0
    assert [r.status for r in emu.stats.requests] == [200, 200, 200]


def test_hold_fault_times_out_and_stop_does_not_wait_for_a_release(emu, client):
    emu.add_fault(Fault(route="files_get", kind="hold", timeout=0.3, times=1))
    t0 = time.monotonic()
    with pytest.raises(errors.ClientError, match="PERMISSION_DENIED"):   # then it answers normally
        client.files.get(name="files/abc")
    assert time.monotonic() - t0 >= 0.25                                 # held, for its own timeout
    emu.add_fault(Fault(route="files_list", kind="hold"))                # no timeout of its own: 60 s
    failures: list = []
    hung = threading.Thread(target=lambda: failures.append(pytest.raises(httpx2.TransportError,
                                                                         lambda: list(client.files.list()))))
    hung.start()
    wait_for(lambda: emu.held_requests == 1)
    emu.stop()                                   # cuts the held request: waiting for a release, it would answer
    hung.join(30)
    assert failures and not hung.is_alive()
    assert [r.status for r in emu.stats.requests if r.route == "files_list"] == [None]


# ---- speech-aware transcripts --------------------------------------------------------------------
LOW_VOICE, HIGH_VOICE = ["-v", "en-us+m3", "-p", "20"], ["-v", "en-us+f3", "-p", "80"]
LINES = [(LOW_VOICE, "Good morning, thanks for joining the call today."),
         (HIGH_VOICE, "Happy to be here. Shall we start with the budget?"),
         (LOW_VOICE, "Yes, the budget for next quarter is mostly unchanged.")]
LINE_RE = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\] Speaker (\d+): ([a-z ]+)$")


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def media_seconds(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return float(out)


@pytest.fixture(scope="session")
def voices(tmp_path_factory) -> dict:
    """Low voice, high voice, low voice (espeak-ng), each after a silence chosen so that it starts
    at a known x.2 s: the WAV master and a 16 kbps mono Opus copy, as the daemon sends them."""
    folder = tmp_path_factory.mktemp("voices")
    inputs: list[str] = []
    starts: list[float] = []
    t = 0.0
    for i, (voice, text) in enumerate(LINES):
        said = folder / f"line{i}.wav"
        subprocess.run(["espeak-ng", *voice, "-w", str(said), text], check=True, capture_output=True)
        start = math.floor(t + 1.0) + 1.2
        gap = folder / f"gap{i}.wav"
        ffmpeg("-f", "lavfi", "-i", "anullsrc=r=22050:cl=mono", "-t", f"{start - t:.3f}", str(gap))
        inputs += ["-i", str(gap), "-i", str(said)]
        starts.append(start)
        t = start + media_seconds(said)
    master, ogg = folder / "meeting.wav", folder / "meeting.ogg"
    n = len(inputs) // 2
    ffmpeg(*inputs, "-filter_complex", "".join(f"[{k}]" for k in range(n)) + f"concat=n={n}:v=0:a=1",
           "-ac", "1", "-ar", "16000", str(master))
    ffmpeg("-i", str(master), "-ac", "1", "-ar", "16000", "-c:a", "libopus", "-b:a", "16k", str(ogg))
    return {"wav": master, "ogg": ogg, "starts": starts, "clusters": ["low", "high", "low"]}


def transcript_lines(text: str) -> list[tuple[int, int, str]]:
    """(seconds, speaker, words) of each '[HH:MM:SS] Speaker N: words' line."""
    out = []
    for line in text.splitlines():
        m = LINE_RE.match(line)
        assert m, f"unexpected line {line!r}"
        h, mi, s, speaker, words = m.groups()
        out.append((int(h) * 3600 + int(mi) * 60 + int(s), int(speaker), words))
    return out


def test_analyse_audio_finds_each_line_and_tells_the_two_voices_apart(voices):
    for path in (voices["wav"], voices["ogg"]):
        found = analyse_audio(path)
        assert [cluster for _s, _e, cluster in found] == voices["clusters"]
        assert all(abs(start - known) < 0.1 for (start, _e, _c), known in zip(found, voices["starts"]))
        assert all(end - start > 1.5 for start, end, _c in found)


def test_speech_transcript_follows_the_speech_and_the_speakers(voices):
    with make_emu(transcript="speech") as emu, sdk(emu) as client:
        f = client.files.upload(file=voices["ogg"], config={"mime_type": "audio/ogg"})
        r = client.models.generate_content(model="gemini-2.5-flash", contents=[f, "Transcribe with speakers."])
        lines = transcript_lines(r.text)
        assert [speaker for _t, speaker, _w in lines] == [1, 2, 1]
        assert all(abs(t - known) <= 0.5 for (t, _s, _w), known in zip(lines, voices["starts"]))
        (rec,) = emu.generate_requests
        (label, segments), = rec.speech
        assert label == f.name and [s.cluster for s in segments] == voices["clusters"]
        assert [w for _t, _s, w in lines] == [s.text for s in segments]
        assert emu.internal_errors == []


def test_speaker_numbers_restart_in_each_request_but_overlap_lines_keep_their_text(voices, tmp_path):
    """A chunk that starts before the second line, re-encoded as the daemon cuts it: the high voice
    is now Speaker 1, as a real model would say; the line's time and text match the full answer."""
    cut = voices["starts"][1] - 0.7
    chunk = tmp_path / "chunk.ogg"
    ffmpeg("-ss", f"{cut:.3f}", "-i", str(voices["ogg"]), "-ac", "1", "-ar", "16000", "-c:a", "libopus",
           "-b:a", "16k", str(chunk))
    with make_emu(transcript="speech") as emu, sdk(emu) as client:
        full = client.files.upload(file=voices["ogg"], config={"mime_type": "audio/ogg"})
        whole = transcript_lines(client.models.generate_content(
            model="gemini-2.5-flash", contents=[full, "Transcribe"]).text)
        part = transcript_lines(client.models.generate_content(model="gemini-2.5-flash", contents=[
            types.Part.from_bytes(data=chunk.read_bytes(), mime_type="audio/ogg"), "Transcribe"]).text)
    assert [speaker for _t, speaker, _w in part] == [1, 2]
    assert all(abs(t + cut - known) <= 0.6 for (t, _s, _w), known in zip(part, voices["starts"][1:]))
    assert part[0][2] == whole[1][2]                          # the same words for the same stretch of speech
    assert [c for _s, _e, c in analyse_audio(chunk)] == voices["clusters"][1:]    # stable cluster ids


def test_no_speech_several_parts_and_the_analysis_is_cached(voices, wav):
    with make_emu(transcript="speech") as emu, sdk(emu) as client:
        f = client.files.upload(file=voices["ogg"], config={"mime_type": "audio/ogg"})
        tone = types.Part.from_bytes(data=wav.read_bytes(), mime_type="audio/wav")    # a tone is not speech
        contents = [tone, f, "Transcribe both"]
        first = client.models.generate_content(model="gemini-2.5-flash", contents=contents).text.splitlines()
        assert first[:3] == ["Audio 1 of 2 (inline audio 1):", "[no speech]", f"Audio 2 of 2 ({f.name}):"]
        assert [speaker for _t, speaker, _w in transcript_lines("\n".join(first[3:]))] == [1, 2, 1]
        decoded = speech.decode_count()
        again = client.models.generate_content(model="gemini-2.5-flash", contents=contents).text.splitlines()
        assert again == first and speech.decode_count() == decoded         # no second decode
        emu.responder = lambda rec: "custom"                                # the hook still overrides
        assert client.models.generate_content(model="gemini-2.5-flash", contents=contents).text == "custom"


# ---- context caching -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def long_tone(tmp_path_factory) -> Path:
    """40 s of tone, 8 kHz mono WAV: 1,280 audio tokens, above gemini-2.5-flash's 1,024 minimum."""
    path = tmp_path_factory.mktemp("audio") / "long.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=40", "-ac", "1", "-ar", "8000", str(path))
    return path


def test_implicit_cache_hits_only_when_the_shared_audio_comes_first(long_tone):
    audio = types.MediaModality.AUDIO
    with make_emu() as emu, sdk(emu) as client:
        f = client.files.upload(file=long_tone)

        def usage(*contents, model: str = "gemini-2.5-flash"):
            return client.models.generate_content(model=model, contents=list(contents)).usage_metadata

        assert usage(f, "Transcribe this recording.").cached_content_token_count is None
        hit = usage(f, "Summarize it.")                         # audio first: the prefix repeats
        assert hit.cached_content_token_count == 1280 and hit.prompt_token_count == 1280 + 4
        assert [(d.modality, d.token_count) for d in hit.cache_tokens_details] == [(audio, 1280)]
        assert usage("Transcribe this recording.", f).cached_content_token_count is None   # instructions first
        assert usage("List the action items.", f).cached_content_token_count is None
        assert usage("List the action items.", f).cached_content_token_count == 1280 + 6   # the same prompt again
        assert usage(f, "x", model="gemini-2.5-pro").cached_content_token_count is None     # another model
        assert usage(f, "y", model="gemini-2.5-pro").cached_content_token_count is None     # pro needs 4,096
        emu.cache_min_tokens = {"flash": 1024, "pro": 1000}
        assert usage(f, "z", model="gemini-2.5-pro").cached_content_token_count == 1280
        assert usage(f, "x", model="gemini-2.0-flash").cached_content_token_count is None
        assert usage(f, "y", model="gemini-2.0-flash").cached_content_token_count is None   # before 2.5: none
        emu.clock.advance(301)                                  # outside the 300 s window
        assert usage(f, "Summarize it.").cached_content_token_count is None
        assert usage(f, "Summarize it.").cached_content_token_count == 1280 + 4
        emu.implicit_cache_seconds = None
        assert usage(f, "Summarize it.").cached_content_token_count is None
        assert emu.generate_requests[1].cache_kind == "implicit"


def test_explicit_cache_lifecycle_usage_and_errors(long_tone, wav):
    with make_emu() as emu, sdk(emu) as client:
        f = client.files.upload(file=long_tone)
        cache = client.caches.create(model="gemini-2.5-flash", config={
            "contents": [f], "system_instruction": "You transcribe meetings.", "ttl": "300s",
            "display_name": "standup"})
        assert re.fullmatch(r"cachedContents/[a-z0-9]{12}", cache.name)
        assert (cache.model, cache.display_name, cache.usage_metadata.total_token_count) == (
            "models/gemini-2.5-flash", "standup", 1280 + 6)
        assert cache.expire_time - cache.create_time == timedelta(seconds=300)
        client.files.delete(name=f.name)                        # the cache keeps its own copy
        r = client.models.generate_content(model="gemini-2.5-flash", contents="Transcribe",
                                           config={"cached_content": cache.name})
        u = r.usage_metadata
        assert u.cached_content_token_count == 1286 and u.prompt_token_count == 1286 + 3
        assert {d.modality: d.token_count for d in u.cache_tokens_details} == {
            types.MediaModality.TEXT: 6, types.MediaModality.AUDIO: 1280}
        assert r.text.startswith(f"[00:00] Speaker 1: segment 1 of {f.name}")   # it answers about the cached audio
        rec = emu.generate_requests[-1]
        assert (rec.cached_content, rec.cache_kind, rec.system_instruction) == (
            cache.name, "explicit", "You transcribe meetings.")
        assert [c.name for c in client.caches.list()] == [cache.name]
        assert client.caches.get(name=cache.name).usage_metadata.total_token_count == 1286
        longer = client.caches.update(name=cache.name, config={"ttl": "600s"})
        assert longer.expire_time > cache.expire_time and longer.update_time > cache.update_time
        with pytest.raises(errors.ClientError, match="CachedContent can not be used with GenerateContent"):
            client.models.generate_content(model="gemini-2.5-flash", contents="x", config={
                "cached_content": cache.name, "system_instruction": "again"})
        with pytest.raises(errors.ClientError, match=r"\(models/gemini-2.5-pro\) and CachedContent "
                                                     r"\(models/gemini-2.5-flash\) has to be the same"):
            client.models.generate_content(model="gemini-2.5-pro", contents="x", config={"cached_content": cache.name})
        emu.clock.advance(601)                                  # expired on the emulator clock
        for call in (lambda: client.caches.get(name=cache.name),
                     lambda: client.models.generate_content(model="gemini-2.5-flash", contents="x",
                                                            config={"cached_content": cache.name})):
            with pytest.raises(errors.ClientError) as ei:
                call()
            assert (ei.value.code, ei.value.status, ei.value.message) == (
                403, "PERMISSION_DENIED", "CachedContent not found (or permission denied)")
        assert emu.cache(cache.name).delete_reason == "expired" and list(client.caches.list()) == []
        small = client.files.upload(file=wav)
        with pytest.raises(errors.ClientError) as ei:
            client.caches.create(model="gemini-2.5-flash", config={"contents": [small]})
        assert (ei.value.code, ei.value.message) == (
            400, "Cached content is too small. total_token_count=96, min_total_token_count=1024")
        other = client.caches.create(model="gemini-2.5-flash", config={"contents": [small] * 11})
        client.caches.delete(name=other.name)
        with pytest.raises(errors.ClientError, match="CachedContent not found"):
            client.caches.get(name=other.name)
        assert emu.internal_errors == []
