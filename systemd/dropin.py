#!/usr/bin/env python3
"""What the system service may write to, from its config: the drop-in install.sh writes and the folders it makes.

    dropin.py render  --config /etc/audiodrop/config.toml [--home DIR] [--state-home DIR] [--output FILE]
    dropin.py folders --config /etc/audiodrop/config.toml [--home DIR] [--state-home DIR]

Under ProtectSystem=strict the service reads everything (and /home, /root, /run/user through
ProtectHome=read-only) but writes only to /var/lib/audiodrop (StateDirectory=) and to the ReadWritePaths= this
drop-in adds:
- state_dir and results_dir, when they are outside /var/lib/audiodrop;
- a drop folder only when its [[watch]] table asks the daemon to write there: source_action = "move" or
  "delete" (a per-folder setting read with .get(), so a config without it means read only). The daemon only
  reads drop folders otherwise, so they get no line.

`folders` prints the folders install.sh makes when missing, one "KIND<TAB>PATH" line each: "data" for
state_dir/results_dir outside /var/lib/audiodrop (the service cannot make them itself under
ProtectSystem=strict), "drop" for every drop folder.

Paths are read the way the daemon reads them (daemon/config.py: $VARIABLES and ~ expanded, relative paths taken
from the working directory), in the service's environment rather than root's: HOME is the audiodrop user's home
and XDG_STATE_HOME=/var/lib as the unit sets it. Standard library only (tomllib, Python 3.11+).

Each path is written as one item of systemd's space-separated list syntax (systemd.syntax(7), QUOTING): the
whole item in double quotes, the "-" prefix (a missing path is skipped, not a start failure) inside them since
an opening quote counts only at the start of an item, backslash and double quote escaped with a backslash, and
"%" doubled because specifiers (%h, %n...) are expanded after unquoting. A path with a control character (a
newline would end the line) or a ".." component (systemd refuses paths that are not normalized) is refused.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from typing import Any

SERVICE_STATE_DIR = "/var/lib/audiodrop"  # StateDirectory=audiodrop, writable through the unit itself
SERVICE_STATE_HOME = "/var/lib"  # the unit's Environment=XDG_STATE_HOME=/var/lib
SERVICE_HOME = "/var/lib/audiodrop"  # install.sh's useradd --home-dir
SERVICE_CWD = "/"  # a system service without WorkingDirectory= runs in /
WRITING_ACTIONS = ("move", "delete")
PROTECTED_HOMES = ("/home", "/root", "/run/user")  # ProtectHome=read-only: readable, not writable


class PathError(ValueError):
    """A configured path that cannot be written into a unit file as it is."""


@dataclass(frozen=True)
class Entry:
    path: str
    kind: str  # "data" (state_dir, results_dir) or "drop"
    granted: bool  # gets a ReadWritePaths= line
    comment: str  # what the line is for, or why there is none


def quote(word: str) -> str:
    """One item of a systemd list setting, read back by systemd as exactly WORD (see the module's docstring)."""
    for char in word:
        if ord(char) < 32 or ord(char) == 127:
            raise PathError(f"{word!r}: a control character ({char!r}) cannot be written into a unit file")
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def normalized(path: str) -> str:
    """The absolute path as systemd keeps it ('//' and '/./' folded, no trailing '/'); '..' is refused."""
    if not path.startswith("/"):
        raise PathError(f"{path!r}: not an absolute path")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PathError(f"{path!r}: has a '..' component (systemd refuses it); write the path without it")
    for char in path:
        if ord(char) < 32 or ord(char) == 127:
            raise PathError(f"{path!r}: a control character ({char!r}) cannot be written into a unit file")
    return "/" + "/".join(parts)


def is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)  # os.path.expandvars' pattern


def service_path(raw: str, env: dict[str, str], cwd: str = SERVICE_CWD) -> str:
    """RAW as the daemon turns it into a path (os.path.expandvars, expanduser, absolute) with ENV as its
    environment, normalized."""

    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("{") and name.endswith("}"):
            name = name[1:-1]
        return env.get(name, match.group(0))

    text = _VARIABLE.sub(variable, raw) if "$" in raw else raw
    if text.startswith("~"):
        end = text.find("/", 1)
        user, rest = (text[1:], "") if end < 0 else (text[1:end], text[end:])
        if not user:
            text = env["HOME"].rstrip("/") + rest or "/"
        else:
            try:
                text = pwd.getpwnam(user).pw_dir.rstrip("/") + rest or "/"
            except KeyError:
                pass
    if not text.startswith("/"):
        text = os.path.join(cwd, text)
    return normalized(text)


def service_env(home: str = SERVICE_HOME, state_home: str = SERVICE_STATE_HOME,
                user: str = "audiodrop") -> dict[str, str]:
    """What the daemon's paths can name: the variables systemd sets for the service and the unit's own."""
    return {"HOME": home, "USER": user, "LOGNAME": user, "XDG_STATE_HOME": state_home,
            "STATE_DIRECTORY": SERVICE_STATE_DIR, "CONFIGURATION_DIRECTORY": "/etc/audiodrop"}


