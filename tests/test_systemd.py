"""The systemd units (systemd-analyze verify and security) and the daemon's sd_notify messages, read from a
datagram socket the test binds in place of systemd's."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import media
from tests.emulator import Emulator
from tests.harness import API_KEY, ROOT, DaemonProcess

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (apt package systemd)")
# The units start /opt/audiodrop/.venv/bin/audiodrop or ~/audiodrop/.venv/bin/audiodrop, which a development
# machine lacks; verify copies that start this checkout's instead.
AUDIODROP = Path(sys.executable).parent / "audiodrop"
UNITS = [pytest.param("audiodrop.service", False, id="system"), pytest.param("audiodrop-user.service", True, id="user")]
EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)")
MAX_SYSTEM_EXPOSURE = 2.5


def unit_copy(folder: Path, name: str, *extra_lines: str) -> Path:
    text, count = re.subn(r"^ExecStart=\S+/\.venv/bin/audiodrop\b", f"ExecStart={AUDIODROP}",
                          (ROOT / "systemd" / name).read_text(), flags=re.MULTILINE)
    assert count == 1, f"{name}: no ExecStart=.../.venv/bin/audiodrop line to rewrite"
    if extra_lines:
        text = text.replace("[Service]\n", "[Service]\n" + "\n".join(extra_lines) + "\n", 1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def analyze(tmp_path: Path, *args: str, user: bool) -> tuple[int, str]:
    """systemd-analyze [--user] ARGS; a --user run needs a runtime directory even offline."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, *(["--user"] if user else []), *args], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    return result.returncode, result.stdout + result.stderr


def complaints(output: str, unit: Path) -> list[str]:
    # Only lines about our unit: other units the verify run loads (targets) are not ours to judge.
    return [line for line in output.splitlines() if unit.name in line or "audiodrop" in line]


@needs_analyze
@pytest.mark.parametrize(("name", "user"), UNITS)
def test_unit_verifies(tmp_path: Path, name: str, user: bool) -> None:
    assert AUDIODROP.exists(), f"{AUDIODROP} is missing; run make setup"
    unit = unit_copy(tmp_path / "units", name)
    code, output = analyze(tmp_path, "verify", str(unit), user=user)
    assert code == 0 and complaints(output, unit) == [], output


@needs_analyze
def test_verify_would_catch_a_bad_line(tmp_path: Path) -> None:
    """verify exits 0 on unknown keys and unparsable values; the test above must read its output, not the code."""
    unit = unit_copy(tmp_path / "units", "audiodrop.service", "ProtectSystm=strict", "ProtectHome=maybe")
    _, output = analyze(tmp_path, "verify", str(unit), user=False)
    assert len(complaints(output, unit)) == 2, output


def exposure(output: str, name: str) -> float:
    levels = {match[1]: float(match[2]) for match in EXPOSURE.finditer(output)}
    assert name in levels, f"no 'Overall exposure level for {name}' line in:\n{output[-2000:]}"
    return levels[name]


@needs_analyze
def test_system_unit_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    unit = unit_copy(tmp_path / "units", "audiodrop.service")
    code, output = analyze(tmp_path, "security", "--offline=true", str(unit), user=False)
    assert code == 0, output
    level = exposure(output, "audiodrop.service")
    assert level <= MAX_SYSTEM_EXPOSURE, f"exposure {level} > {MAX_SYSTEM_EXPOSURE}:\n{output}"


# The sandboxing the user unit sets: each must be in force (a ✓ line), where a missing or misspelt line is a ✗.
USER_UNIT_HARDENING = ["NoNewPrivileges=", "PrivateTmp=", "LockPersonality=", "RestrictRealtime=",
                       "RestrictSUIDSGID=", "RestrictNamespaces=", "SystemCallArchitectures=", "SystemCallFilter=",
                       "MemoryDenyWriteExecute=", "KeyringMode=", "CapabilityBoundingSet=",
                       "RestrictAddressFamilies=~AF_PACKET", "RestrictAddressFamilies=~AF_NETLINK"]
# 3.5 today; the same unit without its sandboxing lines scores 9.8 ("UNSAFE").
MAX_USER_EXPOSURE = 4.0


def failed_checks(output: str) -> list[str]:
    """The names of the security table's ✗ lines (e.g. "PrivateNetwork=")."""
    return [line.split()[1] for line in output.splitlines() if line.startswith("\u2717")]


