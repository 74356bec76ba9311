"""The JSON views of recordings and prompts: one place for what `files`, `show`, `prompts` and `process` print
(their fields are the public contract PRODUCT.md fixes)."""

from __future__ import annotations

from typing import Any

from daemon.clock import iso as iso  # re-exported: the CLI modules take it from here
from db.models import Prompt, Recording
from db.states import PromptState, RecordingState

STATES = [state.value for state in RecordingState]
PROMPT_STATES = [state.value for state in PromptState]


def recording_json(recording: Recording) -> dict[str, Any]:
    has_remote = recording.remote_name and recording.state in ("processing", "active")
    return {
        "id": recording.id,
        "source_path": recording.source_path,
        "state": recording.state,
        "node": recording.node,
        "error": recording.error,
        "warning": recording.warning,
        "duration_seconds": recording.duration_seconds,
        "sha256": recording.sha256,
        "converted": {"path": recording.converted_path, "bytes": recording.converted_bytes,
                      "mime_type": recording.converted_mime, "format": recording.converted_format}
        if recording.converted_path and recording.state not in ("discovered", "converting") else None,
        "remote": {"name": recording.remote_name, "uri": recording.remote_uri,
                   "expires_at": iso(recording.remote_expires_at), "bytes": recording.remote_bytes}
        if has_remote else None,
        "attempts": recording.attempts,
        "next_attempt_at": iso(recording.next_attempt_at),
        "created_at": iso(recording.created_at),
        "state_changed_at": iso(recording.state_changed_at),
    }


def prompt_json(prompt: Prompt) -> dict[str, Any]:
    return {
        "id": prompt.id,
        "recording_ids": [link.recording_id for link in prompt.recordings],
        "state": prompt.state,
        "template": prompt.template,
        "prompt": prompt.prompt_text,
        "model": prompt.model,
        "requested_model": prompt.requested_model,  # set when `model` is the fallback after 500s
        "span": {"from_seconds": prompt.span_start_seconds, "to_seconds": prompt.span_end_seconds}
        if prompt.span_start_seconds is not None else None,
        "result_path": prompt.result_path,
        "error": prompt.error,
        "waiting_for": prompt.waiting_for if prompt.state == "queued" else None,
        "delivery": prompt.delivery,
        "finish_reason": prompt.finish_reason,
        "chunks": prompt.chunks,
        "tokens": {"estimated_audio": prompt.estimated_audio_tokens, "prompt": prompt.prompt_tokens,
                   "audio": prompt.audio_tokens, "output": prompt.output_tokens, "thinking": prompt.thinking_tokens},
        "file_error": prompt.file_error,
        "created_at": iso(prompt.created_at),
        "finished_at": iso(prompt.finished_at),
        "history": [{"at": iso(e.at), "from": e.from_state, "to": e.to_state, "reason": e.reason}
                    for e in prompt.events],
    }
