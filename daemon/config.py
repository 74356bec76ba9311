"""Settings: one pydantic schema for the TOML file, with the lookup order of PRODUCT.md.

The schema below holds every key's type, default, bounds, allowed values and one-line description; the README's
configuration reference is rendered from it (`reference_markdown`). Every problem in a file is reported at once,
naming the file and the key; unknown keys are errors. The API key is never read from the TOML itself, only from
the environment, a key file or a systemd credential, and it is never printed.

The settings classes are frozen pydantic dataclasses: `dataclasses.replace` works on them (and validates).
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from daemon.errors import ConfigError
from daemon.pipeline.transcode import FORMATS

if TYPE_CHECKING:
    from daemon.prompts import pricing

BUILTIN_TEMPLATES = {
    "transcribe": (
        "Transcribe this recording verbatim. Start each line with a [HH:MM:SS] timestamp of when it is "
        "spoken and a speaker label (Speaker 1, Speaker 2, ...). If nothing is said, answer [no speech]."
    ),
    "summarize": "Summarize this recording in five bullet points.",
}

API_KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
DATABASE_URL_VARIABLE = "AUDIODROP_DATABASE_URL"
POSTGRES_FORM = "postgresql+psycopg://USER@HOST:PORT/DB"

# Validated by the name the file uses (alias); `validate_by_name` only serves code that builds settings itself.
_TABLE = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)


def _expand(value: object) -> object:
    return Path(os.path.expandvars(value)).expanduser() if isinstance(value, str) else value


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _format_name(value: str) -> str:
    if value not in FORMATS:
        raise PydanticCustomError("one_of", f"expected one of {', '.join(FORMATS)}, got {value!r}")
    return value


def _known_template(name: str, info: ValidationInfo) -> str:
    known = (info.context or {}).get("templates")
    if known is not None and name not in known:
        raise PydanticCustomError("unknown_template",
                                  f"unknown template {name!r} (known: {', '.join(sorted(known))})")
    return name


def _node_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise PydanticCustomError("node_name", "use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                                               f"or digit; got {value!r}")
    return value


def _database_url(value: str) -> str:
    """SQLite or PostgreSQL through psycopg. The value is never echoed: it may hold a password."""
    scheme, found, _ = value.partition("://")
    if scheme == "sqlite" and value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    if scheme == "postgresql+psycopg" and urlsplit(value).hostname and urlsplit(value).path.strip("/"):
        return value
    what = f"the scheme {scheme!r} is not supported" if found and scheme not in ("sqlite", "postgresql+psycopg") \
        else "not a usable database URL"
    raise PydanticCustomError("database_url", f"{what}; use {POSTGRES_FORM} (fleet mode), sqlite:///PATH, "
                                              "or leave it out for the SQLite file in state_dir")


# What becomes of a source file once its recording is done (daemon.pipeline.sources), and when it is done.
SourceAction = Literal["keep", "move", "delete"]
SourceWhen = Literal["converted", "prompts_done"]


def inside_folder(path: Path, folders: list[Path]) -> Path | None:
    """The first of `folders` that holds `path` or is it, symlinks resolved; None when none does."""
    real = Path(os.path.realpath(path))
    for folder in folders:
        root = Path(os.path.realpath(folder))
        if real == root or root in real.parents:
            return folder
    return None


def _move_to(value: Path | None, info: ValidationInfo) -> Path | None:
    """A source moved into a drop folder would be taken again: refused, as is "move" with nowhere to go."""
    if value is None:
        if info.data.get("source_action") == "move":
            raise PydanticCustomError("move_to", 'required with source_action = "move" (the folder sources go to)')
        return None
    folders = [*(info.context or {}).get("folders", ()), *([info.data["path"]] if "path" in info.data else [])]
    clash = inside_folder(value, folders)
    if clash is not None:
        raise PydanticCustomError("move_to", f"{value} is inside the drop folder {clash}, where moved sources would "
                                             "be taken again; name a folder outside every drop folder")
    return value


# TOML integers are fine where a float is expected; booleans are never numbers, strings never booleans.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
UserPath = Annotated[Path, BeforeValidator(_expand)]  # "~" and $VARS expanded
FormatName = Annotated[str, AfterValidator(_format_name)]
TemplateName = Annotated[str, AfterValidator(_known_template)]
_FORMAT_CHOICES = ", ".join(f"{name} ({fmt.mime_type})" for name, fmt in FORMATS.items())


@dataclass(frozen=True, config=_TABLE)
class Watch:
    path: Annotated[UserPath, AfterValidator(Path.absolute)] = Field(
        description="the folder to watch", examples=["/srv/recordings/inbox"])
    recursive: Bool = Field(default=True, description="watch its subfolders too")
    prompts: tuple[TemplateName, ...] = Field(
        default=(), description="templates run on every new recording here", examples=[["transcribe"]])
    include: tuple[str, ...] = Field(default=("*",), description="glob patterns on the name or the relative path")
    exclude: tuple[str, ...] = Field(default=(), description="glob patterns never taken",
                                     examples=[["*.txt", "drafts/*"]])
    # None: decided at start from the filesystem type (inotify never fires on network and FUSE mounts).
    poll: Bool | None = Field(
        default=None, description="default: automatic (polling on NFS, SMB and FUSE mounts)", examples=[True])
    # The folder's profile (.audiodrop.toml, daemon.profiles) may set these three too, and wins.
    source_action: SourceAction = Field(
        default="keep", description="what becomes of a source file once done: keep, move (to move_to) or delete")
    source_when: SourceWhen = Field(
        default="converted", description="done means: converted (its compact copy is made) or prompts_done "
                                         "(every prompt over it has an answer; a failed one keeps the source)")
    move_to: Annotated[UserPath, AfterValidator(Path.absolute)] | None = Field(
        default=None, validate_default=True, examples=["/srv/recordings/done"],
        description='where source_action = "move" puts sources (made if missing; never inside a drop folder)')

    @field_validator("move_to")
    @classmethod
    def _move_to_outside(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _move_to(value, info)


@dataclass(frozen=True, config=_TABLE)
class GeminiSettings:
    model: str = Field(default="gemini-2.5-flash", description="the model prompts use unless their template names one")
    storage_limit_bytes: Int = Field(default=21_474_836_480, gt=0, description="the project's Files API quota")
    storage_headroom_bytes: Int = Field(default=0, ge=0, description="room left for other tools in the same project")
    expiry_margin_seconds: Int = Field(
        default=3600, ge=0, description="never prompt with a file that expires sooner than this")
    api_key_file: UserPath | None = Field(
        default=None, description="else $GEMINI_API_KEY / $GOOGLE_API_KEY / systemd credential gemini-api-key",
        examples=["/etc/audiodrop/key"])
    base_url: str | None = Field(
        default=None, description="a proxy or the local emulator (also $GOOGLE_GEMINI_BASE_URL)",
        examples=["http://127.0.0.1:8765"])
    api_version: str | None = Field(default=None, description="default: the SDK's", examples=["v1beta"])
    request_timeout_seconds: Float = Field(default=60.0, gt=0, description="time limit of one API request")
    upload_timeout_seconds: Float = Field(default=300.0, gt=0, description="time limit of one upload")
    processing_poll_seconds: Float = Field(default=2.0, gt=0, description="files.get while a file is PROCESSING...")
    processing_timeout_seconds: Float = Field(default=600.0, gt=0, description="...for at most this long, then a retry")
    upload_workers: Int = Field(default=2, gt=0, description="uploads running at once")
    keep_resident: Bool = Field(
        default=False,
        description="re-upload expired recordings at once (when they fit), not only when a prompt needs them")
    reconcile_interval_seconds: Float = Field(
        default=600.0, gt=0, description="how often files.list is compared with the database")
    # A storage refusal that files.list cannot explain (the server's count lags, or holds files nobody can list)
    # is not retried in a loop: the pause doubles each time it repeats, up to 30 minutes.
    storage_retry_seconds: Float = Field(
        default=30.0, gt=0, description="first pause after the server refuses an upload as over quota unexplained")


@dataclass(frozen=True, config=_TABLE)
class ConversionSettings:
    format: FormatName = Field(default="opus", description=f"the upload encoding: {_FORMAT_CHOICES}")
    fallback_format: FormatName = Field(default="vorbis",
                                        description="used for a recording if the API refuses the first")
    workers: Int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0, examples=[2],
                         description="parallel ffmpeg processes (default: the number of cores)")
    ffmpeg: str = Field(default="ffmpeg", description="the ffmpeg program (a bare name is looked up on PATH)")
    ffprobe: str = Field(default="ffprobe", description="the ffprobe program (a bare name is looked up on PATH)")


@dataclass(frozen=True, config=_TABLE)
class IntakeSettings:
    # Writers that append in pieces close the file in between: a close event alone does not mean complete.
    close_quiet_seconds: Float = Field(
        default=0.2, ge=0, description="after a writer closes a file, it must stay unchanged this long")
    settle_seconds: Float = Field(
        default=5.0, gt=0,
        description="without a close event (moved in, renamed, polled), size and mtime must hold this long")
    scan_interval_seconds: Float = Field(
        default=300.0, gt=0, description="the catch-up scan that finds whatever the events missed")
    poll_interval_seconds: Float = Field(
        default=2.0, gt=0, description="how often polled folders (network drives) are looked at")


@dataclass(frozen=True, config=_TABLE)
class PromptSettings:
    inline: Literal["auto", "never"] = Field(
        default="auto", description="auto: a small recording whose remote copy is not live goes inline; never: upload")
    inline_limit_bytes: Int = Field(
        default=20 * 1024 * 1024, gt=0, description="whole inline request, after base64 (newer API docs allow 100 MB)")
    max_output_tokens: Int = Field(
        default=8192, gt=0, description="doubled on a cut-off answer, up to max_output_tokens_limit, then split")
    max_output_tokens_limit: Int = Field(
        default=65536, gt=0, description="the largest budget a cut-off answer is retried with")
    # Transcripts are split into chunks sized by the output budget (15-30 min), overlapping slightly.
    chunk_seconds: Float = Field(default=1200.0, gt=0, description="long transcripts go in pieces this long...")
    chunk_overlap_seconds: Float = Field(
        default=10.0, ge=0, description="...overlapping this much, stitched on the recording's own timeline")
    requests_per_minute: Int = Field(
        default=10, gt=0, description="per model: a burst of recordings never becomes a storm of 429s")
    workers: Int = Field(default=2, gt=0, description="prompts running at once")
    generate_timeout_seconds: Float = Field(
        default=600.0, gt=0, description="time limit of one generation call (long answers take minutes)")
    # Thinking models spend part of max_output_tokens thinking before they answer, which can cut a transcript short.
    thinking_budget: Int = Field(
        default=1024, ge=-1, description="caps a thinking model's tokens, which count against max_output_tokens "
                                 "(-1: the model decides, 0: none)")
    # Some models fail on audio with 500 INTERNAL for good (field notes: gemini-3.1-flash-lite).
    fallback_model: str = Field(
        default="gemini-2.5-flash",
        description='used after fallback_after 500 INTERNAL answers in a row ("": never switch)')
    fallback_after: Int = Field(default=3, gt=0, description="how many such answers in a row switch the model")


@dataclass(frozen=True, config=_TABLE)
class TrimmingSettings:
    # Audio is billed at 32 tokens a second, speech or not. Defaults measured by bench/trimming.py.
    enabled: Bool = Field(default=True, description="cut long silences out of transcripts' and summaries' audio")
    min_silence_seconds: Float = Field(default=2.0, gt=0, description="a pause this long or shorter is kept whole")
    keep_pause_seconds: Float = Field(default=1.0, ge=0, description="what is left of a longer silence")
    pad_seconds: Float = Field(default=0.3, ge=0, description="kept on each side of speech, so no word is cut")
    min_saving_seconds: Float = Field(
        default=10.0, ge=0, description="below this saving the whole recording is sent as it is")


@dataclass(frozen=True, config=_TABLE)
class BatchSettings:
    max_prompts: Int = Field(default=100, gt=0, description="prompts sent in one Batch API job")
    gather_seconds: Float = Field(
        default=60.0, ge=0, description="a batch prompt waits this long for others to share its job")
    poll_seconds: Float = Field(default=60.0, gt=0, description="how often a running job is looked at")
    min_file_hours: Float = Field(
        default=30.0, gt=0, le=47, description="files that expire sooner are uploaded again before a job starts "
                                             "(a job may take 24 h)")


@dataclass(frozen=True, config=_TABLE)
class ModelPrices:
    # USD per million tokens. A key left out keeps the published price (daemon.prompts.pricing); a model without
    # one needs input_per_million and output_per_million.
    input_per_million: Float | None = Field(default=None, ge=0, examples=[0.30],
                                            description="text, image and video input")
    audio_input_per_million: Float | None = Field(default=None, ge=0, examples=[1.00],
                                                  description="audio input (a new model: the text price)")
    output_per_million: Float | None = Field(default=None, ge=0, examples=[2.50],
                                             description="output, thinking tokens included")
    cached_input_per_million: Float | None = Field(default=None, ge=0, examples=[0.03],
                                                   description="text read from a context cache (a new model: no "
                                                               "discount)")
    cached_audio_per_million: Float | None = Field(default=None, ge=0, examples=[0.10],
                                                   description="audio read from a context cache")
    long_context_above_tokens: Int | None = Field(default=None, gt=0, examples=[200_000],
                                                  description="prompts larger than this pay the long_* prices")
    long_input_per_million: Float | None = Field(default=None, ge=0, examples=[2.50],
                                                 description="text input above the long-context size")
    long_audio_input_per_million: Float | None = Field(default=None, ge=0, examples=[2.50],
                                                       description="audio input above it")
    long_output_per_million: Float | None = Field(default=None, ge=0, examples=[15.00], description="output above it")
    long_cached_input_per_million: Float | None = Field(default=None, ge=0, examples=[0.25],
                                                        description="cached text above it")
    long_cached_audio_per_million: Float | None = Field(default=None, ge=0, examples=[0.25],
                                                        description="cached audio above it")
    batch_discount: Float | None = Field(default=None, ge=0, le=1, examples=[0.5],
                                         description="off input and output in the Batch API (0.5: half)")


EventName = Literal["result.done", "prompt.failed", "recording.rejected", "recording.failed", "quota.full",
                    "budget.reached", "daemon.offline"]


def _webhook_url(value: str) -> str:
    """http or https with a host. The value is never echoed: it may hold a token."""
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.hostname:
        return value
    raise PydanticCustomError("webhook_url", "not a usable webhook URL; use https://HOST/PATH (or http://)")


@dataclass(frozen=True, config=_TABLE)
class Webhook:
    url: Annotated[str, AfterValidator(_webhook_url)] = Field(
        description="events are POSTed here as signed JSON", examples=["https://hooks.example.org/audiodrop"])
    name: str | None = Field(
        default=None, min_length=1, max_length=64, examples=["home"],
        description="its name in the outbox and the log (default: made from a hash of the url)")
    secret: str | None = Field(
        default=None, repr=False, examples=["a-long-random-string"],
        description="the HMAC-SHA256 key of X-Audiodrop-Signature (or secret_file; none: unsigned)")
    secret_file: UserPath | None = Field(
        default=None, examples=["$CREDENTIALS_DIRECTORY/webhook-secret"],
        description="a file holding the secret, read at each delivery")
    events: tuple[EventName, ...] = Field(
        default=(), examples=[["result.done", "prompt.failed"]], description="the events sent here (none: all)")
    timeout_seconds: Float = Field(default=10.0, gt=0, description="time limit of one delivery attempt")


@dataclass(frozen=True, config=_TABLE)
class NotifySettings:
    on_result: tuple[str, ...] = Field(
        default=(), examples=[["notify-send", "audiodrop", "{summary}"]],
        description='a command run for every result: argv, never a shell; "{summary}", "{result_path}", '
                    '"{prompt_id}" ... are filled in')
    command_timeout_seconds: Float = Field(
        default=30.0, gt=0, description="time limit of that command; then it is killed and tried again later")
    desktop: Bool = Field(
        default=False, description="desktop notifications with notify-send (the user service, with a session bus)")
    offline_after_seconds: Float = Field(
        default=3600.0, gt=0, description="daemon.offline is sent once the API has been unreachable this long "
                                          "(or the daemon was stopped this long)")


@dataclass(frozen=True, config=_TABLE)
class ServiceSettings:
    # Work is claimed under a lease that the daemon renews while it works; a daemon that died or lost its
    # database keeps no work longer than this.
    lease_seconds: Float = Field(
        default=60.0, ge=1, description="how long a claim on a piece of work holds without renewal")
    node_name: Annotated[str, AfterValidator(_node_name)] = Field(
        default_factory=socket.gethostname, examples=["room-a"],
        description="this daemon's name in a fleet (default: the host name); each node needs its own")


@dataclass(frozen=True, config=_TABLE)
class Template:
    prompt: str = Field(min_length=1, description="the text sent with the audio",
                        examples=["Write the minutes of this meeting: decisions, action items with owners."])
    model: str | None = Field(default=None, description="default: gemini.model", examples=["gemini-2.5-pro"])
    system_instruction: str | None = Field(default=None, description="optional", examples=["Be concise."])
    output_format: Literal["markdown", "text", "json", "srt", "vtt"] = Field(
        default="markdown",
        description="markdown, text, json, or subtitles: srt or vtt (from a timestamped transcript)")
    formats: tuple[Literal["srt", "vtt"], ...] = Field(
        default=(), examples=[["srt", "vtt"]], description="subtitle files written beside the main result")
    trim: Bool | None = Field(
        default=None, examples=[False],
        description="cut long silences from the audio sent (default: trimming.enabled for transcribe and summarize, "
                    "off for the others)")
    batch: Bool = Field(default=False, description="send through the Batch API at half price (results within hours)")
    # The table's own name ([templates.NAME]), filled in by Settings; not a key.
    name: str = Field(default="", init=False, exclude=True)


@dataclass(frozen=True, config=_TABLE)
class Settings:
    state_dir: UserPath = Field(
        default_factory=lambda: _xdg("XDG_STATE_HOME", ".local/state") / "audiodrop", examples=["/var/lib/audiodrop"],
        description="database and converted audio (default $XDG_STATE_HOME/audiodrop)")
    results_dir: UserPath = Field(
        default_factory=lambda data: data["state_dir"] / "results", examples=["/var/lib/audiodrop/results"],
        description="prompt results as files (default state_dir/results)")
    database_url: Annotated[str, AfterValidator(_database_url)] | None = Field(
        default=None, examples=["postgresql+psycopg://audiodrop@db:5432/audiodrop"],
        description=f"fleet mode (default: SQLite in state_dir; ${DATABASE_URL_VARIABLE} overrides it)")
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    watches: tuple[Watch, ...] = Field(
        default_factory=lambda: (Watch(path=Path.home() / "AudioDrop" / "inbox"),), alias="watch",
        description="one table per drop folder (none given: ~/AudioDrop/inbox)")
    gemini: GeminiSettings = Field(default_factory=lambda: GeminiSettings(), description="the Gemini API")
    conversion: ConversionSettings = Field(default_factory=lambda: ConversionSettings(),
                                           description="the compact mono copy ffmpeg makes")
    intake: IntakeSettings = Field(default_factory=lambda: IntakeSettings(),
                                   description="when a dropped file counts as completely written")
    prompts: PromptSettings = Field(default_factory=lambda: PromptSettings(), description="how prompts run")
    service: ServiceSettings = Field(default_factory=lambda: ServiceSettings(), description="the daemon's work engine")
    trimming: TrimmingSettings = Field(default_factory=lambda: TrimmingSettings(),
                                       description="long silences cut out before audio goes to a prompt")
    batch: BatchSettings = Field(default_factory=lambda: BatchSettings(),
                                 description="the Batch API lane (templates with batch = true, ask --batch)")
    daily_budget_usd: Float | None = Field(
        default=None, gt=0, examples=[5.0],
        description="prompts wait when the next would pass this day's spend (UTC); ask --force goes past it once")
    monthly_budget_usd: Float | None = Field(
        default=None, gt=0, examples=[50.0], description="the same for the calendar month (UTC)")
    prices: dict[str, ModelPrices] = Field(
        default_factory=dict, description="per model, USD per million tokens: changes or adds to the published prices")
    webhooks: tuple[Webhook, ...] = Field(
        default=(), description="one table per webhook: events POSTed as signed JSON")
    notify: NotifySettings = Field(default_factory=lambda: NotifySettings(),
                                   description="the command hook and desktop notifications")
    templates: dict[str, Template] = Field(
        default_factory=dict, validate_default=True,
        description="your own templates; transcribe and summarize are built in (and can be redefined)")
    source: Path | None = Field(default=None, exclude=True, validate_default=True)  # the file read; not a key

    @field_validator("templates", mode="before")
    @classmethod
    def _with_builtins(cls, value: object) -> object:
        """A [templates.NAME] table for a built-in template only changes the keys it names."""
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = {name: {"prompt": text} for name, text in BUILTIN_TEMPLATES.items()}
        for name, body in value.items():
            builtin = merged.get(name)
            merged[name] = {**builtin, **body} if isinstance(builtin, dict) and isinstance(body, dict) else body
        return merged

    @field_validator("templates")
    @classmethod
    def _named(cls, value: dict[str, Template]) -> dict[str, Template]:
        for name, template in value.items():
            object.__setattr__(template, "name", name)  # the frozen-dataclass idiom for a derived field
        return value

    @field_validator("prices")
    @classmethod
    def _priced(cls, value: dict[str, ModelPrices]) -> dict[str, ModelPrices]:
        from daemon.prompts import pricing

        try:
            pricing.DEFAULT_PRICES.with_overrides(value)
        except ValueError as err:
            raise PydanticCustomError("price", str(err)) from None
        return value

    @field_validator("webhooks")
    @classmethod
    def _distinct_names(cls, value: tuple[Webhook, ...]) -> tuple[Webhook, ...]:
        """Deliveries find their webhook by name: names are unique, and not those of the other targets."""
        from daemon.notify import COMMAND, DESKTOP, webhook_name

        names = [webhook_name(hook) for hook in value]
        clash = next((name for name in names if names.count(name) > 1 or name in (COMMAND, DESKTOP)), None)
        if clash is not None:
            raise PydanticCustomError("webhook_name", f"the webhook name {clash!r} is used twice or reserved")
        return value

    @field_validator("source", mode="before")
    @classmethod
    def _set_by_loader(cls, value: object, info: ValidationInfo) -> object:
        if info.context is None:  # built in code, e.g. dataclasses.replace()
            return value
        if value is not None:
            raise PydanticCustomError("unexpected_keyword_argument", "unknown key")
        return info.context["source"]

    @property
    def database_path(self) -> Path:
        return self.state_dir / "audiodrop.db"

    @property
    def converted_dir(self) -> Path:
        return self.state_dir / "converted"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "daemon.lock"

    @property
    def price_table(self) -> pricing.Prices:
        from daemon.prompts import pricing

        return pricing.DEFAULT_PRICES.with_overrides(self.prices)

    @property
    def budget(self) -> pricing.Budget:
        from daemon.prompts import pricing

        return pricing.Budget.of(self.daily_budget_usd, self.monthly_budget_usd)

    def excluded_dirs(self) -> tuple[Path, ...]:
        """Folders the watcher must never take files from: the daemon's own output."""
        return (self.state_dir.resolve(), self.results_dir.resolve())