def plan(config: dict[str, Any], env: dict[str, str]) -> list[Entry]:
    """Every path the daemon uses, whether it gets a ReadWritePaths= line, and the comment saying why."""
    state_home = env.get("XDG_STATE_HOME") or env["HOME"].rstrip("/") + "/.local/state"
    state_dir = service_path(str(config.get("state_dir", state_home.rstrip("/") + "/audiodrop")), env)
    results_dir = service_path(str(config.get("results_dir", state_dir + "/results")), env)
    # (path, kind, label, whether the daemon writes there, what it does there)
    uses = [(state_dir, "data", f"state_dir {state_dir}", True, "the daemon writes its database and converted audio"),
            (results_dir, "data", f"results_dir {results_dir}", True, "the daemon writes prompt results")]
    watches = config.get("watch")
    if watches is None:  # the daemon's default drop folder
        watches = [{"path": env["HOME"].rstrip("/") + "/AudioDrop/inbox"}]
    if not isinstance(watches, list):
        raise PathError("watch: expected [[watch]] tables")
    for index, table in enumerate(watches):
        if not isinstance(table, dict) or not isinstance(table.get("path"), str):
            raise PathError(f"watch[{index}].path: missing or not a string")
        path = service_path(table["path"], env)
        action = table.get("source_action")
        if action in WRITING_ACTIONS:
            uses.append((path, "drop", f"drop folder {path}", True,
                         f'source_action = "{action}": the daemon {action}s recordings it has taken'))
        else:
            uses.append((path, "drop", f"drop folder {path}", False, "the daemon only reads recordings here"))

    entries: list[Entry] = []
    granted: list[str] = []
    for path, kind, label, writes, doing in uses:
        if not writes:
            entries.append(Entry(path, kind, False, f"{label}: {doing}; readable already, no line"))
            continue
        cover = next((folder for folder in [SERVICE_STATE_DIR, *granted] if is_within(path, folder)), None)
        if cover == SERVICE_STATE_DIR:
            entries.append(Entry(path, kind, False, f"{label}: {doing}; inside the unit's StateDirectory, "
                                                    "writable already, no line"))
        elif cover is not None:
            entries.append(Entry(path, kind, False, f"{label}: {doing}; inside {cover}, no line of its own"))
        else:
            if any(is_within(path, home) for home in PROTECTED_HOMES):
                doing += " (ProtectHome=read-only leaves it read only without this line)"
            granted.append(path)
            entries.append(Entry(path, kind, True, f"{label}: {doing}"))
    return entries


def render(entries: list[Entry], source: str) -> str:
    lines = [
        f"# Written by install.sh from {source}: run it again after changing state_dir, results_dir or the",
        "# drop folders there. ProtectSystem=strict lets the service read every folder (under /home, /root and",
        "# /run/user too, through ProtectHome=read-only) and write only to /var/lib/audiodrop and the paths below.",
        '# "-" inside the quotes: a path that does not exist (an unmounted share) is skipped, not a start failure.',
        "[Service]",
    ]
    for entry in entries:
        lines.append(f"# {entry.comment}")
        if entry.granted:
            lines.append("ReadWritePaths=" + quote("-" + entry.path))
    return "\n".join(lines) + "\n"


def folders(entries: list[Entry]) -> list[tuple[str, str]]:
    """(kind, path) of what install.sh makes when missing: every drop folder, the data folders it must make."""
    seen: set[str] = set()
    result = []
    for entry in entries:
        if entry.kind == "data" and is_within(entry.path, SERVICE_STATE_DIR):
            continue  # systemd makes StateDirectory=, the daemon what is inside it
        if entry.path not in seen:
            seen.add(entry.path)
            result.append((entry.kind, entry.path))
    return result


def load(config_path: str) -> dict[str, Any]:
    with open(config_path, "rb") as handle:
        return tomllib.load(handle)


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".drop-folders.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("render", "folders"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--home", default=SERVICE_HOME, help="the service user's home (for ~ and $HOME)")
    parser.add_argument("--state-home", default=SERVICE_STATE_HOME, help="the unit's XDG_STATE_HOME")
    parser.add_argument("--user", default="audiodrop", help="the service user (for $USER)")
    parser.add_argument("--output", help="render: write here (atomically, mode 0644) instead of stdout")
    args = parser.parse_args(argv)
    try:
        entries = plan(load(args.config), service_env(args.home, args.state_home, args.user))
        if args.command == "render":
            text = render(entries, args.config)
            if args.output:
                write_atomically(args.output, text)
            else:
                sys.stdout.write(text)
        else:
            for kind, path in folders(entries):
                sys.stdout.write(f"{kind}\t{path}\n")
    except (OSError, tomllib.TOMLDecodeError, PathError) as err:
        print(f"dropin.py: {args.config}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
