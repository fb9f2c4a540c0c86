"""Follow writers behind the mount: inotify events become index updates.

With this running the mount can use long entry and attribute timeouts: whatever
changes a ``sessions.d/`` behind the mount (the gateway, ``sessionfs`` commands,
library users) is looked at again by :meth:`.index.Index.refresh`, which tells the
kernel exactly what changed.  Every event is followed by a stat; the daemon's own
changes are recognised by their versions (see :mod:`.index`), never by counting
the events they raise.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import trio
from inotify_simple import INotify, flags

from ..catalog import Catalog, WatchTarget
from ..keys import filename_to_key
from .backings import Backings
from .index import Index

log = logging.getLogger("sessionfs")

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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.inotify = inotify = INotify()
        try:
            await self.reconcile(initial=True)
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(inotify.fileno())
                await self.handle(inotify.read(timeout=0))
        finally:
            inotify.close()
            self.inotify = None
            self.watches.clear()

    # -- events ------------------------------------------------------------

    async def handle(self, events: list[object]) -> None:
        changed: dict[str | None, set[str]] = {}  # keys to look at again, per store
        structural = overflow = False
        for event in events:
            wd, mask, name = event.wd, event.mask, event.name  # type: ignore[attr-defined]
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
            key = filename_to_key(name)
            if key is not None:  # temps, dotfiles, other names are never sessions
                changed.setdefault(watch.target.agent_id, set()).add(key)
        if overflow:
            log.warning("inotify queue overflowed; rescanning every store for changes")
        if structural or overflow:
            await self.reconcile()
        if overflow:
            await self.rescan_all()
        for agent_id, keys in changed.items():
            parent = self.index.dir_of(agent_id)
            if parent is not None:  # else the kernel knows nothing of it yet
                await self.index.refresh(parent, sorted(keys))

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
                log.debug("cannot watch %s: %s", target.path, exc)
                continue
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