_SETTINGS = TypeAdapter(Settings)


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
    """The settings from the file find_config_path names, or the defaults; ConfigError lists every problem."""
    path = find_config_path(explicit)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(str(path), ["the file does not exist"]) from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(str(path), [f"cannot be read: {err}"]) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(str(path), [f"is not valid TOML: {err}"]) from None
    from_env = bool(os.environ.get(DATABASE_URL_VARIABLE))
    if from_env:
        data = {**data, "database_url": os.environ[DATABASE_URL_VARIABLE]}
    templates = data.get("templates")
    known = set(BUILTIN_TEMPLATES) | (set(templates) if isinstance(templates, dict) else set())
    watches = data.get("watch")
    # Every drop folder, for the [[watch]] tables' move_to (a source moved into one would be taken again).
    folders = [Path(os.path.expandvars(w["path"])).expanduser().absolute() for w in watches
               if isinstance(w, dict) and isinstance(w.get("path"), str)] if isinstance(watches, list) else []
    try:
        return _SETTINGS.validate_python(data, by_alias=True, by_name=False,
                                         context={"source": path, "templates": known, "folders": folders})
    except ValidationError as err:
        problems = [_problem(error, from_env) for error in err.errors()
                    if error["type"] != "default_factory_not_called"]  # a consequence of another problem
        raise ConfigError(str(path) if path else "default configuration", problems) from None


