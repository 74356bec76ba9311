"""Folder profiles: an optional `.audiodrop.toml` at the root of a drop folder that sets that folder's prompts, its
own templates, a glossary of names and terms for every prompt, trimming, and what becomes of its source files.

A profile is validated like the main configuration (daemon.config's machinery: every problem at once, each naming
the file and the key). A broken profile is ignored with a warning, and the folder's settings from the main
configuration stay in force. Profiles are read again whenever their file changes: each look at a folder's rules
compares the file's identity and mtime with the loaded one (cheap: one lstat), the watcher's events and every
catch-up scan look too, so a change is logged promptly. The file is never a recording (intake ignores the name).
Must not import sqlalchemy, watchdog or google.genai.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic import dataclasses as pydantic_dataclasses
from pydantic_core import PydanticCustomError

from daemon.config import (
    Bool,
    Settings,
    SourceAction,
    SourceWhen,
    Template,
    TemplateName,
    Watch,
    describe_problems,
    inside_folder,
)
from daemon.errors import ConfigError

log = logging.getLogger(__name__)

PROFILE_NAME = ".audiodrop.toml"
MAX_PROFILE_BYTES = 256 * 1024
# The glossary goes into every prompt of the folder: a few hundred names, not a dictionary.
MAX_GLOSSARY_CHARACTERS = 20_000
GLOSSARY_HEADER = "Names and terms that may be spoken in this recording; write them exactly like this:"


def _glossary(value: object) -> object:
    """A list of names, or a table of name = "short description": normalized to (name, description) pairs."""
    if isinstance(value, list):
        pairs = [(item, "") for item in value]
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise PydanticCustomError("glossary", 'expected a list of names or a table of name = "short description", '
                                              f"got {_shown(value)}")
    for position, (term, description) in enumerate(pairs, start=1):
        if not isinstance(term, str) or not term.strip():
            raise PydanticCustomError("glossary", f"entry {position} is not a name (a non-empty string): "
                                                  f"{_shown(term)}")
        if not isinstance(description, str):
            raise PydanticCustomError("glossary", f"{term!r}: expected a string (a short description), got "
                                                  f"{_shown(description)}")
    result = tuple((str(term).strip(), str(description).strip()) for term, description in pairs)
    size = len(glossary_text(result) or "")
    if size > MAX_GLOSSARY_CHARACTERS:
        raise PydanticCustomError("glossary", f"{size} characters, more than {MAX_GLOSSARY_CHARACTERS}: it goes "
                                              "into every prompt of the folder; keep the names that matter")
    return result


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_folder(value: object, info: ValidationInfo) -> object:
    """A relative move_to is taken from the drop folder; "~" and $VARS are expanded."""
    if not isinstance(value, str):
        return value
    path = Path(os.path.expandvars(value)).expanduser()
    folder = (info.context or {}).get("folder")
    return path if path.is_absolute() or folder is None else Path(folder) / path


def _outside(value: Path | None, info: ValidationInfo) -> Path | None:
    """Never into a drop folder (the source would be taken again) nor into the daemon's own folders."""
    if value is None:
        return None
    value = Path(os.path.normpath(value))
    context = info.context or {}
    clash = inside_folder(value, list(context.get("folders", ())))
    if clash is not None:
        raise PydanticCustomError("move_to", f"{value} is inside the drop folder {clash}, where moved sources would "
                                             "be taken again; name a folder outside every drop folder")
    own = inside_folder(value, list(context.get("own", ())))
    if own is not None:
        raise PydanticCustomError("move_to", f"{value} is inside the daemon's own folder {own}; name another")
    return value


Glossary = Annotated[tuple[tuple[str, str], ...], BeforeValidator(_glossary)]
ProfilePath = Annotated[Path, BeforeValidator(_in_folder), AfterValidator(_outside)]


@pydantic_dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Profile:
    """What `.audiodrop.toml` at the root of a drop folder may set; what it leaves out comes from the [[watch]]
    table of the main configuration."""

    prompts: tuple[TemplateName, ...] | None = Field(
        default=None, examples=[["transcribe", "minutes"]],
        description="templates run on every new recording here (default: the [[watch]] table's prompts)")
    templates: dict[str, Template] = Field(
        default_factory=dict, validate_default=True,
        description="templates only this folder's recordings see, as [templates.NAME] in the main configuration")
    glossary: Glossary | None = Field(
        default=None, examples=[{"Ana Lima": "head of research", "Kubernetes": ""}],
        description='names and terms for every prompt here: a list, or a table of name = "short description"')
    trimming: Bool | None = Field(
        default=None, description="whether prompts here cut long silences (default: as the template says)")
    source_action: SourceAction | None = Field(
        default=None, description="what becomes of a source file once done: keep, move (to move_to) or delete")
    source_when: SourceWhen | None = Field(
        default=None, description="done means converted, or prompts_done (every prompt answered)")
    move_to: ProfilePath | None = Field(
        default=None, examples=["../done"],
        description="where moved sources go; a relative path starts at the drop folder (never inside one)")

    @field_validator("templates", mode="before")
    @classmethod
    def _over_known(cls, value: object, info: ValidationInfo) -> object:
        """A [templates.NAME] table naming a template the folder already sees only changes the keys it names."""
        if not isinstance(value, dict):
            return value
        known: Mapping[str, Template] = (info.context or {}).get("known", {})
        merged: dict[str, Any] = {}
        for name, body in value.items():
            base = known.get(name)
            merged[name] = {**_keys_of(base), **body} if base is not None and isinstance(body, dict) else body
        return merged

    @field_validator("templates")
    @classmethod
    def _named(cls, value: dict[str, Template]) -> dict[str, Template]:
        for name, template in value.items():
            object.__setattr__(template, "name", name)  # the frozen-dataclass idiom, as in daemon.config
        return value


