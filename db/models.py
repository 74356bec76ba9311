"""The tables. A recording's `state` is changed only by daemon.lifecycle and a prompt's only by
daemon.prompt_lifecycle; everything else here is plain data.

Work is claimed under a lease: `claimed_by` (the node and run holding it), `claimed_until` (renewed while the
work runs) and `claim_token` (a fencing token, raised at every claim: a final write that names an older token
writes nothing)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import ForeignKey, Index, Integer, LargeBinary, MetaData, Numeric, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from db.states import PromptState, RecordingState
from db.types import Int64, UTCDateTime, state_column

# Named constraints so Alembic's batch mode can recreate SQLite tables deterministically.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Claimed:
    """The claim of a row of work (see the module docstring): who holds it, until when, and its fencing token."""

    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claim_token: Mapped[int] = mapped_column(default=0, server_default="0")


class HistoryRow:
    """One state change (or notable happening) of a recording or a prompt."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")


class Recording(Claimed, Base):
    """One recording, identified by the SHA-256 of its content once the file is complete."""

    __tablename__ = "recordings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[RecordingState] = mapped_column(state_column(RecordingState), index=True)
    source_path: Mapped[str] = mapped_column(Text)
    source_size: Mapped[int] = mapped_column(Int64)
    source_mtime_ns: Mapped[int] = mapped_column(Int64)
    # The file's identity on its filesystem, so a file moved while the daemon was down is followed.
    source_dev: Mapped[int | None] = mapped_column(Int64)
    source_ino: Mapped[int | None] = mapped_column(Int64)
    sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    watch_root: Mapped[str | None] = mapped_column(Text)
    # The node whose drop folder holds the file: only it converts the recording (fleet mode).
    node: Mapped[str | None] = mapped_column(String(64), index=True)
    # Settle detection: a close-after-write event seen since the last change, and when the file last changed.
    closed_after_write: Mapped[bool] = mapped_column(default=False)
    last_change_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # A discovered file that may be a longer version of this earlier recording (the same path grew).
    supersedes_id: Mapped[int | None] = mapped_column(Integer)

    duration_seconds: Mapped[float | None]
    converted_path: Mapped[str | None] = mapped_column(Text)
    converted_bytes: Mapped[int | None] = mapped_column(Int64)
    converted_mime: Mapped[str | None] = mapped_column(String(64))
    converted_format: Mapped[str | None] = mapped_column(String(16))
    converted_sha256: Mapped[str | None] = mapped_column(String(64))
    # Set when the API refused the default format: the recording is re-encoded to this one.
    target_format: Mapped[str | None] = mapped_column(String(16))
    warning: Mapped[str | None] = mapped_column(Text)
    # Work in progress, for `process`'s bars: seconds of audio converted, bytes of the upload sent.
    progress_seconds: Mapped[float | None]
    progress_bytes: Mapped[int | None] = mapped_column(Int64)

    remote_name: Mapped[str | None] = mapped_column(String(64), index=True)
    remote_uri: Mapped[str | None] = mapped_column(Text)
    remote_bytes: Mapped[int | None] = mapped_column(Int64)
    remote_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Written before an upload starts, so a crash mid-upload can find (adopt or delete) what reached the server.
    upload_display_name: Mapped[str | None] = mapped_column(String(128))
    uploaded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_needed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    # Not before this time: a failed recording's retry, a PROCESSING file's next look.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # What became of the source file once the recording was done (daemon.pipeline.sources): NULL not decided yet;
    # "keep"; an intent committed before the file is touched ("move" to source_moved_to, "delete"); then "moved",
    # "deleted" or "kept" (left alone: it changed, vanished or could not be moved) at source_done_at.
    source_action: Mapped[str | None] = mapped_column(String(16), index=True)
    source_moved_to: Mapped[str | None] = mapped_column(Text)
    source_done_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    events: Mapped[list[RecordingEvent]] = relationship(
        back_populates="recording", order_by="RecordingEvent.id", cascade="all, delete-orphan"
    )
    aliases: Mapped[list[SourceAlias]] = relationship(
        back_populates="recording", order_by="SourceAlias.id", cascade="all, delete-orphan"
    )

    __table_args__ = (Index("ix_recordings_source", "source_path", "source_size", "source_mtime_ns"),
                      Index("ix_recordings_claimed_until", "claimed_until"))


class RecordingEvent(HistoryRow, Base):
    """One state change (or notable happening) in a recording's history; `show` lists them."""

    __tablename__ = "recording_events"

    recording_id: Mapped[int] = mapped_column(ForeignKey("recordings.id", ondelete="CASCADE"), index=True)

    recording: Mapped[Recording] = relationship(back_populates="events")


