"""Requests as the kernel sees them: every failure an errno, every request counted.

:func:`guarded` wraps each ``Operations`` handler, so no exception can end
``pyfuse3.main`` (which would leave a dead mount); :class:`Rejections` keeps the
writes that were refused, because a shell redirect exits 0 even then and the
user needs to see the reason somewhere.
"""

from __future__ import annotations

import collections
import datetime as dt
import errno
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3

from ..errors import SessionFSError
from ..keys import NAME_MAX
from ..shell import printable

log = logging.getLogger("sessionfs")

MAX_REJECTIONS = 100

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Requests:
    """How many requests of each kind were answered, and the time spent in each kind."""

    def __init__(self, *, debug: bool = False) -> None:
        self.debug = debug
        self.counts: collections.Counter[str] = collections.Counter()
        self.seconds: collections.defaultdict[str, float] = collections.defaultdict(float)


class HasRequests(Protocol):
    @property
    def requests(self) -> Requests: ...


_Self = TypeVar("_Self", bound=HasRequests)


def fuse_error(exc: BaseException, request: str) -> pyfuse3.FUSEError:
    """The errno *exc* stands for; unexpected exceptions are logged with their traceback."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, SessionFSError):
        log.debug("%s: %s", request, exc)
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    if isinstance(exc, OSError):
        log.warning("%s failed: %s", request, exc)
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    log.error("internal error in %s; answered EIO", request, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


def guarded(
    fn: Callable[Concatenate[_Self, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[_Self, _P], Coroutine[Any, Any, _R]]:
    """Answer every failure of a handler with an errno, and count the request."""
    name = fn.__name__

    async def handler(self: _Self, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        requests = self.requests
        requests.counts[name] += 1
        if requests.debug:
            log.debug("request %s%s", name, describe(args))
        started = time.perf_counter()
        try:
            return await fn(self, *args, **kwargs)
        except Exception as exc:
            raise fuse_error(exc, f"{name}{describe(args)}") from None
        finally:
            requests.seconds[name] += time.perf_counter() - started

    functools.update_wrapper(handler, fn)
    return handler


def describe(args: tuple[object, ...]) -> str:
    """A request's arguments for the log: numbers and names, never buffers."""
    shown = []
    for arg in args:
        if isinstance(arg, bytes) and len(arg) <= NAME_MAX:
            shown.append(arg.decode("utf-8", "replace"))
        elif isinstance(arg, int | str):
            shown.append(str(arg))
    return "(" + ", ".join(shown) + ")"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A write that did not reach the store, for ``.sessionfs/errors``."""

    when: float
    path: str
    code: int
    reason: str

    def line(self) -> str:
        stamp = dt.datetime.fromtimestamp(self.when, dt.UTC).isoformat(timespec="milliseconds")
        name = errno.errorcode.get(self.code, str(self.code))
        return f"{stamp.replace('+00:00', 'Z')}  {printable(self.path)}  {name}  {self.reason}"


class Rejections:
    """The most recent refused writes, newest last; each is also a log line."""

    def __init__(self, maxlen: int = MAX_REJECTIONS) -> None:
        self.recent: collections.deque[Rejection] = collections.deque(maxlen=maxlen)
        self.total = 0
        # per agent directory ("" outside one: a single store's mount, or its root)
        self.by_agent: collections.Counter[str] = collections.Counter()

    def add(self, path: str, exc: OSError) -> pyfuse3.FUSEError:
        """Record that the write to *path* was refused; returns the error for the caller."""
        code = exc.errno or errno.EIO
        self.recent.append(Rejection(time.time(), path, code, str(exc)))
        self.total += 1
        agent, slash, _ = path.partition("/")
        self.by_agent[agent if slash else ""] += 1
        log.warning("rejected write to %s: %s", path, exc)
        return pyfuse3.FUSEError(code)

    def render(self) -> bytes:
        return "".join(r.line() + "\n" for r in self.recent).encode()
