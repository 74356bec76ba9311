"""Shared helpers for the benchmarks: test audio made with ffmpeg, the daemon as a subprocess with an explicit
config, a read-only view of its SQLite database, /proc readings and plain-text tables.

Nothing here changes the daemon; the database is only read (except by upload_overhead, which seeds converted
recordings through daemon.lifecycle before the daemon starts)."""

from __future__ import annotations

import math
import os
import random
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.pipeline.transcode import dying_with_parent
from tests.harness import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
ESPEAK = shutil.which("espeak-ng")
API_KEY = "bench-key-5d1e07c3a9"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---- reproducing and reporting ---------------------------------------------------------------------------------


def command_line(module: str, args: Sequence[str]) -> str:
    """The exact shell command that reruns a benchmark with the same options."""
    python = os.path.relpath(PYTHON, ROOT) if PYTHON.startswith(str(ROOT) + os.sep) else PYTHON
    return f"cd {shlex.quote(str(ROOT))} && {shlex.join([python, '-m', module, *args])}"


def header(title: str, module: str, args: Sequence[str]) -> None:
    print(f"\n=== {title} ===")
    print(f"reproduce: {command_line(module, args)}")
    print(f"host: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, {ffmpeg_version()}, python "
          f"{sys.version.split()[0]}, audiodrop {revision()}", flush=True)


def revision() -> str:
    """The commit measured (with -dirty when the working tree has changes)."""
    result = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True)
    return result.stdout.strip() or "unknown"


def ffmpeg_version() -> str:
    out = subprocess.run([FFMPEG, "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    return " ".join(out.split()[:3]) + f" ({FFMPEG})"


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A plain aligned table: text columns left, numbers right."""
    rows = [[cell if isinstance(cell, str) else fmt(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def numeric(text: str) -> bool:
        return bool(text) and (text.lstrip("-+").replace(".", "", 1).replace(",", "").rstrip("%x").isdigit()
                               or text == "-")

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if numeric(c) else c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    print(f"\n{title}")
    print(line(list(headers)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    sys.stdout.flush()


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


# ---- test audio ------------------------------------------------------------------------------------------------

SPEECH_TEXT = (
    "Good morning everyone. Thanks for joining the weekly planning meeting. Today we will go over the release "
    "schedule, the open bugs in the upload service, and the budget for the next quarter. First, the release. We "
    "moved the date by one week because the storage migration took longer than planned. The new build is ready "
    "for testing on Thursday, and the final version should ship on the twentieth. Second, the bugs. There are "
    "twelve open issues, three of them serious. The daemon sometimes misses files on network drives, the status "
    "command is slow with many recordings, and one customer reports that long interviews fail to convert. "
    "Finally, the budget. We asked for two more servers and one more person for support. Any questions?"
)

# Input formats: suffix and encoder options. wav/m4a/mp3 are the three of transcoding.md §5.
FORMATS: dict[str, tuple[str, list[str]]] = {
    "wav": (".wav", ["-c:a", "pcm_s16le", "-ar", "48000", "-ac", "2"]),  # 48 kHz / 16-bit stereo
    "m4a": (".m4a", ["-c:a", "aac", "-b:a", "96k", "-ar", "48000", "-ac", "2"]),  # AAC 96k
    "mp3": (".mp3", ["-c:a", "libmp3lame", "-b:a", "128k", "-ar", "44100", "-ac", "2"]),  # MP3 128k
    "flac": (".flac", ["-c:a", "flac", "-ar", "44100", "-ac", "1"]),
    "ogg": (".ogg", ["-c:a", "libvorbis", "-b:a", "64k", "-ar", "44100", "-ac", "1"]),
}


def ffmpeg(*args: str) -> None:
    result = subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                            capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"ffmpeg {shlex.join(args)} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Master:
    path: Path
    seconds: float
    kind: str  # "speech (espeak-ng)" or "tones"


def make_master(folder: Path) -> Master:
    """A speech master read by espeak-ng (about 45 s), else a tone; clips are cut from it at random offsets."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "master.wav"
    if ESPEAK:
        subprocess.run([ESPEAK, "-v", "en-us", "-s", "160", "-w", str(path), SPEECH_TEXT], check=True,
                       capture_output=True, timeout=120)
        kind = "speech (espeak-ng) + pink noise"
    else:
        waves = "0.3*sin(220*2*PI*t)*sin(3*t)+0.2*sin(330*2*PI*t)"
        ffmpeg("-f", "lavfi", "-i", f"aevalsrc={waves}:s=22050:d=45", "-c:a", "pcm_s16le", str(path))
        kind = "tones + pink noise"
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                            str(path)], capture_output=True, text=True, check=True)
    return Master(path, float(probe.stdout.strip()), kind)


