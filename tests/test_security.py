"""Security properties a user relies on, checked on the real daemon (a subprocess, the real SDK, the emulator):
the API key never reaches anything the daemon writes or prints, state and results are private, the status CLI
needs no key, drop folders do not follow symlinks out, and hostile file names never reach a shell."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

import pytest

from tests import media
from tests.conftest import write_config
from tests.emulator import Emulator
from tests.harness import ROOT, DaemonProcess, run_cli, wait_until

# Distinctive, and with characters that URL-encoding changes, so each encoded form is its own search.
SECRET = "AIzaSy-audiodrop-test+SECRET/1234567890"
KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "CREDENTIALS_DIRECTORY")


def secret_forms(secret: str) -> dict[str, bytes]:
    """The key as it could appear: raw, URL-encoded, and base64 at each of the three byte alignments it can
    have inside a larger encoded blob (only the characters that depend on the key alone)."""
    raw = secret.encode()
    forms = {"raw": raw, "url-encoded": quote(secret, safe="").encode(), "url-encoded (path)": quote(secret).encode()}
    for shift in range(3):
        start, end = -(-8 * shift // 6), 8 * (shift + len(raw)) // 6
        forms[f"base64 (offset {shift})"] = base64.b64encode(bytes(shift) + raw)[start:end]
        forms[f"urlsafe base64 (offset {shift})"] = base64.urlsafe_b64encode(bytes(shift) + raw)[start:end]
    return forms


def leaks(data: bytes, secret: str = SECRET) -> list[str]:
    lowered = data.lower()
    return [name for name, form in secret_forms(secret).items()
            if (form.lower() in lowered if "encoded" in name or name == "raw" else form in data)]


def everything_written(folder: Path) -> list[tuple[str, bytes]]:
    """Every file under `folder` (state, results, converted audio, the database and its -wal/-shm, the log,
    the config), plus a logical dump of each SQLite database (a value can straddle two pages in the file)."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found.append((str(path), path.read_bytes()))
            if path.suffix == ".db":
                with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                    found.append((f"{path} (SQL dump)", "\n".join(db.iterdump()).encode()))
    return found


def test_the_search_finds_each_encoded_form() -> None:
    """The leak search itself: a key hidden in any of these forms is found (so the big test can fail)."""
    for prefix in (b"", b"a", b"ab"):
        assert leaks(b"header " + base64.b64encode(prefix + SECRET.encode() + b" trailer") + b" end")
        assert leaks(b"x" + base64.urlsafe_b64encode(prefix + SECRET.encode()))
    assert leaks(f"GET /v1/files?key={quote(SECRET, safe='')} HTTP/1.1".encode()) == ["url-encoded"]
    assert leaks(f"GET /v1/{quote(SECRET)}/files".lower().encode()) == ["url-encoded (path)"]
    assert leaks(SECRET.encode()) == ["raw"]
    assert not leaks(b"AIzaSy-audiodrop-test+SECRET/123456789")


