"""Undo a migration: give a JSON-era gateway its ``sessions.json`` back, losing nothing.

No OpenClaw release reads ``sessions.d/``: a JSON-era gateway whose store was
migrated sees an empty store and starts a new ``sessions.json`` beside it, and
``openclaw doctor --session-sqlite import`` imports only ``sessions.json``.  For
one agent, a revert:

1. holds OpenClaw's ``sessions.json.lock`` (a JSON-era gateway that locks waits);
2. renames ``sessions.d/`` to ``sessions.d.reverted.<epoch-ms>``: from here on no
   writer that opens the store finds it, and the directory is the one source
   read, so nothing written to it before this instant is missed;
3. reads every entry of it, a ``sessions.json`` a gateway wrote since the
   migration, and the entries the migrations had to leave in their backups (keys
   no file can be named after, values that are not objects), the newest
   ``updatedAt`` winning where two hold one key;
4. writes ``sessions.json`` as OpenClaw does (2-space indent, temp + fsync +
   rename), reading the gateway's file again if it changed meanwhile (a gateway
   that takes no lock);
5. marks the moved directory done (``.revert-done``).

A crash after step 2 leaves a moved directory without the mark: the next run
finishes it (steps 3-5), merging whatever the gateway wrote in between.  A second
run finds no ``sessions.d/`` and nothing unfinished, and changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
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
    REVERT_DONE,
    AgentReport,
    Outcome,
    fsync_dir,
    interrupted_reverts,
    migration_running,
    plan,
    read_legacy,
    recency,
    step,
)
from .shell import quote
from .sources import REVERTED_PREFIX, AgentStore, Era, Source, SourceKind
from .store import SessionStore, read_small_file, rename_noreplace, write_file_atomically

GATEWAY_REREADS = 5  # how often a sessions.json changing under the revert is read again


@dataclass
class _Sides:
    """Everything that goes into the rebuilt ``sessions.json``, and where it came from."""

    merged: dict[str, Any] = field(default_factory=dict)
    from_gateway: list[str] = field(default_factory=list)
    from_backup: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def offer(self, key: str, value: object) -> bool:
        """Take *value* for *key* unless the one already taken is newer.

        Sources are offered oldest first (backups, moved directories, ``sessions.d/``,
        then the gateway's file), so on equal ``updatedAt`` the later one wins.
        """
        if key in self.merged and recency(self.merged[key]) > recency(value):
            return False
        self.merged[key] = value
        return True

    def merge_gateway(self, written: dict[str, Any]) -> None:
        self.from_gateway = [key for key, value in written.items() if self.offer(key, value)]


def revert_store(
    agent: AgentStore, *, dry_run: bool = False, lock_timeout: float = STORE_LOCK_TIMEOUT
) -> AgentReport:
    """Revert one agent's migration; never raises for a store-level problem."""
    report = AgentReport(agent.label, Outcome.NOTHING_TO_DO)
    try:
        unfinished = interrupted_reverts(agent)
        if not agent.has_entries() and not unfinished:
            report.reason = "no sessions.d/ (never migrated, or already reverted)"
            return report
        if agent.legacy.is_symlink():
            return _failed(report, "sessions.json is a symlink; not followed, nothing reverted")
        refusal = _mounted(agent)
        if refusal is not None:
            return _failed(report, refusal)
        if dry_run:
            sides = _read_sides(agent, unfinished + [agent.entries] * agent.has_entries())
            sides.merge_gateway(_gateway_side(agent)[0])
            _describe(report, sides)
            report.outcome = Outcome.PLANNED_REVERT
            report.backup = agent.sessions_dir / f"{REVERTED_PREFIX}<epoch-ms>"
            return report
        with openclaw_store_lock(agent.legacy, timeout=lock_timeout):
            step("revert-locked")
            refusal = _mounted(agent)  # (a mount may have started while we waited)
            if refusal is not None:
                return _failed(report, refusal)
            return _revert_locked(agent, report)
    except (SessionFSError, OSError, sqlite3.Error) as exc:
        return _failed(report, str(exc))


def _mounted(agent: AgentStore) -> str | None:
    from .daemon import mounted_refusal  # the daemon module is heavy; only needed here

    return mounted_refusal(agent.sessions_dir, "a revert")


def _failed(report: AgentReport, reason: str) -> AgentReport:
    report.outcome, report.reason = Outcome.FAILED, reason
    return report


def _revert_locked(agent: AgentStore, report: AgentReport) -> AgentReport:
    _gateway_side(agent)  # unusable: say so before anything is moved
    moved = interrupted_reverts(agent)
    if agent.has_entries():
        with contextlib.suppress(FileNotFoundError):  # restored by hand from an earlier revert
            os.unlink(agent.entries / REVERT_DONE)
        target = agent.sessions_dir / f"{REVERTED_PREFIX}{int(time.time() * 1000)}"
        while os.path.lexists(target):
            target = target.with_name(f"{REVERTED_PREFIX}{int(target.name.rsplit('.', 1)[1]) + 1}")
        rename_noreplace(agent.entries, target)
        fsync_dir(agent.sessions_dir)
        moved.append(target)
        step("revert-moved")
    sides = _read_sides(agent, moved)
    _write_legacy(agent, sides)
    step("revert-written")
    for directory in moved:
        write_file_atomically(directory, REVERT_DONE, b"")
    _describe(report, sides)
    report.outcome = Outcome.REVERTED if not sides.unreadable else Outcome.REVERTED_PARTLY
    report.backup = moved[-1]
    return report


def _read_sides(agent: AgentStore, directories: list[Path]) -> _Sides:
    """The backups' skipped entries, then every entry of *directories*, oldest first."""
    sides = _Sides()
    for backup in migration_backups(agent, directories):
        with contextlib.suppress(SessionFSError, OSError):
            left = read_legacy(backup)
            for key, _why in plan(left).skipped:
                if sides.offer(key, left[key]):
                    sides.from_backup.append(key)
    for directory in directories:
        with SessionStore(directory, create=False) as entries:
            for key in sorted(entries.keys()):
                try:
                    value = entry_rules.loads(entries.read(key).data)
                except (SessionFSError, OSError, orjson.JSONDecodeError) as exc:
                    sides.unreadable.append((key, str(exc)))
                    continue
                sides.offer(key, value)
    return sides


def _gateway_side(agent: AgentStore) -> tuple[dict[str, Any], tuple[int, int, int] | None]:
    """The ``sessions.json`` a gateway wrote beside ``sessions.d/``, and its identity.

    Read without following a symlink or blocking on a FIFO; a file that cannot be
    merged stops the revert before anything is moved.
    """
    try:
        st = os.stat(agent.legacy, follow_symlinks=False)
    except FileNotFoundError:
        return {}, None
    data = read_small_file(agent.legacy, limit=1 << 31)
    try:
        if data is None:
            raise SessionFSError("it is not a regular file")
        written = entry_rules.loads(data) if data.strip() else {}  # empty: the gateway's {}
    except (SessionFSError, orjson.JSONDecodeError) as exc:
        raise SessionFSError(
            f"the sessions.json beside sessions.d/ cannot be merged ({exc}); nothing was "
            "reverted: move it away or fix it, then run the revert again"
        ) from None
    if not isinstance(written, dict):
        raise SessionFSError(
            f"the sessions.json beside sessions.d/ holds {type(written).__name__}, not an "
            "object; nothing was reverted: move it away or fix it, then run the revert again"
        )
    return written, (st.st_ino, st.st_mtime_ns, st.st_size)


def _write_legacy(agent: AgentStore, sides: _Sides) -> None:
    """``sessions.json`` as OpenClaw writes it, with what the gateway wrote merged in.

    A gateway that takes no lock may write meanwhile: its file is read again until
    it holds still from the read to just before the rename (a few times at most).
    """
    for _ in range(GATEWAY_REREADS):
        written, identity = _gateway_side(agent)
        merged = _Sides(dict(sides.merged))
        merged.merge_gateway(written)
        data = entry_rules.dumps(merged.merged)
        try:
            st = os.stat(agent.legacy, follow_symlinks=False)
            now: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            now = None
        if now == identity:
            break
    write_file_atomically(agent.sessions_dir, agent.legacy.name, data)
    sides.merged, sides.from_gateway = merged.merged, merged.from_gateway


def migration_backups(agent: AgentStore, directories: list[Path] | None = None) -> list[Path]:
    """The ``sessions.json.bak.<epoch-ms>`` files the migrations of these entries left.

    OpenClaw's rotation backups share the name, so each migration adds the name of
    its own to ``.migrated-from`` in ``sessions.d/`` (*directories*: the ones being
    reverted, ``sessions.d/`` by default; never one a finished revert moved away, whose
    entries the gateway has had since).  Entries migrated without that marker (an
    older sessionfs) fall back to the newest backup, whose keys only count where
    nothing newer holds them.  Oldest first.
    """
    names: list[str] = []
    for directory in directories if directories is not None else [agent.entries]:
        data = read_small_file(directory / MIGRATED_FROM)
        if data is not None:
            names += data.decode(errors="replace").split()
    found = []
    for name in dict.fromkeys(names):
        stamp = name.removeprefix(BACKUP_PREFIX)
        path = agent.sessions_dir / name
        if stamp != name and stamp.isdigit() and path.is_file() and not path.is_symlink():
            found.append((int(stamp), path))
    if not found and not names:
        found = [
            (int(p.name.removeprefix(BACKUP_PREFIX)), p)
            for p in agent.sessions_dir.glob(f"{BACKUP_PREFIX}*")
            if p.name.removeprefix(BACKUP_PREFIX).isdigit() and p.is_file() and not p.is_symlink()
        ]
        found = sorted(found)[-1:]
    return [path for _, path in sorted(found)]


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
    report.notes += [
        f"not reverted: {key!r} could not be read ({why}); it stays in the moved directory"
        for key, why in sides.unreadable
    ]


def revert_source(
    source: Source, *, dry_run: bool = False, lock_timeout: float = STORE_LOCK_TIMEOUT
) -> list[AgentReport]:
    """Revert every agent under *source* that has a ``sessions.d/``, each on its own."""
    reports = [
        revert_store(agent, dry_run=dry_run, lock_timeout=lock_timeout) for agent in source.stores()
    ]
    return reports + [AgentReport(name, Outcome.SKIPPED, why) for name, why in source.skipped]


def revert_command(source: Source) -> str:
    """The command that undoes the migration of *source* (a sessions dir for a file)."""
    path = source.path.parent if source.kind is SourceKind.LEGACY_FILE else source.path
    return f"sessionfs migrate --revert {quote(path)}"


@dataclass(frozen=True)
class UnreadMigration:
    """A ``sessions.json`` written beside ``sessions.d/``: its gateway does not read the latter."""

    agent: AgentStore
    written: float  # when the gateway last wrote it (epoch seconds)
    migrated: float | None  # when the migration made its backup, if known

    def message(self, source: Source) -> str:
        since = "" if self.migrated is None else f" since the migration of {_when(self.migrated)}"
        return (
            f"agent {self.agent.label}: a gateway wrote a new sessions.json beside sessions.d/ "
            f"(last at {_when(self.written)}): it does not read sessions.d/ and has not seen its "
            f"sessions{since}. Undo the migration (after unmounting): {revert_command(source)}"
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
            backups = migration_backups(agent)
        except OSError:
            continue
        stamp = backups[-1].name.removeprefix(BACKUP_PREFIX) if backups else ""
        migrated = int(stamp) / 1000 if stamp.isdigit() else None
        found.append(UnreadMigration(agent, st.st_mtime, migrated))
    return found