def make_clip(master: Master, path: Path, seconds: float, kind: str, seed: int) -> Path:
    """`seconds` of the master (looped, from a seeded random offset) under a seeded pink-noise bed, so every
    clip has its own content (the daemon merges identical content), encoded as FORMATS[kind]."""
    offset = random.Random(seed).uniform(0, master.seconds - 1)
    mix = ("[0:a]aresample=48000,pan=stereo|c0=c0|c1=0.8*c0[s];"
           "[s][1:a]amix=inputs=2:duration=first:normalize=0")
    ffmpeg("-stream_loop", "-1", "-ss", f"{offset:.3f}", "-i", str(master.path),
           "-f", "lavfi", "-i", f"anoisesrc=color=pink:amplitude=0.02:seed={seed}:sample_rate=48000",
           "-filter_complex", mix, "-t", f"{seconds:.3f}", *FORMATS[kind][1], "-map_metadata", "-1",
           "file:" + str(path.absolute()))
    return path


@dataclass(frozen=True)
class Clip:
    path: Path
    seconds: float
    kind: str


def make_clips(master: Master, folder: Path, specs: Sequence[tuple[str, float, str]], seed: int,
               workers: int = 2) -> list[Clip]:
    """Clips (stem, seconds, kind) in `folder`, made `workers` at a time."""
    folder.mkdir(parents=True, exist_ok=True)

    def one(item: tuple[int, tuple[str, float, str]]) -> Clip:
        index, (stem, seconds, kind) = item
        path = folder / (stem + FORMATS[kind][0])
        make_clip(master, path, seconds, kind, seed * 100_003 + index)
        return Clip(path, seconds, kind)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, enumerate(specs)))


# ---- the daemon's configuration and process ----------------------------------------------------------------------


def parse_utc(text: str) -> float:
    """A timestamp as the daemon stores it (naive UTC 'YYYY-MM-DD HH:MM:SS.ffffff') -> POSIX seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class StateDb:
    """Read-only queries on the daemon's SQLite file (WAL: they never block the daemon)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10,
                                               isolation_level=None, check_same_thread=False)
        return self._connection

    def query(self, sql: str, *params: Any) -> list[tuple]:
        return self._conn().execute(sql, params).fetchall()

    def counts(self) -> dict[str, int]:
        try:
            return dict(self.query("SELECT state, count(*) FROM recordings GROUP BY state"))
        except sqlite3.OperationalError:  # not created yet
            return {}

    def daemon_pid(self) -> int | None:
        try:
            # The node's row, written with its first heartbeat (the last one written is this run's).
            rows = self.query("SELECT pid FROM nodes WHERE heartbeat_at IS NOT NULL ORDER BY heartbeat_at DESC LIMIT 1")
        except sqlite3.OperationalError:
            self.close()
            return None
        return rows[0][0] if rows else None

    def recordings(self) -> dict[int, dict[str, Any]]:
        cursor = self._conn().execute("SELECT * FROM recordings")
        names = [d[0] for d in cursor.description]
        return {row[0]: dict(zip(names, row)) for row in cursor.fetchall()}

    def events(self) -> dict[int, dict[str, float]]:
        """recording id -> {to_state: POSIX time of the first event entering it} (+ 'from:to' keys)."""
        result: dict[int, dict[str, float]] = {}
        for rid, at, from_state, to_state in self.query(
                "SELECT recording_id, at, from_state, to_state FROM recording_events ORDER BY id"):
            stamps = result.setdefault(rid, {})
            when = parse_utc(at)
            stamps.setdefault(to_state, when)
            stamps.setdefault(f"{from_state}:{to_state}", when)
        return result

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class Daemon(DaemonProcess):
    """The test harness's daemon (tests/harness.py) with the daemon's own defaults for everything not given,
    readiness taken from the database, and a read-only view of that database."""

    def __init__(self, folder: Path, *, api_key: str | None = None, base_url: str | None = None,
                 gemini: dict[str, Any] | None = None, conversion: dict[str, Any] | None = None,
                 intake: dict[str, Any] | None = None, log_level: str = "INFO") -> None:
        tables = {name: table for name, table in (("gemini", gemini), ("conversion", conversion), ("intake", intake))
                  if table}
        super().__init__(folder, base_url=base_url, api_key=api_key, test_timings=False, log_level=log_level, **tables)
        self.state_dir = folder / "state"
        self.db = StateDb(self.state_dir / "audiodrop.db")
        self.started_at = self.ready_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60) -> Daemon:  # type: ignore[override]
        with open(self.log_path, "ab") as log:
            self.started_at = time.time()
            self.process = subprocess.Popen([PYTHON, "-m", "daemon", "run", "--config", str(self.config_path)],
                                            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=dying_with_parent(signal.SIGTERM))
        # Ready once its first heartbeat is written: the watcher is started before it.
        wait_until(lambda: self.db.daemon_pid() == self.pid or self.exited(), timeout, 0.05, "the daemon to start")
        if self.exited():
            raise RuntimeError(f"the daemon exited at start:\n{self.log_tail()}")
        self.ready_at = time.time()
        return self

    def stop(self, timeout: float = 30) -> int:
        self.db.close()
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def wait_for_counts(self, done: Callable[[dict[str, int]], bool], timeout: float, interval: float = 0.1,
                        what: str = "states") -> dict[str, int]:
        def check() -> dict[str, int] | None:
            if self.exited():
                raise RuntimeError(f"the daemon exited:\n{self.log_tail()}")
            counts = self.db.counts()
            return counts if done(counts) else None

        try:
            return wait_until(check, timeout, interval, what)
        except TimeoutError as err:
            raise TimeoutError(f"{err}; counts {self.db.counts()}\n--- log tail ---\n{self.log_tail()}") from None


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ---- /proc ------------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(the process's own user+system CPU s, its reaped children's: ffmpeg and ffprobe) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) / CLK_TCK for v in fields[11:15])
    return utime + stime, cutime + cstime


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (peak RSS) in MiB and the thread count, from /proc/PID/status."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) / 1024
            elif key == "Threads":
                values[key] = int(rest)
    return values


