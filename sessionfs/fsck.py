"""``sessionfs fsck``: what is wrong in a store, said one line each, and the safe repairs.

A check only reads.  It never follows a symlink, never opens anything but a
regular file (``O_NOFOLLOW | O_NONBLOCK``, then ``fstat``), and reads an entry
only up to the size cap, so a FIFO, a device or a 300 MB file cannot hang or
swell it.

A repair never deletes what a gateway could read.  It moves into
``sessions.d/.quarantine/<time>/`` only what no gateway could read (not JSON, not
an object, a file type other than a regular file, a name that is not a key's
canonical spelling, over the cap); it removes what sessionfs itself left behind
(stray temp files, migration staging, stale locks) and completes a migration
that was interrupted.  Everything else is reported and left as it is, so running
it twice changes nothing the second time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import entry as entry_rules
from .entry import DEFAULT_MAX_ENTRY_BYTES
from .errors import InvalidEntry, UnsafeEntry, describe_error
from .keys import filename_to_key, key_to_display, key_to_filename, lookup_problem, normalize_key
from .locking import LOCK_FILE, is_stale, remove_stale_lock
from .maintain import TRANSCRIPT_RE
from .migrate import MIGRATED_FROM, STAGING_DIR, migrate_store, migration_running, plan, read_legacy
from .owners import adopt_path, foreign_owner
from .shell import quote
from .sources import AgentStore, Era, Source
from .sqlite_view import SqliteView
from .store import STRAY_TEMP_AGE, is_temp_name

QUARANTINE_DIR = ".quarantine"
OWN_DOT_NAMES = frozenset({QUARANTINE_DIR, ".history", LOCK_FILE, MIGRATED_FROM})


class Repair(enum.Enum):
    """What ``--repair`` does about a finding."""

    NONE = "report only"
    QUARANTINE = "quarantine"
    REMOVE = "remove"
    COMPLETE_MIGRATION = "complete the migration"


@dataclass(frozen=True)
class Finding:
    path: Path
    problem: str
    repair: Repair = Repair.NONE

    def line(self, base: Path) -> str:
        try:
            shown = self.path.relative_to(base)
        except ValueError:
            shown = self.path
        return f"{readable(os.fsdecode(shown))}: {self.problem}"


@dataclass
class AgentCheck:
    """The findings of one agent's store, and what a repair did about them."""

    agent: AgentStore
    era: Era
    findings: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    error: str | None = None  # the store could not be checked

    @property
    def label(self) -> str:
        return self.agent.label

    def verdict(self) -> str:
        """In a few words, for a table: the count of findings, or why there is none."""
        if self.error is not None:
            return "could not check"
        if self.findings:
            return f"{len(self.findings)} problem(s)"
        if self.era is Era.SQLITE:
            return "not checked (OpenClaw's)"
        return "no store" if self.era is Era.NONE else "no problems"

    def lines(self) -> list[str]:
        base = self.agent.sessions_dir
        head = f"{self.label} ({self.era.value}):"
        if self.error is not None:
            return [f"{head} could not check: {self.error}"]
        if self.era is Era.SQLITE:
            lines = [f"{head} read-only, not checked (OpenClaw's own database)"]
            return lines + [f"  {f.line(base)}" for f in self.findings]
        if self.era is Era.NONE:
            return [f"{head} no session store", *(f"  {f.line(base)}" for f in self.findings)]
        lines = [f"{head} {len(self.findings) or 'no'} problem(s)"]
        lines += [f"  {f.line(base)}" for f in self.findings]
        lines += [f"  repaired: {what}" for what in self.repaired]
        return lines


def check_source(
    source: Source, *, repair: bool = False, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
) -> list[AgentCheck]:
    """Check (and with *repair*, repair) every store under *source*."""
    return [
        check_agent(agent, repair=repair, max_entry_bytes=max_entry_bytes)
        for agent in source.stores()
    ]


