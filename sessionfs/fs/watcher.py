"""Follow writers behind the mount: inotify events become index updates.

With this running the mount can use long entry and attribute timeouts: whatever
changes a ``sessions.d/`` behind the mount (the gateway, ``sessionfs`` commands,
library users) is looked at again by :meth:`.index.Index.refresh`, which tells the
kernel exactly what changed.  Every event is followed by a stat; the daemon's own
changes are recognised by their versions (see :mod:`.index`), never by counting
the events they raise.

The watcher is supervised by itself: whatever fails while it follows the stores
(a ``chmod 000`` agents dir, ``max_user_watches`` reached, a store replaced while
it was being looked at) is logged once, every store whose watch is uncertain falls
back to asking the disk on each request with zero kernel cache timeouts
(:meth:`.index.Index.unwatch`), and the whole structure is looked at again every
:data:`RETRY_SECONDS` until it can be followed again.  It never ends the mount.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from inotify_simple import INotify, flags

from ..catalog import Catalog, WatchTarget
from ..errors import describe_error
from ..keys import filename_to_key
from ..sqlite_view import SqliteView
from .backings import Backings
from .index import Index
from .tree import Dir

log = logging.getLogger("sessionfs")

RETRY_SECONDS = 2.0  # how soon a watcher that could not follow everything tries again
POLL_SECONDS = 0.2  # how often SQLite-era stores are asked whether anything was committed
FULL_LOOK_SECONDS = 30.0  # how often every known key of a SQLite-era store is compared
OWN_MOVES = 64  # own renames whose first half was read and the second not yet, at most

# Entries change by rename (OpenClaw and sessionfs both write temp + rename) or,
# for in-place writers, end in CLOSE_WRITE; ATTRIB is a touch or chmod (the mtime
# is part of a version).  MODIFY and CREATE would only add events for every temp file.
ENTRY_EVENTS = (
    flags.DELETE
    | flags.ATTRIB
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.CLOSE_WRITE
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.EXCL_UNLINK
)
TREE_EVENTS = (
    flags.CREATE
    | flags.DELETE
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.DELETE_SELF
    | flags.MOVE_SELF
)


@dataclass
class _Watch:
    target: WatchTarget
    wd: int


class Watcher:
    """One inotify instance for the whole mount, awaited by trio (no polling)."""

    def __init__(self, catalog: Catalog, index: Index, backings: Backings) -> None:
        self.catalog = catalog
        self.index = index
        self.backings = backings
        self.inotify: INotify | None = None  # open while run() runs
        self.watches: dict[int, _Watch] = {}
        self.agents: set[str] = set()
        self.rescans = 0
        self.failures = 0
        self.own_renames = 0  # events of own commits that needed no stat
        self._own_moves: dict[int, str] = {}  # inotify cookie -> key, of own renames
        # What could not be followed at the last try (None: everything is followed).
        self.trouble: str | None = None
        self._unwatchable: dict[Path, str] = {}  # path -> why add_watch failed (warned once)
        self._full_look: dict[str | None, float] = {}  # SQLite store -> its next full look

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.inotify = inotify = INotify()
        try:
            await self._supervised(self.reconcile(initial=True))
            task_status.started()
            while True:
                if self.trouble is None:
                    await trio.lowlevel.wait_readable(inotify.fileno())
                else:
                    with trio.move_on_after(RETRY_SECONDS):
                        await trio.lowlevel.wait_readable(inotify.fileno())
                events = inotify.read(timeout=0)
                if self.trouble is not None:
                    await self._supervised(self.reconcile())
                await self._supervised(self.handle(events))
        finally:
            inotify.close()
            self.inotify = None
            self.watches.clear()

    async def _supervised(self, step: Coroutine[Any, Any, None]) -> None:
        """Run one step; a failure is logged once and degrades to asking the disk."""
        try:
            await step
        except Exception as exc:
            self.failures += 1
            self._lose_every_watch()
            why = describe_error(exc)
            if why != self.trouble:
                if isinstance(exc, OSError):
                    log.warning(
                        "cannot follow changes behind the mount: %s; every request asks the "
                        "disk until this clears (retrying every %.0f s)",
                        why,
                        RETRY_SECONDS,
                    )
                else:
                    log.error("internal error in the watcher; retrying", exc_info=exc)
            self.trouble = why
            return
        if self._unwatchable:
            self.trouble = "some directories cannot be watched"
        elif self.trouble is not None:
            log.info("following changes behind the mount again")
            self.trouble = None

    def _lose_every_watch(self) -> None:
        """After a failure nothing watched can be trusted: start again from nothing."""
        inotify = self.inotify
        for wd, watch in list(self.watches.items()):
            del self.watches[wd]
            if watch.target.kind == "entries":
                self.index.unwatch(watch.target.agent_id)
            if inotify is not None:
                with contextlib.suppress(OSError):
                    inotify.rm_watch(wd)

    # -- SQLite-era stores ----------------------------------------------------

    async def poll_databases(self) -> None:
        """Follow the gateway's commits to SQLite-era stores (no inotify there).

        ``PRAGMA data_version`` says cheaply whether another connection committed;
        only then are the keys the mount knows looked at again (one query), so a
        change shows within :data:`POLL_SECONDS` and the index can answer from
        memory in between.  A failure makes that store untrusted until it clears.
        """
        while True:
            await trio.sleep(POLL_SECONDS)
            try:
                await self._poll_once()
            except Exception as exc:  # never ends the mount
                log.warning("could not poll the SQLite stores: %s", describe_error(exc))

    async def _poll_once(self) -> None:
        for agent_id, view in await self.backings.thread(self.catalog.sqlite_views):
            parent = self.index.dir_of(agent_id)
            if parent is None:
                continue
            try:
                await self._poll_database(agent_id, parent, view)
            except Exception as exc:
                # a commit may now go unseen: ask the database on every request until
                # the next successful poll has looked at everything again
                self.index.unwatch(agent_id)
                log.warning("could not follow %s: %s", view.path, describe_error(exc))

    async def _poll_database(self, agent_id: str | None, parent: Dir, view: SqliteView) -> None:
        changed = await self.backings.thread(view.changed)
        now = trio.current_time()
        if not self.index.trusted(parent) or now >= self._full_look.get(agent_id, 0.0):
            # the first look, and every FULL_LOOK_SECONDS: a row changed without its
            # updated_at (not the gateway's entry writer) shows by then at the latest
            self._full_look[agent_id] = now + FULL_LOOK_SECONDS
            await self.backings.thread(view.changed_keys)  # from here on, incremental
            self.index.watch(agent_id)
            await self.rescan(agent_id)
        elif changed:
            keys = await self.backings.thread(view.changed_keys)
            if keys:
                await self.index.refresh(parent, keys)

    # -- events ------------------------------------------------------------

    async def handle(self, events: Sequence[object]) -> None:
        changed: dict[str | None, set[str]] = {}  # keys to look at again, per store
        structural = overflow = False
        for event in events:
            wd, mask, name, cookie = event.wd, event.mask, event.name, event.cookie  # type: ignore[attr-defined]
            if mask & flags.Q_OVERFLOW:
                overflow = True
                continue
            watch = self.watches.get(wd)
            if mask & flags.IGNORED:
                self.watches.pop(wd, None)
                structural = True
                continue
            if watch is None:
                continue
            if watch.target.kind != "entries" or mask & (flags.DELETE_SELF | flags.MOVE_SELF):
                structural = True
                continue
            agent_id = watch.target.agent_id
            if mask & flags.MOVED_FROM and (own := self.index.own_rename(agent_id, name)):
                self._own_moves[cookie] = own
                continue
            key = filename_to_key(name)
            if key is None:  # temps, dotfiles, other names are never sessions
                continue
            if mask & flags.MOVED_TO and self._own_moves.pop(cookie, None) == key:
                # an own commit's rename: the index holds what it made current.  Other
                # events of the key are looked at, even earlier ones: the kernel queues
                # a rename's events after its d_move, so an outside touch or write of
                # the new file can be queued first.  (Keeping the old version raises
                # none: a hard link's ATTRIB goes to watches of the file, not of its
                # directory.)
                self.own_renames += 1
                continue
            changed.setdefault(agent_id, set()).add(key)
        if overflow:
            log.warning("inotify queue overflowed; rescanning every store for changes")
        if structural or overflow:
            await self.reconcile()
        if overflow:
            await self.rescan_all()
        if len(self._own_moves) > OWN_MOVES:  # halves of renames out of the store
            self._own_moves.clear()
        for agent_id, keys in changed.items():
            parent = self.index.dir_of(agent_id)
            if parent is not None:  # else the kernel knows nothing of it yet
                await self.index.refresh(parent, sorted(keys), event=True)

    # -- structure ---------------------------------------------------------

    async def reconcile(self, *, initial: bool = False) -> None:
        """Watch what exists now; forget what went; rescan stores that came or were replaced.

        The *initial* pass only records what exists: the kernel has cached nothing yet.
        """
        inotify = self.inotify
        assert inotify is not None, "reconcile runs inside run()"
        targets = await self.backings.thread(self.catalog.watch_targets)
        wanted = {t.path: t for t in targets}
        for wd, watch in list(self.watches.items()):
            if wanted.get(watch.target.path) != watch.target:
                del self.watches[wd]
                if watch.target.kind == "entries":
                    self.index.unwatch(watch.target.agent_id)
                with contextlib.suppress(OSError):  # the directory went, and its watch with it
                    inotify.rm_watch(wd)
        watched = {w.target.path for w in self.watches.values()}
        fresh: list[WatchTarget] = []
        for target in targets:
            if target.path in watched:
                continue
            mask = ENTRY_EVENTS if target.kind == "entries" else TREE_EVENTS
            try:
                wd = inotify.add_watch(target.path, mask | flags.ONLYDIR | flags.DONT_FOLLOW)
            except OSError as exc:
                self._cannot_watch(target, exc)
                continue
            if self._unwatchable.pop(target.path, None) is not None:
                log.info("watching %s again", target.path)
            self.watches[wd] = _Watch(target, wd)
            if target.kind == "entries":
                fresh.append(target)
                self.index.watch(target.agent_id)
        if self.catalog.per_agent:
            agents = set(await self.backings.thread(self.catalog.agents))
            for agent in agents ^ self.agents if not initial else ():
                self.index.kernel.forget_name(self.index.tree.root.ino, agent)
            self.agents = agents
        if not initial:
            for target in fresh:
                await self.rescan(target.agent_id)
        gone = set(self._unwatchable) - {t.path for t in targets}
        for path in gone:
            del self._unwatchable[path]

    def _cannot_watch(self, target: WatchTarget, exc: OSError) -> None:
        """A directory that cannot be watched is asked on every request; warn once per cause."""
        if exc.errno == errno.ENOENT:
            return  # gone since it was listed: the next reconcile sees its parent's event
        why = describe_error(exc)
        if exc.errno == errno.ENOSPC:
            why = "the inotify watch limit is reached (raise fs.inotify.max_user_watches)"
        if self._unwatchable.get(target.path) != why:
            log.warning(
                "cannot watch %s: %s; requests there ask the disk each time "
                "(retrying every %.0f s)",
                target.path,
                why,
                RETRY_SECONDS,
            )
        self._unwatchable[target.path] = why

    async def rescan_all(self) -> None:
        for agent_id in [None] if not self.catalog.per_agent else sorted(self.agents):
            await self.rescan(agent_id)

    async def rescan(self, agent_id: str | None) -> None:
        """After lost events: every session the kernel may know is looked at again."""
        parent = self.index.dir_of(agent_id)
        if parent is None:
            return
        self.rescans += 1
        await self.index.rescan(parent)