@pytest.mark.slow
def test_the_api_key_appears_nowhere_the_daemon_writes_or_prints(tmp_path: Path) -> None:
    outputs: list[tuple[str, bytes]] = []
    folder = tmp_path / "d"
    watch = [{"path": str(folder / "inbox"), "prompts": ["transcribe"]}]

    def configure(base_url: str) -> None:
        write_config(folder, gemini={"base_url": base_url}, watch=watch, log_level="DEBUG")

    def cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
        result = run_cli(daemon.config_path, *args, env=daemon.env)
        outputs.append((f"audiodrop {' '.join(args)} (exit {result.returncode})",
                        (result.stdout + result.stderr).encode()))
        return result

    made = tmp_path / "made"
    made.mkdir()
    sources = [media.make_tone(made / "meeting.wav", 2.0, channels=2), media.make_tone(made / "memo.mp3", 1.5),
               media.make_not_audio(made / "notes.wav"), media.make_tone(made / "late.wav", 1.2),
               media.make_tone(made / "now.m4a", 1.0)]
    with Emulator(api_key=SECRET, data_dir=tmp_path / "emulator") as accepting, \
            Emulator(api_key="a-different-key", data_dir=tmp_path / "emulator2") as refusing:
        daemon = DaemonProcess(folder, base_url=accepting.base_url, api_key=SECRET, watch=watch, log_level="DEBUG")
        daemon.start()
        try:
            for source in sources[:3]:
                shutil.copy(source, daemon.inbox / source.name)
            ids = {Path(i["source_path"]).name: str(i["id"])
                   for i in daemon.wait_for_states({"active": 2, "rejected": 1})}
            transcripts = wait_until(lambda: (found := daemon.cli("prompts", "--json")) and
                                     [p["state"] for p in found] == ["done", "done"] and found, 60,
                                     message="the watch folder's transcripts")
            # Every command that shows something of a recording or a prompt, each on one that exists (an id
            # that does not would only print "no recording with id ...").
            for args in (["show", ids["meeting.wav"]], ["show", ids["notes.wav"], "--json"],
                         ["result", str(transcripts[0]["id"])],
                         ["ask", ids["memo.mp3"], "-t", "summarize", "--wait", "--timeout", "30"]):
                assert cli(daemon, *args).returncode == 0, outputs[-1]
            for args in (["status"], ["status", "--json"], ["files"], ["files", "--json"], ["prompts"],
                         ["prompts", "--json"], ["doctor"], ["doctor", "--json"]):
                cli(daemon, *args)
            [summary] = [p for p in daemon.cli("prompts", "--json") if p["id"] not in {t["id"] for t in transcripts}]
            assert cli(daemon, "result", str(summary["id"])).returncode == 0  # the --wait answer, through the key
            dry_run = cli(daemon, "ask", ids["meeting.wav"], "-t", "summarize", "--dry-run", "--json")  # countTokens
            assert json.loads(dry_run.stdout)["api_total_tokens"] > 0
        finally:
            assert daemon.stop() == 0
        assert accepting.stats.uploads_started == 2 and len(accepting.generate_requests) == 3

        # The same key, refused by a server that expects another one.
        configure(refusing.base_url)
        daemon.start()
        try:
            shutil.copy(sources[3], daemon.inbox / "late.wav")
            wait_until(lambda: "refused" in (daemon.cli("status", "--json")["daemon"]["waiting_for"] or ""), 30,
                       message="the refused key to show in status")
            late = next(i for i in daemon.wait_for_states(lambda items: any(
                i["state"] == "converted" for i in items)) if i["state"] == "converted")
            assert Path(late["source_path"]).name == "late.wav"
            for args in (["status"], ["files", "--json"], ["doctor"], ["doctor", "--json"],
                         ["ask", str(late["id"]), "-t", "summarize", "--dry-run"]):
                cli(daemon, *args)
        finally:
            assert daemon.stop() == 0
        assert any(status == 400 for _method, _path, status in refusing.stats.requests)
        assert refusing.internal_errors == []

        # `audiodrop process` with the key, against the accepting server again.
        configure(accepting.base_url)
        assert cli(daemon, "process", str(sources[4]), "-t", "summarize").returncode == 0
        assert accepting.stats.uploads_started == 3 and accepting.internal_errors == []

    written = everything_written(folder)
    assert any(name.endswith("audiodrop.db") for name, _ in written) and any("results" in n for n, _ in written)
    assert "DEBUG" in daemon.log()  # the log was as chatty as it gets
    found = {name: forms for name, data in written + outputs + [("daemon log", daemon.log().encode())]
             if (forms := leaks(data))}
    assert found == {}, f"the API key leaked into: {found}"


