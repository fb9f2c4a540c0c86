"""The stores behind the mount, called from trio.

Every disk access of the FUSE layer goes through :meth:`Backings.run`, so the
calls can be counted (``.sessionfs/stats``) and kept off the trio thread that
serves requests for every session: a slow fsync for one session must not hold up
the others.  Most calls run in worker threads.  The two that every update makes
(the commit of one entry, and the stat that follows its inotify event) may run
*inline* instead, because a thread hop costs 0.1-0.25 ms each way, as much as
half of the commit itself (``scripts/bench``: an update through the mount went
from 2.2x to 1.5x the store API).  :class:`Pace` allows that only while the disk
answers fast: one inline call slower than :data:`SLOW_INLINE_SECONDS` sends
them all to threads, for a period that doubles while the disk stays slow.

Lock waits never happen in a worker thread (:meth:`Backings.run_locked`): a key
held by another process (a gateway stopped in a debugger, a hung NFS client)
would otherwise pin one thread per waiting request until trio's thread limit is
used up and every other session's writes hang too.  The store is only ever asked
to *try* the key's lock; waiting is a trio sleep, bounded by the request's deadline.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import trio

from ..catalog import Backing, Catalog
from ..errors import EntryNotFound, LockBusy, NoStore

log = logging.getLogger("sessionfs")
REPORT_EVERY = 10.0  # seconds between warnings about one locked key
SLOW_INLINE_SECONDS = 0.02  # an inline call this slow sends the next ones to threads
THREADED_SECONDS = 60.0  # for this long at first, doubling while the disk stays slow
MAX_THREADED_SECONDS = 3600.0

_T = TypeVar("_T")


class Pace:
    """Whether the short calls of an update may run on the trio thread now.

    An inline call blocks every request of the mount while it runs, which is
    cheaper than a thread hop only while the disk is fast.  A call slower than
    :data:`SLOW_INLINE_SECONDS` (a congested disk, a store being reopened) makes
    every call threaded for :data:`THREADED_SECONDS`, doubled each time the disk
    is found slow again, up to :data:`MAX_THREADED_SECONDS`; so a disk that stays
    slow costs the mount one such stall per hour at most.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.threaded_until = -math.inf  # trio time
        self.threaded_for = THREADED_SECONDS
        self.slow_calls = 0

    def inline(self) -> bool:
        return self.enabled and trio.current_time() >= self.threaded_until

    def took(self, seconds: float, what: str) -> None:
        if seconds < SLOW_INLINE_SECONDS:
            return
        self.slow_calls += 1
        now = trio.current_time()
        if now >= self.threaded_until + self.threaded_for:
            self.threaded_for = THREADED_SECONDS  # fast for as long again: start afresh
        else:
            self.threaded_for = min(self.threaded_for * 2, MAX_THREADED_SECONDS)
        self.threaded_until = now + self.threaded_for
        log.info(
            "a %s took %.0f ms; the disk is slow, so commits run in worker threads for %.0f s",
            what,
            seconds * 1e3,
            self.threaded_for,
        )