_PROFILE = TypeAdapter(Profile)


def _keys_of(template: Template) -> dict[str, Any]:
    return {field.name: getattr(template, field.name) for field in dataclasses.fields(template) if field.init}


@dataclass(frozen=True)
class FolderRules:
    """What holds for one drop folder now: its [[watch]] table with its profile's settings over it."""

    folder: Path
    watch: Watch | None
    profile: Path | None  # the profile file, when there is one
    state: str  # "none" (no profile), "loaded", or "ignored" (broken: see error)
    error: str | None
    prompts: tuple[str, ...]
    # The settings the folder's prompts are made from: the main ones, with the profile's templates added.
    settings: Settings
    glossary: str | None
    trimming: bool | None
    source_action: str
    source_when: str
    move_to: Path | None

    @property
    def templates(self) -> Mapping[str, Template]:
        return self.settings.templates


class HasWatchRoot(Protocol):
    @property
    def watch_root(self) -> str | None: ...


Where = Watch | HasWatchRoot | str | Path | None


def glossary_text(entries: tuple[tuple[str, str], ...] | None) -> str | None:
    """The glossary as it goes into a system instruction, or None when there is none."""
    if not entries:
        return None
    lines = [f"- {term}: {description}" if description else f"- {term}" for term, description in entries]
    return "\n".join([GLOSSARY_HEADER, *lines])


def load_profile(path: Path, watch: Watch, settings: Settings) -> Profile:
    """Read and check one profile against the main settings; ConfigError names the file and lists every problem."""
    data = _read(path)
    templates = data.get("templates")
    known = {**settings.templates}
    names = set(known) | (set(templates) if isinstance(templates, dict) else set())
    folders = [Path(os.path.abspath(w.path)) for w in settings.watches]
    context = {"templates": names, "known": known, "folders": folders, "folder": Path(os.path.abspath(watch.path)),
               "own": [settings.state_dir, settings.results_dir]}
    try:
        profile = _PROFILE.validate_python(data, context=context)
    except ValidationError as err:
        raise ConfigError(str(path), describe_problems(err, Profile)) from None
    if (profile.source_action or watch.source_action) == "move" and (profile.move_to or watch.move_to) is None:
        raise ConfigError(str(path), [f'source_action: "move" needs move_to, here or in the [[watch]] table of '
                                      f"{watch.path}"])
    return profile


def _read(path: Path) -> dict[str, Any]:
    """The file's TOML: a regular file (a symlink is never followed), small, UTF-8."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        why = "is a symlink, which is not followed; put the file itself there" if os.path.islink(path) \
            else f"cannot be read: {err.strerror}"
        raise ConfigError(str(path), [why]) from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(str(path), ["is not a regular file"])
        if info.st_size > MAX_PROFILE_BYTES:
            raise ConfigError(str(path), [f"is {info.st_size} bytes, more than a profile may be "
                                          f"({MAX_PROFILE_BYTES})"])
        with os.fdopen(os.dup(descriptor), "rb") as stream:
            raw = stream.read(MAX_PROFILE_BYTES + 1)
    finally:
        os.close(descriptor)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), [f"is not UTF-8 text: {err}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), [f"is not valid TOML: {err}"]) from None


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What tells one version of the file from the next (None: there is no file)."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


class ProfileCache:
    """The loaded rules of each drop folder, kept until the profile file or the main settings change."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded: dict[Path, tuple[Settings, tuple[int, ...] | None, FolderRules]] = {}

    def rules(self, settings: Settings, watch: Watch, *, announce: bool = True) -> FolderRules:
        folder = Path(os.path.abspath(watch.path))
        path = folder / PROFILE_NAME
        stamp = _stamp(path)
        with self.lock:
            cached = self.loaded.get(folder)
            if cached is not None and cached[0] is settings and cached[1] == stamp:
                return cached[2]
            rules = folder_rules(settings, watch, path if stamp is not None else None)
            previous = cached[2] if cached is not None else None
            self.loaded[folder] = (settings, stamp, rules)
        if announce:
            _announce(rules, previous, settings)
        return rules