def test_state_and_results_are_never_readable_by_others(tmp_path: Path, emulator: Emulator) -> None:
    folder = tmp_path / "d"
    daemon = DaemonProcess(folder, base_url=emulator.base_url, watch=[{"path": str(folder / "inbox"),
                                                                      "prompts": ["transcribe"]}])
    permissive = os.umask(0)  # what the daemon and `process` inherit: they must narrow it themselves
    try:
        daemon.start()
        media.make_tone(daemon.inbox / "a.wav", 1.5)
        daemon.wait_for_states({"active": 1})
        wait_until(lambda: [p["state"] for p in daemon.cli("prompts", "--json")] == ["done"], 30,
                   message="the transcript")
        state_files = {p.name for p in (folder / "state").iterdir()}
        assert {"audiodrop.db", "audiodrop.db-wal", "audiodrop.db-shm"} <= state_files
        modes = {str(p): p.stat().st_mode & 0o777 for p in [folder / "state", *(folder / "state").rglob("*")]}
        assert daemon.stop() == 0
        source = media.make_tone(tmp_path / "b.wav", 1.0)
        assert run_cli(daemon.config_path, "process", str(source), "-t", "summarize", env=daemon.env).returncode == 0
    finally:
        os.umask(permissive)
    private = [folder / "state", folder / "results", *(folder / "state").rglob("*"), *(folder / "results").rglob("*")]
    modes.update({str(p): p.stat().st_mode & 0o777 for p in private})
    assert len([p for p in modes if p.endswith(".ogg")]) == 2 and len([p for p in modes if p.endswith(".md")]) == 2
    assert {path: oct(mode) for path, mode in modes.items() if mode & 0o007} == {}


def test_the_status_cli_works_without_any_api_key(tmp_path: Path, emulator: Emulator) -> None:
    """An operator who can read the state but not the key (the daemon's key file is not theirs to read)."""
    key_file = tmp_path / "secrets" / "gemini-api-key"
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url, gemini={"api_key_file": str(key_file)})
    daemon.start()
    try:
        media.make_tone(daemon.inbox / "a.wav", 1.5)
        daemon.wait_for_states({"active": 1})
        operator = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
        assert not key_file.exists() and not any("API_KEY" in k for k in operator)
        status = run_cli(daemon.config_path, "status", "--json", env=operator)
        files = run_cli(daemon.config_path, "files", "--json", env=operator)
        table = run_cli(daemon.config_path, "status", env=operator)
        assert (status.returncode, files.returncode, table.returncode) == (0, 0, 0), status.stderr + files.stderr
        report = json.loads(status.stdout)
        assert report["daemon"]["running"] is True and report["recordings"]["active"] == 1
        assert report["storage"]["used_bytes"] == emulator.stats.used_bytes > 0
        [item] = json.loads(files.stdout)
        assert Path(item["source_path"]).name == "a.wav" and item["remote"]["name"] == emulator.files[0].name
        assert "running" in table.stdout
    finally:
        daemon.stop()


