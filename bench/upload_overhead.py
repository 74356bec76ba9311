"""Upload overhead: the same converted files uploaded to the same loopback emulator three ways.

  * daemon: the files are seeded as `converted` recordings (through daemon.lifecycle, before the daemon starts,
    so no conversion runs), then the daemon (API key, default config: upload_workers = 2) uploads them. Wall =
    first `converted -> uploading` event to the last `-> active` event; per file = uploading -> active;
  * SDK loop: `client.files.upload(file=path, config={mime_type, display_name})` over the list, on 1 and on 2
    threads (the daemon's upload_workers), in a subprocess so the client does not share this process's GIL
    with the emulator (the daemon is a subprocess too);
  * the daemon's GeminiClient.upload in the same loop (2 threads): the SDK as the daemon configures it, without
    the daemon's scheduling and database work, which splits the daemon's overhead in two;
  * raw HTTP: http.client doing the resumable protocol by hand (start, then 8 MiB `upload` chunks, the last
    `upload, finalize`), one keep-alive connection per thread, in a subprocess as well.

The emulator answers ACTIVE at finalize (processing_polls = 0), so no server-side PROCESSING wait is simulated;
each run gets a fresh emulator. Files: N Ogg Opus files of about 1 MB (about 9 min of speech at 16 kbps) and
one of about 20 MiB (about 3 h), stream-copied from one encoded master.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import (
    API_KEY,
    PYTHON,
    ROOT,
    Daemon,
    HostLoad,
    Seed,
    cpu_seconds,
    ffmpeg,
    header,
    make_master,
    median,
    print_table,
    seed_recordings,
)

MODULE = "bench.upload_overhead"
CHUNK = 8 * 1024 * 1024  # the SDK's chunk size and the emulator's granularity
MIME = "audio/ogg"


# ---- the files -----------------------------------------------------------------------------------------------


def make_files(work: Path, small: int, small_bytes: int, big_bytes: int) -> list[Path]:
    """The big file first, then the small ones (every uploader takes them in this order)."""
    master = make_master(work / "src")
    opus_args = ["-ac", "1", "-c:a", "libopus", "-b:a", "16k", "-ar", "16000", "-compression_level", "5",
                 "-f", "ogg"]
    encoded = work / "src" / "master.ogg"
    seconds = 540.0
    ffmpeg("-stream_loop", "-1", "-i", str(master.path), "-t", f"{seconds}", *opus_args, str(encoded))
    rate = encoded.stat().st_size / seconds  # bytes per second of audio
    folder = work / "files"
    folder.mkdir()
    big = folder / "big.ogg"
    ffmpeg("-stream_loop", "-1", "-i", str(encoded), "-t", f"{big_bytes / rate:.1f}", "-c", "copy", "-f", "ogg",
           str(big))
    files = [big]
    for i in range(small):  # different offsets: every file has its own bytes
        path = folder / f"part{i:02d}.ogg"
        ffmpeg("-stream_loop", "-1", "-ss", f"{7 + 13 * i}", "-i", str(encoded), "-t", f"{small_bytes / rate:.1f}",
               "-c", "copy", "-f", "ogg", str(path))
        files.append(path)
    return files


# ---- client modes (run in a subprocess: python -m bench.upload_overhead --client sdk|http ...) ---------------------


def _sdk_uploader(base_url: str) -> Any:
    from google import genai
    from google.genai import types

    client = genai.Client(api_key=API_KEY, http_options=types.HttpOptions(base_url=base_url))

    def upload(path: Path, name: str) -> str:
        remote = client.files.upload(file=path, config=types.UploadFileConfig(mime_type=MIME, display_name=name))
        return remote.state.value if remote.state else "?"

    return upload


def _gemini_client_uploader(base_url: str) -> Any:
    """The daemon's own wrapper (daemon.gemini.GeminiClient: timeouts, retry options, an open file object)."""
    from daemon.config import GeminiSettings
    from daemon.gemini import GeminiClient

    client = GeminiClient(API_KEY, GeminiSettings(base_url=base_url))

    def upload(path: Path, name: str) -> str:
        return client.upload(path, mime_type=MIME, display_name=name).state

    return upload


