"""Run the Gemini API emulator by hand:  python -m tests.emulator --port 8765  (from the repo root)."""

from __future__ import annotations

import argparse
import signal
import threading

from .server import Emulator


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.emulator", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--api-key", default=None, help="required key (default: accept any non-empty key)")
    ap.add_argument("--storage-limit", type=int, default=21_474_836_480, metavar="BYTES")
    ap.add_argument("--max-file-bytes", type=int, default=2_147_483_648, metavar="BYTES")
    ap.add_argument("--ttl", type=float, default=48 * 3600, metavar="SECONDS")
    ap.add_argument("--processing-polls", type=int, default=1, metavar="N")
    ap.add_argument("--token-rate", type=float, default=32)
    ap.add_argument("--inline-limit", type=int, default=20 * 1024 * 1024, metavar="BYTES")
    ap.add_argument("--transcript", choices=("segments", "speech"), default="segments",
                    help="default answer to audio: a line every 30 s, or one line per stretch of speech")
    ap.add_argument("--batch-polls", type=int, default=2, metavar="N",
                    help="batches.get answers before a batch succeeds (-1: only when told to)")
    ap.add_argument("--data-dir", default=None, help="keep uploaded bytes here (default: a temp dir)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args(argv)

    emu = Emulator(api_key=args.api_key, storage_limit_bytes=args.storage_limit,
                   max_file_bytes=args.max_file_bytes, ttl_seconds=args.ttl,
                   processing_polls=args.processing_polls, token_rate=args.token_rate,
                   inline_limit_bytes=args.inline_limit, data_dir=args.data_dir, transcript=args.transcript,
                   batch_polls=args.batch_polls if args.batch_polls >= 0 else None,
                   host=args.host, port=args.port, verbose=args.verbose)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    url = emu.start()
    key = args.api_key or "any-non-empty-key"
    print(f"Gemini API emulator listening on {url}", flush=True)
    print(f"""Point the SDK at it:
  export GOOGLE_GEMINI_BASE_URL={url}
  export GEMINI_API_KEY={key}
or in code:
  genai.Client(api_key="{key}", http_options=types.HttpOptions(base_url="{url}"))
Control (no key needed):
  curl {url}/_emulator/state
  curl -X POST {url}/_emulator/clock -d '{{"advance": 172800}}'
  curl -X POST {url}/_emulator/faults -d '{{"route": "generate", "kind": "status", "status": 429, "times": 1}}'
  curl -X DELETE {url}/_emulator/faults
  curl -X POST {url}/_emulator/offline -d '{{"seconds": 10}}'
  curl -X POST {url}/_emulator/batches -d '{{"action": "finish"}}'
  curl -X POST {url}/_emulator/holds
Ctrl-C to stop.""", flush=True)
    try:
        done.wait()
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