# How pydantic's error types read to a person; "{got}" is the offending value, "{allowed}" the table's keys.
_MESSAGES = {
    "missing": "missing ({description})",
    "unexpected_keyword_argument": "unknown key (allowed: {allowed})",
    "greater_than": "must be greater than {gt:g}, got {got}",
    "greater_than_equal": "must be at least {ge:g}, got {got}",
    "int_type": "expected an integer, got {got}",
    "float_type": "expected a number, got {got}",
    "bool_type": "expected a boolean (true or false), got {got}",
    "string_type": "expected a string, got {got}",
    "path_type": "expected a string (a path), got {got}",
    "tuple_type": "expected an array, got {got}",
    "dict_type": "expected a table, got {got}",
    "dataclass_type": "expected a table, got {got}",
    "literal_error": "expected {expected}, got {got}",
    "string_too_short": "must not be empty",
    "less_than_equal": "must be at most {le:g}, got {got}",
}


def describe_problems(err: ValidationError, root: object) -> list[str]:
    """Each problem of a validation against the schema class `root` (a folder profile's, say) as
    "dotted.key: message", as the main configuration's are reported."""
    return [_problem(error, False, root) for error in err.errors() if error["type"] != "default_factory_not_called"]


def _problem(error: ErrorDetails, database_url_from_env: bool, root: object = None) -> str:
    """One pydantic error as "dotted.key: message", with watch[N] indexes."""
    loc = error["loc"]
    keys, field = _lookup(loc, root or Settings)
    if error["type"] not in _MESSAGES:
        message = error["msg"]  # ours (PydanticCustomError) already read well
    else:
        given = error["input"]
        got = "a table" if isinstance(given, dict) else (repr(given) if len(repr(given)) <= 60
                                                         else repr(given)[:57] + "...")
        message = _MESSAGES[error["type"]].format(
            **error.get("ctx", {}), got=got, allowed=", ".join(keys),
            description=field.description if field and field.description else "required")
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{_toml_key(part)}" for part in loc).lstrip(".")
    if database_url_from_env and loc == ("database_url",):
        key = f"${DATABASE_URL_VARIABLE}"
    return f"{key}: {message}" if key else message


