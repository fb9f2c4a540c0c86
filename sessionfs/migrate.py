"""Migrate legacy ``sessions.json`` stores to ``sessions.d/``: safe, idempotent, crash-safe.

The steps for one store, each leaving a state from which a new run completes:

1. hold OpenClaw's ``sessions.json.lock``, so a JSON-era gateway cannot write meanwhile;
2. parse ``sessions.json`` (empty, unparseable or not an object: stop, touch nothing);
3. fold case variants onto the key the gateway looks up (newest ``updatedAt`` wins);
4. stage every entry into ``sessions.d.migrating/`` (a leftover one is removed first),
   then make it durable with one sync;
5. go live: rename it to ``sessions.d/``, or merge into an existing ``sessions.d/``
   without replacing anything there (the live directory wins);
6. rename ``sessions.json`` to ``sessions.json.bak.<epoch-ms>``.

Until step 6 the legacy file is untouched, so a crash anywhere earlier is repaired
by running again; after it, nothing is left to do.
"""

from __future__ import annotations

import contextlib
import enum
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

from . import entry as entry_rules
from .errors import InvalidKey, SessionFSError
from .keys import key_to_filename, normalize_key
from .locking import STORE_LOCK_TIMEOUT, is_stale, openclaw_store_lock, remove_stale_lock
from .sources import REVERTED_PREFIX, AgentStore, Era, Source
from .store import SessionStore, read_small_file, rename_noreplace, write_file_atomically

STAGING_DIR = "sessions.d.migrating"
BACKUP_PREFIX = "sessions.json.bak."
# In sessions.d/: the name of the backup the migration made, which `migrate --revert`
# reads (OpenClaw's rotation backups share its name pattern).  A dot name: no key.
MIGRATED_FROM = ".migrated-from"
# `migrate --revert` marks the sessions.d/ it moved away (to REVERTED_PREFIX<epoch-ms>)
# done once sessions.json holds all of it.
REVERT_DONE = ".revert-done"
PROGRESS_MIN_ENTRIES = 5000

# Fault injection for the crash tests: SIGKILL ourselves when reaching this step.
_CRASH_AT = os.environ.get("SESSIONFS_MIGRATE_CRASH_AT")
# In-process tests may act at a step (a gateway writing, a directory appearing).
STEP_HOOKS: dict[str, Callable[[], None]] = {}


def step(name: str) -> None:
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    hook = STEP_HOOKS.get(name)
    if hook is not None:
        hook()


class Outcome(enum.Enum):
    MIGRATED = "migrated"
    NOTHING_TO_DO = "nothing to do"
    PLANNED = "would migrate"
    FAILED = "failed"
    SKIPPED = "skipped"
    REVERTED = "reverted"
    REVERTED_PARTLY = "reverted, except what could not be read,"
    PLANNED_REVERT = "would revert"

    @property
    def ok(self) -> bool:
        return self not in (Outcome.FAILED, Outcome.SKIPPED, Outcome.REVERTED_PARTLY)


@dataclass(frozen=True)
class Fold:
    """*loser*'s entry was folded away; *winner*'s entry lives on under *key*."""

    key: str
    winner: str
    loser: str


@dataclass
class AgentReport:
    label: str
    outcome: Outcome
    reason: str = ""
    migrated: int = 0
    renamed: list[tuple[str, str]] = field(default_factory=list)
    folded: list[Fold] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kept_live: list[str] = field(default_factory=list)
    carried_over: list[str] = field(default_factory=list)  # written to sessions.json meanwhile
    notes: list[str] = field(default_factory=list)
    backup: Path | None = None

    def lines(self) -> list[str]:
        """The readable summary printed by ``sessionfs migrate`` and ``mount``."""
        head = f"{self.label}: {self.outcome.value}"
        if self.outcome in (Outcome.REVERTED, Outcome.REVERTED_PARTLY, Outcome.PLANNED_REVERT):
            head += f" {self.migrated} entries to sessions.json"
            if self.backup is not None:
                head += f"; sessions.d/ kept as {self.backup}"
        elif self.outcome in (Outcome.MIGRATED, Outcome.PLANNED):
            head += f" {self.migrated} entries"
            if self.backup is not None:
                verb = "backup would be" if self.outcome is Outcome.PLANNED else "backup"
                head += f" ({verb} {self.backup})"
        if self.reason:
            head += f": {self.reason}"
        out = [head]
        out += [
            f"  renamed: {old!r} -> {new!r} (the key the gateway looks up)"
            for old, new in self.renamed
        ]
        out += [
            f"  folded: {f.loser!r} and {f.winner!r} are one key to the gateway ({f.key!r}):"
            f" kept the newer entry, that of {f.winner!r}; the other stays in the backup"
            for f in self.folded
        ]
        out += [f"  skipped: {key!r}: {why}; it stays in the backup" for key, why in self.skipped]
        out += [
            f"  kept: {key!r} already in sessions.d/ (the live entry wins;"
            " the legacy one stays in the backup)"
            for key in self.kept_live
        ]
        out += [
            f"  carried over: {key!r} was written to sessions.json during the migration"
            for key in self.carried_over
        ]
        out += [f"  {note}" for note in self.notes]
        return out


