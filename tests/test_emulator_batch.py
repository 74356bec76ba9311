"""The emulator's Batch API (batchGenerateContent), driven by the real google-genai SDK."""

from __future__ import annotations

import io
import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
from google import genai
from google.genai import errors, types

from tests.emulator import Emulator

MODEL = "gemini-2.5-flash"
STATES = types.JobState


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    """3 s of 440 Hz, mono 16 kHz PCM WAV."""
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


@pytest.fixture
def client(emu):
    with genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=emu.base_url)) as c:
        yield c


def raw(emu: Emulator, path: str) -> dict:
    req = urllib.request.Request(emu.base_url + path, headers={"x-goog-api-key": "test-key"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def requests_for(*prompts: str) -> list[dict]:
    return [{"contents": [{"parts": [{"text": p}], "role": "user"}], "metadata": {"key": f"k{i}"}}
            for i, p in enumerate(prompts)]


def test_inline_batch_lifecycle_pending_running_succeeded(emu, client):
    seen = []
    emu.responder = lambda rec: seen.append(rec.method) or None
    job = client.batches.create(model=MODEL, src=requests_for("one", "two"), config={"display_name": "nightly"})
    assert re.fullmatch(r"batches/[a-z0-9]{36}", job.name)
    assert (job.state, job.display_name, job.model, job.dest) == (STATES.JOB_STATE_PENDING, "nightly",
                                                                    f"models/{MODEL}", None)
    assert seen == []                                       # nothing runs at create time
    states = [client.batches.get(name=job.name).state for _ in range(3)]
    assert states == [STATES.JOB_STATE_PENDING, STATES.JOB_STATE_RUNNING, STATES.JOB_STATE_SUCCEEDED]
    done = client.batches.get(name=job.name)
    assert done.end_time is not None and done.dest.file_name is None
    answers = done.dest.inlined_responses
    assert [a.response.text for a in answers] == ["Emulated reply to: one", "Emulated reply to: two"]
    assert [a.metadata for a in answers] == [{"key": "k0"}, {"key": "k1"}]
    assert answers[0].response.usage_metadata.prompt_token_count == 1
    assert seen == ["batchGenerateContent"] * 2
    (batch,) = emu.batches
    assert batch.state == "BATCH_STATE_SUCCEEDED" and [r.record.prompt_text for r in batch.requests] == ["one", "two"]
    assert emu.stats.batches_created == 1 and emu.generate_requests == []


def test_each_batch_request_is_answered_like_generate_content(emu, client, wav):
    f = client.files.upload(file=wav)
    config = {"system_instruction": "be terse", "max_output_tokens": 8}
    direct = client.models.generate_content(model=MODEL, contents=[f, "Transcribe"], config=config)
    job = client.batches.create(model=MODEL, src=[{"contents": [f, "Transcribe"], "config": config}])
    emu.finish_batches()
    (answer,) = client.batches.get(name=job.name).dest.inlined_responses
    assert answer.response.text == direct.text
    assert answer.response.candidates[0].finish_reason == direct.candidates[0].finish_reason == \
        types.FinishReason.MAX_TOKENS
    assert answer.response.usage_metadata.model_dump() == direct.usage_metadata.model_dump()
    (req,) = emu.batch(job.name).requests
    assert req.record.system_instruction == "be terse" and req.record.file_names == [f.name]


def test_file_batch_runs_on_the_emulator_clock_and_writes_a_responses_file():
    with make_emu(batch_polls=None, batch_seconds=600) as emu, \
            genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=emu.base_url)) as client:
        lines = [{"key": "a", "request": {"contents": [{"parts": [{"text": "alpha"}]}]}},
                 {"key": "b", "request": {"contents": [{"parts": [{"text": "beta"}]}]}}]
        data = "".join(json.dumps(x) + "\n" for x in lines).encode() + b"not json\n"
        src = client.files.upload(file=io.BytesIO(data), config={"mime_type": "application/jsonl"})
        job = client.batches.create(model=MODEL, src=src.name, config={"display_name": "from file"})
        assert client.batches.get(name=job.name).state == STATES.JOB_STATE_PENDING
        emu.clock.advance(300)
        assert client.batches.get(name=job.name).state == STATES.JOB_STATE_RUNNING
        emu.clock.advance(300)
        done = client.batches.get(name=job.name)
        assert done.state == STATES.JOB_STATE_SUCCEEDED
        assert done.dest.file_name == "files/batch-" + job.name.split("/")[1] and done.dest.inlined_responses is None
        out = [json.loads(x) for x in client.files.download(file=done.dest.file_name).decode().splitlines()]
        assert [x.get("key") for x in out] == ["a", "b", None]
        assert out[0]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "Emulated reply to: alpha"
        assert out[2]["error"]["code"] == 3 and "Invalid JSON payload" in out[2]["error"]["message"]
        generated = client.files.get(name=done.dest.file_name)
        assert generated.source == types.FileSource.GENERATED and generated.download_uri.endswith(":download?alt=media")
        with pytest.raises(errors.ClientError):                        # uploaded files cannot be downloaded
            client.files.download(file=src.name)
        meta = raw(emu, "/v1/" + job.name)["metadata"]
        assert meta["batchStats"] == {"requestCount": "3", "successfulRequestCount": "2", "failedRequestCount": "1"}
        assert emu.internal_errors == []