def _announce(rules: FolderRules, previous: FolderRules | None, settings: Settings) -> None:
    """Say what changed: a profile loaded or reloaded, ignored (and why), or gone."""
    if rules.state == "ignored":
        if previous is None or previous.error != rules.error:
            log.warning("%s: folder profile ignored, the settings of %s from %s stay in force: %s", rules.profile,
                        rules.folder, settings.source or "the defaults", rules.error)
    elif rules.state == "loaded":
        log.info("%s: folder profile %s (prompts %s%s%s)", rules.profile,
                 "reloaded" if previous is not None and previous.state != "none" else "loaded",
                 ", ".join(rules.prompts) or "none", ", a glossary" if rules.glossary else "",
                 f", sources: {rules.source_action}" if rules.source_action != "keep" else "")
    elif previous is not None and previous.state != "none":
        log.info("%s: folder profile removed; the folder's settings come from %s again",
                 previous.profile, settings.source or "the defaults")


def folder_rules(settings: Settings, watch: Watch, profile_path: Path | None) -> FolderRules:
    """The rules of one folder: its [[watch]] table, and over it the profile at `profile_path` when it loads."""
    base = FolderRules(folder=Path(os.path.abspath(watch.path)), watch=watch, profile=profile_path, state="none",
                       error=None, prompts=tuple(watch.prompts), settings=settings, glossary=None, trimming=None,
                       source_action=watch.source_action, source_when=watch.source_when, move_to=watch.move_to)
    if profile_path is None:
        return base
    try:
        profile = load_profile(profile_path, watch, settings)
    except ConfigError as err:
        return dataclasses.replace(base, state="ignored", error="; ".join(err.problems))
    own = dataclasses.replace(settings, templates={**settings.templates, **profile.templates}) \
        if profile.templates else settings
    return dataclasses.replace(
        base, state="loaded", settings=own,
        prompts=tuple(profile.prompts) if profile.prompts is not None else base.prompts,
        glossary=glossary_text(profile.glossary), trimming=profile.trimming,
        source_action=profile.source_action or watch.source_action,
        source_when=profile.source_when or watch.source_when, move_to=profile.move_to or watch.move_to)


CACHE = ProfileCache()


def watch_of(settings: Settings, where: Where) -> Watch | None:
    """The [[watch]] table meant by `where`: a Watch, a recording (its watch_root), or a drop folder's path."""
    if isinstance(where, Watch):
        return where
    root = where if isinstance(where, (str, Path)) or where is None else where.watch_root
    if root is None:
        return None
    wanted = os.path.abspath(root)
    return next((w for w in settings.watches if os.path.abspath(w.path) == wanted), None)


def rules_for(settings: Settings, where: Where) -> FolderRules:
    """The rules that hold now for a recording's (or a watch's) drop folder; for a recording that belongs to no
    configured folder, the main settings with nothing done to its source."""
    watch = watch_of(settings, where)
    if watch is None:
        root = where if isinstance(where, (str, Path)) else getattr(where, "watch_root", None)
        return FolderRules(folder=Path(os.path.abspath(root or "/")), watch=None, profile=None, state="none",
                           error=None, prompts=(),
                           settings=settings, glossary=None, trimming=None, source_action="keep",
                           source_when="converted", move_to=None)
    return CACHE.rules(settings, watch)


def refresh(settings: Settings, path: Path | None = None) -> None:
    """Look at the profiles again (all, or the one at `path`), logging what changed: called for the watcher's
    events on a profile file and at every catch-up scan."""
    for watch in settings.watches:
        if path is None or Path(os.path.abspath(path)) == Path(os.path.abspath(watch.path)) / PROFILE_NAME:
            CACHE.rules(settings, watch)


def is_profile(path: Path | str) -> bool:
    return os.path.basename(path) == PROFILE_NAME


def trim_for(settings: Settings, where: Where, template: str | None) -> bool:
    """Whether a prompt over a recording of this folder cuts long silences: the folder's profile decides first,
    then the template's own setting, then the global default (daemon.prompts.queue.trims)."""
    from daemon.prompts.queue import trims  # the queue reads the profiles: imported here, not at the top

    rules = rules_for(settings, where)
    if rules.trimming is not None:
        return rules.trimming
    return trims(rules.settings, rules.templates.get(template) if template else None, template)


def statuses(settings: Settings) -> list[dict[str, Any]]:
    """Every drop folder's profile that exists, for `status --json`: folder, path, state (loaded or ignored) and
    error. Read afresh (the CLI's own view of the files, which the daemon reads the same way), logging nothing."""
    found = []
    for watch in settings.watches:
        path = Path(os.path.abspath(watch.path)) / PROFILE_NAME
        if _stamp(path) is None:
            continue
        rules = folder_rules(settings, watch, path)
        found.append({"folder": str(rules.folder), "path": str(path), "state": rules.state, "error": rules.error})
    return found