@dataclass
class Plan:
    """What migrating one parsed ``sessions.json`` will write, and what it will not."""

    entries: dict[str, Any] = field(default_factory=dict)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    folded: list[Fold] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def recency(value: object) -> tuple[bool, float]:
    stamp = entry_rules.updated_at(value)
    return (stamp is not None, stamp or 0.0)


def plan(legacy: dict[str, Any]) -> Plan:
    """Decide, for every legacy key, where its entry goes (pure; used by dry runs too)."""
    result = Plan()
    groups: dict[str, list[str]] = {}
    for key, value in legacy.items():
        if not isinstance(value, dict):
            result.skipped.append((key, f"not an object ({type(value).__name__})"))
            continue
        groups.setdefault(normalize_key(key), []).append(key)
    for target, members in groups.items():
        try:
            key_to_filename(target)
        except InvalidKey as exc:
            result.skipped += [(key, str(exc)) for key in members]
            continue
        winner = max(members, key=lambda k: recency(legacy[k]))  # first wins a tie
        result.entries[target] = legacy[winner]
        result.folded += [Fold(target, winner, k) for k in members if k != winner]
        if winner != target:
            result.renamed.append((winner, target))
    return result


class _Progress:
    """A self-overwriting progress line on a terminal; silent otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO | None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.start = self.last = time.monotonic()
        self.stream = stream if stream is not None and total >= PROGRESS_MIN_ENTRIES else None
        if self.stream is not None and not self.stream.isatty():
            self.stream = None

    def tick(self) -> None:
        self.done += 1
        if self.stream is None:
            return
        now = time.monotonic()
        if now - self.last >= 0.2 or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            self.stream.write(
                f"\r{self.label}: {self.done:,}/{self.total:,} entries ({rate:,.0f}/s)"
            )
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


def read_legacy(path: Path) -> dict[str, Any]:
    """Parse a ``sessions.json``; raises :class:`SessionFSError` saying why it is unusable."""
    data = path.read_bytes()
    if not data.strip():
        raise SessionFSError("sessions.json is empty; nothing was migrated or renamed")
    try:
        legacy = entry_rules.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SessionFSError(
            f"sessions.json is not valid JSON ({exc}); nothing was migrated or renamed"
        ) from None
    if not isinstance(legacy, dict):
        raise SessionFSError(
            f"sessions.json holds {type(legacy).__name__}, not an object;"
            " nothing was migrated or renamed"
        )
    return legacy


def _remove_dir(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)  # fd-based: never follows a symlink inside


def migrate_store(
    agent: AgentStore,
    *,
    dry_run: bool = False,
    lock_timeout: float = STORE_LOCK_TIMEOUT,
    progress: TextIO | None = None,
) -> AgentReport:
    """Migrate one agent's ``sessions.json``; never raises for a store-level problem."""
    report = AgentReport(agent.label, Outcome.NOTHING_TO_DO)
    staging = agent.sessions_dir / STAGING_DIR
    if interrupted_reverts(agent):
        return _fail(
            report,
            "a revert of this agent was interrupted; finish it first: sessionfs migrate --revert",
        )
    if agent.era() is Era.SQLITE:
        # OpenClaw reads only its database; a sessions.json left there is the input of
        # `openclaw doctor --session-sqlite import`, and must stay where it is
        report.reason = "SQLite era (OpenClaw 2026.7.2 or later): never migrated nor touched"
        return report
    try:
        if not agent.has_legacy():
            if agent.legacy.is_symlink():
                return _fail(report, "sessions.json is a symlink; not followed")
            if not dry_run and not migration_running(agent):
                _remove_dir(staging)  # only ever a copy of data that now lives elsewhere
                if remove_stale_lock(agent.legacy):
                    report.notes.append("removed a stale sessions.json.lock (its holder had died)")
            report.reason = "already migrated" if agent.has_entries() else "no sessions.json"
            return report
        if dry_run:
            return _plan_only(agent, report)
        with openclaw_store_lock(agent.legacy, timeout=lock_timeout):
            step("locked")
            return _migrate_locked(agent, staging, report, progress)
    except (SessionFSError, OSError) as exc:
        return _fail(report, str(exc))