@needs_analyze
def test_user_unit_keeps_the_sandboxing_a_user_manager_can_apply(tmp_path: Path) -> None:
    # A user manager cannot apply most sandboxing without user namespaces; what needs none must all be in force.
    unit = unit_copy(tmp_path / "units", "audiodrop-user.service")
    code, output = analyze(tmp_path, "security", "--offline=true", str(unit), user=True)
    assert code == 0, output
    failed = failed_checks(output)
    assert [check for check in failed if any(check.startswith(name) for name in USER_UNIT_HARDENING)] == [], output
    level = exposure(output, "audiodrop-user.service")
    assert level <= MAX_USER_EXPOSURE, f"exposure {level} > {MAX_USER_EXPOSURE}:\n{output}"


def test_failed_checks_parser() -> None:
    output = ("  NAME   DESCRIPTION   EXPOSURE\n"
              "\u2717 PrivateNetwork=   Service has access to the host's network   0.5\n"
              "\u2713 NoNewPrivileges=   Service processes cannot acquire new privileges\n"
              "  RemoveIPC=   Service runs as root, option does not apply\n")
    assert failed_checks(output) == ["PrivateNetwork="]


def test_exposure_parser() -> None:
    line = "\u2192 Overall exposure level for audiodrop.service: 1.5 OK \U0001f642"
    assert exposure(line, "audiodrop.service") == 1.5


# -- sd_notify -------------------------------------------------------------------------------------------------