def test_symlinks_out_of_a_drop_folder_are_not_followed(tmp_path: Path, emulator: Emulator) -> None:
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    private = media.make_tone(outside / "private.wav", 1.3)
    media.make_tone(outside / "folder" / "inner.wav", 1.7)
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    inbox = daemon.inbox
    (inbox / "sub").mkdir()
    media.make_tone(inbox / "real.wav", 1.5)
    media.make_tone(inbox / "sub" / "take 2.wav", 1.9)
    os.symlink(private, inbox / "escape.wav")
    os.symlink(outside / "folder", inbox / "linked folder")
    os.symlink("real.wav", inbox / "alias.wav")  # inside, to an inside file: fine
    os.symlink(inbox / "sub" / "take 2.wav", inbox / "pointer.wav")
    daemon.start()
    try:
        os.symlink(private, inbox / "late escape.wav")  # while running: the event path, not the start-up scan
        media.make_tone(outside / "folder" / "new inside the linked folder.wav", 1.2)
        media.make_tone(inbox / "late.wav", 1.1)

        def accounted() -> set[str]:
            """Every path taken: as a recording, or as a duplicate of one (`show` lists those)."""
            items = daemon.files()
            paths = {i["source_path"] for i in items}
            for item in items:
                shown = run_cli(daemon.config_path, "show", str(item["id"]), "--json", env=daemon.env)
                if shown.returncode == 0:  # else merged into another recording a moment ago
                    paths |= {d["path"] for d in json.loads(shown.stdout)["duplicates"]}
            return {os.path.relpath(p, inbox) for p in paths}

        inside = {"real.wav", "alias.wav", os.path.join("sub", "take 2.wav"), "pointer.wav", "late.wav"}
        wait_until(lambda: accounted() == inside and all(i["state"] == "active" for i in daemon.files()), 60,
                   message=f"{inside} to be taken")
        # A later catch-up scan (every 2 s) takes nothing more. Each scan logs the escaping symlink again: the
        # second line from now means one whole scan ran after this point.
        scanned = f"{inbox / 'escape.wav'}: symlink to"
        seen = daemon.log().count(scanned)
        wait_until(lambda: daemon.log().count(scanned) >= seen + 2, 30, message="one more whole catch-up scan")
        assert accounted() == inside
        assert len(daemon.files()) == len(emulator.files) == 3
        assert "escape.wav: symlink to" in daemon.log() and "not followed" in daemon.log()
    finally:
        daemon.stop()


HOSTILE = ["with spaces.wav", "quote's \"double\".wav", "ünïcödé 日本語 🎙.wav", "new\nline.wav",
           "-leading dash.wav", "--help.wav", "$(touch pwned).wav", "`touch pwned`.wav", "; rm -rf x.wav",
           "a; touch pwned #.wav", "| touch pwned.wav"]


def test_hostile_file_names_are_handled_without_a_shell(tmp_path: Path, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    made = tmp_path / "made"
    made.mkdir()
    tones = [media.make_tone(made / f"tone{i}.wav", 1.0 + 0.1 * i) for i in range(2 * len(HOSTILE))]
    daemon.start()
    try:
        for name, tone in zip(HOSTILE, tones):
            shutil.copy(tone, daemon.inbox / name)
        items = daemon.wait_for_states({"active": len(HOSTILE)})
        assert sorted(Path(i["source_path"]).name for i in items) == sorted(HOSTILE)
    finally:
        assert daemon.stop() == 0
    # `audiodrop process` with the same kinds of names (other content), given as absolute paths.
    hostile_dir = tmp_path / "process"
    hostile_dir.mkdir()
    for name, tone in zip(HOSTILE, tones[len(HOSTILE):]):
        shutil.copy(tone, hostile_dir / name)
    run = run_cli(daemon.config_path, "process", *(str(hostile_dir / name) for name in HOSTILE), env=daemon.env)
    assert run.returncode == 0, run.stderr
    items = daemon.files()
    assert [i["state"] for i in items] == ["active"] * (2 * len(HOSTILE))
    assert sorted(Path(i["source_path"]).name for i in items) == sorted(HOSTILE * 2)
    assert not (ROOT / "pwned").exists() and not (Path.cwd() / "pwned").exists()
    assert [p for p in tmp_path.rglob("*") if p.name == "pwned"] == []


def test_no_shell_in_the_daemon_source() -> None:
    shell = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|getstatusoutput|getoutput\(|"
                       r"create_subprocess_shell|os\.exec\w*p?\(\s*['\"]/bin/sh")
    sources = [*ROOT.glob("daemon/**/*.py"), *ROOT.glob("db/**/*.py"), *ROOT.glob("migrations/**/*.py")]
    assert len(sources) > 20
    assert {str(p.relative_to(ROOT)): m.group(0) for p in sources if (m := shell.search(p.read_text()))} == {}
