"""SQLite-era agents: every row shown as `<key>.json`, read-only, fresh, never written."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard

from sessionfs import entry as entry_rules
from sessionfs import sources, sqlite_view
from sessionfs.errors import SessionFSError
from sessionfs.keys import key_to_display
from sessionfs.migrate import migrate_source
from sessionfs.sqlite_view import SqliteView
from tests.helpers import raises_errno
from tests.mounting import Mount, mounted, sessionfs, wait_for
from tests.sqlite_state import build_sqlite_state, database_of, events_of, put_session

SHARED_FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/openclaw-sqlite-state"
SESSIONS: dict[str, dict[str, dict[str, object]]] = {
    "main": {
        "agent:main:main": {"sessionId": "s-main", "updatedAt": 1_700_000_000_000, "x": "ü"},
        "agent:main:signal:group:QUJD": {"sessionId": "s-sig", "updatedAt": 1_700_000_000_001},
        "cron:job": {"sessionId": "s-cron", "updatedAt": 1_700_000_000_002},
    },
    "work": {"agent:work:main": {"sessionId": "s-work", "updatedAt": 1_700_000_000_003}},
}


@pytest.fixture
def sqlite_state(tmp_path: Path) -> Path:
    state = tmp_path / "sqlite-state"
    build_sqlite_state(state, SESSIONS)
    return state


def digest_tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_the_view_reads_every_row(sqlite_state: Path) -> None:
    view = SqliteView(database_of(sqlite_state, "main"))
    assert sorted(view.keys()) == sorted(SESSIONS["main"])
    for key, entry in SESSIONS["main"].items():
        snap = view.read(key)
        assert orjson.loads(snap.data) == entry
        assert snap.data == entry_rules.dumps(entry)  # as every read-only view shows entries
        assert snap.stat.st_size == len(snap.data)
    view.close()


def test_an_unknown_schema_shows_nothing_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build_sqlite_state(tmp_path / "s", {"main": SESSIONS["main"]}, schema=99)
    view = SqliteView(database_of(tmp_path / "s", "main"))
    assert view.keys() == []
    assert view.problem is not None
    assert "schema 99" in view.problem
    assert "schema 99" in caplog.text


def test_migrate_and_maintain_never_touch_a_sqlite_era_agent(sqlite_state: Path) -> None:
    sessions = sqlite_state / "agents/main/sessions"
    sessions.mkdir()
    (sessions / "sessions.json").write_bytes(b'{"agent:main:old": {"sessionId": "old"}}')
    before = digest_tree(sqlite_state)
    (report, _) = migrate_source(sources.resolve(sqlite_state), progress=None)
    assert "SQLite era" in "\n".join(report.lines())
    assert digest_tree(sqlite_state) == before
    assert not (sessions / "sessions.d").exists()


@pytest.fixture
def mnt(sqlite_state: Path, tmp_path: Path) -> Iterator[Mount]:
    with mounted(sqlite_state, tmp_path / "mnt") as mount:
        yield mount


@pytest.mark.fuse
def test_every_row_is_a_file_and_writes_are_refused(mnt: Mount, sqlite_state: Path) -> None:
    before = digest_tree(sqlite_state)
    agent = mnt.path / "main"
    names = sorted(n for n in os.listdir(agent) if n.endswith(".json"))
    assert names == sorted(key_to_display(k) for k in SESSIONS["main"])
    for key, entry in SESSIONS["main"].items():
        shown = agent / key_to_display(key)
        assert orjson.loads(shown.read_bytes()) == entry
        assert shown.stat().st_size == len(shown.read_bytes())
    main = agent / "agent:main:main.json"
    with raises_errno(errno.EROFS):
        main.write_bytes(b"{}")
    with raises_errno(errno.EROFS):
        (agent / "cron:new.json").write_bytes(b"{}")
    with raises_errno(errno.EROFS):
        main.unlink()
    with raises_errno(errno.EROFS):
        main.rename(agent / "cron:moved.json")
    assert digest_tree(sqlite_state) == before  # never written, no -shm created by us
    errors = (mnt.path / ".sessionfs" / "errors").read_text()
    assert "OpenClaw's own database, shown read-only" in errors


@pytest.mark.fuse
def test_commits_of_the_gateway_show_within_a_second(mnt: Mount, sqlite_state: Path) -> None:
    agent = mnt.path / "main"
    shown = agent / "agent:main:main.json"
    shown.read_bytes()
    db = sqlite3.connect(database_of(sqlite_state, "main"))  # the gateway, in WAL mode
    try:
        changed = {"sessionId": "s-main", "updatedAt": 1_800_000_000_000, "label": "new"}
        put_session(db, "agent:main:main", changed)
        put_session(db, "cron:added", {"sessionId": "s-added", "updatedAt": 5})
        db.execute("DELETE FROM session_nodes WHERE session_key = 'cron:job'")
        db.commit()
        committed = time.monotonic()
        wait_for(lambda: orjson.loads(shown.read_bytes()) == changed, timeout=1)
        wait_for(lambda: "cron:added.json" in os.listdir(agent), timeout=1)
        wait_for(lambda: "cron:job.json" not in os.listdir(agent), timeout=1)
        assert time.monotonic() - committed < 1
        # a change that leaves updated_at alone still shows: versions come from the bytes
        db.execute(
            "UPDATE session_nodes SET entry_json = ? WHERE session_key = 'agent:main:main'",
            (orjson.dumps({**changed, "label": "same time"}).decode(),),
        )
        db.commit()
        wait_for(lambda: b"same time" in shown.read_bytes(), timeout=1)
    finally:
        db.close()


@pytest.mark.fuse
@pytest.mark.skipif(
    not SHARED_FIXTURE.exists() and os.environ.get("SESSIONFS_REQUIRE_FUSE") != "1",
    reason="the shared SQLite fixture is not here",
)
def test_the_real_openclaw_fixture(tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(SHARED_FIXTURE, state)
    before = digest_tree(state)
    with mounted(state, tmp_path / "mnt") as mount:
        for agent in ("main", "work"):
            db = sqlite3.connect(f"file:{database_of(state, agent)}?immutable=1", uri=True)
            rows = dict(db.execute("SELECT session_key, entry_json FROM session_nodes"))
            db.close()
            shown = sorted(n for n in os.listdir(mount.path / agent) if n.endswith(".json"))
            assert shown == sorted(key_to_display(k) for k in rows)
            for key, entry_json in rows.items():
                data = (mount.path / agent / key_to_display(key)).read_bytes()
                assert orjson.loads(data) == orjson.loads(entry_json)
    assert digest_tree(state) == before


def expected_transcript(session_id: str) -> bytes:
    return b"".join(event.encode() + b"\n" for event in events_of(session_id))


def test_a_transcript_reads_at_any_offset(sqlite_state: Path) -> None:
    view = SqliteView(database_of(sqlite_state, "main"))
    whole = expected_transcript("s-main")
    stream = view.open_transcript("s-main")
    assert stream.complete_size() == len(whole)
    for offset in range(len(whole)):
        assert stream.read(offset, 7) == whole[offset : offset + 7]
    assert stream.read(len(whole), 10) == b""
    view.close()


@pytest.mark.fuse
def test_transcripts_are_the_events_byte_for_byte(mnt: Mount, sqlite_state: Path) -> None:
    agent = mnt.path / "main"
    for key, entry in SESSIONS["main"].items():
        shown = agent / (key_to_display(key) + "l")
        expected = expected_transcript(str(entry["sessionId"]))
        assert shown.read_bytes() == expected
        assert shown.stat().st_size == len(expected)
    with raises_errno(errno.EROFS):
        (agent / "agent:main:main.jsonl").write_bytes(b"{}\n")


@pytest.mark.fuse
def test_tail_f_of_a_sqlite_transcript(mnt: Mount, sqlite_state: Path) -> None:
    shown = mnt.path / "main" / "agent:main:main.jsonl"
    tail = subprocess.Popen(
        ["tail", "-f", "-s", "0.2", "-n", "0", str(shown)], stdout=subprocess.PIPE
    )
    try:
        time.sleep(0.5)
        assert tail.stdout is not None
        os.set_blocking(tail.stdout.fileno(), False)
        db = sqlite3.connect(database_of(sqlite_state, "main"))
        event = '{"type":"message","id":"late"}'
        db.execute(
            "INSERT INTO transcript_events (session_id, seq, event_json, created_at) "
            "VALUES ('s-main', 10, ?, 2)",
            (event,),
        )
        db.commit()
        db.close()
        got = b""

        def shows() -> bool:
            nonlocal got
            got += tail.stdout.read() or b""  # type: ignore[union-attr]
            return got == event.encode() + b"\n"

        wait_for(shows, timeout=1.0, what="the new event in tail -f")
    finally:
        tail.kill()
        tail.wait()


@pytest.mark.fuse
def test_an_unknown_schema_is_an_empty_directory_and_status_says_why(tmp_path: Path) -> None:
    state = tmp_path / "s"
    build_sqlite_state(state, {"main": SESSIONS["main"]}, schema=99)
    with mounted(state, tmp_path / "mnt", "-o", "check_every=1") as mount:
        assert os.listdir(mount.path / "main") == []
        wait_for(
            lambda: b"schema 99" in (mount.path / ".sessionfs" / "fsck").read_bytes(),
            what="the background check",
        )
        status = sessionfs("status", str(mount.path))
        assert "schema 99" in status.stdout
        assert "schema 99" in mount.log_text()


@pytest.mark.fuse
def test_a_listing_of_many_sessions_shows_every_transcript_and_follows_commits(
    tmp_path: Path,
) -> None:
    state = tmp_path / "many"
    many = {f"cron:job{i}": {"sessionId": f"s{i}", "updatedAt": i} for i in range(80)}
    build_sqlite_state(state, {"main": many})
    with mounted(state, tmp_path / "mnt") as mount:
        agent = mount.path / "main"
        sizes = {p.name: p.stat().st_size for p in agent.iterdir()}
        for key, entry in many.items():
            assert sizes[key + ".jsonl"] == len(expected_transcript(str(entry["sessionId"])))
        db = sqlite3.connect(database_of(state, "main"))
        db.execute(
            "INSERT INTO transcript_events (session_id, seq, event_json, created_at) "
            "VALUES ('s3', 9, '{}', 2)"
        )
        db.commit()
        db.close()
        grown = len(expected_transcript("s3")) + 3
        wait_for(
            lambda: {p.name: p.stat().st_size for p in agent.iterdir()}["cron:job3.jsonl"] == grown,
            timeout=1,
            what="the listing to show the grown transcript",
        )


@pytest.mark.fuse
def test_a_key_too_long_for_a_file_name_never_hides_the_others(tmp_path: Path) -> None:
    state = tmp_path / "long"
    long_key = "agent:main:" + "é" * 120
    build_sqlite_state(
        state, {"main": {**SESSIONS["main"], long_key: {"sessionId": "s-long", "updatedAt": 9}}}
    )
    with mounted(state, tmp_path / "mnt") as mount:
        names = os.listdir(mount.path / "main")
        assert "agent:main:main.json" in names
        assert not any(name.startswith("agent:main:é") for name in names)
        assert "has no entry file in the mount" in mount.log_text()


@pytest.mark.fuse
def test_removing_an_entry_says_why_it_is_refused(mnt: Mount) -> None:
    with raises_errno(errno.EROFS):
        (mnt.path / "main" / "agent:main:main.json").unlink()
    errors = (mnt.path / ".sessionfs" / "errors").read_text()
    assert "main/agent:main:main.json" in errors
    assert "OpenClaw's own database" in errors


def compress_events(db: sqlite3.Connection, session_id: str) -> None:
    """Store every event of *session_id* compressed, as the gateway does for large ones."""
    for seq, event in db.execute(
        "SELECT seq, event_json FROM transcript_events WHERE session_id = ?", (session_id,)
    ).fetchall():
        data = event.encode()
        db.execute(
            "UPDATE transcript_events SET event_json = NULL, event_zstd = ?, "
            "event_utf8_bytes = ?, navigation_json = '{}' WHERE session_id = ? AND seq = ?",
            (zstandard.ZstdCompressor().compress(data), len(data), session_id, seq),
        )


def test_compressed_events_read_as_the_lines_they_were(sqlite_state: Path) -> None:
    db = sqlite3.connect(database_of(sqlite_state, "main"))
    compress_events(db, "s-main")
    db.commit()
    db.close()
    view = SqliteView(database_of(sqlite_state, "main"))
    expected = expected_transcript("s-main")
    (found,) = view.transcript_stats(["agent:main:main"])
    assert found is not None
    assert found[2] == len(expected)  # sizes known without decompressing
    stream = view.open_transcript("s-main")
    assert stream.read(0, 1 << 20) == expected
    assert stream.read(5, 20) == expected[5:25]  # any offset
    view.close()


def test_a_corrupt_compressed_event_is_an_error_not_a_shifted_file(
    sqlite_state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = sqlite3.connect(database_of(sqlite_state, "main"))
    compress_events(db, "s-main")
    db.execute("UPDATE transcript_events SET event_zstd = x'28b52ffd' WHERE seq = 1")
    db.commit()
    db.close()
    view = SqliteView(database_of(sqlite_state, "main"))
    stream = view.open_transcript("s-main")
    first = expected_transcript("s-main").splitlines(True)[0]
    assert stream.read(0, len(first)) == first  # reads that never reach it are whole
    with pytest.raises(SessionFSError, match="does not decompress"):
        stream.read(0, 1 << 20)
    assert "does not decompress" in caplog.text  # said in the log, not only EIO
    view.close()


def test_a_frame_claiming_more_than_its_recorded_size_is_never_inflated(
    sqlite_state: Path,
) -> None:
    db = sqlite3.connect(database_of(sqlite_state, "main"))
    compress_events(db, "s-main")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))  # 64 MiB of zeros
    db.execute("UPDATE transcript_events SET event_zstd = ? WHERE seq = 0", (bomb,))
    db.commit()
    db.close()
    view = SqliteView(database_of(sqlite_state, "main"))
    with pytest.raises(SessionFSError, match="claims 67108864 bytes"):
        view.open_transcript("s-main").read(0, 100)
    view.close()


@pytest.mark.fuse
def test_nothing_is_created_in_a_sqlite_directory(mnt: Mount, sqlite_state: Path) -> None:
    with raises_errno(errno.EROFS):
        (mnt.path / "main" / ".agent:main:main.json.swp").write_bytes(b"vim")
    with raises_errno(errno.EROFS):
        (mnt.path / "main" / "notes.txt").write_bytes(b"x")
    assert "notes.txt" not in os.listdir(mnt.path / "main")


def test_a_gateway_closing_while_the_view_opens_leaves_no_shm(
    sqlite_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The -wal and -shm were there when looked at, gone when SQLite opens: no -shm made."""
    db = database_of(sqlite_state, "main")
    shm = db.with_name(db.name + "-shm")
    assert not shm.exists()  # the builder closed its connection: no gateway runs
    real_exists = Path.exists
    looks = iter([True, True])  # the view's first look finds both; the next ones, the truth

    def exists(path: Path) -> bool:
        if path.name.endswith(("-wal", "-shm")):
            return next(looks, real_exists(path))
        return real_exists(path)

    monkeypatch.setattr(Path, "exists", exists)
    view = SqliteView(db)
    assert sorted(view.keys()) == sorted(SESSIONS["main"])  # read as immutable instead
    view.close()
    assert not os.path.exists(shm)


