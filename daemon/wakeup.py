"""Wake-ups from the CLI: a datagram socket in the state folder. `audiodrop ask` or `retry` commit their change,
then poke the daemon here, so the work starts at once instead of at a timer (the daemon has none to wait for).
A poke is only a hint: a daemon that is not running misses nothing, it finds the work in the database."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_NAME = "wake.sock"
KINDS = frozenset({"convert", "upload", "prompt", "delete", "retry", "scan", "reconcile"})


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def poke(state_dir: Path, *kinds: str) -> bool:
    """Tell a running daemon to look for work of these kinds now. False if no daemon listens."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(str(socket_path(state_dir)))
            sock.send(" ".join(kinds).encode("ascii"))
    except OSError:
        return False
    return True


class Listener:
    """The daemon's end: a thread that blocks on the socket and hands each poke's kinds to `wake`."""

    def __init__(self, state_dir: Path, wake: Callable[..., None]) -> None:
        self.path = socket_path(state_dir)
        self.wake = wake
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o660)  # members of the daemon's group may poke it
        except OSError as err:
            sock.close()
            log.warning("no wake-up socket (%s): work queued from the CLI starts within a few minutes", err)
            return
        self.sock = sock
        self.thread = threading.Thread(target=self._listen, name="wakeup", daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(256)
            except OSError:
                return  # closed by stop()
            if not data:
                return
            kinds = [kind for kind in data.decode("ascii", "replace").split() if kind in KINDS]
            if kinds:
                self.wake(*kinds)

    def stop(self) -> None:
        if self.sock is None:
            return
        # A zero-length datagram ends the thread's recv; then the socket goes.
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"", str(self.path))
        if self.thread is not None:
            self.thread.join(timeout=2)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
