"""Fleet mode: three daemons, one PostgreSQL, one emulator on this machine, sharing one small storage quota and
one requests-per-minute limit. Real processes, killed with SIGKILL or cut off from the database by a proxy."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from sqlalchemy import create_engine, text  # noqa: E402

from tests.emulator import Emulator, Fault  # noqa: E402
from tests.harness import API_KEY, DaemonProcess, wait_until  # noqa: E402
from tests.media import make_tone  # noqa: E402
from tests.netproxy import TcpProxy  # noqa: E402
from tests.pg import PostgresServer  # noqa: E402

pytestmark = pytest.mark.slow

NODES = ("room-a", "room-b", "server")
RPM = 6


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emulator]:
    with Emulator(api_key=API_KEY, data_dir=tmp_path / "emulator", processing_polls=1) as emulator:
        yield emulator


def node(tmp_path: Path, name: str, url: str, emu: Emulator, **config: Any) -> DaemonProcess:
    """A daemon of the fleet: its own drop folder and state folder, the shared database."""
    gemini = {"storage_limit_bytes": 400_000, "storage_headroom_bytes": 0, **config.pop("gemini", {})}
    prompts = {"requests_per_minute": RPM, **config.pop("prompts", {})}
    service = {"node_name": name, "lease_seconds": 6.0, **config.pop("service", {})}
    return DaemonProcess(tmp_path / name, base_url=emu.base_url, database_url=url, gemini=gemini,
                         prompts=prompts, service=service, **config)


def query(url: str, sql: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql)).all())
    finally:
        engine.dispose()


def states(url: str) -> Counter[str]:
    return Counter(state for (state,) in query(url, "SELECT state FROM recordings"))


def prompt_states(url: str) -> Counter[str]:
    return Counter(state for (state,) in query(url, "SELECT state FROM prompts"))


def wait_for_answers(url: str, count: int, timeout: float, daemons: list[DaemonProcess]) -> None:
    """Until `count` prompts have succeeded; on a timeout, what the database and the nodes' logs say."""
    try:
        wait_until(lambda: prompt_states(url)["done"] == count, timeout, 0.5, message=f"{count} answers")
    except AssertionError:
        rows = query(url, "SELECT id, node, state, error, source_path FROM recordings ORDER BY id")
        prompts = query(url, "SELECT id, state, error, claimed_by FROM prompts ORDER BY id")
        logs = "\n".join(f"--- {d.folder.name}\n{d.log()[-5000:]}" for d in daemons)
        raise AssertionError(f"recordings {rows}\nprompts {prompts}\n{logs}") from None


def stop_all(daemons: list[DaemonProcess]) -> None:
    for daemon in daemons:
        if daemon.process and not daemon.exited():
            daemon.stop()


def test_three_nodes_share_one_quota_and_one_rate_limit(tmp_path: Path, postgres_url: str, emu: Emulator) -> None:
    """Twelve recordings of ~40 kB each from three nodes into a 400 kB project: uploaded exactly once each,
    the emulator never holds more than the limit, and no minute of the request log has more generate
    calls than the fleet's limit, though each node would allow that many on its own."""
    daemons = [node(tmp_path, name, postgres_url, emu, watch=[{"path": str(tmp_path / name / "inbox"),
                                                                "prompts": ["transcribe"]}])
               for name in NODES]
    try:
        for daemon in daemons:
            daemon.start()
        for index, daemon in enumerate(daemons):
            for n in range(4):
                make_tone(daemon.inbox / f"talk-{index}-{n}.wav", seconds=20.0 + index + n / 4)  # distinct content
        wait_for_answers(postgres_url, 12, 240, daemons)
        assert emu.stats.high_water_bytes <= 400_000
        uploaded = Counter(f.display_name for f in emu.all_files)
        assert len(uploaded) == 12
        assert max(uploaded.values()) >= 1
        # A second copy of one recording is allowed only for a re-upload after eviction; never two at once.
        live = Counter(f.display_name for f in emu.files)
        assert all(count == 1 for count in live.values()), live
        assert emu.requests_in_window(60) <= RPM
        # Conversion stays home: each recording was converted by the node that owns its folder.
        homes = query(postgres_url, "SELECT node, source_path FROM recordings")
        assert all(f"/{home}/inbox/" in path for home, path in homes), homes
        # One status for the whole fleet, from any node.
        report = daemons[1].cli("status", "--json")
        assert sorted(n["name"] for n in report["nodes"]) == sorted(NODES)
        assert all(n["alive"] for n in report["nodes"])
        assert report["recordings"]["active"] + report["recordings"]["expired"] == 12
        assert {item["node"] for item in daemons[2].files()} == set(NODES)
        prompts = daemons[0].cli("prompts", "--json")
        assert len(prompts) == 12 and {p["state"] for p in prompts} == {"done"}
    finally:
        stop_all(daemons)