def test_a_view_that_cannot_open_a_live_database_says_so(
    sqlite_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CANTOPEN with the gateway's -shm there (no descriptors left, say) is an error, not a
    silent fall back to reading the main file without its WAL."""
    db = database_of(sqlite_state, "main")
    gateway = sqlite3.connect(db)  # a live gateway: -wal and -shm exist
    gateway.execute("SELECT 1 FROM session_nodes").fetchall()
    real_connect = sqlite3.connect

    def cannot_open(database: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if "readonly_shm" in database:
            exc = sqlite3.OperationalError("unable to open database file")
            exc.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN
            raise exc
        connection: sqlite3.Connection = real_connect(database, *args, **kwargs)
        return connection

    monkeypatch.setattr(sqlite3, "connect", cannot_open)
    try:
        with pytest.raises(SessionFSError, match="unable to open"):
            SqliteView(db).keys()
    finally:
        gateway.close()


def test_a_failing_query_is_logged_once_not_only_answered_eio(
    sqlite_state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = sqlite3.connect(database_of(sqlite_state, "main"))
    db.execute("ALTER TABLE transcript_events DROP COLUMN navigation_json")
    db.execute("ALTER TABLE transcript_events DROP COLUMN event_utf8_bytes")  # not schema 23
    db.commit()
    db.close()
    view = SqliteView(database_of(sqlite_state, "main"))
    for _ in range(3):
        with pytest.raises(SessionFSError, match="event_utf8_bytes"):
            view.open_transcript("s-main")
    assert caplog.text.count("cannot read") == 1
    view.close()


@pytest.mark.fuse
def test_an_agents_directory_in_the_mount_is_a_source(mnt: Mount, sqlite_state: Path) -> None:
    """MOUNTPOINT/<agent> stands for that agent, whose sessions dir may not exist."""
    assert not (sqlite_state / "agents" / "main" / "sessions").exists()
    listed = sessionfs("ls", str(mnt.path / "main"), "--json")
    assert listed.returncode == 0, listed.stderr
    keys = {orjson.loads(line)["key"] for line in listed.stdout.splitlines()}
    assert keys == {
        n[: -len(".json")] for n in os.listdir(mnt.path / "main") if n.endswith(".json")
    }


def test_stat_many_holds_a_chunk_of_rows_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher's full look stats every key of a store: holding every row's JSON at
    once (~50 MB for 10,000 sessions) raised the daemon's resident memory for good."""
    count = 2 * sqlite_view.STAT_ROWS_AT_ONCE + 7
    sessions = {f"agent:main:s{i}": {"sessionId": f"s{i}", "updatedAt": i} for i in range(count)}
    build_sqlite_state(tmp_path / "s", {"main": sessions})
    view = SqliteView(database_of(tmp_path / "s", "main"))
    held: list[int] = []
    rows = view._rows

    def counting(keys: list[str]) -> list[tuple[str, str, int]]:
        found = rows(keys)
        held.append(len(found))
        return found

    monkeypatch.setattr(view, "_rows", counting)
    keys = [*sorted(sessions), "agent:main:missing"]
    stats = view.stat_many(keys)
    assert [st is not None for st in stats] == [True] * count + [False]
    assert max(held) <= sqlite_view.STAT_ROWS_AT_ONCE
    view.close()
