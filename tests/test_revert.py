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

from sessionfs import migrate, sources
from sessionfs.cli import main as cli
from sessionfs.migrate import (
    MIGRATED_FROM,
    REVERT_DONE,
    Outcome,
    migrate_source,
)
from sessionfs.revert import (
    migration_backups,
    revert_command,
    revert_source,
    unread_migrations,
)
from sessionfs.sources import REVERTED_PREFIX
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
    # a gateway that kept writing sessions.json rotated it after the migration
    newer = migrated / f"sessions.json.bak.{int(ours.name.rsplit('.', 1)[1]) + 5000}"
    newer.write_bytes(orjson.dumps({"cron:rotated": entry("s-x", 1), "": entry("s-y", 99)}))
    agent = sources.resolve(migrated).stores()[0]
    assert migration_backups(agent) == [ours]  # named by the migration's marker
    revert_source(sources.resolve(migrated))
    assert reverted(migrated)[""] == ORIGINAL[""]  # the migration's, not the rotation's


def test_a_marker_that_is_a_fifo_or_names_another_file_is_not_followed(migrated: Path) -> None:
    agent = sources.resolve(migrated).stores()[0]
    marker = migrated / "sessions.d" / MIGRATED_FROM
    marker.write_text("../../etc/passwd\nsessions.json.bak.x\n")
    assert migration_backups(agent) == []
    marker.unlink()
    os.mkfifo(marker)  # would block a plain read forever
    (ours,) = migrated.glob("sessions.json.bak.*")
    assert migration_backups(agent) == [ours]  # the fallback: the newest backup


def test_a_second_migration_keeps_the_first_ones_backup_known(migrated: Path) -> None:
    legacy_store(migrated, {"cron:later": entry("s-l", 70)})  # a gateway's new store
    (report,) = migrate_source(sources.resolve(migrated), progress=None)
    assert report.outcome is Outcome.MIGRATED  # merged into the existing sessions.d/
    agent = sources.resolve(migrated).stores()[0]
    assert len(migration_backups(agent)) == 2
    revert_source(sources.resolve(migrated))
    result = reverted(migrated)
    assert result[""] == ORIGINAL[""]  # what the first migration had to leave behind
    assert result["cron:later"] == entry("s-l", 70)


def test_writes_into_the_moved_directory_and_by_the_gateway_meanwhile_are_taken(
    migrated: Path,
) -> None:
    def writers_meanwhile() -> None:
        (moved,) = [p for p in migrated.iterdir() if p.name.startswith(REVERTED_PREFIX)]
        with SessionStore(moved, create=False) as store:  # a writer with the old dir open
            store.write("cron:late", entry_bytes("s-late", 80))
        legacy_store(migrated, {"cron:gw": entry("s-gw", 90)})  # a gateway without the lock

    migrate.STEP_HOOKS["revert-moved"] = writers_meanwhile
    try:
        (report,) = revert_source(sources.resolve(migrated))
    finally:
        del migrate.STEP_HOOKS["revert-moved"]
    assert report.outcome is Outcome.REVERTED
    result = reverted(migrated)
    assert result["cron:late"] == entry("s-late", 80)
    assert result["cron:gw"] == entry("s-gw", 90)


