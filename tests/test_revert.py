"""`sessionfs migrate --revert`: a JSON-era gateway gets back every session, whatever wrote it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from sessionfs import sources
from sessionfs.migrate import MIGRATED_FROM, Outcome, migrate_source
from sessionfs.revert import REVERTED_PREFIX, migration_backup, revert_source, unread_migrations
from sessionfs.store import SessionStore
from tests.helpers import entry, entry_bytes
from tests.mounting import mounted, sessionfs, wait_for
from tests.sqlite_state import build_sqlite_state

REPO = Path(__file__).resolve().parents[1]


def legacy_store(sessions_dir: Path, store: dict[str, Any]) -> None:
    sessions_dir.mkdir(parents=True, exist_ok=True)
    (sessions_dir / "sessions.json").write_bytes(orjson.dumps(store, option=orjson.OPT_INDENT_2))


def reverted(sessions_dir: Path) -> dict[str, Any]:
    data = (sessions_dir / "sessions.json").read_bytes()
    assert data == orjson.dumps(orjson.loads(data), option=orjson.OPT_INDENT_2)  # as OpenClaw
    result: dict[str, Any] = orjson.loads(data)
    return result


def kept_dirs(sessions_dir: Path) -> list[Path]:
    return sorted(sessions_dir.glob(f"{REVERTED_PREFIX}*"))


ORIGINAL = {
    "agent:main:main": entry("s-main", 10),
    "cron:a": entry("s-a", 20),
    "": entry("s-empty", 30),  # no file can be named after it: left in the backup
    "cron:odd": ["not", "an", "object"],  # left in the backup too
}


@pytest.fixture
def migrated(tmp_path: Path) -> Path:
    sessions_dir = tmp_path / "sessions"
    legacy_store(sessions_dir, ORIGINAL)
    reports = migrate_source(sources.resolve(sessions_dir), progress=None)
    assert reports[0].outcome is Outcome.MIGRATED
    assert not (sessions_dir / "sessions.json").exists()
    return sessions_dir


def test_revert_gives_back_every_entry_and_what_the_backup_kept(migrated: Path) -> None:
    with SessionStore(migrated / "sessions.d") as store:  # changes after the migration
        store.write("cron:a", entry_bytes("s-a", 25, label="edited"))
        store.write("cron:new", entry_bytes("s-new", 40))
        store.remove("agent:main:main")
        current = {key: orjson.loads(store.read(key).data) for key in sorted(store.keys())}
    reports = revert_source(sources.resolve(migrated))
    assert [r.outcome for r in reports] == [Outcome.REVERTED], reports[0].lines()
    expected = {**current, "": ORIGINAL[""], "cron:odd": ORIGINAL["cron:odd"]}
    assert reverted(migrated) == expected  # a removed session stays removed
    assert not (migrated / "sessions.d").exists()
    (kept,) = kept_dirs(migrated)
    with SessionStore(kept, create=False) as old:
        assert set(old.keys()) == set(current)
    assert "2 entries the migration had left in its backup" in "\n".join(reports[0].lines())


def test_revert_twice_changes_nothing(migrated: Path) -> None:
    revert_source(sources.resolve(migrated))
    before = {p.name: p.read_bytes() for p in migrated.iterdir() if p.is_file()}
    (report,) = revert_source(sources.resolve(migrated))
    assert report.outcome is Outcome.NOTHING_TO_DO
    assert {p.name: p.read_bytes() for p in migrated.iterdir() if p.is_file()} == before
    assert len(kept_dirs(migrated)) == 1


def test_a_sessions_json_the_gateway_wrote_is_merged_newest_first(migrated: Path) -> None:
    # a gateway that does not read sessions.d/ started a new store beside it
    legacy_store(
        migrated,
        {"cron:a": entry("s-a", 5, label="older"), "cron:gw": entry("s-gw", 50)},
    )
    with SessionStore(migrated / "sessions.d") as store:
        store.write("agent:main:main", entry_bytes("s-main", 60, label="newer here"))
    (report,) = revert_source(sources.resolve(migrated))
    result = reverted(migrated)
    assert result["cron:a"] == ORIGINAL["cron:a"]  # sessions.d/'s is newer (20 > 5)
    assert result["cron:gw"] == entry("s-gw", 50)  # only the gateway had it
    assert result["agent:main:main"]["label"] == "newer here"
    assert "1 entries from a sessions.json the gateway wrote" in "\n".join(report.lines())


def test_dry_run_changes_nothing(migrated: Path) -> None:
    before = sorted(p.name for p in migrated.iterdir())
    (report,) = revert_source(sources.resolve(migrated), dry_run=True)
    assert report.outcome is Outcome.PLANNED_REVERT
    assert "would revert 4 entries" in report.lines()[0]
    assert sorted(p.name for p in migrated.iterdir()) == before


def test_the_migration_backup_is_told_from_rotation_backups(migrated: Path) -> None:
    (ours,) = migrated.glob("sessions.json.bak.*")
    older = migrated / "sessions.json.bak.1000"  # an OpenClaw rotation long before
    older.write_bytes(orjson.dumps({"cron:ancient": entry("s-x", 1), "": entry("s-y", 1)}))
    agent = sources.resolve(migrated).stores()[0]
    assert migration_backup(agent) == ours  # named by the migration's marker
    (migrated / "sessions.d" / MIGRATED_FROM).unlink()  # migrated by an older sessionfs
    assert migration_backup(agent) == ours


def test_a_mounted_store_is_refused(migrated: Path, tmp_path: Path) -> None:
    with mounted(migrated, tmp_path / "mnt", "--no-migrate") as mount:
        (report,) = revert_source(sources.resolve(migrated))
        assert report.outcome is Outcome.FAILED
        assert str(mount.path) in report.reason
        assert (migrated / "sessions.d").is_dir()


def test_migrate_change_through_the_mount_revert(tmp_path: Path) -> None:
    sessions_dir = tmp_path / "sessions"
    legacy_store(sessions_dir, ORIGINAL)
    with mounted(sessions_dir, tmp_path / "mnt") as mount:  # migrates on mount
        (mount.path / "cron:a.json").write_bytes(entry_bytes("s-a", 99, label="via mount"))
        (mount.path / "agent:main:main.json").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "sessionfs", "migrate", "--revert", str(sessions_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reverted 3 entries to sessions.json" in result.stdout
    assert reverted(sessions_dir) == {
        "cron:a": entry("s-a", 99, label="via mount"),
        "": ORIGINAL[""],
        "cron:odd": ORIGINAL["cron:odd"],
    }


# --- crash safety -------------------------------------------------------------

REVERT_STEPS = ["revert-locked", "revert-written", "revert-moved"]


def _run_revert(sessions_dir: Path, crash_at: str | None = None) -> int:
    env = {**os.environ, "SESSIONFS_MIGRATE_CRASH_AT": crash_at or ""}
    return subprocess.run(
        [sys.executable, "-m", "sessionfs", "migrate", "--revert", str(sessions_dir)],
        env=env,
        cwd=REPO,
        capture_output=True,
        check=False,
    ).returncode


@pytest.mark.parametrize("step", REVERT_STEPS)
def test_sigkill_at_every_step_of_a_revert_then_rerun_completes(migrated: Path, step: str) -> None:
    legacy_store(migrated, {"cron:gw": entry("s-gw", 50)})  # both sides hold something
    with SessionStore(migrated / "sessions.d") as store:
        expected = {key: orjson.loads(store.read(key).data) for key in sorted(store.keys())}
    expected |= {"cron:gw": entry("s-gw", 50), "": ORIGINAL[""], "cron:odd": ORIGINAL["cron:odd"]}
    assert _run_revert(migrated, crash_at=step) == -signal.SIGKILL
    if (migrated / "sessions.d").exists():  # not moved yet: every entry is still there
        with SessionStore(migrated / "sessions.d") as store:
            assert len(list(store.keys())) == 2
    else:
        assert reverted(migrated) == expected
    assert _run_revert(migrated) == 0
    assert reverted(migrated) == expected
    assert not (migrated / "sessions.d").exists()
    assert len(kept_dirs(migrated)) == 1
    assert not list(migrated.glob("*.tmp"))


# --- a gateway that does not read sessions.d/ ----------------------------------


def test_a_new_sessions_json_beside_sessions_d_is_an_unread_migration(
    migrated: Path, tmp_path: Path
) -> None:
    source = sources.resolve(migrated)
    assert unread_migrations(source) == []
    legacy_store(migrated, {"cron:gw": entry("s-gw", 50)})  # the JSON-era gateway's next write
    (unread,) = unread_migrations(source)
    message = unread.message(migrated)
    assert "does not read sessions.d/" in message
    assert f"sessionfs migrate --revert {migrated}" in message
    assert "since the migration of" in message
    # a SQLite-era agent's sessions.json is OpenClaw's import input, not a sign of this
    build_sqlite_state(tmp_path / "state", {"main": {"cron:s": entry("s-s", 1)}})
    upgraded = tmp_path / "state" / "agents" / "main" / "sessions"
    upgraded.mkdir(exist_ok=True)
    SessionStore(upgraded / "sessions.d").close()
    legacy_store(upgraded, {"cron:s": entry("s-s", 1)})
    assert unread_migrations(sources.resolve(tmp_path / "state")) == []


def test_the_mount_and_status_say_so_loudly(migrated: Path, tmp_path: Path) -> None:
    with mounted(migrated, tmp_path / "mnt", "--no-migrate") as mount:
        legacy_store(migrated, {"cron:gw": entry("s-gw", 50)})
        wait_for(lambda: "a gateway wrote a new sessions.json" in mount.log_text(), timeout=10)
        assert " WARNING " in mount.log_text()
        status = sessionfs("status", str(mount.path))
        assert status.returncode == 0, status.stderr
        assert "WARNING: agent" in status.stdout
        assert f"sessionfs migrate --revert {migrated}" in status.stdout
    again = sessionfs("mount", "--no-migrate", str(migrated), str(tmp_path / "mnt"))
    try:
        assert again.returncode == 0, again.stderr
        assert "a gateway wrote a new sessions.json" in again.stderr  # on the terminal too
    finally:
        sessionfs("umount", str(tmp_path / "mnt"))
