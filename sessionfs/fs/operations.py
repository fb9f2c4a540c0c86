"""``pyfuse3.Operations`` for sessionfs: each request translated into a call, nothing more.

Handlers turn inode numbers and file handles into nodes, call :mod:`.names`
(what a name stands for), :mod:`.editing` (what a change means) or the node
itself (its attributes), and answer; :func:`.requests.guarded` turns every
failure into an errno.  No disk I/O happens here.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyfuse3

from ..history import Actor
from ..keys import NAME_MAX
from .backings import Backings
from .editing import Editing
from .handles import Handle
from .names import Listed, Names, text
from .requests import Requests, guarded
from .tree import Control, Dir, File, KeptVersion, Node, Transcript, Tree


@dataclass(eq=False, slots=True)
class DirHandle:
    """One open directory: the listing taken when it was first read, so offsets hold."""

    node: Dir
    listing: list[Listed] | None = None
    opened: float = field(default_factory=time.monotonic)


class Operations(pyfuse3.Operations):
    """The filesystem: one directory per agent (or one store at the top) plus ``.sessionfs/``."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        tree: Tree,
        names: Names,
        editing: Editing,
        backings: Backings,
        requests: Requests,
    ) -> None:
        super().__init__()
        self.tree = tree
        self.names = names
        self.editing = editing
        self.backings = backings
        self.requests = requests
        self.dir_handles: dict[int, DirHandle] = {}
        self._next_dir_fh = 1

    def _node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _dir(self, inode: int) -> Dir:
        node = self.tree.nodes.get(inode)
        if not isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _sessions_dir(self, inode: int) -> Dir:
        """A directory of sessions, where files can be made; EPERM elsewhere."""
        node = self._dir(inode)
        if node.history is not None:
            raise pyfuse3.FUSEError(errno.EROFS)  # .sessionfs/history/: read-only
        if not node.holds_sessions:
            raise pyfuse3.FUSEError(errno.EPERM)
        return node

    # -- lookups and attributes ---------------------------------------------

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = await self.names.find(self._dir(parent_inode), text(name))
        attrs = await self.names.attributes(node)
        node.nlookup += 1
        return attrs

    @guarded
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.names.index.forget(inode, count)

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self.names.attributes(self._node(inode))

    @guarded
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if isinstance(node, Dir | Transcript):
            # chmod, chown and touch of an agent's directory and what it holds change
            # nothing and succeed, as on sessions, so copies (tar -x, rsync -a, cp -a)
            # and chmod -R do not report failures for what they did copy
            if not fields.update_size:
                return await self.names.attributes(node)
            if isinstance(node, Dir):
                raise pyfuse3.FUSEError(errno.EISDIR)
            raise self.editing.transcript_read_only(node.parent, node.name)
        if isinstance(node, KeptVersion):
            raise pyfuse3.FUSEError(errno.EROFS)  # kept versions never change
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EACCES)
        if fields.update_size:
            handle = self.editing.handles.get(fh) if fh is not None else None
            await self.editing.truncate(
                node, attr.st_size, handle, Actor.of_process(ctx.pid, ctx.uid)
            )
        if not node.is_session or node.pending:
            # Scratch files keep what tools set: vim's backupcopy=auto compares the
            # mode of its probe file with the original's.  Sessions stay 0600 and
            # keep the mtime of their content, so chmod/chown/utimens are accepted
            # and change nothing.
            if fields.update_mode:
                node.mode = stat.S_IMODE(attr.st_mode)
            if fields.update_mtime:
                node.mtime_ns = attr.st_mtime_ns
        return await self.names.attributes(node)

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self.backings.thread(self.names.catalog.statvfs)
        out = pyfuse3.StatvfsData()
        for attr in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
        ):
            setattr(out, attr, getattr(st, attr))
        out.f_namemax = NAME_MAX
        return out

    # -- directories ---------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self.dir_handles[fh] = DirHandle(self._dir(inode))
        return fh

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dir_handles[fh]
        if handle.listing is None or start_id == 0:
            handle.listing = await self.names.listing(handle.node)
        listing, directory = handle.listing, handle.node
        session_attributes = self.names.session_attributes(directory)
        transcript_attributes = self.names.listed_attributes
        present = directory.present
        # next_id is a position in this handle's own listing, so entries added or
        # removed meanwhile cannot shift it.
        position = start_id
        while position < len(listing):
            name, node, key = listing[position]
            position += 1
            # (renamed, removed or reset since the listing: never a stale name)
            if isinstance(node, File):
                if not node.linked or node.parent is not directory or node.key != key:
                    continue
                if key is not None and not node.pending:
                    seen = node.entry()
                    if seen is None:
                        continue  # removed since the listing was taken
                    attrs = session_attributes(node, seen)
                elif key is None and node.name != name:
                    continue
                else:
                    try:
                        attrs = await self.names.attributes(node)
                    except pyfuse3.FUSEError:
                        continue
            elif isinstance(node, Transcript):
                if (
                    not node.linked
                    or node.parent is not directory
                    or node.key != key
                    or present(key) is None
                ):
                    continue
                attrs = transcript_attributes(node)
            else:
                try:
                    if node is None:  # an agent: it may have gone since the listing
                        node = await self.names.find(directory, name)
                    attrs = await self.names.attributes(node)
                except pyfuse3.FUSEError:
                    continue
            if not pyfuse3.readdir_reply(token, name.encode(), attrs, position):
                return
            node.nlookup += 1

    @guarded
    async def releasedir(self, fh: int) -> None:
        handle = self.dir_handles.pop(fh)
        if all(other.node is not handle.node for other in self.dir_handles.values()):
            self.tree.sweep_history(handle.node)  # names listed but never replied

    @guarded
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- opening, reading, writing ---------------------------------------------

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, Control):
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            data = await node.load() if node.load is not None else node.render()
            handle = self.editing.new_handle(node, flags, data)
            return _read_in_place(handle.fh)
        if isinstance(node, Transcript):
            handle = await self.editing.open_transcript(node, flags)
            return _read_in_place(handle.fh)
        if isinstance(node, KeptVersion):
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EROFS)  # kept versions never change
            handle = self.editing.new_handle(node, flags, await self.names.history.read(node))
            return _read_in_place(handle.fh)
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EISDIR)
        handle = await self.editing.open(node, flags, actor=_writer(flags, ctx))
        return _file_info(handle)

    @guarded
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._sessions_dir(parent_inode)
        node, handle = await self.editing.create(
            parent,
            text(name),
            stat.S_IMODE(mode) & ~ctx.umask & 0o777,
            flags,
            actor=Actor.of_process(ctx.pid, ctx.uid),
        )
        attrs = await self.names.attributes(node)
        node.nlookup += 1
        return _file_info(handle), attrs

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.editing.handles[fh]
        if handle.stream is not None:
            return await self.editing.read_transcript(handle, off, size)
        if handle.key is None and isinstance(handle.node, File) and handle.node.is_session:
            self.requests.counts["read(session data)"] += 1
        return bytes(handle.data[off : off + size])

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.editing.handles[fh]
        growth = max(0, off + len(buf) - len(handle.data))
        self.editing.change(handle, lambda h, limit: h.write(off, buf, limit), growth)
        return len(buf)

    @guarded
    async def flush(self, fh: int) -> None:
        await self.editing.flush(self.editing.handles[fh])

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        # Every commit is durable (fsync of the file and the directory), so a
        # clean handle has nothing left to do; answering ENOSYS instead would make
        # the kernel report success for all later fsyncs without asking.
        await self.editing.flush(self.editing.handles[fh])

    @guarded
    async def release(self, fh: int) -> None:
        await self.editing.release(self.editing.handles[fh])

    # -- unlink and rename ---------------------------------------------------

    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.editing.unlink(
            self._sessions_dir(parent_inode), text(name), Actor.of_process(ctx.pid, ctx.uid)
        )

    @guarded
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        parent = self._sessions_dir(parent_inode_old)
        if self._sessions_dir(parent_inode_new) is not parent:
            raise pyfuse3.FUSEError(errno.EXDEV)  # mv copies and unlinks instead
        try:
            await self.editing.rename(
                parent,
                text(name_old),
                text(name_new),
                replace=not flags & pyfuse3.RENAME_NOREPLACE,
                actor=Actor.of_process(ctx.pid, ctx.uid),
            )
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # a refused name or content: rename(2) callers read EINVAL as a directory
            # moved into itself (`mv`: "cannot move ... to a subdirectory of itself")
            raise pyfuse3.FUSEError(errno.EPERM) from None


def _writer(flags: int, ctx: pyfuse3.RequestContext) -> Actor | None:
    """Who opens a file for writing (named at the open: a commit comes with no caller)."""
    if flags & os.O_ACCMODE == os.O_RDONLY:
        return None
    return Actor.of_process(ctx.pid, ctx.uid)


def _read_in_place(fh: int) -> pyfuse3.FileInfo:
    """An open whose reads all reach the daemon, bypassing the page cache (and i_size)."""
    return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)


def _file_info(handle: Handle) -> pyfuse3.FileInfo:
    """A handle with bytes of its own (a session's snapshot) bypasses the page cache (see
    :mod:`.index`); one on a scratch file's shared buffer shares the cache too.

    Decided by the handle, not by the file: an editor may rename the session to a
    scratch name while its open waits for the store, and the snapshot taken must
    still be read in place (the page cache would cut it at an older version's size).
    """
    node = handle.node
    if isinstance(node, File) and isinstance(node.data, bytearray) and handle.data is node.data:
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=False)
    return _read_in_place(handle.fh)
