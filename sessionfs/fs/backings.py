"""The stores behind the mount, called in worker threads.

Every disk access of the FUSE layer goes through :meth:`Backings.run`, so a slow
fsync or a lock wait for one session never holds up the trio thread that serves
requests for the others, and so the calls can be counted (``.sessionfs/stats``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TypeVar

import trio

from ..catalog import Backing, Catalog
from ..errors import EntryNotFound, NoStore

_T = TypeVar("_T")


class Backings:
    """The catalog's stores, reached from trio."""

    def __init__(self, catalog: Catalog, limiter: trio.CapacityLimiter | None = None) -> None:
        self.catalog = catalog
        self.limiter = limiter
        self.calls: collections.Counter[str] = collections.Counter()

    async def run(self, agent_id: str | None, what: str, call: Callable[[Backing], _T]) -> _T:
        """Run *call* on the store behind *agent_id*'s directory; *what* names it in the stats."""
        self.calls[what] += 1

        def run() -> _T:
            try:
                backing = self.catalog.backing(agent_id)
            except NoStore:
                raise EntryNotFound(f"agent {agent_id!r} has no store any more") from None
            return call(backing)

        return await trio.to_thread.run_sync(run, limiter=self.limiter)

    async def thread(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run a catalog-level call (agents, watch targets, statvfs) in a worker thread."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
