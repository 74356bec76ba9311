"""systemd/install.sh and its helpers, run for real on temporary folders (no systemd needed): the drop-in's
quoting and what it makes writable (dropin.py), making drop folders on paths other people control
(safe_mkdir.py), and the API key never taken from the command line (install_key.py). The functions of
install.sh that write files run with AUDIODROP_INSTALL_ROOT pointing at a temporary folder."""

from __future__ import annotations

import importlib.util
import os
import pty
import select
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from tests.harness import ROOT
from tests.test_systemd import analyze, complaints, needs_analyze, unit_copy

SYSTEMD = ROOT / "systemd"
NOBODY, NOGROUP = 65534, 65534  # "a user" who owns folders and symlinks; new folders' owner in the tests
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown and folders owned by others need root")


def helper(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"audiodrop_install_{name}", SYSTEMD / f"{name}.py")
    assert spec and spec.loader, f"systemd/{name}.py is missing"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_helper(name: str, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SYSTEMD / f"{name}.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env=env)


def unquote(item: str) -> str:
    """One double-quoted item of a systemd list setting, read as systemd.syntax(7) says (checked against
    systemd-analyze in test_quoting_round_trips_through_systemd), then its specifiers: only %% is expected."""
    assert item.startswith('"') and item.endswith('"') and len(item) >= 2, item
    out, index, body = [], 0, item[1:-1]
    while index < len(body):
        char = body[index]
        assert char != '"', f"an unescaped quote inside {item}"
        if char == "\\":
            index += 1
            char = body[index]
        out.append(char)
        index += 1
    text = "".join(out)
    assert "%" not in text.replace("%%", ""), f"a specifier systemd would expand in {item}"
    return text.replace("%%", "%")


def read_write_paths(dropin: str) -> list[str]:
    found = []
    for line in dropin.splitlines():
        if line.startswith("ReadWritePaths="):
            path = unquote(line.removeprefix("ReadWritePaths="))
            assert path.startswith("-/"), f"not '-' and an absolute path: {line}"
            found.append(path[1:])
    return found


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    tomllib.loads(text)  # the test's own TOML must be valid
    return path


def toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


TRICKY_NAMES = ["my drops", 'say "hi"', "it's", "100% done", "%h and %n", "back\\slash", "trailing\\",
                "ünïcødé 録音", "  spaced  ", "semi;#hash", "$HOME", "-dash", "'single'"]


# -- defect 1: drop folder paths in the drop-in, quoted as systemd reads them ------------------------------------


@needs_analyze
def test_quoting_round_trips_through_systemd(tmp_path: Path) -> None:
    """systemd-analyze prints each relative path it ignores exactly as it parsed it: the oracle for quote()."""
    dropin = helper("dropin")
    words = [f"rel/{name}" for name in TRICKY_NAMES]
    unit = unit_copy(tmp_path / "units", "audiodrop.service",
                     *("ReadWritePaths=" + dropin.quote("-" + word) for word in words))
    _, output = analyze(tmp_path, "verify", str(unit), user=False)
    parsed = [line.split("ignoring: ", 1)[1] for line in output.splitlines() if "path is not absolute" in line]
    assert parsed == words, output
    assert [unquote(dropin.quote(word)) for word in words] == words  # the test's reader agrees with systemd


@needs_analyze
def test_an_unquoted_path_with_a_space_is_two_paths_to_systemd(tmp_path: Path) -> None:
    """What install.sh wrote before: verify sees the second half as a path of its own."""
    unit = unit_copy(tmp_path / "units", "audiodrop.service", "ReadWritePaths=-/srv/my drops")
    _, output = analyze(tmp_path, "verify", str(unit), user=False)
    assert "path is not absolute, ignoring: drops" in output, output


@needs_analyze
def test_the_dropin_for_tricky_folder_names_verifies_clean(tmp_path: Path) -> None:
    # ("$HOME" left out: the daemon expands variables in configured paths, and so does dropin.py)
    folders = [tmp_path / "srv" / name for name in TRICKY_NAMES if "$" not in name]
    config = write_config(tmp_path / "config.toml", "".join(
        f"[[watch]]\npath = {toml_string(str(folder))}\nsource_action = \"move\"\n" for folder in folders))
    unit = unit_copy(tmp_path / "units", "audiodrop.service")
    (tmp_path / "units" / "audiodrop.service.d").mkdir()
    conf = tmp_path / "units" / "audiodrop.service.d" / "drop-folders.conf"
    result = run_helper("dropin", "render", "--config", str(config), "--output", str(conf))
    assert result.returncode == 0, result.stderr
    text = conf.read_text(encoding="utf-8")
    assert read_write_paths(text) == [str(folder) for folder in folders], text
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    code, output = analyze(tmp_path, "verify", str(unit), user=False)
    assert code == 0 and complaints(output, unit) == [], output


@pytest.mark.parametrize("path", ["/srv/new\nline", "/srv/tab\there", "/srv/../etc"])
def test_a_path_that_cannot_be_written_into_a_unit_is_refused(tmp_path: Path, path: str) -> None:
    config = write_config(tmp_path / "config.toml", f"[[watch]]\npath = {toml_string(path)}\n"
                                                    "source_action = \"delete\"\n")
    result = run_helper("dropin", "render", "--config", str(config))
    assert result.returncode == 1 and result.stdout == ""
    assert "dropin.py" in result.stderr and str(config) in result.stderr


# -- defect 4: write access only where the daemon writes ----------------------------------------------------------


def test_todays_config_makes_nothing_writable_beyond_the_state_directory(tmp_path: Path) -> None:
    """The example config: state and results in /var/lib/audiodrop, a drop folder the daemon only reads."""
    result = run_helper("dropin", "render", "--config", str(SYSTEMD / "config.example.toml"))
    assert result.returncode == 0, result.stderr
    assert read_write_paths(result.stdout) == [], result.stdout
    assert "# drop folder /srv/recordings/inbox: the daemon only reads recordings here" in result.stdout


def test_only_folders_the_daemon_writes_to_get_a_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", """
state_dir = "/srv/audiodrop"
results_dir = "/home/alice/Transcripts"

[[watch]]
path = "/srv/recordings/inbox"

[[watch]]
path = "/home/alice/Voice Memos"
prompts = []

[[watch]]
path = "/srv/scanner/out"
source_action = "move"

[[watch]]
path = "/srv/phone/dump"
source_action = "delete"

[[watch]]
path = "/srv/audiodrop/incoming"
source_action = "move"
""")
    result = run_helper("dropin", "render", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert read_write_paths(result.stdout) == ["/srv/audiodrop", "/home/alice/Transcripts", "/srv/scanner/out",
                                               "/srv/phone/dump"], result.stdout
    lines = result.stdout.splitlines()
    # Each ReadWritePaths= line says what it is for, in the comment just above it.
    for index, line in enumerate(lines):
        if line.startswith("ReadWritePaths="):
            assert lines[index - 1].startswith("# "), line
    assert any("/home/alice/Transcripts" in line and "ProtectHome=read-only" in line for line in lines)
    assert any("/home/alice/Voice Memos" in line and "only reads" in line for line in lines)
    assert any("/srv/audiodrop/incoming" in line and "inside /srv/audiodrop" in line for line in lines)


def test_folders_to_make_are_every_drop_folder_and_data_outside_var_lib(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", """
state_dir = "/srv/audiodrop"
[[watch]]
path = "/srv/a b"
[[watch]]
path = "~/AudioDrop/inbox"
""")
    result = run_helper("dropin", "folders", "--config", str(config), "--home", "/var/lib/audiodrop")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["data\t/srv/audiodrop", "data\t/srv/audiodrop/results",
                                          "drop\t/srv/a b", "drop\t/var/lib/audiodrop/AudioDrop/inbox"]
    default = run_helper("dropin", "folders", "--config", str(SYSTEMD / "config.example.toml"))
    assert default.stdout.splitlines() == ["drop\t/srv/recordings/inbox"]


def test_paths_are_read_as_the_daemon_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dropin.py reads the TOML itself (it runs before the venv and must accept source_action); its paths must
    be the daemon's, in the service's environment: HOME the audiodrop user's, XDG_STATE_HOME=/var/lib, cwd /."""
    from daemon.config import load_settings

    dropin = helper("dropin")
    text = """
results_dir = "$HOME/results"
[[watch]]
path = "~/inbox"
[[watch]]
path = "relative/inbox"
[[watch]]
path = "/srv/${USER}/x//y/./z/"
[[watch]]
path = "$NOT_SET_ANYWHERE/q"
"""
    config = write_config(tmp_path / "config.toml", text)
    env = dropin.service_env(home="/var/lib/audiodrop", state_home="/var/lib", user="audiodrop")
    monkeypatch.chdir("/")
    for variable in list(os.environ):
        if variable not in ("PATH",):
            monkeypatch.delenv(variable)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(config)
    entries = dropin.plan(tomllib.loads(text), env)
    daemon_paths = [str(settings.state_dir), str(settings.results_dir)] + [
        os.path.abspath(watch.path) for watch in settings.watches]
    assert [entry.path for entry in entries] == daemon_paths


# -- defect 2: drop folders made safely on paths other people control --------------------------------------------


@pytest.fixture
def land(tmp_path: Path) -> Path:
    """tmp/home/alice owned by "alice" (nobody), tmp/etc a root folder worth stealing."""
    (tmp_path / "home" / "alice").mkdir(parents=True)
    os.chown(tmp_path / "home" / "alice", NOBODY, NOGROUP)
    (tmp_path / "etc").mkdir(mode=0o755)
    (tmp_path / "etc" / "shadow").write_text("secret")
    return tmp_path


def fingerprint(path: Path) -> tuple[int, int, int, list[str]]:
    info = path.lstat()
    return info.st_uid, info.st_gid, info.st_mode, sorted(os.listdir(path))


def safe_mkdir(*paths: Path, mode: str = "2770") -> subprocess.CompletedProcess[str]:
    return run_helper("safe_mkdir", "--owner", str(NOBODY), "--group", str(NOGROUP), "--mode", mode,
                      *map(str, paths))


def test_missing_folders_are_made_owned_only_at_the_end(land: Path) -> None:
    target = land / "srv" / "new parent" / "Dröp ïnbox"
    result = safe_mkdir(target)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"created {target}\n"
    info = target.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY, NOGROUP, 0o2770)
    for parent in (land / "srv", land / "srv" / "new parent"):
        info = parent.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o755)