def host_busy_seconds() -> float:
    """CPU s the whole machine has been busy (all processes, all cores) since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, handle.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def self_cpu_now() -> float:
    times = os.times()
    return times.user + times.system


class HostLoad:
    """How busy the machine was during a measurement, apart from the processes being measured: a second,
    unrelated job on 2 cores skews every figure, so each benchmark prints it next to the result."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.busy = host_busy_seconds()
        self.own = self_cpu_now()

    def other_cores(self, measured_cpu: float) -> float:
        """Cores used by everything except this process and `measured_cpu` (the CPU s of what was measured)."""
        wall = time.monotonic() - self.start
        other = host_busy_seconds() - self.busy - (self_cpu_now() - self.own) - measured_cpu
        return max(0.0, other / wall) if wall > 0 else 0.0


def children_cpu_now() -> float:
    """CPU s of this process's reaped children (e.g. after xargs and everything it ran has exited)."""
    times = os.times()
    return times.children_user + times.children_system


# ---- seeding the daemon's database (before it starts) -----------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """One recording to put in the database: where its (absent or present) source and compact copy are."""

    source: Path
    converted: Path
    size: int
    sha256: str


def seed_recordings(daemon: Daemon, seeds: Sequence[Seed], *, until: str, days_ago: float = 0.0) -> None:
    """Create recordings through daemon.lifecycle, the way the daemon's own steps move them, up to `until`:
    "converted" (a compact copy waiting to upload) or "expired" (uploaded, then gone after 48 h: the history
    every recording ends in). Call before the daemon starts; sources should lie outside the inbox."""
    from datetime import timedelta

    from daemon.pipeline import lifecycle
    from daemon.pipeline.lifecycle import RecordingState as S
    from db.session import make_engine, make_sessionmaker, session_scope, upgrade_to_head

    database = daemon.state_dir / "audiodrop.db"
    upgrade_to_head(database)
    engine = make_engine(database)
    now = datetime.now(UTC) - timedelta(days=days_ago)
    with session_scope(make_sessionmaker(engine)) as session:
        for index, seed in enumerate(seeds):
            recording = lifecycle.discover(session, path=str(seed.source), size=seed.size, mtime_ns=index,
                                           watch_root=str(daemon.inbox), closed_after_write=True, now=now)
            steps = [(S.DISCOVERED, S.CONVERTING, {}),
                     (S.CONVERTING, S.CONVERTED, dict(sha256=seed.sha256, converted_path=str(seed.converted),
                                                      converted_bytes=seed.size, converted_mime="audio/ogg",
                                                      converted_format="opus", converted_sha256=seed.sha256,
                                                      duration_seconds=1.0))]
            if until == "expired":
                steps += [(S.CONVERTED, S.UPLOADING, dict(upload_display_name=f"audiodrop-bench-{index}")),
                          (S.UPLOADING, S.ACTIVE, dict(remote_name=f"files/bench{index}", remote_bytes=seed.size,
                                                       remote_expires_at=now + timedelta(hours=48), uploaded_at=now)),
                          (S.ACTIVE, S.EXPIRED, {})]
            for expected, to, changes in steps:
                if not lifecycle.advance(session, recording.id, expected=expected, to=to, now=now,
                                         reason="seeded by bench", **changes):
                    raise RuntimeError(f"could not seed recording {recording.id} {expected} -> {to}")
    engine.dispose()
