"""The state names of recordings and prompts (PRODUCT.md fixes them). Pure: the tables store them as enum
columns, and daemon.lifecycle / daemon.prompt_lifecycle hold the transition tables and the only code that
changes them."""

from __future__ import annotations

import enum


class RecordingState(enum.StrEnum):
    """Where a recording is on its way from a drop folder to a usable remote copy; finer distinctions go
    into the event's reason, not into new states."""

    DISCOVERED = "discovered"
    """Seen in a drop folder; waiting for the file to be completely written."""
    CONVERTING = "converting"
    """ffmpeg is making the compact mono copy (claimed by one worker, under a lease)."""
    CONVERTED = "converted"
    """The compact copy is ready and waits to be uploaded (also while offline or without a key)."""
    UPLOADING = "uploading"
    """An upload has started; its intent (display name) is recorded so a crash cannot upload it twice."""
    PROCESSING = "processing"
    """Uploaded; the server has not yet made the file ACTIVE."""
    ACTIVE = "active"
    """Usable in prompts until `remote_expires_at`."""
    EXPIRED = "expired"
    """The remote copy is gone (48 h passed, or evicted for quota); the compact copy is kept for re-upload."""
    FAILED = "failed"
    """A passing problem; retried automatically at `next_attempt_at`."""
    REJECTED = "rejected"
    """The input itself is unusable (not audio, corrupt, empty); not retried until a person asks."""


class PromptState(enum.StrEnum):
    """Where a queued prompt is; `waiting_for` says what a queued one waits for."""

    QUEUED = "queued"
    """Waiting to run: for its turn, for its files to be uploaded, for a rate limit or the network."""
    RUNNING = "running"
    """Claimed by a worker (under a lease) and talking to the model."""
    DONE = "done"
    """The answer is stored in the database; its files are written to results_dir (or retried)."""
    FAILED = "failed"
    """It could not be answered; `error` says why."""