def test_an_existing_folder_is_never_reowned(land: Path) -> None:
    existing = land / "srv" / "inbox"
    existing.mkdir(parents=True, mode=0o700)
    before = fingerprint(existing)
    result = safe_mkdir(existing)
    assert result.returncode == 0 and result.stdout == f"exists {existing}\n"
    assert fingerprint(existing) == before


def user_symlink(link: Path, target: Path) -> None:
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOGROUP)


def test_a_symlink_swapped_in_at_the_last_component_is_refused(land: Path) -> None:
    before = fingerprint(land / "etc")
    user_symlink(land / "home" / "alice" / "inbox", land / "etc")
    result = safe_mkdir(land / "home" / "alice" / "inbox")
    assert result.returncode == 1
    assert "symlink owned by uid 65534" in result.stderr and result.stdout == ""
    assert fingerprint(land / "etc") == before


def test_a_dangling_symlink_at_the_last_component_is_refused(land: Path) -> None:
    user_symlink(land / "home" / "alice" / "inbox", land / "etc" / "cron.d")
    result = safe_mkdir(land / "home" / "alice" / "inbox")
    assert result.returncode == 1 and "symlink" in result.stderr
    assert not (land / "etc" / "cron.d").exists()


def test_a_symlink_swapped_in_at_a_parent_is_refused(land: Path) -> None:
    before = fingerprint(land / "etc")
    user_symlink(land / "home" / "alice" / "drops", land / "etc")
    result = safe_mkdir(land / "home" / "alice" / "drops" / "inbox")
    assert result.returncode == 1 and "drops is a symlink owned by uid 65534" in result.stderr
    assert fingerprint(land / "etc") == before and not (land / "etc" / "inbox").exists()


