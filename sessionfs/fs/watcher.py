"""Follow writers behind the mount: inotify events become kernel cache invalidations.

With this running the mount can use long entry and attribute timeouts and keep
page caches across opens: whatever changes a ``sessions.d/`` behind the mount (the
gateway, ``sessionfs`` commands, library users) makes the kernel drop exactly what
it cached for that session.  Invalidations run in worker threads, never inside a
request handler, so they cannot deadlock with a request for the same entry.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pyfuse3
import trio
from inotify_simple import INotify, flags

from ..catalog import Catalog, WatchTarget
from ..keys import filename_to_key
from .tree import Dir, File, Seen, Tree

log = logging.getLogger("sessionfs")

# Entries change by rename (OpenClaw and sessionfs both write temp + rename) or,
# for in-place writers, end in CLOSE_WRITE; MODIFY and CREATE would only add
# events for every temp file.
ENTRY_EVENTS = (
    flags.DELETE
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
OWN_CHANGE_TTL = 5.0
_T = TypeVar("_T")


class OwnChanges:
    """Changes the daemon made itself: their events need no invalidation.

    Each expected event is consumed once; an expectation that no event meets
    expires, so a lost one can never hide an outside change for long.
    """

    def __init__(self) -> None:
        self._expected: dict[tuple[str | None, str], list[float]] = {}

    def expect(self, agent_id: str | None, key: str) -> None:
        self._expected.setdefault((agent_id, key), []).append(time.monotonic() + OWN_CHANGE_TTL)

    def cancel(self, agent_id: str | None, key: str) -> None:
        stamps = self._expected.get((agent_id, key))
        if stamps:
            stamps.pop()
            if not stamps:
                del self._expected[(agent_id, key)]

    def consume(self, agent_id: str | None, key: str) -> bool:
        stamps = self._expected.get((agent_id, key))
        if not stamps:
            return False
        now = time.monotonic()
        while stamps and stamps[0] < now:
            stamps.pop(0)
        found = bool(stamps)
        if found:
            stamps.pop(0)
        if not stamps:
            del self._expected[(agent_id, key)]
        return found


@dataclass
class _Watch:
    target: WatchTarget
    wd: int


class Watcher:
    """One inotify instance for the whole mount, awaited by trio (no polling)."""

    def __init__(
        self,
        catalog: Catalog,
        tree: Tree,
        own: OwnChanges,
        *,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.catalog = catalog
        self.tree = tree
        self.own = own
        self.limiter = limiter
        self.inotify = INotify()
        self.watches: dict[int, _Watch] = {}
        self.stores: set[str | None] = set()  # agents (None: the single store) under watch
        self.agents: set[str] = set()
        self.invalidations = 0
        self.rescans = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.reconcile(initial=True)
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(self.inotify.fileno())
                await self.handle(self.inotify.read(timeout=0))
        finally:
            self.inotify.close()

    def watches_store(self, agent_id: str | None) -> bool:
        """Whether every change to this store reaches us (so its index can be trusted)."""
        return agent_id in self.stores

    async def _thread(self, fn: Callable[..., _T], *args: object) -> _T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def _dir_of(self, agent_id: str | None) -> Dir | None:
        return self.tree.root if agent_id is None else self.tree.agent_dirs.get(agent_id)

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
            if key is None:  # temps, dotfiles, other names: never sessions
                continue
            if self.own.consume(watch.target.agent_id, key):
                continue
            changed.setdefault(watch.target.agent_id, set()).add(key)
        if overflow:
            log.warning("inotify queue overflowed; rescanning every store for changes")
        if structural or overflow:
            await self.reconcile()
        if overflow:
            await self.rescan_all()
        for agent_id, keys in changed.items():
            await self.refresh(agent_id, sorted(keys))

    async def refresh(self, agent_id: str | None, keys: list[str]) -> None:
        """Look at *keys* on disk again; update the index; make the kernel drop what changed."""
        parent = self._dir_of(agent_id)
        if parent is None or not keys:
            return

        def stat_all() -> list[os.stat_result | None]:
            return self.catalog.backing(agent_id).stat_many(keys)

        stamp = self.tree.bump(parent)  # before the stat: a commit landing meanwhile knows better
        try:
            stats = await self._thread(stat_all)
        except OSError:
            stats = [None] * len(keys)
        for key, st in zip(keys, stats, strict=True):
            if key in parent.away:
                continue  # renamed to a backup through the mount: not shown under its name
            seen = None if st is None else Seen.of(st)
            node = self.tree.known_session(parent, key)
            if node is None:
                if seen is not None and parent.indexed:  # a new entry
                    self.tree.learn(self.tree.session(parent, key), seen, stamp)
            elif not node.pending and self.tree.learn(node, seen, stamp):
                node.cached_version = None
                await self._invalidate(parent, node, gone=seen is None)

    async def _invalidate(self, parent: Dir, node: File, *, gone: bool) -> None:
        """Make the kernel drop what it cached: attributes and pages, and the name if it went."""
        self.invalidations += 1
        await self._kernel(pyfuse3.invalidate_inode, node.ino)
        if gone:
            await self._kernel(pyfuse3.invalidate_entry, parent.ino, node.name.encode())
        log.debug("%s %r changed behind the mount", "removed" if gone else "updated", node.key)

    async def _kernel(self, fn: Callable[..., None], *args: object) -> None:
        try:
            await self._thread(fn, *args)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel did not know it
                log.warning("cache invalidation failed: %s", exc)

    # -- structure ---------------------------------------------------------

    async def reconcile(self, *, initial: bool = False) -> None:
        """Watch what exists now; forget what went; rescan stores that came or were replaced.

        The *initial* pass only records what exists: the kernel has cached nothing yet.
        """
        targets = await self._thread(self.catalog.watch_targets)
        wanted = {t.path: t for t in targets}
        for wd, watch in list(self.watches.items()):
            if wanted.get(watch.target.path) != watch.target:
                del self.watches[wd]
                if watch.target.kind == "entries":
                    self._untrust(watch.target.agent_id)
                with contextlib.suppress(OSError):  # the directory went, and its watch with it
                    self.inotify.rm_watch(wd)
        watched = {w.target.path for w in self.watches.values()}
        fresh: list[WatchTarget] = []
        for target in targets:
            if target.path in watched:
                continue
            mask = ENTRY_EVENTS if target.kind == "entries" else TREE_EVENTS
            try:
                wd = self.inotify.add_watch(target.path, mask | flags.ONLYDIR | flags.DONT_FOLLOW)
            except OSError as exc:
                log.debug("cannot watch %s: %s", target.path, exc)
                continue
            self.watches[wd] = _Watch(target, wd)
            if target.kind == "entries":
                fresh.append(target)
                self.stores.add(target.agent_id)
        if self.catalog.per_agent:
            agents = set(await self._thread(self.catalog.agents))
            root = self._dir_of(None)
            for agent in agents ^ self.agents if not initial else ():
                if root is not None:
                    await self._kernel(pyfuse3.invalidate_entry, root.ino, agent.encode())
            self.agents = agents
        if not initial:
            for target in fresh:
                await self.rescan(target.agent_id)

    def _untrust(self, agent_id: str | None) -> None:
        self.stores.discard(agent_id)
        parent = self._dir_of(agent_id)
        if parent is not None:
            parent.indexed = False

    async def rescan_all(self) -> None:
        for agent_id in [None] if not self.catalog.per_agent else sorted(self.agents):
            await self.rescan(agent_id)

    async def rescan(self, agent_id: str | None) -> None:
        """After lost events: every session the kernel may know is looked at again."""
        parent = self._dir_of(agent_id)
        if parent is None:
            return
        self.rescans += 1
        parent.indexed = False  # rebuilt by the next listing
        await self.refresh(agent_id, list(parent.sessions))
