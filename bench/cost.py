"""Cost of prompts: the same 10 prompts (transcribe, summarize and two minutes-like prompts of one's own) run by the
daemon against the emulator in several ways, and what the daemon's own ledger says they cost: tokens (prompt,
audio, cached, output) and dollars (`prompts.cost_usd` and `prompts.cached_tokens`, summed from the token_usage
rows the daemon writes with daemon/prompts/pricing.py's price table; gemini-2.5-flash by default).

The recordings are made at run time: espeak-ng reading sentences in a few voices, cut into turns with silent
gaps of 3-9 s between them (ffmpeg anullsrc, concat) so that about 40 % of each recording is silence, every one
exactly `--seconds` long (default 90 s: 2,880 audio tokens) and each with its own content.

Scenarios, each with a fresh emulator and a fresh daemon (default config, an API key, requests_per_minute 30 so
that no prompt waits for the rate limit):

* **baseline**: trimming off, every prompt on a recording of its own (no prompt repeats another's audio).
* **trimming on**: the same, with `[trimming] enabled = true` and `ask --trim` on every prompt.
* **implicit cache**: trimming off, the 10 prompts over 3 recordings (transcribe, summarize and minutes of each,
  plus action items of the first), queued so that prompts on one recording follow each other. The daemon puts the
  audio first, so a repeat of a recording's audio is a repeated prefix: the emulator reports
  cachedContentTokenCount when the shared leading parts reach the model's minimum (1,024 tokens for flash) within
  `implicit_cache_seconds` (300 s, its default; tests/emulator/caches.py).
* **same recordings, cache off**: the implicit cache scenario with the emulator's `implicit_cache_seconds=0`: the
  same audio without the discount, so the difference to the row above is the cache alone.
* **trimming + cache**: both.
* **batch lane**: the baseline's prompts with `ask --batch`. Measured when the daemon sends them through the Batch
  API (the emulator saw a batch and the ledger rows say batch); otherwise the row is COMPUTED from the baseline's
  ledger rows repriced with the price table's batch discount, and says so.

The emulator answers in "speech" mode (one line per stretch of real speech, whatever the prompt asked), so output
tokens follow the speech, not the prompt: summaries cost as much output as transcripts here.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import wave
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.common import (
    API_KEY,
    ESPEAK,
    PYTHON,
    ROOT,
    SPEECH_TEXT,
    Daemon,
    StateDb,
    ffmpeg,
    header,
    print_table,
    wait_until,
)
from daemon.pipeline.transcode import dying_with_parent
from tests.harness import DaemonProcess

MODULE = "bench.cost"
VOICES = ["en-us", "en-gb", "en-us+f3", "en-us+m3", "en-gb-x-rp"]
SENTENCES = [s.strip() + "." for s in SPEECH_TEXT.replace("?", ".").split(".") if s.strip()]
MINUTES = ("Write the minutes of this meeting: attendees if named, each topic discussed, the decisions taken, "
           "and open questions, as a Markdown list.")
ACTIONS = "List every action item in this recording: who does what, by when, as a Markdown table."
# (label, template or None, own prompt text or None)
KINDS = {"transcribe": ("transcribe", None), "summarize": ("summarize", None), "minutes": (None, MINUTES),
         "actions": (None, ACTIONS)}
# The 10 prompts: (kind, recording index when prompts share recordings). Prompts on one recording follow each other
# at a distance of 3, so the two prompt workers never ask about the same audio at once.
SHARED = [("transcribe", 0), ("transcribe", 1), ("transcribe", 2), ("summarize", 0), ("summarize", 1),
          ("summarize", 2), ("minutes", 0), ("minutes", 1), ("minutes", 2), ("actions", 0)]


# ---- recordings -------------------------------------------------------------------------------------------------


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as handle:
        return handle.getnframes() / handle.getframerate()


def make_recording(folder: Path, index: int, seconds: float, silence: float, cache: dict[tuple[str, str], Path]
                   ) -> dict[str, Any]:
    """One recording of `seconds`: turns of 1-3 sentences (one voice per recording, a seeded order), separated
    by silent gaps of 3-9 s that add up to `silence` of the whole. Returns its path and make-up."""
    rng = random.Random(1000 + index)
    voice = VOICES[index % len(VOICES)]
    order = SENTENCES[:]
    rng.shuffle(order)
    pieces: list[Path] = []
    speech = 0.0
    target = seconds * (1 - silence)
    for n in range(10_000):
        sentence = order[n % len(order)]
        key = (voice, sentence)
        if key not in cache:
            path = folder / "sentences" / f"s{len(cache):03d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([ESPEAK or "espeak-ng", "-v", voice, "-s", "165", "-w", str(path), sentence], check=True,
                           capture_output=True, timeout=60)
            cache[key] = path
        length = wav_seconds(cache[key])
        if speech + length > target and pieces:
            break
        pieces.append(cache[key])
        speech += length
    # Turns of 1-3 sentences; a gap after each turn (the last one too), 3-9 s in proportion, adding up to the rest.
    turns: list[list[Path]] = []
    start = 0
    while start < len(pieces):
        size = rng.randint(1, 3)
        turns.append(pieces[start:start + size])
        start += size
    gap_total = max(0.0, seconds - speech)
    weights = [rng.uniform(3, 9) for _ in turns]
    gaps = [gap_total * w / sum(weights) for w in weights]
    inputs: list[str] = []
    labels = []
    k = 0
    for turn, gap in zip(turns, gaps, strict=True):
        for piece in turn:
            inputs += ["-i", str(piece)]
            labels.append(f"[{k}:a]")
            k += 1
        inputs += ["-f", "lavfi", "-t", f"{gap:.3f}", "-i", "anullsrc=r=22050:cl=mono"]
        labels.append(f"[{k}:a]")
        k += 1
    out = folder / f"meeting-{index:02d}.wav"
    ffmpeg(*inputs, "-filter_complex", f"{''.join(labels)}concat=n={k}:v=0:a=1,aresample=22050,"
           f"apad=whole_dur={seconds}", "-t", f"{seconds}", "-ac", "1", "-c:a", "pcm_s16le", str(out))
    return {"path": out, "voice": voice, "speech_s": speech, "gaps": len(gaps), "longest_gap_s": max(gaps),
            "seconds": wav_seconds(out)}


# ---- one scenario -----------------------------------------------------------------------------------------------


class CostDaemon(Daemon):
    """bench.common.Daemon with the tables this benchmark sets (trimming, prompts, batch)."""

    def __init__(self, folder: Path, base_url: str, *, trimming: bool) -> None:
        DaemonProcess.__init__(self, folder, base_url=base_url, api_key=API_KEY, test_timings=False,
                               trimming={"enabled": trimming}, prompts={"requests_per_minute": 30},
                               batch={"gather_seconds": 2.0, "poll_seconds": 2.0})
        self.state_dir = folder / "state"
        self.db = StateDb(self.state_dir / "audiodrop.db")
        self.started_at = self.ready_at = 0.0

    def start(self, timeout: float = 60) -> CostDaemon:  # type: ignore[override]
        """Ready once this process has heartbeated in the `nodes` table. (bench.common.Daemon.start waits for
        daemon_state.pid, which the daemon no longer writes since fleet mode: it would time out.)"""
        with open(self.log_path, "ab") as log:
            self.started_at = time.time()
            self.process = subprocess.Popen([PYTHON, "-m", "daemon", "run", "--config", str(self.config_path)],
                                            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=dying_with_parent(signal.SIGTERM))

        def ready() -> bool:
            if self.exited():
                return True
            try:
                return self.pid in {pid for (pid,) in self.db.query(
                    "SELECT pid FROM nodes WHERE heartbeat_at IS NOT NULL")}
            except sqlite3.OperationalError:  # not created yet
                self.db.close()
                return False

        wait_until(ready, timeout, 0.05, "the daemon to start")
        if self.exited():
            raise RuntimeError(f"the daemon exited at start:\n{self.log_tail()}")
        self.ready_at = time.time()
        return self


def cli(daemon: Daemon, *args: str) -> Any:
    result = subprocess.run([PYTHON, "-m", "daemon", *args, "--config", str(daemon.config_path)], cwd=ROOT,
                            env=daemon.env, capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise RuntimeError(f"audiodrop {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return json.loads(result.stdout) if "--json" in args else result.stdout


def scenario(work: Path, name: str, recordings: list[dict[str, Any]], plan: list[tuple[str, int]], *, trim: bool,
             cache: bool = True, batch: bool = False, timeout: float = 300) -> dict[str, Any]:
    """Drop the recordings the plan names, ask its prompts in order, wait for the answers; the ledger's figures."""
    from tests.emulator import Emulator

    folder = work / name.replace(" ", "-").replace("+", "and")
    used = sorted({index for _, index in plan})
    began = time.monotonic()
    with Emulator(api_key=API_KEY, data_dir=folder / "emulator", processing_polls=0, transcript="speech",
                  implicit_cache_seconds=300.0 if cache else 0, batch_polls=1) as emulator:
        with CostDaemon(folder / "daemon", emulator.base_url, trimming=trim) as daemon:
            for index in used:
                shutil.copyfile(recordings[index]["path"], daemon.inbox / recordings[index]["path"].name)
            daemon.wait_for_counts(lambda c: c.get("active", 0) == len(used), 180, 0.2, "the recordings to upload")
            ids = {Path(r["source_path"]).name: rid for rid, r in daemon.db.recordings().items()}
            for kind, index in plan:
                template, text = KINDS[kind]
                rid = str(ids[recordings[index]["path"].name])
                what = ["-t", template] if template else ["-p", str(text)]
                cli(daemon, "ask", rid, *what, "--trim" if trim else "--no-trim", *(["--batch"] if batch else []),
                    "--json")
            try:
                wait_until(lambda: daemon.db.query("SELECT count(*) FROM prompts WHERE state IN ('done', 'failed')")
                           [0][0] == len(plan), timeout, 0.3, f"{len(plan)} answers")
                finished = True
            except TimeoutError:
                finished = False
            listed = cli(daemon, "prompts", "--json")
            rows = {row[0]: row for row in daemon.db.query(
                "SELECT id, cost_usd, cached_tokens, trimmed_seconds FROM prompts")}
            ledger = daemon.db.query("SELECT prompt_id, model, prompt_tokens, audio_tokens, output_tokens, "
                                     "thinking_tokens, cached_tokens, batch, cost_usd FROM token_usage")
            batches = emulator.stats.batches_created
            generate_calls = len(emulator.generate_requests)
            implicit_hits = sum(1 for r in emulator.generate_requests if r.cache_kind == "implicit")
    result: dict[str, Any] = {"name": name, "finished": finished, "batches": batches, "ledger": ledger,
                              "generate_calls": generate_calls, "implicit_hits": implicit_hits,
                              "wall_s": time.monotonic() - began}
    result["plan"] = plan
    prompts = []
    for item in sorted(listed, key=lambda item: item["id"]):
        pid, cost_usd, cached, trimmed = rows[item["id"]]
        cost_usd = item.get("cost_usd", cost_usd)  # prompts --json, once it shows them; else the same column
        cached = item.get("cached_tokens", item["tokens"].get("cached", cached))
        prompts.append({"id": pid, "state": item["state"], "prompt": item["tokens"]["prompt"] or 0,
                        "audio": item["tokens"]["audio"] or 0, "output": item["tokens"]["output"] or 0,
                        "thinking": item["tokens"]["thinking"] or 0, "cached": cached or 0,
                        "usd": Decimal(str(cost_usd)) if cost_usd is not None else None,
                        "trimmed_s": trimmed or 0.0, "error": item["error"]})
    result["prompts"] = prompts
    result["cost_source"] = "prompts --json" if listed and "cost_usd" in listed[0] else \
        "prompts.cost_usd / cached_tokens (the daemon's database: prompts --json does not show them yet)"
    return result