def check_agent(
    agent: AgentStore, *, repair: bool = False, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
) -> AgentCheck:
    result = AgentCheck(agent, agent.era())
    if result.era is Era.SQLITE:
        view = SqliteView(agent.database)  # read-only: only whether the mount can show it
        try:
            view.keys()
            if view.problem is not None:
                result.findings.append(Finding(agent.database, view.problem))
        except OSError as exc:
            result.findings.append(
                Finding(agent.database, f"cannot be read: {describe_error(exc)}")
            )
        finally:
            view.close()
        return result
    if result.era is Era.NONE:
        for planted in (agent.entries, agent.legacy):
            if planted.is_symlink():  # (what a store would be, pointing elsewhere)
                result.findings.append(Finding(planted, "is a symlink; never followed"))
        return result
    try:
        _Checker(agent, result, max_entry_bytes).run()
        if repair:
            _repair(agent, result)
    except OSError as exc:
        result.error = describe_error(exc)
    return result


# -- checking --------------------------------------------------------------------


@dataclass
class _Checker:
    agent: AgentStore
    result: AgentCheck
    max_entry_bytes: int
    session_ids: set[str] = field(default_factory=set)  # lowercased, of every entry
    keys: list[str] = field(default_factory=list)

    def found(self, path: Path, problem: str, repair: Repair = Repair.NONE) -> None:
        self.result.findings.append(Finding(path, problem, repair))

    def run(self) -> None:
        if self.agent.entries.is_dir() and not self.agent.entries.is_symlink():
            self.entries_dir()
        elif self.agent.entries.is_symlink():
            self.found(self.agent.entries, "sessions.d is a symlink; never followed")
        self.legacy()
        self.sessions_dir()
        self.twins()

    def entries_dir(self) -> None:
        entries = self.agent.entries
        agent_id = self.agent.owner
        for name, kind in _listing(entries):
            path = entries / name
            if name in OWN_DOT_NAMES:
                continue
            if is_temp_name(name):
                if kind is _Kind.FILE and _age(path) > STRAY_TEMP_AGE:
                    self.found(path, "stray temp file of a crashed writer", Repair.REMOVE)
                continue
            if name.startswith("."):
                continue  # the gateway's loader skips dot names; so do we
            key = filename_to_key(name)
            if key is None or key_to_filename(key) != name:
                if name.endswith(".json"):
                    self.found(path, "not the canonical file name of any key", Repair.QUARANTINE)
                continue
            if kind is not _Kind.FILE:
                self.found(
                    path, f"a {kind.value} carries an entry's name; never opened", Repair.QUARANTINE
                )
                continue
            self.keys.append(key)
            self.entry(path)
            problem = lookup_problem(key, agent_id)
            if problem is not None:
                self.found(path, f"the gateway never finds this key: {problem}")

    def entry(self, path: Path) -> None:
        try:
            data = _read_capped(path, self.max_entry_bytes)
        except InvalidEntry as exc:
            self.found(path, str(exc), Repair.QUARANTINE)
            return
        except FileNotFoundError:
            return  # removed since the listing
        except OSError as exc:
            self.found(path, f"cannot be read: {describe_error(exc)}")
            return
        try:
            value = entry_rules.loads(data)
        except ValueError as exc:
            lenient = _lenient_parse(data)
            if lenient is _UNPARSEABLE:
                self.found(path, "not JSON; no gateway can read it", Repair.QUARANTINE)
                return
            # Node reads it (bad UTF-8 becomes U+FFFD, 1e400 is Infinity, any depth):
            # reported, never moved
            self.found(path, f"not strict JSON (a gateway still reads it): {exc}")
            if isinstance(lenient, dict):
                self._session_id(lenient)
            return
        if not isinstance(value, dict):
            self.found(path, "not a JSON object; no gateway can read it", Repair.QUARANTINE)
            return
        self._session_id(value)
        try:
            entry_rules.check(value)
        except InvalidEntry as exc:
            self.found(path, f"invalid entry (a gateway still reads it): {exc}")

    def _session_id(self, value: dict[str, object]) -> None:
        session_id = value.get("sessionId")
        if isinstance(session_id, str):
            self.session_ids.add(session_id.lower())

    def legacy(self) -> None:
        agent = self.agent
        legacy = agent.legacy
        if legacy.is_symlink():
            self.found(legacy, "sessions.json is a symlink; never followed")
            return
        lock = legacy.with_name(legacy.name + ".lock")
        if lock.is_file() and not lock.is_symlink() and is_stale(lock):
            self.found(lock, "stale lock (its holder died)", Repair.REMOVE)
        if not legacy.is_file():
            return
        try:
            entries = read_legacy(legacy)
        except (OSError, ValueError) as exc:
            self.found(legacy, f"cannot be read: {describe_error(exc)}")
            return
        for value in entries.values():
            if isinstance(value, dict):
                self._session_id(value)
        if not agent.entries.is_dir():
            self.keys += list(entries)
            return
        # Beside a sessions.d/, a sessions.json is either a migration cut off before
        # its backup, or a gateway that does not read sessions.d/ writing a new one.
        decided = plan(entries).entries
        live = {k: self._parsed(agent.entries / key_to_filename(k)) for k in decided}
        if not decided:
            self.found(
                legacy,
                "an empty sessions.json beside sessions.d/: a gateway that does not read "
                "sessions.d/ may have written it",
            )
            return
        if all(live[k] == v for k, v in decided.items()):
            self.found(
                legacy,
                "a migration was interrupted before its backup (every entry is live)",
                Repair.COMPLETE_MIGRATION,
            )
            return
        both = sorted(k for k in decided if live[k] is not None)
        if both:
            shown = ", ".join(key_to_display(k) for k in both[:5])
            more = f" and {len(both) - 5} more" if len(both) > 5 else ""
            self.found(
                legacy,
                f"{len(both)} entries exist both in sessions.d/ and in this live "
                f"sessions.json: {shown}{more}",
            )

    def _parsed(self, path: Path) -> object:
        try:
            return entry_rules.loads(_read_capped(path, self.max_entry_bytes))
        except (OSError, ValueError):
            return None

    def sessions_dir(self) -> None:
        sessions = self.agent.sessions_dir
        staging = sessions / STAGING_DIR
        if staging.is_dir() and not staging.is_symlink():
            if migration_running(self.agent):
                self.found(staging, "staging of a migration in progress; left alone")
            else:
                self.found(
                    staging, "leftover staging of a migration that did not finish", Repair.REMOVE
                )
        for name, kind in _listing(sessions):
            match = TRANSCRIPT_RE.match(name)
            if match and kind is _Kind.FILE and match.group("sid").lower() not in self.session_ids:
                self.found(sessions / name, "orphan transcript: no entry references it")

    def twins(self) -> None:
        folded: dict[str, list[str]] = {}
        for key in self.keys:
            folded.setdefault(normalize_key(key), []).append(key)
        for normalized, variants in sorted(folded.items()):
            if len(variants) > 1:
                shown = ", ".join(repr(v) for v in sorted(variants))
                where = self.agent.entries if self.agent.has_entries() else self.agent.legacy
                self.found(
                    where, f"case-variant twins the gateway folds into {normalized!r}: {shown}"
                )