class SourceAlias(Base):
    """Another file with the same content as a recording: processed once, remembered so it is not taken again."""

    __tablename__ = "source_aliases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recording_id: Mapped[int] = mapped_column(ForeignKey("recordings.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Int64)
    mtime_ns: Mapped[int] = mapped_column(Int64)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)

    recording: Mapped[Recording] = relationship(back_populates="aliases")

    __table_args__ = (Index("ix_source_aliases_source", "path", "size", "mtime_ns"),)


class Prompt(Claimed, Base):
    """A queued prompt over one or more recordings, and its result."""

    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[PromptState] = mapped_column(state_column(PromptState), index=True)
    template: Mapped[str | None] = mapped_column(String(64))
    prompt_text: Mapped[str] = mapped_column(Text)
    system_instruction: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(64))
    # The model first asked for, when it kept failing with 500 INTERNAL and `model` is the fallback.
    requested_model: Mapped[str | None] = mapped_column(String(64))
    # 500 INTERNAL answers in a row from `model` (any other outcome resets it).
    internal_errors: Mapped[int] = mapped_column(default=0, server_default="0")
    # Generation calls that ran out of prompts.generate_timeout_seconds (each one may have been billed).
    timeouts: Mapped[int] = mapped_column(default=0, server_default="0")
    output_format: Mapped[str] = mapped_column(String(16), default="markdown")
    span_start_seconds: Mapped[float | None]
    span_end_seconds: Mapped[float | None]
    delivery: Mapped[str | None] = mapped_column(String(16))
    result_text: Mapped[str | None] = mapped_column(Text)
    result_path: Mapped[str | None] = mapped_column(Text)
    # Why the result's files could not be written yet (the answer itself is safe in result_text).
    file_error: Mapped[str | None] = mapped_column(Text)
    result_meta: Mapped[str | None] = mapped_column(Text)  # JSON: what result files' metadata holds
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None]
    audio_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    thinking_tokens: Mapped[int | None]  # billed as output, not part of the text
    estimated_audio_tokens: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    # What a queued prompt waits for (files being re-uploaded, a rate limit, the network); not an error.
    waiting_for: Mapped[str | None] = mapped_column(Text)
    # "files" when it waits for its recordings to become usable: their progress wakes it, not a timer.
    wait_kind: Mapped[str | None] = mapped_column(String(16))
    max_output_tokens: Mapped[int | None]
    chunk_seconds: Mapped[float | None]
    chunks: Mapped[int | None]
    model_version: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The sum of its answers' costs (token_usage.cost_usd), and of their cached tokens; NULL until it has any.
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(12, 6))
    cached_tokens: Mapped[int | None]
    # ask --force: this prompt (all of its calls) may go past daily/monthly_budget_usd, once; no other prompt may.
    force_budget: Mapped[bool] = mapped_column(default=False, server_default=false())
    # ask --batch: sent through the Batch API; batch_name is the job's name ("batches/...") once it is created.
    batch: Mapped[bool] = mapped_column(default=False, server_default=false())
    batch_name: Mapped[str | None] = mapped_column(String(128))
    # Long silences are cut out of the audio sent (prompts.trimming): the map back to the recordings' own timeline
    # (JSON, {recording id: TrimMap}) once built, and the seconds it saved.
    trim: Mapped[bool] = mapped_column(default=False, server_default=false())
    trim_map: Mapped[str | None] = mapped_column(Text)
    trimmed_seconds: Mapped[float | None]
    # Names for the speakers, in order of appearance (ask --speakers "Ana,Ben"), one per line.
    speakers: Mapped[str | None] = mapped_column(Text)
    # Result files written beside the main one: "srt,vtt".
    extra_formats: Mapped[str | None] = mapped_column(String(64))

    recordings: Mapped[list[PromptRecording]] = relationship(
        order_by="PromptRecording.position", cascade="all, delete-orphan"
    )
    events: Mapped[list[PromptEvent]] = relationship(order_by="PromptEvent.id", cascade="all, delete-orphan")


class PromptEvent(HistoryRow, Base):
    """One state change (or notable happening) in a prompt's history; `audiodrop prompts` lists them."""

    __tablename__ = "prompt_events"

    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)


class PromptPart(Base):
    """The answer for one piece of a chunked prompt, kept as soon as it arrives: a retry (after a 429, a crash,
    a cut-off chunk) sends only the pieces not yet answered, so their audio is billed once."""

    __tablename__ = "prompt_parts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    start_seconds: Mapped[float]
    end_seconds: Mapped[float]
    text: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    audio_tokens: Mapped[int] = mapped_column(default=0)
    output_tokens: Mapped[int] = mapped_column(default=0)
    thinking_tokens: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("prompt_id", "start_seconds", "end_seconds",
                                       name="uq_prompt_parts_span"),)


