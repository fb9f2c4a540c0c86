"""Undo a migration: give a JSON-era gateway its ``sessions.json`` back, losing nothing.

No OpenClaw release reads ``sessions.d/``: a JSON-era gateway whose store was
migrated sees an empty store and starts a new ``sessions.json`` beside it, and
``openclaw doctor --session-sqlite import`` imports only ``sessions.json``.  For
one agent, a revert:

1. holds OpenClaw's ``sessions.json.lock`` (a JSON-era gateway waits);
2. reads every entry of ``sessions.d/``, a ``sessions.json`` the gateway wrote
   since the migration, and the entries the migration had to leave in its backup
   (keys no file can be named after, values that are not objects);
3. writes ``sessions.json`` as OpenClaw does (2-space indent, temp + fsync +
   rename), the newest ``updatedAt`` winning where two sides hold one key;
4. renames ``sessions.d/`` to ``sessions.d.reverted.<epoch-ms>`` (nothing is deleted);
5. reads the moved directory again, and writes ``sessions.json`` once more if a
   writer of ``sessions.d/`` changed an entry while this ran.

A crash before step 4 leaves ``sessions.d/`` in place and a ``sessions.json`` that
the next run merges with it again to the same result; after step 4 nothing is
left to do.  A second run finds no ``sessions.d/`` and changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from . import entry as entry_rules
from .errors import SessionFSError
from .locking import STORE_LOCK_TIMEOUT, openclaw_store_lock
from .migrate import (
    BACKUP_PREFIX,
    MIGRATED_FROM,
    AgentReport,
    Outcome,
    fsync_dir,
    migration_running,
    plan,
    read_legacy,
    recency,
    step,
)
from .sources import AgentStore, Era, Source
from .store import SessionStore, Version, rename_noreplace, write_file_atomically

REVERTED_PREFIX = "sessions.d.reverted."


@dataclass
class _Sides:
    """Everything that goes into the rebuilt ``sessions.json``, and where it came from."""

    merged: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Version] = field(default_factory=dict)  # sessions.d/ as read
    from_entries: int = 0
    from_gateway: list[str] = field(default_factory=list)
    from_backup: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def offer(self, key: str, value: object) -> bool:
        """Take *value* for *key* unless the one already taken is newer."""
        current = self.merged.get(key)
        if key in self.merged and recency(current) >= recency(value):
            return False
        self.merged[key] = value
        return True


def revert_store(
    agent: AgentStore, *, dry_run: bool = False, lock_timeout: float = STORE_LOCK_TIMEOUT
) -> AgentReport:
    """Revert one agent's migration; never raises for a store-level problem."""
    report = AgentReport(agent.label, Outcome.NOTHING_TO_DO)
    if not agent.has_entries():
        report.reason = "no sessions.d/ (never migrated, or already reverted)"
        return report
    from .daemon import mount_serving  # the daemon module is heavy; only needed here

    mountpoint = mount_serving(agent.sessions_dir)
    if mountpoint is not None:
        return _failed(
            report,
            f"mounted at {mountpoint}; unmount it first (sessionfs umount {mountpoint})",
        )
    try:
        if dry_run:
            sides = _read_sides(agent)
            _describe(report, sides)
            report.outcome = Outcome.PLANNED_REVERT
            report.backup = agent.sessions_dir / f"{REVERTED_PREFIX}<epoch-ms>"
            return report
        with openclaw_store_lock(agent.legacy, timeout=lock_timeout):
            step("revert-locked")
            return _revert_locked(agent, report)
    except (SessionFSError, OSError) as exc:
        return _failed(report, str(exc))


def _failed(report: AgentReport, reason: str) -> AgentReport:
    report.outcome, report.reason = Outcome.FAILED, reason
    return report


def _revert_locked(agent: AgentStore, report: AgentReport) -> AgentReport:
    sides = _read_sides(agent)
    _write_legacy(agent, sides.merged)
    step("revert-written")
    moved = agent.sessions_dir / f"{REVERTED_PREFIX}{int(time.time() * 1000)}"
    while moved.exists():
        moved = moved.with_name(f"{REVERTED_PREFIX}{int(moved.name.rsplit('.', 1)[1]) + 1}")
    rename_noreplace(agent.entries, moved)
    fsync_dir(agent.sessions_dir)
    step("revert-moved")
    late = _late_writes(moved, sides)
    if late:
        _write_legacy(agent, sides.merged)
        report.notes.append(
            f"{len(late)} entries written to sessions.d/ during the revert were taken too"
        )
    _describe(report, sides)
    report.outcome = Outcome.REVERTED
    report.backup = moved
    return report


def _read_sides(agent: AgentStore) -> _Sides:
    sides = _Sides()
    with SessionStore(agent.entries, create=False) as entries:
        for key in sorted(entries.keys()):
            try:
                snap = entries.read(key)
                value = entry_rules.loads(snap.data)
            except (SessionFSError, OSError, orjson.JSONDecodeError) as exc:
                sides.unreadable.append((key, str(exc)))
                continue
            sides.merged[key] = value
            sides.versions[key] = Version.of(snap.stat)
            sides.from_entries += 1
    if agent.has_legacy():  # written by a gateway that does not read sessions.d/
        for key, value in read_legacy(agent.legacy).items():
            if sides.offer(key, value):
                sides.from_gateway.append(key)
    backup = migration_backup(agent)
    if backup is not None:
        with contextlib.suppress(SessionFSError):
            left = read_legacy(backup)
            for key, _why in plan(left).skipped:
                if sides.offer(key, left[key]):
                    sides.from_backup.append(key)
    return sides