def interrupted_reverts(agent: AgentStore) -> list[Path]:
    """Directories a revert moved away but did not finish (a crash): oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(agent.sessions_dir) as listing:
        for dirent in listing:
            moved = dirent.name.startswith(REVERTED_PREFIX) and dirent.is_dir(follow_symlinks=False)
            if moved and not os.path.lexists(Path(dirent.path) / REVERT_DONE):
                found.append(Path(dirent.path))
    return sorted(found)


def migration_running(agent: AgentStore) -> bool:
    """Whether a live process holds the agent's ``sessions.json.lock`` (its staging is busy)."""
    lock = agent.legacy.with_name(agent.legacy.name + ".lock")
    return lock.is_file() and not lock.is_symlink() and not is_stale(lock)


def _fail(report: AgentReport, reason: str) -> AgentReport:
    report.outcome, report.reason = Outcome.FAILED, reason
    return report


def _plan_only(agent: AgentStore, report: AgentReport) -> AgentReport:
    decided = plan(read_legacy(agent.legacy))
    existing = _live_keys(agent)
    _fill(report, decided)
    report.kept_live = sorted(k for k in decided.entries if k in existing)
    report.migrated = len(decided.entries) - len(report.kept_live)
    report.outcome = Outcome.PLANNED
    report.backup = agent.sessions_dir / f"{BACKUP_PREFIX}<epoch-ms>"
    return report


def _live_keys(agent: AgentStore) -> set[str]:
    if not agent.has_entries():
        return set()
    with SessionStore(agent.entries, create=False) as live:
        return set(live.keys())


def _fill(report: AgentReport, decided: Plan) -> None:
    report.renamed, report.folded, report.skipped = decided.renamed, decided.folded, decided.skipped


def _migrate_locked(
    agent: AgentStore, staging: Path, report: AgentReport, progress: TextIO | None
) -> AgentReport:
    parsed = os.stat(agent.legacy, follow_symlinks=False)
    legacy = read_legacy(agent.legacy)
    decided = plan(legacy)
    _fill(report, decided)
    step("parsed")

    _remove_dir(staging)
    step("staging-cleared")
    bar = _Progress(agent.label, len(decided.entries), progress)
    with SessionStore(staging) as staged:
        _stage(staged, staging, decided, bar)
        staged.sync()
        step("staged")

        try:
            # RENAME_NOREPLACE: a sessions.d/ created meanwhile is merged into, never replaced
            rename_noreplace(staging, agent.entries)
        except FileExistsError:
            with SessionStore(agent.entries, create=False) as live:
                step("merging")
                moved, kept = staged.move_into(live)
                report.kept_live = _differing(live, decided, kept)
            report.migrated = len(moved)
            step("merged")
            _remove_dir(staging)
            step("staging-removed")
            if not moved and kept and not report.kept_live:
                report.notes.append(
                    "completed an interrupted migration: every entry was already live"
                )
        else:
            fsync_dir(agent.sessions_dir)
            report.migrated = len(decided.entries)
            step("live")

    # Writes that reached sessions.json since the parse (a gateway that ignores the
    # lock) go live now, before the rename: a crash right after the rename must not
    # leave them only in the backup.  The rename's own window is carried after it.
    carried = _carry_over(agent, agent.legacy, parsed, decided)
    if carried:
        parsed = os.stat(agent.legacy, follow_symlinks=False)
        decided = plan(read_legacy(agent.legacy))
    step("carried")
    backup = agent.sessions_dir / f"{BACKUP_PREFIX}{int(time.time() * 1000)}"
    while backup.exists():  # two runs within one millisecond must not clobber a backup
        backup = backup.with_name(f"{BACKUP_PREFIX}{int(backup.name.rsplit('.', 1)[1]) + 1}")
    os.rename(agent.legacy, backup)
    fsync_dir(agent.sessions_dir)
    step("backed-up")
    _note_backup(agent, backup, report)
    report.backup = backup
    report.carried_over = sorted(set(carried) | set(_carry_over(agent, backup, parsed, decided)))
    report.outcome = Outcome.MIGRATED
    return report


