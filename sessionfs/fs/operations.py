"""``pyfuse3.Operations`` for sessionfs: translate each request into tree and store calls.

No disk I/O happens here: every store call goes through :meth:`Operations._store`,
which runs it in a worker thread against the catalog's current store for that
directory, so a slow fsync of one session never holds up requests for others.
"""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
import pyfuse3
import trio

from ..catalog import Backing, Catalog
from ..errors import EntryNotFound, NoStore, SessionFSError
from ..keys import NAME_MAX, display_to_key, key_to_display
from .tree import Control, Dir, Node, Scratch, Session, Tree

log = logging.getLogger("sessionfs")

CONTROL_DIR = ".sessionfs"
READDIR_CHUNK = 256

_P = ParamSpec("_P")
_R = TypeVar("_R")
_T = TypeVar("_T")


def guarded(
    fn: Callable[Concatenate[Operations, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[Operations, _P], Coroutine[Any, Any, _R]]:
    """Answer every failure with an errno; never let an exception end ``pyfuse3.main``.

    An exception other than ``FUSEError`` would stop the main loop and leave a
    dead mount, so unexpected ones are logged with their traceback and become EIO.
    """
    name = fn.__name__

    async def handler(self: Operations, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        self.counters[name] += 1
        if self.debug:
            log.debug("request %s%s", name, _describe(args))
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except SessionFSError as exc:
            log.debug("%s%s: %s", name, _describe(args), exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except OSError as exc:
            log.warning("%s%s failed: %s", name, _describe(args), exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s%s; answered EIO", name, _describe(args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    functools.update_wrapper(handler, fn)
    return handler


def _render_pid() -> bytes:
    return f"{os.getpid()}\n".encode()


def _describe(args: tuple[object, ...]) -> str:
    shown = []
    for arg in args:
        if isinstance(arg, bytes) and len(arg) <= NAME_MAX:
            shown.append(arg.decode("utf-8", "replace"))
        elif isinstance(arg, int | str):
            shown.append(str(arg))
    return "(" + ", ".join(shown) + ")"


@dataclass(eq=False, slots=True)
class Handle:
    """One open file: what its reads see, and (for writers) what they have written."""

    fh: int
    node: Node
    flags: int
    data: bytes | bytearray
    version: object = None  # the store version the data came from


@dataclass(eq=False, slots=True)
class DirHandle:
    """One open directory: the listing taken when it was first read, so offsets hold."""

    node: Dir
    listing: list[tuple[str, str | None]] | None = None  # (name, session key or None)
    opened: float = field(default_factory=time.monotonic)


class Operations(pyfuse3.Operations):
    """The filesystem: one directory per agent (or one store at the top) plus ``.sessionfs/``."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        catalog: Catalog,
        *,
        cache_timeout: float = 1.0,
        debug: bool = False,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        super().__init__()
        self.catalog = catalog
        self.tree = Tree()
        self.cache_timeout = cache_timeout
        self.debug = debug
        self.limiter = limiter
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started_ns = time.time_ns()
        self.counters: collections.Counter[str] = collections.Counter()
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        self._next_fh = itertools.count(1)
        root = self.tree.root
        root.holds_sessions = not catalog.per_agent
        self.control_dir = self.tree.subdir(root, CONTROL_DIR)
        self.tree.control(self.control_dir, "pid", _render_pid)
        self.tree.control(self.control_dir, "stats", self._render_stats)

    # -- helpers -----------------------------------------------------------

    async def _store(self, parent: Dir, call: Callable[[Backing], _T]) -> _T:
        """Run *call* on the store behind *parent* in a worker thread."""
        agent_id = parent.agent_id

        def run() -> _T:
            try:
                backing = self.catalog.backing(agent_id)
            except NoStore:
                raise EntryNotFound(f"agent {agent_id!r} has no store any more") from None
            return call(backing)

        return await trio.to_thread.run_sync(run, limiter=self.limiter)

    def _render_stats(self) -> bytes:
        return (
            orjson.dumps(
                {
                    "requests": dict(self.counters),
                    "inodes": len(self.tree.nodes),
                    "open_files": len(self.handles),
                },
                option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
            )
            + b"\n"
        )

    def _attrs(
        self, node: Node, st: os.stat_result | None = None, size: int = 0
    ) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.entry_timeout = attrs.attr_timeout = self.cache_timeout
        attrs.st_uid, attrs.st_gid = self.uid, self.gid
        attrs.st_blksize = 4096
        mtime_ns = ctime_ns = self.started_ns
        if isinstance(node, Dir):
            attrs.st_mode = stat.S_IFDIR | (0o500 if node is self.control_dir else 0o700)
            attrs.st_nlink = 2
        elif isinstance(node, Session):
            assert st is not None
            writable = stat.S_IMODE(st.st_mode) & 0o200
            attrs.st_mode = stat.S_IFREG | (0o600 if writable else 0o400)
            attrs.st_nlink = 1
            size, mtime_ns, ctime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns
        elif isinstance(node, Scratch):
            attrs.st_mode = stat.S_IFREG | node.mode
            attrs.st_nlink = 1 if node.linked else 0
            size, mtime_ns, ctime_ns = len(node.data), node.mtime_ns, node.ctime_ns
        else:
            attrs.st_mode = stat.S_IFREG | 0o400
            attrs.st_nlink = 1
        attrs.st_size = size
        attrs.st_blocks = (size + 511) // 512
        attrs.st_atime_ns, attrs.st_mtime_ns, attrs.st_ctime_ns = mtime_ns, mtime_ns, ctime_ns
        return attrs

    def _dir(self, inode: int) -> Dir:
        node = self.tree.nodes.get(inode)
        if not isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    @staticmethod
    def _text(name: bytes) -> str:
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    async def _find(self, parent: Dir, name: str) -> tuple[Node, os.stat_result | None]:
        """The node *name* stands for in *parent* (and its entry's stat), or ENOENT."""
        child = parent.children.get(name)
        if child is not None:
            return self.tree.nodes[child], None
        if parent is self.tree.root and self.catalog.per_agent:
            if await trio.to_thread.run_sync(self.catalog.has_agent, name, limiter=self.limiter):
                # Not kept in children: an agent that goes away must stop resolving.
                return self.tree.agent_dir(name), None
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not parent.holds_sessions:
            raise pyfuse3.FUSEError(errno.ENOENT)
        scratch = parent.scratch.get(name)
        if scratch is not None:
            return self.tree.nodes[scratch], None
        key = display_to_key(name)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.tree.session(parent, key)
        return node, await self._store(parent, lambda b: b.stat(key))

    async def _attrs_of(self, node: Node) -> pyfuse3.EntryAttributes:
        if isinstance(node, Session):
            assert node.parent is not None
            st = await self._store(node.parent, lambda b: b.stat(node.key))
            return self._attrs(node, st)
        if isinstance(node, Control):
            return self._attrs(node, size=len(node.render()))
        return self._attrs(node)

    # -- lookups and attributes ---------------------------------------------

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node, st = await self._find(self._dir(parent_inode), self._text(name))
        attrs = self._attrs(node, st) if st is not None else await self._attrs_of(node)
        node.nlookup += 1
        return attrs

    @guarded
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.tree.forget(inode, count)

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._attrs_of(self._node(inode))

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await trio.to_thread.run_sync(self.catalog.statvfs, limiter=self.limiter)
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
        fh = next(self._next_fh)
        self.dir_handles[fh] = DirHandle(self._dir(inode))
        return fh

    async def _listing(self, node: Dir) -> list[tuple[str, str | None]]:
        names: list[tuple[str, str | None]] = [(name, None) for name in node.children]
        if node is self.tree.root and self.catalog.per_agent:
            agents = await trio.to_thread.run_sync(self.catalog.agents, limiter=self.limiter)
            names += [(agent, None) for agent in agents]
        if node.holds_sessions:
            keys = await self._store(node, lambda b: list(b.keys()))
            for key in keys:
                try:
                    names.append((key_to_display(key), key))
                except SessionFSError:
                    continue
            names += [(name, None) for name in node.scratch]
        return names

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dir_handles[fh]
        if handle.listing is None or start_id == 0:
            handle.listing = await self._listing(handle.node)
        listing = handle.listing
        # next_id is a position in this handle's own listing, so entries added or
        # removed meanwhile cannot shift it.
        position = start_id
        while position < len(listing):
            chunk = listing[position : position + READDIR_CHUNK]
            keys = [key for _, key in chunk if key is not None]
            stats = iter(await self._stat_many(handle.node, keys))
            for offset, (name, key) in enumerate(chunk):
                if key is not None:
                    st = next(stats)
                    if st is None:
                        continue  # removed since the listing was taken
                    node: Node = self.tree.session(handle.node, key)
                    attrs = self._attrs(node, st)
                else:
                    try:
                        node, _ = await self._find(handle.node, name)
                    except pyfuse3.FUSEError:
                        continue
                    attrs = await self._attrs_of(node)
                if not pyfuse3.readdir_reply(token, name.encode(), attrs, position + offset + 1):
                    return
                node.nlookup += 1
            position += len(chunk)

    async def _stat_many(self, parent: Dir, keys: list[str]) -> list[os.stat_result | None]:
        return await self._store(parent, lambda b: b.stat_many(keys)) if keys else []

    @guarded
    async def releasedir(self, fh: int) -> None:
        del self.dir_handles[fh]

    # -- reading -------------------------------------------------------------

    def _new_handle(
        self, node: Node, flags: int, data: bytes | bytearray, version: object = None
    ) -> Handle:
        handle = Handle(next(self._next_fh), node, flags, data, version)
        self.handles[handle.fh] = handle
        node.open_handles += 1
        return handle

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, Control):
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            handle = self._new_handle(node, flags, node.render())
            return pyfuse3.FileInfo(fh=handle.fh, direct_io=True, keep_cache=False)
        if isinstance(node, Session):
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                raise pyfuse3.FUSEError(errno.EROFS)
            assert node.parent is not None
            snap = await self._store(node.parent, lambda b: b.read(node.key))
            keep_cache = node.cached_version == snap.version
            if not keep_cache and node.cached_version is not None:
                # The kernel may still hold the old size; reads would stop there.
                pyfuse3.invalidate_inode(node.ino, attr_only=True)
            node.cached_version = snap.version
            handle = self._new_handle(node, flags, snap.data, snap.version)
            return pyfuse3.FileInfo(fh=handle.fh, keep_cache=keep_cache)
        raise pyfuse3.FUSEError(errno.EISDIR if isinstance(node, Dir) else errno.EACCES)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        node = handle.node
        if isinstance(node, Session) and handle.version != node.cached_version:
            # Pages of another version are entering the cache: make the next open drop it.
            node.cached_version = None
        return bytes(handle.data[off : off + size])

    @guarded
    async def flush(self, fh: int) -> None:
        return None

    @guarded
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        self.tree.release(handle.node)