def _keys(node: object) -> dict[str, FieldInfo]:
    """The keys a table of this settings class may hold, by the name the file uses."""
    fields: dict[str, FieldInfo] = getattr(node, "__pydantic_fields__", {})
    return {info.alias or name: info for name, info in fields.items() if not info.exclude}


def _lookup(loc: tuple[int | str, ...], root: object) -> tuple[dict[str, FieldInfo], FieldInfo | None]:
    """The keys allowed where loc's last part sits, and the field it names (None if it names none)."""
    node: object = root
    keys: dict[str, FieldInfo] = {}
    field: FieldInfo | None = None
    for part in loc:
        if hasattr(node, "__pydantic_fields__"):
            keys = _keys(node)
            field = keys.get(str(part))
            node = field.annotation if field else None
        else:  # an element of [[watch]] or [templates.NAME]
            field, args = None, get_args(node)
            node = args[-1] if get_origin(node) is dict else args[0] if args else None
    return keys, field


def _toml_key(part: str) -> str:
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)


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


# The name shown in the reference for each [table.NAME]: a template, a model.
_EXAMPLE_NAMES = {"templates": "minutes", "prices": "gemini-2.5-flash"}


def schema_keys() -> dict[str, tuple[str, ...]]:
    """Each table of the file and its keys: "" (the top level), "[[watch]]", "[gemini]", ... "[templates.minutes]"."""
    return {header: tuple(keys) for header, _, keys in _tables()}