def test_a_root_symlink_is_followed_but_not_one_it_leads_through(land: Path) -> None:
    (land / "data").mkdir()
    (land / "srv").symlink_to("data")  # root's, relative: followed
    assert safe_mkdir(land / "srv" / "inbox").returncode == 0
    assert (land / "data" / "inbox").stat().st_uid == NOBODY
    # A root symlink into alice's home, where alice put her own symlink to /etc: refused all the same.
    user_symlink(land / "home" / "alice" / "share", land / "etc")
    (land / "shared").symlink_to(land / "home" / "alice" / "share")
    before = fingerprint(land / "etc")
    result = safe_mkdir(land / "shared" / "inbox")
    assert result.returncode == 1 and "share is a symlink owned by uid 65534" in result.stderr
    assert fingerprint(land / "etc") == before


def test_one_refused_path_does_not_stop_the_others(land: Path) -> None:
    user_symlink(land / "home" / "alice" / "inbox", land / "etc")
    result = safe_mkdir(land / "home" / "alice" / "inbox", land / "srv" / "ok")
    assert result.returncode == 1 and (land / "srv" / "ok").is_dir()
    assert result.stdout == f"created {land / 'srv' / 'ok'}\n"


def test_a_file_in_the_way_is_refused(land: Path) -> None:
    (land / "srv").write_text("not a folder")
    result = safe_mkdir(land / "srv" / "inbox")
    assert result.returncode == 1 and "not a folder" in result.stderr


