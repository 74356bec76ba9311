"""The Batch API lane: batch prompts gathered into one job, answered at the batch discount and landing like any
result; a job resumed by its stored name after a kill -9; a job that fails or expires giving its prompts back to the
normal lane; answers out of order (or without their metadata) matched to the right prompts; files refreshed before a
job and never evicted while it runs. The daemon runs as a subprocess against the emulator (conftest's `emulator`)."""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from daemon.config import GeminiSettings
from daemon.gemini import BatchAnswer, BatchRequest, FilePart, GeminiClient, Generation, match_answers
from daemon.prompts import pricing
from tests import media
from tests.conftest import write_config
from tests.emulator import Emulator
from tests.harness import API_KEY, DaemonProcess, wait_until

MODEL = "gemini-2.5-flash"
LATER = {"later": {"prompt": "Summarize this later.", "batch": True}}


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for process in started:
        if process.process is not None and not process.exited():
            process.stop()


@pytest.fixture
def start(tmp_path: Path, daemons: list[DaemonProcess]) -> Callable[..., DaemonProcess]:
    def start_daemon(emu: Emulator, *, max_prompts: int = 3, **config: Any) -> DaemonProcess:
        """A daemon whose drop folder queues the batch template "later" for every recording."""
        folder = tmp_path / "d"
        config.setdefault("watch", [{"path": str(folder / "inbox"), "prompts": ["later"]}])
        process = DaemonProcess(folder, base_url=emu.base_url, templates=LATER,
                                batch={"max_prompts": max_prompts, "gather_seconds": 30, "poll_seconds": 0.3},
                                **config)
        daemons.append(process)
        return process.start()

    return start_daemon


def query(daemon: DaemonProcess, statement: str, *params: Any) -> list[dict[str, Any]]:
    uri = f"file:{daemon.folder / 'state' / 'audiodrop.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(statement, params)]


def drop(daemon: DaemonProcess, tmp_path: Path, *seconds: float) -> None:
    for index, length in enumerate(seconds):
        media.make_tone(tmp_path / f"memo {index}.wav", length).rename(daemon.inbox / f"memo {index}.wav")


def wait_prompts(daemon: DaemonProcess, condition: Callable[[list[dict[str, Any]]], bool], what: str,
                 timeout: float = 60) -> list[dict[str, Any]]:
    def reached() -> list[dict[str, Any]] | None:
        assert not daemon.exited(), "daemon exited:\n" + daemon.log()[-4000:]
        rows = query(daemon, "SELECT id, state, batch, batch_name, waiting_for, error FROM prompts ORDER BY id")
        return rows if rows and condition(rows) else None

    try:
        return wait_until(reached, timeout, 0.2, message=what)
    except AssertionError:
        rows = query(daemon, "SELECT id, state, batch, batch_name, waiting_for, error FROM prompts ORDER BY id")
        raise AssertionError(f"{what}: never reached: {rows}\n--- log tail ---\n{daemon.log()[-6000:]}") from None