def test_an_unreadable_entry_is_named_and_the_revert_is_not_called_clean(
    migrated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (migrated / "sessions.d" / "cron%3Abroken.json").write_bytes(b"{not json")
    assert cli(["migrate", "--revert", str(migrated)]) == 1
    out = capsys.readouterr().out
    assert "not reverted: 'cron:broken' could not be read" in out
    assert "cron:a" in reverted(migrated)  # everything else is back


def test_an_entry_with_a_lone_surrogate_is_reverted_as_node_writes_it(migrated: Path) -> None:
    with SessionStore(migrated / "sessions.d") as store:
        store.write(
            "cron:s",
            b'{"sessionId": "s-s", "updatedAt": 5, "text": "\\ud800"}',
            validate=False,
        )
    (report,) = revert_source(sources.resolve(migrated))
    assert report.outcome is Outcome.REVERTED, report.lines()
    assert b'"\\ud800"' in (migrated / "sessions.json").read_bytes()


def test_a_symlinked_sessions_json_is_not_followed(migrated: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(b"{}")
    (migrated / "sessions.json").symlink_to(elsewhere)
    (report,) = revert_source(sources.resolve(migrated))
    assert report.outcome is Outcome.FAILED
    assert "symlink" in report.reason
    assert elsewhere.read_bytes() == b"{}"
    assert (migrated / "sessions.d").is_dir()


def test_the_undo_command_of_a_sessions_json_source_names_its_directory(migrated: Path) -> None:
    assert revert_command(sources.resolve(migrated / "sessions.d")).endswith(
        str(migrated) + "/sessions.d"
    )
    legacy = migrated / "sessions.json"
    legacy.write_bytes(b"{}")
    assert revert_command(sources.resolve(legacy)) == f"sessionfs migrate --revert {migrated}"


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

REVERT_STEPS = ["revert-locked", "revert-moved", "revert-written"]


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
    # the gateway goes on writing before anyone runs the revert again
    gateway = {**orjson.loads((migrated / "sessions.json").read_bytes())}
    gateway["cron:gw2"] = entry("s-gw2", 60)
    legacy_store(migrated, gateway)
    expected["cron:gw2"] = entry("s-gw2", 60)
    assert _run_revert(migrated) == 0
    assert reverted(migrated) == expected
    assert not (migrated / "sessions.d").exists()
    (kept,) = kept_dirs(migrated)
    assert (kept / REVERT_DONE).exists()
    assert not list(migrated.glob("*.tmp"))
    assert _run_revert(migrated) == 0  # and then there is nothing left to do
    assert reverted(migrated) == expected


# --- a gateway that does not read sessions.d/ ----------------------------------


def test_a_new_sessions_json_beside_sessions_d_is_an_unread_migration(
    migrated: Path, tmp_path: Path
) -> None:
    source = sources.resolve(migrated)
    assert unread_migrations(source) == []
    legacy_store(migrated, {"cron:gw": entry("s-gw", 50)})  # the JSON-era gateway's next write
    (unread,) = unread_migrations(source)
    message = unread.message(source)
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


def test_an_unusable_sessions_json_stops_the_revert_before_anything_moves(migrated: Path) -> None:
    (migrated / "sessions.json").write_bytes(b"{ torn")
    (report,) = revert_source(sources.resolve(migrated))
    assert report.outcome is Outcome.FAILED
    assert "cannot be merged" in report.reason
    assert (migrated / "sessions.d").is_dir()
    assert kept_dirs(migrated) == []
    (migrated / "sessions.json").unlink()
    os.mkfifo(migrated / "sessions.json")  # would block a plain read forever
    (report,) = revert_source(sources.resolve(migrated))
    assert "not a regular file" in report.reason
    assert (migrated / "sessions.d").is_dir()


def test_a_second_cycle_does_not_bring_back_what_the_gateway_removed(migrated: Path) -> None:
    revert_source(sources.resolve(migrated))
    store = reverted(migrated)
    del store[""], store["cron:odd"]  # the gateway dropped them after the first revert
    legacy_store(migrated, store)
    migrate_source(sources.resolve(migrated), progress=None)
    revert_source(sources.resolve(migrated))
    result = reverted(migrated)
    assert "" not in result
    assert "cron:odd" not in result


def test_a_directory_restored_by_hand_is_reverted_again(migrated: Path) -> None:
    revert_source(sources.resolve(migrated))
    (kept,) = kept_dirs(migrated)
    kept.rename(migrated / "sessions.d")  # the user undid the revert by hand
    (migrated / "sessions.json").unlink()
    assert _run_revert(migrated, crash_at="revert-moved") == -signal.SIGKILL
    (report,) = revert_source(sources.resolve(migrated))
    assert report.outcome is Outcome.REVERTED, report.lines()
    assert "cron:a" in reverted(migrated)


def test_an_interrupted_revert_is_finished_before_anything_migrates_again(
    migrated: Path,
) -> None:
    legacy_store(migrated, {"cron:gw": entry("s-gw", 50)})
    assert _run_revert(migrated, crash_at="revert-moved") == -signal.SIGKILL
    (report,) = migrate_source(sources.resolve(migrated), progress=None)
    assert report.outcome is Outcome.FAILED
    assert "sessionfs migrate --revert" in report.reason
    assert not (migrated / "sessions.d").exists()  # the gateway's file was not migrated
    (report,) = revert_source(sources.resolve(migrated))
    assert report.outcome is Outcome.REVERTED
    assert {"cron:a", "cron:gw"} <= set(reverted(migrated))


def test_a_dry_run_counts_what_the_gateway_wrote(migrated: Path) -> None:
    legacy_store(migrated, {"cron:gw": entry("s-gw", 50)})
    (report,) = revert_source(sources.resolve(migrated), dry_run=True)
    assert "would revert 5 entries" in report.lines()[0]
    (report,) = revert_source(sources.resolve(migrated))
    assert "reverted 5 entries" in report.lines()[0]