def test_the_old_install_d_reowned_a_symlink_target(land: Path) -> None:
    """Why: what install.sh ran before, on a symlink alice swapped in, re-owned root's folder as root."""
    victim = land / "etc"
    user_symlink(land / "home" / "alice" / "inbox", victim)
    subprocess.run(["install", "-d", "-o", str(NOBODY), "-g", str(NOGROUP), "-m", "2770",
                    str(land / "home" / "alice" / "inbox")], check=True)
    assert victim.stat().st_uid == NOBODY  # install -d followed the link


# -- defect 3: the API key never from the command line --------------------------------------------------------------


def key_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    env.update(extra)
    return env


def assert_key_file(path: Path, content: str) -> None:
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600)
    assert path.read_text() == content
    assert not [entry for entry in path.parent.iterdir() if entry.name.startswith(".")], "a temporary file is left"


def test_the_key_comes_from_a_key_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    source = tmp_path / "key.txt"
    source.write_text("  AIzaSyFromAFile\n")
    dest = tmp_path / "etc" / "gemini-api-key"
    result = run_helper("install_key", "--dest", str(dest), "--key-file", str(source), env=key_env())
    assert result.returncode == 0, result.stderr
    assert_key_file(dest, "AIzaSyFromAFile")
    assert "AIzaSyFromAFile" not in result.stdout + result.stderr


def test_a_new_key_replaces_the_old_by_rename(tmp_path: Path) -> None:
    dest = tmp_path / "gemini-api-key"
    dest.write_text("old-key")
    os.chmod(dest, 0o644)
    inode = dest.stat().st_ino
    result = run_helper("install_key", "--dest", str(dest), "--key-file", "-", stdin="new-key\n", env=key_env())
    assert result.returncode == 0, result.stderr
    assert_key_file(dest, "new-key")
    assert dest.stat().st_ino != inode, "written in place, not renamed over"


def test_an_empty_key_file_changes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "gemini-api-key"
    dest.write_text("kept-key")
    (tmp_path / "empty").write_text("\n")
    result = run_helper("install_key", "--dest", str(dest), "--key-file", str(tmp_path / "empty"), env=key_env())
    assert result.returncode == 1 and "holds no key" in result.stderr
    assert dest.read_text() == "kept-key"


def test_without_a_key_an_existing_one_is_kept_and_a_missing_one_is_an_empty_file(tmp_path: Path) -> None:
    dest = tmp_path / "gemini-api-key"
    result = run_helper("install_key", "--dest", str(dest), stdin="", env=key_env())
    assert result.returncode == 0, result.stderr
    assert_key_file(dest, "")
    dest.write_text("kept-key")
    assert run_helper("install_key", "--dest", str(dest), stdin="", env=key_env()).returncode == 0
    assert dest.read_text() == "kept-key"


GUARD = 'if [ "${BASH_SOURCE[0]}" = "$0" ]; then'


def install_sh(root: Path, *functions: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Sources install.sh and calls FUNCTIONS one per line (so its set -e stops at the first failure), with every
    /etc path under ROOT and nobody:nogroup as the service's user."""
    # An install.sh that runs its main when sourced would install for real here (useradd, /opt, /etc): never.
    assert GUARD in (SYSTEMD / "install.sh").read_text(), "install.sh does not keep main from running when sourced"
    variables = key_env(AUDIODROP_INSTALL_ROOT=str(root), AUDIODROP_SERVICE_USER="nobody",
                        AUDIODROP_SERVICE_GROUP="nogroup", PYTHON=sys.executable, PREFIX="/opt/audiodrop")
    variables.update(env or {})
    script = "\n".join([f'source "{SYSTEMD / "install.sh"}"', *functions])
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=variables,
                          stdin=subprocess.DEVNULL)


def test_install_sh_ignores_a_key_in_the_environment(tmp_path: Path) -> None:
    result = install_sh(tmp_path, "install_config", "install_key", env={"GEMINI_API_KEY": "AIzaSyOnTheCommandLine"})
    assert result.returncode == 0, result.stderr
    assert "ignored" in result.stderr and "KEY_FILE" in result.stderr
    assert "AIzaSyOnTheCommandLine" not in result.stdout + result.stderr
    assert_key_file(tmp_path / "etc" / "audiodrop" / "gemini-api-key", "")


