"""Logging to stderr; under journald (JOURNAL_STREAM set) without our own timestamps, which it adds."""

from __future__ import annotations

import logging
import os
import sys


def setup(level: str = "INFO") -> None:
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The SDK's HTTP stack logs every request at INFO; keep the journal about recordings.
    for noisy in ("httpx2", "httpx", "google_genai", "watchdog", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "Skipped: maximum number of running instances reached" is normal when a job is woken early.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