def totals(result: dict[str, Any]) -> dict[str, Any]:
    ps = result["prompts"]
    usd = [p["usd"] for p in ps]
    return {"prompts": len(ps), "done": sum(p["state"] == "done" for p in ps),
            "prompt": sum(p["prompt"] for p in ps), "audio": sum(p["audio"] for p in ps),
            "cached": sum(p["cached"] for p in ps), "output": sum(p["output"] + p["thinking"] for p in ps),
            "usd": sum((u for u in usd if u is not None), Decimal(0)), "unpriced": sum(u is None for u in usd),
            "trimmed_s": sum(p["trimmed_s"] for p in ps)}


def batch_computed(base: dict[str, Any]) -> dict[str, Any]:
    """The baseline's ledger rows repriced as Batch API answers (pricing.cost(batch=True)): not measured."""
    from daemon.prompts import pricing

    figures = totals(base)
    amount = Decimal(0)
    for _pid, model, prompt, audio, output, thinking, cached, _batch, _cost in base["ledger"]:
        usage = pricing.Usage(prompt_tokens=prompt or 0, audio_tokens=audio or 0, output_tokens=output or 0,
                              thinking_tokens=thinking or 0, cached_tokens=cached or 0)
        amount += pricing.ledger_amount(pricing.cost(usage, model, batch=True)) or 0
    figures["usd"] = amount
    figures["discount"] = pricing.DEFAULT_PRICES.lookup(base["ledger"][0][1]).batch_discount if base["ledger"] \
        else None
    return figures


