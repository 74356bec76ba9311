"""Settings: frozen dataclasses read from TOML, with the lookup order of PRODUCT.md.

Every problem in a file is collected and reported at once, naming the file and the key; unknown keys are
errors. The API key is never read from the TOML itself, only from the environment, a key file or a systemd
credential, and it is never printed.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError

BUILTIN_TEMPLATES = {
    "transcribe": (
        "Transcribe this recording verbatim. Start each line with a [HH:MM:SS] timestamp of when it is "
        "spoken and a speaker label (Speaker 1, Speaker 2, ...). If nothing is said, answer [no speech]."
    ),
    "summarize": "Summarize this recording in five bullet points.",
}

FORMATS = ("opus", "vorbis", "mp3")


@dataclass(frozen=True)
class Watch:
    path: Path
    recursive: bool = True
    prompts: tuple[str, ...] = ()
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    # None: decide at start from the filesystem type (network and FUSE mounts are polled).
    poll: bool | None = None


@dataclass(frozen=True)
class GeminiSettings:
    model: str = "gemini-2.5-flash"
    storage_limit_bytes: int = 21_474_836_480
    storage_headroom_bytes: int = 0
    expiry_margin_seconds: int = 3600
    api_key_file: Path | None = None
    base_url: str | None = None
    api_version: str | None = None
    request_timeout_seconds: float = 60.0
    upload_timeout_seconds: float = 300.0
    processing_poll_seconds: float = 2.0
    processing_timeout_seconds: float = 600.0
    upload_workers: int = 2
    # Re-upload every expired recording at once (when it fits without evicting), not only when a prompt needs it.
    keep_resident: bool = False
    reconcile_interval_seconds: float = 600.0


@dataclass(frozen=True)
class ConversionSettings:
    format: str = "opus"
    fallback_format: str = "vorbis"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    ffmpeg: str = "ffmpeg"
    ffprobe: str = "ffprobe"


@dataclass(frozen=True)
class IntakeSettings:
    # A file that got a close-after-write event is taken after this much quiet (writers that append in pieces).
    close_quiet_seconds: float = 1.0
    # Without a close event (renamed or moved in, network mounts) the size and mtime must hold this long.
    settle_seconds: float = 5.0
    scan_interval_seconds: float = 60.0
    poll_interval_seconds: float = 2.0


@dataclass(frozen=True)
class PromptSettings:
    # "auto": a small recording whose remote copy is not live goes inline instead of being re-uploaded.
    inline: str = "auto"
    # Total request size cap for inline data, counted after base64 (the API's limit; newer docs say 100 MB).
    inline_limit_bytes: int = 20 * 1024 * 1024
    max_output_tokens: int = 8192
    max_output_tokens_limit: int = 65536
    # Long transcripts are split into chunks sized by the output budget (15-30 min), overlapping slightly.
    chunk_seconds: float = 1200.0
    chunk_overlap_seconds: float = 10.0
    requests_per_minute: int = 10
    workers: int = 2
    # Thinking models spend part of max_output_tokens thinking before they answer, which can cut a transcript
    # short; this caps it. -1 leaves it to the model (for models that do not think, or to let it think freely).
    thinking_budget: int = 1024
    # Some models fail on audio with 500 INTERNAL for good (field notes: gemini-3.1-flash-lite): after
    # fallback_after such answers in a row a prompt is sent to this model instead ("" never switches).
    fallback_model: str = "gemini-2.5-flash"
    fallback_after: int = 3


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str
    model: str | None = None
    system_instruction: str | None = None
    output_format: str = "markdown"


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    results_dir: Path
    watches: tuple[Watch, ...]
    gemini: GeminiSettings = GeminiSettings()
    conversion: ConversionSettings = ConversionSettings()
    intake: IntakeSettings = IntakeSettings()
    prompts: PromptSettings = PromptSettings()
    templates: dict[str, Template] = field(default_factory=dict)
    log_level: str = "INFO"
    source: Path | None = None

    @property
    def database_path(self) -> Path:
        return self.state_dir / "audiodrop.db"

    @property
    def converted_dir(self) -> Path:
        return self.state_dir / "converted"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "daemon.lock"

    def excluded_dirs(self) -> tuple[Path, ...]:
        """Folders the watcher must never take files from: the daemon's own output."""
        return (self.state_dir.resolve(), self.results_dir.resolve())


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.home() / fallback


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """--config, else $AUDIODROP_CONFIG, else $XDG_CONFIG_HOME/audiodrop/config.toml if it exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get("AUDIODROP_CONFIG"):
        return Path(os.environ["AUDIODROP_CONFIG"])
    candidate = _xdg("XDG_CONFIG_HOME", ".config") / "audiodrop" / "config.toml"
    return candidate if candidate.exists() else None


def load_settings(explicit: str | os.PathLike[str] | None = None) -> Settings:
    path = find_config_path(explicit)
    if path is None:
        return _build({}, source=None)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), ["the file does not exist"]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), [f"cannot be read: {err}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), [f"is not valid TOML: {err}"]) from None
    return _build(data, source=path)


class _Reader:
    """Reads typed values out of TOML tables, collecting every problem instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def table(self, data: dict[str, Any], prefix: str, allowed: set[str]) -> dict[str, Any]:
        for key in data:
            if key not in allowed:
                self.problems.append(f"{prefix}{key}: unknown key (allowed: {', '.join(sorted(allowed))})")
        return data

    def get(self, data: dict[str, Any], key: str, prefix: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if key not in data:
            return default
        value = data[key]
        # TOML integers are acceptable where a float is expected; booleans are not numbers here.
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind in (int, float):
            self.problems.append(f"{prefix}{key}: expected a number, got {value!r}")
            return default
        if not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.problems.append(f"{prefix}{key}: expected {expected}, got {type(value).__name__} {value!r}")
            return default
        return value

    def positive(self, data: dict[str, Any], key: str, prefix: str, kind: type, default: Any) -> Any:
        value = self.get(data, key, prefix, kind, default)
        if value is not None and value <= 0:
            self.problems.append(f"{prefix}{key}: must be greater than 0, got {value}")
            return default
        return value

    def strings(self, data: dict[str, Any], key: str, prefix: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(data, key, prefix, list, None)
        if value is None:
            return default
        if not all(isinstance(item, str) for item in value):
            self.problems.append(f"{prefix}{key}: expected a list of strings, got {value!r}")
            return default
        return tuple(value)


def _path(value: str) -> Path:
    return Path(os.path.expandvars(value)).expanduser()


def _build(data: dict[str, Any], source: Path | None) -> Settings:
    read = _Reader()
    top_keys = {"state_dir", "results_dir", "watch", "gemini", "conversion", "intake", "prompts", "templates",
                "log_level"}
    read.table(data, "", top_keys)

    default_state = _xdg("XDG_STATE_HOME", ".local/state") / "audiodrop"
    state_dir = _path(read.get(data, "state_dir", "", str, str(default_state)))
    results_dir = _path(read.get(data, "results_dir", "", str, str(state_dir / "results")))

    watches = _read_watches(read, data)
    gemini = _read_gemini(read, read.get(data, "gemini", "", dict, {}))
    conversion = _read_conversion(read, read.get(data, "conversion", "", dict, {}))
    intake = _read_intake(read, read.get(data, "intake", "", dict, {}))
    templates = _read_templates(read, read.get(data, "templates", "", dict, {}))
    prompts = _read_prompts(read, read.get(data, "prompts", "", dict, {}))

    for watch in watches:
        for name in watch.prompts:
            if name not in templates:
                read.problems.append(f"watch {watch.path}: prompts names unknown template {name!r}")

    log_level = read.get(data, "log_level", "", str, "INFO").upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        read.problems.append(f"log_level: expected DEBUG, INFO, WARNING or ERROR, got {log_level!r}")

    if read.problems:
        raise ConfigError(str(source) if source else "default configuration", read.problems)
    return Settings(
        state_dir=state_dir,
        results_dir=results_dir,
        watches=watches,
        gemini=gemini,
        conversion=conversion,
        intake=intake,
        prompts=prompts,
        templates=templates,
        log_level=log_level,
        source=source,
    )


def _read_watches(read: _Reader, data: dict[str, Any]) -> tuple[Watch, ...]:
    if "watch" not in data:
        return (Watch(path=Path.home() / "AudioDrop" / "inbox"),)
    tables = data["watch"]
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        read.problems.append("watch: expected [[watch]] tables")
        return ()
    watches = []
    for index, table in enumerate(tables):
        prefix = f"watch[{index}]."
        read.table(table, prefix, {"path", "recursive", "prompts", "include", "exclude", "poll"})
        if "path" not in table:
            read.problems.append(f"{prefix}path: missing (the folder to watch)")
            continue
        raw_path = read.get(table, "path", prefix, str, "")
        poll = read.get(table, "poll", prefix, bool, None)
        watches.append(
            Watch(
                path=_path(raw_path).absolute(),
                recursive=read.get(table, "recursive", prefix, bool, True),
                prompts=read.strings(table, "prompts", prefix, ()),
                include=read.strings(table, "include", prefix, ("*",)),
                exclude=read.strings(table, "exclude", prefix, ()),
                poll=poll,
            )
        )
    return tuple(watches)


def _read_gemini(read: _Reader, table: dict[str, Any]) -> GeminiSettings:
    p = "gemini."
    defaults = GeminiSettings()
    read.table(table, p, set(GeminiSettings.__dataclass_fields__))
    key_file = read.get(table, "api_key_file", p, str, None)
    return GeminiSettings(
        model=read.get(table, "model", p, str, defaults.model),
        storage_limit_bytes=read.positive(table, "storage_limit_bytes", p, int, defaults.storage_limit_bytes),
        storage_headroom_bytes=read.get(table, "storage_headroom_bytes", p, int, defaults.storage_headroom_bytes),
        expiry_margin_seconds=read.get(table, "expiry_margin_seconds", p, int, defaults.expiry_margin_seconds),
        api_key_file=_path(key_file) if key_file else None,
        base_url=read.get(table, "base_url", p, str, None),
        api_version=read.get(table, "api_version", p, str, None),
        request_timeout_seconds=read.positive(table, "request_timeout_seconds", p, float, 60.0),
        upload_timeout_seconds=read.positive(table, "upload_timeout_seconds", p, float, 300.0),
        processing_poll_seconds=read.positive(table, "processing_poll_seconds", p, float, 2.0),
        processing_timeout_seconds=read.positive(table, "processing_timeout_seconds", p, float, 600.0),
        upload_workers=read.positive(table, "upload_workers", p, int, 2),
        keep_resident=read.get(table, "keep_resident", p, bool, False),
        reconcile_interval_seconds=read.positive(table, "reconcile_interval_seconds", p, float, 600.0),
    )


def _read_conversion(read: _Reader, table: dict[str, Any]) -> ConversionSettings:
    p = "conversion."
    read.table(table, p, set(ConversionSettings.__dataclass_fields__))
    defaults = ConversionSettings()
    settings = ConversionSettings(
        format=read.get(table, "format", p, str, defaults.format),
        fallback_format=read.get(table, "fallback_format", p, str, defaults.fallback_format),
        workers=read.positive(table, "workers", p, int, defaults.workers),
        ffmpeg=read.get(table, "ffmpeg", p, str, defaults.ffmpeg),
        ffprobe=read.get(table, "ffprobe", p, str, defaults.ffprobe),
    )
    for key in ("format", "fallback_format"):
        if getattr(settings, key) not in FORMATS:
            read.problems.append(f"{p}{key}: expected one of {', '.join(FORMATS)}, got {getattr(settings, key)!r}")
    return settings


def _read_intake(read: _Reader, table: dict[str, Any]) -> IntakeSettings:
    p = "intake."
    read.table(table, p, set(IntakeSettings.__dataclass_fields__))
    defaults = IntakeSettings()
    return IntakeSettings(
        close_quiet_seconds=read.get(table, "close_quiet_seconds", p, float, defaults.close_quiet_seconds),
        settle_seconds=read.positive(table, "settle_seconds", p, float, defaults.settle_seconds),
        scan_interval_seconds=read.positive(table, "scan_interval_seconds", p, float, defaults.scan_interval_seconds),
        poll_interval_seconds=read.positive(table, "poll_interval_seconds", p, float, defaults.poll_interval_seconds),
    )


def _read_prompts(read: _Reader, table: dict[str, Any]) -> PromptSettings:
    p = "prompts."
    read.table(table, p, set(PromptSettings.__dataclass_fields__))
    d = PromptSettings()
    settings = PromptSettings(
        inline=read.get(table, "inline", p, str, d.inline),
        inline_limit_bytes=read.positive(table, "inline_limit_bytes", p, int, d.inline_limit_bytes),
        max_output_tokens=read.positive(table, "max_output_tokens", p, int, d.max_output_tokens),
        max_output_tokens_limit=read.positive(table, "max_output_tokens_limit", p, int, d.max_output_tokens_limit),
        chunk_seconds=read.positive(table, "chunk_seconds", p, float, d.chunk_seconds),
        chunk_overlap_seconds=read.get(table, "chunk_overlap_seconds", p, float, d.chunk_overlap_seconds),
        requests_per_minute=read.positive(table, "requests_per_minute", p, int, d.requests_per_minute),
        workers=read.positive(table, "workers", p, int, d.workers),
        thinking_budget=read.get(table, "thinking_budget", p, int, d.thinking_budget),
        fallback_model=read.get(table, "fallback_model", p, str, d.fallback_model),
        fallback_after=read.positive(table, "fallback_after", p, int, d.fallback_after),
    )
    if settings.thinking_budget < -1:
        read.problems.append(f"{p}thinking_budget: expected -1 (the model decides), 0 (no thinking) or more, "
                             f"got {settings.thinking_budget}")
    if settings.inline not in ("auto", "never"):
        read.problems.append(f"{p}inline: expected auto or never, got {settings.inline!r}")
    return settings


def _read_templates(read: _Reader, table: dict[str, Any]) -> dict[str, Template]:
    templates = {name: Template(name=name, prompt=text) for name, text in BUILTIN_TEMPLATES.items()}
    for name, body in table.items():
        p = f"templates.{name}."
        if not isinstance(body, dict):
            read.problems.append(f"templates.{name}: expected a table with at least prompt = \"...\"")
            continue
        read.table(body, p, {"prompt", "model", "system_instruction", "output_format"})
        prompt = read.get(body, "prompt", p, str, templates.get(name, Template(name, "")).prompt)
        if not prompt:
            read.problems.append(f"{p}prompt: missing (the text sent with the audio)")
        output_format = read.get(body, "output_format", p, str, "markdown")
        if output_format not in ("markdown", "text", "json"):
            read.problems.append(f"{p}output_format: expected markdown, text or json, got {output_format!r}")
        templates[name] = Template(
            name=name,
            prompt=prompt,
            model=read.get(body, "model", p, str, None),
            system_instruction=read.get(body, "system_instruction", p, str, None),
            output_format=output_format,
        )
    return templates


API_KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def find_api_key(settings: Settings) -> tuple[str | None, str]:
    """The API key and where it came from (the source is safe to show; the key never is)."""
    for variable in API_KEY_VARIABLES:
        if os.environ.get(variable, "").strip():
            return os.environ[variable].strip(), f"${variable}"
    if settings.gemini.api_key_file:
        try:
            key = settings.gemini.api_key_file.read_text(encoding="utf-8").strip()
        except OSError:
            key = ""
        if key:
            return key, f"gemini.api_key_file ({settings.gemini.api_key_file})"
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        credential = Path(credentials) / "gemini-api-key"
        try:
            key = credential.read_text(encoding="utf-8").strip()
        except OSError:
            key = ""
        if key:
            return key, "systemd credential gemini-api-key"
    return None, "none found"
