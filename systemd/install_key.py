#!/usr/bin/env python3
"""Installs the Gemini API key for the system service, never taking it from the command line or the environment.

    install_key.py --dest /etc/audiodrop/gemini-api-key [--key-file PATH]

Where the key comes from, first that applies:
- --key-file PATH: the file's content, surrounding whitespace removed ("-" reads standard input, for
  `pass show gemini | sudo make install-service KEY_FILE=-`). A file that holds no key is an error.
- standard input when it is a terminal: a prompt, the key typed without echo; Enter alone leaves things as they
  are (the current key, or an empty file for now).
- nothing: the current key file is kept; without one an empty file is made, so the service starts, converts and
  queues, and `audiodrop status` says it waits for a key.

A key read from a variable (GEMINI_API_KEY=... make install-service) would show in `ps` and the shell's history;
install.sh warns and ignores it. The key is written atomically: a temporary file made under umask 077 in the
same folder, owned root:root (when run as root) with mode 0600, synced, then renamed over the old one. The key
is never printed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

PROMPT = "Gemini API key for the audiodrop service (typing is not shown; Enter {keeps}): "


class KeyInputError(Exception):
    pass


def read_key_file(path: str) -> str:
    if path == "-":
        text = sys.stdin.read()
    else:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    key = text.strip()
    if not key:
        raise KeyInputError(f"{path} holds no key")
    if any(char.isspace() or ord(char) < 32 for char in key):
        raise KeyInputError(f"{path} holds more than one line or word; it should hold the key alone")
    return key


def ask_key(exists: bool) -> str:
    """The key typed at the terminal on standard input, without echo ("" when only Enter is pressed)."""
    keeps = "keeps the current key" if exists else "adds it later"
    key = getpass.getpass(PROMPT.format(keeps=keeps), stream=sys.stderr).strip()
    if any(char.isspace() or ord(char) < 32 for char in key):
        raise KeyInputError("that is more than one word; nothing was changed")
    return key


def write_key(dest: str, key: str) -> None:
    """DEST holds KEY: written to a temporary file (umask 077, mode 0600, root:root), then renamed over DEST."""
    folder = os.path.dirname(os.path.abspath(dest))
    temporary = os.path.join(folder, f".{os.path.basename(dest)}.{os.getpid()}.tmp")
    old_umask = os.umask(0o077)
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    finally:
        os.umask(old_umask)
    try:
        if os.geteuid() == 0:
            os.fchown(descriptor, 0, 0)
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, key.encode("utf-8"))
        os.fsync(descriptor)
        os.close(descriptor)
        descriptor = -1
        os.replace(temporary, dest)
    except BaseException:
        if descriptor >= 0:
            os.close(descriptor)
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
    folder_descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder_descriptor)
    finally:
        os.close(folder_descriptor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", required=True, help="the key file systemd reads (LoadCredential=)")
    parser.add_argument("--key-file", help='a file holding the key, or "-" for standard input')
    args = parser.parse_args(argv)
    exists = os.path.isfile(args.dest)
    try:
        if args.key_file:
            key = read_key_file(args.key_file)
        elif sys.stdin is not None and sys.stdin.isatty():
            key = ask_key(exists)
        else:
            key = ""
    except (OSError, KeyInputError, UnicodeDecodeError) as err:
        print(f"install_key.py: {err}", file=sys.stderr)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("\ninstall_key.py: no key given; nothing was changed", file=sys.stderr)
        return 1
    if key:
        write_key(args.dest, key)
        print(f"install_key.py: the API key is in {args.dest} (mode 0600, read by systemd only)", file=sys.stderr)
    elif not exists:
        write_key(args.dest, "")
        print(f"install_key.py: no API key yet: {args.dest} is empty; the service converts and queues until one "
              "is installed (make install-service KEY_FILE=PATH)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
