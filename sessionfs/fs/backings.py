"""The stores behind the mount, called from trio.

Every disk access of the FUSE layer goes through :meth:`Backings.run`, so the
calls can be counted (``.sessionfs/stats``) and kept off the trio thread that
serves requests for every session: a slow fsync for one session must not hold up
the others.  Calls run in worker threads; the two that every update makes go to
:mod:`.quick`, which answers them faster and bounds how long the trio thread
ever waits for them.

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
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import trio

from ..catalog import Backing, Catalog
from ..errors import EntryNotFound, LockBusy, NoStore
from .quick import QuickCalls

log = logging.getLogger("sessionfs")
REPORT_EVERY = 10.0  # seconds between warnings about one locked key

_T = TypeVar("_T")


class Backings:
    """The catalog's stores, reached from trio."""

    def __init__(
        self,
        catalog: Catalog,
        limiter: trio.CapacityLimiter | None = None,
        quick: QuickCalls | None = None,
    ) -> None:
        self.catalog = catalog
        self.limiter = limiter
        self.quick = quick or QuickCalls()
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock_waits = 0  # calls that found a key locked by another process
        self._threaded = 0  # store calls running in worker threads now
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
        quick: bool = False,
    ) -> _T:
        """Run *call* on the store behind *agent_id*'s directory; *what* names it in the stats.

        With *quick*, the call may go to :class:`~.quick.QuickCalls` instead of a
        worker thread; the caller promises a call that touches one or a few small
        entries and never waits (locks are tried, not awaited).
        """
        self.calls[what] += 1

        def run() -> _T:
            try:
                with self.catalog.backing(agent_id) as backing:
                    return call(backing)
            except NoStore:  # only opening raises it
                raise EntryNotFound(f"agent {agent_id!r} has no store any more") from None

        if quick and self.quick.available(threads_busy=self._threaded > 0):
            self.calls[f"{what} (quick)"] += 1
            return await self.quick.run(run, what)
        self._threaded += 1
        try:
            return await trio.to_thread.run_sync(run, limiter=self.limiter)
        finally:
            self._threaded -= 1

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
        quick: bool = False,
    ) -> _T:
        """Run *call*, which must take the locks of *keys* with ``lock_wait=0``.

        The caller holds :meth:`serialized` for *keys*, so only it tries the disk
        lock; it retries with backoff until *deadline* (trio time), then gives up
        with :class:`LockBusy` (EBUSY) and a log line.
        """
        delay = 0.002
        while True:
            try:
                return await self.run(agent_id, what, call, quick=quick)
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
                if self.stopping or trio.current_time() >= deadline:
                    raise self._gave_up(agent_id, keys)
                queue = self._queues.get(ident)
                if queue is None:
                    queue = self._queues[ident] = _Queue()
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
        self._waiting = 0  # tasks in enter(), cheaper to keep than the lock's statistics()

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
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        self._owner, self._depth = trio.lowlevel.current_task(), 1

    def leave(self) -> None:
        self._depth -= 1
        if not self._depth:
            self._owner = None
            self._lock.release()

    def idle(self) -> bool:
        return not self._lock.locked() and not self._waiting