class NotifySocket:
    """What systemd's notify socket would receive: (sender pid, "KEY=value") pairs, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's pid, as systemd checks
        self.messages: list[tuple[int, str]] = []

    def close(self) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except TimeoutError:
            return
        pid = next((struct.unpack("3i", cdata[:12])[0] for level, kind, cdata in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), -1)
        self.messages.extend((pid, line) for line in data.decode("utf-8").splitlines() if line)

    def wait_for(self, condition: Callable[[list[str]], bool], timeout: float, what: str) -> list[str]:
        deadline = time.monotonic() + timeout
        while not condition(self.lines()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; got {self.lines()}")
            self._receive(min(remaining, 0.5))
        return self.lines()

    def lines(self) -> list[str]:
        return [line for _, line in self.messages]

    def statuses(self) -> list[str]:
        return [line.removeprefix("STATUS=") for line in self.lines() if line.startswith("STATUS=")]


def statuses_after_ready(lines: list[str]) -> list[str]:
    """The STATUS= lines sent after READY=1: the daemon sends one before READY=1, then one per heartbeat."""
    if "READY=1" not in lines:
        return []
    return [line for line in lines[lines.index("READY=1"):] if line.startswith("STATUS=")]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 107 bytes"
    listener = NotifySocket(path)
    yield listener
    listener.close()


def test_ready_status_watchdog_and_stopping(tmp_path: Path, notify: NotifySocket, emulator: Emulator) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=emulator.base_url)
    daemon.env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")  # WatchdogSec=2: a ping a second
    daemon.env.pop("WATCHDOG_PID", None)
    daemon.start()
    try:
        notify.wait_for(lambda lines: "READY=1" in lines, 15, "READY=1")
        # Pings every WatchdogSec/2 = 1 s; the STATUS= heartbeat every 5 s. Counted against the daemon's own
        # heartbeat, not the test's clock: a busy machine delays both alike. Every 2 s (WatchdogSec itself, too
        # late for systemd) would give 2 pings before it, none at all if the interval were misread.
        notify.wait_for(lambda lines: len(statuses_after_ready(lines)) >= 1, 30, "the first periodic heartbeat")
        lines = notify.lines()
        heartbeat = lines.index(statuses_after_ready(lines)[0], lines.index("READY=1"))
        assert lines[lines.index("READY=1"):heartbeat].count("WATCHDOG=1") >= 3, lines
        media.make_tone(daemon.inbox / "memo.wav", 2.0)
        daemon.wait_for_states({"active": 1})
        notify.wait_for(lambda _: any("1 active" in s for s in notify.statuses()), 15, "a STATUS= with '1 active'")
        assert daemon.stop() == 0, daemon.log()[-3000:]
        notify.wait_for(lambda lines: "STOPPING=1" in lines, 5, "STOPPING=1")
    finally:
        if not daemon.exited():
            daemon.kill()
    lines = notify.lines()
    assert lines.count("READY=1") == 1
    assert lines.index("STOPPING=1") > lines.index("READY=1")
    assert {pid for pid, _ in notify.messages} == {daemon.process.pid}, "NotifyAccess=main: only the main pid"
    for status in notify.statuses():  # one short line for `systemctl status`, never the key
        assert status and "\n" not in status and len(status) < 200 and API_KEY not in status
        assert status == "stopping" or re.search(r"\d GB used\b", status), f"no storage figure in {status!r}"
    assert notify.statuses()[-1] == "stopping"


def test_without_a_key_status_says_so_and_no_watchdog_unless_asked(tmp_path: Path, notify: NotifySocket) -> None:
    daemon = DaemonProcess(tmp_path / "d", base_url=None, api_key=None)
    daemon.env["NOTIFY_SOCKET"] = str(notify.path)
    for variable in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        daemon.env.pop(variable, None)
    daemon.start()
    try:
        notify.wait_for(lambda lines: "READY=1" in lines, 15, "READY=1")
        # Until the first periodic heartbeat (5 s): a daemon that pinged unasked, alone or along with its
        # heartbeat, has done so by then.
        notify.wait_for(lambda lines: len(statuses_after_ready(lines)) >= 1, 30, "the first periodic heartbeat")
        assert daemon.stop() == 0
        notify.wait_for(lambda lines: "STOPPING=1" in lines, 5, "STOPPING=1")
    finally:
        if not daemon.exited():
            daemon.kill()
    assert "WATCHDOG=1" not in notify.lines()
    assert any("no API key" in status for status in notify.statuses()), notify.statuses()


def test_the_install_script_parses_and_the_example_config_is_valid() -> None:
    from daemon.config import load_settings

    root = Path(__file__).resolve().parent.parent
    assert subprocess.run(["bash", "-n", str(root / "systemd" / "install.sh")]).returncode == 0
    settings = load_settings(root / "systemd" / "config.example.toml")
    assert settings.state_dir == Path("/var/lib/audiodrop")
    assert settings.watches[0].prompts == ("transcribe",)


# -- what the unit files say (read as systemd reads their lines) -------------------------------------------------


def settings(name: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) pairs of one of systemd/'s units, comments left out."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in (ROOT / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections.setdefault(current, []).append((key.strip(), value.strip()))
    return sections


def values(name: str, section: str, key: str) -> list[str]:
    return [value for found, value in settings(name).get(section, []) if found == key]


def words(name: str, section: str, key: str) -> list[str]:
    return [word for value in values(name, section, key) for word in value.split()]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, f"not a plain time span: {value!r}"
    return int(match[1]) * (60 if match[2] == "min" else 1)


@pytest.mark.parametrize("name", ["audiodrop.service", "audiodrop-user.service"])
def test_a_daemon_that_cannot_start_is_not_retried_for_ever(name: str) -> None:
    assert values(name, "Service", "Restart") == ["on-failure"]
    interval, burst = values(name, "Unit", "StartLimitIntervalSec"), values(name, "Unit", "StartLimitBurst")
    assert len(interval) == 1 and len(burst) == 1, f"{name}: StartLimitIntervalSec/StartLimitBurst in [Unit]"
    restart_every = seconds(values(name, "Service", "RestartSec")[0])
    # The limit must be reachable by a crash loop (burst restarts fit in the interval), must not trip on a
    # daemon restarted a couple of times, and must not be disabled (interval 0).
    assert 3 <= int(burst[0]) <= 10
    assert int(burst[0]) * restart_every < seconds(interval[0]) <= 3600
    assert not values(name, "Service", "StartLimitIntervalSec") and not values(name, "Service", "StartLimitBurst")


def test_the_system_unit_starts_after_network_shares_are_mounted() -> None:
    after = words("audiodrop.service", "Unit", "After")
    assert "remote-fs.target" in after and "network-online.target" in after
    assert "network-online.target" in words("audiodrop.service", "Unit", "Wants")


def test_the_user_unit_names_no_system_targets() -> None:
    # A user manager has no remote-fs.target or network-online.target to wait for; naming them does nothing.
    unit = settings("audiodrop-user.service")["Unit"]
    assert not [value for key, value in unit if key in ("After", "Wants", "Requires") and
                ("remote-fs" in value or "network-online" in value)]


@pytest.mark.parametrize("name", ["audiodrop.service", "audiodrop-user.service"])
def test_the_daemon_is_told_the_stop_timeout(name: str) -> None:
    assert values(name, "Service", "TimeoutStopSec") == ["30"]
    environment = dict(word.split("=", 1) for value in values(name, "Service", "Environment")
                       for word in value.split())
    assert environment.get("AUDIODROP_STOP_TIMEOUT") == "30", f"{name}: Environment=AUDIODROP_STOP_TIMEOUT=30"