# ---- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90.0, help="length of each recording (default 90)")
    parser.add_argument("--silence", type=float, default=0.4, help="share of silence in each (default 0.4)")
    parser.add_argument("--skip-batch-run", action="store_true",
                        help="do not try ask --batch; compute the batch row from the price table")
    args = parser.parse_args(argv)
    options = ["--seconds", f"{args.seconds:g}", "--silence", f"{args.silence:g}",
               *(["--skip-batch-run"] if args.skip_batch_run else [])]
    header("cost: the same 10 prompts, trimming off/on, implicit cache, batch lane (daemon ledger, emulator)",
           MODULE, options)
    if not ESPEAK:
        print("skipped: espeak-ng is not installed (apt-get install espeak-ng)")
        return {}
    work = Path(tempfile.mkdtemp(prefix="audiodrop-bench-cost-"))
    try:
        began = time.monotonic()
        cache: dict[tuple[str, str], Path] = {}
        recordings = [make_recording(work / "audio", i, args.seconds, args.silence, cache) for i in range(10)]
        print(f"10 recordings made in {time.monotonic() - began:.1f} s", flush=True)
        print_table("recordings (espeak-ng turns with silent gaps, 22.05 kHz mono WAV)",
                    ["recording", "voice", "seconds", "speech s", "silence %", "gaps", "longest gap s"],
                    [[r["path"].name, r["voice"], r["seconds"], r["speech_s"],
                      100 * (1 - r["speech_s"] / r["seconds"]), r["gaps"], r["longest_gap_s"]] for r in recordings])
        own = [(kind, n) for n, (kind, _) in enumerate(SHARED)]
        runs: list[tuple[str, dict[str, Any]]] = []

        def run(name: str, plan: list[tuple[str, int]], **kw: Any) -> dict[str, Any]:
            result = scenario(work, name, recordings, plan, **kw)
            figures = totals(result)
            print(f"{name}: {figures['done']}/{figures['prompts']} done, {result['generate_calls']} generate calls, "
                  f"{result['implicit_hits']} implicit cache hits, {result['batches']} batches, "
                  f"{result['wall_s']:.0f} s", flush=True)
            for p in result["prompts"]:
                if p["state"] != "done":
                    print(f"  prompt {p['id']}: {p['state']} {p['error'] or ''}")
            runs.append((name, result))
            return result

        base = run("baseline: trimming off, own recordings", own, trim=False)
        run("trimming on, own recordings", own, trim=True)
        run("implicit cache: 3 shared recordings", SHARED, trim=False)
        run("3 shared recordings, emulator cache off", SHARED, trim=False, cache=False)
        run("trimming on + implicit cache", SHARED, trim=True)
        batch_measured = None
        batch_note = ""
        batch_module = (ROOT / "daemon" / "prompts" / "batch.py").exists()
        if args.skip_batch_run:
            batch_note = "not tried (--skip-batch-run)"
        elif not batch_module:
            batch_note = "not tried: daemon/prompts/batch.py does not exist yet"
        else:
            tried = scenario(work, "batch lane", recordings, own, trim=False, batch=True, timeout=240)
            ledger_batch = sum(1 for row in tried["ledger"] if row[7])
            print(f"batch lane: {sum(p['state'] == 'done' for p in tried['prompts'])}/{len(own)} done, "
                  f"{tried['generate_calls']} generate calls, {tried['batches']} batches, {ledger_batch} ledger rows "
                  f"marked batch, {tried['wall_s']:.0f} s", flush=True)
            if tried["finished"] and tried["batches"] and ledger_batch == len(own):
                batch_measured = tried
            else:
                batch_note = (f"ask --batch tried: {sum(p['state'] == 'done' for p in tried['prompts'])}/{len(own)} "
                              f"done, {tried['batches']} batch jobs seen by the emulator, {ledger_batch} ledger rows "
                              "marked batch: not working yet")
            print(f"batch lane (measured try): {batch_note or 'measured'}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    baseline = totals(base)
    table = []
    summary: dict[str, float] = {}
    keys = ["baseline_usd", "trimmed_usd", "cached_usd", "shared_no_cache_usd", "trimmed_cached_usd"]
    for key, (name, result) in zip(keys, runs, strict=True):
        t = totals(result)
        table.append([name, f"{t['done']}/{t['prompts']}", t["prompt"], t["audio"], t["cached"], t["output"],
                      f"{t['usd']:.6f}", f"{t['usd'] / baseline['usd']:.3f}" if baseline["usd"] else "-",
                      "measured"])
        summary[key] = float(t["usd"])
    if batch_measured is not None:
        t = totals(batch_measured)
        table.append(["batch lane: ask --batch, own recordings", f"{t['done']}/{t['prompts']}", t["prompt"],
                      t["audio"], t["cached"], t["output"], f"{t['usd']:.6f}",
                      f"{t['usd'] / baseline['usd']:.3f}", "measured"])
    else:
        t = batch_computed(base)
        table.append(["batch lane: baseline repriced at the batch discount", f"{t['done']}/{t['prompts']}",
                      t["prompt"], t["audio"], t["cached"], t["output"], f"{t['usd']:.6f}",
                      f"{t['usd'] / baseline['usd']:.3f}" if baseline["usd"] else "-",
                      f"COMPUTED (discount {t['discount']})"])
    summary["batch_usd"] = float(t["usd"])
    print_table("the same 10 prompts (gemini-2.5-flash): tokens and USD from the daemon's ledger "
                f"({runs[0][1]['cost_source']})",
                ["scenario", "prompts", "prompt tokens", "audio tokens", "cached tokens", "output tokens", "USD",
                 "ratio vs baseline", "how"], table)
    if batch_measured is None:
        print(f"\nbatch lane: COMPUTED, not measured — {batch_note}. The row is the baseline's ledger rows priced "
              "by daemon.prompts.pricing.cost(batch=True).")
    per_prompt = []
    for name, result in runs + ([("batch lane", batch_measured)] if batch_measured is not None else []):
        for (kind, index), p in zip(result["plan"], result["prompts"], strict=False):
            per_prompt.append([name.split(":")[0], p["id"], f"{kind} of recording {index + 1}", p["audio"], p["cached"], p["output"],
                               p["trimmed_s"], f"{p['usd']:.6f}" if p["usd"] is not None else "-"])
    print_table("per prompt", ["scenario", "prompt", "kind", "audio tokens", "cached tokens", "output tokens",
                               "trimmed s", "USD"], per_prompt)
    trim = totals(runs[1][1])
    cached = totals(runs[2][1])
    print(f"\nsummary: 10 prompts cost ${baseline['usd']:.4f} untrimmed on separate recordings; trimming "
          f"x{trim['usd'] / baseline['usd']:.2f}, implicit cache on shared audio x{cached['usd'] / baseline['usd']:.2f}, "
          f"batch x{float(t['usd']) / float(baseline['usd']):.2f} "
          f"({'measured' if batch_measured is not None else 'computed'})", flush=True)
    return summary


if __name__ == "__main__":
    main()
