"""The remote lifecycle with the daemon as a subprocess and the real SDK: quota, faults, outages, offline,
a refused key, and kill -9 at random moments. Nothing lost, nothing uploaded twice."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests import media
from tests.emulator import Emulator, Fault
from tests.harness import API_KEY, DaemonProcess, count_states, wait_until


def make_batch(folder: Path, count: int, seconds: float = 1.0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    # Each length differs, so each content differs (identical content would rightly be processed once).
    return [media.make_tone(folder / f"rec{i:02d}.wav", seconds + i * 0.05) for i in range(count)]


def drop(paths: list[Path], inbox: Path) -> None:
    for path in paths:
        path.rename(inbox / path.name)


def assert_each_uploaded_once(daemon: DaemonProcess, emulator: Emulator, items: list[dict]) -> None:
    live = emulator.files
    assert len(live) == len(items), "a duplicate remote file was left behind"
    assert len({f.sha256_hex for f in live}) == len(live)
    assert {i["remote"]["name"] for i in items} == {f.name for f in live}


@pytest.mark.slow
def test_storage_limit_is_never_passed_and_every_recording_gets_uploaded(tmp_path: Path) -> None:
    limit = 60_000
    with Emulator(api_key=API_KEY, data_dir=tmp_path / "emulator", storage_limit_bytes=limit) as emulator:
        daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url,
                               gemini={"storage_limit_bytes": limit})
        daemon.start()
        batch = make_batch(tmp_path / "made", 12, seconds=8.0)  # about 15 kB each, 180 kB in all
        drop(batch, daemon.inbox)
        items = daemon.wait_for_states(lambda xs: len(xs) == 12 and all(
            x["state"] in ("active", "expired") for x in xs), timeout=90)
        assert emulator.stats.high_water_bytes <= limit
        assert sum(f.size_bytes for f in emulator.files) <= limit
        counts = count_states(items)
        assert counts["expired"] >= 1 and counts["active"] >= 1
        for item in items:
            history = daemon.cli("show", str(item["id"]), "--json")["history"]
            assert any(event["to"] == "active" for event in history), item["source_path"]
            if item["state"] == "expired":
                assert "evicted for quota" in history[-1]["reason"]
        # Oldest first: the evicted ones are the first uploaded.
        evicted = sorted(i["id"] for i in items if i["state"] == "expired")
        assert evicted == list(range(1, len(evicted) + 1))
        # A prompt over two evicted recordings (two files, so not inline) needs them resident again.
        evicted_ids = sorted(str(i["id"]) for i in items if i["state"] == "expired")[:2]
        answer = daemon.cli("ask", *evicted_ids, "--prompt", "Compare these.", "--wait", "--timeout", "50", "--json")
        daemon.stop()
        assert answer["state"] == "done" and answer["delivery"] == "files", answer
        assert emulator.stats.high_water_bytes <= limit
        print(f"storage limit {limit} B, {len(batch)} recordings, emulator high-water {emulator.stats.high_water_bytes} B,"
              f" uploads {emulator.stats.uploads_started}")


@pytest.mark.slow
def test_fifty_recordings_through_5xx_429_and_dropped_chunks(tmp_path: Path, emulator: Emulator) -> None:
    faults = [emulator.add_fault(Fault(route="any", kind="status", status=503, probability=0.10, seed=1)),
              emulator.add_fault(Fault(route="any", kind="status", status=429, probability=0.05, seed=2)),
              emulator.add_fault(Fault(route="upload_chunk", kind="drop", probability=0.10, seed=3)),
              emulator.add_fault(Fault(route="any", kind="non_json_502", probability=0.03, seed=4))]
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    daemon.start()
    drop(make_batch(tmp_path / "made", 50), daemon.inbox)
    items = daemon.wait_for_states({"active": 50}, timeout=240)
    daemon.stop()
    assert_each_uploaded_once(daemon, emulator, items)
    injected = {f"{f.kind} {f.status if f.kind == 'status' else ''}".strip(): f.injected for f in faults}
    print(f"faults injected: {injected}; uploads started {emulator.stats.uploads_started}, "
          f"completed {emulator.stats.uploads_completed}, remote files {len(emulator.all_files)}")
    assert sum(injected.values()) >= 10


@pytest.mark.slow
def test_an_upload_only_outage_does_not_stop_conversion_and_drains(tmp_path: Path, emulator: Emulator) -> None:
    outage = emulator.add_fault(Fault(route="upload_start", kind="status", status=503, probability=1.0))
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    daemon.start()
    drop(make_batch(tmp_path / "made", 6), daemon.inbox)
    daemon.wait_for_states(lambda xs: len(xs) == 6 and all(x["state"] in ("converted", "failed", "uploading")
                                                           for x in xs) and any(x["state"] == "failed" for x in xs))
    failed = [x for x in daemon.files() if x["state"] == "failed"]
    assert failed[0]["next_attempt_at"] and "503" in failed[0]["error"]
    assert outage.injected >= 1
    emulator.clear_faults()
    items = daemon.wait_for_states({"active": 6}, timeout=120)
    assert_each_uploaded_once(daemon, emulator, items)
    daemon.stop()


@pytest.mark.slow
def test_offline_for_a_while_then_back_the_queue_drains(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    daemon.start()
    emulator.set_offline(True)
    drop(make_batch(tmp_path / "made", 5), daemon.inbox)
    daemon.wait_for_states({"converted": 5})
    status = wait_until(lambda: (s := daemon.cli("status", "--json"))["daemon"]["offline_since"] and s, 20,
                        message="status to say offline")
    assert "offline since" in status["daemon"]["waiting_for"]
    wait_until(lambda: "5 recording(s)" in daemon.cli("status", "--json")["daemon"]["waiting_for"], 20,
               message="status to count the backlog")
    emulator.set_offline(False)
    items = daemon.wait_for_states({"active": 5}, timeout=60)
    assert_each_uploaded_once(daemon, emulator, items)
    wait_until(lambda: daemon.cli("status", "--json")["daemon"]["offline_since"] is None, 20,
               message="status to forget the outage")
    daemon.stop()


def test_a_refused_api_key_makes_everything_wait_without_hammering(tmp_path: Path) -> None:
    with Emulator(api_key="the-real-key", data_dir=tmp_path / "emulator") as emulator:
        daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
        daemon.start()
        drop(make_batch(tmp_path / "made", 3), daemon.inbox)
        daemon.wait_for_states({"converted": 3})
        wait_until(lambda: "API key was refused" in (daemon.cli("status", "--json")["daemon"]["waiting_for"] or ""),
                   15, message="status to say the key was refused")
        time.sleep(3)
        assert len(emulator.stats.requests) <= 4
        assert API_KEY not in daemon.log()
        daemon.stop()


@pytest.mark.slow
def test_kill_nine_at_random_moments_loses_nothing_and_duplicates_nothing(tmp_path: Path,
                                                                          emulator: Emulator) -> None:
    # Slow chunk answers widen the window in which a kill lands mid-upload.
    emulator.add_fault(Fault(route="upload_chunk", kind="slow", delay=0.3, probability=0.5, seed=5))
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    batch = make_batch(tmp_path / "made", 50, seconds=1.5)
    chaos = random.Random(20261125)
    daemon.start()
    drop(batch[:25], daemon.inbox)
    kills = 0
    for round_number in range(10):
        time.sleep(chaos.uniform(0.2, 1.5))
        daemon.kill()
        kills += 1
        if round_number == 3:
            drop(batch[25:], daemon.inbox)  # some arrive while the daemon is down
        daemon.start()
    items = daemon.wait_for_states({"active": 50}, timeout=240)
    daemon.stop()
    assert kills == 10
    assert_each_uploaded_once(daemon, emulator, items)
    print(f"kills survived: {kills}; remote files ever created {len(emulator.all_files)}, "
          f"left {len(emulator.files)}; uploads started {emulator.stats.uploads_started}")


def test_a_full_project_means_free_space_then_retry_and_other_tools_files_are_kept(tmp_path: Path) -> None:
    from google import genai
    from google.genai import types

    limit = 60_000
    with Emulator(api_key=API_KEY, data_dir=tmp_path / "emulator", storage_limit_bytes=limit) as emulator:
        daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url,
                               gemini={"storage_limit_bytes": limit, "reconcile_interval_seconds": 3600}, log_level="DEBUG")
        daemon.start()
        # Another tool fills half the project after the daemon's first look at the server.
        foreign = tmp_path / "other tool.bin"
        foreign.write_bytes(b"x" * 30_000)
        with genai.Client(api_key=API_KEY, http_options=types.HttpOptions(base_url=emulator.base_url)) as sdk:
            sdk.files.upload(file=str(foreign), config={"mime_type": "text/plain", "display_name": "other tool"})
        drop(make_batch(tmp_path / "made", 6, seconds=8.0), daemon.inbox)  # about 15 kB each
        started = time.monotonic()
        items = daemon.wait_for_states(lambda xs: len(xs) == 6 and all(x["state"] in ("active", "expired")
                                                                       for x in xs), timeout=120)
        status = daemon.cli("status", "--json")
        daemon.stop()
        assert "other tool" in [f.display_name for f in emulator.files]
        assert emulator.stats.high_water_bytes <= limit
        assert status["storage"]["foreign_bytes"] == 30_000
        assert any(x["state"] == "expired" for x in items)
        for item in items:
            history = daemon.cli("show", str(item["id"]), "--json")["history"]
            assert any(event["to"] == "active" for event in history)
        # The server's storage 429 was met (its RetryInfo says ~2^63 s) and answered by freeing space at once.
        assert any(status == 429 for _method, path, status in emulator.stats.requests if "upload" in path)
        assert time.monotonic() - started < 60


def test_keep_resident_uploads_expired_recordings_again_by_itself(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url,
                           gemini={"keep_resident": True, "reconcile_interval_seconds": 1})
    daemon.start()
    drop(make_batch(tmp_path / "made", 2), daemon.inbox)
    first = {i["id"]: i["remote"]["name"] for i in daemon.wait_for_states({"active": 2})}
    emulator.clock.advance(49 * 3600)  # the server's 48 hours pass
    items = daemon.wait_for_states(lambda xs: all(x["state"] == "active" and x["remote"]["name"] != first[x["id"]]
                                                  for x in xs), timeout=60)
    daemon.stop()
    assert len(emulator.files) == 2
    for item in items:
        reasons = [e["reason"] for e in daemon.cli("show", str(item["id"]), "--json")["history"]]
        assert any("gone from the server" in r for r in reasons) and "uploading again" in reasons