def _late_writes(moved: Path, sides: _Sides) -> list[str]:
    """Entries that changed in the moved directory since they were read."""
    late = []
    with SessionStore(moved, create=False) as entries:
        for key in sorted(entries.keys()):
            try:
                snap = entries.read(key)
                if sides.versions.get(key) == Version.of(snap.stat):
                    continue
                value = entry_rules.loads(snap.data)
            except (SessionFSError, OSError, orjson.JSONDecodeError):
                continue
            if sides.offer(key, value):
                late.append(key)
    return late


def migration_backup(agent: AgentStore) -> Path | None:
    """The ``sessions.json.bak.<epoch-ms>`` the migration of ``sessions.d/`` left, if any.

    OpenClaw's rotation backups share the name, so migration names its own in
    ``sessions.d/.migrated-from``; a store migrated without that marker (an older
    sessionfs, or a crash right after the backup) has the newest backup that is
    not older than the oldest entry of ``sessions.d/`` (staged just before it).
    """
    with contextlib.suppress(OSError, UnicodeDecodeError):
        name = (agent.entries / MIGRATED_FROM).read_text().strip()
        named = agent.sessions_dir / name
        if name.startswith(BACKUP_PREFIX) and "/" not in name and named.is_file():
            return named
    oldest_ms = None
    with contextlib.suppress(OSError), os.scandir(agent.entries) as listing:
        for dirent in listing:
            if dirent.is_file(follow_symlinks=False) and not dirent.name.startswith("."):
                mtime_ms = dirent.stat(follow_symlinks=False).st_mtime_ns // 1_000_000
                oldest_ms = mtime_ms if oldest_ms is None else min(oldest_ms, mtime_ms)
    found: tuple[int, Path] | None = None
    with os.scandir(agent.sessions_dir) as listing:
        for dirent in listing:
            stamp = dirent.name.removeprefix(BACKUP_PREFIX)
            if stamp == dirent.name or not stamp.isdigit():
                continue
            if not dirent.is_file(follow_symlinks=False):
                continue
            if oldest_ms is not None and int(stamp) < oldest_ms:
                continue
            if found is None or int(stamp) > found[0]:
                found = (int(stamp), Path(dirent.path))
    return None if found is None else found[1]


def _write_legacy(agent: AgentStore, merged: dict[str, Any]) -> None:
    """``sessions.json`` as OpenClaw writes it: ``JSON.stringify(store, null, 2)``, atomically."""
    data = orjson.dumps(merged, option=orjson.OPT_INDENT_2)
    write_file_atomically(agent.sessions_dir, agent.legacy.name, data)


def _describe(report: AgentReport, sides: _Sides) -> None:
    report.migrated = len(sides.merged)
    if sides.from_gateway:
        report.notes.append(
            f"{len(sides.from_gateway)} entries from a sessions.json the gateway wrote after "
            "the migration (the newest updatedAt of each key wins)"
        )
    if sides.from_backup:
        report.notes.append(
            f"{len(sides.from_backup)} entries the migration had left in its backup "
            f"({', '.join(repr(k) for k in sides.from_backup[:5])}"
            f"{', ...' if len(sides.from_backup) > 5 else ''})"
        )
    report.skipped += [
        (key, f"unreadable in sessions.d/ ({why}); it stays in the kept directory")
        for key, why in sides.unreadable
    ]


def revert_source(
    source: Source, *, dry_run: bool = False, lock_timeout: float = STORE_LOCK_TIMEOUT
) -> list[AgentReport]:
    """Revert every agent under *source* that has a ``sessions.d/``, each on its own."""
    return [
        revert_store(agent, dry_run=dry_run, lock_timeout=lock_timeout) for agent in source.stores()
    ]


@dataclass(frozen=True)
class UnreadMigration:
    """A ``sessions.json`` written beside ``sessions.d/``: its gateway does not read the latter."""

    agent: AgentStore
    written: float  # when the gateway last wrote it (epoch seconds)
    migrated: float | None  # when the migration made its backup, if known
    identity: tuple[int, int]  # the file written (warned about once per file)

    def message(self, source: Path) -> str:
        since = "" if self.migrated is None else f" since the migration of {_when(self.migrated)}"
        return (
            f"agent {self.agent.label}: a gateway wrote a new sessions.json beside sessions.d/ "
            f"(last at {_when(self.written)}): it does not read sessions.d/ and has not seen its "
            f"sessions{since}. Undo the migration (after unmounting): "
            f"sessionfs migrate --revert {source}"
        )


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def unread_migrations(source: Source) -> list[UnreadMigration]:
    """Every agent whose gateway writes ``sessions.json`` although it was migrated."""
    found = []
    for agent in source.stores():
        if agent.era() is not Era.DIRECTORY or not agent.has_legacy():
            continue  # (a SQLite agent's sessions.json is the gateway's import input)
        if migration_running(agent):
            continue  # mid-migration, sessions.json is still the input
        try:
            st = os.stat(agent.legacy, follow_symlinks=False)
        except OSError:
            continue
        backup = migration_backup(agent)
        stamp = backup.name.removeprefix(BACKUP_PREFIX) if backup is not None else ""
        found.append(
            UnreadMigration(
                agent,
                st.st_mtime,
                int(stamp) / 1000 if stamp.isdigit() else None,
                (st.st_dev, st.st_ino),
            )
        )
    return found
