"""How far a claimed recording's work has come, for `audiodrop process`'s bars: seconds of audio converted
(`recordings.progress_seconds`) and bytes of the upload sent (`recordings.progress_bytes`).

Written at most once a `every` seconds, each in its own short transaction fenced by the claim's token (a lost
claim writes nothing). Progress is only a hint for a person watching: a write that fails is skipped, never the
work's failure. Changes no state (daemon.pipeline.lifecycle does that)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from daemon.context import Context
from daemon.pipeline import lifecycle
from db.session import session_scope

log = logging.getLogger(__name__)

WRITE_EVERY_SECONDS = 1.0
COLUMNS = frozenset({"progress_seconds", "progress_bytes"})


class ProgressWriter:
    """A callback for a long step: called with how far it has come (seconds, or bytes); keeps the latest value in
    the recording's row, throttled. The first value is written at once, so a watcher sees the step start."""

    def __init__(self, ctx: Context, recording_id: int, token: int, column: str, *,
                 every: float = WRITE_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        if column not in COLUMNS:
            raise ValueError(f"not a progress column: {column}")
        self.ctx, self.recording_id, self.token, self.column = ctx, recording_id, token, column
        self.every, self.clock = every, clock
        self.last_write: float | None = None
        self.written: float | None = None

    def __call__(self, value: float) -> None:
        now = self.clock()
        if self.last_write is not None and (now - self.last_write < self.every or value == self.written):
            return
        self.last_write, self.written = now, value
        stored: dict[str, Any] = {self.column: int(value) if self.column == "progress_bytes" else float(value)}
        try:
            with session_scope(self.ctx.sessions) as session:
                lifecycle.update_claimed(session, self.recording_id, self.token, **stored)
        except Exception as err:  # a busy or unreachable database: the work goes on, the bar waits
            log.debug("recording %d: progress not written (%s)", self.recording_id, err)
