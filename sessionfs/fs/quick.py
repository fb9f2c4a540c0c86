"""The two store calls of every update, answered without trio's thread hop, never stalling.

An update through the mount makes one small store call, the commit of one entry
(lock try, temp file, fsync, rename, fsync of the directory: ~0.6 ms on a healthy
disk), and an outside change one more, the stat that follows its inotify event.  A
``trio.to_thread`` round trip costs 0.1-0.25 ms each way on top (the result comes
back through trio's wakeup socket and scheduler), a third of the update
(``scripts/bench``).

Here one dedicated thread takes such a call, and the trio thread waits for it on a
bare lock, which costs ~30 us there and back (~65 us in the daemon), but at most
:data:`WAIT_SECONDS`: the trio thread serves every request of the mount, so it is
never held longer than that, even by an fsync that never returns (a frozen or
dead disk) or a store being reopened.  A call that outlives the wait is awaited
like any threaded one (and no call is handed over while it runs), and when
:data:`SLOW_CALLS` of the last :data:`RECENT_CALLS` calls were slower than
:data:`SLOW_SECONDS` (or outlived the wait), every call goes to ordinary worker
threads for :data:`THREADED_SECONDS`, doubled each time the disk is found slow
again, up to :data:`MAX_THREADED_SECONDS`.  One slow call is not enough: the
first commit after a mount, or after the gateway wrote much, often flushes the
journal or reads cold metadata, and takes 5-60 ms on a healthy disk; switching
then would cost every update of the next minute a thread hop.  While the
dedicated thread is still busy (with a call that outlived its wait), new calls
never queue behind it, and while store calls run in worker threads, new calls
join them there.  Concurrent updates through the mount thus commit one after
another on a fast disk (each holding the trio thread for its ~0.6 ms), as they
did in worker threads, which share the same journal and GIL.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

log = logging.getLogger("sessionfs")

WAIT_SECONDS = 0.02  # the longest the trio thread waits for a quick call
SLOW_SECONDS = 0.005  # calls this slow, SLOW_CALLS of the last RECENT_CALLS, mean a slow disk
SLOW_CALLS = 3
RECENT_CALLS = 8
THREADED_SECONDS = 60.0  # for this long at first, doubling while the disk stays slow
MAX_THREADED_SECONDS = 3600.0
THREAD_NAME = "sessionfs-quick"

_T = TypeVar("_T")


class _Call(Generic[_T]):
    """One call handed to the quick thread, and its outcome once it has :meth:`finished`.

    Completion is a bare lock, taken at creation and released by the quick thread:
    waiting on it is one C call, where a :class:`threading.Event` (a condition
    variable written in Python) costs the trio thread ~20 us more per update.
    """

    def __init__(self, fn: Callable[[], _T]) -> None:
        self.fn = fn
        self._done = threading.Lock()
        self._done.acquire()
        self._finished = False
        self.seconds = 0.0
        self._result: _T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self._result = self.fn()
        except BaseException as exc:  # handed to the waiting request, raised there
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - started
            self._finished = True
            self._done.release()

    def finished(self) -> bool:
        return self._finished

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the call finished, waiting up to *timeout* seconds (None: for ever).

        Waiters take the lock in turn and hand it on.  A call has one waiter at a time:
        the trio thread, then, if it gave up, a worker thread (and later checks read
        :meth:`finished`), so a waiter that a raising signal handler interrupted
        while holding the lock can keep no other waiting.
        """
        if self._finished:
            return True
        if not self._done.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            return self._finished
        try:
            return True
        finally:
            self._done.release()  # for the next waiter

    def outcome(self) -> _T:
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


class QuickCalls:
    """Runs short store calls in one thread that the trio thread waits for, briefly."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        wait_seconds: float = WAIT_SECONDS,
        slow_seconds: float = SLOW_SECONDS,
    ) -> None:
        self.enabled = enabled
        self.wait_seconds = wait_seconds
        self.slow_seconds = slow_seconds
        self.threaded_until = -math.inf  # trio time
        self.threaded_for = THREADED_SECONDS
        self.slow_calls = 0
        self._recent_slow: collections.deque[bool] = collections.deque(maxlen=RECENT_CALLS)
        self._calls: queue.SimpleQueue[_Call[object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._current: _Call[object] | None = None  # the last call handed over

    def available(self, *, threads_busy: bool = False) -> bool:
        """Whether a call handed over now would start at once, on a fast disk.

        *threads_busy*: store calls are running in worker threads; the disk is then
        shared anyway, and a call joins them rather than holding the trio thread.
        """
        idle = self._current is None or self._current.finished()
        return (
            self.enabled
            and idle
            and not threads_busy
            and trio.current_time() >= self.threaded_until
        )

    async def run(self, fn: Callable[[], _T], what: str) -> _T:
        """Run *fn* in the quick thread; the caller checked :meth:`available`."""
        call = _Call(fn)
        self._current = call  # type: ignore[assignment]
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=THREAD_NAME, daemon=True)
            self._thread.start()
        self._calls.put(call)  # type: ignore[arg-type]
        if not call.wait(self.wait_seconds):
            self._took(what, None)
            # the disk hangs or crawls: wait like any threaded call (which an unmount
            # also waits for: a commit is never left running behind it), holding no one up
            await trio.to_thread.run_sync(call.wait)
        else:
            self._took(what, call.seconds)
        return call.outcome()

    def _serve(self) -> None:
        while True:
            self._calls.get().run()

    def _took(self, what: str, seconds: float | None) -> None:
        """A call ended (or outlived the wait: *seconds* None); the disk is slow when
        :data:`SLOW_CALLS` of the last :data:`RECENT_CALLS` were."""
        slow = seconds is None or seconds >= self.slow_seconds
        self._recent_slow.append(slow)
        if slow and sum(self._recent_slow) >= SLOW_CALLS:
            self._slow(what, seconds)

    def _slow(self, what: str, seconds: float | None) -> None:
        self.slow_calls += 1
        self._recent_slow.clear()
        now = trio.current_time()
        if now >= self.threaded_until + self.threaded_for:
            self.threaded_for = THREADED_SECONDS  # fast for as long again: start afresh
        else:
            self.threaded_for = min(self.threaded_for * 2, MAX_THREADED_SECONDS)
        self.threaded_until = now + self.threaded_for
        took = f"took {seconds * 1e3:.0f} ms" if seconds is not None else "is still running"
        log.info(
            "a %s %s; the disk is slow, so updates use worker threads for %.0f s",
            what,
            took,
            self.threaded_for,
        )
