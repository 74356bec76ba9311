"""What a test leaves running: threads (watchdog observers among them) and child processes of the test process.

conftest.py's autouse fixture takes a snapshot before each test and fails the test if, after a short grace
period, something it started still runs (as watchdog's own `_no_thread_leaks` does). What a session fixture
starts on purpose and keeps for later tests (the PostgreSQL cluster of tests/pg.py, its launcher thread)
registers here instead:

    leaks.outlives_tests(threads="pg-launcher")          # threads whose names start with this
    leaks.outlives_tests(processes=lambda: {server.pid})  # pids, asked again at every check (restarts)
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_HAS_CHILDREN_FILES = Path(f"/proc/self/task/{threading.get_native_id()}/children").exists()
_thread_prefixes: set[str] = set()
_process_sources: list[Callable[[], Iterable[int | None]]] = []


def outlives_tests(*, threads: str | None = None, processes: Callable[[], Iterable[int | None]] | None = None) -> None:
    """Declare threads (by name prefix) or child processes (pids, read at each check) that legitimately outlive
    the test that started them."""
    if threads:
        _thread_prefixes.add(threads)
    if processes is not None:
        _process_sources.append(processes)


@dataclass(frozen=True)
class Child:
    pid: int
    started: str  # field 22 of /proc/PID/stat: with the pid, names one process even after pids are reused
    command: str


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process; None if it is gone (a zombie counts as gone: it runs nothing)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else (fields[0], fields[19])


def children() -> set[Child]:
    """The live child processes of this process (every thread's children: a Popen from any thread)."""
    pids: set[int] = set()
    if _HAS_CHILDREN_FILES:
        for task in Path("/proc/self/task").iterdir():
            try:
                pids.update(int(pid) for pid in (task / "children").read_text().split())
            except OSError:  # the thread ended meanwhile
                continue
    else:  # a kernel without CONFIG_PROC_CHILDREN: every process's parent
        me = str(os.getpid())
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                    pids.add(int(entry.name))
            except (OSError, IndexError):
                continue
    found = set()
    for pid in pids:
        stat = _stat(pid)
        if stat is None:
            continue
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.add(Child(pid, stat[1], command.strip()[:300]))
    return found


@dataclass(frozen=True)
class Snapshot:
    threads: frozenset[threading.Thread]
    children: frozenset[Child]


def snapshot() -> Snapshot:
    return Snapshot(frozenset(threading.enumerate()), frozenset(children()))


def _allowed_thread(thread: threading.Thread) -> bool:
    return any(thread.name.startswith(prefix) for prefix in _thread_prefixes)


def _allowed_pids() -> set[int]:
    allowed: set[int] = set()
    for source in _process_sources:
        allowed.update(pid for pid in source() if pid)
    return allowed


def _new_threads(before: Snapshot) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before.threads and t.is_alive() and not _allowed_thread(t)]


def _new_children(before: Snapshot) -> list[Child]:
    allowed = _allowed_pids()
    return [c for c in children() if c not in before.children and c.pid not in allowed]


@dataclass
class Leftovers:
    threads: list[threading.Thread]
    processes: list[Child]

    def __bool__(self) -> bool:
        return bool(self.threads or self.processes)

    def describe(self) -> str:
        return "\n".join([describe_thread(t) for t in self.threads] +
                         [f"child process {c.pid}: {c.command}" for c in self.processes])


def left_behind(before: Snapshot, grace_seconds: float = 5.0) -> Leftovers:
    """What runs now that did not before, after `grace_seconds` for it to end by itself: threads are joined
    (one that is shutting down gets the time to finish), child processes are waited for."""
    if not _new_threads(before) and not _new_children(before):
        return Leftovers([], [])
    gc.collect()  # objects whose finalizers stop what they started (only paid for when something is left)
    deadline = time.monotonic() + grace_seconds
    for thread in _new_threads(before):
        thread.join(max(deadline - time.monotonic(), 0.0))
    while _new_children(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return Leftovers(_new_threads(before), _new_children(before))


def stop(processes: list[Child]) -> None:
    """Kill child processes a test left running, and reap them through their Popen objects where there are any (a
    Popen still "running" when collected warns, and with warnings as errors that fails whichever test runs then)."""
    pids = {child.pid for child in processes}
    popens = [o for o in gc.get_objects() if isinstance(o, subprocess.Popen) and o.pid in pids and o.returncode is None]
    for child in processes:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for popen in popens:
        popen.wait(timeout=10)


def describe_thread(thread: threading.Thread) -> str:
    """What the thread is and where it is now: its class, its target and its innermost frame outside threading."""
    kind = "thread"
    observers = sys.modules.get("watchdog.observers.api")
    if observers is not None and isinstance(thread, observers.BaseObserver):
        kind = "watchdog observer (stop() and join() it)"
    elif observers is not None and isinstance(thread, observers.EventEmitter):
        kind = "watchdog emitter (its observer was not stopped)"
    elif type(thread).__module__.startswith("watchdog."):
        kind = "watchdog thread (its observer was not stopped)"
    target = getattr(thread, "_target", None)
    running = f", running {getattr(target, '__qualname__', target)}" if target is not None else ""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None and frame.f_code.co_filename == threading.__file__:
        frame = frame.f_back
    where = "" if frame is None else \
        f", at {_short(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
    return f"{kind} {thread.name!r} ({type(thread).__module__}.{type(thread).__qualname__}{running}{where})"


def _short(filename: str) -> str:
    root = str(Path(__file__).resolve().parent.parent)
    return os.path.relpath(filename, root) if filename.startswith(root + os.sep) else filename