def test_a_file_that_expired_before_the_batch_ran_fails_only_its_own_request(wav):
    with make_emu(ttl_seconds=120, batch_polls=None) as emu, \
            genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=emu.base_url)) as client:
        f = client.files.upload(file=wav)
        job = client.batches.create(model=MODEL, src=[
            {"contents": [f, "Transcribe"], "metadata": {"key": "audio"}},
            {"contents": "plain text", "metadata": {"key": "text"}}])      # created while the file is live
        emu.clock.advance(121)
        assert client.batches.get(name=job.name).state == STATES.JOB_STATE_PENDING
        assert emu.finish_batches() == [job.name]
        bad, good = client.batches.get(name=job.name).dest.inlined_responses
        assert bad.response is None and bad.metadata == {"key": "audio"}
        assert bad.error.code == 7          # google.rpc.Status: gRPC PERMISSION_DENIED, i.e. generateContent's 403
        assert bad.error.message == f"You do not have permission to access the File {f.name[6:]} or it may not exist."
        assert good.response.text == "Emulated reply to: plain text"
        audio, _text = emu.batch(job.name).requests
        assert audio.http_status == 403 and audio.record is None
        assert raw(emu, "/v1/" + job.name)["metadata"]["batchStats"] == {
            "requestCount": "2", "successfulRequestCount": "1", "failedRequestCount": "1"}
        assert emu.internal_errors == []


def test_fail_expire_and_cancel(emu, client):
    failing = client.batches.create(model=MODEL, src=requests_for("x"))
    expiring = client.batches.create(model=MODEL, src=requests_for("y"))
    cancelled = client.batches.create(model=MODEL, src=requests_for("z"))
    emu.fail_batch(failing.name, "Batch failed: internal error.")
    emu.expire_batch(expiring.name)
    client.batches.cancel(name=cancelled.name)                    # cancel is immediately terminal
    got = {j.name: client.batches.get(name=j.name) for j in (failing, expiring, cancelled)}
    assert [got[j.name].state for j in (failing, expiring, cancelled)] == [
        STATES.JOB_STATE_FAILED, STATES.JOB_STATE_EXPIRED, STATES.JOB_STATE_CANCELLED]
    assert all(g.dest is None and g.end_time is not None for g in got.values())
    op = raw(emu, "/v1/" + failing.name)
    assert op["done"] is True and op["error"] == {"code": 13, "message": "Batch failed: internal error."}
    assert op["metadata"]["state"] == "BATCH_STATE_FAILED" and "response" not in op
    with pytest.raises(errors.ClientError) as ei:
        client.batches.cancel(name=cancelled.name)
    assert (ei.value.code, ei.value.status) == (400, "FAILED_PRECONDITION")
    assert emu.finish_batches() == []                             # nothing left to run
    assert all(r.record is None for b in emu.batches for r in b.requests)


def test_a_batch_pending_for_48_hours_expires():
    with make_emu(batch_polls=None) as emu, \
            genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=emu.base_url)) as client:
        job = client.batches.create(model=MODEL, src=requests_for("late"))
        emu.clock.advance(47 * 3600)
        assert client.batches.get(name=job.name).state == STATES.JOB_STATE_PENDING
        emu.clock.advance(3600)
        assert client.batches.get(name=job.name).state == STATES.JOB_STATE_EXPIRED


def test_list_get_delete_and_the_operation_json(emu, client):
    assert raw(emu, "/v1/batches") == {}
    first = client.batches.create(model=MODEL, src=requests_for("a"))
    second = client.batches.create(model=MODEL, src=requests_for("b"), config={"display_name": "second"})
    emu.finish_batches()
    listed = list(client.batches.list(config={"page_size": 1}))
    assert [b.name for b in listed] == [second.name, first.name]   # newest first, two pages
    assert all(b.state == STATES.JOB_STATE_SUCCEEDED and not b.dest.inlined_responses for b in listed)
    op = raw(emu, "/v1/" + second.name)
    meta = op["metadata"]
    assert meta["@type"] == "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", meta["createTime"])
    assert meta["batchStats"] == {"requestCount": "1", "successfulRequestCount": "1"}
    assert op["done"] is True and op["response"]["inlinedResponses"] == meta["output"]["inlinedResponses"]
    client.batches.delete(name=first.name)
    with pytest.raises(errors.ClientError) as ei:
        client.batches.get(name=first.name)
    assert (ei.value.code, ei.value.status) == (404, "NOT_FOUND")
    assert [b.name for b in client.batches.list()] == [second.name]
    assert len(emu.batches) == 2                                   # introspection keeps deleted ones
    with pytest.raises(ValueError):                                # the SDK itself wants "batches/..."
        client.batches.get(name="abc")


def test_shuffled_answers_without_metadata_as_the_real_service_may_send_them():
    with make_emu(batch_polls=0, batch_shuffle_seed=3, batch_echo_metadata=False) as emu, \
            genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=emu.base_url)) as client:
        job = client.batches.create(model=MODEL, src=requests_for(*"abcdef"))
        answers = client.batches.get(name=job.name).dest.inlined_responses
        texts = [a.response.text[-1] for a in answers]
        assert sorted(texts) == list("abcdef") and texts != list("abcdef")
        assert all(a.metadata is None for a in answers)


def test_batch_create_errors(emu, client, wav):
    with pytest.raises(errors.ClientError) as ei:
        client.batches.create(model=MODEL, src="files/nosuchfile")
    assert (ei.value.code, ei.value.status) == (403, "PERMISSION_DENIED")
    emu.models = {MODEL}
    with pytest.raises(errors.ClientError) as ei:
        client.batches.create(model="gemini-0-nope", src=requests_for("x"))
    assert ei.value.code == 404
    statuses = [s for m, p, s in emu.stats.requests if p.endswith(":batchGenerateContent")]
    assert statuses == [403, 404] and emu.batches == []