class Backings:
    """The catalog's stores, reached from trio."""

    def __init__(
        self,
        catalog: Catalog,
        limiter: trio.CapacityLimiter | None = None,
        pace: Pace | None = None,
    ) -> None:
        self.catalog = catalog
        self.limiter = limiter
        self.pace = pace or Pace()
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock_waits = 0  # calls that found a key locked by another process
        self._queues: dict[tuple[str | None, str], _Queue] = {}
        self._reported: dict[tuple[str | None, str], float] = {}  # key -> when last logged
        # Every wait for a key in progress, so that an unmount ends them all at once
        # instead of waiting out their deadlines.
        self._waits: set[trio.CancelScope] = set()
        self.stopping = False

    def stop(self) -> None:
        """The mount ends: every request waiting for a key gives up now (EBUSY)."""
        self.stopping = True
        for scope in self._waits:
            scope.cancel()

    @contextlib.contextmanager
    def _waiting(self, deadline: float) -> Iterator[trio.CancelScope]:
        """A wait for a key, ended by *deadline* or by :meth:`stop`."""
        with trio.move_on_at(deadline) as scope:
            if self.stopping:
                scope.cancel()
            self._waits.add(scope)
            try:
                yield scope
            finally:
                self._waits.discard(scope)

    async def run(
        self,
        agent_id: str | None,
        what: str,
        call: Callable[[Backing], _T],
        *,
        inline: bool = False,
    ) -> _T:
        """Run *call* on the store behind *agent_id*'s directory; *what* names it in the stats.

        With *inline*, a call on a directory store runs on the trio thread while
        :class:`Pace` allows it; the caller promises a call that only touches one
        or a few entries and never waits (locks are tried, not awaited).
        """
        self.calls[what] += 1

        def run() -> _T:
            try:
                with self.catalog.backing(agent_id) as backing:
                    return call(backing)
            except NoStore:  # only opening raises it
                raise EntryNotFound(f"agent {agent_id!r} has no store any more") from None

        if inline and self.pace.inline() and self.catalog.is_directory_store(agent_id):
            started = time.perf_counter()
            try:
                return run()
            finally:
                self.pace.took(time.perf_counter() - started, what)
        return await trio.to_thread.run_sync(run, limiter=self.limiter)

    async def thread(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run a catalog-level call (agents, watch targets, statvfs) in a worker thread."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def run_locked(
        self,
        agent_id: str | None,
        keys: tuple[str, ...],
        what: str,
        call: Callable[[Backing], _T],
        *,
        deadline: float,
        inline: bool = False,
    ) -> _T:
        """Run *call*, which must take the locks of *keys* with ``lock_wait=0``.

        The caller holds :meth:`serialized` for *keys*, so only it tries the disk
        lock; it retries with backoff until *deadline* (trio time), then gives up
        with :class:`LockBusy` (EBUSY) and a log line.
        """
        delay = 0.002
        while True:
            try:
                return await self.run(agent_id, what, call, inline=inline)
            except LockBusy:
                self.lock_waits += 1
                with self._waiting(deadline) as scope:
                    await trio.sleep(delay)
                if scope.cancelled_caught:
                    raise self._gave_up(agent_id, keys) from None
                delay = min(delay * 2, 0.1)

    @contextlib.asynccontextmanager
    async def serialized(
        self, agent_id: str | None, keys: tuple[str, ...], deadline: float
    ) -> AsyncIterator[None]:
        """Make the mount's operations on *keys* one at a time, in arrival order.

        A commit, an unlink and a rename of one key never interleave, so every
        outcome is one that some serial order of them gives.  Re-entrant for the
        task that holds it; keys are taken in order, so two tasks never deadlock.
        Waiting past *deadline* (trio time) gives up with :class:`LockBusy`.
        """
        idents = [(agent_id, key) for key in sorted(set(keys))]
        held: list[_Queue] = []
        try:
            for ident in idents:
                queue = self._queues.setdefault(ident, _Queue())
                if queue.try_enter():  # the common case: nobody else works on the key
                    held.append(queue)
                    continue
                entered = False
                with self._waiting(deadline):
                    await queue.enter()
                    entered = True
                if not entered:
                    raise self._gave_up(agent_id, keys)
                held.append(queue)
            yield
        finally:
            for queue in reversed(held):
                queue.leave()
            for ident in idents:
                unused = self._queues.get(ident)
                if unused is not None and unused.idle():
                    del self._queues[ident]

    def _gave_up(self, agent_id: str | None, keys: tuple[str, ...]) -> LockBusy:
        """The error for a request that waited for *keys* until its deadline.

        Logged as a warning once per key every :data:`REPORT_EVERY` seconds: two
        hundred writers stuck on one key are one problem, not two hundred.
        """
        where = f"{agent_id}/" if agent_id is not None else ""
        names = ", ".join(f"{where}{key}" for key in keys)
        if self.stopping:
            message = f"session {names}: the mount is ending; gave up waiting (EBUSY)"
            log.debug("%s", message)
            return LockBusy(keys[0], message)
        message = f"session {names} is locked by another process; gave up waiting (EBUSY)"
        ident, now = (agent_id, keys[0]), trio.current_time()
        if now - self._reported.get(ident, -REPORT_EVERY) >= REPORT_EVERY:
            self._reported[ident] = now
            log.warning("%s", message)
        else:
            log.debug("%s", message)
        return LockBusy(keys[0], message)


class _Queue:
    """A trio lock that the task holding it may take again (nested operations on a key)."""

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._owner: trio.lowlevel.Task | None = None
        self._depth = 0

    def try_enter(self) -> bool:
        """Enter without waiting, if nobody else holds it (no checkpoint)."""
        task = trio.lowlevel.current_task()
        if self._owner is task:
            self._depth += 1
            return True
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            return False
        self._owner, self._depth = task, 1
        return True

    async def enter(self) -> None:
        if self.try_enter():
            return
        await self._lock.acquire()
        self._owner, self._depth = trio.lowlevel.current_task(), 1

    def leave(self) -> None:
        self._depth -= 1
        if not self._depth:
            self._owner = None
            self._lock.release()

    def idle(self) -> bool:
        return not self._lock.locked() and not self._lock.statistics().tasks_waiting
