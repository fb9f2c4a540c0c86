"""Open files: what each handle reads, what it has written, and when that is committed.

These rules are plain Python so they can be tested without a mount; the FUSE
operations only call them.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from ..errors import InvalidEntry
from ..history import Actor
from ..store import Version
from ..transcripts import TranscriptStream
from .tree import File, Node

SUFFIX = ".json"
TRANSCRIPT_SUFFIX = ".jsonl"


def is_transcript_name(name: str) -> bool:
    """``<key>.jsonl``: a session's transcript, read-only; never a scratch file."""
    return name.endswith(TRANSCRIPT_SUFFIX) and not name.startswith(".")


def is_scratch_name(name: str) -> bool:
    """Editor and tool temporaries: kept in memory, never written to the store.

    Anything that does not end in ``.json``, or starts with a dot: vim's swap and
    backup files, its ``4913`` probe, ``sedXXXXXX``, ``x.tmp``, ``x~``, emacs's
    ``#x#`` and ``.#x``.
    """
    return name.startswith(".") or not name.endswith(SUFFIX)


@dataclass(eq=False, slots=True)
class Handle:
    """One open file.

    A session handle reads the version it opened (``data`` is that snapshot) and
    writes into its own copy; a scratch handle shares the file's ``data``.
    """

    fh: int
    node: Node
    flags: int
    data: bytes | bytearray
    version: Version | None = None  # the store version this handle started from
    key: str | None = None  # the session it writes to, None for scratch and control files
    dirty: bool = False  # changed since opened or last committed
    wrote: bool = False  # write() (not only a truncation) since then
    # Every change since the last commit came through write() or an O_TRUNC open,
    # after which the kernel itself asks for size and mtime again: a commit then
    # needs no invalidation (which would also cost the next open a getattr).
    kernel_refreshes: bool = True
    truncated_at_open: bool = False
    error: InvalidEntry | None = None  # sticky: e.g. the buffer outgrew the entry limit
    changed_ns: int = 0  # wall clock: a scratch file's mtime
    changed_at: int = 0  # time.monotonic_ns() of the same change (compared, never shown)
    stream: TranscriptStream | None = None  # an open transcript (read in place)
    actor: Actor | None = None  # who opened it for writing: the audit names them

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY

    @property
    def shares_file_data(self) -> bool:
        return isinstance(self.node, File) and not self.node.is_session

    def _buffer(self) -> bytearray:
        if not isinstance(self.data, bytearray):
            self.data = bytearray(self.data)  # copy on first change
        return self.data

    def write(self, offset: int, buf: bytes, limit: int) -> int:
        """Write *buf* at *offset* (at the end for O_APPEND); refuse to grow past *limit*."""
        data = self._buffer()
        if self.flags & os.O_APPEND:
            offset = len(data)
        end = offset + len(buf)
        if end > limit:
            self.error = InvalidEntry(f"entry would exceed {limit} bytes", code=errno.EFBIG)
            raise self.error
        if offset > len(data):
            data.extend(bytes(offset - len(data)))
        data[offset:end] = buf
        self._changed(wrote=True, through_write=True)
        return len(buf)

    def truncate(self, size: int, limit: int) -> None:
        if size > limit:
            raise InvalidEntry(f"entry would exceed {limit} bytes", code=errno.EFBIG)
        data = self._buffer()
        if size < len(data):
            del data[size:]
        else:
            data.extend(bytes(size - len(data)))
        self._changed(wrote=True, through_write=False)

    def _changed(self, *, wrote: bool, through_write: bool) -> None:
        if not self.dirty:
            self.kernel_refreshes = through_write
        else:
            self.kernel_refreshes = self.kernel_refreshes and through_write
        self.dirty = True
        self.wrote = self.wrote or wrote
        self.changed_ns = time.time_ns()
        self.changed_at = time.monotonic_ns()
        if isinstance(self.node, File) and self.shares_file_data:
            self.node.mtime_ns = self.node.ctime_ns = self.changed_ns

    def truncate_at_open(self) -> None:
        """O_TRUNC arrives in open: the buffer starts empty."""
        self.data = bytearray()
        self.dirty = self.truncated_at_open = self.kernel_refreshes = True
        self.changed_ns = time.time_ns()
        self.changed_at = time.monotonic_ns()

    def should_commit(self, *, final: bool) -> bool:
        """Whether a flush (or, with *final*, the release) commits this handle now.

        A shell redirect flushes right after its O_TRUNC open, before writing
        anything: committing that empty buffer would reject a write that is about
        to happen, so it waits; only the final release tries it.
        """
        if not self.dirty or self.key is None:
            return False
        redirect_prelude = self.truncated_at_open and not self.wrote and not self.data
        return final or not redirect_prelude

    def committed(self, version: Version) -> None:
        self.version = version
        self.dirty = self.wrote = self.truncated_at_open = False