def test_a_node_killed_mid_upload_and_mid_prompt_is_taken_over(tmp_path: Path, postgres_url: str,
                                                               emu: Emulator) -> None:
    """kill -9 of the node holding an upload and a prompt (both stuck on the emulator's hold): another node
    finishes both once the lease runs out; one remote copy, one result."""
    emu.add_fault(Fault(route="upload_chunk", kind="hold", times=1, timeout=60))
    first = node(tmp_path, "room-a", postgres_url, emu, watch=[{"path": str(tmp_path / "room-a" / "inbox"),
                                                                 "prompts": ["transcribe"]}])
    second = node(tmp_path, "server", postgres_url, emu)
    try:
        first.start()
        make_tone(first.inbox / "standup.wav", seconds=20.0)
        wait_until(lambda: emu.held_requests == 1, 60, message="the upload to hang")
        second.start()
        first.kill()
        emu.release_holds()  # the killed node's connection is gone; nothing more arrives from it
        wait_for_answers(postgres_url, 1, 120, [first, second])
        assert len(emu.files) == 1, [f.display_name for f in emu.files]
        assert len(emu.generate_requests) == 1
        (claimed_by,) = query(postgres_url, "SELECT claimed_by FROM prompts")[0]
        assert claimed_by is None
        history = second.cli("prompts", "--json")[0]
        assert history["state"] == "done"
    finally:
        stop_all([first, second])


def test_a_prompt_whose_node_dies_reruns_once_elsewhere(tmp_path: Path, postgres_url: str, emu: Emulator) -> None:
    emu.add_fault(Fault(route="generate", kind="hold", times=1, timeout=60))
    first = node(tmp_path, "room-a", postgres_url, emu, watch=[{"path": str(tmp_path / "room-a" / "inbox"),
                                                                 "prompts": ["transcribe"]}])
    second = node(tmp_path, "server", postgres_url, emu)
    try:
        first.start()
        second.start()
        make_tone(first.inbox / "standup.wav", seconds=20.0)
        wait_until(lambda: emu.held_requests == 1, 60, message="the prompt to hang")
        holder = query(postgres_url, "SELECT claimed_by FROM prompts")[0][0]
        victim, survivor = (first, second) if holder.startswith("room-a") else (second, first)
        victim.kill()
        emu.release_holds()
        wait_for_answers(postgres_url, 1, 120, [first, second])
        assert len(emu.generate_requests) == 2  # the killed node's answer was never stored: asked again, once
        results = list((survivor.folder / "results").rglob("*.md")) + list((victim.folder / "results").rglob("*.md"))
        assert len(results) == 1
        assert not survivor.exited()
    finally:
        stop_all([first, second])


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_away_for_30_seconds_stops_no_daemon(tmp_path: Path, postgres_server: PostgresServer,
                                                      postgres_url: str, emu: Emulator, mode: str) -> None:
    daemons = [node(tmp_path, name, postgres_url, emu, watch=[{"path": str(tmp_path / name / "inbox"),
                                                                "prompts": ["transcribe"]}])
               for name in NODES]
    try:
        for daemon in daemons:
            daemon.start()
        for index, daemon in enumerate(daemons):
            make_tone(daemon.inbox / f"before-{index}.wav", seconds=10.0 + index)
        wait_until(lambda: sum(states(postgres_url).values()) == 3, 60, message="three recordings known")
        postgres_server.stop(mode)
        for index, daemon in enumerate(daemons):  # recordings arrive while the database is away
            make_tone(daemon.inbox / f"during-{index}.wav", seconds=14.0 + index)
        time.sleep(30)
        assert not any(daemon.exited() for daemon in daemons), [d.log()[-3000:] for d in daemons if d.exited()]
        postgres_server.start()
        wait_for_answers(postgres_url, 6, 180, daemons)
        assert not any(daemon.exited() for daemon in daemons)
        assert len({f.display_name for f in emu.all_files}) == 6
        assert len(emu.all_files) == 6  # no claim stolen: no recording uploaded twice
        assert len(emu.generate_requests) == 6
    finally:
        stop_all(daemons)


