"""Maintenance of sessions.d/: prune, cap, disk budget and transcript archival.

The same rules as OpenClaw's JSON-era store (defaults included), carried out without
any whole-store rewrite: a plan is made from one pass over the store, then each
entry is removed with the store's locked, conditional delete, one key at a time, so
writers of other sessions never wait and an entry updated since the plan is kept.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import os
import re
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from . import entry as entry_rules
from .errors import EntryNotFound, LockBusy, SessionFSError
from .history import AUDIT_FILE, AUDIT_OLDER, HISTORY_DIR, Actor, History, Kept, Retention
from .keys import key_to_filename
from .migrate import BACKUP_PREFIX
from .sources import AgentStore, Era, Source
from .store import SessionStore, Snapshot
from .transcripts import transcript_name

DAY_MS = 86_400_000
ARCHIVE_RE = re.compile(r"^.+\.jsonl\.(?:bak|reset|deleted)\..+$")
TRANSCRIPT_RE = re.compile(r"^(?P<sid>.+?)(?:-topic-.+)?\.jsonl$")
EPOCH_MS_RE = re.compile(r"[0-9]{1,19}")
LOCK_WAIT = 5.0  # seconds enforce waits for a key another process holds


class Mode(enum.Enum):
    WARN = "warn"
    ENFORCE = "enforce"


@dataclass(frozen=True)
class Policy:
    """OpenClaw's maintenance defaults, in milliseconds and bytes."""

    prune_after_ms: int = 30 * DAY_MS
    max_entries: int = 500
    max_disk_bytes: int | None = None
    high_water_percent: float = 80.0
    keep_backups_ms: int = 30 * DAY_MS  # a migration backup is never deleted before this age
    history: Retention = field(default_factory=Retention)  # kept versions (see .history)

    def __post_init__(self) -> None:
        for name in ("prune_after_ms", "max_entries", "max_disk_bytes", "keep_backups_ms"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative (got {value})")
        if not 0 < self.high_water_percent <= 100:
            raise ValueError(f"high water must be in (0, 100] (got {self.high_water_percent})")

    @property
    def high_water_bytes(self) -> int | None:
        if self.max_disk_bytes is None:
            return None
        return int(self.max_disk_bytes * self.high_water_percent / 100)


@dataclass(frozen=True)
class Entry:
    key: str
    updated_at: float | None
    session_id: str | None
    size: int


@dataclass
class Removal:
    """An entry the plan removes, why, and the transcripts archived with it."""

    entry: Entry
    reason: str
    transcripts: list[str] = field(default_factory=list)
    keep: bool = True  # its version is kept (see .history): not with --no-history, nor
    # for the disk budget (keeping it would free nothing)


@dataclass(frozen=True)
class VersionPrune:
    """A kept version the plan removes: past its retention, or for the disk budget."""

    file_name: str  # the entry file name whose history holds it
    version: Kept
    budget: bool = False


@dataclass(frozen=True)
class Deletion:
    """A file in the sessions dir the disk budget deletes (an archive or a stray transcript)."""

    name: str
    size: int
    mtime_ns: int
    reason: str


@dataclass
class AgentResult:
    label: str
    mode: Mode
    removals: list[Removal] = field(default_factory=list)
    deletions: list[Deletion] = field(default_factory=list)
    usage_bytes: int | None = None
    high_water_bytes: int | None = None
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # reported, never removed
    implausible: list[tuple[str, str]] = field(default_factory=list)  # reported, never removed
    error: str | None = None
    not_maintained: str | None = None  # why this agent's store is left alone (its era)
    version_prunes: list[VersionPrune] = field(default_factory=list)
    pruned_versions: int = 0

    @property
    def planned_bytes(self) -> int:
        """What the plan frees: a removal whose version is kept frees nothing."""
        return (
            sum(r.entry.size for r in self.removals if not r.keep)
            + sum(d.size for d in self.deletions)
            + _unique_bytes(p.version for p in self.version_prunes)
        )

    @property
    def changes(self) -> bool:
        """Whether anything was (enforce) or would be (warn) removed."""
        if self.mode is Mode.ENFORCE:
            return bool(self.removed or self.deleted or self.pruned_versions)
        return bool(self.removals or self.deletions or self.version_prunes)

    def summary(self) -> str:
        if self.not_maintained is not None:
            return f"{self.label}: not maintained: {self.not_maintained}"
        if self.error is not None:
            done = ""
            if self.removed or self.deleted:
                done = (
                    f"; before that it removed {len(self.removed)} entries, archived "
                    f"{len(self.archived)} transcripts and deleted {len(self.deleted)} files"
                )
            return f"{self.label}: failed: {self.error}{done}"
        archives = sum(len(r.transcripts) for r in self.removals)
        budget = ""
        if self.usage_bytes is not None:
            budget = (
                f"; disk {_size(self.usage_bytes)} (high water {_size(self.high_water_bytes or 0)})"
            )
        if self.mode is Mode.WARN:
            if not self.changes:
                return f"{self.label}: nothing to remove{budget}"
            return (
                f"{self.label}: would remove {len(self.removals)} entries, archive {archives} "
                f"transcripts, delete {len(self.deletions)} files and "
                f"{len(self.version_prunes)} kept versions, free {_size(self.planned_bytes)}"
                f"{budget} (warn mode: nothing changed)"
            )
        line = (
            f"{self.label}: removed {len(self.removed)} entries, archived {len(self.archived)} "
            f"transcripts, deleted {len(self.deleted)} files and {self.pruned_versions} kept "
            f"versions{budget}"
        )
        if self.skipped:
            line += f"; kept {len(self.skipped)} that changed since the plan"
        return line

    def lines(self) -> list[str]:
        out = [self.summary()]
        for removal in self.removals:
            archive = f"; archive {', '.join(removal.transcripts)}" if removal.transcripts else ""
            out.append(f"  remove {removal.entry.key!r}: {removal.reason}{archive}")
        out += [f"  delete {d.name}: {d.reason} ({_size(d.size)})" for d in self.deletions]
        for budget, why in ((False, "past its retention"), (True, "disk budget: oldest first")):
            count = sum(1 for p in self.version_prunes if p.budget is budget)
            if count:
                out.append(f"  delete {count} kept versions: {why}")
        out += [f"  kept {key!r}: {why}" for key, why in self.skipped]
        out += [f"  not read {key!r}: {why}" for key, why in self.unreadable]
        out += [f"  not removed {key!r}: {why}" for key, why in self.implausible]
        return out


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"


def _days(ms: float) -> str:
    return f"{ms / DAY_MS:.1f} days"


def archive_name(name: str, now: dt.datetime) -> str:
    """OpenClaw's archive name: ``<name>.deleted.<ISO time with - for :>``."""
    stamp = now.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"{name}.deleted.{stamp.replace(':', '-')}"


# -- planning --------------------------------------------------------------------


def read_entries(store: SessionStore) -> tuple[list[Entry], list[tuple[str, str]]]:
    """One pass over the store (the only full read maintenance does).

    Returns the entries, and the keys that could not be read with the reason (an
    entry over the size cap, say): those are reported and never removed.
    """
    entries, unreadable = [], []
    for key, _ in store.scan():
        try:
            snap = store.read(key)
        except EntryNotFound:
            continue
        except SessionFSError as exc:
            unreadable.append((key, str(exc)))
            continue
        entries.append(_entry(key, snap))
    return entries, unreadable


def _parse(data: bytes) -> object:
    try:
        return entry_rules.loads(data)
    except orjson.JSONDecodeError:
        return None  # never removed for being unreadable: it has no updatedAt


def _entry(key: str, snap: Snapshot) -> Entry:
    value = _parse(snap.data)
    session_id = value.get("sessionId") if isinstance(value, dict) else None
    return Entry(
        key,
        entry_rules.updated_at(value),
        session_id if isinstance(session_id, str) else None,
        len(snap.data),
    )


def _transcripts(files: list[os.DirEntry[str]]) -> dict[str, list[os.DirEntry[str]]]:
    """Transcript files (``<sessionId>.jsonl``, topic variants) by lowercased session id."""
    found: dict[str, list[os.DirEntry[str]]] = {}
    for dirent in files:
        match = TRANSCRIPT_RE.match(dirent.name)
        if match:
            found.setdefault(match.group("sid").lower(), []).append(dirent)
    return found


def _files(sessions_dir: Path) -> list[os.DirEntry[str]]:
    """The regular files in the sessions dir, listed once per plan."""
    with os.scandir(sessions_dir) as it:
        return [d for d in it if d.is_file(follow_symlinks=False)]


def _usage(path: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes of everything under *path*, sessions.d/ and its kept versions included; a
    file linked twice (a kept version) counts once; symlinks are not followed.

    The audit (``.history/audit*.jsonl``, at most ~8 MiB) is not counted: nothing the
    budget may do frees it, so counting it could only make it remove every session.
    """
    seen = set() if seen is None else seen
    total = 0
    with os.scandir(path) as it:
        for dirent in it:
            if path.name == HISTORY_DIR and dirent.name in (AUDIT_FILE, AUDIT_OLDER):
                continue
            st = dirent.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                total += _usage(Path(dirent.path), seen)
            elif (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _unique_bytes(versions: Iterable[Kept]) -> int:
    inodes = {v.ino: v.size for v in versions}
    return sum(inodes.values())


def _kept_versions(history: History) -> list[tuple[str, Kept]]:
    """Every kept version of the store, as (entry file name, version), oldest first."""
    found = [(name, kept) for name in history.names() for kept in history.versions(name)]
    return sorted(found, key=lambda item: (item[1].stopped, item[0], item[1].name))


def _expired(
    versions: list[tuple[str, Kept]], live: set[str], retention: Retention, now: float
) -> list[VersionPrune]:
    """The versions past *retention*: older than its age and, for a live entry, not among
    its newest (a removed session's versions stay for their age only)."""
    newest: dict[str, list[Kept]] = {}
    for name, kept in versions:
        newest.setdefault(name, []).append(kept)
    spared = {
        (name, kept.name)
        for name, kepts in newest.items()
        if name in live and retention.keep_newest
        for kept in kepts[-retention.keep_newest :]
    }
    return [
        VersionPrune(name, kept)
        for name, kept in versions
        if now - kept.stopped > retention.keep_seconds and (name, kept.name) not in spared
    ]


def _age_order(entry: Entry) -> tuple[bool, float]:
    """Entries without updatedAt first, then the oldest."""
    return (entry.updated_at is not None, entry.updated_at or 0.0)


def implausible(updated_at: float | None, now_ms: float) -> str | None:
    """Why *updated_at* cannot be a real epoch-ms time, or None if it can (or is absent)."""
    if updated_at is None:
        return None
    if updated_at < entry_rules.PLAUSIBLE_FROM_MS:
        hint = (
            " (seconds instead of milliseconds?)"
            if updated_at > entry_rules.PLAUSIBLE_FROM_MS / 1000
            else ""
        )
        return f"updatedAt {updated_at:.0f} is before the year 2000{hint}"
    if updated_at > now_ms + DAY_MS:
        return f"updatedAt {updated_at:.0f} is in the future"
    return None


def plan(agent: AgentStore, policy: Policy, *, now_ms: float, mode: Mode) -> AgentResult:
    """What maintenance would do to one agent's store; reads, never writes.

    The sessions dir is listed before the entries are read: a session created
    while planning then has no transcript in the listing, so it can never be
    taken for an unreferenced one and deleted by the disk budget.
    """
    result = AgentResult(agent.label, mode)
    files = _files(agent.sessions_dir)
    with SessionStore(agent.entries, create=False) as store:
        entries, result.unreadable = read_entries(store)
        versions = _kept_versions(store.history)
    kept, removable = [], []
    for e in entries:
        why = implausible(e.updated_at, now_ms)
        if why is not None:
            result.implausible.append((e.key, why))  # reported, never removed
            kept.append(e)
        elif e.updated_at is not None and now_ms - e.updated_at > policy.prune_after_ms:
            age = _days(now_ms - e.updated_at)
            result.removals.append(
                Removal(
                    e,
                    f"last updated {age} ago (prune after {_days(policy.prune_after_ms)})",
                    keep=policy.history.enabled,
                )
            )
        else:
            kept.append(e)
            removable.append(e)
    removable.sort(key=_age_order)
    over = min(len(kept) - policy.max_entries, len(removable))
    if over > 0:
        capped = removable[:over]
        for e in capped:
            result.removals.append(
                Removal(
                    e,
                    f"over the cap of {policy.max_entries} entries (oldest first)",
                    keep=policy.history.enabled,
                )
            )
        gone = {e.key for e in capped}
        kept = [e for e in kept if e.key not in gone]
        removable = removable[over:]
    live = {key_to_filename(e.key) for e in kept} | {
        key_to_filename(key) for key, _ in result.unreadable
    }
    result.version_prunes = _expired(versions, live, policy.history, now_ms / 1000)
    transcripts = _transcripts(files)
    _assign_transcripts(result.removals, kept, transcripts)
    if policy.max_disk_bytes is not None:
        pruned = {(p.file_name, p.version.name) for p in result.version_prunes}
        remaining = [(n, k) for n, k in versions if (n, k.name) not in pruned]
        _plan_budget(agent, policy, now_ms, result, kept, removable, files, remaining)
        # the budget may have removed the last entry sharing a transcript with an earlier one
        _assign_transcripts(result.removals, kept, transcripts)
    return result


def _assign_transcripts(
    removals: list[Removal], kept: list[Entry], transcripts: dict[str, list[os.DirEntry[str]]]
) -> None:
    still_used = {e.session_id.lower() for e in kept if e.session_id}
    for removal in removals:
        sid = (removal.entry.session_id or "").lower()
        if sid and sid not in still_used:
            removal.transcripts = sorted(d.name for d in transcripts.get(sid, []))


def _plan_budget(
    agent: AgentStore,
    policy: Policy,
    now_ms: float,
    result: AgentResult,
    kept: list[Entry],
    removable: list[Entry],
    files: list[os.DirEntry[str]],
    versions: list[tuple[str, Kept]],
) -> None:
    """Above the high-water mark: archives, then unreferenced transcripts, then kept
    versions (*versions*, oldest first), then the oldest entries, whose versions are
    not kept (that would free nothing).

    *removable* (oldest first) are the entries of *kept* the budget may remove.
    """
    high = policy.high_water_bytes
    assert high is not None
    usage = _usage(agent.sessions_dir)
    result.usage_bytes, result.high_water_bytes = usage, high
    usage -= result.planned_bytes
    if usage <= high:
        return
    archives, strays = [], []
    referenced = {e.session_id.lower() for e in kept if e.session_id}
    # an entry that could not be read may reference any transcript: then none is a stray
    strays_known = not result.unreadable
    archived = {name for r in result.removals for name in r.transcripts}
    for dirent in files:
        st = dirent.stat(follow_symlinks=False)
        backup = dirent.name.startswith(BACKUP_PREFIX)
        if ARCHIVE_RE.match(dirent.name) or (
            backup and _backup_age_ms(dirent.name, st, now_ms) > policy.keep_backups_ms
        ):
            archives.append(
                (st.st_mtime_ns, dirent.name, st.st_size, "disk budget: oldest archive")
            )
        elif (
            strays_known
            and (m := TRANSCRIPT_RE.match(dirent.name))
            and m.group("sid").lower() not in referenced
            and dirent.name not in archived
        ):
            strays.append(
                (
                    st.st_mtime_ns,
                    dirent.name,
                    st.st_size,
                    "disk budget: transcript no entry references",
                )
            )
    for mtime_ns, name, size, reason in sorted(archives) + sorted(strays):
        if usage <= high:
            return
        result.deletions.append(Deletion(name, size, mtime_ns, reason))
        usage -= size
    counted = {p.version.ino for p in result.version_prunes}
    for name, version in versions:
        if usage <= high:
            return
        result.version_prunes.append(VersionPrune(name, version, budget=True))
        if version.ino not in counted:
            counted.add(version.ino)
            usage -= version.size
    budget_removals = []
    while usage > high and removable:
        e = removable.pop(0)
        kept.remove(e)
        budget_removals.append(Removal(e, "disk budget: oldest entry (not kept)", keep=False))
        usage -= e.size
    result.removals += budget_removals


def _backup_age_ms(name: str, st: os.stat_result, now_ms: float) -> float:
    suffix = name[len(BACKUP_PREFIX) :]
    # ASCII digits only: "²".isdigit() is true, and int() refuses it
    written_ms = int(suffix) if EPOCH_MS_RE.fullmatch(suffix) else st.st_mtime_ns / 1e6
    return now_ms - written_ms


# -- carrying it out ---------------------------------------------------------------


def enforce(
    agent: AgentStore,
    result: AgentResult,
    *,
    now: dt.datetime,
    stop: threading.Event | None = None,
) -> None:
    """Carry out *result*'s plan: one locked, conditional delete per key.

    A key another process holds for longer than :data:`LOCK_WAIT` is kept and
    reported (a stuck holder must not stall maintenance, nor the mount that runs
    it); *stop* set (the mount ends) leaves the rest of the plan undone.
    """
    with SessionStore(agent.entries, create=False) as store:
        maintenance = Actor.this_process("sessionfs maintain")
        for removal in result.removals:
            if stop is not None and stop.is_set():
                result.skipped.append((removal.entry.key, "the mount is ending"))
                continue
            planned = removal.entry.updated_at

            def unchanged(snap: Snapshot, planned: float | None = planned) -> bool:
                current = entry_rules.updated_at(_parse(snap.data))
                if planned is None:
                    return current is None
                return current is not None and current <= planned

            try:
                removed = store.delete(
                    removal.entry.key,
                    only_if=unchanged,
                    lock_wait=LOCK_WAIT,
                    actor=maintenance,
                    op="removed by maintenance",
                    keep_version=removal.keep,
                )
            except EntryNotFound:
                result.skipped.append((removal.entry.key, "already gone"))
                continue
            except LockBusy:
                result.skipped.append((removal.entry.key, "locked by another process"))
                continue
            if not removed:
                result.skipped.append((removal.entry.key, "updated since the plan"))
                continue
            result.removed.append(removal.entry.key)
            for name in removal.transcripts:
                if _archive(agent.sessions_dir, name, now):
                    result.archived.append(name)
        for prune in result.version_prunes:
            if stop is not None and stop.is_set():
                break
            if store.history.remove_version(prune.file_name, prune.version):
                result.pruned_versions += 1
    for deletion in result.deletions:
        if stop is not None and stop.is_set():
            break
        if _delete_if_unchanged(agent.sessions_dir, deletion):
            result.deleted.append(deletion.name)


def _archive(sessions_dir: Path, name: str, now: dt.datetime) -> bool:
    source = sessions_dir / name
    try:
        if not stat.S_ISREG(os.lstat(source).st_mode):
            return False
        os.rename(source, sessions_dir / archive_name(name, now))
    except FileNotFoundError:
        return False
    return True


def _delete_if_unchanged(sessions_dir: Path, deletion: Deletion) -> bool:
    path = sessions_dir / deletion.name
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (
            deletion.size,
            deletion.mtime_ns,
        ):
            path.unlink()
            return True
    return False


def maintain_source(
    source: Source,
    policy: Policy,
    mode: Mode,
    *,
    dry_run: bool = False,
    now: dt.datetime | None = None,
    stop: threading.Event | None = None,
) -> list[AgentResult]:
    """Plan (and with ``enforce``, not *dry_run*, carry out) maintenance for every agent."""
    now = now or dt.datetime.now(dt.UTC)
    now_ms = now.timestamp() * 1000
    results = []
    for agent in source.stores():
        why_not = _why_not_maintained(agent)
        if why_not is not None:
            results.append(AgentResult(agent.label, mode, not_maintained=why_not))
            continue
        result = AgentResult(agent.label, mode)
        try:
            result = plan(agent, policy, now_ms=now_ms, mode=Mode.WARN if dry_run else mode)
            if result.mode is Mode.ENFORCE:
                enforce(agent, result, now=now, stop=stop)
        except Exception as exc:  # one agent's failure is reported; the others go on
            result.error = str(exc) or type(exc).__name__  # keeps what enforce already did
        results.append(result)
    return results


def _why_not_maintained(agent: AgentStore) -> str | None:
    """Why maintenance leaves *agent* alone, decided by its era; None if it does not."""
    era = agent.era()
    if era is Era.SQLITE:
        return "SQLite era (OpenClaw 2026.7.2 or later): OpenClaw maintains its database"
    if era is Era.JSON:
        return "JSON era: sessions.json is maintained by its gateway until it is migrated"
    if era is Era.NONE:
        return "no store"
    return None


# -- a removal made elsewhere ------------------------------------------------------


def archive_transcripts_of(
    store: SessionStore, removed: bytes, now: dt.datetime | None = None
) -> list[str]:
    """After a removal became final: archive its transcripts, as a maintenance run would.

    ``rm`` through the mount removes an entry; its transcripts (``<sessionId>.jsonl``
    with topic variants, and the file its ``sessionFile`` names) are renamed to
    ``<name>.deleted.<time>``, each unless another entry still uses it (by
    ``sessionId`` or ``sessionFile``).  Returns the archived names.
    """
    sessions_dir = store.path.parent
    value = _parse(removed)
    if not isinstance(value, dict):
        return []
    session_id = value.get("sessionId")
    sid = session_id.lower() if isinstance(session_id, str) and session_id else None
    by_sid = _transcripts(_files(sessions_dir)).get(sid, []) if sid else []
    wanted = {d.name for d in by_sid}
    own = transcript_name(value, sessions_dir)
    if own is not None and (sessions_dir / own).is_file():
        wanted.add(own)
    if not wanted:
        return []
    wanted -= _still_used(store, sid, wanted, {d.name for d in by_sid})
    when = now or dt.datetime.now(dt.UTC)
    return [name for name in sorted(wanted) if _archive(sessions_dir, name, when)]


def _still_used(
    store: SessionStore, sid: str | None, names: set[str], sid_names: set[str]
) -> set[str]:
    """Which of *names* another entry uses: by its ``sessionFile``, or (for *sid_names*)
    by the same session id.  An entry that cannot be read keeps them all."""
    sessions_dir = store.path.parent
    needles = {name.removesuffix(".jsonl").lower().encode() for name in names}
    if sid:
        needles.add(sid.encode())
    used: set[str] = set()
    for key, _ in store.scan():
        try:
            data = store.read(key).data
        except EntryNotFound:
            continue
        except SessionFSError:
            return set(names)  # cannot tell: keep every one
        lowered = data.lower()
        if not any(needle in lowered for needle in needles):
            continue  # only entries that may mention them are parsed
        other = _parse(data)
        if not isinstance(other, dict):
            return set(names)
        other_sid = other.get("sessionId")
        if sid and isinstance(other_sid, str) and other_sid.lower() == sid:
            used |= sid_names
        uses = transcript_name(other, sessions_dir)
        if uses in names:
            used.add(uses)
    return used