def _note_backup(agent: AgentStore, backup: Path, report: AgentReport) -> None:
    """Add *backup* to the names in ``sessions.d/.migrated-from`` (``migrate --revert``).

    Best effort: the migration is complete without it, and a revert then takes
    the newest backup instead.
    """
    marker = agent.entries / MIGRATED_FROM
    earlier = read_small_file(marker) or b""
    try:
        write_file_atomically(agent.entries, MIGRATED_FROM, earlier + backup.name.encode() + b"\n")
    except OSError as exc:
        report.notes.append(f"could not note the backup's name in {marker}: {exc.strerror}")


def _stage(staged: SessionStore, staging: Path, decided: Plan, bar: _Progress) -> None:
    """Write every entry into the staging dir; on failure, remove it and name the file."""
    name = ""
    try:
        for n, (key, value) in enumerate(decided.entries.items()):
            name = key_to_filename(key)
            mtime_ns = entry_rules.activity_ns(value)
            staged.create_unlocked(key, entry_rules.dumps(value), mtime_ns=mtime_ns)
            bar.tick()
            if n == len(decided.entries) // 2:
                step("staging-half")
    except OSError as exc:
        _remove_dir(staging)  # it holds the last free space, and nothing of value
        raise SessionFSError(
            f"could not write {staging / name}: {exc.strerror}; removed the partial copy "
            f"{staging}; sessions.json is untouched"
        ) from None


def _differing(live: SessionStore, decided: Plan, kept: list[str]) -> list[str]:
    """Keys kept live whose live entry differs from the legacy one (equal ones are no news)."""
    out = []
    for key in kept:
        try:
            same = live.read(key).data == entry_rules.dumps(decided.entries[key])
        except SessionFSError:
            same = False
        if not same:
            out.append(key)
    return out


def _carry_over(
    agent: AgentStore, backup: Path, parsed: os.stat_result, decided: Plan
) -> list[str]:
    """Entries a gateway wrote to sessions.json after it was parsed, despite the lock.

    The rename to the backup is atomic, so the backup holds every write that
    reached sessions.json; whatever changed since the parse is written into
    sessions.d/ too, where the live entry is not newer.
    """
    now = os.stat(backup, follow_symlinks=False)
    if (now.st_ino, now.st_mtime_ns, now.st_size) == (
        parsed.st_ino,
        parsed.st_mtime_ns,
        parsed.st_size,
    ):
        return []
    try:
        later = plan(read_legacy(backup))
    except SessionFSError:
        return []
    carried = []
    with SessionStore(agent.entries, create=False) as live:
        for key, value in later.entries.items():
            if decided.entries.get(key) == value:
                continue
            try:
                current = entry_rules.loads(live.read(key).data)
            except SessionFSError:
                current = None
            if recency(current) > recency(value):
                continue
            live.write(key, entry_rules.dumps(value), validate=False)
            carried.append(key)
    return carried


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def migrate_source(
    source: Source,
    *,
    dry_run: bool = False,
    lock_timeout: float = STORE_LOCK_TIMEOUT,
    progress: TextIO | None = sys.stderr,
) -> list[AgentReport]:
    """Migrate every store under *source*, each on its own."""
    reports = []
    for agent in source.stores():
        reports.append(
            migrate_store(agent, dry_run=dry_run, lock_timeout=lock_timeout, progress=progress)
        )
    reports += [AgentReport(name, Outcome.SKIPPED, why) for name, why in source.skipped]
    return reports


def all_ok(reports: list[AgentReport]) -> bool:
    return all(r.outcome.ok for r in reports)
