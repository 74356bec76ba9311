"""`audiodrop doctor`: a good setup against the emulator, then one broken thing at a time. Every problem must
come with a hint, and the API key must never appear in the output."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command

from daemon.cli import doctor
from daemon.config import Settings, load_settings
from daemon.pipeline import watcher
from db.session import alembic_config, head_revision, make_engine, schema_revision, upgrade_to_head
from tests.conftest import write_config
from tests.emulator import Emulator
from tests.emulator.faults import Fault
from tests.harness import API_KEY, run_cli


@pytest.fixture(autouse=True)
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", API_KEY)


@pytest.fixture
def setup(tmp_path: Path) -> Callable[..., Settings]:
    """A working installation: drop folder, state_dir with a database at head; overrides break one thing."""

    def make(base_url: str | None = None, **overrides: Any) -> Settings:
        (tmp_path / "inbox").mkdir(exist_ok=True)
        gemini = {**overrides.pop("gemini", {}), **({"base_url": base_url} if base_url else {})}
        settings = load_settings(write_config(tmp_path, gemini=gemini, **overrides))
        if settings.state_dir.parent.is_dir():
            upgrade_to_head(settings.database_path)
        return settings

    return make


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {check.name: check for check in checks}


def assert_safe(checks: list[doctor.Check]) -> None:
    """Every problem says what to do; the key appears nowhere."""
    for check in checks:
        assert check.status in ("ok", "warning", "fail")
        if check.status != "ok":
            assert check.hint, f"{check.name} has no hint"
    assert API_KEY not in doctor.render(checks)
    assert API_KEY not in json.dumps([check.__dict__ for check in checks])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_good_setup_is_all_ok(setup: Callable[..., Settings], emulator: Emulator) -> None:
    settings = setup(emulator.base_url)
    checks = doctor.run_checks(settings)
    assert_safe(checks)
    assert [c for c in checks if c.status != "ok"] == []
    found = by_name(checks)
    assert {"config", "ffmpeg", "ffprobe", f"watch {settings.watches[0].path}", "state_dir", "results_dir",
            "disk space", "database", "api key", "api", "inotify watches", "inotify instances"} <= set(found)
    assert "libopus and libvorbis" in found["ffmpeg"].detail
    assert "$GEMINI_API_KEY" in found["api key"].detail
    assert "answered files.list" in found["api"].detail
    assert "watched with inotify" in found[f"watch {settings.watches[0].path}"].detail
    assert [(method, status) for method, _, status in emulator.stats.requests] == [("GET", 200)]
    text = doctor.render(checks)
    assert text.splitlines()[0].startswith("ok    config: loaded ")
    assert text.rstrip().endswith("12 ok, 0 warning(s), 0 failure(s)")


def test_checks_without_the_api_never_call_it(setup: Callable[..., Settings], emulator: Emulator) -> None:
    # A key and an API that answers: only api=False keeps the doctor off the network (offline, a call to the
    # real endpoint would wait for its timeout).
    checks = doctor.run_checks(setup(emulator.base_url), api=False)
    assert emulator.stats.requests == []
    assert "api" not in by_name(checks)
    assert all(c.status == "ok" for c in checks), doctor.render(checks)


def test_missing_ffmpeg_fails_with_what_to_do(setup: Callable[..., Settings]) -> None:
    checks = doctor.run_checks(setup(conversion={"ffmpeg": "/nonexistent/ffmpeg"}), api=False)
    assert_safe(checks)
    ffmpeg = by_name(checks)["ffmpeg"]
    assert ffmpeg.status == "fail" and "/nonexistent/ffmpeg" in ffmpeg.detail
    assert "apt-get install ffmpeg" in ffmpeg.hint and "conversion.ffmpeg" in ffmpeg.hint
    assert by_name(checks)["ffprobe"].status == "ok"


def test_ffmpeg_without_the_encoders_fails(setup: Callable[..., Settings], tmp_path: Path) -> None:
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho 'ffmpeg version 9.9-fake Copyright (c) the authors'\n"
                    "echo ' A..... aac                  AAC (Advanced Audio Coding)'\n")
    fake.chmod(0o755)
    ffmpeg = by_name(doctor.run_checks(setup(conversion={"ffmpeg": str(fake)}), api=False))["ffmpeg"]
    assert ffmpeg.status == "fail"
    assert "9.9-fake" in ffmpeg.detail and "libopus and libvorbis" in ffmpeg.detail


def test_ffmpeg_that_does_not_run_fails(setup: Callable[..., Settings], tmp_path: Path) -> None:
    broken = tmp_path / "ffprobe"
    broken.write_text("#!/bin/sh\necho 'error while loading shared libraries: libavcodec.so.59' >&2\nexit 127\n")
    broken.chmod(0o755)
    ffprobe = by_name(doctor.run_checks(setup(conversion={"ffprobe": str(broken)}), api=False))["ffprobe"]
    assert ffprobe.status == "fail" and "libavcodec.so.59" in ffprobe.detail and ffprobe.hint


def test_state_dir_that_cannot_be_created_fails(setup: Callable[..., Settings], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    checks = doctor.run_checks(setup(state_dir=str(tmp_path / "a-file" / "state")), api=False)
    assert_safe(checks)
    state = by_name(checks)["state_dir"]
    assert state.status == "fail" and "a-file is a file" in state.detail and "state_dir" in state.hint


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() == 0,
                    reason="root writes through permission bits; the read-only case below covers root")
def test_state_dir_without_write_permission_fails(setup: Callable[..., Settings]) -> None:
    settings = setup()
    settings.state_dir.chmod(0o500)
    try:
        state = by_name(doctor.run_checks(settings, api=False))["state_dir"]
    finally:
        settings.state_dir.chmod(0o750)
    assert state.status == "fail" and "not writable" in state.detail and "chown" in state.hint


def test_results_dir_on_a_read_only_filesystem_fails(setup: Callable[..., Settings]) -> None:
    # /proc/sys is read-only for everyone, root included.
    checks = doctor.run_checks(setup(results_dir="/proc/sys/audiodrop-results"), api=False)
    results = by_name(checks)["results_dir"]
    assert results.status == "fail" and results.hint


def test_refused_key_fails_and_never_shows_the_key(setup: Callable[..., Settings], tmp_path: Path) -> None:
    with Emulator(api_key="a-different-key", data_dir=tmp_path / "emulator") as other:
        checks = doctor.run_checks(setup(other.base_url))
    assert_safe(checks)
    api = by_name(checks)["api"]
    assert api.status == "fail" and "refused the key" in api.detail
    assert "GEMINI_API_KEY" in api.hint and "aistudio.google.com" in api.hint


def test_key_echoed_by_the_server_is_scrubbed(setup: Callable[..., Settings], emulator: Emulator) -> None:
    emulator.add_fault(Fault(route="files_list", status=401, message=f"key {API_KEY} is not authorized"))
    checks = doctor.run_checks(setup(emulator.base_url))
    assert_safe(checks)
    assert by_name(checks)["api"].status == "fail"
    assert "key [API key] is not authorized" in by_name(checks)["api"].detail


def test_offline_is_a_warning_not_a_failure(setup: Callable[..., Settings]) -> None:
    checks = doctor.run_checks(setup(f"http://127.0.0.1:{free_port()}"))
    assert_safe(checks)
    api = by_name(checks)["api"]
    assert api.status == "warning" and "not reachable" in api.detail and "offline is normal" in api.hint
    assert not any(c.status == "fail" for c in checks)


def test_no_key_is_a_warning_and_skips_the_api(setup: Callable[..., Settings], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY")
    checks = doctor.run_checks(setup(gemini={"api_key_file": str(tmp_path / "missing-key")}))
    key = by_name(checks)["api key"]
    assert key.status == "warning" and "missing-key cannot be read" in key.detail and "GEMINI_API_KEY" in key.hint
    assert "api" not in by_name(checks)


def test_key_from_a_file_names_the_file(setup: Callable[..., Settings], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY")
    (tmp_path / "key").write_text(API_KEY + "\n")
    checks = doctor.run_checks(setup(gemini={"api_key_file": str(tmp_path / "key")}), api=False)
    assert_safe(checks)
    assert by_name(checks)["api key"].detail == f"found in gemini.api_key_file ({tmp_path / 'key'})"


def test_database_behind_head_is_a_warning_and_is_left_alone(setup: Callable[..., Settings]) -> None:
    settings = setup()
    command.downgrade(alembic_config(settings.database_path), "-1")
    engine = make_engine(settings.database_path)
    before = schema_revision(engine)
    assert before != head_revision()
    database = by_name(doctor.run_checks(settings, api=False))["database"]
    assert database.status == "warning" and "will be migrated at next start" in database.detail
    assert database.hint
    assert schema_revision(engine) == before
    engine.dispose()


def test_database_with_tables_but_no_revision_fails(setup: Callable[..., Settings]) -> None:
    # Stamped to base, the tables stay: upgrading would try to create them again and stop the daemon.
    settings = setup()
    command.stamp(alembic_config(settings.database_path), "base")
    database = by_name(doctor.run_checks(settings, api=False))["database"]
    assert database.status == "fail" and "no schema revision" in database.detail and "mv " in database.hint


def test_database_from_a_newer_version_fails(setup: Callable[..., Settings]) -> None:
    settings = setup()
    command.stamp(alembic_config(settings.database_path), "head")
    engine = make_engine(settings.database_path)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    engine.dispose()
    database = by_name(doctor.run_checks(settings, api=False))["database"]
    assert database.status == "fail" and "9999" in database.detail


def test_corrupt_database_fails(setup: Callable[..., Settings]) -> None:
    settings = setup()
    for leftover in settings.state_dir.glob("audiodrop.db*"):
        leftover.unlink()
    settings.database_path.write_bytes(b"this is not SQLite at all" * 100)
    database = by_name(doctor.run_checks(settings, api=False))["database"]
    assert database.status == "fail" and "is damaged" in database.detail and database.hint


def test_inotify_limit_below_the_folder_count_gives_the_sysctl(setup: Callable[..., Settings], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = tmp_path / "inbox"
    settings = setup(watch=[{"path": str(inbox)}, {"path": str(inbox / "sub0")}])  # nested: counted once
    for index in range(10):
        (inbox / f"sub{index}" / "deeper").mkdir(parents=True)
    limits = tmp_path / "inotify"
    limits.mkdir()
    (limits / "max_user_watches").write_text("8\n")
    (limits / "max_user_instances").write_text("128\n")
    monkeypatch.setattr(doctor, "INOTIFY", limits)
    checks = by_name(doctor.run_checks(settings, api=False))
    watches = checks["inotify watches"]
    assert watches.status == "warning" and "21 folder(s)" in watches.detail and "= 8" in watches.detail
    assert "sudo sysctl fs.inotify.max_user_watches=524288" in watches.hint
    assert "/etc/sysctl.d/" in watches.hint
    assert checks["inotify instances"].status == "ok"


def test_network_mounts_are_polled(setup: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = setup()
    for module in (watcher, doctor):
        monkeypatch.setattr(module, "filesystem_type", lambda path: "nfs4")
    checks = by_name(doctor.run_checks(settings, api=False))
    assert "polled every" in checks[f"watch {settings.watches[0].path}"].detail
    assert "nfs4 mount" in checks[f"watch {settings.watches[0].path}"].detail
    assert checks["inotify"].detail == "not used: every drop folder is polled"


def test_forced_inotify_on_a_network_mount_warns(setup: Callable[..., Settings], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    settings = setup(watch=[{"path": str(tmp_path / "inbox"), "poll": False}])
    for module in (watcher, doctor):
        monkeypatch.setattr(module, "filesystem_type", lambda path: "cifs")
    check = by_name(doctor.run_checks(settings, api=False))[f"watch {tmp_path / 'inbox'}"]
    assert check.status == "warning" and "poll = false" in check.hint


def test_unreadable_or_uncreatable_watch_folder_fails(setup: Callable[..., Settings], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    settings = setup(watch=[{"path": str(tmp_path / "a-file")}, {"path": str(tmp_path / "a-file" / "inbox")},
                            {"path": str(tmp_path / "later")}])
    checks = by_name(doctor.run_checks(settings, api=False))
    assert checks[f"watch {tmp_path / 'a-file'}"].status == "fail"
    assert checks[f"watch {tmp_path / 'a-file' / 'inbox'}"].status == "fail"
    # A configured folder that is missing is waited for, as the daemon does (it may be a share not mounted yet).
    assert checks[f"watch {tmp_path / 'later'}"].status == "warning"
    assert "waits for it" in checks[f"watch {tmp_path / 'later'}"].detail
    assert f"mkdir -p {tmp_path / 'later'}" in checks[f"watch {tmp_path / 'later'}"].hint


def test_cli_text_json_and_exit_codes(tmp_path: Path, emulator: Emulator) -> None:
    (tmp_path / "inbox").mkdir()
    good = write_config(tmp_path, gemini={"base_url": emulator.base_url})
    env = {**os.environ, "GEMINI_API_KEY": API_KEY}
    text = run_cli(good, "doctor", env=env)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "ok    api: " in text.stdout and API_KEY not in text.stdout + text.stderr
    as_json = run_cli(good, "doctor", "--json", env=env)
    items = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and all(set(item) == {"name", "status", "detail", "hint"} for item in items)

    broken = write_config(tmp_path / "broken", conversion={"ffmpeg": "/nonexistent/ffmpeg"})
    failed = run_cli(broken, "doctor", "--json", "--offline", env=env)
    assert failed.returncode == 1
    statuses = {item["name"]: item["status"] for item in json.loads(failed.stdout)}
    assert statuses["ffmpeg"] == "fail" and "api" not in statuses


def test_in_a_fleet_doctor_checks_the_databases_connection_schema_and_clock(tmp_path: Path, postgres_url: str) -> None:
    """database_url on a real PostgreSQL: an empty database, one at the newest schema, one at a schema newer
    than this code, and a URL that cannot log in each get one clear line."""
    from sqlalchemy import create_engine, text

    from db.session import migrate

    (tmp_path / "inbox").mkdir()
    config = write_config(tmp_path, database_url=postgres_url)

    def database_check() -> dict[str, str]:
        result = run_cli(config, "doctor", "--json", "--offline")
        return next(item for item in json.loads(result.stdout) if item["name"] == "database")

    empty = database_check()
    assert empty["status"] == "ok" and "schema none yet" in empty["detail"] and "clock skew" in empty["detail"]
    migrate(tmp_path / "unused.db", postgres_url)
    current = database_check()
    assert current["status"] == "ok" and "answers, schema" in current["detail"]
    assert re.search(r"clock skew [+-]\d+\.\d\d s", current["detail"])
    engine = create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()
    newer = database_check()
    assert newer["status"] == "fail" and "9999_from_the_future, newer than this audiodrop" in newer["detail"]

    wrong = write_config(tmp_path / "wrong", database_url=postgres_url.replace("audiodrop@", "nobody@"))
    refused = run_cli(wrong, "doctor", "--json", "--offline")
    check = next(item for item in json.loads(refused.stdout) if item["name"] == "database")
    assert refused.returncode == 1 and check["status"] == "fail"
    assert "nobody" in check["detail"] and "Traceback" not in refused.stderr