_UNPARSEABLE = object()


def _lenient_parse(data: bytes) -> object:
    """What a JavaScript reader would make of *data*, or _UNPARSEABLE if it refuses it.

    Too deep to tell here counts as readable: only what surely no gateway can
    read is ever quarantined.
    """
    try:
        return json.loads(data.decode("utf-8", "replace"))
    except RecursionError:
        return None
    except ValueError:
        return _UNPARSEABLE


class _Kind(enum.Enum):
    FILE = "regular file"
    SYMLINK = "symlink"
    DIRECTORY = "directory"
    FIFO = "FIFO"
    DEVICE = "device"
    SOCKET = "socket"
    OTHER = "special file"


def _kind(mode: int) -> _Kind:
    for test, kind in (
        (stat.S_ISREG, _Kind.FILE),
        (stat.S_ISLNK, _Kind.SYMLINK),
        (stat.S_ISDIR, _Kind.DIRECTORY),
        (stat.S_ISFIFO, _Kind.FIFO),
        (stat.S_ISCHR, _Kind.DEVICE),
        (stat.S_ISBLK, _Kind.DEVICE),
        (stat.S_ISSOCK, _Kind.SOCKET),
    ):
        if test(mode):
            return kind
    return _Kind.OTHER


def _listing(directory: Path) -> Iterator[tuple[str, _Kind]]:
    """Every name in *directory* (bytes-safe) with its file type, never following links."""
    with os.scandir(directory) as it:
        names = sorted(d.name for d in it)
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            yield name, _kind(os.lstat(directory / name).st_mode)