def test_a_node_cut_off_from_the_database_stops_calling_gemini(tmp_path: Path, postgres_server: PostgresServer,
                                                                postgres_url: str, emu: Emulator) -> None:
    """The proxy between room-a and PostgreSQL stops forwarding (no FIN, no RST): room-a stops starting Gemini
    calls, the server node takes its prompt over, and room-a's late write (its answer) is refused."""
    port = int(postgres_url.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = TcpProxy("127.0.0.1", port)
    proxy.start()
    cut_url = postgres_url.replace(f":{port}/", f":{proxy.port}/") + "?connect_timeout=3"
    emu.add_fault(Fault(route="generate", kind="hold", times=1, timeout=60))
    first = node(tmp_path, "room-a", cut_url, emu, watch=[{"path": str(tmp_path / "room-a" / "inbox"),
                                                           "prompts": ["transcribe"]}])
    second = node(tmp_path, "server", postgres_url, emu)
    try:
        first.start()
        make_tone(first.inbox / "standup.wav", seconds=10.0)
        wait_until(lambda: emu.held_requests == 1, 60, message="room-a's prompt to hang")
        second.start()
        proxy.partition()
        cut_at = time.time()
        wait_until(lambda: prompt_states(postgres_url)["done"] == 1, 120, 0.5,
                   message="the server node to take the prompt over")
        emu.release_holds()  # room-a gets its (late) answer now, and cannot store it
        time.sleep(3)
        proxy.heal()  # then the database is back: its write is refused, the server's answer stands
        wait_until(lambda: "taken over" in first.log(), 60, message="room-a to find its claim taken over")
        late = [r for r in emu.stats.requests if r.route == "generate" and r.time > cut_at]
        assert len(late) == 1, (late, first.log()[-3000:], second.log()[-3000:])  # room-a started none while cut off
        (answers,) = query(postgres_url, "SELECT count(*) FROM prompts WHERE state = 'done'")[0]
        assert answers == 1
        assert not first.exited()
    finally:
        proxy.heal()
        try:
            stop_all([first, second])
        finally:
            proxy.stop()


def test_a_recorder_without_a_key_leaves_uploads_and_prompts_to_a_node_with_one(
        tmp_path: Path, postgres_url: str, emu: Emulator) -> None:
    """A meeting-room recorder holds no API key: it converts its recordings, and the server (which has the key
    and no drop folder of its own) notices the work another node queued, uploads it, runs the prompt asked on
    the recorder, and writes the result files."""
    recorder = DaemonProcess(tmp_path / "recorder", base_url=None, api_key=None, database_url=postgres_url,
                             service={"node_name": "recorder", "lease_seconds": 6.0})
    server = node(tmp_path, "server", postgres_url, emu)
    try:
        recorder.start()
        server.start()
        make_tone(recorder.inbox / "standup.wav", seconds=6.0)
        wait_until(lambda: states(postgres_url)["active"] == 1, 60, 0.5, message="the server uploads it")
        [item] = recorder.files()
        assert item["node"] == "recorder"
        asked = recorder.cli("ask", str(item["id"]), "--template", "summarize", "--json")
        wait_for_answers(postgres_url, 1, 60, [recorder, server])
        assert query(postgres_url, f"SELECT claimed_by FROM prompts WHERE id = {asked['id']}") == [(None,)]
        assert [record.model for record in emu.generate_requests] == ["gemini-2.5-flash"]
        [done] = recorder.cli("prompts", "--json")
        assert done["state"] == "done" and Path(done["result_path"]).is_file()
        assert "/server/results/" in done["result_path"]  # written by the node that ran it
    finally:
        stop_all([recorder, server])