def in_job(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda rows: len(rows) == count and all(r["state"] == "running" and (r["batch_name"] or "").startswith(
        "batches/") for r in rows)


def all_done(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    def done(rows: list[dict[str, Any]]) -> bool:
        assert not [r for r in rows if r["state"] == "failed"], rows
        return len(rows) == count and all(r["state"] == "done" for r in rows)
    return done


def batch_cost(tokens: dict[str, Any], *, batch: bool) -> float:
    usage = pricing.Usage(prompt_tokens=tokens["prompt"] or 0, audio_tokens=tokens["audio"] or 0,
                          output_tokens=tokens["output"] or 0, thinking_tokens=tokens["thinking"] or 0)
    amount = pricing.cost(usage, MODEL, batch=batch)
    assert amount is not None
    return float(pricing.ledger_amount(amount) or Decimal(0))


# --- end to end ------------------------------------------------------------------------------------------------


def test_a_batch_of_prompts_is_one_job_whose_answers_land_like_any_result_at_half_price(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    emulator.batch_polls = None           # the job runs when the test says so
    emulator.batch_shuffle_seed = 3       # and answers out of request order (python-genai #1909)
    daemon = start(emulator, max_prompts=3)
    drop(daemon, tmp_path, 2.0, 2.5, 3.0)
    wait_prompts(daemon, in_job(3), "three prompts in one job")

    running = daemon.cli("prompts", "--json")
    assert all(p["waiting_for"].startswith(f"in batch {p['batch_name']} since ") for p in running), running
    [job] = emulator.batches
    assert len(job.requests) == 3 and emulator.stats.batches_created == 1
    emulator.finish_batches()
    wait_prompts(daemon, all_done(3), "the answers stored")
    wait_until(lambda: all(p["result_path"] for p in daemon.cli("prompts", "--json")), 30, message="result files")

    prompts = daemon.cli("prompts", "--json")
    files = {f["id"]: f for f in daemon.files()}
    assert job.order is not None and job.order != sorted(job.order)   # the answers did come back shuffled
    for prompt in prompts:
        [rid] = prompt["recording_ids"]
        remote = files[rid]["remote"]["name"]
        text = Path(prompt["result_path"]).read_text()
        assert f"of {remote}" in text, (remote, text)                    # each answer is its own recording's
        assert prompt["delivery"] == "batch" and prompt["error"] is None and prompt["waiting_for"] is None
        assert prompt["cost_usd"] == pytest.approx(batch_cost(prompt["tokens"], batch=True), abs=2e-6)
        assert prompt["cost_usd"] < batch_cost(prompt["tokens"], batch=False)
    assert emulator.generate_requests == []                              # nothing went the normal way
    ledger = query(daemon, "SELECT batch, finish_reason FROM token_usage")
    assert ledger == [{"batch": 1, "finish_reason": "STOP"}] * 3
    wait_until(lambda: job.deleted, 10, message="the finished job deleted on the server")


def test_a_daemon_killed_while_its_job_runs_resumes_the_same_job(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    emulator.batch_polls = None
    daemon = start(emulator, max_prompts=2)
    drop(daemon, tmp_path, 2.0, 2.5)
    [name] = {r["batch_name"] for r in wait_prompts(daemon, in_job(2), "two prompts in one job")}
    daemon.kill()

    again = DaemonProcess(daemon.folder, base_url=emulator.base_url, templates=LATER,
                          batch={"max_prompts": 2, "gather_seconds": 30, "poll_seconds": 0.3},
                          watch=[{"path": str(daemon.inbox), "prompts": ["later"]}])
    again.start()
    try:
        polled = emulator.batch(name).polls
        wait_until(lambda: emulator.batch(name).polls > polled, 30, message="the restarted daemon to poll the job")
        emulator.finish_batches()
        wait_prompts(again, all_done(2), "the answers of the resumed job")
        assert emulator.stats.batches_created == 1 and emulator.generate_requests == []
        assert {r["batch_name"] for r in query(again, "SELECT batch_name FROM prompts")} == {name}
    finally:
        again.stop()


def test_a_job_that_fails_or_expires_gives_its_prompts_back_to_the_normal_lane(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    emulator.batch_polls = None
    daemon = start(emulator, max_prompts=1)
    drop(daemon, tmp_path, 2.0, 2.5)
    rows = wait_prompts(daemon, in_job(2), "two prompts in two jobs")
    failing, expiring = (r["batch_name"] for r in rows)
    emulator.fail_batch(failing, "Batch failed: internal error.")
    emulator.expire_batch(expiring)

    wait_prompts(daemon, all_done(2), "both answered in the normal lane")
    prompts = daemon.cli("prompts", "--json")
    reasons = [" ".join(event["reason"] for event in p["history"]) for p in prompts]
    # (The SDK never reads a failed job's Operation.error in this mode: the reason stays the state.)
    assert f"batch {failing} ended FAILED; running it in the normal lane" in reasons[0]
    assert f"batch {expiring} ended EXPIRED; running it in the normal lane" in reasons[1]
    assert all(p["batch"] is False and p["delivery"] != "batch" for p in prompts)
    assert len(emulator.generate_requests) == 2 and emulator.stats.batches_created == 2
    # The jobs' reservations left the ledger; the two normal answers are billed at the full price.
    assert query(daemon, "SELECT batch, finish_reason FROM token_usage") == [{"batch": 0, "finish_reason": "STOP"}] * 2
    assert all(p["cost_usd"] == pytest.approx(batch_cost(p["tokens"], batch=False), abs=2e-6) for p in prompts)

    # A prompt the lane cannot take (a --from/--to span is cut locally) runs normally at once, saying why.
    [recording] = [f for f in daemon.files() if f["source_path"].endswith("memo 0.wav")]
    spanned = daemon.cli("ask", str(recording["id"]), "--prompt", "What is said?", "--from", "0", "--to", "1",
                         "--batch", "--wait", "--timeout", "45", "--json")
    assert spanned["state"] == "done" and emulator.stats.batches_created == 2
    assert any("not sent to the Batch API (a --from/--to span" in e["reason"] for e in spanned["history"])


def test_a_file_close_to_expiry_is_uploaded_again_first_and_a_running_job_pins_its_files(
        tmp_path: Path, emulator: Emulator, start: Callable[..., DaemonProcess]) -> None:
    emulator.batch_polls = None
    emulator.ttl_seconds = 20 * 3600                     # the first upload lives 20 h: less than min_file_hours (30)
    daemon = start(emulator, max_prompts=1, watch=[{"path": str(tmp_path / "d" / "inbox")}])
    drop(daemon, tmp_path, 2.0)
    [first] = daemon.wait_for_states({"active": 1}, 60)
    old = first["remote"]["name"]
    emulator.ttl_seconds = 48 * 3600
    daemon.cli("ask", str(first["id"]), "--template", "later", "--json")
    [row] = wait_prompts(daemon, in_job(1), "the prompt in a job")

    [job] = emulator.batches
    [fresh] = daemon.files()
    assert job.requests[0].record is None and fresh["remote"]["name"] != old
    assert fresh["remote"]["name"] in json.dumps(job.requests[0].body)
    history = " ".join(e["reason"] for e in daemon.cli("show", str(first["id"]), "--json")["history"])
    assert "within batch.min_file_hours (30 h); uploading again for batch prompt" in history

    # Room for one upload only: a second recording would evict the first, which the running job pins.
    size = fresh["converted"]["bytes"]
    write_config(daemon.folder, watch=[{"path": str(daemon.inbox)}], templates=LATER,
                 batch={"max_prompts": 1, "gather_seconds": 30, "poll_seconds": 0.3},
                 gemini={"base_url": emulator.base_url, "storage_limit_bytes": int(size * 1.5)})
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in daemon.log(), 20, message="the reload")
    media.make_tone(tmp_path / "second.wav", 2.6).rename(daemon.inbox / "second.wav")
    wait_until(lambda: any("is needed by a prompt" in (r["waiting_for"] or "")
                           for r in query(daemon, "SELECT waiting_for FROM nodes")), 40,
               message="the second upload to wait for room")
    first_now, second = daemon.files()
    assert first_now["state"] == "active" and first_now["remote"]["name"] == fresh["remote"]["name"]
    assert second["state"] == "converted" and fresh["remote"]["name"] in {f.name for f in emulator.files}

    emulator.finish_batches()
    wait_prompts(daemon, all_done(1), "the answer")
    daemon.wait_for_states({"active": 1, "expired": 1}, 60)          # the job is over: the first copy may go
    assert "of " + fresh["remote"]["name"] in daemon.cli("result", str(row["id"])).stdout


# --- the SDK side, in process ----------------------------------------------------------------------------------


def test_answers_are_matched_by_key_and_by_order_only_when_their_metadata_is_missing() -> None:
    def answer(text: str) -> BatchAnswer:
        return BatchAnswer(Generation(text, "STOP", 1, 0, 1, None))

    keys = ["1", "2", "3"]
    by_key, by_order = match_answers(keys, [("3", answer("c")), ("1", answer("a")), ("2", answer("b"))])
    assert {k: v.generation.text for k, v in by_key.items() if v.generation} == {"1": "a", "2": "b", "3": "c"}
    assert by_order == 0
    by_key, by_order = match_answers(keys, [(None, answer("a")), ("3", answer("c")), (None, answer("b"))])
    assert {k: v.generation.text for k, v in by_key.items() if v.generation} == {"1": "a", "2": "b", "3": "c"}
    assert by_order == 2
    # Unlabelled answers that do not add up are not guessed at: their prompts run again in the normal lane.
    by_key, by_order = match_answers(keys, [(None, answer("a")), ("9", answer("x"))])
    assert by_key == {} and by_order == 0


def test_the_client_creates_polls_and_reads_a_job_through_the_real_sdk(tmp_path: Path) -> None:
    with Emulator(api_key=API_KEY, batch_polls=1, batch_echo_metadata=False, processing_polls=0) as emu:
        client = GeminiClient(API_KEY, GeminiSettings(base_url=emu.base_url))
        try:
            wav = media.make_tone(tmp_path / "tone.wav", 2.0)
            uploaded = client.upload(wav, mime_type="audio/wav", display_name="audiodrop-test-1-abc")
            requests = [BatchRequest("7", [FilePart(uploaded.uri, "audio/wav"), "Transcribe."], "be terse", 256),
                        BatchRequest("8", ["Just text."])]
            name = client.create_batch(MODEL, requests, "audiodrop-test-batch-7-1")
            assert client.find_batch("audiodrop-test-batch-7-1") == name
            assert client.get_batch(name, ["7", "8"]).state == "PENDING"
            job = client.get_batch(name, ["7", "8"])
            assert job.finished and job.state == "SUCCEEDED" and job.by_order == 2
            assert f"of {uploaded.name}" in (job.answers["7"].generation or Generation("", "", 0, 0, 0, None)).text
            assert (job.answers["8"].generation or Generation("", "", 0, 0, 0, None)).text == \
                "Emulated reply to: Just text."
            assert emu.batch(name).requests[0].record.system_instruction == "be terse"
            client.delete_batch(name)
            assert emu.batch(name).deleted
        finally:
            client.close()
