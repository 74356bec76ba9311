"""The work engine off the tested paths, through the running daemon (real SQLite, real ffmpeg, the emulator with
the real SDK): files renamed and moved by hand, names that are not UTF-8, slow answers, a quota the server
miscounts, a damaged database, a key added while running. Each test is a defect that once stalled the daemon,
hammered the API or lost work until a restart."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests import media
from tests.emulator import Emulator, Fault
from tests.harness import API_KEY, ROOT, DaemonProcess, count_states, run_cli, wait_until


def made(tmp_path: Path) -> Path:
    folder = tmp_path / "made"
    folder.mkdir(exist_ok=True)
    return folder


def history(daemon: DaemonProcess, recording_id: int) -> list[str]:
    return [event["reason"] for event in daemon.cli("show", str(recording_id), "--json")["history"]]


def database(daemon: DaemonProcess) -> Path:
    return daemon.folder / "state" / "audiodrop.db"


def sql(daemon: DaemonProcess, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(database(daemon), timeout=30)) as connection, connection:
        return connection.execute(statement, params).fetchall()


# --- 1. a file renamed or moved is followed; a rejected row never swallows a new copy ----------------------


@pytest.mark.slow
def test_a_file_renamed_while_it_converts_is_followed_and_uploaded(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, conversion={"workers": 1}).start()
    media.make_tone(made(tmp_path) / "long.wav", 900.0, channels=2, rate=48000).rename(daemon.inbox / "long.wav")
    wait_until(lambda: daemon.states() == ["converting"], 60, 0.05, message="the conversion to start")
    (daemon.inbox / "long.wav").rename(daemon.inbox / "renamed.wav")

    [item] = daemon.wait_for_states({"active": 1}, timeout=180)

    assert item["source_path"] == str(daemon.inbox / "renamed.wav")
    assert abs(item["duration_seconds"] - 900.0) < 1
    assert any("moved from" in reason for reason in history(daemon, item["id"]))
    assert len(emulator.all_files) == 1
    daemon.stop()


def test_a_recording_moved_to_another_drop_folder_is_the_same_recording(tmp_path: Path, emulator: Emulator) -> None:
    first, second = tmp_path / "d" / "inbox", tmp_path / "d" / "second"
    second.mkdir(parents=True)
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url,
                           watch=[{"path": str(first)}, {"path": str(second)}]).start()
    media.make_tone(made(tmp_path) / "memo.wav", 2.0).rename(first / "memo.wav")
    [item] = daemon.wait_for_states({"active": 1})

    (first / "memo.wav").rename(second / "memo.wav")
    wait_until(lambda: daemon.files()[0]["source_path"] == str(second / "memo.wav"), 30,
               message="the recording to follow its file")

    assert [i["id"] for i in daemon.files()] == [item["id"]]
    assert emulator.stats.uploads_started == 1
    daemon.stop()


def test_the_same_audio_dropped_again_brings_a_rejected_recording_back(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url).start()
    source = media.make_tone(made(tmp_path) / "talk.wav", 2.0)
    shutil.copy(source, daemon.inbox / "talk.wav")
    [item] = daemon.wait_for_states({"active": 1})
    # What an earlier version left behind: the row rejected because its file was moved away.
    daemon.stop()
    (daemon.inbox / "talk.wav").unlink()
    sql(daemon, "UPDATE recordings SET state = 'rejected', error = 'talk.wav: the source file is gone' WHERE id = ?",
        item["id"])
    daemon.start()

    shutil.copy(source, daemon.inbox / "talk again.wav")

    [again] = daemon.wait_for_states({"active": 1})
    assert again["id"] == item["id"] and again["error"] is None
    assert again["source_path"] == str(daemon.inbox / "talk again.wav")
    assert any("arrived again" in reason for reason in history(daemon, item["id"]))
    daemon.stop()


# --- 2. one name that is not UTF-8 fails that file alone ------------------------------------------------------


def test_a_name_that_is_not_utf8_is_rejected_and_blocks_nothing(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url).start()
    tone = media.make_tone(made(tmp_path) / "tone.wav", 1.5)
    shutil.copy(tone, os.fsencode(daemon.inbox) + b"/caf\xe9 latin-1.wav")
    media.make_tone(made(tmp_path) / "good.wav", 2.0).rename(daemon.inbox / "good.wav")

    items = daemon.wait_for_states({"active": 1, "rejected": 1})
    bad = next(i for i in items if i["state"] == "rejected")
    assert "caf\\xe9 latin-1.wav" in bad["source_path"]
    assert "not valid UTF-8" in bad["error"] and "rename" in bad["error"]
    # The catch-up scan and later files still go through while the odd name is there.
    daemon.cli("status", "--json")
    media.make_tone(made(tmp_path) / "later.wav", 2.5).rename(daemon.inbox / "later.wav")
    daemon.wait_for_states({"active": 2, "rejected": 1})
    daemon.stop()


# --- 3. a slow network call never holds the database ----------------------------------------------------------


def test_while_count_tokens_hangs_the_cli_and_the_daemon_keep_writing(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url).start()
    media.make_tone(made(tmp_path) / "a.wav", 2.0).rename(daemon.inbox / "a.wav")
    [item] = daemon.wait_for_states({"active": 1})
    emulator.add_fault(Fault(route="count_tokens", kind="hold", timeout=120))
    dry_run = subprocess.Popen([sys.executable, "-m", "daemon", "ask", str(item["id"]), "--template", "summarize",
                                "--dry-run", "--json", "--config", str(daemon.config_path)], cwd=ROOT, env=daemon.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: emulator.held_requests == 1, 30, message="countTokens to hang")
        # A write from the CLI and the daemon's own work go on meanwhile.
        queued = daemon.cli("ask", str(item["id"]), "--template", "summarize", "--json")
        media.make_tone(made(tmp_path) / "b.wav", 2.5).rename(daemon.inbox / "b.wav")
        daemon.wait_for_states(lambda items: count_states(items).get("active") == 2)
        wait_until(lambda: daemon.cli("prompts", "--json")[0]["state"] == "done", 60, message="the prompt")
        assert emulator.held_requests == 1, "all of this happened while countTokens still hung"
    finally:
        emulator.release_holds()
        out, _ = dry_run.communicate(timeout=60)
    assert queued["state"] == "queued"
    assert '"api_total_tokens"' in out
    daemon.stop()


def test_while_an_eviction_hangs_other_work_goes_on(tmp_path: Path, emulator: Emulator) -> None:
    emulator.storage_limit_bytes = 10_000  # room for one of the two recordings below
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url,
                           gemini={"storage_limit_bytes": 10_000}).start()
    media.make_tone(made(tmp_path) / "first.wav", 3.0).rename(daemon.inbox / "first.wav")
    [first] = daemon.wait_for_states({"active": 1})
    emulator.add_fault(Fault(route="files_delete", kind="hold", timeout=120))
    media.make_tone(made(tmp_path) / "second.wav", 3.5).rename(daemon.inbox / "second.wav")
    try:
        wait_until(lambda: emulator.held_requests == 1, 30, message="the eviction's files.delete to hang")
        media.make_tone(made(tmp_path) / "third.wav", 1.0).rename(daemon.inbox / "third.wav")
        wait_until(lambda: sorted(daemon.states()).count("converted") == 2, 60,
                   message="the conversions to go on while files.delete hangs")
        # A CLI write answers at once, the eviction's transaction long closed (it refuses: first.wav is not failed).
        refused = daemon.cli("retry", str(first["id"]), check=False)
        assert refused.returncode == 1 and "only failed or rejected recordings can be retried" in refused.stderr, \
            refused.stderr
        assert emulator.held_requests == 1
    finally:
        emulator.release_holds()
    daemon.wait_for_states(lambda items: count_states(items).get("active", 0) >= 1 and not any(
        i["state"] in ("converted", "uploading") for i in items), timeout=90)
    assert emulator.stats.high_water_bytes <= 10_000
    daemon.stop()


# --- 4. a storage refusal that files.list cannot explain is waited out ----------------------------------------


def test_an_unexplained_storage_refusal_backs_off_says_so_and_drains_by_itself(tmp_path: Path,
                                                                               emulator: Emulator) -> None:
    emulator.storage_limit_bytes = 100  # the server refuses everything, and lists nothing that takes the space
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url,
                           gemini={"storage_retry_seconds": 2}).start()
    media.make_tone(made(tmp_path) / "memo.wav", 2.0).rename(daemon.inbox / "memo.wav")
    wait_until(lambda: _count(emulator, "upload_start") >= 2, 30, message="two refused uploads")
    waiting = wait_until(lambda: daemon.cli("status", "--json")["daemon"]["waiting_for"], 10)
    assert "waiting for storage" in waiting and "refused" in waiting
    # Pauses of 2, 4, 8, 16 s: a handful of tries in 20 s, not thousands (nor thousands of files.list).
    wait_until(lambda: _count(emulator, "upload_start") >= 4, 40, message="later, longer-spaced retries")
    assert _count(emulator, "upload_start") <= 5
    assert _count(emulator, "files_list") <= 6
    assert daemon.states() == ["converted"]

    emulator.storage_limit_bytes = 21_474_836_480  # space appears
    daemon.wait_for_states({"active": 1}, timeout=60)
    wait_until(lambda: daemon.cli("status", "--json")["daemon"]["waiting_for"] is None, 20,
               message="status to stop saying it waits")
    daemon.stop()


def _count(emulator: Emulator, route: str) -> int:
    return sum(1 for request in emulator.stats.requests if request.route == route)


# --- 5. a generation slower than its time limit is not retried forever -----------------------------------------


def test_a_generation_that_outlasts_its_time_limit_is_tried_twice_then_fails_with_a_reason(
        tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, gemini={"request_timeout_seconds": 1},
                           prompts={"generate_timeout_seconds": 2}).start()
    media.make_tone(made(tmp_path) / "memo.wav", 2.0).rename(daemon.inbox / "memo.wav")
    [item] = daemon.wait_for_states({"active": 1})
    emulator.add_fault(Fault(route="generate", kind="slow", delay=4.0))

    asked = daemon.cli("ask", str(item["id"]), "--template", "summarize", "--wait", "--timeout", "120", check=False)

    assert asked.returncode == 1
    [prompt] = daemon.cli("prompts", "--json")
    assert prompt["state"] == "failed"
    assert "did not answer within 2 s, 2 times" in prompt["error"] and "generate_timeout_seconds" in prompt["error"]
    wait_until(lambda: _count(emulator, "generate") >= 2, 10, message="the second attempt to reach the server")
    daemon.stop()
    assert _count(emulator, "generate") == 2, "each timed-out attempt may be billed: only two, and no SDK retries"


# --- 8 and 15. the answer is stored first; its files are written after, and again -----------------------------


def test_an_answer_whose_file_cannot_be_written_is_kept_and_written_later(tmp_path: Path,
                                                                          emulator: Emulator) -> None:
    results = tmp_path / "d" / "results"
    results.parent.mkdir(parents=True)
    results.write_text("a file where the results folder should be")
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, results_dir=str(results)).start()
    media.make_tone(made(tmp_path) / "memo.wav", 2.0).rename(daemon.inbox / "memo.wav")
    [item] = daemon.wait_for_states({"active": 1})

    asked = daemon.cli("ask", str(item["id"]), "--template", "summarize", "--wait", "--json")

    assert asked["state"] == "done" and asked["result_path"] is None
    assert "could not be written" in asked["file_error"]
    answer = daemon.cli("result", str(asked["id"])).stdout
    assert answer.strip()
    results.unlink()  # the disk problem is fixed
    written = wait_until(lambda: daemon.cli("prompts", "--json")[0]["result_path"], 60,
                         message="the result file to be written")
    assert answer.strip() in Path(written).read_text()
    assert emulator.stats.generate_calls == 1, "the model is never asked again for a stored answer"
    daemon.stop()


def test_a_stop_during_a_generation_waits_for_the_answer_and_bills_it_once(tmp_path: Path,
                                                                          emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url).start()
    media.make_tone(made(tmp_path) / "memo.wav", 2.0).rename(daemon.inbox / "memo.wav")
    [item] = daemon.wait_for_states({"active": 1})
    emulator.add_fault(Fault(route="generate", kind="hold", timeout=120))
    daemon.cli("ask", str(item["id"]), "--template", "summarize")
    wait_until(lambda: emulator.held_requests == 1, 30, message="the generation to be under way")

    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    wait_until(lambda: "received SIGTERM" in daemon.log(), 10, message="the stop to begin")
    emulator.release_holds()  # the answer arrives while the daemon is stopping
    assert daemon.process.wait(timeout=60) == 0

    [prompt] = daemon.cli("prompts", "--json")
    assert prompt["state"] == "done", prompt
    daemon.start()
    wait_until(lambda: daemon.cli("status", "--json")["daemon"]["running"], 30)
    assert emulator.stats.generate_calls == 1
    daemon.stop()


# --- 10. a damaged database is refused with what to do ---------------------------------------------------------


def test_a_damaged_database_stops_the_daemon_with_a_clear_message(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=None, api_key=None)
    database(daemon).parent.mkdir(parents=True)
    database(daemon).write_bytes(b"SQLite format 3\x00" + os.urandom(8192))

    run = run_cli(daemon.config_path, "run", env=daemon.env)

    assert run.returncode == 1
    assert "is damaged" in run.stderr and "move the file away" in run.stderr
    assert "Traceback" not in run.stderr
    doctor = run_cli(daemon.config_path, "doctor", "--offline", "--json", env=daemon.env)
    [check] = [c for c in __import__("json").loads(doctor.stdout) if c["name"] == "database"]
    assert check["status"] == "fail" and "damaged" in check["detail"]


def test_a_migration_keeps_a_backup_of_the_database_first(tmp_path: Path) -> None:
    from alembic import command

    from db.session import alembic_config, upgrade_to_head

    path = tmp_path / "audiodrop.db"
    command.upgrade(alembic_config(path), "0005")
    upgrade_to_head(path)
    [backup] = list(tmp_path.glob("audiodrop.db.backup-*"))
    assert backup.name.endswith("-0005")
    with closing(sqlite3.connect(backup)) as copy:
        assert copy.execute("SELECT version_num FROM alembic_version").fetchone() == ("0005",)


def test_a_schema_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    from daemon.errors import DatabaseError
    from db.session import upgrade_to_head

    path = tmp_path / "audiodrop.db"
    upgrade_to_head(path)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(DatabaseError, match="newer than this audiodrop knows"):
        upgrade_to_head(path)


# --- 11. a key added while running is picked up on reload ------------------------------------------------------


def test_a_key_written_while_running_is_used_after_a_reload(tmp_path: Path, emulator: Emulator) -> None:
    key_file = tmp_path / "key"
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, api_key=None,
                           gemini={"api_key_file": str(key_file)}).start()
    media.make_tone(made(tmp_path) / "memo.wav", 2.0).rename(daemon.inbox / "memo.wav")
    daemon.wait_for_states({"converted": 1})
    assert "no API key" in daemon.cli("status", "--json")["daemon"]["waiting_for"]

    key_file.write_text(API_KEY)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)

    daemon.wait_for_states({"active": 1})
    assert API_KEY not in daemon.log()
    daemon.stop()


# --- 13. ffmpeg and ffprobe never see the key -------------------------------------------------------------------


def test_ffmpeg_and_ffprobe_run_without_the_api_key_in_their_environment(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.pipeline import transcode

    seen = tmp_path / "environments.txt"
    wrappers = {}
    for tool in ("ffmpeg", "ffprobe"):
        wrapper = tmp_path / f"{tool}-wrapper"
        wrapper.write_text(f"#!/bin/sh\necho '--- {tool}' >> {seen}\nenv >> {seen}\nexec {shutil.which(tool)} \"$@\"\n")
        wrapper.chmod(0o755)
        wrappers[tool] = str(wrapper)
    monkeypatch.setenv("GEMINI_API_KEY", API_KEY)
    monkeypatch.setenv("GOOGLE_API_KEY", API_KEY)
    source = media.make_tone(tmp_path / "a.wav", 1.0)

    transcode.convert(source, tmp_path / "a.ogg", transcode.FORMATS["opus"], ffmpeg=wrappers["ffmpeg"],
                      ffprobe=wrappers["ffprobe"])

    environments = seen.read_text()
    assert "--- ffprobe" in environments and "--- ffmpeg" in environments, "both tools ran through their wrappers"
    assert API_KEY not in environments and "GEMINI_API_KEY" not in environments


# --- 12. the read-only CLI works for the service's group while the daemon is stopped ----------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_the_read_only_cli_works_for_a_member_of_the_services_group_while_it_is_stopped() -> None:
    import tempfile

    from daemon import cli
    from db.session import make_engine

    top = Path(tempfile.mkdtemp(prefix="audiodrop-group-", dir="/tmp"))  # pytest's own folders are root-only
    try:
        top.chmod(0o755)
        daemon = DaemonProcess(top / "d", base_url=None, api_key=None)
        media.make_tone(top / "memo.wav", 1.0).rename(daemon.inbox / "memo.wav")
        daemon.start()
        daemon.wait_for_states({"converted": 1})
        assert daemon.stop() == 0
        state = top / "d" / "state"
        assert not Path(f"{database(daemon)}-wal").exists(), "a clean stop leaves no write-ahead log"
        # The service's layout: state 0750 and files 0640, owned by root and the service's group.
        for path in [state, *state.rglob("*")]:
            os.chown(path, 0, 65534)
            path.chmod(0o750 if path.is_dir() else 0o640)
        for path in (top / "d", top / "d" / "config.toml"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        make_engine(database(daemon), readonly=True).dispose()  # everything the child needs is imported now

        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # a member of the group, not the owner: the interpreter is already loaded
            try:
                os.setgroups([65534])
                os.setgid(65534)
                os.setuid(65534)
                sys.stdout = os.fdopen(write, "w")
                cli.main(["files", "--json", "--config", str(daemon.config_path)], standalone_mode=False)
                sys.stdout.flush()
                os._exit(0)
            except BaseException:
                os._exit(3)
        os.close(write)
        with os.fdopen(read) as output:
            printed = output.read()
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, printed
        assert [item["state"] for item in __import__("json").loads(printed)] == ["converted"]
    finally:
        shutil.rmtree(top, ignore_errors=True)


# --- the pickup path: complete files at once, half-written ones never; a file that grows replaces its part ----


def test_a_file_moved_in_with_no_writer_is_taken_at_once(tmp_path: Path, emulator: Emulator) -> None:
    # settle_seconds is what a file without a close event used to wait for: far longer than this test waits.
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url,
                           intake={"settle_seconds": 600, "scan_interval_seconds": 600}).start()
    media.make_tone(made(tmp_path) / "moved.wav", 1.0).rename(daemon.inbox / "moved.wav")
    daemon.wait_for_states({"active": 1}, timeout=60)
    daemon.stop()


def test_a_file_that_grows_after_its_first_part_was_taken_replaces_that_part(tmp_path: Path,
                                                                             emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url).start()
    whole = media.make_tone(made(tmp_path) / "whole.mp3", 20.0, codec="libmp3lame").read_bytes()
    part = len(whole) // 3
    target = daemon.inbox / "dictation.mp3"
    with open(target, "wb") as stream:  # the recorder writes a first part and closes the file...
        stream.write(whole[:part])
    [first] = daemon.wait_for_states({"active": 1})
    with open(target, "ab") as stream:  # ...then opens it again and appends the rest
        stream.write(whole[part:])

    items = daemon.wait_for_states(lambda items: count_states(items) == {"active": 1, "rejected": 1}, timeout=90)
    longer = next(i for i in items if i["state"] == "active")
    shorter = next(i for i in items if i["state"] == "rejected")
    assert shorter["id"] == first["id"] and "the file grew" in shorter["error"]
    assert abs(longer["duration_seconds"] - 20.0) < 0.5 < 20.0 - first["duration_seconds"]
    wait_until(lambda: len(emulator.files) == 1, 30, message="the shorter part's remote copy to be deleted")
    assert emulator.files[0].name == longer["remote"]["name"]
    daemon.stop()
