"""`sessionfs fsck`: every problem named on one line; repairs that never lose a readable entry."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from sessionfs import maintain, sources
from sessionfs.history import Actor
from sessionfs.locking import process_starttime
from sessionfs.migrate import migrate_source
from sessionfs.store import SessionStore
from tests.helpers import entry_bytes
from tests.mounting import REPO, mounted, sessionfs, wait_for

HOSTILE = {
    "cron%3Afifo.json": "a FIFO carries an entry's name; never opened",
    "cron%3Apasswd.json": "a symlink carries an entry's name; never opened",
    "cron%3Adir.json": "a directory carries an entry's name; never opened",
    "cron%3Anull.json": "a device carries an entry's name; never opened",
    "cron%3Abig.json": "over the size cap",
    "cron%3Anot-json.json": "not JSON; no gateway can read it",
    "cron%3Aarray.json": "not a JSON object; no gateway can read it",
    "cron:raw.json": "not the canonical file name of any key",
    "bad\\xff.json": "not the canonical file name of any key",
}
READABLE = {
    "cron%3Ano-updated.json": "invalid entry (a gateway still reads it): entry needs a numeric",
    "UPPER%3ACase.json": "the gateway never finds this key: the gateway looks this key up as",
    "agent%3Awork%3Ax.json": "this key belongs to agent 'work', not to 'main'",
}


def plant_hostile_files(entries: Path, *, big: int = 17 * 1024 * 1024) -> None:
    """Every kind of file a store must survive, under entry names."""
    os.mkfifo(entries / "cron%3Afifo.json")
    (entries / "cron%3Apasswd.json").symlink_to("/etc/passwd")
    (entries / "cron%3Adir.json").mkdir()
    os.mknod(entries / "cron%3Anull.json", 0o600 | 0o020000, os.makedev(1, 3))
    with open(entries / "cron%3Abig.json", "wb") as f:
        f.truncate(big)  # sparse: costs no disk, and must never be read whole
    (entries / "cron%3Anot-json.json").write_bytes(b"{half")
    (entries / "cron%3Aarray.json").write_bytes(b"[1, 2]")
    (entries / "cron:raw.json").write_bytes(entry_bytes("raw"))
    (entries / os.fsdecode(b"bad\xff.json")).write_bytes(entry_bytes("bad"))
    (entries / "cron%3Ano-updated.json").write_bytes(b'{"sessionId": "no-updated"}')
    (entries / "UPPER%3ACase.json").write_bytes(entry_bytes("upper"))
    (entries / "agent%3Awork%3Ax.json").write_bytes(entry_bytes("x"))


@pytest.fixture
def migrated(state_dir: Path) -> Path:
    migrate_source(sources.resolve(state_dir), progress=None)
    return state_dir


def run_fsck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessionfs", "fsck", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=60,
    )


def tree_of(path: Path) -> list[tuple[str, int, int]]:
    """Every name under *path* with its inode and size: what a rerun must not change."""
    found = []
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            found.append((os.path.relpath(os.path.join(top, name), path), st.st_ino, st.st_size))
    return sorted(found)


def test_a_clean_store_is_exit_0(migrated: Path) -> None:
    result = run_fsck(str(migrated / "agents/work/sessions"))
    assert result.returncode == 0, result.stdout
    assert "(directory era): no problem(s)" in result.stdout


def test_every_hostile_file_is_named_and_only_unreadable_ones_are_moved(migrated: Path) -> None:
    entries = migrated / "agents/main/sessions/sessions.d"
    plant_hostile_files(entries)
    (entries / ".sfs-0123456789abcdef.tmp").write_bytes(b"{")
    os.utime(entries / ".sfs-0123456789abcdef.tmp", (1, 1))
    (migrated / "agents/main/sessions/sessions.d.migrating").mkdir()
    result = run_fsck(str(migrated))
    assert result.returncode == 1
    for name, problem in {**HOSTILE, **READABLE}.items():
        assert any(name in line and problem in line for line in result.stdout.splitlines()), (
            name,
            result.stdout,
        )
    assert "stray temp file" in result.stdout
    assert "sessions.d.migrating: leftover staging" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    before = tree_of(migrated)
    assert run_fsck(str(migrated)).stdout == result.stdout  # a check changes nothing
    assert tree_of(migrated) == before

    repaired = run_fsck("--repair", str(migrated))
    assert repaired.returncode == 1
    (quarantine,) = (entries / ".quarantine").iterdir()
    moved = sorted(os.fsencode(p.name) for p in quarantine.iterdir())
    assert moved == sorted(os.fsencode(name.replace("\\xff", "\udcff")) for name in HOSTILE)
    assert (quarantine / "cron%3Apasswd.json").is_symlink()  # moved, never followed
    for name in READABLE:
        assert (entries / name).exists()  # a gateway reads these: reported, never moved
    assert not (entries / ".sfs-0123456789abcdef.tmp").exists()
    assert not (migrated / "agents/main/sessions/sessions.d.migrating").exists()

    after = tree_of(migrated)
    again = run_fsck("--repair", str(migrated))
    assert tree_of(migrated) == after  # twice changes nothing the second time
    assert "repaired" not in again.stdout
    for problem in READABLE.values():
        assert problem in again.stdout


def test_an_interrupted_migration_is_completed(state_dir: Path) -> None:
    sessions = state_dir / "agents/work/sessions"
    crashed = subprocess.run(
        [sys.executable, "-m", "sessionfs", "migrate", str(sessions)],
        env={**os.environ, "SESSIONFS_MIGRATE_CRASH_AT": "live"},
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    assert crashed.returncode != 0
    assert (sessions / "sessions.json").exists()
    assert (sessions / "sessions.d").exists()
    result = run_fsck(str(sessions))
    assert "sessions.json: a migration was interrupted before its backup" in result.stdout
    repaired = run_fsck("--repair", str(sessions))
    assert "completed the interrupted migration" in repaired.stdout
    assert not (sessions / "sessions.json").exists()
    assert [p.name for p in sessions.glob("sessions.json.bak.*")]
    assert run_fsck(str(sessions)).returncode == 0


def test_a_stale_lock_is_removed(migrated: Path) -> None:
    sessions = migrated / "agents/work/sessions"
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = sessions / "sessions.json.lock"
    lock.write_bytes(orjson.dumps({"pid": dead.pid, "createdAt": "2026-01-01T00:00:00.000Z"}))
    assert "sessions.json.lock: stale lock" in run_fsck(str(migrated)).stdout
    assert "removed sessions.json.lock" in run_fsck("--repair", str(migrated)).stdout
    assert not lock.exists()


def test_a_sqlite_era_agent_is_never_touched(migrated: Path) -> None:
    database = migrated / "agents/work/agent/openclaw-agent.sqlite"
    database.parent.mkdir()
    sqlite3.connect(database).close()
    (migrated / "agents/work/sessions/sessions.d/cron%3Abroken.json").write_bytes(b"{")
    before = tree_of(migrated / "agents/work")
    result = run_fsck("--repair", str(migrated))
    assert "work (SQLite era): read-only, not checked" in result.stdout
    assert tree_of(migrated / "agents/work") == before


def test_exit_codes(tmp_path: Path, migrated: Path) -> None:
    assert run_fsck(str(tmp_path / "missing")).returncode == 2
    assert run_fsck("--bogus").returncode == 2
    (migrated / "agents/main/sessions/sessions.d/cron%3Ax.json").write_bytes(b"{")
    assert run_fsck(str(migrated)).returncode == 1


def test_entries_both_in_sessions_d_and_a_live_sessions_json(migrated: Path) -> None:
    sessions = migrated / "agents/work/sessions"
    (sessions / "sessions.json").write_bytes(
        orjson.dumps({"agent:work:main": {"sessionId": "new", "updatedAt": 5}})
    )
    result = run_fsck(str(migrated))
    assert "entries exist both in sessions.d/ and in this live sessions.json" in result.stdout
    assert result.returncode == 1


@pytest.mark.fuse
def test_repair_refuses_a_mounted_store(migrated: Path, tmp_path: Path) -> None:
    with mounted(migrated, tmp_path / "mnt") as mount:
        refused = run_fsck("--repair", str(migrated / "agents/main/sessions"))
        assert refused.returncode == 3
        assert f"is mounted at {mount.path}" in refused.stderr
        assert run_fsck(str(migrated)).returncode in (0, 1)  # a check only reads: allowed
    assert sessionfs("fsck", "--repair", str(migrated)).returncode in (0, 1)


@pytest.mark.fuse
def test_status_shows_what_the_last_background_check_found(migrated: Path, tmp_path: Path) -> None:
    (migrated / "agents/main/sessions/sessions.d/cron%3Ahalf.json").write_bytes(b"{half")
    with mounted(migrated, tmp_path / "mnt", "-o", "check_every=1") as mount:
        control = mount.path / ".sessionfs" / "fsck"
        wait_for(lambda: b"last background check" in control.read_bytes(), what="the check")
        status = sessionfs("status", str(mount.path))
        assert status.returncode == 0, status.stderr
        assert f"problem(s) (details: sessionfs fsck {migrated})" in status.stdout
        assert "cron%3Ahalf.json: not JSON; no gateway can read it" in status.stdout
        assert "background check:" in mount.log_text()


def test_what_a_lenient_reader_reads_is_never_moved(migrated: Path) -> None:
    entries = migrated / "agents/main/sessions/sessions.d"
    latin = b'{"sessionId": "x", "label": "caf\xe9", "updatedAt": 1}'
    (entries / "cron%3Alatin.json").write_bytes(latin)
    (entries / "cron%3Ahuge.json").write_bytes(b'{"sessionId": "y", "n": 1e400, "updatedAt": 1}')
    result = run_fsck("--repair", str(migrated))
    assert "cron%3Alatin.json: not strict JSON (a gateway still reads it)" in result.stdout
    assert "cron%3Ahuge.json: not strict JSON (a gateway still reads it)" in result.stdout
    assert (entries / "cron%3Alatin.json").read_bytes() == latin
    assert (entries / "cron%3Ahuge.json").exists()


def test_a_symlinked_quarantine_is_never_followed(migrated: Path, tmp_path: Path) -> None:
    entries = migrated / "agents/main/sessions/sessions.d"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (entries / ".quarantine").symlink_to(elsewhere)
    (entries / "cron%3Ahalf.json").write_bytes(b"{half")
    result = run_fsck("--repair", str(migrated))
    assert result.returncode == 3
    assert ".quarantine is not a directory" in result.stdout
    assert list(elsewhere.iterdir()) == []
    assert (entries / "cron%3Ahalf.json").exists()


def test_staging_of_a_running_migration_is_left_alone(migrated: Path) -> None:
    sessions = migrated / "agents/work/sessions"
    (sessions / "sessions.d.migrating").mkdir()
    lock = sessions / "sessions.json.lock"
    start = process_starttime(os.getpid())
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    lock.write_bytes(orjson.dumps({"pid": os.getpid(), "createdAt": now, "starttime": start}))
    result = run_fsck("--repair", str(sessions))
    assert "staging of a migration in progress; left alone" in result.stdout
    assert (sessions / "sessions.d.migrating").exists()


@pytest.mark.fuse
def test_repair_refuses_a_mounted_store_reached_through_a_symlink(
    migrated: Path, tmp_path: Path
) -> None:
    link = tmp_path / "link"
    link.symlink_to(migrated)
    with mounted(migrated, tmp_path / "mnt") as mount:
        refused = run_fsck("--repair", str(link))
        assert refused.returncode == 3
        assert f"is mounted at {mount.path}" in refused.stderr


ME = Actor.this_process("pytest")


def test_kept_versions_and_the_audit_stay_intact(migrated: Path) -> None:
    """fsck (with --repair), maintain and a migration into the store leave ``.history``
    as it was: it is sessionfs's own, never a problem, never quarantined."""
    sessions = migrated / "agents/work/sessions"
    with SessionStore(sessions / "sessions.d") as store:
        key = sorted(store.keys())[0]
        store.write(key, store.read(key).data.replace(b"{", b'{"label": "x", ', 1), actor=ME)
    history = sessions / "sessions.d" / ".history"
    before = tree_of(history)
    assert any(name.endswith("audit.jsonl") for name, _, _ in before)
    assert run_fsck(str(sessions)).returncode == 0
    assert run_fsck("--repair", str(sessions)).returncode == 0
    (sessions / "sessions.json").write_bytes(
        b'{"agent:work:new": {"sessionId": "n", "updatedAt": 1}}'
    )
    migrate_source(sources.resolve(sessions), progress=None)
    maintain.maintain_source(sources.resolve(sessions), maintain.Policy(), maintain.Mode.ENFORCE)
    after = tree_of(history)
    versions = [entry for entry in before if not entry[0].startswith("audit")]
    assert [entry for entry in after if entry in versions] == versions
    audit = (history / "audit.jsonl").read_bytes()
    assert orjson.loads(audit.splitlines()[0])["program"] == "pytest"  # appended to, only


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_repair_by_root_leaves_the_quarantine_to_the_stores_owner(migrated: Path) -> None:
    entries = migrated / "agents/main/sessions/sessions.d"
    (entries / "cron%3Ahalf.json").write_bytes(b"{half")
    for path in (entries, *entries.rglob("*")):
        os.chown(path, 1000, 1000, follow_symlinks=False)
    run_fsck("--repair", str(migrated))
    (quarantine,) = (entries / ".quarantine").iterdir()
    for path in (entries / ".quarantine", quarantine, quarantine / "cron%3Ahalf.json"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (1000, 1000), path


def test_a_symlink_where_a_store_would_be_is_a_finding(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sessions_dir = tmp_path / "sessions"
    sessions_dir.mkdir()
    (sessions_dir / "sessions.d").symlink_to(elsewhere)
    result = run_fsck(str(sessions_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sessions.d: is a symlink; never followed" in result.stdout