def reference_markdown() -> str:
    """The README's configuration reference: a TOML file with every key, its default (or, where the default is
    computed or absent, an example) and its description. Keys that are absent by default are commented out."""
    lines = ["```toml"]
    for header, description, keys in _tables():
        lines += ["", *_aligned([(header, description)])] if header else []
        lines += _rows(keys)
    return "\n".join([*lines, "```", ""])


def _tables() -> list[tuple[str, str, dict[str, FieldInfo]]]:
    """(header, description, keys) of each table, the top level first with the header ""."""
    top = _keys(Settings)
    nested = {key: field for key, field in top.items() if _keys(_element(field.annotation))}
    tables = [("", "", {key: field for key, field in top.items() if key not in nested})]
    for key, field in nested.items():
        origin = get_origin(field.annotation)
        header = f"[[{key}]]" if origin is tuple else \
            f"[{key}.{_toml_key(_EXAMPLE_NAMES.get(key, 'name'))}]" if origin is dict else f"[{key}]"
        tables.append((header, field.description or "", _keys(_element(field.annotation))))
    return tables


def _element(annotation: object) -> object:
    """The settings class of a table, of each [[array]] item, or of each [table.NAME]."""
    args, origin = get_args(annotation), get_origin(annotation)
    return args[-1] if origin is dict else args[0] if origin is tuple else annotation


def _rows(keys: dict[str, FieldInfo]) -> list[str]:
    rows = []
    for key, field in keys.items():
        static = not field.is_required() and field.default_factory is None
        default = field.default if static else None
        value = field.examples[0] if field.examples else default
        note = field.description or ""
        if default is not None and value != default:
            note += f" (default {_toml(default)})"
        # A key that is absent by default is shown commented out: its example would change what happens.
        rows.append((f"{'# ' if static and default is None else ''}{key} = {_toml(value)}", note))
    return _aligned(rows)


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    width = min(44, max((len(text) for text, _ in rows), default=0) + 2)
    return [f"{text:<{max(width, len(text) + 2)}}# {note}" if note else text for text, note in rows]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string, for the plain text used here


if __name__ == "__main__":
    print(reference_markdown(), end="")