def test_install_sh_takes_the_key_from_KEY_FILE(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("AIzaSyFromKeyFile\n")
    result = install_sh(tmp_path, "install_config", "install_key", env={"KEY_FILE": str(tmp_path / "key")})
    assert result.returncode == 0, result.stderr
    key = tmp_path / "etc" / "audiodrop" / "gemini-api-key"
    info = key.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode), key.read_text()) == (0, 0o600, "AIzaSyFromKeyFile")


def read_until(fd: int, wanted: bytes, timeout: float = 20) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while wanted not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {wanted!r}; got {data!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
    return data


def test_at_a_terminal_the_key_is_asked_for_without_echo(tmp_path: Path) -> None:
    dest = tmp_path / "gemini-api-key"
    pid, terminal = pty.fork()
    if pid == 0:  # the child: its standard input, output and controlling terminal are the pty
        os.execve(sys.executable, [sys.executable, str(SYSTEMD / "install_key.py"), "--dest", str(dest)], key_env())
    try:
        shown = read_until(terminal, b"API key")
        os.write(terminal, b"AIzaSyTypedAtThePrompt\n")
        shown += read_until(terminal, b"mode 0600")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 0, shown
    assert b"AIzaSyTypedAtThePrompt" not in shown, "the key was echoed"
    assert_key_file(dest, "AIzaSyTypedAtThePrompt")


# -- install.sh's file-writing steps, for real under a temporary root ---------------------------------------------


def test_install_sh_writes_the_unit_the_dropin_and_the_folders(tmp_path: Path) -> None:
    root = tmp_path / "root"
    drops = tmp_path / "drops" / "Voice Memos"
    moved = tmp_path / "drops" / "scanner 100%"
    assert install_sh(root, "install_config").returncode == 0
    config = root / "etc" / "audiodrop" / "config.toml"
    assert config.read_text() == (SYSTEMD / "config.example.toml").read_text()
    info = config.parent.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, NOGROUP, 0o750)
    config.write_text(f'state_dir = "{tmp_path}/state"\n'
                      f"[[watch]]\npath = {toml_string(str(drops))}\n"
                      f"[[watch]]\npath = {toml_string(str(moved))}\nsource_action = \"move\"\n")

    result = install_sh(root, "install_units", "create_folders", env={"PREFIX": "/usr/local/audiodrop"})
    assert result.returncode == 0, result.stderr
    unit = (root / "etc" / "systemd" / "system" / "audiodrop.service").read_text()
    assert "ExecStart=/usr/local/audiodrop/.venv/bin/audiodrop run" in unit and "/opt/audiodrop" not in unit
    dropin = (root / "etc" / "systemd" / "system" / "audiodrop.service.d" / "drop-folders.conf").read_text()
    assert read_write_paths(dropin) == [f"{tmp_path}/state", str(moved)], dropin
    for folder, mode in ((drops, 0o2770), (moved, 0o2770), (tmp_path / "state", 0o750),
                         (tmp_path / "state" / "results", 0o750)):
        info = folder.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY, NOGROUP, mode), folder


def test_install_sh_stops_on_a_refused_folder(tmp_path: Path, land: Path) -> None:
    root = tmp_path / "root"
    assert install_sh(root, "install_config").returncode == 0
    user_symlink(land / "home" / "alice" / "inbox", land / "etc")
    before = fingerprint(land / "etc")
    (root / "etc" / "audiodrop" / "config.toml").write_text(
        f'state_dir = "/var/lib/audiodrop"\n[[watch]]\npath = "{land}/home/alice/inbox"\n')
    result = install_sh(root, "create_folders")
    assert result.returncode != 0 and "refused" in result.stderr
    assert fingerprint(land / "etc") == before


def test_install_sh_refuses_a_prefix_that_would_break_the_unit(tmp_path: Path) -> None:
    assert install_sh(tmp_path, "install_config").returncode == 0
    result = install_sh(tmp_path, "install_units", env={"PREFIX": "/opt/audio drop"})
    assert result.returncode != 0 and "PREFIX" in result.stderr


def test_sourcing_install_sh_runs_nothing(tmp_path: Path) -> None:
    """The tests above source install.sh: its main (useradd, copying to /opt, systemctl) must not run then."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in ("useradd", "systemctl", "make", "cp", "install", "mkdir"):
        (stubs / tool).write_text(f'#!/bin/sh\necho {tool} >> "{tmp_path}/called"\nexit 1\n')
        (stubs / tool).chmod(0o755)
    result = install_sh(tmp_path / "root", "true", env={"PATH": f"{stubs}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "called").exists(), (tmp_path / "called").read_text()
