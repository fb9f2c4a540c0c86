"""What a change through the mount means: commits, conflicts, editor saves, renames.

Plain trio code over the tree, the index and the stores, so tests drive it without
a mount.  The rules, in the order a user meets them:

* A handle reads the committed version its open saw; what it writes stays in its
  own buffer until a flush (close) or fsync commits it: validated, atomic, under
  the key's lock.  A refusal reaches the caller as an errno, the log and
  ``.sessionfs/errors``, and the old entry stays (the kernel is told to ask for
  its attributes again, so nothing shows the refused size).
* A conflict is a commit that replaces a version other than the one its handle
  started from.  By default the later commit wins and the log says so; with
  ``-o conflict=fail`` it fails with ESTALE and the outside version stays.
* An editor's save is one change, not a conflict: the version a rename or an
  unlink took away is kept for a grace period (:mod:`.grace`), a new file of the
  key starts from it, and if its content is refused, the session comes back.
* Writing exactly the bytes the store holds (or held, within the grace period)
  is always accepted: a ``tar -cf``/``tar -xf`` round trip of the mount's own
  data never fails, even for entries migrated without ``updatedAt``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from ..catalog import Backing
from ..errors import (
    EntryExists,
    EntryNotFound,
    InvalidEntry,
    InvalidKey,
    LockBusy,
    ReadOnlyStore,
    SessionFSError,
)
from ..history import Actor
from ..keys import key_to_display, lookup_problem
from ..sqlite_view import SqliteView
from ..store import ABSENT, EntryChanged, Version
from ..transcripts import TranscriptFile, TranscriptStream
from .backings import Backings
from .cache import ContentCache
from .grace import GRACE_SECONDS, Grace, GracePeriods, user_path
from .handles import Handle, is_scratch_name, is_transcript_name
from .index import Index
from .kernel import Kernel
from .names import Names, session_key
from .requests import Rejections
from .tree import Dir, File, Node, Seen, Transcript, Tree

log = logging.getLogger("sessionfs")

DEFAULT_SCRATCH_LIMIT = 64 * 1024 * 1024
CONFLICT_LAST_WINS = "lww"
CONFLICT_FAIL = "fail"


def describe_version(version: Version | None) -> str:
    if version is None or version == ABSENT:
        return "absent"
    stamp = dt.datetime.fromtimestamp(version.mtime_ns / 1e9, dt.UTC)
    return stamp.isoformat(timespec="milliseconds")


LOCK_TIMEOUT = 30.0
QUICK_COMMIT_BYTES = 256 * 1024  # larger entries take longer to check and write: threads


@dataclass(frozen=True, slots=True)
class Limits:
    max_entry_bytes: int
    scratch_bytes: int = DEFAULT_SCRATCH_LIMIT
    grace_seconds: float = GRACE_SECONDS
    lock_timeout: float = LOCK_TIMEOUT  # seconds a request waits for a key another process holds


class Editing:
    """Open files, commits and namespace changes of session directories."""

    def __init__(
        self,
        tree: Tree,
        index: Index,
        names: Names,
        backings: Backings,
        kernel: Kernel,
        content: ContentCache,
        rejections: Rejections,
        graces: GracePeriods,
        limits: Limits,
        *,
        conflict: str = CONFLICT_LAST_WINS,
    ) -> None:
        self.tree = tree
        self.index = index
        self.names = names
        self.backings = backings
        self.kernel = kernel
        self.content = content
        self.rejections = rejections
        self.graces = graces
        self.limits = limits
        self.conflict = conflict
        self.handles: dict[int, Handle] = {}
        self._next_fh = itertools.count(1)

    # -- handles -------------------------------------------------------------

    def new_handle(self, node: Node, flags: int, data: bytes | bytearray, **fields: Any) -> Handle:
        handle = Handle(next(self._next_fh), node, flags, data, **fields)
        self.handles[handle.fh] = handle
        node.open_handles += 1
        return handle

    # -- transcripts: read-only ------------------------------------------------------

    async def open_transcript(self, node: Transcript, flags: int) -> Handle:
        """A handle reading *node*'s transcript file in place, whole lines only."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise self.transcript_read_only(node.parent, node.name)
        assert node.parent is not None
        sessions_dir = self.names.catalog.sessions_dir(node.parent.agent_id)

        def open_stream(backing: Backing) -> TranscriptStream:
            if isinstance(backing, SqliteView):
                return backing.open_transcript(node.file_name)  # its session id
            return TranscriptFile(sessions_dir, node.file_name)

        stream = await self.backings.run(node.parent.agent_id, "open transcript", open_stream)
        return self.new_handle(node, flags, b"", stream=stream)

    async def read_transcript(self, handle: Handle, offset: int, size: int) -> bytes:
        assert handle.stream is not None
        return await self.backings.thread(handle.stream.read, offset, size)

    def transcript_read_only(self, parent: Dir | None, name: str) -> pyfuse3.FUSEError:
        """EROFS for a change to ``<key>.jsonl``, with the reason in the log and the errors."""
        reason = ReadOnlyStore(
            "transcripts are read-only: the gateway appends to them; sessionfs never writes "
            "them (only the .json entry can be edited)"
        )
        return self.rejections.add(user_path(parent, name), reason)

    async def open(self, node: File, flags: int, *, actor: Actor | None = None) -> Handle:
        """A handle on *node* holding the committed version it reads (or its scratch bytes);
        *actor* opened it for writing."""
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if not node.is_session:
            if writable and flags & os.O_TRUNC and isinstance(node.data, bytearray):
                del node.data[:]  # shared by every handle of this scratch file
                node.mtime_ns = node.ctime_ns = time.time_ns()
            return self.new_handle(node, flags, node.data)
        parent, key = node.parent, node.key
        assert parent is not None and key is not None
        if node.pending:
            stand_in = None if writable else node.stands_in()
            if stand_in is not None and stand_in.version is not None:
                with contextlib.suppress(EntryNotFound):  # (removed meanwhile: empty)
                    version, data = await self._committed_bytes(parent, key, stand_in.version)
                    return self.new_handle(node, flags, data, version=version)
            return self.new_handle(
                node,
                flags,
                b"",
                version=self.graces.replaced_version(parent, key),
                key=key if writable else None,
                actor=actor,
            )
        seen = await self.index.entry(parent, key)
        if seen is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if writable and not seen.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        truncating = writable and bool(flags & os.O_TRUNC)
        version, data = seen.version, b""
        if not truncating:
            version, data = await self._committed_bytes(parent, key, seen.version)
        handle = self.new_handle(
            node, flags, data, version=version, key=key if writable else None, actor=actor
        )
        if truncating:
            handle.truncate_at_open()
        return handle

    async def _committed_bytes(
        self, parent: Dir, key: str, version: Version
    ) -> tuple[Version, bytes]:
        """The bytes of *key*'s committed *version* (from the cache), or of the one the
        store holds now; EntryNotFound if it holds none."""
        cached = self.content.get((parent.ino, key), version)
        if cached is not None:
            return version, cached
        snap = await self.index.read(parent, key)
        self.content.put((parent.ino, key), snap.version, snap.data)
        return snap.version, snap.data

    async def create(
        self, parent: Dir, name: str, mode: int, flags: int, *, actor: Actor | None = None
    ) -> tuple[File, Handle]:
        if is_transcript_name(name):
            raise self.transcript_read_only(parent, name)
        existing = await self.names.find_existing(parent, name)
        if existing is not None:
            if flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if not isinstance(existing, File):
                raise pyfuse3.FUSEError(errno.EISDIR)
            return existing, await self.open(existing, flags, actor=actor)
        if is_scratch_name(name):
            await self._check_writable(parent, name)  # nothing is created in a read-only view
            node = self.tree.new_scratch(parent, name, mode)
            return node, self.new_handle(node, flags, node.data)
        key = session_key(name)
        await self._check_writable(parent, name)
        self._check_findable(parent, key)
        self.graces.claim(parent, key)  # a new version is coming: never remove the old one now
        node = self.tree.new_pending(parent, key)
        return node, self.new_handle(
            node,
            flags,
            b"",
            version=self.graces.replaced_version(parent, key),
            key=key,
            actor=actor,
        )

    def _check_findable(self, parent: Dir, key: str) -> None:
        """EINVAL for a new key the gateway would never look up (it would sit unread).

        A key that went within its grace period may come back as it was (an
        ``install`` or ``tar -x`` of the mount's own files).
        """
        if self.graces.went_recently(parent, key):
            return
        problem = lookup_problem(key, self.names.catalog.owning_agent(parent.agent_id))
        if problem is not None:
            path = user_path(parent, key_to_display(key))
            raise self.rejections.add(path, InvalidKey(f"{problem}; refused a new key"))

    def lock_deadline(self) -> float:
        """Until when a request that arrives now may wait for a key's lock (trio time)."""
        return trio.current_time() + self.limits.lock_timeout

    async def _check_writable(self, parent: Dir, name: str) -> None:
        """EROFS, at once, for a directory shown read-only (a ``sessions.json``, a database)."""
        reason = await self.backings.run(
            parent.agent_id, "writable", lambda b: None if b.writable else b.why_read_only()
        )
        if reason is not None:
            raise self.rejections.add(user_path(parent, name), ReadOnlyStore(reason))

    # -- writing -------------------------------------------------------------

    def change(self, handle: Handle, change: Callable[[Handle, int], object], growth: int) -> None:
        """Apply a write or truncation to *handle*'s buffer within its size limit."""
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.key is not None:
            limit = self.limits.max_entry_bytes
        else:
            self.check_scratch_room(growth)
            limit = self.limits.scratch_bytes
        try:
            change(handle, limit)
        except InvalidEntry as exc:
            assert isinstance(handle.node, File)
            raise self.rejections.add(self._path(handle.node), exc) from None

    def check_scratch_room(self, growth: int) -> None:
        if growth > 0 and self.tree.scratch_bytes() + growth > self.limits.scratch_bytes:
            log.warning(
                "scratch files would exceed %d bytes in memory; refused (ENOSPC)",
                self.limits.scratch_bytes,
            )
            raise pyfuse3.FUSEError(errno.ENOSPC)

    async def flush(self, handle: Handle) -> None:
        if handle.error is not None:
            error, handle.error, handle.dirty = handle.error, None, False
            raise pyfuse3.FUSEError(error.errno or errno.EIO)
        if handle.should_commit(final=False):
            await self.commit(handle)

    async def commit(self, handle: Handle) -> None:
        """Validate and atomically store what *handle* wrote; errors reach the caller.

        The commit goes to the file's key *now*: written, then renamed, then closed,
        the data lands under the new name, as on any filesystem (in the scratch
        file, if renamed to one; nowhere, if unlinked).  It runs with the key's
        operations serialized (see :meth:`Backings.serialized`), so an unlink or a
        rename of the same file happens wholly before or wholly after it.
        """
        node = handle.node
        assert isinstance(node, File) and handle.key is not None
        deadline = self.lock_deadline()
        while True:
            if not node.linked or node.parent is None:
                handle.dirty = False  # like writing to an unlinked file
                return
            if node.key is None:
                self._into_scratch(handle, node)
                return
            parent, key = node.parent, node.key
            try:
                async with self.backings.serialized(parent.agent_id, (key,), deadline):
                    if node.key == key and node.parent is parent and node.linked:
                        await self._commit_serialized(handle, node, parent, key, deadline)
                        return
            except LockBusy as exc:  # waited its turn past the deadline: refused like any
                raise await self._refused(handle, exc) from None
            # renamed or unlinked while this commit waited its turn: look again

    async def _commit_serialized(
        self, handle: Handle, node: File, parent: Dir, key: str, deadline: float
    ) -> None:
        data = bytes(handle.data)
        # A new file's base is decided now: the version a backup held, unless the
        # grace period ended in its removal while this commit waited.
        opened = self.graces.replaced_version(parent, key) if node.pending else handle.version
        expected = (opened or ABSENT) if self.conflict == CONFLICT_FAIL else None
        held = self.graces.holds(parent, key, data)  # a round trip of what went away
        self.graces.claim(parent, key)
        try:
            commit = await self.index.write(
                parent,
                key,
                lambda b: b.write(
                    key,
                    data,
                    validate=not held,
                    expected=expected,
                    lock_wait=0,
                    actor=handle.actor,
                ),
                deadline=deadline,
                quick=len(data) <= QUICK_COMMIT_BYTES,
            )
        except EntryChanged as exc:
            reason = (
                f"changed behind the mount since it was opened (mtime "
                f"{describe_version(exc.expected)}, now {describe_version(exc.current)}); "
                "the outside version stays (-o conflict=fail)"
            )
            await self.index.stat(parent, key)  # show the outside version, whatever was known
            raise await self._refused(handle, SessionFSError(reason, code=errno.ESTALE)) from None
        except (SessionFSError, OSError) as exc:
            raise await self._refused(handle, exc) from None
        if commit.replaced not in (opened, commit.version):  # (equal versions: nothing written)
            log.warning(
                "conflict on %s: it changed behind the mount since it was opened (mtime %s, "
                "then %s); this later commit wins",
                self._path(node),
                describe_version(opened),
                describe_version(commit.replaced),
            )
        # The kernel asks for size and mtime again after a write() or an O_TRUNC open,
        # unless it was given attributes since (a stat before the close)
        kernel_refreshes = handle.kernel_refreshes and node.attributes_given_ns < handle.changed_at
        handle.committed(commit.version)
        self._committed(parent, node, commit.version, data, kernel_refreshes=kernel_refreshes)
        if log.isEnabledFor(logging.DEBUG):  # (the path is not free to make)
            log.debug("committed %s (%d bytes)", self._path(node), len(data))

    def _into_scratch(self, handle: Handle, node: File) -> None:
        """The session was renamed to a scratch name while open: its scratch file gets the data."""
        if isinstance(node.data, bytearray) and node.data != handle.data:
            self.check_scratch_room(len(handle.data) - len(node.data))
            node.data[:] = handle.data
            node.mtime_ns = node.ctime_ns = time.time_ns()
        handle.dirty = False

    def _committed(
        self, parent: Dir, node: File, version: Version, data: bytes, *, kernel_refreshes: bool
    ) -> None:
        assert node.key is not None
        self.graces.end(parent, node.key)
        node.pending = False
        self.content.put((parent.ino, node.key), version, data)
        if not kernel_refreshes:
            self.kernel.forget_attributes(node.ino)

    async def release(self, handle: Handle) -> None:
        del self.handles[handle.fh]
        node = handle.node
        if handle.stream is not None:
            await self.backings.thread(handle.stream.close)
        try:
            if handle.should_commit(final=True):
                await self.commit(handle)
        except pyfuse3.FUSEError:
            pass  # release cannot report errors; commit logged and listed this one
        finally:
            try:
                if (
                    isinstance(node, File)
                    and node.pending
                    and handle.wrote
                    and node.open_handles == 1
                    and node.linked
                ):
                    await self._abandon(node)
            finally:
                self.tree.release(node)
                if isinstance(node, File) and node.linked and node.key is not None:
                    assert node.parent is not None
                    self.index.forget_gone(node.parent, node.key)

    async def _refused(self, handle: Handle, exc: OSError) -> pyfuse3.FUSEError:
        """A commit of *handle* was refused: report it; the old entry stays in every view.

        If the handle's file replaced a session that went away within the grace
        period, that session comes back now, before close(2) returns (release,
        which the kernel does not wait for, would leave a window without it); a
        later successful commit of the same handle replaces it as usual.
        """
        node = handle.node
        assert isinstance(node, File)
        handle.dirty = False  # reported once; the next change tries again
        error = self.rejections.add(self._path(node), exc)
        parent, key = node.parent, node.key
        try:
            if (
                node.pending
                and parent is not None
                and key is not None
                and await self.graces.undo(parent, key)
            ):
                known = parent.present(key)
                if known is not None:
                    node.pending = False  # the session shows again, under this file's number
                    handle.version = known.version
        finally:
            # last: a stat while the session was brought back would otherwise keep
            # what it saw in between
            self.kernel.forget_attributes(node.ino)
        return error

    async def _abandon(self, node: File) -> None:
        """A new file whose content was refused never existed; an empty touched one stays."""
        parent, key = node.parent, node.key
        assert parent is not None and key is not None
        await self.graces.undo(parent, key)
        if parent.present(key) is not None and key not in parent.away:
            node.pending = False  # the session shows again, under this file's number
            self.kernel.forget_attributes(node.ino)
            return
        self.tree.unlink(parent, node.name, key)
        self.kernel.forget_name(parent.ino, node.name)

    async def truncate(
        self, node: File, size: int, handle: Handle | None, actor: Actor | None = None
    ) -> None:
        """``truncate``/``ftruncate``: resize a handle's buffer, or a path's entry at once
        (on behalf of *actor*)."""
        if handle is not None:
            self.change(handle, lambda h, limit: h.truncate(size, limit), size - len(handle.data))
            return
        if not node.is_session:  # resized in place: handles share a scratch file's bytes
            self.check_scratch_room(size - len(node.data))
            Handle(0, node, os.O_WRONLY, node.data).truncate(size, self.limits.scratch_bytes)
            return
        assert node.key is not None and node.parent is not None
        if node.pending:  # created through the mount, nothing committed: it holds no bytes
            if size:
                exc = InvalidEntry(f"{size} NUL bytes are not a session entry")
                raise self.rejections.add(self._path(node), exc)
            return
        # truncate(2) on a path: read, resize and commit in one go
        snap = await self.index.read(node.parent, node.key)
        scratch = Handle(0, node, os.O_WRONLY, snap.data, snap.version, key=node.key, actor=actor)
        scratch.truncate(size, self.limits.max_entry_bytes)
        await self.commit(scratch)

    # -- unlink and rename ---------------------------------------------------

    async def unlink(self, parent: Dir, name: str, actor: Actor | None = None) -> None:
        if is_transcript_name(name):
            await self.names.find(parent, name)  # ENOENT if there is none
            raise self.transcript_read_only(parent, name)
        if is_scratch_name(name):
            scratch = self.tree.unlink(parent, name)
            if scratch is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            grace = self.graces.of_backup(scratch)
            if grace is not None and not self._being_rewritten(parent, grace.key):
                # the last copy of a session renamed away, and no editor is writing
                # it anew: the user's intent is its removal
                await self.graces.conclude(grace)
            return
        node = await self.names.find(parent, name)
        assert isinstance(node, File) and node.key is not None
        await self._check_writable(parent, name)  # EROFS with the reason, before any lock
        key = node.key
        deadline = self.lock_deadline()
        async with self.backings.serialized(parent.agent_id, (key,), deadline):
            if await self.names.find(parent, name) is not node:
                raise pyfuse3.FUSEError(errno.ENOENT)  # gone or replaced while it waited
            if node.pending:
                self.tree.unlink(parent, name, key)  # never committed
                return
            shown = node.shown()  # what an open handle's fstat keeps showing
            removed = await self.index.remove(
                parent, key, lambda b: b.remove(key, lock_wait=0, actor=actor), deadline=deadline
            )
            self.tree.unlink(parent, name, key, last_seen=shown)
            self.content.drop((parent.ino, key))
            self.graces.removed(parent, key, removed)
        log.info("removed session %s", user_path(parent, name))

    def _being_rewritten(self, parent: Dir, key: str) -> bool:
        writer = self.tree.known_session(parent, key)
        return writer is not None and writer.pending and writer.open_handles > 0

    async def rename(
        self, parent: Dir, old: str, new: str, *, replace: bool, actor: Actor | None = None
    ) -> None:
        source = await self.names.find(parent, old)
        if is_transcript_name(old) or is_transcript_name(new):
            raise self.transcript_read_only(parent, new if is_transcript_name(new) else old)
        if (isinstance(source, File) and source.is_session) or not is_scratch_name(new):
            await self._check_writable(parent, new)
        if not isinstance(source, File):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if old == new:
            return
        if new in parent.children:
            raise pyfuse3.FUSEError(errno.EISDIR)  # .sessionfs: the mount's own directory
        target_key = None if is_scratch_name(new) else session_key(new)
        if (
            target_key is not None
            and target_key != source.key
            and await self.index.entry(parent, target_key) is None
        ):
            self._check_findable(parent, target_key)  # only a new key: existing ones stay editable
        keys = tuple(k for k in (source.key, target_key) if k is not None)
        concluded = None
        deadline = self.lock_deadline()  # from the request's arrival, for every wait below
        async with self.backings.serialized(parent.agent_id, keys, deadline):
            if await self.names.find(parent, old) is not source:
                raise pyfuse3.FUSEError(errno.ENOENT)  # gone or replaced while it waited
            if not replace and await self.names.find_existing(parent, new) is not None:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if target_key is None:
                await self._rename_to_scratch(parent, source, new)
            elif source.is_session and not source.pending:
                await self._rename_session(
                    parent, source, target_key, replace=replace, deadline=deadline, actor=actor
                )
            else:
                concluded = await self._rename_to_session(
                    parent, source, new, target_key, deadline=deadline, actor=actor
                )
        if concluded is not None:
            # a backup of another session, renamed to this key: that session moved here
            # (after this rename's keys are let go: one task never waits holding keys)
            await self.graces.conclude(concluded)

    async def _rename_to_scratch(self, parent: Dir, source: File, new: str) -> None:
        if source.is_session and not source.pending:
            # An editor's backup (vim, emacs): the entry stays in the store while the
            # new version is written (see Grace).
            assert source.key is not None
            key = source.key
            await self._check_writable(parent, new)
            snap = await self.index.read(parent, key)
            self.check_scratch_room(len(snap.data))  # it lives in memory from now on
            self.tree.move(source, parent, new, None)
            source.data = bytearray(snap.data)
            source.mode, source.mtime_ns, source.ctime_ns = (
                0o600,
                snap.stat.st_mtime_ns,
                snap.stat.st_ctime_ns,
            )
            source.origin_key, source.origin_version = key, snap.version
            self.graces.renamed_away(parent, key, snap, source)
            # A backup is read through the page cache, which stops at the size the
            # kernel holds: that of whichever version it last asked about
            self.kernel.forget_attributes(source.ino)
            return
        source.pending = False
        self.tree.move(source, parent, new, None)

    async def _rename_session(
        self,
        parent: Dir,
        source: File,
        key: str,
        *,
        replace: bool,
        deadline: float,
        actor: Actor | None,
    ) -> None:
        assert source.key is not None
        old_key = source.key
        target = self.tree.known_session(parent, key)
        replaced = None if target is None else target.shown()  # what its open handles show
        try:
            with self.index.own(parent, old_key) as gone, self.index.own(parent, key) as arrived:
                st = await self.backings.run_locked(
                    parent.agent_id,
                    (old_key, key),
                    "rename",
                    lambda b: b.rename(old_key, key, replace=replace, lock_wait=0, actor=actor),
                    deadline=deadline,
                )
                gone.made(None, replaced=Version.of(st))
                arrived.made(Seen.of(st))
        except EntryExists:
            raise pyfuse3.FUSEError(errno.EEXIST) from None
        self.tree.move(source, parent, key_to_display(key), key, replaced_seen=replaced)
        self.graces.end(parent, key)
        self.content.drop((parent.ino, old_key))
        log.info("renamed session %r to %r", old_key, key)

    async def _rename_to_session(
        self,
        parent: Dir,
        source: File,
        new: str,
        key: str,
        *,
        deadline: float,
        actor: Actor | None,
    ) -> Grace | None:
        """A scratch file (``sed -i``, ``jq > t && mv t f``) or a pending file becomes a session.

        Returns the grace record of the session *source* was a backup of, if that
        session thereby moved to *key* (the caller ends it).
        """
        if source.pending and parent.present(key) is None and key not in parent.away:
            self.tree.move(source, parent, new, key)  # `touch a.json; mv a.json b.json`
            source.pending = True
            return None
        data = bytes(source.data)
        held = self.graces.holds(parent, key, data)
        target = self.tree.known_session(parent, key)
        replaced = None if target is None else target.shown()
        self.graces.claim(parent, key)
        try:
            commit = await self.index.write(
                parent,
                key,
                lambda b: b.write(key, data, validate=not held, lock_wait=0, actor=actor),
                deadline=deadline,
            )
        except (SessionFSError, OSError) as exc:
            where = user_path(parent, new)
            error = self.rejections.add(f"{where} (renamed from {source.name})", exc)
            await self.graces.undo(parent, key)  # `sed -i.bak` with a bad edit: it stays
            raise error from None
        origin = self.graces.of_backup(source)
        self.tree.move(source, parent, new, key, replaced_seen=replaced)
        source.data = b""  # the content lives in the store now
        source.origin_key = source.origin_version = None
        self._committed(parent, source, commit.version, data, kernel_refreshes=False)
        log.info("committed %s (%d bytes, renamed into place)", self._path(source), len(data))
        return origin if origin is not None and origin.key != key else None

    def _path(self, node: File) -> str:
        return user_path(node.parent, node.name)