def _http_uploader(base_url: str) -> Any:
    address = urlsplit(base_url)
    local = threading.local()

    def connection() -> http.client.HTTPConnection:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(address.hostname, address.port, timeout=300)
        return local.conn

    def request(method: str, target: str, body: bytes,
                headers: dict[str, str]) -> tuple[http.client.HTTPResponse, bytes]:
        conn = connection()
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        return response, response.read()  # read to the end: the connection is reused

    def upload(path: Path, name: str) -> str:
        size = path.stat().st_size
        meta = json.dumps({"file": {"displayName": name, "mimeType": MIME}}).encode()
        start, _ = request("POST", "/upload/v1beta/files", meta, {
            "x-goog-api-key": API_KEY, "Content-Type": "application/json",
            "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(size), "X-Goog-Upload-Header-Content-Type": MIME})
        url = urlsplit(start.getheader("X-Goog-Upload-URL") or "")
        if start.status != 200 or not url.path:
            raise RuntimeError(f"upload start answered {start.status}")
        target = f"{url.path}?{url.query}"
        offset = 0
        with open(path, "rb") as stream:
            while True:
                chunk = stream.read(CHUNK)
                last = offset + len(chunk) >= size
                answer, body = request("POST", target, chunk, {
                    "X-Goog-Upload-Command": "upload, finalize" if last else "upload",
                    "X-Goog-Upload-Offset": str(offset), "Content-Length": str(len(chunk))})
                offset += len(chunk)
                status = answer.getheader("X-Goog-Upload-Status")
                if last or status != "active":
                    break
        if status != "final":
            raise RuntimeError(f"upload of {path.name} ended {answer.status} {status}")
        return str(json.loads(body)["file"].get("state", "?"))

    return upload


def run_client(kind: str, base_url: str, threads: int, files: list[Path]) -> dict[str, Any]:
    """Upload every file once with `threads` workers taking the next file from a shared list."""
    upload = {"sdk": _sdk_uploader, "gclient": _gemini_client_uploader, "http": _http_uploader}[kind](base_url)
    queue = list(enumerate(files))
    lock = threading.Lock()
    results: dict[int, tuple[float, str]] = {}

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                index, path = queue.pop(0)
            began = time.perf_counter()
            state = upload(path, f"bench-{kind}-{index}")
            results[index] = (time.perf_counter() - began, state)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - start
    return {"wall": wall, "per_file": [results[i][0] for i in range(len(files))],
            "states": sorted({results[i][1] for i in range(len(files))})}


def client_subprocess(kind: str, base_url: str, threads: int, files: list[Path]) -> dict[str, Any]:
    argv = [PYTHON, "-m", MODULE, "--client", kind, "--base-url", base_url, "--threads", str(threads),
            *map(str, files)]
    load = HostLoad()
    process = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if process.returncode:
        raise RuntimeError(f"{kind} client failed: {process.stderr[-3000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    result["other"] = load.other_cores(result.pop("cpu"))
    if result["states"] != ["ACTIVE"]:
        raise RuntimeError(f"{kind} uploads ended {result['states']}")
    return result


# ---- the daemon path -------------------------------------------------------------------------------------------


def seed_converted(daemon: Daemon, files: list[Path], sources: Path) -> None:
    """Put each file in the daemon's database as a `converted` recording, as its conversion step would."""
    converted_dir = daemon.state_dir / "converted"
    converted_dir.mkdir(parents=True, exist_ok=True)
    seeds = []
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        copy = converted_dir / f"{digest[:24]}.ogg"
        shutil.copyfile(path, copy)
        seeds.append(Seed(sources / path.name, copy, path.stat().st_size, digest))  # sources: not in the inbox
    seed_recordings(daemon, seeds, until="converted")


def run_daemon(work: Path, files: list[Path], base_url: str, round_no: int) -> dict[str, Any]:
    daemon = Daemon(work / f"daemon-{round_no}", api_key=API_KEY, base_url=base_url)
    seed_converted(daemon, files, work / "sources")
    load = HostLoad()
    with daemon:
        own0, children0 = cpu_seconds(daemon.pid)
        daemon.wait_for_counts(lambda c: c.get("active", 0) + c.get("failed", 0) >= len(files), timeout=300,
                               interval=0.05, what=f"{len(files)} active")
        own1, children1 = cpu_seconds(daemon.pid)
        events = daemon.db.events()
        counts = daemon.db.counts()
        ready = daemon.ready_at
        ready_after_start = daemon.ready_at - daemon.started_at
    if counts.get("active") != len(files):
        raise RuntimeError(f"daemon uploads ended {counts}:\n{daemon.log_tail()}")
    ordered = [events[i] for i in sorted(events)]  # recording ids follow the file order
    first = min(e["converted:uploading"] for e in ordered)
    last = max(e["active"] for e in ordered)
    return {"wall": last - first, "from_ready": last - ready, "first_after_ready": first - ready,
            "ready_after_start": ready_after_start,
            "per_file": [e["active"] - e["converted:uploading"] for e in ordered],
            "cpu": own1 - own0 + children1 - children0, "other": load.other_cores(own1 - own0 + children1 - children0)}


def run_backlog(work: Path, count: int, size: int = 20_000, window: int = 200) -> dict[str, float]:
    """A backlog of `count` small converted recordings (as after a long time offline) drained by the daemon, and
    the same files by the SDK loop: uploads started per second while the backlog is long and when it is short."""
    import os

    folder = work / "backlog"
    folder.mkdir()
    files = []
    for i in range(count):
        path = folder / f"b{i:05d}.ogg"
        path.write_bytes(os.urandom(size))  # the emulator stores any bytes; only the count matters here
        files.append(path)
    from tests.emulator import Emulator

    with Emulator(api_key=API_KEY, processing_polls=0) as emulator:
        daemon = Daemon(work / "daemon-backlog", api_key=API_KEY, base_url=emulator.base_url)
        seed_converted(daemon, files, work / "sources")
        load = HostLoad()
        with daemon:
            daemon.wait_for_counts(lambda c: c.get("active", 0) + c.get("failed", 0) >= count, timeout=1200,
                                   interval=0.2, what=f"{count} active")
            events = daemon.db.events()
        other = load.other_cores(0.0)
    starts = sorted(e["converted:uploading"] for e in events.values())
    with Emulator(api_key=API_KEY, processing_polls=0) as emulator:
        sdk = client_subprocess("sdk", emulator.base_url, 2, files)
    return {"drain": starts[-1] - starts[0] + median([e["active"] - e["converted:uploading"] for e in events.values()]),
            "first": (window - 1) / (starts[window - 1] - starts[0]),
            "last": (window - 1) / (starts[-1] - starts[-window]), "sdk": count / sdk["wall"], "other": other,
            "window": window}


# ---- report ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-files", type=int, default=20)
    parser.add_argument("--small-mb", type=float, default=1.0, help="size of each small file, MB (default 1)")
    parser.add_argument("--big-mib", type=float, default=20.0, help="size of the big file, MiB (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of every mode; medians are shown")
    parser.add_argument("--backlog", type=int, default=2000,
                        help="then drain a backlog of this many 20 kB converted recordings (0: skip; default 2000)")
    parser.add_argument("--client", choices=("sdk", "gclient", "http"), help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:  # the subprocess side: one timed pass, JSON on stdout
        import os

        result = run_client(args.client, args.base_url, args.threads, [Path(p) for p in args.paths])
        times = os.times()
        result["cpu"] = times.user + times.system
        print(json.dumps(result))
        return {}

    options = ["--small-files", str(args.small_files), "--small-mb", f"{args.small_mb:g}",
               "--big-mib", f"{args.big_mib:g}", "--rounds", str(args.rounds), "--backlog", str(args.backlog)]
    header("upload overhead: daemon vs SDK loop vs raw HTTP, same files, loopback emulator", MODULE, options)
    from tests.emulator import Emulator

    work = Path(tempfile.mkdtemp(prefix="audiodrop-bench-upload-"))
    try:
        files = make_files(work, args.small_files, int(args.small_mb * 1e6), int(args.big_mib * 2**20))
        sizes = [p.stat().st_size for p in files]
        print(f"files: 1 x {sizes[0] / 2**20:.2f} MiB + {len(files) - 1} x ~{median(sizes[1:]) / 1e6:.2f} MB "
              f"= {sum(sizes) / 2**20:.1f} MiB; work folder {work}", flush=True)
        modes = [("daemon (upload_workers 2)", "daemon", 2), ("GeminiClient loop, 2 threads", "gclient", 2),
                 ("SDK loop, 1 thread", "sdk", 1), ("SDK loop, 2 threads", "sdk", 2),
                 ("raw HTTP, 1 thread", "http", 1), ("raw HTTP, 2 threads", "http", 2)]
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in modes}
        for round_no in range(args.rounds):  # interleaved, so a slow spell of the machine hits every mode
            for label, kind, threads in modes:
                with Emulator(api_key=API_KEY, processing_polls=0) as emulator:
                    if kind == "daemon":
                        runs[label].append(run_daemon(work, files, emulator.base_url, round_no))
                    else:
                        runs[label].append(client_subprocess(kind, emulator.base_url, threads, files))
                    stats = emulator.stats
                    if stats.uploads_completed != len(files):
                        raise RuntimeError(f"{label}: the emulator completed {stats.uploads_completed} uploads")

        def figures(label: str) -> dict[str, float]:
            rs = runs[label]
            return {"wall": median([r["wall"] for r in rs]),
                    "busy": median([sum(r["per_file"]) / (threads_of[label] * r["wall"]) for r in rs]),
                    "small": median([median(r["per_file"][1:]) for r in rs]),
                    "big": median([r["per_file"][0] for r in rs]),
                    "other": max(r["other"] for r in rs)}

        threads_of = {label: threads for label, _, threads in modes}
        table = {label: figures(label) for label, _, _ in modes}
        daemon = table[modes[0][0]]
        total_mib = sum(sizes) / 2**20
        rows = []
        for label, kind, threads in modes:
            f = table[label]
            peer = table["SDK loop, 2 threads"] if threads == 2 else table["SDK loop, 1 thread"]
            raw = table["raw HTTP, 2 threads"] if threads == 2 else table["raw HTTP, 1 thread"]
            rows.append([label, f["wall"], total_mib / f["wall"], f["small"] * 1000, f["big"] * 1000,
                         f"{100 * f['busy']:.0f}%", f"{f['wall'] / peer['wall']:.2f}", f"{f['wall'] / raw['wall']:.2f}",
                         f["other"]])
        print_table(f"uploading {len(files)} files ({total_mib:.1f} MiB), median of {args.rounds} rounds "
                    "(ratios: wall against the SDK loop / raw HTTP with the same parallelism)",
                    ["mode", "wall s", "MiB/s", "1 MB file ms", "20 MiB file ms", "workers busy", "/ SDK",
                     "/ raw HTTP", "other load"], rows)
        rd = runs[modes[0][0]]
        print(f"per file = upload start -> ACTIVE answer (daemon: `converted -> uploading` -> `-> active` events); "
              f"workers busy = sum of per-file times / (workers x wall).\ndaemon: start -> ready "
              f"{median([r['ready_after_start'] for r in rd]):.2f} s, ready -> first upload "
              f"{median([r['first_after_ready'] for r in rd]):.2f} s, ready -> last active "
              f"{median([r['from_ready'] for r in rd]):.2f} s; daemon CPU {median([r['cpu'] for r in rd]):.2f} s "
              "per round")
        sdk2, raw2 = table["SDK loop, 2 threads"], table["raw HTTP, 2 threads"]
        summary = {"daemon_over_sdk": daemon["wall"] / sdk2["wall"], "daemon_over_raw": daemon["wall"] / raw2["wall"],
                   "sdk_over_raw": sdk2["wall"] / raw2["wall"],
                   "gclient_over_sdk": table["GeminiClient loop, 2 threads"]["wall"] / sdk2["wall"],
                   "daemon_small_over_sdk": daemon["small"] / table["SDK loop, 2 threads"]["small"]}
        if args.backlog >= 400:
            backlog = run_backlog(work, args.backlog)
            summary.update(backlog_first_rate=backlog["first"], backlog_last_rate=backlog["last"],
                           backlog_last_over_first=backlog["last"] / backlog["first"],
                           backlog_daemon_over_sdk_time=backlog["sdk"] / (args.backlog / backlog["drain"]))
            print_table(f"draining a backlog of {args.backlog} converted recordings of 20 kB (uploads started per "
                        f"second; other load {backlog['other']:.2f} cores)",
                        ["mode", "drain s", f"rate, first {backlog['window']}", f"rate, last {backlog['window']}",
                         "rate, whole"],
                        [["daemon (upload_workers 2)", backlog["drain"], backlog["first"], backlog["last"],
                          args.backlog / backlog["drain"]],
                         ["SDK loop, 2 threads", args.backlog / backlog["sdk"], "-", "-", backlog["sdk"]]])
        print(f"\nsummary: upload wall daemon/SDK = {summary['daemon_over_sdk']:.2f}, daemon/raw HTTP = "
              f"{summary['daemon_over_raw']:.2f}, GeminiClient/SDK = {summary['gclient_over_sdk']:.2f}, SDK/raw HTTP = "
              f"{summary['sdk_over_raw']:.2f} (2 workers each); "
              f"per 1 MB file daemon/SDK = {summary['daemon_small_over_sdk']:.2f}"
              + (f"; draining {args.backlog}: {summary['backlog_last_rate']:.0f} uploads/s at the end vs "
                 f"{summary['backlog_first_rate']:.0f}/s at the start (x{summary['backlog_last_over_first']:.2f})"
                 if "backlog_last_over_first" in summary else ""), flush=True)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
