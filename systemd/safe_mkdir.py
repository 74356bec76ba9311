#!/usr/bin/env python3
"""Creates missing folders as root, safely on paths that other people control (drop folders in their homes).

    safe_mkdir.py --owner audiodrop --group audiodrop --mode 2770 PATH...

`install -d -o USER -m MODE PATH` follows symlinks: whoever can write to a parent of PATH can swap a component
for a symlink between the check and the call, and root then re-owns the link's target (/etc, say). Here:

- the path is walked one component at a time from "/", each opened relative to its parent's descriptor with
  O_NOFOLLOW, so nothing is looked up again by name once it was checked;
- a symlink owned by root (/var/run -> /run) is followed, its target walked under the same rules; a symlink
  owned by anyone else refuses the whole path, whether what it points to exists or not;
- a missing component is made with mkdir relative to its parent's descriptor (which never follows a symlink),
  opened with O_DIRECTORY|O_NOFOLLOW and checked to be the empty root-owned folder just made; only then is
  it given its owner and mode through that descriptor (fchown, fchmod). Folders made on the way to PATH stay
  root's, mode 0755 (what `install -d` gives them); only PATH itself gets --owner, --group and --mode;
- a folder that already exists is never re-owned nor re-moded.

Prints one line per PATH ("created" or "exists"); a refused PATH is named on stderr with the reason, the
others are still done, and the exit code is then 1. Standard library only: it runs before the venv exists.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import stat
import sys

MAX_SYMLINKS = 40  # the kernel's own limit (ELOOP)
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_ONLY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
INTERMEDIATE_MODE = 0o755


class Refused(Exception):
    """The path is not made: a symlink someone else controls, a file in the way, a race lost."""


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def make_folder(path: str, uid: int, gid: int, mode: int) -> bool:
    """Makes PATH (and missing parents) as described above. True if PATH was made, False if it existed."""
    if not path.startswith("/"):
        raise Refused("not an absolute path")
    pending = _components(path)
    if not pending:
        return False
    remaining_links = MAX_SYMLINKS
    current = os.open("/", DIRECTORY)
    shown = ""  # the path walked so far, for messages
    try:
        while pending:
            name = pending.pop(0)
            last = not pending
            if name == "..":  # the real parent of the folder we hold, never a symlink
                parent = os.open("..", DIRECTORY, dir_fd=current)
                os.close(current)
                current, shown = parent, os.path.dirname(shown) or "/"
                continue
            where = f"{shown.rstrip('/')}/{name}"
            try:
                handle = os.open(name, PATH_ONLY, dir_fd=current)
            except FileNotFoundError:
                handle = None
            if handle is None:
                child = _make_child(current, name, where, uid, gid, mode, last)
                os.close(current)
                current, shown = child, where
                if last:
                    return True
                continue
            try:
                info = os.fstat(handle)
                if stat.S_ISLNK(info.st_mode):
                    if info.st_uid != 0:
                        raise Refused(f"{where} is a symlink owned by uid {info.st_uid}, not by root")
                    remaining_links -= 1
                    if remaining_links < 0:
                        raise Refused(f"too many symlinks on the way to {path}")
                    target = os.readlink("", dir_fd=handle)  # the link held open, not looked up again
                    if target.startswith("/"):
                        os.close(current)
                        current, shown = os.open("/", DIRECTORY), ""
                    pending[:0] = _components(target)
                    continue
                if not stat.S_ISDIR(info.st_mode):
                    raise Refused(f"{where} exists and is not a folder")
            finally:
                os.close(handle)
            try:
                child = os.open(name, DIRECTORY, dir_fd=current)
            except OSError as err:  # swapped for a symlink or a file since the look above
                raise Refused(f"{where} changed while it was checked ({err.strerror})") from None
            os.close(current)
            current, shown = child, where
        return False  # every component existed: nothing is changed
    finally:
        os.close(current)


def _make_child(parent: int, name: str, where: str, uid: int, gid: int, mode: int, last: bool) -> int:
    try:
        os.mkdir(name, 0o700, dir_fd=parent)  # mkdirat never follows a symlink at the last component
    except FileExistsError:
        raise Refused(f"{where} appeared while it was being made") from None
    try:
        child = os.open(name, DIRECTORY, dir_fd=parent)
    except OSError as err:
        raise Refused(f"{where} was replaced right after it was made ({err.strerror})") from None
    try:
        info = os.fstat(child)
        # What we hold must be the folder just made: root's, empty. Anything else was put there by someone else.
        if info.st_uid != os.geteuid() or os.listdir(child):
            raise Refused(f"{where} was replaced right after it was made")
        if last:
            os.fchown(child, uid, gid)
            os.fchmod(child, mode)
        else:
            os.fchmod(child, INTERMEDIATE_MODE)
    except BaseException:
        os.close(child)
        raise
    return child


def _user_id(value: str) -> int:
    return int(value) if value.isdigit() else pwd.getpwnam(value).pw_uid


def _group_id(value: str) -> int:
    return int(value) if value.isdigit() else grp.getgrnam(value).gr_gid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owner", required=True, help="user name or uid of each PATH made")
    parser.add_argument("--group", required=True, help="group name or gid of each PATH made")
    parser.add_argument("--mode", required=True, type=lambda text: int(text, 8), help="octal, e.g. 2770")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    args = parser.parse_args(argv)
    try:
        uid, gid = _user_id(args.owner), _group_id(args.group)
    except KeyError as err:
        parser.error(f"no such user or group: {err}")
    failed = False
    for path in args.paths:
        try:
            made = make_folder(path, uid, gid, args.mode)
        except (Refused, OSError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            print(f"safe_mkdir: refused {path}: {reason}", file=sys.stderr)
            failed = True
            continue
        print(f"{'created' if made else 'exists'} {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
