"""``.sessionfs/history/``: every kept version of every key, as read-only files.

The store keeps each version that stopped being current under
``sessions.d/.history/<entry file name>/<time>.json`` (:mod:`sessionfs.history`).
The mount shows them as ``.sessionfs/history/<agent>/<key>/<time>.json`` (in a
mount of one store, ``.sessionfs/history/<key>/<time>.json``), removed keys
included, so that ``diff``, ``jq`` and ``cp`` work on them: ``cp`` of a version
over the session is an undo, itself a change the history keeps.

Nothing here is cached beyond what the kernel holds: every lookup and listing
asks the store (a kept version never changes, but new ones come and old ones are
pruned), and nodes go when the kernel forgets them (:meth:`.tree.Tree.forget`).
A SQLite-era or JSON-era agent keeps no history: its directory is empty.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TypeVar

import pyfuse3

from ..catalog import Backing, Catalog
from ..errors import EntryNotFound
from ..history import History, Kept
from ..keys import SUFFIX, display_to_key, filename_to_key, key_to_display, key_to_filename
from ..store import SessionStore
from .backings import Backings
from .tree import Dir, HistoryPlace, KeptVersion, Node, Tree

log = logging.getLogger("sessionfs")

HISTORY_NAME = "history"
_T = TypeVar("_T")


def key_dir_name(key: str) -> str:
    """A key's directory in the history: its name in the mount without ``.json``."""
    return key_to_display(key)[: -len(SUFFIX)]


class HistoryView:
    """Answers lookups, listings and reads below ``.sessionfs/history/``."""

    def __init__(self, tree: Tree, backings: Backings, catalog: Catalog, control_dir: Dir) -> None:
        self.tree = tree
        self.backings = backings
        self.catalog = catalog
        self.top = tree.subdir(control_dir, HISTORY_NAME)
        self.top.history = HistoryPlace(None, agents=catalog.per_agent)

    async def find(self, parent: Dir, name: str) -> Node:
        """The node *name* stands for in history directory *parent*, or ENOENT."""
        place = parent.history
        assert place is not None
        if place.agents:
            if not await self.backings.thread(self.catalog.has_agent, name):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._subdir(parent, name, HistoryPlace(name))
        if place.file_name is None:
            key = display_to_key(name + SUFFIX)
            if key is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            file_name = key_to_filename(key)
            if not await self._ask(place.agent_id, lambda h: h.has(file_name), False):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._subdir(parent, name, HistoryPlace(place.agent_id, file_name))
        for kept in await self._versions(place.agent_id, place.file_name):
            if kept.name == name:
                return self._version(parent, kept)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def listing(self, parent: Dir) -> list[tuple[str, Node | None, str | None]]:
        """Every name in history directory *parent* now, with its node."""
        place = parent.history
        assert place is not None
        if place.agents:
            agents = await self.backings.thread(self.catalog.agents)
            return [
                (agent, self._subdir(parent, agent, HistoryPlace(agent)), None) for agent in agents
            ]
        if place.file_name is None:
            listed: list[tuple[str, Node | None, str | None]] = []
            no_names: list[str] = []
            for file_name in await self._ask(place.agent_id, History.names, no_names):
                key = filename_to_key(file_name)
                if key is not None:
                    name = key_dir_name(key)
                    dir_place = HistoryPlace(place.agent_id, file_name)
                    listed.append((name, self._subdir(parent, name, dir_place), None))
            return listed
        versions = await self._versions(place.agent_id, place.file_name)
        return [(kept.name, self._version(parent, kept), None) for kept in versions]

    async def read(self, node: KeptVersion) -> bytes:
        """The bytes of a kept version (ENOENT once pruned or purged)."""
        place = node.parent.history if node.parent is not None else None
        assert place is not None and place.file_name is not None
        file_name, limit = place.file_name, self.catalog.max_entry_bytes
        kept = Kept(node.name, 0.0, node.size, node.mtime_ns / 1e9)
        try:
            data = await self._ask(place.agent_id, lambda h: h.read(file_name, kept, limit), None)
        except FileNotFoundError:  # pruned or purged since it was listed
            data = None
        if data is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return data

    # -- nodes -----------------------------------------------------------------

    def _subdir(self, parent: Dir, name: str, place: HistoryPlace) -> Node:
        return self.tree.history_child(
            parent, name, lambda ino: Dir(ino, name=name, parent=parent, mode=0o500, history=place)
        )

    def _version(self, parent: Dir, kept: Kept) -> Node:
        node = self.tree.history_child(
            parent,
            kept.name,
            lambda ino: KeptVersion(ino, parent=parent, name=kept.name),
        )
        if isinstance(node, KeptVersion):  # (its size and time: as the disk says now)
            node.size, node.mtime_ns = kept.size, int(kept.began * 1e9)
        return node

    # -- the store -------------------------------------------------------------

    async def _versions(self, agent_id: str | None, file_name: str) -> list[Kept]:
        return await self._ask(agent_id, lambda h: h.versions(file_name), [])

    async def _ask(self, agent_id: str | None, call: Callable[[History], _T], absent: _T) -> _T:
        """*call* on the history of *agent_id*'s store (*absent* for a store without one:
        a SQLite-era or JSON-era agent), in a worker thread."""

        def ask(backing: Backing) -> _T:
            return call(backing.history) if isinstance(backing, SessionStore) else absent

        try:
            return await self.backings.run(agent_id, "history", ask)
        except EntryNotFound:  # the agent has no store any more
            raise pyfuse3.FUSEError(errno.ENOENT) from None