def _age(path: Path) -> float:
    try:
        return time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _read_capped(path: Path, cap: int) -> bytes:
    """A regular file's bytes, never more than *cap* + 1 read; InvalidEntry (EFBIG) above."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidEntry(f"a {_kind(st.st_mode).value}, not an entry")
        if st.st_size > cap:
            raise InvalidEntry(f"over the size cap ({st.st_size} > {cap} bytes)", code=27)
        data = os.read(fd, cap + 1)
        if len(data) > cap:
            raise InvalidEntry(f"over the size cap (more than {cap} bytes)", code=27)
        return data
    finally:
        os.close(fd)


# -- repairing -------------------------------------------------------------------


def _repair(agent: AgentStore, result: AgentCheck) -> None:
    quarantine: Path | None = None
    for finding in result.findings:
        path = finding.path
        if finding.repair is Repair.QUARANTINE:
            if quarantine is None:
                quarantine = _quarantine_dir(agent.entries)
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, quarantine / path.name)
                result.repaired.append(
                    f"moved {readable(path.name)} to "
                    f"{os.fsdecode(quarantine.relative_to(agent.sessions_dir))}/ "
                    f"({finding.problem})"
                )
        elif finding.repair is Repair.REMOVE:
            if path.name == STAGING_DIR:
                if migration_running(agent):  # one started since the check
                    continue
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.endswith(".lock"):
                remove_stale_lock(path.with_name(path.name.removesuffix(".lock")))
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            result.repaired.append(f"removed {readable(path.name)} ({finding.problem})")
        elif finding.repair is Repair.COMPLETE_MIGRATION:
            report = migrate_store(agent)
            result.repaired.append(
                "completed the interrupted migration: " + "; ".join(report.lines())
            )


def _quarantine_dir(entries: Path) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%S.%fZ")
    top = entries / QUARANTINE_DIR
    owner = foreign_owner(os.stat(entries))  # (root repairing a user's store: theirs)
    with contextlib.suppress(FileExistsError):
        top.mkdir(mode=0o700)
        adopt_path(top, owner)
    if not stat.S_ISDIR(os.lstat(top).st_mode):  # a symlink there is never followed
        raise UnsafeEntry(f"{top} is not a directory; nothing was quarantined")
    path = top / stamp
    path.mkdir(mode=0o700)
    adopt_path(path, owner)
    return path


@dataclass(frozen=True)
class CheckSummary:
    """What a background check of a mounted store found (``.sessionfs/fsck``)."""

    finished: float  # time.time() when it ended
    problems: int
    lines: tuple[str, ...]
    verdicts: Mapping[str, str]  # per agent label, as `sessionfs status` tabulates it
    source: Path

    @classmethod
    def of(cls, checks: list[AgentCheck], source: Path) -> CheckSummary:
        lines = tuple(line for check in checks for line in check.lines())
        verdicts = {check.label: check.verdict() for check in checks}
        return cls(time.time(), sum(len(c.findings) for c in checks), lines, verdicts, source)

    def render(self) -> bytes:
        when = dt.datetime.fromtimestamp(self.finished, dt.UTC).isoformat(timespec="seconds")
        head = f"last background check: {when}; {self.problems} problem(s)"
        details = f"sessionfs fsck {quote(self.source)}"
        hint = f" (details: {details})" if self.problems else ""
        return "\n".join([head + hint, *self.lines, ""]).encode()


def readable(name: str) -> str:
    """A file name for a terminal or a log: bytes that are not UTF-8 shown as ``\\xff``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def exit_code(checks: list[AgentCheck]) -> int:
    """0 clean, 1 something found, 3 a store could not be checked."""
    if any(c.error for c in checks):
        return 3
    return 1 if any(c.findings for c in checks) else 0