class TokenUsage(Base):
    """The usage of one generateContent answer, cut off or not: what `status` sums as the tokens spent today,
    since every answer is billed, including the ones retried with a larger budget."""

    __tablename__ = "token_usage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    prompt_id: Mapped[int | None] = mapped_column(ForeignKey("prompts.id", ondelete="SET NULL"))
    model: Mapped[str] = mapped_column(String(64))
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    audio_tokens: Mapped[int] = mapped_column(default=0)
    output_tokens: Mapped[int] = mapped_column(default=0)
    thinking_tokens: Mapped[int] = mapped_column(default=0)
    # cachedContentTokenCount: the part of prompt_tokens read from a context cache (billed at the cached price).
    cached_tokens: Mapped[int] = mapped_column(default=0, server_default="0")
    # Answered through the Batch API (input and output at half price).
    batch: Mapped[bool] = mapped_column(default=False, server_default=false())
    # The answer's cost in USD at the prices in force when it came (pricing.ledger_amount); NULL: the model had
    # no price then (status prices it from the counts above once the table knows the model).
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(12, 6))


class PromptRecording(Base):
    """Which recordings a prompt covers, in order."""

    __tablename__ = "prompt_recordings"

    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True)
    recording_id: Mapped[int] = mapped_column(ForeignKey("recordings.id", ondelete="CASCADE"), primary_key=True,
                                              index=True)
    position: Mapped[int] = mapped_column(default=0)


class RemoteDeletion(Claimed, Base):
    """A remote copy of ours that must go (evicted for quota, re-encoded, superseded, an orphan): deleted by a
    worker outside any transaction, retried until the server confirms; its bytes count in the ledger until then."""

    __tablename__ = "remote_deletions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    remote_name: Mapped[str] = mapped_column(String(64), unique=True)
    remote_bytes: Mapped[int] = mapped_column(Int64, default=0)
    recording_id: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PeriodicJob(Claimed, Base):
    """A periodic job (reconcile, the catch-up scan, ...) claimed under a lease like any other work, so that of
    several daemons sharing one database only one runs it at a time."""

    __tablename__ = "periodic_jobs"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class DaemonState(Base):
    """A single row the daemon keeps fresh, so the CLI can tell whether it runs and what it waits for."""

    __tablename__ = "daemon_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pid: Mapped[int | None]
    hostname: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    waiting_for: Mapped[str | None] = mapped_column(Text)
    offline_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    remote_used_bytes: Mapped[int | None] = mapped_column(Int64)
    # Identifies this installation in remote display names, so files of another audiodrop sharing the
    # project are never adopted or deleted.
    instance_id: Mapped[str | None] = mapped_column(String(16))
    # Bytes of files in the project that are not ours (other tools), from the last reconciliation.
    foreign_bytes: Mapped[int | None] = mapped_column(Int64)
    reconciled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Drop folders that are missing or unmounted right now, one "path: reason" per line.
    unavailable_folders: Mapped[str | None] = mapped_column(Text)


class Node(Base):
    """One daemon of the fleet (one row when there is only one): it heartbeats here, so `status` shows every node
    and what each waits for, and a node silent too long has its work taken over."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str | None] = mapped_column(String(32))
    pid: Mapped[int | None]
    hostname: Mapped[str | None] = mapped_column(String(255))
    version: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    waiting_for: Mapped[str | None] = mapped_column(Text)
    offline_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The node's drop folders, one per line, and those missing or unmounted right now ("path: reason").
    folders: Mapped[str | None] = mapped_column(Text)
    unavailable_folders: Mapped[str | None] = mapped_column(Text)


class AudioCopy(Base):
    """A compact copy kept in the database, in 1 MiB pieces, so any node of a fleet can upload it again or cut
    pieces of it for a prompt, even while the node that converted it is asleep."""

    __tablename__ = "audio_copies"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    piece: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class RateSlot(Base):
    """One request sent to a model, so a fleet keeps `requests_per_minute` together: a slot is taken under a
    lock, counted over the last minute, and forgotten after it."""

    __tablename__ = "rate_slots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_rate_slots_model_at", "model", "at"),)


class OutboxMessage(Claimed, Base):
    """One notification waiting to be delivered to one target (a webhook by name, "command" or "desktop"). Written
    in the transaction of the event it announces, delivered afterwards by daemon.notify's engine work: at least
    once, with `key` as the idempotency key the receiver can drop a repeat by."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event: Mapped[str] = mapped_column(String(32))
    # The same for every target and every attempt ("prompt-42-done"); unique per target.
    key: Mapped[str] = mapped_column(String(128))
    target: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)  # JSON: the event's data
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(default=0)
    # Due at this time while neither delivered nor given up.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    gave_up_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("key", "target", name="uq_outbox_key_target"),)
