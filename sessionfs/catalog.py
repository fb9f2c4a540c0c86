"""Which stores a mount shows, opened on demand.

A state dir shows one directory per agent, found anew on each lookup so agents can
come and go while mounted; any other SOURCE shows one store at the top.  An agent
whose ``sessions.d/`` does not exist yet is shown read-only from its
``sessions.json``.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .entry import DEFAULT_MAX_ENTRY_BYTES
from .errors import NoStore
from .history import Actor, Retention, read_audit
from .legacy import LegacyView
from .sources import (
    AGENT_ID_RE,
    AgentStore,
    Source,
    SourceKind,
    agent_problem,
    scan_agents,
)
from .sqlite_view import SqliteView
from .store import Commit, SessionStore, Snapshot, Version


class Backing(Protocol):
    """What the mount asks of the store behind a directory (``sessions.d/`` or a view).

    Read-only views answer every change with ``EROFS`` (:class:`ReadOnlyStore`).
    """

    @property
    def writable(self) -> bool: ...

    def why_read_only(self) -> str | None: ...

    def read(self, key: str) -> Snapshot: ...

    def stat(self, key: str) -> os.stat_result: ...

    def keys(self) -> Iterable[str]: ...

    def stat_many(self, keys: list[str]) -> list[os.stat_result | None]: ...

    def write(
        self,
        key: str,
        data: bytes,
        *,
        validate: bool = True,
        expected: Version | None = None,
        mtime_ns: int | None = None,
        lock_wait: float | None = None,
        actor: Actor | None = None,
        op: str = "written",
    ) -> Commit: ...

    def remove(
        self,
        key: str,
        *,
        only_if: Callable[[Snapshot], bool] | None = None,
        lock_wait: float | None = None,
        actor: Actor | None = None,
        op: str = "removed",
    ) -> Snapshot: ...

    def rename(
        self,
        old: str,
        new: str,
        *,
        replace: bool = True,
        lock_wait: float | None = None,
        actor: Actor | None = None,
    ) -> os.stat_result: ...


RECENT_AUDIT_LINES = 1000
RECENT_AUDIT_BYTES = 1 << 20  # of all stores' audits together, read for .sessionfs/audit

StoreFactory = Callable[[Path, int], SessionStore]
"""Opens the ``sessions.d/`` at a path with an entry size cap (tests pass a wrapper)."""


def open_store(
    path: Path,
    max_entry_bytes: int,
    retention: Retention = Retention(),  # noqa: B008 - frozen, shared safely
) -> SessionStore:
    return SessionStore(path, create=False, max_entry_bytes=max_entry_bytes, retention=retention)


@dataclass(frozen=True)
class WatchTarget:
    path: Path
    kind: str  # "entries": a sessions.d/; "tree": a directory above stores
    agent_id: str | None
    identity: tuple[int, int]  # (st_dev, st_ino): a replaced directory is a new target


@dataclass(eq=False)
class _Opened:
    """One opened store and how many calls are using it right now."""

    identity: tuple[int, int]  # (st_dev, st_ino) of its directory or database; (0, 0): legacy
    backing: SessionStore | LegacyView | SqliteView
    users: int = 0

    def close(self) -> None:
        if isinstance(self.backing, SessionStore | SqliteView):
            self.backing.close()


class Catalog:
    """Opens (and caches) the store behind each directory of the mount; blocking calls."""

    def __init__(
        self,
        source: Source,
        *,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        store_factory: StoreFactory = open_store,
    ) -> None:
        self.source = source
        self.max_entry_bytes = max_entry_bytes
        self._store_factory = store_factory
        self.per_agent = source.kind is SourceKind.STATE_DIR
        self._lock = threading.Lock()
        self._open: dict[str | None, _Opened] = {}
        self._retired: set[_Opened] = set()  # replaced, closed when their last user leaves
        self._paths: dict[str | None, tuple[str, str]] = {}  # database, sessions.d/ of each
        if not self.per_agent and not self._ref(None).has_store():
            raise NoStore(f"{source.path} holds neither sessions.d/ nor sessions.json")

    @property
    def root_path(self) -> Path:
        return self.source.path if self.per_agent else self._ref(None).sessions_dir

    def _ref(self, agent_id: str | None) -> AgentStore:
        if agent_id is None:
            if self.source.kind is SourceKind.ENTRIES_DIR:
                return AgentStore(self.source.path.parent)
            return self.source.stores()[0]
        return AgentStore(self.source.agents_dir / agent_id / "sessions", agent_id)

    def sessions_dir(self, agent_id: str | None) -> Path:
        """The sessions dir of directory *agent_id*'s store (where its transcripts are)."""
        return self._ref(agent_id).sessions_dir

    def owning_agent(self, agent_id: str | None) -> str | None:
        """Whose keys the store of directory *agent_id* holds (None: not known)."""
        return self._ref(agent_id).owner

    def agents(self) -> list[str]:
        """The agent ids to show right now."""
        stores, _ = scan_agents(self.source.agents_dir)
        return [s.agent_id for s in stores if s.agent_id and s.has_store()]

    def has_agent(self, agent_id: str) -> bool:
        """The same rules as :meth:`agents`, for one name (a lookup)."""
        if agent_problem(self.source.agents_dir / agent_id) is not None:
            return False
        return self._ref(agent_id).has_store()

    @contextlib.contextmanager
    def backing(self, agent_id: str | None) -> Iterator[Backing]:
        """The store of *agent_id* (``None``: the single store), reopened if it was replaced.

        A store is in use for as long as this context lasts: a ``sessions.d/``
        replaced meanwhile gets a new store for new callers, and the old one (its
        directory descriptor) is closed only when its last user leaves, never
        under a thread still working in it.
        """
        opened = self._acquire(agent_id)
        try:
            yield opened.backing
        finally:
            self._release(opened)

    def _identity(self, agent_id: str | None) -> tuple[bool, tuple[int, int]]:
        """Whether *agent_id*'s store is in the SQLite era, and (st_dev, st_ino) of its
        database or ``sessions.d/`` ((0, 0): neither).  Every store call asks (a store
        replaced meanwhile is reopened), so it costs one or two ``lstat`` s, no more."""
        paths = self._paths.get(agent_id)
        if paths is None:
            ref = self._ref(agent_id)
            paths = str(ref.database), str(ref.entries)
            if agent_id is not None or not self.per_agent:  # (fixed for every other)
                self._paths[agent_id] = paths
        database, entries = paths
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            st = os.lstat(database)
            if stat.S_ISREG(st.st_mode):  # the SQLite era wins: the gateway reads only that
                return True, (st.st_dev, st.st_ino)
        try:
            st = os.lstat(entries)
        except (FileNotFoundError, NotADirectoryError):
            return False, (0, 0)
        return False, (st.st_dev, st.st_ino)

    def _acquire(self, agent_id: str | None) -> _Opened:
        with self._lock:
            sqlite, identity = self._identity(agent_id)
            current = self._open.get(agent_id)
            if current is None or current.identity != identity:
                ref = self._ref(agent_id)
                if current is not None:
                    self._retire(current)
                    del self._open[agent_id]
                backing: SessionStore | LegacyView | SqliteView
                if sqlite and identity != (0, 0):
                    backing = SqliteView(ref.database)
                elif identity != (0, 0):
                    backing = self._store_factory(ref.entries, self.max_entry_bytes)
                elif ref.has_legacy():
                    backing = LegacyView(ref.legacy)
                else:
                    raise NoStore(f"{ref.sessions_dir} holds neither sessions.d/ nor sessions.json")
                current = self._open[agent_id] = _Opened(identity, backing)
            current.users += 1
            return current

    def _release(self, opened: _Opened) -> None:
        with self._lock:
            opened.users -= 1
            if opened.users == 0 and opened in self._retired:
                self._retired.discard(opened)
                opened.close()

    def _retire(self, opened: _Opened) -> None:
        """No new users; closed now if unused, else by its last user (lock held)."""
        if opened.users == 0:
            opened.close()
        else:
            self._retired.add(opened)

    @property
    def open_stores(self) -> int:
        """Stores whose directory is open now, retired ones still in use included."""
        with self._lock:
            return len(self._open) + len(self._retired)

    def sqlite_views(self) -> list[tuple[str | None, SqliteView]]:
        """The SQLite-era stores opened so far (the watcher polls them for commits)."""
        with self._lock:
            return [
                (agent, opened.backing)
                for agent, opened in self._open.items()
                if isinstance(opened.backing, SqliteView)
            ]

    def watch_targets(self) -> list[WatchTarget]:
        """Every directory whose changes the mount must follow, as it is on disk now.

        The stores themselves (``kind`` "entries"), and the directories above them
        in which agents, sessions dirs and stores appear, vanish or get replaced.
        """
        targets: list[WatchTarget] = []

        def add(path: Path, kind: str, agent_id: str | None) -> bool:
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                return False
            if not stat.S_ISDIR(st.st_mode):
                return False
            targets.append(WatchTarget(path, kind, agent_id, (st.st_dev, st.st_ino)))
            return True

        if not self.per_agent:
            ref = self._ref(None)
            add(ref.sessions_dir, "tree", None)
            add(ref.entries, "entries", None)
            return targets
        if not add(self.source.agents_dir, "tree", None):
            return targets
        for dirent in os.scandir(self.source.agents_dir):
            if not AGENT_ID_RE.match(dirent.name):
                continue
            ref = self._ref(dirent.name)
            if add(Path(dirent.path), "tree", dirent.name) and add(
                ref.sessions_dir, "tree", dirent.name
            ):
                add(ref.entries, "entries", dirent.name)
        return targets

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root_path)

    def flush_audit(self) -> None:
        """Append the audit lines the open stores hold back (see history.AUDIT_FLUSH_SECONDS)."""
        with self._lock:  # (the daemon asks every 2 s: only stores holding lines back)
            pending = [
                agent_id
                for agent_id, opened in self._open.items()
                if isinstance(opened.backing, SessionStore) and opened.backing.history.audit_pending
            ]
        for agent_id in pending:
            # as a user of the store: a replaced one is closed (and flushed) only after
            with contextlib.suppress(OSError), self.backing(agent_id) as store:
                if isinstance(store, SessionStore):
                    store.history.flush_audit()

    def recent_audit(self) -> list[dict[str, object]]:
        """The newest :data:`RECENT_AUDIT_LINES` audit lines of every directory-era store
        shown, oldest first, with their agent in a state-dir mount (``.sessionfs/audit``).

        Read from the files, never by opening a store (a state dir of 600 agents would
        keep 600 of them open), at most :data:`RECENT_AUDIT_BYTES` in all.
        """
        self.flush_audit()
        agents: list[str | None] = list(self.agents()) if self.per_agent else [None]
        each = max(RECENT_AUDIT_BYTES // max(len(agents), 1), 4096)
        lines: list[dict[str, object]] = []
        for agent_id in agents:
            sqlite, identity = self._identity(agent_id)
            if sqlite or identity == (0, 0):
                continue  # no sessions.d/ (or the SQLite era: never read from it)
            with contextlib.suppress(OSError):
                entries = self._paths[agent_id][1]  # (cached by _identity)
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(entries, flags)
                try:
                    found = read_audit(fd, each)
                finally:
                    os.close(fd)
                if self.per_agent:
                    found = [{**line, "agent": agent_id} for line in found]
                lines += found
        # lines of one time stamp (two agents' writes within its precision) keep the
        # order they were read in, as an oldest-first list should
        newest = heapq.nlargest(
            RECENT_AUDIT_LINES,
            enumerate(lines),
            key=lambda item: (str(item[1]["time"]), item[0]),
        )
        return [line for _, line in reversed(newest)]

    def close(self) -> None:
        """At unmount: every store is retired (and closed once its last user leaves)."""
        with self._lock:
            for opened in self._open.values():
                self._retire(opened)
            self._open.clear()
