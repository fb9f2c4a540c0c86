"""The errors sessionfs raises.

Every error is an :class:`OSError` carrying the errno a caller (a FUSE request, a
CLI exit path) should see, so layers above the store translate errors without a
table of their own and plain I/O errors (ENOSPC, EACCES) flow through unchanged.
"""

from __future__ import annotations

import errno as _errno


class SessionFSError(OSError):
    """Base class; ``str()`` is the readable reason, ``.errno`` the code to report."""

    default_errno = _errno.EIO

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(self.default_errno if code is None else code, message)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[object, ...]:
        # OSError's own pickling passes (errno, strerror) positionally, which
        # our keyword-only signature does not take; worker processes need this.
        return (_rebuild, (type(self), str(self.strerror), self.errno))


def _rebuild(cls: type[SessionFSError], message: str, code: int) -> SessionFSError:
    return cls(message, code=code)


class InvalidKey(SessionFSError):
    """A session key (or a name standing for one) that cannot be stored."""

    default_errno = _errno.EINVAL


class InvalidEntry(SessionFSError):
    """Content that is not a valid session entry; EFBIG when only the size is wrong."""

    default_errno = _errno.EINVAL


class EntryNotFound(SessionFSError):
    default_errno = _errno.ENOENT


class EntryExists(SessionFSError):
    default_errno = _errno.EEXIST


class UnsafeEntry(SessionFSError):
    """Something that is not a regular file sits where an entry should be.

    sessionfs never reads, follows or replaces it (a symlink could point anywhere).
    """

    default_errno = _errno.EPERM


class LockTimeout(SessionFSError):
    default_errno = _errno.ETIMEDOUT


class LockBusy(SessionFSError):
    """Another holder has the lock of a session; the caller chose not to wait (longer)."""

    default_errno = _errno.EBUSY

    def __init__(self, key: str, message: str | None = None) -> None:
        super().__init__(message or f"session {key!r} is locked by another process")
        self.key = key

    def __reduce__(self) -> tuple[object, ...]:
        return (LockBusy, (self.key, str(self)))


class NoStore(SessionFSError):
    """A SOURCE that holds no session store."""

    default_errno = _errno.ENOENT


class ReadOnlyStore(SessionFSError):
    default_errno = _errno.EROFS


def describe_error(exc: BaseException) -> str:
    """One readable line for a log or a terminal: "what: why", never a traceback."""
    if isinstance(exc, SessionFSError):
        return str(exc)
    if isinstance(exc, OSError):
        reason = exc.strerror or _errno.errorcode.get(exc.errno or 0, "error")
        where = exc.filename if exc.filename is not None else None
        return f"{where}: {reason}" if where is not None else str(reason)
    return f"{type(exc).__name__}: {exc}"
